"""The SQLite store's side for operators and upkeep: counts and lists for the status page,
/metrics and the outbox commands; retry and drop; a reload's changes; retention.

What operators read goes through a connection of its own (SQLiteFile._read): counting every row
never holds up the writer's commits.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bridge.store import ChannelStats, DeliveryRow, RecentEvent
from bridge.store.sqlite_file import SQLiteFile
from bridge.store.sqlite_params import chunks, sql_in
from bridge.store.sqlite_statements import (
    CHANNEL_NAMES,
    HIGH_WATER_SQL,
    LIST_SQL,
    OLD_EVENTS_SQL,
    PRUNE_SQL,
    STATS_SQL,
)

# Rows a long change (a prune, of each table; a retry or burial of a whole channel) changes per
# transaction: a few ms, callbacks committing in between.
BATCH = 500
# The channels that hold deliveries in {states}: one index seek per channel name (a skip scan).
CHANNELS_IN_SQL = f"""{CHANNEL_NAMES}
SELECT channel FROM names WHERE channel IS NOT NULL
  AND EXISTS (SELECT 1 FROM deliveries d INDEXED BY deliveries_claim
              WHERE d.channel = names.channel AND d.state IN ({{states}}))
"""  # noqa: S608  # constant text, no values
# A dead letter buried while it was sent waits for its lease (see retry), and is not taken:
# taken and left dead, it would be taken again by every batch. Nor is one dead since the command
# began: one it retried, sent and dead again meanwhile was taken again by a later batch, sent
# three times, and counted each time (15,888 "back to pending" of 10,000 dead letters).
RETRY_DEAD_SQL = """
UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = :now,
       lease_until = NULL, updated_at = :now, owner = NULL, payload = NULL
WHERE id IN (SELECT id FROM deliveries INDEXED BY deliveries_claim
             WHERE channel = :channel AND state = 'dead' AND updated_at <= :now
               AND (lease_until IS NULL OR lease_until <= :now)
             ORDER BY order_ts, id LIMIT :batch)
"""
RESUME_SQL = """
UPDATE deliveries SET next_attempt_at = :now
WHERE id IN (SELECT id FROM deliveries INDEXED BY deliveries_claim
             WHERE channel = :channel AND state = 'pending' AND attempts > 0
               AND next_attempt_at > :now LIMIT :batch)
"""
FORGET_SQL = """
UPDATE deliveries SET payload = NULL
WHERE id IN (SELECT id FROM deliveries INDEXED BY deliveries_claim
             WHERE channel = :channel AND state IN ('pending', 'in_flight', 'dead')
               AND payload IS NOT NULL LIMIT :batch)
"""
# The owner and the lease stay: a send under way that gets through is still recorded as
# delivered, and until the lease runs out a retry would send it again (see retry).
BURY_SQL = """
UPDATE deliveries SET state = 'dead', last_error = :error, updated_at = :now
WHERE id IN (SELECT id FROM deliveries INDEXED BY deliveries_claim
             WHERE channel = :channel AND state IN ('pending', 'in_flight') LIMIT :batch)
