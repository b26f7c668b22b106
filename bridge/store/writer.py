"""Group commit for SQLite: one thread, one connection, one fsync for everything queued.

Callers `submit` an operation (a function of the connection). The thread takes everything queued,
runs it in one transaction, commits once, and only then answers the callers: concurrent callbacks
share one fsync. Should an operation fail, the batch is rolled back and run again with a savepoint
for each operation, so that the one that fails rolls back alone while the rest of its batch
commits.

Operations of one `Together` kind run as one: every statement sqlite3 steps lets go of the GIL,
and under load the event loop's thread takes it each time, so each statement cost this thread a
wait for it back (about 0.6 ms of waiting for 0.1 ms of work per callback, measured). A batch of
callbacks recorded in a few multi-row statements waits a few times, not four times a callback.

With a `lock_fd`, each transaction holds an `flock` on it: every process writing the file (the
server, its delivery process, the outbox commands) then waits for the others in the kernel and
is woken the moment the lock is free. Without it they would meet in SQLite's busy handler, which
sleeps 1, 2, 5, … 100 ms between tries (ack p99 11.6 to 17.9 ms at 1,000 callbacks/s against
6.5 to 9.5 ms with the lock, measured with a delivery process beside the server).

With `gather_s`, the thread waits that long after the first operation of a batch before it
takes the lock: the delivery process's marks arrive a few at a time, and each of its
transactions holds the lock that the server's callbacks wait for. With 2 ms it committed half
as often (14 to 22 operations a commit, not 9 to 11), the server waited 0.6 to 1.1 ms for the
lock a commit instead of 1.6 to 1.8, and took 10% to 18% more callbacks a second (probes under
wrk, 2026-12-06). An `urgent` operation ends the wait: a claim, whose sends wait for it, and
which a lane submits only once its last marks are committed, so there is little to gather. That
cut the delivery process's acknowledged-to-delivered p50 at 500 events/s by about 40% (3.7 to
5.1 ms, not 6.2 to 7.8) and left its ack ceiling where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bridge.store import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Item = tuple[_Op, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]

MAX_BATCH = 1024

# SQLite's codes for a file that is no sound database: a damaged page ("database disk image is
# malformed"), or no database at all where one was. Never transient, unlike a full disk or a
# lock: what touches the damage fails the same way until the file is repaired.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def is_damage(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's word that the file is damaged."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _DAMAGE_CODES


class Together:
    """An operation the writer runs together with the others of its class in the same batch:
    `run_together(conn, ops)` gives each one's result, in order. Alone, it is a batch of one."""

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def __call__(self, conn: sqlite3.Connection) -> Any:
        return self.run_together(conn, [self])[0]


