"""The PostgreSQL store's side for the worker: channels taken in turns, claims, outcomes, threads.

A claim locks the deliveries it takes (FOR UPDATE SKIP LOCKED), claims of one channel taking
turns, and writes this instance's owner id and a lease on them; a process that dies leaves leases
that run out, and another claims those deliveries again: sent at least once. Outcomes apply only
to what this instance claimed and still holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.store import Claimed, Pace
from bridge.store.pg_pool import PostgresPool
from bridge.store.pg_schema import CLAIM_LOCK, CLAIM_SQL, DUE_SQL, NEXT_DUE_SQL, TAKE_CHANNEL_SQL


class PostgresQueue(PostgresPool):
    async def due_channels(
        self, now: float, exclude: Sequence[str], leases_at: float | None = None
    ) -> list[str]:
        leases = now if leases_at is None else leases_at
        rows = await self._fetch(DUE_SQL, {"now": now, "owner": self.owner, "leases": leases})
        skip = set(exclude)
        return [r[0] for r in rows if r[0] not in skip]

    async def take_channel(
        self, channel: str, now: float, lease_s: float, leases_at: float | None = None
    ) -> Pace | None:
        params = {"channel": channel, "owner": self.owner, "lease_until": now + lease_s,
                  "leases": now if leases_at is None else leases_at}  # fmt: skip
        rows = await self._fetch(TAKE_CHANNEL_SQL, params)
        return Pace(tat=rows[0][0], blocked_until=rows[0][1]) if rows else None

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        await self._execute(
            "UPDATE channels SET lease_until = 0, tat = %s, blocked_until = %s"
            " WHERE channel = %s AND owner = %s",
            (pace.tat, pace.blocked_until, channel, self.owner),
        )

    async def block_channel(self, channel: str, blocked_until: float) -> None:
        await self._execute(
            "UPDATE channels SET blocked_until = GREATEST(blocked_until, %s) WHERE channel = %s",
            (blocked_until, channel),
        )

    async def claim(
        self, channel: str, now: float, limit: int, lease_s: float, leases_at: float | None = None
    ) -> list[Claimed]:
        leases = now if leases_at is None else leases_at
        params = {"channel": channel, "now": now, "limit": limit, "lease_until": now + lease_s,
                  "owner": self.owner, "leases": leases}  # fmt: skip
        async with self._connection() as conn, conn.transaction():
            # Claims of one channel take turns: SKIP LOCKED alone would let a second claim pass
            # over a room's head another is taking and hand out the delivery after it. Taken
            # if free, else nothing is claimed now: a replica frozen mid-claim (a paused VM)
            # held the lock, and every other replica's claim waited on it for good.
            cursor = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (CLAIM_LOCK, channel)
            )
            locked = await cursor.fetchone()
            if not locked or not locked[0]:
                return []
            rows = await (await conn.execute(CLAIM_SQL, params)).fetchall()
        rows.sort(key=lambda r: (r[11], r[0]))  # RETURNING keeps no order
        return [
            Claimed(id=r[0], event_id=r[1], channel=r[2], payload=r[3], attempts=r[4],
                    room_key=r[5], command=r[6], body=r[7], query=r[8], received_at=r[9],
                    sdk_app_id=r[10])
            for r in rows
        ]  # fmt: skip

    # Outcomes apply to a delivery this instance claimed and still holds, as in SQLiteStore.
    async def mark_delivered(self, delivery_id: int, now: float) -> bool:
        return bool(
            await self._execute_held(
                "UPDATE deliveries SET state = 'delivered', delivered_at = %s, updated_at = %s,"
                " lease_until = NULL, owner = NULL"
                " WHERE id = %s AND owner = %s AND state IN ('in_flight', 'dead')",
                (now, now, delivery_id, self.owner),
            )
        )

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> bool:
        return bool(
            await self._execute_held(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = %s, last_error = %s,"
                " attempts = attempts - %s, lease_until = NULL, updated_at = %s, owner = NULL"
                " WHERE id = %s AND owner = %s AND state = 'in_flight'",
                (next_attempt_at, error, 0 if count else 1, now, delivery_id, self.owner),
            )
        )

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> bool:
        return bool(
            await self._execute_held(
                "UPDATE deliveries SET state = 'dead', last_error = %s, lease_until = NULL,"
                " updated_at = %s, owner = NULL"
                " WHERE id = %s AND owner = %s AND state = 'in_flight'",
                (error, now, delivery_id, self.owner),
            )
        )

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        if ids:
            await self._execute_held(
                "UPDATE deliveries SET state = 'pending', attempts = attempts - 1,"
                " next_attempt_at = %s, lease_until = NULL, updated_at = %s, owner = NULL"
                " WHERE id = ANY(%s::bigint[]) AND owner = %s AND state = 'in_flight'",
                (next_attempt_at, now, list(ids), self.owner),
            )

    async def next_due(self, now: float) -> float | None:
        rows = await self._fetch(NEXT_DUE_SQL, {"now": now})
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def get_thread(self, channel: str, room: str, not_before: float) -> str | None:
        rows = await self._fetch(
            "SELECT ts FROM threads WHERE channel = %s AND room_id = %s AND started_at >= %s",
            (channel, room, not_before),
        )
        return str(rows[0][0]) if rows else None

    async def set_thread(self, channel: str, room: str, ts: str, now: float) -> None:
        await self._execute(
            "INSERT INTO threads (channel, room_id, ts, started_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (channel, room_id)"
            " DO UPDATE SET ts = EXCLUDED.ts, started_at = EXCLUDED.started_at",
            (channel, room, ts, now),
        )

    async def forget_thread(self, channel: str, room: str) -> None:
        await self._execute(
            "DELETE FROM threads WHERE channel = %s AND room_id = %s", (channel, room)
        )
