"""The PostgreSQL store's side for the worker (pg_queue.py), where several processes claim from one
database: each delivery handed out once, each room in order, rows other transactions hold passed
over. The Store contract itself is tested in test_store.py."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from bridge.store import Claimed, NewDelivery
from bridge.store.pg_schema import CLAIM_LOCK
from bridge.store.postgres import PostgresStore
from tests.store_rows import new_event, postgres_opener
from tests.test_store_postgres import OpenStore

pytestmark = pytest.mark.anyio


open_store = pytest.fixture(postgres_opener)


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
                assert row.room_key is not None
                # A room's deliveries in one round come from one claim: never two at once.
                assert sources.setdefault(row.room_key, number) == number
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


async def test_outcomes_waiting_on_locked_rows_leave_connections_for_callbacks(
    open_store: OpenStore, postgres_url: str
) -> None:
    # Each outcome write waited on its row, and on its connection, for as long as another
    # session held the rows: the pool full of them, every callback waited its 1.5 s for a
    # connection and was answered 503.
    store = await open_store()  # 8 connections, as configured by default
    now = time.time()
    for n in range(8):
        await store.record(new_event(f"k{n}", f"r{n}"), [NewDelivery("a", f"p{n}")], now, 0)
    claimed = await store.claim("a", now, 10, 30)
    assert len(claimed) == 8
    with psycopg.connect(postgres_url) as conn:  # an operator's transaction, left open
        conn.execute("SELECT id FROM deliveries WHERE state = 'in_flight' FOR UPDATE")
        marks = [asyncio.create_task(store.mark_delivered(c.id, now)) for c in claimed]
        await asyncio.sleep(0.5)  # each waiting on its row
        callback = store.record(new_event("late", "r9"), [NewDelivery("a", "p9")], now, 0)
        assert not (await asyncio.wait_for(callback, 1.5)).duplicate
        await store.ping()  # /readyz
        assert not any(m.done() for m in marks)
        conn.rollback()
    assert await asyncio.gather(*marks) == [True] * 8


async def test_a_claim_another_session_is_making_is_not_waited_for(
    open_store: OpenStore, postgres_url: str
) -> None:
    # A replica frozen mid-claim (a paused VM) held the channel's claim lock, and every other
    # replica's claim of it waited on the lock for good.
    store = await open_store()
    now = time.time()
    await store.record(new_event("k"), [NewDelivery("a", "p")], now, 0)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext('a'))", (CLAIM_LOCK,))
        assert await asyncio.wait_for(store.claim("a", now, 10, 30), 5) == []
        conn.rollback()
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == ["p"]


async def test_a_transaction_left_idle_is_ended_by_the_server(open_store: OpenStore) -> None:
    store = await open_store()
    async with store._connection() as conn:
        cursor = await conn.execute("SHOW idle_in_transaction_session_timeout")
        assert await cursor.fetchone() == ("15s",)


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
