"""The PostgreSQL store: any number of `live-bridge serve` processes on one database.

Every method is one transaction on a pooled connection, and processes coordinate through rows
alone. A claim locks the deliveries it takes (FOR UPDATE SKIP LOCKED) and writes this instance's
owner id and a lease on them; a process that dies leaves leases that run out, and another claims
those deliveries again: sent at least once. Dedup holds through the unique key of `dedup`.

Any psycopg error becomes StoreUnavailable, whose message never holds the URL or its password.
The pool checks a connection before handing it out, so a server that comes back is used again.

`PostgresStore` is the pool (pg_pool.py), the worker's side (pg_queue.py), the operators' side
(pg_outbox.py) and the channels each replica serves (pg_presence.py); here, recording callbacks,
answered within RECORD_DEADLINE_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from bridge.store import NewDelivery, NewEvent, Recorded, State, StoreUnavailable
from bridge.store.deadline import within_deadline
from bridge.store.pg_outbox import PostgresOutbox
from bridge.store.pg_presence import PostgresPresence
from bridge.store.pg_queue import PostgresQueue
from bridge.store.pg_schema import RECORD_SQL

log = logging.getLogger(__name__)


class PostgresStore(PostgresQueue, PostgresOutbox, PostgresPresence):
    async def recover(self) -> int:
        # Other processes may be sending right now, and their in-flight rows are theirs: a dead
        # process's leases run out and its deliveries become claimable without any help.
        return 0

    async def record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded:
        """Unavailable after RECORD_DEADLINE_S, while the write goes on: cancelling it would
        first ask the server to cancel the query, up to 10 s when the server does not answer.
        Should it commit after all, the event is delivered like any other, and a retry of the
        callback is a duplicate."""
        return await within_deadline(
            self._record(event, deliveries, now, dedup_window_s), self._late
        )

    async def _record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded:
        params = {
            "key": event.dedup_key, "now": now, "expired": now - dedup_window_s,
            "dedup": dedup_window_s > 0, "sdk_app_id": event.sdk_app_id,
            "command": event.command, "room_id": event.room_id, "event_time": event.event_time,
            "body": event.body, "query": event.query,
            "order_ts": event.event_time if event.event_time is not None else int(now * 1000),
            "room_key": event.room_key,
            "after_room": event.event_time is None and event.room_id is not None,
            "channels": [d.channel for d in deliveries],
            "states": [State.PENDING if d.error is None else State.DEAD for d in deliveries],
            "payloads": [d.payload for d in deliveries],
            "errors": [d.error for d in deliveries],
        }  # fmt: skip
        async with self._connection() as conn:
            row = await (await conn.execute(RECORD_SQL, params)).fetchone()
            if row is not None:
                return Recorded(event_id=row[0], duplicate=False)
            # The key is held: committed by now, since the upsert waited for its transaction.
            cursor = await conn.execute(
                "SELECT event_id FROM dedup WHERE key = %s", (event.dedup_key,)
            )
            if (first := await cursor.fetchone()) is None:  # pruned in between
                raise StoreUnavailable("dedup entry vanished while recording")
            return Recorded(event_id=first[0], duplicate=True)

    async def ping(self) -> None:
        # A real write: a server that answers reads but cannot commit is not ready.
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ('ping', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(time.time()),),
        )