class GroupCommitWriter:
    def __init__(
        self, conn: sqlite3.Connection, lock_fd: int | None = None, gather_s: float = 0.0,
        check: Callable[[sqlite3.Connection], None] | None = None,
        lock_wait_s: float | None = None,
    ) -> None:  # fmt: skip
        """`check`: run before each batch, on the writer's thread; a sqlite3.Error it raises
        fails the batch as the store's own would. `lock_wait_s`: how long a batch waits for
        `lock_fd`'s flock before it fails so (None: as long as it takes)."""
        self._lock_fd = lock_fd
        self._lock_wait_s = lock_wait_s
        self._check = check
        self._gather_s = gather_s
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._hurry = threading.Event()  # an urgent operation waits: no gathering
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="sqlite-writer", daemon=True
        )
        self.commits = 0  # transactions committed; fewer than operations under load
        # SQLite's first word that the file is damaged, kept: the page it found may be one that
        # few writes touch (a ping's is another), and it does not mend itself.
        self.damaged: str | None = None
        self._thread.start()

    def note_damage(self, exc: BaseException) -> None:
        """Keeps `exc` as the file's damage if it says so, and says so once in the log."""
        if self.damaged is None and is_damage(exc):
            self.damaged = str(exc)
            log.error(
                "the database file is damaged (%s): what touches the damaged part fails, "
                "callbacks among it are answered 503, and /readyz answers 503 until live-bridge "
                "restarts on a repaired file (the README's \"A damaged database\")", exc,
            )  # fmt: skip

    async def submit(self, op: Callable[[sqlite3.Connection], T], urgent: bool = False) -> T:
        """`op`'s result once committed. `urgent`: something waits on it (a claim, before its
        sends), so the batch it joins starts without gathering."""
        return await self.enqueue(op, urgent)

    def enqueue(
        self, op: Callable[[sqlite3.Connection], T], urgent: bool = False
    ) -> asyncio.Future[T]:
        """As `submit`, the future of `op`'s result itself: a callback's write waits on it with
        a deadline, without a task of its own (bridge/store/deadline.py)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((op, loop, future))
        if urgent:
            self._hurry.set()
        return future

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                if self._gather_s:
                    # Lets go of the GIL while more operations queue; an urgent one ends it.
                    self._hurry.wait(self._gather_s)
                    self._hurry.clear()
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        if self._lock_fd is None:
            results = self._transact(conn, batch)
        elif not self._locked(self._lock_fd):
            why = f"the write lock held by another process for over {self._lock_wait_s:g} s"
            results = [(False, StoreUnavailable(f"store commit failed: {why}"))] * len(batch)
        else:
            try:
                results = self._transact(conn, batch)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        # One wake-up per event loop for the whole batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, loop, future), (ok, value) in zip(batch, results, strict=True):
            if isinstance(value, sqlite3.Error):
                self.note_damage(value)
                value = StoreUnavailable(f"store write failed: {value}")
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop already closed: nobody waits
                loop.call_soon_threadsafe(_settle, outcomes)

    def _locked(self, fd: int) -> bool:
        """`fd`'s flock taken, within lock_wait_s. (SQLite's own lock has a busy timeout; a
        process that holds this one and is stopped, an outbox command suspended with Ctrl-Z,
        held an outbox command behind it without a word for as long as it stayed stopped.)"""
        if self._lock_wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # lets go of the GIL while it waits
            return True
        deadline = time.monotonic() + self._lock_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def _transact(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[tuple[bool, Any]]:
        """Each operation's result, committed; or the store's error for every one of them."""
        try:
            if self._check is not None:
                self._check(conn)
            try:
                # The common case, every operation succeeding, needs no savepoints: they were two
                # statements more per operation, on the thread that holds the GIL the longest.
                results = _run_batch(conn, batch, isolated=False)
            except _OperationFailed:
                # Only then does each operation get a savepoint of its own, so the one that fails
                # rolls back alone and the rest commit. Operations are functions of the
                # connection alone: running them again after the rollback is safe.
                conn.execute("ROLLBACK")
                results = _run_batch(conn, batch, isolated=True)
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            # Every caller gets the error, and those that log it do so throttled: one line per
            # failed batch would be one per callback during an outage.
            log.debug("store commit failed: %s", exc)
            self.note_damage(exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"store commit failed: {exc}")
            results = [(False, failure)] * len(batch)
        return results


def _run_batch(
    conn: sqlite3.Connection, batch: list[_Item], isolated: bool
) -> list[tuple[bool, Any]]:
    """Every operation's result in one open transaction. Not `isolated`: the first failure
    raises _OperationFailed. `isolated`: each in a savepoint, a failure being its result."""
    conn.execute("BEGIN IMMEDIATE")
    if not isolated:
        try:
            return _run_together(conn, [op for op, _, _ in batch])
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite rolled the transaction back itself: disk full, I/O error
            raise _OperationFailed from exc
    results: list[tuple[bool, Any]] = []
    for op, _, _ in batch:
        conn.execute("SAVEPOINT op")
        try:
            results.append((True, op(conn)))
            conn.execute("RELEASE op")
        except Exception as exc:
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error): the
                # operations before this one are gone too.
                raise
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            results.append((False, exc))
    return results


def _run_together(conn: sqlite3.Connection, ops: list[_Op]) -> list[tuple[bool, Any]]:
    """Each operation's result; those of one Together class run as one, where the first of them
    stands in the batch (they only see more of the same transaction's writes than they would
    have in order)."""
    kinds: dict[type[Together], list[int]] = {}
    for index, op in enumerate(ops):
        if isinstance(op, Together):
            kinds.setdefault(type(op), []).append(index)
    results: list[tuple[bool, Any] | None] = [None] * len(ops)
    for index, op in enumerate(ops):
        if results[index] is not None:
            continue  # run already, with the first of its kind
        if not isinstance(op, Together):
            results[index] = (True, op(conn))
            continue
        indexes = kinds[type(op)]
        values = type(op).run_together(conn, [ops[i] for i in indexes])
        for i, value in zip(indexes, values, strict=True):
            results[i] = (True, value)
    return [result for result in results if result is not None]


class _OperationFailed(Exception):
    """One operation of a batch run without savepoints failed: run the batch again with them."""


def _settle(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():  # the caller went away; the write itself stands
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
