"""The SQLite group-commit writer: batches share one commit, and an operation that fails rolls
back alone while the rest of its batch commits."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.store import StoreUnavailable
from bridge.store.writer import GroupCommitWriter

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
    with sqlite3.connect(path) as conn:
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
