"""The SQLite store's file (sqlite_file.py): one serving process per file, a location it cannot
write, reads beside the writer, the sync setting."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.store import NewDelivery, StoreUnavailable
from bridge.store.sqlite import SQLiteStore
from bridge.store.sqlite_connect import Sync
from tests.store_rows import add, new_event, sqlite_store

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


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[SQLiteStore]:
    """The store as `live-bridge serve` opens it (holding the file's lock), closed after."""
    server = SQLiteStore(path, exclusive=True)
    await server.open()
    try:
        yield server
    finally:
        await server.close()


async def test_a_wal_removed_while_open_is_unavailable_and_its_commits_kept(
    tmp_path: Path,
) -> None:
    # It held every commit since the last checkpoint, lost at a crash, while the store went on
    # acknowledging into it.
    path = tmp_path / "bridge.db"
    async with serving(path) as server:
        for key in ("one", "two"):
            await server.record(new_event(key), [NewDelivery("a", "p")], time.time(), 0)
        os.remove(f"{path}-wal")
        with pytest.raises(StoreUnavailable, match=r"bridge\.db-wal was removed or replaced"):
            await server.record(new_event("three"), [NewDelivery("a", "p")], time.time(), 0)
        # The database file alone, as a crash would leave it: the commits are in it.
        alone = tmp_path / "alone.db"
        alone.write_bytes(path.read_bytes())
        with contextlib.closing(sqlite3.connect(alone)) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)


async def test_a_shm_removed_while_served_is_unavailable_and_no_other_process_opens_it(
    tmp_path: Path,
) -> None:
    # An outbox command then made a new -shm beside the server's: two processes on two indexes
    # of one log, "database disk image is malformed".
    path = tmp_path / "bridge.db"
    async with serving(path) as server:
        await server.record(new_event("one"), [NewDelivery("a", "p")], time.time(), 0)
        os.remove(f"{path}-shm")
        with pytest.raises(StoreUnavailable, match="is missing while live-bridge serves"):
            await SQLiteStore(path).open()
        assert f"{path.name}-shm" not in os.listdir(tmp_path)  # no second index made
        with pytest.raises(StoreUnavailable, match=r"bridge\.db-shm was removed or replaced"):
            await server.ping()
    async with serving(path):  # restarted
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)


async def test_a_lock_file_removed_while_serving_is_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A second server then started on the same database and sent again what the first had in
    # flight.
    path = tmp_path / "bridge.db"
    async with serving(path) as server:
        os.remove(f"{path}.lock")
        await server.record(new_event("one"), [NewDelivery("a", "p")], time.time(), 0)
        assert "bridge.db.lock was removed while open: made and taken again" in caplog.text
        with pytest.raises(StoreUnavailable, match="another live-bridge is serving"):
            await SQLiteStore(path, exclusive=True).open()


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
async def test_a_second_server_by_another_name_of_the_file_is_refused(
    tmp_path: Path, kind: str
) -> None:
    # Through a symbolic link the second server took a lock of its own; through a hard link
    # each name had its own WAL: two servers wrote one database, and lost half of it.
    path = tmp_path / "bridge.db"
    server = SQLiteStore(path, exclusive=True)
    await server.open()
    try:
        other = tmp_path / "other.db"
        if kind == "symlink":
            other.symlink_to(path)
            message = "another live-bridge is serving"
        else:
            os.link(path, other)
            message = "more than one name"
        with pytest.raises(StoreUnavailable, match=message):
            await SQLiteStore(other, exclusive=True).open()
    finally:
        await server.close()


async def test_temporary_files_stay_in_memory(store: SQLiteStore) -> None:
    # Each took a file descriptor: at the process's limit of open files, callbacks that had got
    # in were refused ("unable to open database file").
    assert await store._fetch("PRAGMA temp_store") == [(2,)]


async def test_a_record_held_by_the_write_lock_is_unavailable_within_tencents_2_s(
    store: SQLiteStore,
) -> None:
    # An outbox command stopped with Ctrl-Z holding the write lock held every callback with it:
    # 64 callbacks waited 8 s and were answered OK, long after Tencent had given up.
    holder = os.open(f"{store.path}.write-lock", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(StoreUnavailable, match=r"did not commit within 1\.8 s"):
            await store.record(new_event("held"), [NewDelivery("a", "p")], time.time(), 0)
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    # The write goes on once the lock is let go: the event is stored after all.
    for _ in range(100):
        if await store.recent_events(10):
            break
        await asyncio.sleep(0.05)
    assert [e.command for e in await store.recent_events(10)] == [new_event().command]


async def test_text_that_is_not_utf8_is_read_not_raised(store: SQLiteStore) -> None:
    # A flipped bit in an event's body failed every claim of its channel, for good.
    await add(store, "k", channel="a")
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        conn.execute("UPDATE events SET body = CAST(x'7bff7d' AS TEXT)")
        conn.commit()
    (claimed,) = await store.claim("a", time.time(), 10, 30)
    assert claimed.body == "{\ufffd}"


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


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_file_removed_or_replaced_while_open_is_unavailable(
    store: SQLiteStore, how: str
) -> None:
    # Callbacks went on being acknowledged into a file nobody would open again: gone at the
    # next start, while /readyz said ready.
    await store.record(new_event("before"), [NewDelivery("a", "p")], time.time(), 0)
    moved = store.path.with_name("moved.db")
    os.rename(store.path, moved)
    if how == "replaced":
        store.path.write_bytes(moved.read_bytes())  # a restored copy, another file
    with pytest.raises(StoreUnavailable, match="removed or replaced while open"):
        await store.record(new_event("after"), [NewDelivery("a", "p")], time.time(), 0)
    with pytest.raises(StoreUnavailable, match="removed or replaced while open"):
        await store.ping()
    os.replace(moved, store.path)  # put back: the same file again
    await store.ping()
