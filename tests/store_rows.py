"""For the store tests: `new_event` builds an event, `add` records one with one delivery, and
`opener` opens store instances and closes them all at the end."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

from bridge.store import NewDelivery, NewEvent, Store

P = ParamSpec("P")
S = TypeVar("S", bound=Store)


def new_event(key: str = "k1", room: str | None = "r1", event_time: int | None = 1000) -> NewEvent:
    return NewEvent(
        sdk_app_id=1400000000, command="Live.CallbackAfterChangeOwner", room_id=room,
        event_time=event_time, body='{"CallbackCommand":"x"}', query="{}", dedup_key=key,
    )  # fmt: skip


async def add(store: Store, key: str, channel: str = "a", room: str | None = "r1",
              event_time: int | None = 1000, now: float | None = None) -> int:  # fmt: skip
    """Records event `key` with one delivery to `channel` (payload `p-<key>`); its event id."""
    recorded = await store.record(
        new_event(key, room, event_time), [NewDelivery(channel, f"p-{key}")],
        now if now is not None else time.time(), 0,
    )  # fmt: skip
    return recorded.event_id


@contextlib.asynccontextmanager
async def opener(make: Callable[P, S]) -> AsyncIterator[Callable[P, Awaitable[S]]]:
    """`open_(...)` makes a store with `make(...)` and opens it, as another process (or a
    restart) would; every store opened is closed at the end."""
    stores: list[S] = []

    async def open_(*args: P.args, **kwargs: P.kwargs) -> S:
        store = make(*args, **kwargs)
        await store.open()
        stores.append(store)
        return store

    try:
        yield open_
    finally:
        for store in stores:
            await store.close()
