"""What only the PostgreSQL engine does: its schema and migrations, recording within Tencent's
deadline, recovery at start-up. The Store contract itself is tested in test_store.py; the pool in
test_store_pg_pool.py, claims by several processes in test_store_pg_queue.py. Each test has a
database of its own (`postgres_url`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from bridge.receive import dedup_key
from bridge.store import NewDelivery, NewEvent, StoreUnavailable, dedup_digest, room_key
from bridge.store.pg_schema import CLAIM_SQL, SCHEMA_VERSION
from bridge.store.postgres import PostgresStore
from tests.bridge_server import OWNER
from tests.store_rows import (
    DELIVERIES_OF_TWO_APPS,
    KEYED_BEFORE,
    OLD_KEYS,
    ROOM_KEYS,
    ROOMS_OF_TWO_APPS,
    THREADS_OF_TWO_APPS,
    assert_retries_are_duplicates,
    new_event,
    old_postgres,
    postgres_opener,
)

pytestmark = pytest.mark.anyio


OpenStore = Callable[..., Awaitable[PostgresStore]]
PostgresSQL = Callable[..., list[tuple[Any, ...]]]  # the `postgres_sql` fixture


open_store = pytest.fixture(postgres_opener)


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
    for version, refusal in [("999", "newer"), ("seven", "'seven' is not a number")]:
        postgres_sql("UPDATE meta SET value = %s WHERE key = 'schema_version'", version)
        with pytest.raises(StoreUnavailable, match=refusal):
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


async def test_a_record_the_database_does_not_answer_is_unavailable_in_time_then_kept(
    open_store: OpenStore, postgres_url: str
) -> None:
    # A lock held elsewhere (a DBA's ALTER TABLE, a stuck transaction) or a server that stops
    # answering: the callback must get its 503 before Tencent's 2 s, not wait with the query.
    store = await open_store()
    now = time.time()
    with psycopg.connect(postgres_url) as conn:  # a transaction left open, holding the table
        conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable, match="did not commit within"):
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


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """`node` of an EXPLAIN (FORMAT JSON) plan and every node under it."""
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


def add_backlog(postgres_sql: PostgresSQL, rooms: int, pending: int) -> None:
    """20,000 deliveries to channel `a` delivered, then `pending` waiting, over `rooms` rooms;
    an event each."""
    total = 20000 + pending
    postgres_sql(
        "INSERT INTO events (id, received_at, sdk_app_id, command, room_id, event_time, body,"
        " query) SELECT g, 0, 1, 'x', 'r' || g %% %s, g, '{}', '{}'"
        " FROM generate_series(1, %s) g", rooms, total,
    )  # fmt: skip
    postgres_sql(
        "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
        " updated_at, room_id, order_ts) SELECT g, 'a',"
        " CASE WHEN g <= 20000 THEN 'delivered' ELSE 'pending' END, 0, 0, 0, 'r' || g %% %s, g"
        " FROM generate_series(1, %s) g", rooms, total,
    )  # fmt: skip
    postgres_sql("ANALYZE")


def claim_plan(postgres_url: str) -> list[dict[str, Any]]:
    """Every node of the plan of a claim of 64 from channel `a`."""
    params = {"channel": "a", "now": 1.0, "limit": 64, "lease_until": 2.0, "owner": "x",
              "leases": 1.0}  # fmt: skip
    with psycopg.connect(postgres_url) as conn:
        ((plan,),) = conn.execute(f"EXPLAIN (FORMAT JSON) {CLAIM_SQL}", params).fetchall()
    return plan_nodes(plan[0]["Plan"])


async def test_a_claim_reads_the_rows_it_passed_over_from_one_index_range(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # What keeps the room check's cost near the claim's own: the rows the claim did not take are
    # read once, from the range of deliveries_claim its parts walked, not from each room's
    # history (deliveries_room) once for every row taken.
    await open_store()
    add_backlog(postgres_sql, rooms=500, pending=20000)
    nodes = claim_plan(postgres_url)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    (passed,) = [n for n in nodes if n.get("Subplan Name") == "CTE passed"]
    assert {n.get("Index Name") for n in plan_nodes(passed)} - {None} == {"deliveries_claim"}


async def test_a_claim_walks_no_rooms_delivered_history(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # As SQLite's (test_store_sqlite): the room check of each row a part takes reads the room's
    # deliveries still to send (deliveries_room_open), not all the retention keeps.
    await open_store()
    add_backlog(postgres_sql, rooms=1, pending=64)
    indexes = {n.get("Index Name") for n in claim_plan(postgres_url)} - {None}
    assert "deliveries_room_open" in indexes and "deliveries_room" not in indexes, indexes


async def test_dedup_keys_written_before_version_3_still_find_retries(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    old_postgres(postgres_url, 2)
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


async def test_what_version_6_stored_is_read_as_today(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # As SQLite's version 8 (test_store_sqlite): keys led by seconds, messages rendered then.
    old_postgres(postgres_url, 6)
    now = time.time()
    body = '{"CallbackCommand":"X","RoomId":"r","EventTime":1703589922}'
    postgres_sql("INSERT INTO events VALUES (1, %s, 1, 'X', 'r', 1703589922, %s, '{}')", now, body)
    for n, key in enumerate([
        f"{1703589922:016x}:" + dedup_digest("X", 1, body.encode()), "0000000000000000:zero",
        ":none", "000000zzzzzzzzzz:odd", dedup_key("X", 1, b"{}", 1703589922780),
    ]):  # fmt: skip
        postgres_sql("INSERT INTO dedup VALUES (%s, %s, %s)", key, now, n + 1)
    for channel, state, payload in (("a", "pending", "old"), ("b", "dead", "old"),
                                    ("c", "delivered", "sent")):  # fmt: skip
        postgres_sql(
            "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at,"
            " created_at, updated_at, room_id, order_ts) VALUES (1, %s, %s, %s, 0, 0, 0, 'r', 0)",
            channel, state, payload,
        )  # fmt: skip
    postgres_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), 1)")
    store = await open_store()
    assert postgres_sql("SELECT key FROM dedup ORDER BY event_id") == [
        (dedup_key("X", 1, body.encode(), 1703589922000),), ("0000000000000000:zero",),
        (":none",), ("000000zzzzzzzzzz:odd",), (dedup_key("X", 1, b"{}", 1703589922780),),
    ]  # fmt: skip
    assert postgres_sql("SELECT event_time FROM events") == [(1703589922000,)]
    assert postgres_sql("SELECT channel, payload FROM deliveries ORDER BY channel") == [
        ("a", None), ("b", None), ("c", "sent")
    ]  # fmt: skip
    key = dedup_key("X", 1, body.encode(), 1703589922000)
    retry = NewEvent(1, "X", "r", 1703589922000, body, "{}", key)
    assert (await store.record(retry, [NewDelivery("a", "p")], now + 1, 600)).duplicate


async def test_rooms_stored_before_version_9_name_their_app(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # As SQLite's version 11 (test_store_sqlite): rooms within their apps.
    old_postgres(postgres_url, 8)
    for event in ROOMS_OF_TWO_APPS:
        postgres_sql("INSERT INTO events VALUES (%s, 0, %s, 'X', %s, NULL, '{}', '{}')", *event)
    for delivery in DELIVERIES_OF_TWO_APPS:
        postgres_sql(
            "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, room_id, delivered_at, order_ts) VALUES (%s, %s, %s, 0, 0, 0, %s, %s, 0)",
            *delivery,
        )
    for thread in THREADS_OF_TWO_APPS:
        postgres_sql("INSERT INTO threads VALUES (%s, %s, %s, %s)", *thread)
    postgres_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), 4)")
    store = await open_store()
    assert postgres_sql("SELECT channel, room_id FROM deliveries ORDER BY id") == ROOM_KEYS
    assert postgres_sql("SELECT channel, room_id, ts FROM threads ORDER BY ts") == [
        ("bot", "7:r", "1.1"), ("hook", "8:r", "1.2")
    ]  # fmt: skip
    listed = await store.list_deliveries(False, None, 10)
    assert [(r.channel, r.sdk_app_id, r.room_id) for r in listed] == [
        ("hook", 8, "r"), ("bot", 8, "r"), ("bot", 7, None)
    ]  # fmt: skip
    assert await store.get_thread("bot", room_key(7, "r"), 0) == "1.1"


async def test_rooms_an_older_replica_stores_during_the_upgrade_are_named_at_the_prune(
    open_store: OpenStore, postgres_sql: PostgresSQL
) -> None:
    # A replica of the version before schema 9, still serving during a rolling upgrade, names a
    # room without its app: its deliveries would never wait for, nor hold, their room's others.
    store = await open_store()
    now = time.time()
    for key, room in (("old", "r"), ("new", "r"), ("done", "r"), ("colon", "a:b")):
        recorded = await store.record(
            NewEvent(7, "X", room, 1000, "{}", "{}", key), [NewDelivery("a", None)], now, 0
        )
        if key != "new":  # as the older replica wrote it
            postgres_sql(
                "UPDATE deliveries SET room_id = %s WHERE event_id = %s", room, recorded.event_id
            )
    claimed = await store.claim("a", now, 10, 30)
    [done] = [c for c in claimed if c.event_id == 3]
    await store.mark_delivered(done.id, now)
    await store.release([c.id for c in claimed if c is not done], now, now)
    await store.prune(0, 0, 0)
    assert postgres_sql("SELECT event_id, room_id FROM deliveries ORDER BY event_id") == [
        (1, "7:r"), (2, "7:r"), (3, "r"), (4, "7:a:b")
    ]  # fmt: skip


async def test_a_database_of_version_4_gets_the_index_the_prune_walks(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # Made by the schema code of before (the migrations are appended to, never edited), with old
    # rows in it: a delivered callback, and a dead letter whose event stays.
    old_postgres(postgres_url, 4)
    old = time.time() - 100 * 3600
    for event_id, state in ((1, "delivered"), (2, "dead")):
        postgres_sql(
            "INSERT INTO events VALUES (%s, %s, 1, 'x', 'r1', 1000, '{}', '{}')", event_id, old
        )
        postgres_sql(
            "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, delivered_at, room_id, order_ts) VALUES (%s, 'a', %s, %s, %s, %s, %s,"
            " 'r1', 1000)",
            event_id, state, old, old, old, old if state == "delivered" else None,
        )  # fmt: skip
    postgres_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), 2)")
    store = await open_store()
    assert postgres_sql("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    assert postgres_sql("SELECT indexdef FROM pg_indexes WHERE indexname = 'events_received'") == [
        ("CREATE INDEX events_received ON public.events USING btree (received_at, id)",)
    ]
    cutoff = time.time() - 72 * 3600
    assert await store.prune(cutoff, cutoff, cutoff) == 2  # the delivery and its event
    assert postgres_sql("SELECT id FROM events") == [(2,)]
    await store.close()
    newer = str(SCHEMA_VERSION + 1)  # a newer live-bridge's
    postgres_sql("UPDATE meta SET value = %s WHERE key = 'schema_version'", newer)
    with pytest.raises(StoreUnavailable, match="newer"):
        await PostgresStore(postgres_url).open()
