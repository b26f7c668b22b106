from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.store import NewDelivery, NewEvent, State, StoreUnavailable
from bridge.store.schema import MIGRATIONS, SCHEMA_VERSION, migrate
from bridge.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio


def new_event(key: str = "k1", room: str | None = "r1", event_time: int | None = 1000) -> NewEvent:
    return NewEvent(
        sdk_app_id=1400000000, command="Live.CallbackAfterChangeOwner", room_id=room,
        event_time=event_time, body='{"CallbackCommand":"x"}', query="{}", dedup_key=key,
    )  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "bridge.db")
    await s.open()
    yield s
    await s.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def add(store: SQLiteStore, key: str, channel: str = "a", room: str | None = "r1",
              event_time: int | None = 1000, now: float | None = None) -> int:  # fmt: skip
    recorded = await store.record(
        new_event(key, room, event_time), [NewDelivery(channel, f"p-{key}")],
        now if now is not None else time.time(), 0,
    )  # fmt: skip
    return recorded.event_id


async def test_record_writes_event_and_deliveries_together(store: SQLiteStore) -> None:
    recorded = await store.record(
        new_event(), [NewDelivery("a", "p1"), NewDelivery("b", None, error="render failed: x")],
        time.time(), 600,
    )  # fmt: skip
    assert not recorded.duplicate
    got = rows(store.path, "SELECT channel, state, payload, last_error, room_id, order_ts"
                           " FROM deliveries ORDER BY id")  # fmt: skip
    assert got == [
        ("a", "pending", "p1", None, "r1", 1000),
        ("b", "dead", None, "render failed: x", "r1", 1000),
    ]


async def test_duplicate_within_window_is_stored_once(store: SQLiteStore) -> None:
    now = time.time()
    first = await store.record(new_event(), [NewDelivery("a", "p")], now, 600)
    again = await store.record(new_event(), [NewDelivery("a", "p")], now + 599, 600)
    assert again.duplicate and again.event_id == first.event_id
    later = await store.record(new_event(), [NewDelivery("a", "p")], now + 1300, 600)
    assert not later.duplicate
    assert rows(store.path, "SELECT COUNT(*) FROM deliveries") == [(2,)]


async def test_dedup_window_zero_disables(store: SQLiteStore) -> None:
    now = time.time()
    await store.record(new_event(), [], now, 0)
    assert not (await store.record(new_event(), [], now, 0)).duplicate


async def test_concurrent_records_share_commits(store: SQLiteStore) -> None:
    before = store.commits
    now = time.time()
    results = await asyncio.gather(
        *(store.record(new_event(f"k{i}"), [NewDelivery("a", "p")], now, 600) for i in range(200))
    )
    assert len({r.event_id for r in results}) == 200
    assert store.commits - before < 100  # one fsync per batch, not per callback
    assert rows(store.path, "SELECT COUNT(*) FROM deliveries") == [(200,)]


async def test_claim_is_per_channel_in_event_time_order(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "late", room="r1", event_time=3000, now=now)
    await add(store, "early", room="r2", event_time=1000, now=now)
    await add(store, "no-time", room="r3", event_time=None, now=now - 10)
    await add(store, "other", channel="b", now=now)
    claimed = await store.claim("a", now, 10, 30)
    assert [c.payload for c in claimed] == ["p-early", "p-late", "p-no-time"]
    assert all(c.attempts == 1 and c.channel == "a" for c in claimed)
    assert claimed[0].body == '{"CallbackCommand":"x"}' and claimed[0].sdk_app_id == 1400000000
    assert await store.claim("a", now, 10, 30) == []  # leased
    assert [c.payload for c in await store.claim("b", now, 10, 30)] == ["p-other"]


async def test_a_room_waits_for_its_earlier_delivery(store: SQLiteStore) -> None:
    now = time.time()
    for n in range(3):
        await add(store, f"r1-{n}", room="r1", event_time=1000 + n, now=now)
    await add(store, "r2-0", room="r2", event_time=1500, now=now)
    await add(store, "roomless", room=None, event_time=500, now=now)
    first, *_ = await store.claim("a", now, limit=1, lease_s=30)
    assert first.payload == "p-roomless"
    head = await store.claim("a", now, limit=1, lease_s=30)
    assert [c.payload for c in head] == ["p-r1-0"]
    # r1-0 is in flight: r1's later events wait, r2 does not.
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == ["p-r2-0"]
    assert await store.due_channels(now, []) == []
    # r1-0 fails and is due again later: still nothing for r1 until then.
    await store.mark_retry(head[0].id, now, now + 60, "HTTP 500", count=True)
    assert await store.claim("a", now, 10, 30) == []
    assert await store.next_due(now) == pytest.approx(now + 30)  # leases of r2-0, roomless
    # Once it is due, it comes first and the rest follow in the same claim, in order.
    later = await store.claim("a", now + 61, 10, 30)  # the other leases have expired too
    r1 = [c for c in later if c.room_id == "r1"]
    assert [c.payload for c in r1] == ["p-r1-0", "p-r1-1", "p-r1-2"]
    assert r1[0].attempts == 2


