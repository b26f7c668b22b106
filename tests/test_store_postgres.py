"""What only the PostgreSQL engine does: several processes claiming from one database, its schema
and migrations, a server that cannot be reached, is lost or goes away for a while. The Store
contract itself is tested in test_store.py. Each test has a database of its own (`postgres_url`);
the tests that need no server run without LIVE_BRIDGE_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql

from bridge.store import Claimed, NewDelivery, StoreUnavailable
from bridge.store.pg_schema import CLAIM_SQL, MIGRATIONS, SCHEMA_VERSION
from bridge.store.postgres import PostgresStore
from tests.bridge_server import OWNER
from tests.store_rows import (
    KEYED_BEFORE,
    OLD_KEYS,
    assert_retries_are_duplicates,
    new_event,
    opener,
)

pytestmark = pytest.mark.anyio

PASSWORD = "S3cretPw-xyz"

OpenStore = Callable[..., Awaitable[PostgresStore]]
PostgresSQL = Callable[..., list[tuple[Any, ...]]]  # the `postgres_sql` fixture


@pytest.fixture
async def open_store(postgres_url: str) -> AsyncIterator[OpenStore]:
    """Opens a store on the test's database, as another process would; closes them all."""

    def make(url: str = postgres_url, **options: Any) -> PostgresStore:
        return PostgresStore(url, **options)

    async with opener(make) as open_:
        yield open_


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


