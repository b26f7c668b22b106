"""How the PostgreSQL store reaches its database: a pool of connections, and errors told
without the URL or its password.

The first connection is made alone, so a refused connection or a wrong password fails at once with
the server's reason; then the pool. Every connection commits each statement (autocommit) at read
committed, keeps TCP alive, and is checked before it is handed out, so a server that comes back
is used again. Any psycopg error becomes StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from bridge.store import Recorded, StoreUnavailable
from bridge.store.pg_schema import SCHEMA_VERSION, migrate

log = logging.getLogger("bridge.store.postgres")  # the store's log lines, under its name
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
# The longest any operation may take, its wait for a connection included. A connection whose
# server (or a proxy before it) hangs while TCP still acknowledges is noticed by no keepalive:
# the worker waited on it for good, its deliveries acknowledged and never sent, and /readyz's
# ping too. Past it the operation fails (psycopg then asks the server to cancel, for up to 5 s
# more) and the pool drops the connection.
OPERATION_S = 20.0

Params = Sequence[Any] | Mapping[str, Any]


class PostgresPool:
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
        # Outcome writes waiting on a delivery's row another session holds locked take at most
        # half the pool (_execute_held); the rest stays for callbacks.
        self._held_writes = asyncio.Semaphore(max(1, max_size // 2))
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
        `conn.transaction()`. All of it, the wait for the connection included, over in
        OPERATION_S."""
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        try:
            async with asyncio.timeout(OPERATION_S), self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreUnavailable(f"store unavailable: {self._say(exc)}") from None
        except TimeoutError:
            raise StoreUnavailable(f"store unavailable: no answer in {OPERATION_S:g} s") from None
        self.commits += 1

    async def _execute(self, sql: str, params: Params | None = None) -> int:
        async with self._connection() as conn:
            return (await conn.execute(sql, params)).rowcount

    async def _execute_held(self, sql: str, params: Params) -> int:
        """An outcome's write to a row this instance holds. Another session may hold the row
        locked (an operator's `SELECT … FOR UPDATE`, a long transaction): the write waits for
        it, and so does its connection. With the worker's writes in every connection, each
        callback waited its 1.5 s for one and was answered 503, as was /readyz."""
        async with self._held_writes:
            return await self._execute(sql, params)

    async def _fetch(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()


IDLE_IN_TRANSACTION_S = 15


async def _read_committed(conn: AsyncConnection[Any]) -> None:
    """Each statement sees what other replicas committed before it, whatever the server's,
    database's or role's default: under repeatable read or serializable, a replica that met a row
    another had just written or locked (the same callback at both, claims side by side) failed
    with "could not serialize access"."""
    await conn.execute("SET default_transaction_isolation = 'read committed'")
    # A transaction left open by a replica that stopped mid-way (a paused VM, a host gone: the
    # server learns of it only when TCP gives up, hours later) holds its locks that long. Ours
    # send their statements back to back; one idle this long is ended by the server.
    await conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'")