async def test_dead_letter_releases_its_room(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "first", event_time=1, now=now)
    await add(store, "second", event_time=2, now=now)
    (head,) = await store.claim("a", now, 1, 30)
    await store.mark_retry(head.id, now, now + 60, "HTTP 500", count=True)
    assert await store.claim("a", now, 10, 30) == []
    (again,) = await store.claim("a", now + 61, 1, 30)
    await store.mark_dead(again.id, now, "gave up")
    assert [c.payload for c in await store.claim("a", now + 61, 10, 30)] == ["p-second"]


async def test_outcomes_apply_only_to_what_is_in_flight(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "1", room="x", now=now)
    await add(store, "2", room="y", now=now)
    one, two = await store.claim("a", now, 10, 30)
    assert await store.bury_unknown_channels([], now, "channel removed") == 2
    await store.mark_retry(one.id, now, now, "HTTP 503", count=True)  # too late: stays dead
    await store.mark_delivered(two.id, now)  # it did get through: recorded as delivered
    assert rows(store.path, "SELECT state, last_error FROM deliveries ORDER BY id") == [
        ("dead", "channel removed"), ("delivered", "channel removed"),
    ]  # fmt: skip


async def test_due_channels_and_exclusions(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "1", channel="a", now=now)
    await add(store, "2", channel="b", now=now)
    await add(store, "3", channel="c", now=now + 100)
    assert sorted(await store.due_channels(now, [])) == ["a", "b"]
    assert await store.due_channels(now, ["a"]) == ["b"]


async def test_lease_expiry_reclaims(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "k", now=now)
    assert len(await store.claim("a", now, 10, lease_s=30)) == 1
    assert await store.claim("a", now + 29, 10, 30) == []
    assert [c.attempts for c in await store.claim("a", now + 31, 10, 30)] == [2]


async def test_outcomes_and_release(store: SQLiteStore) -> None:
    now = time.time()
    for key in ("1", "2", "3", "4"):
        await add(store, key, room=key, now=now)
    c1, c2, c3, c4 = await store.claim("a", now, 10, 30)
    await store.mark_delivered(c1.id, now)
    await store.mark_retry(c2.id, now, now + 5, "HTTP 500", count=True)
    await store.mark_retry(c3.id, now, now + 1, "HTTP 429", count=False)
    await store.mark_retry(c4.id, now, now + 5, "HTTP 500", count=True)
    (again,) = await store.claim("a", now + 6, 1, 30)
    await store.release([again.id], now, now + 2)
    got = rows(store.path, "SELECT state, attempts, last_error FROM deliveries ORDER BY id")
    assert got == [
        ("delivered", 1, None),
        ("pending", 1, "HTTP 500"),  # released: attempt given back, error kept
        ("pending", 0, "HTTP 429"),
        ("pending", 1, "HTTP 500"),
    ]


async def test_recover_releases_what_a_dead_process_had_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    now = time.time()
    await add(s, "k", now=now)
    assert len(await s.claim("a", now, 10, 3600)) == 1
    await s.close()  # as if killed: the row stays in flight with a long lease
    s = SQLiteStore(path)
    await s.open()
    try:
        assert await s.claim("a", time.time(), 10, 30) == []  # opening alone changes nothing
        assert await s.recover() == 1
        assert [c.payload for c in await s.claim("a", time.time(), 10, 30)] == ["p-k"]
    finally:
        await s.close()


async def test_one_serving_process_per_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    server = SQLiteStore(path, exclusive=True)
    await server.open()
    try:
        with pytest.raises(StoreUnavailable, match="another live-bridge is serving"):
            await SQLiteStore(path, exclusive=True).open()
        reader = SQLiteStore(path)  # the outbox commands may still open it
        await reader.open()
        await reader.close()
    finally:
        await server.close()
    again = SQLiteStore(path, exclusive=True)
    await again.open()
    await again.close()


async def test_threads_expire_and_are_forgotten(store: SQLiteStore) -> None:
    now = time.time()
    assert await store.get_thread("bot", "r1", now - 3600) is None
    await store.set_thread("bot", "r1", "1700000000.000100", now)
    assert await store.get_thread("bot", "r1", now - 3600) == "1700000000.000100"
    assert await store.get_thread("bot", "r1", now + 1) is None  # older than the TTL allows
    assert await store.get_thread("other", "r1", now - 3600) is None
    await store.forget_thread("bot", "r1")
    assert await store.get_thread("bot", "r1", now - 3600) is None


