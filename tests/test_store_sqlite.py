from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.store import NewDelivery, NewEvent, State, StoreUnavailable
from bridge.store.schema import SCHEMA_VERSION
from bridge.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio


def new_event(key: str = "k1", room: str = "r1") -> NewEvent:
    return NewEvent(
        sdk_app_id=1400000000, command="Live.CallbackAfterChangeOwner", room_id=room,
        event_time=1703589922780, body='{"CallbackCommand":"x"}', query="{}", dedup_key=key,
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


async def test_record_writes_event_and_deliveries_together(store: SQLiteStore) -> None:
    now = time.time()
    recorded = await store.record(
        new_event(), [NewDelivery("a", "p1"), NewDelivery("b", None, error="render failed: x")],
        now, 600,
    )  # fmt: skip
    assert not recorded.duplicate
    got = rows(store.path, "SELECT channel, state, payload, last_error FROM deliveries ORDER BY id")
    assert got == [("a", "pending", "p1", None), ("b", "dead", None, "render failed: x")]
    assert rows(store.path, "SELECT room_id, command FROM events") == [
        ("r1", "Live.CallbackAfterChangeOwner")
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


async def test_claim_leases_counts_and_respects_exclusions(store: SQLiteStore) -> None:
    now = time.time()
    for i in range(3):
        await store.record(new_event(f"a{i}"), [NewDelivery("a", f"pa{i}")], now, 600)
        await store.record(new_event(f"b{i}"), [NewDelivery("b", f"pb{i}")], now, 600)
    claimed = await store.claim(now, limit=10, per_channel=2, lease_s=30, exclude_channels=["b"])
    assert [c.payload for c in claimed] == ["pa0", "pa1"]
    assert all(c.attempts == 1 for c in claimed)
    # Leased rows are not claimed again: the next claim takes what is left.
    assert [c.payload for c in await store.claim(now, 10, 10, 30, ["b"])] == ["pa2"]
    assert await store.claim(now, 10, 10, 30, ["b"]) == []
    everything = await store.claim(now, 10, 10, 30, [])
    assert [c.payload for c in everything] == ["pb0", "pb1", "pb2"]


async def test_lease_expiry_reclaims(store: SQLiteStore) -> None:
    now = time.time()
    await store.record(new_event(), [NewDelivery("a", "p")], now, 600)
    first = await store.claim(now, 10, 10, lease_s=30, exclude_channels=[])
    assert len(first) == 1
    assert await store.claim(now + 29, 10, 10, 30, []) == []
    second = await store.claim(now + 31, 10, 10, 30, [])
    assert [c.attempts for c in second] == [2]


async def test_outcomes(store: SQLiteStore) -> None:
    now = time.time()
    await store.record(new_event("1"), [NewDelivery("a", "p1")], now, 600)
    await store.record(new_event("2"), [NewDelivery("a", "p2")], now, 600)
    await store.record(new_event("3"), [NewDelivery("a", "p3")], now, 600)
    c1, c2, c3 = await store.claim(now, 10, 10, 30, [])
    await store.mark_delivered(c1.id, now)
    await store.mark_retry(c2.id, now, now + 5, "HTTP 500", count=True)
    await store.mark_retry(c3.id, now, now + 1, "HTTP 429", count=False)
    assert await store.next_due() == pytest.approx(now + 1)
    got = rows(store.path, "SELECT state, attempts, last_error FROM deliveries ORDER BY id")
    assert got == [("delivered", 1, None), ("pending", 1, "HTTP 500"), ("pending", 0, "HTTP 429")]
    await store.mark_dead(c2.id, now, "gave up")
    assert rows(store.path, "SELECT state FROM deliveries WHERE id = 2") == [(State.DEAD.value,)]


async def test_in_flight_rows_are_released_on_open(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    now = time.time()
    await s.record(new_event(), [NewDelivery("a", "p")], now, 600)
    assert len(await s.claim(now, 10, 10, 3600, [])) == 1
    await s.close()  # as if killed: the row stays in flight with a long lease
    s = SQLiteStore(path)
    await s.open()
    try:
        assert [c.payload for c in await s.claim(time.time(), 10, 10, 30, [])] == ["p"]
    finally:
        await s.close()


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
    assert rows(path, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '999'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        await SQLiteStore(path).open()


async def test_prune_dedup(store: SQLiteStore) -> None:
    now = time.time()
    await store.record(new_event("old"), [], now - 1000, 600)
    await store.record(new_event("new"), [], now, 600)
    assert await store.prune_dedup(now - 600) == 1