async def test_schema_created_on_open_and_newer_refused(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    store = await open_store()
    await store.ping()
    await store.close()
    assert postgres_sql("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    again = await open_store()  # already migrated: nothing to do
    await again.close()
    postgres_sql("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(StoreUnavailable, match="newer"):
        await PostgresStore(postgres_url).open()


async def test_processes_starting_at_once_all_migrate(
    postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await asyncio.gather(*(s.ping() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert postgres_sql("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    # Replicas share the database's identity, so a repeat has the same webhook-id whoever sends.
    assert postgres_sql("SELECT value FROM meta WHERE key = 'store_id'") == [(stores[0].identity,)]
    assert {s.identity for s in stores} == {stores[0].identity}


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
async def test_processes_starting_at_once_migrate_whatever_the_default_isolation(
    postgres_url: str, postgres_sql: PostgresSQL, isolation: str
) -> None:
    # A server, database or role may default to a stricter isolation: the migration's snapshot
    # taken before the lock was granted missed the tables the first process had just created.
    value = isolation.replace(" ", "\\ ")  # libpq's options: a space is escaped
    option = quote(f"-c default_transaction_isolation={value}")
    url = f"{postgres_url}?options={option}"
    stores = [PostgresStore(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert postgres_sql("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


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


async def test_recover_leaves_other_processes_claims_alone(open_store: OpenStore) -> None:
    a = await open_store()
    now = time.time()
    await a.record(new_event("k"), [NewDelivery("a", "p")], now, 0)
    (claimed,) = await a.claim("a", now, 10, 3600)
    b = await open_store()  # another process starting while `a` sends
    assert await b.recover() == 0
    assert await b.claim("a", now, 10, 30) == []
    await a.mark_delivered(claimed.id, now)
    assert [s.delivered for s in await b.stats()] == [1]


async def test_concurrent_claims_hand_out_each_delivery_once_in_room_order(
    open_store: OpenStore,
) -> None:
    a, b = await open_store(max_size=4), await open_store(max_size=4)
    now = time.time()
    rooms, per_room = 50, 4
    await asyncio.gather(
        *(a.record(new_event(f"{r}-{n}", f"r{r}", r * 10 + n), [NewDelivery("a", f"{r}-{n}")],
                   now, 0)
          for r in range(rooms) for n in range(per_room))
    )  # fmt: skip
    seen: list[int] = []
    claimers = (a, b) * 5
    for _ in range(2 * per_room):  # each round delivers at least every room's head
        claims = await asyncio.gather(*(s.claim("a", now, 25, 60) for s in claimers))
        sources: dict[str, int] = {}
        for number, claimed in enumerate(claims):
            for row in claimed:
                assert row.room_id is not None
                # A room's deliveries in one round come from one claim: never two at once.
                assert sources.setdefault(row.room_id, number) == number
        rows: list[tuple[PostgresStore, Claimed]] = [
            (store, row) for store, claimed in zip(claimers, claims, strict=True) for row in claimed
        ]
        if not rows:
            break
        seen.extend(row.id for _, row in rows)
        await asyncio.gather(*(store.mark_delivered(row.id, now) for store, row in rows))
    assert len(seen) == len(set(seen)) == rooms * per_room
    (stats,) = await a.stats()
    assert (stats.delivered, stats.pending, stats.in_flight) == (rooms * per_room, 0, 0)


async def test_claim_passes_over_a_locked_delivery(
    open_store: OpenStore, postgres_url: str
) -> None:
    store = await open_store()
    now = time.time()
    for n in range(3):
        await store.record(new_event(f"k{n}", f"r{n}"), [NewDelivery("a", f"p{n}")], now, 0)
    with psycopg.connect(postgres_url) as conn:  # a transaction left open, holding a row lock
        conn.execute("SELECT id FROM deliveries WHERE payload = 'p1' FOR UPDATE")
        claimed = await asyncio.wait_for(store.claim("a", now, 10, 30), 5)
        assert [c.payload for c in claimed] == ["p0", "p2"]
        conn.rollback()
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == ["p1"]


async def test_a_record_the_database_does_not_answer_is_unavailable_in_time_then_kept(
    open_store: OpenStore, postgres_url: str
) -> None:
    # A lock held elsewhere (a DBA's ALTER TABLE, a stuck transaction) or a server that stops
    # answering: the callback must get its 503 before Tencent's 2 s, not wait with the query.
    store = await open_store()
    now = time.time()
    with psycopg.connect(postgres_url) as conn:  # a transaction left open, holding the table
        conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await asyncio.wait_for(store.record(new_event("late"), [], now, 600), 10)
        conn.commit()
        # The write goes on after the answer: once the lock is gone, it is in the store (its
        # deliveries go out), and a retry of the callback is a duplicate.
        for _ in range(200):
            if conn.execute("SELECT 1 FROM dedup WHERE key = 'late'").fetchall():
                break
            conn.rollback()
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the write answered with 503 was dropped")
    assert (await store.record(new_event("late"), [], now, 600)).duplicate


@pytest.mark.parametrize("head", ["pending", "lease over"])
async def test_a_room_waits_while_its_earlier_delivery_is_locked(
    open_store: OpenStore, postgres_url: str, head: str
) -> None:
    # A claim passes over a row another transaction holds (an outbox command, an outcome being
    # written): the row's room waits for it, other rooms do not.
    store = await open_store()
    now = time.time()
    for key, room, at in [("k1", "r1", 1000), ("k2", "r1", 2000), ("k3", "r2", 1500)]:
        await store.record(new_event(key, room, at), [NewDelivery("a", f"p-{key}")], now, 0)
    if head == "lease over":
        assert [c.payload for c in await store.claim("a", now, 1, 1)] == ["p-k1"]
    later = now + 2
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SELECT id FROM deliveries WHERE payload = 'p-k1' FOR UPDATE")
        claimed = await asyncio.wait_for(store.claim("a", later, 10, 30), 5)
        conn.rollback()
    assert [c.payload for c in claimed] == ["p-k3"]
    assert [c.payload for c in await store.claim("a", later, 10, 30)] == ["p-k1", "p-k2"]


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """`node` of an EXPLAIN (FORMAT JSON) plan and every node under it."""
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


async def test_a_claim_reads_the_rows_it_passed_over_from_one_index_range(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # What keeps the room check's cost near the claim's own: the rows the claim did not take are
    # read once, from the range of deliveries_claim its parts walked, not from each room's
    # history (deliveries_room) once for every row taken.
    await open_store()
    postgres_sql(
        "INSERT INTO events (id, received_at, sdk_app_id, command, room_id, event_time, body,"
        " query) SELECT g, 0, 1, 'x', 'r' || g % 500, g, '{}', '{}'"
        " FROM generate_series(1, 40000) g"
    )
    postgres_sql(
        "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
        " updated_at, room_id, order_ts) SELECT g, 'a',"
        " CASE WHEN g <= 20000 THEN 'delivered' ELSE 'pending' END, 0, 0, 0, 'r' || g % 500, g"
        " FROM generate_series(1, 40000) g"
    )
    postgres_sql("ANALYZE")
    params = {"channel": "a", "now": 1.0, "limit": 64, "lease_until": 2.0, "owner": "x"}
    with psycopg.connect(postgres_url) as conn:
        ((plan,),) = conn.execute(f"EXPLAIN (FORMAT JSON) {CLAIM_SQL}", params).fetchall()
    nodes = plan_nodes(plan[0]["Plan"])
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], plan
    (passed,) = [n for n in nodes if n.get("Subplan Name") == "CTE passed"]
    assert {n.get("Index Name") for n in plan_nodes(passed)} - {None} == {"deliveries_claim"}


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


async def test_dedup_keys_written_before_version_3_still_find_retries(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for migration in MIGRATIONS[:2]:
            conn.execute(migration)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    now = time.time()
    for (event_id, at, body), key in zip(KEYED_BEFORE, OLD_KEYS, strict=True):
        postgres_sql(
            "INSERT INTO events VALUES (%s, %s, 1400000000, %s, %s, %s, %s, '{}')",
            event_id, now, OWNER, f"r{event_id}", at, body,
        )  # fmt: skip
        postgres_sql("INSERT INTO dedup VALUES (%s, %s, %s)", key, now, event_id)
    postgres_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), %s)", len(KEYED_BEFORE))
    store = await open_store()
    await assert_retries_are_duplicates(store, now + 1)
    assert postgres_sql("SELECT count(*) FROM events") == [(len(KEYED_BEFORE),)]
