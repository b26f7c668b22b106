"""The embedded SQLite store: WAL, fsync on commit, group commit through one writer thread.

One `live-bridge serve` owns a database file (an advisory lock refuses a second one); its delivery
process (`[delivery] own_process`) and the outbox commands may open it alongside. Every writer
takes the file's write lock for each transaction (see writer.py), and SQLite's own locking stays
underneath. Claims and channel leases carry the instance's owner id, so both engines keep one
semantics.

`SQLiteStore` is the file and its connections (sqlite_file.py), the worker's side
(sqlite_queue.py) and the operators' side (sqlite_outbox.py); here, recording callbacks: the
writer records each batch's events, deliveries and dedup keys together.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from bridge.store import NewDelivery, NewEvent, Recorded, State, StoreUnavailable
from bridge.store.deadline import within_deadline
from bridge.store.sqlite_outbox import SQLiteOutbox
from bridge.store.sqlite_params import MAX_PARAMS, insert_rows, sql_in
from bridge.store.sqlite_queue import SQLiteQueue
from bridge.store.sqlite_statements import NEXT_IDS_SQL, ORDER_AFTER_ROOM
from bridge.store.writer import Together

log = logging.getLogger(__name__)


class SQLiteStore(SQLiteQueue, SQLiteOutbox):
    async def recover(self) -> int:
        # The serving process holds the file's lock: no other process can have anything in flight
        # or hold a channel (a dead one's channel leases go too). A channel held at the stop was
        # never left, so its saved pacing is older than its last sends: unknown (TAKE_SQL).
        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "UPDATE channels SET tat = CASE WHEN lease_until > 0 THEN -1 ELSE tat END,"
                " lease_until = 0"
            )
            # Dead letters buried while in flight: their sends are over, they may be retried.
            conn.execute(
                "UPDATE deliveries SET lease_until = NULL, owner = NULL"
                " WHERE state = 'dead' AND owner IS NOT NULL"
            )
            return conn.execute(
                "UPDATE deliveries SET state = 'pending', lease_until = NULL, owner = NULL"
                " WHERE state = 'in_flight'"
            ).rowcount

        released = await self._submit(op)
        if released:
            log.warning("%d deliveries were in flight at the last stop: sending again", released)
        return released

    async def record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded:
        # Answered within Tencent's 2 s whatever holds the write lock (an outbox command
        # stopped with Ctrl-Z, a sqlite3 session in a transaction): 64 callbacks waited 8 s.
        return await within_deadline(
            self._enqueue(_Record(event, deliveries, now, dedup_window_s)), self._late
        )

    async def ping(self) -> None:
        if self.damaged is not None:  # the meta table's page may be sound; others are not
            raise StoreUnavailable(
                f"the database file {self.path} is damaged ({self.damaged}): restart live-bridge"
                " on a repaired file"
            )
        # A row that really changes: SQLite skips an update that writes the same value, and a
        # commit that writes nothing succeeds on a full or read-only disk.
        await self._execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('ping', ?)", (str(time.time()),)
        )


@dataclasses.dataclass(frozen=True)
class _Record(Together):
    """One callback's event, its deliveries and its dedup key; the writer records every callback
    of a batch together, in one statement per table."""

    event: NewEvent
    deliveries: Sequence[NewDelivery]
    now: float
    dedup_window_s: float

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[_Record]) -> list[Recorded]:
        keys = list({op.event.dedup_key for op in ops if op.dedup_window_s > 0})
        seen: dict[str, tuple[int, float]] = {}  # key: (event id, seen at)
        for start in range(0, len(keys), MAX_PARAMS):
            chunk = keys[start : start + MAX_PARAMS]
            sql = sql_in("SELECT key, event_id, seen_at FROM dedup WHERE key IN ({marks})", chunk)
            seen.update((key, (event_id, at)) for key, event_id, at in conn.execute(sql, chunk))
        # The ids given here, not by SQLite (the largest so far, plus one, which would give a
        # deleted row's id again), so that the deliveries can name their event in the same few
        # statements.
        next_id, next_delivery_id = conn.execute(NEXT_IDS_SQL).fetchone()
        results: list[Recorded] = []
        events: list[tuple[Any, ...]] = []
        deliveries: list[tuple[Any, ...]] = []
        dedup: list[tuple[Any, ...]] = []
        rooms = _Rooms()
        for op in ops:
            event, now = op.event, op.now
            if op.dedup_window_s > 0:
                hit = seen.get(event.dedup_key)
                if hit is not None and hit[1] > now - op.dedup_window_s:
                    results.append(Recorded(event_id=hit[0], duplicate=True))
                    continue
            event_id, next_id = next_id, next_id + 1
            events.append((event_id, now, event.sdk_app_id, event.command, event.room_id,
                           event.event_time, event.body, event.query))  # fmt: skip
            order_ts = event.event_time if event.event_time is not None else int(now * 1000)
            room = event.room_key
            for n, d in enumerate(op.deliveries):
                order = order_ts
                if room is not None:
                    order = rooms.after(conn, d.channel, room, order_ts,
                                        event.event_time is None)  # fmt: skip
                deliveries.append((next_delivery_id + n, event_id, d.channel,
                    State.PENDING if d.error is None else State.DEAD, d.payload, now, d.error,
                    now, now, room, order))  # fmt: skip
            next_delivery_id += len(op.deliveries)
            if op.dedup_window_s > 0:
                dedup.append((event.dedup_key, now, event_id))
                seen[event.dedup_key] = (event_id, now)  # a repeat in this batch is a duplicate
            results.append(Recorded(event_id=event_id, duplicate=False))
        insert_rows(conn, "INSERT INTO events (id, received_at, sdk_app_id, command, room_id,"
                    " event_time, body, query) VALUES", events)  # fmt: skip
        insert_rows(conn, "INSERT INTO deliveries (id, event_id, channel, state, payload,"
                    " next_attempt_at, last_error, created_at, updated_at, room_id, order_ts)"
                    " VALUES", deliveries)  # fmt: skip
        insert_rows(conn, "INSERT OR REPLACE INTO dedup (key, seen_at, event_id) VALUES", dedup)
        return results


class _Rooms:
    """Orders the deliveries of one batch of callbacks."""

    def __init__(self) -> None:
        self._stored: dict[tuple[str, str], int | None] = {}  # the file's latest, once read
        self._batch: dict[tuple[str, str], int] = {}  # this batch's latest

    def after(
        self, conn: sqlite3.Connection, channel: str, room: str, order_ts: int, arrival: bool
    ) -> int:
        """The order of a delivery to `channel` of an event in `room` (a store.room_key):
        `order_ts`, or, for an event ordered by its arrival (no EventTime), after everything its
        room has already (ORDER_AFTER_ROOM), this batch's deliveries included."""
        key = (channel, room)
        if arrival:
            if key not in self._stored:
                self._stored[key] = conn.execute(ORDER_AFTER_ROOM, key).fetchone()[0]
            order_ts = max(order_ts, self._stored[key] or order_ts, self._batch.get(key, order_ts))
        self._batch[key] = max(order_ts, self._batch.get(key, order_ts))
        return order_ts
