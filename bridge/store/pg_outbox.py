"""The PostgreSQL store's side for operators and upkeep: counts and lists for the status page,
/metrics and the outbox commands; retry and drop; a reload's changes; retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.store import ChannelStats, DeliveryRow, RecentEvent, State
from bridge.store.pg_pool import PostgresPool
from bridge.store.pg_schema import EVENT_ROWS_SQL, LIST_SQL, STATS_SQL


class PostgresOutbox(PostgresPool):
    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        statements: list[tuple[str, float]] = [
            ("DELETE FROM deliveries WHERE state = 'delivered' AND delivered_at < %s",
             delivered_before),
            ("DELETE FROM events WHERE received_at < %s AND NOT EXISTS"
             " (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)", delivered_before),
            ("DELETE FROM dedup WHERE seen_at < %s", dedup_before),
            ("DELETE FROM threads WHERE started_at < %s", threads_before),
        ]  # fmt: skip
        n = 0
        async with self._connection() as conn, conn.transaction():
            for sql, before in statements:
                n += (await conn.execute(sql, (before,))).rowcount
        return n

    async def stats(self) -> list[ChannelStats]:
        return [ChannelStats(*row) for row in await self._fetch(STATS_SQL)]

    async def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]:
        rows = await self._fetch(LIST_SQL, {"dead": dead_only, "channel": channel, "limit": limit})
        return [_delivery_row(r) for r in rows]

    async def recent_events(self, limit: int) -> list[RecentEvent]:
        async with self._connection() as conn, conn.transaction():
            events = await (
                await conn.execute(
                    "SELECT id, received_at, command, room_id FROM events"
                    " ORDER BY id DESC LIMIT %s",
                    (limit,),
                )
            ).fetchall()
            ids = [e[0] for e in events]
            rows = await (await conn.execute(EVENT_ROWS_SQL, (ids,))).fetchall() if ids else []
        by_event: dict[int, list[DeliveryRow]] = {}
        for r in rows:
            by_event.setdefault(r[1], []).append(_delivery_row(r))
        return [RecentEvent(e[0], e[1], e[2], e[3], tuple(by_event.get(e[0], ()))) for e in events]

    async def retry(self, ids: Sequence[int], now: float) -> list[int]:
        rows = await self._fetch(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " lease_until = NULL, updated_at = %s, owner = NULL WHERE id = ANY(%s::bigint[])"
            " AND state IN ('dead', 'pending') AND (lease_until IS NULL OR lease_until <= %s)"
            " RETURNING id",
            (now, now, list(ids), now),
        )
        return [r[0] for r in rows]

    async def retry_dead(self, channel: str | None, now: float) -> int:
        return await self._execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " lease_until = NULL, updated_at = %s, owner = NULL"
            " WHERE state = 'dead' AND (%s::text IS NULL OR channel = %s)"
            " AND (lease_until IS NULL OR lease_until <= %s)",
            (now, now, channel, channel, now),
        )

    async def drop(self, ids: Sequence[int]) -> list[int]:
        rows = await self._fetch(
            "DELETE FROM deliveries WHERE id = ANY(%s::bigint[]) AND state IN ('dead', 'pending')"
            " RETURNING id",
            (list(ids),),
        )
        return [r[0] for r in rows]

    async def forget_payloads(self, channels: Sequence[str]) -> int:
        # In flight too: its lane holds the message already; a retry is rendered again.
        return await self._execute(
            "UPDATE deliveries SET payload = NULL WHERE state <> 'delivered'"
            " AND payload IS NOT NULL AND channel = ANY(%s::text[])",
            (list(channels),),
        )


def _delivery_row(r: Sequence[Any]) -> DeliveryRow:
    return DeliveryRow(
        id=r[0], event_id=r[1], channel=r[2], room_id=r[3], command=r[4], state=State(r[5]),
        attempts=r[6], last_error=r[7], created_at=r[8], updated_at=r[9], next_attempt_at=r[10],
    )  # fmt: skip
