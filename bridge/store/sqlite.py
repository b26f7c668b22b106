"""The embedded SQLite store, with group commit.

One writer thread owns the connection. Callers queue operations; the thread takes everything that
is queued, runs each operation inside its own savepoint of one transaction, commits once, and only
then answers the callers. Concurrent callbacks therefore share one fsync, and an operation that
fails rolls back alone while the rest of its batch commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bridge.store import Claimed, NewDelivery, NewEvent, Recorded, State, StoreUnavailable
from bridge.store.schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Item = tuple[_Op, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]

MAX_BATCH = 1024

# Due deliveries, oldest first, at most `per_channel` of each channel; {exclude} becomes "?" marks.
CLAIM_SQL = """
SELECT id, event_id, channel, payload, attempts, room_id, command FROM (
    SELECT d.id, d.event_id, d.channel, d.payload, d.attempts, e.room_id, e.command,
           d.next_attempt_at AS due,
           ROW_NUMBER() OVER (PARTITION BY d.channel ORDER BY d.next_attempt_at, d.id) AS n
    FROM deliveries d JOIN events e ON e.id = d.event_id
    WHERE ((d.state = 'pending' AND d.next_attempt_at <= ?)
        OR (d.state = 'in_flight' AND d.lease_until <= ?))
      AND d.channel NOT IN ({exclude})
) WHERE n <= ? ORDER BY due, id LIMIT ?
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in the settings every user of the file must share."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the OK packet goes out, power loss included.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.commits = 0  # transactions committed; fewer than operations under load

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            migrate(conn)
            # One process owns a SQLite store: whatever it had in flight when it stopped
            # (crash, kill -9) was not confirmed and is due again now.
            released = conn.execute(
                "UPDATE deliveries SET state = 'pending', lease_until = NULL"
                " WHERE state = 'in_flight'"
            ).rowcount
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from None
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        log.info("store open: %s (schema %d)", self.path, SCHEMA_VERSION)
        if released:
            log.warning("%d deliveries were in flight at the last stop: sending again", released)

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def _submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None:
            raise StoreUnavailable("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((op, loop, future))
        return await future

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, I/O error):
                        # the operations before this one are gone too.
                        raise
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            log.error("store commit failed: %s", exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"store commit failed: {exc}")
            results = [(False, failure)] * len(batch)
        for (_, loop, future), (ok, value) in zip(batch, results, strict=True):
            if isinstance(value, sqlite3.Error):
                value = StoreUnavailable(f"store write failed: {value}")
            loop.call_soon_threadsafe(_settle, future, ok, value)

    async def record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded:
        def op(conn: sqlite3.Connection) -> Recorded:
            if dedup_window_s > 0:
                row = conn.execute(
                    "SELECT event_id FROM dedup WHERE key = ? AND seen_at > ?",
                    (event.dedup_key, now - dedup_window_s),
                ).fetchone()
                if row is not None:
                    return Recorded(event_id=row[0], duplicate=True)
            cursor = conn.execute(
                "INSERT INTO events (received_at, sdk_app_id, command, room_id, event_time,"
                " body, query) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, event.sdk_app_id, event.command, event.room_id, event.event_time,
                 event.body, event.query),
            )  # fmt: skip
            event_id = cursor.lastrowid
            assert event_id is not None
            conn.executemany(
                "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at,"
                " last_error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (event_id, d.channel, State.PENDING if d.error is None else State.DEAD,
                     d.payload, now, d.error, now, now)
                    for d in deliveries
                ],
            )  # fmt: skip
            if dedup_window_s > 0:
                conn.execute(
                    "INSERT OR REPLACE INTO dedup (key, seen_at, event_id) VALUES (?, ?, ?)",
                    (event.dedup_key, now, event_id),
                )
            return Recorded(event_id=event_id, duplicate=False)

        return await self._submit(op)

    async def claim(
        self, now: float, limit: int, per_channel: int, lease_s: float,
        exclude_channels: Sequence[str],
    ) -> list[Claimed]:  # fmt: skip
        def op(conn: sqlite3.Connection) -> list[Claimed]:
            sql = CLAIM_SQL.replace("{exclude}", ",".join("?" * len(exclude_channels)))
            rows = conn.execute(sql, (now, now, *exclude_channels, per_channel, limit)).fetchall()
            conn.executemany(
                "UPDATE deliveries SET state = 'in_flight', attempts = attempts + 1,"
                " lease_until = ?, updated_at = ? WHERE id = ?",
                [(now + lease_s, now, row[0]) for row in rows],
            )
            return [
                Claimed(id=r[0], event_id=r[1], channel=r[2], payload=r[3], attempts=r[4] + 1,
                        room_id=r[5], command=r[6])
                for r in rows
            ]  # fmt: skip

        return await self._submit(op)

    async def mark_delivered(self, delivery_id: int, now: float) -> None:
        await self._update(
            "UPDATE deliveries SET state = 'delivered', delivered_at = ?, updated_at = ?,"
            " lease_until = NULL WHERE id = ?",
            (now, now, delivery_id),
        )

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> None:
        # count=False gives the attempt back: the far end asked us to wait, nothing failed.
        await self._update(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, last_error = ?,"
            " attempts = attempts - ?, lease_until = NULL, updated_at = ? WHERE id = ?",
            (next_attempt_at, error, 0 if count else 1, now, delivery_id),
        )

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> None:
        await self._update(
            "UPDATE deliveries SET state = 'dead', last_error = ?, lease_until = NULL,"
            " updated_at = ? WHERE id = ?",
            (error, now, delivery_id),
        )

    async def _update(self, sql: str, params: tuple[Any, ...]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(sql, params)

        await self._submit(op)

    async def next_due(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM deliveries"
                " WHERE state = 'pending' UNION ALL SELECT MIN(lease_until) FROM deliveries"
                " WHERE state = 'in_flight')"
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._submit(op)

    async def ping(self) -> None:
        await self._update("UPDATE meta SET value = value WHERE key = 'schema_version'", ())

    async def prune_dedup(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM dedup WHERE seen_at < ?", (before,)).rowcount

        return await self._submit(op)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller went away; the write itself stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
