"""The SQLite store's side for the worker (sqlite_queue.py), where it differs from PostgreSQL's:
outcomes marked in batches. The Store contract itself is tested in test_store.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.store.sqlite import SQLiteStore
from tests.bridge_server import db_rows
from tests.store_rows import add, sqlite_store

pytestmark = pytest.mark.anyio


store = pytest.fixture(sqlite_store)


async def test_concurrent_deliveries_are_all_marked(store: SQLiteStore) -> None:
    # Marked in batches (one statement for all that reach the writer together): none lost.
    now = time.time()
    for i in range(100):
        await add(store, f"k{i}", room=f"r{i}", now=now)
    assert await store.take_channel("a", now, 3600) is not None
    claimed = await store.claim("a", now, 100, 3600)
    before = store.commits
    await asyncio.gather(*(store.mark_delivered(c.id, now) for c in claimed))
    assert store.commits - before < 100  # marked together, not a commit each
    assert db_rows(store.path, "SELECT state, COUNT(*) FROM deliveries GROUP BY state") == [
        ("delivered", 100)
    ]
