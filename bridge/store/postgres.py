"""The PostgreSQL store: any number of `live-bridge serve` processes on one database.

Every method is one transaction on a pooled connection, and processes coordinate through rows
alone. A claim locks the deliveries it takes (FOR UPDATE SKIP LOCKED) and writes this instance's
owner id and a lease on them; a process that dies leaves leases that run out, and another claims
those deliveries again: sent at least once. Dedup holds through the unique key of `dedup`.

Any psycopg error becomes StoreUnavailable, whose message never holds the URL or its password.
The pool checks a connection before handing it out, so a server that comes back is used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

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
from bridge.store.pg_schema import (
    CLAIM_LOCK,
    CLAIM_SQL,
    DUE_SQL,
    EVENT_ROWS_SQL,
    LIST_SQL,
    NEXT_DUE_SQL,
    RECORD_SQL,
    SCHEMA_VERSION,
    STATS_SQL,
    TAKE_CHANNEL_SQL,
    migrate,
)

log = logging.getLogger(__name__)
# The pool logs every failed reconnect, several lines each, several times a second during an
# outage; the worker and the receiver already say, throttled, that the store is unavailable.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

CONNECT_TIMEOUT_S = 3  # libpq's connect_timeout: whole seconds
# A server gone without a word (its host powered off, the network cut) leaves every connection
# waiting for TCP to give up: about 15 minutes of retransmissions, during which the worker's
# lanes and the pool's checks wait with it. With these, libpq's connections notice within about
# 30 s and the pool connects afresh (to a failed-over server, say). A URL's own values win.
TCP_DEFAULTS = {
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: data sent and not acknowledged for this long ends it
}  # fmt: skip
# The pool retries a lost connection with a doubling delay for this long, then gives up until the
# next request tries afresh: a server back after a long outage is used within seconds.
RECONNECT_TIMEOUT_S = 10.0
# A callback's write answers within this, under Tencent's 2 s: a lock held elsewhere or a server
# that stops answering would otherwise keep the callback waiting with its query.
RECORD_DEADLINE_S = 1.8

Params = Sequence[Any] | Mapping[str, Any]


class PostgresStore:
    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = 1.5,
        create: bool = True,
    ) -> None:  # fmt: skip
        """`timeout_s`: the longest an operation waits for a connection before it fails; under
        Tencent's 2 s, so a callback meets a 503 FAIL packet, not a timeout, while the database
        is away. `create`: a database without live-bridge's tables gets them; without it, such
        a database is unavailable (for the outbox commands: a wrong URL must not look all clear
        and leave tables in someone else's database)."""
        self.owner = uuid.uuid4().hex  # written on what this instance claims and takes
        self.identity = ""  # the database's, once open (Store.identity)
        self._url = url
        self._create = create
        self._min_size = min_size
        self._max_size = max_size
        self._timeout_s = timeout_s
        self._late: set[asyncio.Future[Recorded]] = set()  # writes that outlived their callback
        self._pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]] | None = None
        self.commits = 0  # transactions committed

    async def open(self) -> None:
        pool = None
        try:
            # One connection of its own first: a refused connection or a wrong password fails at
            # once with the server's reason, where the pool would retry until its timeout.
            tcp = {k: v for k, v in TCP_DEFAULTS.items() if k not in self._url_options()}
            options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, **tcp}
            async with await AsyncConnection.connect(self._url, autocommit=True, **options) as conn:
                self.identity = await migrate(conn, self._create)
            pool = AsyncConnectionPool(
                self._url, min_size=self._min_size, max_size=self._max_size, open=False,
                kwargs={"autocommit": True, **options},
                configure=_read_committed, check=AsyncConnectionPool.check_connection,
                timeout=self._timeout_s,
                reconnect_timeout=RECONNECT_TIMEOUT_S, name="live-bridge",
            )  # fmt: skip
            await pool.open(wait=True, timeout=self._timeout_s)
        except psycopg.Error as exc:
            if pool is not None:
                await pool.close()
            raise StoreUnavailable(f"cannot open store {self.where}: {self._say(exc)}") from None
        except StoreUnavailable as exc:  # migrate's: what it found there, not where
            raise StoreUnavailable(f"cannot open store {self.where}: {exc}") from None
        self._pool = pool
        log.info("store open: %s (schema %d)", self.where, SCHEMA_VERSION)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _url_options(self) -> set[str]:
        """The libpq options the URL sets itself."""
        try:
            return set(conninfo_to_dict(self._url))
        except psycopg.Error:
            return set()  # the connection says what is wrong with it

    @property
    def where(self) -> str:
        """The server and database, for messages: never the password."""
        try:
            info = conninfo_to_dict(self._url)
        except psycopg.Error:
            return "PostgreSQL (unreadable URL)"
        return f"PostgreSQL {info.get('host', 'localhost')}:{info.get('port', 5432)}" + (
            f"/{info['dbname']}" if info.get("dbname") else ""
        )

    def _say(self, exc: BaseException) -> str:
        """`exc` on one line, with the URL and the password blotted out wherever they appear."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        secrets = {self._url}
        with contextlib.suppress(ValueError):
            if (raw := urlsplit(self._url).password) is not None:
                secrets |= {raw, unquote(raw)}
        with contextlib.suppress(psycopg.Error):
            secrets.add(str(conninfo_to_dict(self._url).get("password") or ""))
        for secret in sorted(secrets - {""}, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[tuple[Any, ...]]]:
        """A pooled connection in autocommit: one statement is one transaction, several take
        `conn.transaction()`."""
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreUnavailable(f"store unavailable: {self._say(exc)}") from None
        self.commits += 1

    async def _execute(self, sql: str, params: Params | None = None) -> int:
        async with self._connection() as conn:
            return (await conn.execute(sql, params)).rowcount

    async def _fetch(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()

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
        write = asyncio.ensure_future(self._record(event, deliveries, now, dedup_window_s))
        try:
            return await asyncio.wait_for(asyncio.shield(write), RECORD_DEADLINE_S)
        except TimeoutError:
            self._late.add(write)  # the loop keeps only a weak reference to a task
            write.add_done_callback(self._late.discard)
            write.add_done_callback(_late_record)
            raise StoreUnavailable(
                f"store unavailable: the database did not answer within {RECORD_DEADLINE_S} s"
            ) from None

    async def _record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded:
        params = {
            "key": event.dedup_key, "now": now, "expired": now - dedup_window_s,
            "dedup": dedup_window_s > 0, "sdk_app_id": event.sdk_app_id,
            "command": event.command, "room_id": event.room_id, "event_time": event.event_time,
            "body": event.body, "query": event.query,
            "order_ts": event.event_time if event.event_time is not None else int(now * 1000),
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

    async def due_channels(self, now: float, exclude: Sequence[str]) -> list[str]:
        rows = await self._fetch(DUE_SQL, {"now": now, "owner": self.owner})
        skip = set(exclude)
        return [r[0] for r in rows if r[0] not in skip]

    async def take_channel(self, channel: str, now: float, lease_s: float) -> Pace | None:
        params = {"channel": channel, "owner": self.owner, "lease_until": now + lease_s, "now": now}
        rows = await self._fetch(TAKE_CHANNEL_SQL, params)
        return Pace(tat=rows[0][0], blocked_until=rows[0][1]) if rows else None

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        await self._execute(
            "UPDATE channels SET lease_until = 0, tat = %s, blocked_until = %s"
            " WHERE channel = %s AND owner = %s",
            (pace.tat, pace.blocked_until, channel, self.owner),
        )

    async def claim(self, channel: str, now: float, limit: int, lease_s: float) -> list[Claimed]:
        params = {"channel": channel, "now": now, "limit": limit, "lease_until": now + lease_s,
                  "owner": self.owner}  # fmt: skip
        async with self._connection() as conn, conn.transaction():
            # Claims of one channel take turns: SKIP LOCKED alone would let a second claim pass
            # over a room's head another is taking and hand out the delivery after it.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (CLAIM_LOCK, channel)
            )
            rows = await (await conn.execute(CLAIM_SQL, params)).fetchall()
        rows.sort(key=lambda r: (r[11], r[0]))  # RETURNING keeps no order
        return [
            Claimed(id=r[0], event_id=r[1], channel=r[2], payload=r[3], attempts=r[4],
                    room_id=r[5], command=r[6], body=r[7], query=r[8], received_at=r[9],
                    sdk_app_id=r[10])
            for r in rows
        ]  # fmt: skip

    # Outcomes apply to a delivery this instance claimed and still holds, as in SQLiteStore.
    async def mark_delivered(self, delivery_id: int, now: float) -> None:
        await self._execute(
            "UPDATE deliveries SET state = 'delivered', delivered_at = %s, updated_at = %s,"
            " lease_until = NULL, owner = NULL"
            " WHERE id = %s AND owner = %s AND state IN ('in_flight', 'dead')",
            (now, now, delivery_id, self.owner),
        )

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> None:
        await self._execute(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = %s, last_error = %s,"
            " attempts = attempts - %s, lease_until = NULL, updated_at = %s, owner = NULL"
            " WHERE id = %s AND owner = %s AND state = 'in_flight'",
            (next_attempt_at, error, 0 if count else 1, now, delivery_id, self.owner),
        )

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> None:
        await self._execute(
            "UPDATE deliveries SET state = 'dead', last_error = %s, lease_until = NULL,"
            " updated_at = %s, owner = NULL WHERE id = %s AND owner = %s AND state = 'in_flight'",
            (error, now, delivery_id, self.owner),
        )

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        if ids:
            await self._execute(
                "UPDATE deliveries SET state = 'pending', attempts = attempts - 1,"
                " next_attempt_at = %s, lease_until = NULL, updated_at = %s, owner = NULL"
                " WHERE id = ANY(%s::bigint[]) AND owner = %s AND state = 'in_flight'",
                (next_attempt_at, now, list(ids), self.owner),
            )

    async def next_due(self, now: float) -> float | None:
        rows = await self._fetch(NEXT_DUE_SQL, {"now": now})
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def get_thread(self, channel: str, room_id: str, not_before: float) -> str | None:
        rows = await self._fetch(
            "SELECT ts FROM threads WHERE channel = %s AND room_id = %s AND started_at >= %s",
            (channel, room_id, not_before),
        )
        return str(rows[0][0]) if rows else None

    async def set_thread(self, channel: str, room_id: str, ts: str, now: float) -> None:
        await self._execute(
            "INSERT INTO threads (channel, room_id, ts, started_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (channel, room_id)"
            " DO UPDATE SET ts = EXCLUDED.ts, started_at = EXCLUDED.started_at",
            (channel, room_id, ts, now),
        )

    async def forget_thread(self, channel: str, room_id: str) -> None:
        await self._execute(
            "DELETE FROM threads WHERE channel = %s AND room_id = %s", (channel, room_id)
        )

    async def ping(self) -> None:
        # A real write: a server that answers reads but cannot commit is not ready.
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ('ping', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(time.time()),),
        )

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

    async def bury_unknown_channels(self, known: Sequence[str], now: float, error: str) -> int:
        # The owner and the lease stay: a send under way that gets through is still recorded as
        # delivered, and until the lease runs out a retry would send it again (see retry).
        return await self._execute(
            "UPDATE deliveries SET state = 'dead', last_error = %s,"
            " updated_at = %s WHERE state IN ('pending', 'in_flight')"
            " AND channel <> ALL(%s::text[])",
            (error, now, list(known)),
        )

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


async def _read_committed(conn: AsyncConnection[Any]) -> None:
    """Each statement sees what other replicas committed before it, whatever the server's,
    database's or role's default: under repeatable read or serializable, a replica that met a row
    another had just written or locked (the same callback at both, claims side by side) failed
    with "could not serialize access"."""
    await conn.execute("SET default_transaction_isolation = 'read committed'")


def _late_record(write: asyncio.Future[Recorded]) -> None:
    """A callback's write that finished after its 503: said once, its outcome taken."""
    if write.cancelled():
        return
    if (exc := write.exception()) is not None:
        log.debug("a write answered with 503 failed afterwards: %s", exc)
    elif not write.result().duplicate:
        log.info("event=%d was stored after its callback was answered 503", write.result().event_id)
