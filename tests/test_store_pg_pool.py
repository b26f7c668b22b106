"""The PostgreSQL store's pool (pg_pool.py): a server that cannot be reached, is lost or goes away
for a while, errors that never show the URL or its password, connections at read committed and
with TCP keepalives. Each test has a database of its own (`postgres_url`); the tests that need no
server run without LIVE_BRIDGE_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql

from bridge.store import NewDelivery, StoreUnavailable
from bridge.store.postgres import PostgresStore
from tests.pg_proxy import PgProxy
from tests.store_rows import new_event, postgres_opener
from tests.test_store_postgres import OpenStore

pytestmark = pytest.mark.anyio

PASSWORD = "S3cretPw-xyz"


open_store = pytest.fixture(postgres_opener)


def with_password(url: str) -> str:
    """`url` with a password the server (trust authentication) ignores and no message may show."""
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl()


def assert_tells_no_secret(exc: BaseException, url: str) -> None:
    for text in (str(exc), repr(exc)):
        assert PASSWORD not in text and url not in text
    assert exc.__cause__ is None and exc.__suppress_context__  # no chained psycopg error


def admin(statement: sql.Composed | sql.SQL, *params: object) -> None:
    """Runs `statement` on the server's own database, not the test's."""
    with psycopg.connect(os.environ["LIVE_BRIDGE_TEST_POSTGRES_URL"], autocommit=True) as conn:
        conn.execute(statement, params or None)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db", "Connection refused"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db", "port"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db?sslmode=bogus", "sslmode"),
        (f"postgres:{PASSWORD}@nowhere", "connection"),
    ],
)
async def test_unreachable_server_is_unavailable_at_once(url: str, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=reason) as caught:
        await PostgresStore(url).open()
    assert time.monotonic() - started < 5
    assert_tells_no_secret(caught.value, url)


async def test_a_store_not_open_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="not open"):
        await PostgresStore("postgresql://127.0.0.1:1/db").ping()


async def test_missing_database_is_unavailable(postgres_url: str) -> None:
    url = with_password(urlsplit(postgres_url)._replace(path="/no_such_db").geturl())
    with pytest.raises(StoreUnavailable, match="does not exist") as caught:
        await PostgresStore(url).open()
    assert_tells_no_secret(caught.value, url)


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_replicas_work_together_whatever_the_default_isolation(
    open_store: OpenStore, postgres_url: str, isolation: str
) -> None:
    # Under a stricter default, statements that meet a row another replica has just written or
    # locked fail to serialize: the same callback at two replicas, claims side by side.
    value = isolation.replace(" ", "\\ ")
    url = f"{postgres_url}?options={quote(f'-c default_transaction_isolation={value}')}"
    a, b = await open_store(url), await open_store(url)
    now = time.time()
    for round_ in range(20):
        key = f"k{round_}"
        both = await asyncio.gather(
            *(s.record(new_event(key, f"r{round_}"), [NewDelivery("a", key)], now, 600)
              for s in (a, b, a, b))
        )  # fmt: skip
        assert sorted(r.duplicate for r in both) == [False, True, True, True]
    seen: list[str] = []
    for _ in range(20):
        batches = await asyncio.gather(*(s.claim("a", now, 3, 30) for s in (a, b, a, b)))
        seen += [str(c.payload) for batch in batches for c in batch]
    assert sorted(seen) == sorted(f"k{n}" for n in range(20))  # each once, none refused


@pytest.mark.parametrize(("query", "idle"), [("", "30"), ("?keepalives_idle=5", "5")])
async def test_connections_notice_a_server_gone_silent_unless_the_url_says_otherwise(
    open_store: OpenStore, postgres_url: str, query: str, idle: str
) -> None:
    # Without TCP keepalives and a user timeout, a server whose host vanished (no reset) keeps
    # every connection waiting about 15 minutes for TCP to give up, the worker's lanes with it.
    store = await open_store(postgres_url + query)
    async with store._connection() as conn:
        options = dict(item.split("=", 1) for item in conn.info.dsn.split())
    assert options["keepalives"] == "1" and options["keepalives_idle"] == idle
    assert options["tcp_user_timeout"] == "30000"


async def test_lost_connections_are_replaced(open_store: OpenStore, postgres_url: str) -> None:
    store = await open_store(max_size=2)
    now = time.time()
    await store.record(new_event("before"), [NewDelivery("a", "p-before")], now, 0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    try:
        await store.record(new_event("after"), [NewDelivery("a", "p-after")], now, 0)
    except StoreUnavailable:  # allowed once: the next try must work
        await store.record(new_event("after"), [NewDelivery("a", "p-after")], now, 0)
    payloads = [c.payload for c in await store.claim("a", now, 10, 30)]
    assert payloads == ["p-before", "p-after"]


async def test_outage_is_unavailable_then_recovers_losing_nothing(
    open_store: OpenStore, postgres_url: str
) -> None:
    url = with_password(postgres_url)
    store = await open_store(url, timeout_s=1.0)
    now = time.time()
    await store.record(new_event("before"), [NewDelivery("a", "p-before")], now, 0)
    # The database refuses connections and loses those it had: an outage of this database alone.
    name = urlsplit(postgres_url).path.lstrip("/")
    admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
    admin(sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"),
          name)  # fmt: skip
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.record(new_event("during"), [NewDelivery("a", "p-during")], now, 0),
        lambda: store.claim("a", now, 10, 30),
        store.ping,
    ]
    try:
        for operation in operations:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await operation()
            assert time.monotonic() - started < 3
            assert_tells_no_secret(caught.value, url)
    finally:
        admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
    deadline = time.monotonic() + 15
    while True:  # as the receiver's sender and the worker do: try again until it commits
        try:
            await store.record(new_event("during"), [NewDelivery("a", "p-during")], now, 0)
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not come back"
            await asyncio.sleep(0.2)
    payloads = [c.payload for c in await store.claim("a", now, 10, 30)]
    assert payloads == ["p-before", "p-during"]


async def test_a_connection_that_hangs_is_given_up_and_replaced(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server (or a proxy before it) that hangs while TCP still acknowledges: no keepalive
    # notices, and the worker and /readyz's ping waited on it for good, deliveries acknowledged
    # and never sent.
    monkeypatch.setattr("bridge.store.pg_pool.OPERATION_S", 1.0)
    server = urlsplit(postgres_url)
    with PgProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        proxied = urlsplit(postgres_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}")
        store = PostgresStore(proxied.geturl(), max_size=1)
        await store.open()
        try:
            await store.ping()  # the pool's one connection, through the proxy
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer in 1 s"):
                await store.ping()
            assert time.monotonic() - started < 1.0 + 5.0 + 1.0  # psycopg's cancel: 5 s at most
            await store.ping()  # on a new connection: the hung one is gone
        finally:
            await store.close()
