"""The SQLite store's side for the worker: channels taken in turns, claims, outcomes, threads.

A lane takes its channel (`take_channel`, with the pacing the last holder left) and claims due
deliveries, each room's in order, under a lease and counting the attempt in the same commit.
Outcomes apply only to what this instance claimed and still holds. Those of most sends, delivered,
are marked a batch at a time by the writer (`_Delivered`).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence

from bridge.store import CLOCK_STEP_S, Claimed, Pace
from bridge.store.sqlite_file import SQLiteFile
from bridge.store.sqlite_params import MAX_PARAMS, sql_in
from bridge.store.sqlite_statements import CLAIM_SQL, DUE_SQL, MARK_DELIVERED_SQL, TAKE_SQL
from bridge.store.writer import Together


class SQLiteQueue(SQLiteFile):
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
        leases = now if leases_at is None else leases_at
        rows = await self._fetch(TAKE_SQL, (channel, self.owner, now + lease_s, leases))
        return Pace(tat=rows[0][0], blocked_until=rows[0][1]) if rows else None

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        await self._execute(
            "UPDATE channels SET lease_until = 0, tat = ?, blocked_until = ?"
            " WHERE channel = ? AND owner = ?",
            (pace.tat, pace.blocked_until, channel, self.owner),
        )

    async def block_channel(self, channel: str, blocked_until: float) -> None:
        await self._execute(
            "UPDATE channels SET blocked_until = MAX(blocked_until, ?) WHERE channel = ?",
            (blocked_until, channel),
        )

    async def claim(
        self, channel: str, now: float, limit: int, lease_s: float, leases_at: float | None = None
    ) -> list[Claimed]:
        leases = now if leases_at is None else leases_at

        def op(conn: sqlite3.Connection) -> list[Claimed]:
            params = {"channel": channel, "now": now, "limit": limit, "leases": leases}
            rows = conn.execute(CLAIM_SQL, params).fetchall()
            ids = [row[0] for row in rows]
            if ids:  # one statement, not one a row: each one stepped is a wait for the GIL
                conn.execute(
                    sql_in("UPDATE deliveries SET state = 'in_flight', attempts = attempts + 1,"
                        " lease_until = ?, updated_at = ?, owner = ? WHERE id IN ({marks})", ids),
                    (now + lease_s, now, self.owner, *ids),
                )  # fmt: skip
            return [
                Claimed(id=r[0], event_id=r[1], channel=r[2], payload=r[3], attempts=r[4] + 1,
                        room_key=r[5], command=r[6], body=r[7], query=r[8], received_at=r[9],
                        sdk_app_id=r[10])
                for r in rows
            ]  # fmt: skip

        return await self._submit(op, urgent=True)  # its sends wait for it

    # Outcomes apply to a delivery this instance claimed and still holds: one buried meanwhile
    # (its channel removed by a reload) stays dead, except that a delivery that did get through
    # is recorded as such; one whose lease ran out and that another claim took is left alone.
    async def mark_delivered(self, delivery_id: int, now: float) -> bool:
        # The outcome of most sends: those of one batch are marked together, in one statement.
        return await self._submit(_Delivered(delivery_id, now, self.owner))

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> bool:
        # count=False gives the attempt back: the far end asked us to wait, nothing failed.
        return bool(
            await self._execute(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, last_error = ?,"
                " attempts = attempts - ?, lease_until = NULL, updated_at = ?, owner = NULL"
                " WHERE id = ? AND owner = ? AND state = 'in_flight'",
                (next_attempt_at, error, 0 if count else 1, now, delivery_id, self.owner),
            )
        )

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> bool:
        return bool(
            await self._execute(
                "UPDATE deliveries SET state = 'dead', last_error = ?, lease_until = NULL,"
                " updated_at = ?, owner = NULL WHERE id = ? AND owner = ? AND state = 'in_flight'",
                (error, now, delivery_id, self.owner),
            )
        )

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        if ids:
            sql = (
                "UPDATE deliveries SET state = 'pending', attempts = attempts - 1,"
                " next_attempt_at = ?, lease_until = NULL, updated_at = ?, owner = NULL"
                " WHERE id IN ({marks}) AND owner = ? AND state = 'in_flight'"
            )
            await self._execute(sql_in(sql, ids), (next_attempt_at, now, *ids, self.owner))

    async def next_due(self, now: float) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM deliveries"
            " WHERE state = 'pending' AND next_attempt_at > :now"
            " AND updated_at <= :now + :step UNION ALL"
            " SELECT MIN(lease_until) FROM deliveries"
            " WHERE state = 'in_flight' AND lease_until > :now)",
            {"now": now, "step": CLOCK_STEP_S},
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def get_thread(self, channel: str, room: str, not_before: float) -> str | None:
        rows = await self._fetch(
            "SELECT ts FROM threads WHERE channel = ? AND room_id = ? AND started_at >= ?",
            (channel, room, not_before),
        )
        return str(rows[0][0]) if rows else None

    async def set_thread(self, channel: str, room: str, ts: str, now: float) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO threads (channel, room_id, ts, started_at) VALUES (?, ?, ?, ?)",
            (channel, room, ts, now),
        )

    async def forget_thread(self, channel: str, room: str) -> None:
        await self._execute(
            "DELETE FROM threads WHERE channel = ? AND room_id = ?", (channel, room)
        )


@dataclasses.dataclass(frozen=True)
class _Delivered(Together):
    """A delivery that got through; those of a batch are marked in one statement."""

    delivery_id: int
    at: float
    owner: str

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[_Delivered]) -> list[bool]:
        owner = ops[0].owner  # a writer serves one store, which has one owner
        per = (MAX_PARAMS - 1) // 2
        marked: set[int] = set()
        for start in range(0, len(ops), per):
            chunk = ops[start : start + per]
            sql = MARK_DELIVERED_SQL.replace("{values}", ",".join(["(?, ?)"] * len(chunk)))
            params = [v for op in chunk for v in (op.delivery_id, op.at)] + [owner]
            marked.update(row[0] for row in conn.execute(sql, params))
        return [op.delivery_id in marked for op in ops]
