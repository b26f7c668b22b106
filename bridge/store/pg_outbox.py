"""The PostgreSQL store's side for operators and upkeep: counts and lists for the status page,
/metrics and the outbox commands; retry and drop; a reload's changes; retention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bridge.store import ChannelStats, DeliveryRow, RecentEvent
from bridge.store.pg_pool import PostgresPool
from bridge.store.pg_schema import EVENT_ROWS_SQL, LIST_SQL, STATS_SQL

# Rows of each table a prune deletes per transaction: tens of milliseconds. More than SQLite's
# 500, whose writer every callback waits for: here callbacks write other rows meanwhile, and
# batches of 500 took up to twice as long in all (300,000 old callbacks pruned beside 300 new
# ones a second: 15 to 25 s; in batches of 2,000, 9 to 13 s).
PRUNE_BATCH = 2000

# What retention deletes, a batch at a time (each with its cutoff and the batch's size): delivered
# deliveries, dedup keys and room threads. Events go afterwards (OLD_EVENTS_SQL). Oldest first, on
# deliveries_done and dedup_seen: unordered, the planner read the table from its start, through
# the rows the batches before had deleted, at every batch. SKIP LOCKED: replicas pruning at once
# take different rows, and a row locked elsewhere (a room's thread being replaced) is left for
# the next prune rather than waited for.
PRUNE_SQL = (
    "DELETE FROM deliveries WHERE ctid = ANY(ARRAY(SELECT ctid FROM deliveries"
    " WHERE state = 'delivered' AND delivered_at < %s ORDER BY delivered_at LIMIT %s"
    " FOR UPDATE SKIP LOCKED))",
    "DELETE FROM dedup WHERE ctid = ANY(ARRAY(SELECT ctid FROM dedup"
    " WHERE seen_at < %s ORDER BY seen_at LIMIT %s FOR UPDATE SKIP LOCKED))",
    "DELETE FROM threads WHERE ctid = ANY(ARRAY(SELECT ctid FROM threads"
    " WHERE started_at < %s LIMIT %s FOR UPDATE SKIP LOCKED))",
)

# The next events received before the cutoff, after (received_at, id), on events_received; of
# those, the ones no delivery refers to any more (a dead letter's event stays) are deleted, and
# the row is where the walk goes on: the events a prune keeps are read once a prune, not once a
# batch, and those the retention keeps not at all. Only the rows deleted are locked, and those
# another replica is deleting are passed over: locking every row walked would write a lock on
# each dead letter's event at every prune. No row: the walk is over.
# Deliveries a replica of a version before schema 9 recorded during a rolling upgrade name their
# room without its app (store.room_key): named at each prune, they rejoin their room's order.
# Delivered ones are done with. A key leads with digits and a colon: only the other rows are
# looked up, each then only where its room is its event's as it came.
ROOMS_OF_APPS_SQL = """
UPDATE deliveries d SET room_id = e.sdk_app_id::text || ':' || e.room_id
FROM events e
WHERE d.state IN ('pending', 'in_flight', 'dead') AND d.room_id !~ '^[0-9]+:'
  AND e.id = d.event_id AND d.room_id = e.room_id
