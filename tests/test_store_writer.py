"""The SQLite group-commit writer: batches share one commit, and an operation that fails rolls
back alone while the rest of its batch commits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from bridge.store import StoreUnavailable
from bridge.store.writer import GroupCommitWriter, Together

pytestmark = pytest.mark.anyio


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)")
    return conn


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[GroupCommitWriter]:
    w = GroupCommitWriter(_connect(tmp_path / "w.db"))
    yield w
    await w.close()


def rows(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return sorted(r[0] for r in conn.execute("SELECT k FROM t"))


def insert(key: str) -> Callable[[sqlite3.Connection], str]:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (k) VALUES (?)", (key,))
        return key

    return op


def insert_then_fail(key: str) -> Callable[[sqlite3.Connection], str]:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (k) VALUES (?)", (key,))
        raise ValueError(f"{key} failed after writing")

    return op


async def test_a_batch_shares_one_commit(writer: GroupCommitWriter, tmp_path: Path) -> None:
    results = await asyncio.gather(*(writer.submit(insert(f"k{i}")) for i in range(100)))
    assert results == [f"k{i}" for i in range(100)]
    assert writer.commits < 100
    assert len(rows(tmp_path / "w.db")) == 100


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (insert("k1"), StoreUnavailable),  # a UNIQUE violation: sqlite3.Error, reported as such
        (insert_then_fail("x"), ValueError),  # wrote, then raised: its write must not stand
    ],
)
async def test_a_failing_operation_rolls_back_alone(
    writer: GroupCommitWriter, tmp_path: Path,
    bad: Callable[[sqlite3.Connection], str], error: type[Exception],
) -> None:  # fmt: skip
    await writer.submit(insert("k1"))
    ops = [insert("a"), insert("b"), bad, insert("c"), insert("d")]
    results = await asyncio.gather(*(writer.submit(op) for op in ops), return_exceptions=True)
    assert results[:2] == ["a", "b"] and results[3:] == ["c", "d"]
    assert isinstance(results[2], error)
    assert rows(tmp_path / "w.db") == ["a", "b", "c", "d", "k1"]


async def test_operations_after_a_failure_still_batch(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    await asyncio.gather(
        *(writer.submit(insert_then_fail(f"x{i}")) for i in range(5)), return_exceptions=True
    )
    before = writer.commits
    await asyncio.gather(*(writer.submit(insert(f"k{i}")) for i in range(50)))
    assert writer.commits - before < 50
    assert rows(tmp_path / "w.db") == sorted(f"k{i}" for i in range(50))


@dataclasses.dataclass(frozen=True)
class Insert(Together):
    """Inserts `key` together with the other Inserts of its batch, in one statement."""

    key: str
    calls = []  # type: ignore[var-annotated]  # how many ops each run_together call had

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[Insert]) -> list[str]:
        cls.calls.append(len(ops))
        marks = ",".join(["(?)"] * len(ops))
        conn.execute(f"INSERT INTO t (k) VALUES {marks}", [op.key for op in ops])  # noqa: S608
        return [op.key.upper() for op in ops]


async def one_batch(
    writer: GroupCommitWriter, ops: Sequence[Callable[[sqlite3.Connection], str]]
) -> list[str | BaseException]:
    """Each op's result, or its error, all submitted while the writer is held busy, so that
    they reach it as one batch."""
    held, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        held.set()
        release.wait(5)

    first = asyncio.ensure_future(writer.submit(hold))
    await asyncio.to_thread(held.wait, 5)
    waiting = [asyncio.ensure_future(writer.submit(op)) for op in ops]
    await asyncio.sleep(0.05)
    release.set()
    await first
    return await asyncio.gather(*waiting, return_exceptions=True)


async def test_operations_of_one_kind_run_together(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    Insert.calls.clear()
    results = await one_batch(writer, [Insert("a"), insert("plain"), Insert("b"), Insert("c")])
    assert results == ["A", "plain", "B", "C"]  # each its own result
    assert Insert.calls == [3]  # one call for the three
    assert rows(tmp_path / "w.db") == ["a", "b", "c", "plain"]


async def test_a_failure_among_ops_run_together_fails_only_its_own(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    # Run together, one bad key fails the statement; run again one by one, only it fails.
    await writer.submit(insert("taken"))
    Insert.calls.clear()
    results = await one_batch(writer, [Insert("x"), Insert("taken"), Insert("y")])
    assert results[0] == "X" and results[2] == "Y"
    assert isinstance(results[1], StoreUnavailable)
    assert Insert.calls == [3, 1, 1, 1]
    assert rows(tmp_path / "w.db") == ["taken", "x", "y"]


async def test_each_transaction_waits_for_the_write_lock_and_lets_it_go(tmp_path: Path) -> None:
    # Another process's writer (here: this test) holds the lock; the commit waits for it.
    lock = tmp_path / "w.db.write-lock"
    other = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
    ours = os.open(lock, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    w = GroupCommitWriter(_connect(tmp_path / "w.db"), ours)
    try:
        pending = asyncio.ensure_future(w.submit(insert("k1")))
        await asyncio.sleep(0.3)
        assert not pending.done() and rows(tmp_path / "w.db") == []
        fcntl.flock(other, fcntl.LOCK_UN)
        assert await asyncio.wait_for(pending, 5) == "k1"
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once committed
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        await w.close()
        os.close(ours)
        os.close(other)


async def test_gathering_puts_operations_that_come_apart_in_one_commit(tmp_path: Path) -> None:
    async def apart(writer: GroupCommitWriter) -> None:
        first = asyncio.ensure_future(writer.submit(insert(f"a{writer.commits}")))
        await asyncio.sleep(0.05)  # queued while the first waits for the gathering to end
        second = asyncio.ensure_future(writer.submit(insert(f"b{writer.commits}")))
        await asyncio.gather(first, second)

    for gather_s, commits in ((0.0, 2), (0.3, 1)):
        w = GroupCommitWriter(_connect(tmp_path / f"{gather_s}.db"), gather_s=gather_s)
        try:
            await apart(w)
            assert w.commits == commits
        finally:
            await w.close()


async def test_an_urgent_operation_ends_the_gathering(tmp_path: Path) -> None:
    # A claim's sends wait for it: it starts its batch at once, taking along what was gathered.
    w = GroupCommitWriter(_connect(tmp_path / "w.db"), gather_s=60.0)
    try:
        gathered = asyncio.ensure_future(w.submit(insert("marked")))
        await asyncio.sleep(0.05)  # the writer is gathering
        urgent = w.submit(insert("claimed"), urgent=True)
        done = await asyncio.wait_for(asyncio.gather(gathered, urgent), 10)
        assert list(done) == ["marked", "claimed"]
        assert w.commits == 1
        # Alone, it does not wait either.
        assert await asyncio.wait_for(w.submit(insert("again"), urgent=True), 10) == "again"
        assert w.commits == 2
    finally:
        await w.close()


async def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    # A COMMIT refused for a deferred constraint leaves SQLite's transaction open: unless the
    # writer rolls it back, every later BEGIN fails ("within a transaction") and the store
    # never recovers.
    conn = _connect(tmp_path / "w.db")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    w = GroupCommitWriter(conn)

    def orphan(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO child VALUES (7)")

    try:
        with pytest.raises(StoreUnavailable, match="FOREIGN KEY"):
            await w.submit(orphan)
        assert await w.submit(insert("after")) == "after"
    finally:
        await w.close()
    assert rows(tmp_path / "w.db") == ["after"]


async def test_damage_is_kept_once_met_and_nothing_else_counts_as_damage(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    w = GroupCommitWriter(_connect(db))
    try:
        with pytest.raises(StoreUnavailable):  # a constraint: the operation's own trouble
            await asyncio.gather(w.submit(insert("k")), w.submit(insert("k")))
        with pytest.raises(StoreUnavailable):
            await w.submit(lambda conn: conn.execute("SELECT * FROM no_such_table"))
        assert w.damaged is None
    finally:
        await w.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 't'")
    with db.open("r+b") as file:  # the table's page written over, as a failing disk would
        file.seek((root[0] - 1) * 4096)
        file.write(b"\xde\xad" * 2048)
    w = GroupCommitWriter(_connect(db))
    try:
        with pytest.raises(StoreUnavailable, match="malformed"):
            await w.submit(insert("after"))
        assert w.damaged == "database disk image is malformed"
        assert await w.submit(lambda conn: 1) == 1  # what does not touch the page still works
        assert w.damaged == "database disk image is malformed"  # and the damage is kept
    finally:
        await w.close()
