"""For the store tests: `new_event` builds an event, `add` records one with one delivery,
`opener` opens store instances and closes them all at the end, and `KEYED_BEFORE` and
`assert_retries_are_duplicates` check the dedup keys an upgrade carries over."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg

from bridge.events_body import decode_body
from bridge.events_parse import parse_event
from bridge.receive import dedup_key
from bridge.store import NewDelivery, NewEvent, Store
from bridge.store.pg_schema import MIGRATIONS as PG_MIGRATIONS
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore
from tests.bridge_server import OWNER

P = ParamSpec("P")
S = TypeVar("S", bound=Store)
APP = 1400000000  # the SDKAppID of the events made here


def new_event(
    key: str = "k1", room: str | None = "r1", event_time: int | None = 1000, app: int = APP
) -> NewEvent:
    return NewEvent(
        sdk_app_id=app, command="Live.CallbackAfterChangeOwner", room_id=room,
        event_time=event_time, body='{"CallbackCommand":"x"}', query="{}", dedup_key=key,
    )  # fmt: skip


async def add(
    store: Store, key: str, channel: str = "a", room: str | None = "r1",
    event_time: int | None = 1000, now: float | None = None, app: int = APP,
) -> int:  # fmt: skip
    """Records event `key` of app `app` with one delivery to `channel` (payload `p-<key>`); its
    event id."""
    recorded = await store.record(
        new_event(key, room, event_time, app), [NewDelivery(channel, f"p-{key}")],
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


# Events stored with the dedup keys of before the keys led with EventTime (SQLite schema 4,
# PostgreSQL schema 2): (event id, EventTime, body); OLD_KEYS holds each one's key as it was then.


def _body(room: str, at: int | None) -> str:
    time_field = f',"EventTime":{at}' if at is not None else ""
    return f'{{"CallbackCommand":"{OWNER}","RoomId":"{room}"{time_field}}}'


KEYED_BEFORE = [
    (n, at, _body(f"r{n}", at))
    # 5: EventTime in seconds, stored as sent before it was read as milliseconds.
    for n, at in ((1, 1703589922780), (2, -1), (3, None), (4, 2**63 - 1), (5, 1703589922))
]
OLD_KEYS = [hashlib.sha256(f"{OWNER}\0{body}".encode()).hexdigest() for _, _, body in KEYED_BEFORE]


async def assert_retries_are_duplicates(store: Store, now: float) -> None:
    """Tencent's retry of each event in KEYED_BEFORE, after the upgrade: found, not stored again."""
    for event_id, _, body in KEYED_BEFORE:
        at = parse_event(decode_body(body.encode())).EventTime  # as the receiver reads it today
        retry = NewEvent(
            sdk_app_id=1400000000, command=OWNER, room_id=f"r{event_id}", event_time=at,
            body=body, query="{}", dedup_key=dedup_key(OWNER, 1400000000, body.encode(), at),
        )  # fmt: skip
        recorded = await store.record(retry, [NewDelivery("a", "p")], now, 600)
        assert (recorded.event_id, recorded.duplicate) == (event_id, True), body


# The stores the store, worker and lane tests open, written once; each test file declares the
# one it uses: `store = pytest.fixture(sqlite_store)`.
SQLiteOpener = Callable[[], Awaitable[SQLiteStore]]
PostgresOpener = Callable[..., Awaitable[PostgresStore]]


async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """The test's own SQLite store, open."""
    store = SQLiteStore(tmp_path / "bridge.db")
    await store.open()
    yield store
    await store.close()


async def sqlite_opener(tmp_path: Path) -> AsyncIterator[SQLiteOpener]:
    """Opens the test's database, as often as a test restarts; closes every store at the end."""
    async with opener(lambda: SQLiteStore(tmp_path / "bridge.db")) as open_:
        yield open_


async def postgres_opener(postgres_url: str) -> AsyncIterator[PostgresOpener]:
    """Opens a store on the test's database, as another process would; closes them all."""

    def make(url: str = postgres_url, **options: Any) -> PostgresStore:
        return PostgresStore(url, **options)

    async with opener(make) as open_:
        yield open_


# Rows of two apps with a room of one name, as a version before SQLite's schema 11 (PostgreSQL
# 9) stored them: events (id, app, room), deliveries (event, channel, state, room, delivered_at),
# threads (channel, room, ts, started_at); and the rooms of the deliveries after the upgrade.
ROOMS_OF_TWO_APPS = [(1, 7, "r"), (2, 8, "r"), (3, 7, None), (4, 8, "r")]
DELIVERIES_OF_TWO_APPS = [
    (1, "bot", "delivered", "r", 100.1),  # app 7 started the thread
    (2, "bot", "delivered", "r", 200.0),  # app 8 replied in it
    (3, "bot", "pending", None, None), (4, "bot", "pending", "r", None),
    (4, "hook", "pending", "r", None),
]  # fmt: skip
THREADS_OF_TWO_APPS = [("bot", "r", "1.1", 100.0), ("hook", "r", "1.2", 50.0),
                       ("bot", "pruned", "1.3", 0.0)]  # fmt: skip
ROOM_KEYS = [("bot", "7:r"), ("bot", "8:r"), ("bot", None), ("bot", "8:r"), ("hook", "8:r")]


def old_postgres(url: str, version: int) -> None:
    """The database at `url` as live-bridge's schema code left it at `version` (migrations are
    appended to, never edited), for a test to add rows of that time and migrate."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for migration in PG_MIGRATIONS[:version]:
            conn.execute(migration)
        conn.execute("INSERT INTO meta VALUES ('schema_version', %s)", (str(version),))