"""

OLD_EVENTS_SQL = """
WITH walked AS (
  SELECT id, received_at FROM events
  WHERE (received_at, id) > (%(at)s, %(id)s) AND received_at < %(before)s
  ORDER BY received_at, id LIMIT %(limit)s
), unused AS (
  SELECT e.id FROM events e
  WHERE e.id IN (SELECT id FROM walked)
    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
  FOR UPDATE OF e SKIP LOCKED
), gone AS (
  DELETE FROM events e USING unused u WHERE e.id = u.id RETURNING e.id
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM walked), received_at, id
FROM walked ORDER BY received_at DESC, id DESC LIMIT 1
"""


class PostgresOutbox(PostgresPool):
    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        # In transactions of at most PRUNE_BATCH rows a table, as SQLite's: in one transaction,
        # 300,000 old callbacks (after downtime, or a shorter retention) took 4 to 5 s, with
        # their row locks and a snapshot that held back vacuum of every table meanwhile, and a
        # prune cut off (a stop, a lost connection) deleted nothing. A connection per batch:
        # callbacks get theirs in between, even with a pool of one. Each table until a batch
        # finds nothing: another replica's batch under way is that replica's to finish.
        left = list(zip(PRUNE_SQL, (delivered_before, dedup_before, threads_before), strict=True))
        total = 0
        while left:
            async with self._connection() as conn, conn.transaction():
                deleted = [(await conn.execute(sql, (before, PRUNE_BATCH))).rowcount
                           for sql, before in left]  # fmt: skip
            total += sum(deleted)
            left = [statement for statement, n in zip(left, deleted, strict=True) if n]
        at, event_id = -math.inf, 0  # before any event
        while True:
            params = {"at": at, "id": event_id, "before": delivered_before, "limit": PRUNE_BATCH}
            rows = await self._fetch(OLD_EVENTS_SQL, params)
            if not rows:
                break
            ((gone, walked, at, event_id),) = rows
            total += gone
            if walked < PRUNE_BATCH:
                break
        async with self._connection() as conn, conn.transaction():
            await conn.execute(ROOMS_OF_APPS_SQL)
        return total

    async def stats(self) -> list[ChannelStats]:
        return [ChannelStats(*row) for row in await self._fetch(STATS_SQL)]

    async def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]:
        rows = await self._fetch(LIST_SQL, {"dead": dead_only, "channel": channel, "limit": limit})
        return [DeliveryRow.of(r) for r in rows]

    async def recent_events(self, limit: int) -> list[RecentEvent]:
        async with self._connection() as conn, conn.transaction():
            events = await (
                await conn.execute(
                    "SELECT id, received_at, command, room_id, sdk_app_id FROM events"
                    " ORDER BY id DESC LIMIT %s",
                    (limit,),
                )
            ).fetchall()
            ids = [e[0] for e in events]
            rows = await (await conn.execute(EVENT_ROWS_SQL, (ids,))).fetchall() if ids else []
        by_event: dict[int, list[DeliveryRow]] = {}
        for r in rows:
            by_event.setdefault(r[1], []).append(DeliveryRow.of(r))
        return [
            RecentEvent(e[0], e[1], e[2], e[3], tuple(by_event.get(e[0], ())), e[4]) for e in events
        ]

    async def channels_of(self, ids: Sequence[int]) -> dict[int, str]:
        rows = await self._fetch(
            "SELECT id, channel FROM deliveries WHERE id = ANY(%s::bigint[])", (list(ids),)
        )
        return {r[0]: r[1] for r in rows}

    async def retry(self, ids: Sequence[int], now: float) -> list[int]:
        rows = await self._fetch(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " lease_until = NULL, updated_at = %s, owner = NULL, payload = NULL"
            " WHERE id = ANY(%s::bigint[])"
            " AND state IN ('dead', 'pending') AND (lease_until IS NULL OR lease_until <= %s)"
            " RETURNING id",
            (now, now, list(ids), now),
        )
        return [r[0] for r in rows]

    async def retry_dead(self, channel: str | None, now: float) -> int:
        return await self._execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " lease_until = NULL, updated_at = %s, owner = NULL, payload = NULL"
            " WHERE state = 'dead' AND (%s::text IS NULL OR channel = %s)"
            " AND updated_at <= %s AND (lease_until IS NULL OR lease_until <= %s)",
            (now, now, channel, channel, now, now),
        )

    async def resume(self, channel: str, now: float) -> int:
        return await self._execute(
            "UPDATE deliveries SET next_attempt_at = %s WHERE channel = %s AND state = 'pending'"
            " AND attempts > 0 AND next_attempt_at > %s",
            (now, channel, now),
        )

    async def drop(self, ids: Sequence[int], now: float) -> list[int]:
        # As retry: a dead letter buried while it was sent waits for its lease.
        rows = await self._fetch(
            "DELETE FROM deliveries WHERE id = ANY(%s::bigint[]) AND state IN ('dead', 'pending')"
            " AND (lease_until IS NULL OR lease_until <= %s) RETURNING id",
            (list(ids), now),
        )
        return [r[0] for r in rows]

    async def forget_payloads(self, channels: Sequence[str]) -> int:
        # In flight too: its lane holds the message already; a retry is rendered again.
        return await self._execute(
            "UPDATE deliveries SET payload = NULL WHERE state <> 'delivered'"
            " AND payload IS NOT NULL AND channel = ANY(%s::text[])",
            (list(channels),),
        )