async def test_prune_keeps_dead_letters_and_recent_rows(store: SQLiteStore) -> None:
    now = time.time()
    old = now - 100 * 3600
    await store.record(new_event("old-done", "r1"), [NewDelivery("a", "p")], old, 600)
    await store.record(new_event("old-dead", "r2"), [NewDelivery("a", None, "x")], old, 600)
    await store.record(new_event("new-done", "r3"), [NewDelivery("a", "p")], now, 600)
    await store.record(new_event("unrouted", "r4"), [], old, 600)
    for c in await store.claim("a", now, 10, 30):
        await store.mark_delivered(c.id, old if c.room_id == "r1" else now)
    await store.set_thread("bot", "r1", "1.2", old)
    pruned = await store.prune(now - 72 * 3600, now - 72 * 3600)
    assert pruned == 1 + 2 + 3 + 1  # a delivery, two events, three dedup keys, a thread
    assert rows(store.path, "SELECT room_id, state FROM deliveries ORDER BY id") == [
        ("r2", "dead"), ("r3", "delivered"),
    ]  # fmt: skip
    assert rows(store.path, "SELECT room_id FROM events ORDER BY id") == [("r2",), ("r3",)]


async def test_stats_list_retry_drop(store: SQLiteStore) -> None:
    now = time.time()
    for n in range(3):
        await add(store, f"a{n}", channel="a", room=f"r{n}", now=now - n)
    await store.record(new_event("b0", "rb"), [NewDelivery("b", None, "render failed")], now, 0)
    c0, c1, c2 = await store.claim("a", now, 10, 30)
    await store.mark_delivered(c0.id, now)
    await store.mark_dead(c1.id, now, "HTTP 404")
    stats = {s.channel: s for s in await store.stats()}
    assert (stats["a"].pending, stats["a"].in_flight, stats["a"].dead, stats["a"].delivered) == (
        0, 1, 1, 1,
    )  # fmt: skip
    assert stats["b"].dead == 1 and stats["b"].oldest_pending_at is None
    dead = await store.list_deliveries(True, None, 10)
    assert [(d.channel, d.state, d.last_error) for d in dead] == [
        ("b", State.DEAD, "render failed"), ("a", State.DEAD, "HTTP 404"),
    ]  # fmt: skip
    assert [d.id for d in await store.list_deliveries(False, "a", 10)] == [c2.id, c1.id]
    assert await store.retry([c1.id, c2.id], now) == 1  # the in-flight one is not touched
    assert await store.retry_dead("b", now) == 1
    assert {s.channel: s.pending for s in await store.stats()} == {"a": 1, "b": 1}
    assert await store.drop([c1.id, c2.id, 999]) == 1
    assert [d.attempts for d in await store.list_deliveries(False, None, 10)] == [0, 1]


async def test_bury_unknown_channels(store: SQLiteStore) -> None:
    now = time.time()
    await add(store, "1", channel="kept", now=now)
    await add(store, "2", channel="gone", now=now)
    assert await store.bury_unknown_channels(["kept"], now, "channel removed") == 1
    assert rows(store.path, "SELECT channel, state, last_error FROM deliveries ORDER BY id") == [
        ("kept", "pending", None), ("gone", "dead", "channel removed"),
    ]  # fmt: skip


async def test_full_database_is_unavailable_then_recovers(store: SQLiteStore) -> None:
    now = time.time()
    big = [NewDelivery("a", "x" * 20000)]

    def full(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    await store._submit(full)
    with pytest.raises(StoreUnavailable, match="full"):
        for i in range(10):
            await store.record(new_event(f"k{i}"), big, now, 600)
    await store._submit(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    assert not (await store.record(new_event("after"), big, now, 600)).duplicate


async def test_unwritable_location_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await SQLiteStore(blocker / "sub" / "bridge.db").open()


async def test_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    await s.ping()
    await s.close()
    assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '999'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        await SQLiteStore(path).open()


async def test_version_1_database_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO events VALUES (1, 1700000000.5, 1, 'Live.CallbackAfterChangeOwner', 'r9',"
        " NULL, '{}', '{}')"
    )
    conn.execute(
        "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at, created_at,"
        " updated_at) VALUES (1, 'a', 'pending', 'p', 0, 0, 0)"
    )
    migrate(conn)
    conn.close()
    assert rows(path, "SELECT room_id, order_ts FROM deliveries") == [("r9", 1700000000500)]
    s = SQLiteStore(path)
    await s.open()
    try:
        assert [c.payload for c in await s.claim("a", time.time(), 10, 30)] == ["p"]
    finally:
        await s.close()
