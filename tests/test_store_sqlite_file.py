"""The SQLite store's file (sqlite_file.py): one serving process per file, a location it cannot
write, reads beside the writer, the sync setting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.store import StoreUnavailable
from bridge.store.sqlite import SQLiteStore
from bridge.store.sqlite_file import Sync
from tests.store_rows import add, sqlite_store

pytestmark = pytest.mark.anyio


store = pytest.fixture(sqlite_store)


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


async def test_unwritable_location_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await SQLiteStore(blocker / "sub" / "bridge.db").open()


async def test_reads_do_not_wait_for_the_writer(store: SQLiteStore) -> None:
    await add(store, "k")
    held = threading.Event()
    release = threading.Event()

    def slow(conn: sqlite3.Connection) -> None:  # a long operation in the writer's transaction
        conn.execute("UPDATE meta SET value = value")
        held.set()
        release.wait(10)

    writing = asyncio.ensure_future(store._submit(slow))
    try:
        await asyncio.to_thread(held.wait, 10)
        async with asyncio.timeout(5):
            stats = await store.stats()  # what /metrics and the status page read
            listed = await store.list_deliveries(False, None, 10)
        assert [(s.channel, s.pending) for s in stats] == [("a", 1)]
        assert [d.channel for d in listed] == ["a"]
    finally:
        release.set()
        await writing


@pytest.mark.parametrize(("sync", "pragma"), [("full", 2), ("normal", 1)])
async def test_sync_setting_is_the_writers(tmp_path: Path, sync: Sync, pragma: int) -> None:
    store = SQLiteStore(tmp_path / "bridge.db", sync=sync)
    await store.open()
    try:
        assert await store._fetch("PRAGMA synchronous") == [(pragma,)]
    finally:
        await store.close()


def open_files(path: Path) -> list[str]:
    """This process's file descriptors open on `path` (its -wal and -shm files too)."""
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
            targets.append(os.readlink(fd))
    return [target for target in targets if target.startswith(str(path))]


def newer_schema(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '999')")
        conn.commit()


def not_a_database(path: Path) -> None:
    path.write_bytes(b"not a database, " * 1024)


@pytest.mark.parametrize("make", [newer_schema, not_a_database])
async def test_a_store_that_cannot_open_leaves_no_connection_open(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    # Until the garbage collector found it, the refused connection held the file open (and on
    # Python 3.13 it then warned "unclosed database").
    path = tmp_path / "bridge.db"
    make(path)
    with pytest.raises(StoreUnavailable) as refused:
        await SQLiteStore(path).open()
    assert open_files(path) == [], refused.value