"""
DELETE_EVENTS_SQL = "DELETE FROM events WHERE id IN ({marks})"
_Walked = tuple[int, tuple[float, int] | None]  # events deleted; where the walk goes on, if it does
# For some ids, the writer's operation that acts on them and says which it acted on.
_ByIds = Callable[[Sequence[int]], Callable[[sqlite3.Connection], list[int]]]


class SQLiteOutbox(SQLiteFile):
    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        # In transactions of at most BATCH rows a table, callbacks committing in between:
        # rows pile up while the server is down or when the retention is shortened, and in one
        # transaction 300,000 old events held the writer, and every acknowledgement, for 5 s.
        cutoffs = (delivered_before, dedup_before, threads_before)

        def rows(conn: sqlite3.Connection) -> int:
            conn.execute(HIGH_WATER_SQL)
            return sum(
                conn.execute(sql, (before, BATCH)).rowcount
                for sql, before in zip(PRUNE_SQL, cutoffs, strict=True)
            )

        def events(after: tuple[float, int]) -> Callable[[sqlite3.Connection], _Walked]:
            def op(conn: sqlite3.Connection) -> _Walked:
                conn.execute(HIGH_WATER_SQL)
                walked = conn.execute(OLD_EVENTS_SQL, (*after, delivered_before, BATCH)).fetchall()
                unused = [event_id for event_id, _, free in walked if free]
                n = (
                    conn.execute(sql_in(DELETE_EVENTS_SQL, unused), unused).rowcount
                    if unused
                    else 0
                )
                more = len(walked) == BATCH
                return n, (walked[-1][1], walked[-1][0]) if more else None

            return op

        total = 0
        while pruned := await self._submit(rows):
            total += pruned
        after: tuple[float, int] | None = (-sys.float_info.max, 0)  # before any time
        while after is not None:
            pruned, after = await self._submit(events(after))
            total += pruned
        return total

    async def stats(self) -> list[ChannelStats]:
        def op(conn: sqlite3.Connection) -> list[ChannelStats]:
            return [ChannelStats(*row) for row in conn.execute(STATS_SQL)]

        return await self._read(op)

    async def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            params = {"dead": int(dead_only), "channel": channel, "limit": limit}
            return [DeliveryRow.of(r) for r in conn.execute(LIST_SQL, params)]

        return await self._read(op)

    async def recent_events(self, limit: int) -> list[RecentEvent]:
        def op(conn: sqlite3.Connection) -> list[RecentEvent]:
            events = conn.execute(
                "SELECT id, received_at, command, room_id, sdk_app_id FROM events"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            if not events:
                return []
            ids = [e[0] for e in events]
            rows = conn.execute(
                sql_in(
                    "SELECT d.id, d.event_id, d.channel, e.room_id, e.command, d.state,"
                    " d.attempts, d.last_error, d.created_at, d.updated_at, d.next_attempt_at,"
                    " e.sdk_app_id"
                    " FROM deliveries d JOIN events e ON e.id = d.event_id"
                    " WHERE d.event_id IN ({marks}) ORDER BY d.id",
                    ids,
                ),
                ids,
            ).fetchall()
            by_event: dict[int, list[DeliveryRow]] = {}
            for r in rows:
                by_event.setdefault(r[1], []).append(DeliveryRow.of(r))
            return [
                RecentEvent(e[0], e[1], e[2], e[3], tuple(by_event.get(e[0], ())), e[4])
                for e in events
            ]

        return await self._read(op)

    async def channels_of(self, ids: Sequence[int]) -> dict[int, str]:
        def op(conn: sqlite3.Connection) -> dict[int, str]:
            found: dict[int, str] = {}
            for chunk in chunks(list(dict.fromkeys(ids)), BATCH):
                sql = sql_in("SELECT id, channel FROM deliveries WHERE id IN ({marks})", chunk)
                found.update(conn.execute(sql, chunk).fetchall())
            return found

        return await self._read(op)

    async def retry(self, ids: Sequence[int], now: float) -> list[int]:
        sql = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
            " lease_until = NULL, updated_at = ?, owner = NULL, payload = NULL"
            " WHERE id IN ({marks})"
            " AND state IN ('dead', 'pending') AND (lease_until IS NULL OR lease_until <= ?)"
            " RETURNING id"
        )

        def op(chunk: Sequence[int]) -> Callable[[sqlite3.Connection], list[int]]:
            return lambda conn: [
                row[0] for row in conn.execute(sql_in(sql, chunk), (now, now, *chunk, now))
            ]

        return await self._by_ids(ids, op)

    async def retry_dead(self, channel: str | None, now: float) -> int:
        # A channel at a time, BATCH rows a transaction, oldest first (so that a room's
        # earlier message is pending no later than its next), callbacks committing in between:
        # a channel broken for days (a revoked token) holds its dead letters by the hundred
        # thousand, and in one transaction 100,000 held every acknowledgement for 0.6 s.
        channels = [channel] if channel is not None else await self._channels_in("'dead'")
        return await self._in_batches(RETRY_DEAD_SQL, channels, {"now": now})

    async def resume(self, channel: str, now: float) -> int:
        # In batches as retry_dead: an outage of hours leaves a backlog as large.
        return await self._in_batches(RESUME_SQL, [channel], {"now": now})

    async def drop(self, ids: Sequence[int], now: float) -> list[int]:
        # As retry: a dead letter buried while it was sent waits for its lease, so that "dropped"
        # never names a message that is going out (and would then be recorded as delivered).
        sql = (
            "DELETE FROM deliveries WHERE id IN ({marks}) AND state IN ('dead', 'pending')"
            " AND (lease_until IS NULL OR lease_until <= ?) RETURNING id"
        )

        def op(chunk: Sequence[int]) -> Callable[[sqlite3.Connection], list[int]]:
            def dropping(conn: sqlite3.Connection) -> list[int]:
                conn.execute(HIGH_WATER_SQL)
                return [row[0] for row in conn.execute(sql_in(sql, chunk), (*chunk, now))]

            return dropping

        return await self._by_ids(ids, op)

    async def _by_ids(
        self,
        ids: Sequence[int],
        op: Callable[[Sequence[int]], Callable[[sqlite3.Connection], list[int]]],
    ) -> list[int]:
        """`op` for BATCH of `ids` a transaction, callbacks committing in between: `outbox
        retry` of 100,000 ids in one held every acknowledgement for 3.7 s. The ids it acted on."""
        acted: list[int] = []
        # Each id once: named again in a later batch, a pending delivery was put back again,
        # and retry([1, 1, 1]) answered [1, 1] for one delivery (the store's model test).
        for chunk in chunks(list(dict.fromkeys(ids)), BATCH):
            acted += await self._submit(op(chunk))
        return acted

    # One serving process per file (its lock): no other instance serves channels, so nothing is
    # announced and every channel not in `known` is buried at once.
    async def announce(self, channels: Sequence[str], now: float) -> None:
        pass

    async def withdraw(self) -> None:
        pass

    async def bury_unknown_channels(
        self, known: Sequence[str], now: float, error: str, announced_since: float | None = None
    ) -> int:
        # In batches as retry_dead: a channel removed with a backlog of its own (the one that
        # broke) would otherwise hold every acknowledgement while the reload buries it.
        waiting = await self._channels_in("'pending', 'in_flight'")
        unknown = [name for name in waiting if name not in set(known)]
        return await self._in_batches(BURY_SQL, unknown, {"now": now, "error": error})

    async def _channels_in(self, states: str) -> list[str]:
        sql = CHANNELS_IN_SQL.format(states=states)
        return await self._read(lambda conn: [row[0] for row in conn.execute(sql)])

    async def _in_batches(self, sql: str, channels: Sequence[str], params: dict[str, Any]) -> int:
        """`sql` for each channel again and again, BATCH rows a transaction, until it changes
        none; callbacks commit in between. The rows changed."""
        total = 0
        for name in channels:
            while changed := await self._execute(sql, params | {"channel": name, "batch": BATCH}):
                total += changed
        return total

    async def forget_payloads(self, channels: Sequence[str]) -> int:
        # In flight too: its lane holds the message already; a retry is rendered again. In
        # batches as retry_dead: a retyped channel's backlog of 300,000 held every
        # acknowledgement for 2.9 s. Between two, a lane of the old config may still claim and
        # send: as the old type, with the old sender, as it should.
        return await self._in_batches(FORGET_SQL, channels, {})
