"""A callback's write answered within Tencent's 2 s, whatever holds the store.

`within_deadline` waits RECORD_DEADLINE_S for a write, then answers StoreUnavailable (a 503
FAIL packet) while the write goes on: a lock held elsewhere (an outbox command stopped with
Ctrl-Z, a `sqlite3` session in a transaction, a PostgreSQL table locked), a server that hangs.
Should the write commit after all, the event is delivered like any other, and Tencent's retry of
the callback is a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from bridge.store import Recorded, StoreUnavailable

log = logging.getLogger(__name__)

RECORD_DEADLINE_S = 1.8


async def within_deadline(
    write: Awaitable[Recorded], late: set[asyncio.Future[Recorded]]
) -> Recorded:
    """`write`'s outcome, or StoreUnavailable after RECORD_DEADLINE_S; a write still under way
    is kept in `late` (the loop keeps only a weak reference to a task) until it ends. A future
    (SQLite's writer's) is waited on with a timer alone: wait_for and shield around a task of
    its own cost 17 µs a callback."""
    running = asyncio.ensure_future(write)
    if not running.done():
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        def answer(_: object) -> None:
            if not answered.done():
                answered.set_result(None)

        running.add_done_callback(answer)
        timer = loop.call_later(RECORD_DEADLINE_S, answer, None)
        try:
            await answered
        finally:
            timer.cancel()
            running.remove_done_callback(answer)
    if running.done():
        return running.result()
    late.add(running)
    running.add_done_callback(late.discard)
    running.add_done_callback(_late_record)
    raise StoreUnavailable(
        f"store unavailable: the database did not commit within {RECORD_DEADLINE_S} s"
    )


def _late_record(write: asyncio.Future[Recorded]) -> None:
    """A callback's write that finished after its 503: said once, its outcome taken."""
    if write.cancelled():
        return
    if (exc := write.exception()) is not None:
        log.debug("a write answered with 503 failed afterwards: %s", exc)
    elif not write.result().duplicate:
        log.info("event=%d was stored after its callback was answered 503", write.result().event_id)
