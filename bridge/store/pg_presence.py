"""The PostgreSQL store's side for replicas that run different configs for a while (a rolling
deploy, a staggered reload): which channels each serves, and burying only what none of them would
send. bridge/presence.py decides when to announce and how old an announcement may be.

Each store instance (each serving process) keeps one row of `replicas`: its owner id, the names
of the channels it serves and when it last said so.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.store.pg_pool import PostgresPool
from bridge.store.pg_schema import CHANNEL_NAMES

# Undelivered deliveries to channels that neither this instance knows nor another has announced
# recently enough. The channel names come from a skip scan (one index search each, as DUE_SQL's):
# the burial then reads only the unknown channels' rows, however long the backlog of others.
BURY_SQL = f"""{CHANNEL_NAMES}, unknown AS (
  SELECT n.channel FROM names n
  WHERE n.channel IS NOT NULL AND n.channel <> ALL(%(known)s::text[])
    AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.owner <> %(owner)s
                    AND r.seen_at >= %(since)s AND n.channel = ANY(r.channels))
)
UPDATE deliveries d SET state = 'dead', last_error = %(error)s, updated_at = %(now)s
FROM unknown u
WHERE d.channel = u.channel AND d.state IN ('pending', 'in_flight')
"""  # noqa: S608


class PostgresPresence(PostgresPool):
    async def announce(self, channels: Sequence[str], now: float) -> None:
        await self._execute(
            "INSERT INTO replicas (owner, channels, seen_at) VALUES (%s, %s::text[], %s)"
            " ON CONFLICT (owner)"
            " DO UPDATE SET channels = EXCLUDED.channels, seen_at = EXCLUDED.seen_at",
            (self.owner, list(channels), now),
        )

    async def withdraw(self) -> None:
        await self._execute("DELETE FROM replicas WHERE owner = %s", (self.owner,))

    async def bury_unknown_channels(
        self, known: Sequence[str], now: float, error: str, announced_since: float | None = None
    ) -> int:
        since = float("-inf") if announced_since is None else announced_since
        params = {"known": list(known), "owner": self.owner, "since": since, "error": error,
                  "now": now}  # fmt: skip
        async with self._connection() as conn, conn.transaction():
            # A replica that died without withdrawing leaves its row: forgotten once too old.
            await conn.execute(
                "DELETE FROM replicas WHERE owner <> %s AND seen_at < %s", (self.owner, since)
            )
            # The owner and the lease stay: a send under way that gets through is still recorded
            # as delivered, and until the lease runs out a retry would send it again (see retry).
            return (await conn.execute(BURY_SQL, params)).rowcount
