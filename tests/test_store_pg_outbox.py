"""The PostgreSQL store's side for operators and upkeep (pg_outbox.py): retention, pruned a batch
at a time on every replica. The Store contract itself (what a prune keeps) is tested in
test_store.py. Each test has a database of its own (`postgres_url`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from bridge.store.pg_outbox import PRUNE_BATCH
from tests.store_rows import add, postgres_opener
from tests.test_store_postgres import OpenStore, PostgresSQL, plan_nodes

pytestmark = pytest.mark.anyio

open_store = pytest.fixture(postgres_opener)

HOUR = 3600.0


def add_backlog(postgres_sql: PostgresSQL, delivered: int, dead: int, threads: int, at: float
                ) -> None:  # fmt: skip
    """Events received at `at`, each with one delivery and a dedup key: the first `dead` are dead
    letters, the `delivered` after them were delivered then; and `threads` room threads started
    then. As a backlog of old rows stands after downtime, or when the retention is shortened."""
    count = dead + delivered
    postgres_sql(
        "INSERT INTO events (id, received_at, sdk_app_id, command, room_id, event_time, body,"
        " query) SELECT g, %s, 1, 'x', 'r' || g, g, '{}', '{}' FROM generate_series(1, %s) g",
        at, count,
    )  # fmt: skip
    postgres_sql(
        "INSERT INTO deliveries (id, event_id, channel, state, next_attempt_at, created_at,"
        " updated_at, delivered_at, room_id, order_ts) SELECT g, g, 'a',"
        " CASE WHEN g <= %s THEN 'dead' ELSE 'delivered' END, %s, %s, %s,"
        " CASE WHEN g <= %s THEN NULL ELSE %s END, 'r' || g, g"
        " FROM generate_series(1, %s) g",
        dead, at, at, at, dead, at, count,
    )  # fmt: skip
    postgres_sql("INSERT INTO dedup SELECT 'k' || id, received_at, id FROM events")
    postgres_sql(
        "INSERT INTO threads SELECT 'a', 'r' || g, '1.' || g, %s FROM generate_series(1, %s) g",
        at, threads,
    )  # fmt: skip
    postgres_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), %s)", count)
    postgres_sql("SELECT setval(pg_get_serial_sequence('deliveries', 'id'), %s)", count)


def counts(postgres_sql: PostgresSQL) -> dict[str, int]:
    tables = ("events", "deliveries", "dedup", "threads")
    return {t: postgres_sql(f"SELECT count(*) FROM {t}")[0][0] for t in tables}  # noqa: S608


async def test_a_large_prune_goes_in_batches_and_keeps_the_events_of_dead_letters(
    open_store: OpenStore, postgres_sql: PostgresSQL
) -> None:
    # More of each table than a batch; more events kept for their dead letters than a batch, all
    # received at one time, before those whose deliveries went: the walk goes on past them.
    store = await open_store()
    now = time.time()
    kept, delivered, threads = 2 * PRUNE_BATCH + 1, 2 * PRUNE_BATCH + 10, PRUNE_BATCH + 5
    add_backlog(postgres_sql, delivered, kept, threads, now - 100 * HOUR)
    recent = await add(store, "recent")
    commits = store.commits
    pruned = await store.prune(now - 72 * HOUR, now - 72 * HOUR, now - 72 * HOUR)
    # A delivery and an event per delivered one, every old dedup key, every thread.
    assert pruned == 2 * delivered + (kept + delivered) + threads
    assert store.commits - commits > 3  # one transaction before, whatever it had to delete
    assert counts(postgres_sql) == {
        "events": kept + 1, "deliveries": kept + 1, "dedup": 0, "threads": 0,
    }  # fmt: skip
    assert postgres_sql("SELECT min(id), max(id) FROM events WHERE id <> %s", recent) == [(1, kept)]
    assert await store.prune(now - 72 * HOUR, now - 72 * HOUR, now - 72 * HOUR) == 0


async def test_a_prune_cut_off_keeps_what_it_deleted(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # A worker stopping cancels its prune, and a connection may be lost midway: in one
    # transaction, every row it had deleted came back, and the next prune did it all again.
    store = await open_store()
    now = time.time()
    add_backlog(postgres_sql, 3 * PRUNE_BATCH, 0, 0, now - 100 * HOUR)
    with psycopg.connect(postgres_url) as holder:
        # Someone else's transaction holding the events: the prune gets that far and waits.
        holder.execute("LOCK TABLE events IN SHARE MODE")
        pruning = asyncio.ensure_future(store.prune(now - 72 * HOUR, now - 72 * HOUR, 0))
        try:
            for _ in range(200):
                if counts(postgres_sql)["deliveries"] == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("nothing the prune deleted was committed before it reached the events")
            assert not pruning.done()
        finally:
            pruning.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pruning
        holder.rollback()
    assert counts(postgres_sql) == {
        "events": 3 * PRUNE_BATCH, "deliveries": 0, "dedup": 0, "threads": 0,
    }  # fmt: skip
    assert await store.prune(now - 72 * HOUR, now - 72 * HOUR, 0) == 3 * PRUNE_BATCH  # events


async def test_replicas_pruning_at_once_share_the_work(
    open_store: OpenStore, postgres_sql: PostgresSQL
) -> None:
    # Retention runs on every replica, and their minutes may coincide: none fails or waits on
    # another's batch, and every row is deleted (and counted) once.
    replicas = [await open_store() for _ in range(3)]
    now = time.time()
    kept, delivered, threads = PRUNE_BATCH + 1, 4 * PRUNE_BATCH, PRUNE_BATCH
    add_backlog(postgres_sql, delivered, kept, threads, now - 100 * HOUR)
    cutoff = now - 72 * HOUR
    pruned = await asyncio.gather(*(r.prune(cutoff, cutoff, cutoff) for r in replicas))
    assert sum(pruned) == 2 * delivered + (kept + delivered) + threads
    assert counts(postgres_sql) == {"events": kept, "deliveries": kept, "dedup": 0, "threads": 0}


async def test_a_prune_walks_the_old_events_not_every_event(
    open_store: OpenStore,
    postgres_url: str,
    postgres_sql: PostgresSQL,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Events within the retention are most of the database (72 h of callbacks by default), and
    # each minute's prune read them all to find the few older ones.
    store = await open_store()
    now = time.time()
    add_backlog(postgres_sql, 20_000, 0, 0, now - HOUR)
    postgres_sql("UPDATE events SET received_at = %s WHERE id <= 10", now - 100 * HOUR)
    postgres_sql("UPDATE deliveries SET delivered_at = %s WHERE id <= 10", now - 100 * HOUR)
    postgres_sql("ANALYZE")
    statements: list[tuple[Any, Any]] = []
    execute = psycopg.AsyncConnection.execute

    async def traced(self: psycopg.AsyncConnection[Any], query: Any, params: Any = None,
                     **options: Any) -> Any:  # fmt: skip
        statements.append((query, params))
        return await execute(self, query, params, **options)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", traced)
    await store.prune(now - 72 * HOUR, now - 72 * HOUR, now - 72 * HOUR)
    monkeypatch.undo()
    with psycopg.connect(postgres_url) as conn:
        plans = [
            conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchall()[0][0][0]["Plan"]
            for query, params in statements
            if "events" in str(query)
        ]
    assert plans
    scans = [n for plan in plans for n in plan_nodes(plan) if n.get("Relation Name") == "events"]
    assert scans and not [n for n in scans if n["Node Type"] == "Seq Scan"], plans
    assert counts(postgres_sql)["events"] == 20_000 - 10
