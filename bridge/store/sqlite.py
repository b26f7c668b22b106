"""The embedded SQLite store: WAL, fsync on commit, group commit through one writer thread.

One `live-bridge serve` owns a database file (an advisory lock refuses a second one); its delivery
process (`[delivery] own_process`) and the outbox commands may open it alongside. Every writer
takes the file's write lock for each transaction (see writer.py), and SQLite's own locking stays
underneath. Claims and channel leases carry the instance's owner id, so both engines keep one
semantics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from bridge.store import (
    ChannelStats,
    Claimed,
    DeliveryRow,
    NewDelivery,
    NewEvent,
    Pace,
    RecentEvent,
    Recorded,
    State,
    StoreUnavailable,
)
from bridge.store.schema import (
    CLAIM_SQL,
    DUE_SQL,
    HIGH_WATER_SQL,
    LIST_SQL,
    MARK_DELIVERED_SQL,
    NEXT_IDS_SQL,
    SCHEMA_VERSION,
    STATS_SQL,
    TAKE_SQL,
    migrate,
)
from bridge.store.writer import GroupCommitWriter, Together

log = logging.getLogger(__name__)

T = TypeVar("T")
Sync = Literal["full", "normal"]  # [store] sync


def connect(path: Path, sync: Sync = "full") -> sqlite3.Connection:
    """A connection in the settings every user of the file must share; `sync` ("full" or
    "normal") is the writer's."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the OK packet goes out, power loss included. NORMAL (in
    # WAL mode): a commit is in the operating system's hands, safe from a crash of the process.
    conn.execute("PRAGMA synchronous=FULL" if sync == "full" else "PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _in(sql: str, values: Sequence[object]) -> str:
    """`sql` with its `{marks}` replaced by one `?` per value: values stay parameters."""
    return sql.replace("{marks}", ",".join("?" * len(values)))


def _chunks(values: Sequence[T], size: int) -> list[Sequence[T]]:
    """`values` in runs of at most `size`: one statement each within SQLite's parameter limit."""
    return [values[start : start + size] for start in range(0, len(values), size)]


class SQLiteStore:
    def __init__(
        self, path: Path, exclusive: bool = False, sync: Sync = "full", gather_s: float = 0.0
    ) -> None:
        self.path = path
        self._sync = sync
        self._gather_s = gather_s  # see GroupCommitWriter
        self._exclusive = exclusive  # the serving process: hold the lock file
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None
        self._write_lock_fd: int | None = None
        self.owner = uuid.uuid4().hex  # written on what this instance claims and takes
        self.identity = ""  # the database's, once open (Store.identity)
        self._reader: sqlite3.Connection | None = None  # for what operators read
        self._reading = threading.Lock()

    @property
    def commits(self) -> int:
        return self._writer.commits if self._writer else 0

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._exclusive:
                self._lock()
            # Every process that writes the file takes this one's flock for each transaction:
            # the server, its delivery process and the outbox commands hand over at once.
            self._write_lock_fd = os.open(
                f"{self.path}.write-lock", os.O_RDONLY | os.O_CREAT, 0o600
            )
            conn = connect(self.path, self._sync)
            self.identity = migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from None
        self._writer = GroupCommitWriter(conn, self._write_lock_fd, self._gather_s)
        log.info("store open: %s (schema %d)", self.path, SCHEMA_VERSION)

    def _lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError("another live-bridge is serving from this database") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
        if self._write_lock_fd is not None:
            os.close(self._write_lock_fd)
            self._write_lock_fd = None

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        with self._reading:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self._unlock()

    async def _submit(self, op: Callable[[sqlite3.Connection], T], urgent: bool = False) -> T:
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        return await self._writer.submit(op, urgent)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """`op` on a connection of its own, in a thread: what the status page, /metrics and the
        outbox commands read (counting every row, say) never holds up the writer's commits."""
        if self._writer is None:
            raise StoreUnavailable("store is not open")

        def run() -> T:
            with self._reading:
                try:
                    if self._reader is None:
                        self._reader = connect(self.path)
                        self._reader.execute("PRAGMA query_only=ON")
                    return op(self._reader)
                except sqlite3.Error as exc:
                    raise StoreUnavailable(f"store read failed: {exc}") from None

        return await asyncio.to_thread(run)

    async def _execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._submit(op)

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        def op(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql, params).fetchall()

        return await self._submit(op)

    async def recover(self) -> int:
        # The serving process holds the file's lock: no other process can have anything in flight
        # or hold a channel (a dead one's channel leases go too; the pacing state stays).
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("UPDATE channels SET lease_until = 0")
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
        return await self._submit(_Record(event, deliveries, now, dedup_window_s))

    async def due_channels(self, now: float, exclude: Sequence[str]) -> list[str]:
        rows = await self._fetch(DUE_SQL, {"now": now, "owner": self.owner})
        skip = set(exclude)
        return [r[0] for r in rows if r[0] not in skip]

    async def take_channel(self, channel: str, now: float, lease_s: float) -> Pace | None:
        rows = await self._fetch(TAKE_SQL, (channel, self.owner, now + lease_s, now))
        return Pace(tat=rows[0][0], blocked_until=rows[0][1]) if rows else None

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        await self._execute(
            "UPDATE channels SET lease_until = 0, tat = ?, blocked_until = ?"
            " WHERE channel = ? AND owner = ?",
            (pace.tat, pace.blocked_until, channel, self.owner),
        )

    async def claim(self, channel: str, now: float, limit: int, lease_s: float) -> list[Claimed]:
        def op(conn: sqlite3.Connection) -> list[Claimed]:
            rows = conn.execute(
                CLAIM_SQL, {"channel": channel, "now": now, "limit": limit}
            ).fetchall()
            ids = [row[0] for row in rows]
            if ids:  # one statement, not one a row: each one stepped is a wait for the GIL
                conn.execute(
                    _in("UPDATE deliveries SET state = 'in_flight', attempts = attempts + 1,"
                        " lease_until = ?, updated_at = ?, owner = ? WHERE id IN ({marks})", ids),
                    (now + lease_s, now, self.owner, *ids),
                )  # fmt: skip
            return [
                Claimed(id=r[0], event_id=r[1], channel=r[2], payload=r[3], attempts=r[4] + 1,
                        room_id=r[5], command=r[6], body=r[7], query=r[8], received_at=r[9],
                        sdk_app_id=r[10])
                for r in rows
            ]  # fmt: skip

        return await self._submit(op, urgent=True)  # its sends wait for it

    # Outcomes apply to a delivery this instance claimed and still holds: one buried meanwhile
    # (its channel removed by a reload) stays dead, except that a delivery that did get through
    # is recorded as such; one whose lease ran out and that another claim took is left alone.
    async def mark_delivered(self, delivery_id: int, now: float) -> None:
        # The outcome of most sends: those of one batch are marked together, in one statement.
        await self._submit(_Delivered(delivery_id, now, self.owner))

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> None:
        # count=False gives the attempt back: the far end asked us to wait, nothing failed.
        await self._execute(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, last_error = ?,"
            " attempts = attempts - ?, lease_until = NULL, updated_at = ?, owner = NULL"
            " WHERE id = ? AND owner = ? AND state = 'in_flight'",
            (next_attempt_at, error, 0 if count else 1, now, delivery_id, self.owner),
        )

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> None:
        await self._execute(
            "UPDATE deliveries SET state = 'dead', last_error = ?, lease_until = NULL,"
            " updated_at = ?, owner = NULL WHERE id = ? AND owner = ? AND state = 'in_flight'",
            (error, now, delivery_id, self.owner),
        )

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        if ids:
            sql = (
                "UPDATE deliveries SET state = 'pending', attempts = attempts - 1,"
                " next_attempt_at = ?, lease_until = NULL, updated_at = ?, owner = NULL"
                " WHERE id IN ({marks}) AND owner = ? AND state = 'in_flight'"
            )
            await self._execute(_in(sql, ids), (next_attempt_at, now, *ids, self.owner))

    async def next_due(self, now: float) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM deliveries"
            " WHERE state = 'pending' AND next_attempt_at > :now UNION ALL"
            " SELECT MIN(lease_until) FROM deliveries"
            " WHERE state = 'in_flight' AND lease_until > :now)",
            {"now": now},
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def get_thread(self, channel: str, room_id: str, not_before: float) -> str | None:
        rows = await self._fetch(
            "SELECT ts FROM threads WHERE channel = ? AND room_id = ? AND started_at >= ?",
            (channel, room_id, not_before),
        )
        return str(rows[0][0]) if rows else None

    async def set_thread(self, channel: str, room_id: str, ts: str, now: float) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO threads (channel, room_id, ts, started_at) VALUES (?, ?, ?, ?)",
            (channel, room_id, ts, now),
        )

    async def forget_thread(self, channel: str, room_id: str) -> None:
        await self._execute(
            "DELETE FROM threads WHERE channel = ? AND room_id = ?", (channel, room_id)
        )

    async def ping(self) -> None:
        # A row that really changes: SQLite skips an update that writes the same value, and a
        # commit that writes nothing succeeds on a full or read-only disk.
        await self._execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('ping', ?)", (str(time.time()),)
        )

    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute(HIGH_WATER_SQL)
            n = conn.execute(
                "DELETE FROM deliveries WHERE state = 'delivered' AND delivered_at < ?",
                (delivered_before,),
            ).rowcount
            n += conn.execute(
                "DELETE FROM events WHERE received_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)",
                (delivered_before,),
            ).rowcount
            n += conn.execute("DELETE FROM dedup WHERE seen_at < ?", (dedup_before,)).rowcount
            n += conn.execute(
                "DELETE FROM threads WHERE started_at < ?", (threads_before,)
            ).rowcount
            return n

        return await self._submit(op)

    async def stats(self) -> list[ChannelStats]:
        def op(conn: sqlite3.Connection) -> list[ChannelStats]:
            return [ChannelStats(*row) for row in conn.execute(STATS_SQL)]

        return await self._read(op)

    async def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            params = {"dead": int(dead_only), "channel": channel, "limit": limit}
            return [_delivery_row(r) for r in conn.execute(LIST_SQL, params)]

        return await self._read(op)

    async def recent_events(self, limit: int) -> list[RecentEvent]:
        def op(conn: sqlite3.Connection) -> list[RecentEvent]:
            events = conn.execute(
                "SELECT id, received_at, command, room_id FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            if not events:
                return []
            ids = [e[0] for e in events]
            rows = conn.execute(
                _in(
                    "SELECT d.id, d.event_id, d.channel, d.room_id, e.command, d.state,"
                    " d.attempts, d.last_error, d.created_at, d.updated_at, d.next_attempt_at"
                    " FROM deliveries d JOIN events e ON e.id = d.event_id"
                    " WHERE d.event_id IN ({marks}) ORDER BY d.id",
                    ids,
                ),
                ids,
            ).fetchall()
            by_event: dict[int, list[DeliveryRow]] = {}
            for r in rows:
                by_event.setdefault(r[1], []).append(_delivery_row(r))
            return [
                RecentEvent(e[0], e[1], e[2], e[3], tuple(by_event.get(e[0], ()))) for e in events
            ]

        return await self._read(op)

    async def retry(self, ids: Sequence[int], now: float) -> list[int]:
        sql = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " lease_until = NULL, updated_at = ?, owner = NULL WHERE id IN ({marks})"
            " AND state IN ('dead', 'pending') AND (lease_until IS NULL OR lease_until <= ?)"
            " RETURNING id"
        )

        def op(conn: sqlite3.Connection) -> list[int]:
            return [
                row[0]
                for chunk in _chunks(ids, MAX_PARAMS - 3)
                for row in conn.execute(_in(sql, chunk), (now, now, *chunk, now)).fetchall()
            ]

        return await self._submit(op)

    async def retry_dead(self, channel: str | None, now: float) -> int:
        return await self._execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " lease_until = NULL, updated_at = ?, owner = NULL WHERE state = 'dead'"
            " AND (? IS NULL OR channel = ?) AND (lease_until IS NULL OR lease_until <= ?)",
            (now, now, channel, channel, now),
        )

    async def drop(self, ids: Sequence[int]) -> list[int]:
        sql = (
            "DELETE FROM deliveries WHERE id IN ({marks}) AND state IN ('dead', 'pending')"
            " RETURNING id"
        )

        def op(conn: sqlite3.Connection) -> list[int]:
            conn.execute(HIGH_WATER_SQL)
            return [
                row[0]
                for chunk in _chunks(ids, MAX_PARAMS)
                for row in conn.execute(_in(sql, chunk), chunk).fetchall()
            ]

        return await self._submit(op)

    async def bury_unknown_channels(self, known: Sequence[str], now: float, error: str) -> int:
        # The owner and the lease stay: a send under way that gets through is still recorded as
        # delivered, and until the lease runs out a retry would send it again (see retry).
        sql = (
            "UPDATE deliveries SET state = 'dead', last_error = ?,"
            " updated_at = ? WHERE state IN ('pending', 'in_flight')"
            " AND channel NOT IN ({marks})"
        )
        return await self._execute(_in(sql, known), (error, now, *known))

    async def forget_payloads(self, channels: Sequence[str]) -> int:
        # In flight too: its lane holds the message already; a retry is rendered again.
        sql = (
            "UPDATE deliveries SET payload = NULL WHERE state <> 'delivered'"
            " AND payload IS NOT NULL AND channel IN ({marks})"
        )
        return await self._execute(_in(sql, channels), tuple(channels))


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
            sql = _in("SELECT key, event_id, seen_at FROM dedup WHERE key IN ({marks})", chunk)
            seen.update((key, (event_id, at)) for key, event_id, at in conn.execute(sql, chunk))
        # The ids given here, not by SQLite (the largest so far, plus one, which would give a
        # deleted row's id again), so that the deliveries can name their event in the same few
        # statements.
        next_id, next_delivery_id = conn.execute(NEXT_IDS_SQL).fetchone()
        results: list[Recorded] = []
        events: list[tuple[Any, ...]] = []
        deliveries: list[tuple[Any, ...]] = []
        dedup: list[tuple[Any, ...]] = []
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
            deliveries.extend(
                (next_delivery_id + n, event_id, d.channel,
                 State.PENDING if d.error is None else State.DEAD, d.payload, now, d.error, now,
                 now, event.room_id, order_ts)
                for n, d in enumerate(op.deliveries)
            )  # fmt: skip
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


# Bound parameters per statement: SQLite's limit before 3.32, the lowest a build may have.
MAX_PARAMS = 999


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`head` ("INSERT … VALUES") for all `rows`, in as few statements as the limit allows."""
    if not rows:
        return
    width = len(rows[0])
    per = MAX_PARAMS // width
    mark = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.execute(f"{head} {','.join([mark] * len(chunk))}", [v for row in chunk for v in row])


@dataclasses.dataclass(frozen=True)
class _Delivered(Together):
    """A delivery that got through; those of a batch are marked in one statement."""

    delivery_id: int
    at: float
    owner: str

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[_Delivered]) -> list[None]:
        owner = ops[0].owner  # a writer serves one store, which has one owner
        per = (MAX_PARAMS - 1) // 2
        for start in range(0, len(ops), per):
            chunk = ops[start : start + per]
            sql = MARK_DELIVERED_SQL.replace("{values}", ",".join(["(?, ?)"] * len(chunk)))
            conn.execute(sql, [v for op in chunk for v in (op.delivery_id, op.at)] + [owner])
        return [None] * len(ops)


def _delivery_row(r: Sequence[Any]) -> DeliveryRow:
    return DeliveryRow(
        id=r[0], event_id=r[1], channel=r[2], room_id=r[3], command=r[4], state=State(r[5]),
        attempts=r[6], last_error=r[7], created_at=r[8], updated_at=r[9], next_attempt_at=r[10],
    )  # fmt: skip
