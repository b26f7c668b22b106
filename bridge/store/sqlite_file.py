"""How the SQLite store reaches its file: locks, one writer and one reader.

`SQLiteFile` holds the serving process's lock on the file, the write lock each transaction
takes, the group-commit writer every write goes through (writer.py), and a connection of its
own for what operators read, each opened by sqlite_connect.py's `connect`. It checks before each
batch that the file, its -wal and -shm and its lock file are still the ones open, and keeps
SQLite's word that the file is damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bridge.store import Recorded, StoreUnavailable
from bridge.store.schema import SCHEMA_VERSION, migrate
from bridge.store.sqlite_connect import Sync, connect
from bridge.store.writer import GroupCommitWriter

log = logging.getLogger("bridge.store.sqlite")  # the store's log lines, under its name

T = TypeVar("T")


def _served_before(path: Path) -> None:
    """Refuses, read-only and before anything is created beside it, a file that holds no
    live-bridge tables: a wrong path (another program's database, an empty file) would get
    them, and look all clear."""
    # Read-only still makes the -shm (and -wal) of a database in WAL mode, beside another
    # program's file; with no -wal there, nothing can be in one, and the file is read as it is
    # (immutable: nothing made beside it).
    ro = "mode=ro" if Path(f"{path}-wal").exists() else "immutable=1"
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?{ro}"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if (
            found is None
            or conn.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone() is None
        ):
            raise sqlite3.DatabaseError("no live-bridge tables: no live-bridge has served here")


# Waits before the serving lock is tried again: another process may hold it for an instant.
LOCK_TRIES_S = (0.01, 0.05)


def _file_id(path: Path | str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _fd_id(fd: int) -> tuple[int, int]:
    found = os.fstat(fd)
    return found.st_dev, found.st_ino


def _file_id_or_none(path: Path | str) -> tuple[int, int] | None:
    try:
        return _file_id(path)
    except OSError:
        return None


def _missing_beside_server(real: str, sides: list[str]) -> bool:
    return _served(f"{real}.lock") and not all(map(os.path.exists, sides))


def _served(lock: str) -> bool:
    """Whether a serving process holds the lock file `lock` (tried with a shared lock, let go
    at once: a server starting meanwhile tries its own again, see SQLiteFile._take_lock)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if taken
    return False


class SQLiteFile:
    def __init__(
        self, path: Path, exclusive: bool = False, sync: Sync = "full", gather_s: float = 0.0,
        create: bool = True, lock_wait_s: float | None = None,
    ) -> None:  # fmt: skip
        self.path = path
        self._lock_wait_s = lock_wait_s  # see GroupCommitWriter
        self._create = create  # else a file without live-bridge's tables is refused untouched
        self._sync = sync
        self._gather_s = gather_s  # see GroupCommitWriter
        self._exclusive = exclusive  # the serving process: hold the lock file
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None
        self._write_lock_fd: int | None = None
        self.owner = uuid.uuid4().hex  # written on what this instance claims and takes
        self.identity = ""  # the database's, once open (Store.identity)
        self._reader: sqlite3.Connection | None = None  # for what operators read
        self._late: set[asyncio.Future[Recorded]] = set()  # writes that outlived their callback
        self._file_id: tuple[int, int] | None = None  # the database file's device and inode
        # The -wal and -shm files', by their names: SQLite's own, beside the file's real name.
        self._side_ids: dict[str, tuple[int, int] | None] = {}
        self._lock_path: str | None = None
        self._lock_id: tuple[int, int] | None = None  # the lock file's, as taken
        self._reading = threading.Lock()

    @property
    def commits(self) -> int:
        return self._writer.commits if self._writer else 0

    async def open(self) -> None:
        try:
            if self.path.is_dir():  # SQLite said "unable to open", the lock "a hard link"
                raise OSError("a folder, not a database file")
            if not self._create:
                _served_before(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._exclusive:
                self._lock()
            # Every process that writes the file takes this one's flock for each transaction:
            # the server, its delivery process and the outbox commands hand over at once.
            self._write_lock_fd = os.open(
                f"{self.path}.write-lock", os.O_RDONLY | os.O_CREAT, 0o600
            )
            sides = self._side_files()
            conn = connect(self.path, self._sync)
            try:
                self.identity = migrate(conn)
                self._file_id = _file_id(self.path)
                self._side_ids = {side: _file_id_or_none(side) for side in sides}
                # Opened now, not at the first read: a process at its limit of open files
                # could then no longer answer /metrics, /status or the outbox commands.
                self._reader = self._open_reader()
            except BaseException:
                conn.close()  # a newer schema, a full disk: nobody else holds it to close it
                raise
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from None
        self._writer = GroupCommitWriter(
            conn, self._write_lock_fd, self._gather_s, self._check_file, self._lock_wait_s
        )
        log.info("store open: %s (schema %d)", self.path, SCHEMA_VERSION)

    @property
    def damaged(self) -> str | None:
        """SQLite's word that the file is damaged, once a write or a read has met it."""
        return self._writer.damaged if self._writer is not None else None

    def _side_files(self) -> list[str]:
        """The -wal and -shm files' names, SQLite's own (beside the file's real name). Missing
        while a server has the file open, they were removed: opened then, SQLite would make new
        ones beside the server's, which has the removed ones open, and two processes on two
        indexes of one log corrupted the database ("database disk image is malformed")."""
        real = os.path.realpath(self.path)
        sides = [f"{real}-wal", f"{real}-shm"]
        if not self._exclusive and _missing_beside_server(real, sides):
            # Looked at again: a server that is starting or stopping holds its lock for a few
            # milliseconds while SQLite has not made them yet, or has just removed them.
            time.sleep(0.1)
            if _missing_beside_server(real, sides):
                raise OSError(
                    "its -wal or -shm file is missing while live-bridge serves from it (removed "
                    "by hand?): not opened; restart the server first"
                )
        return sides

    def _lock(self) -> None:
        # By the file's real name: through a symbolic link, a second server took a lock of its
        # own and served the same file. A file of several names (hard links) is refused: each
        # name has a WAL of its own, and two servers wrote one database through two.
        real = os.path.realpath(self.path)
        if os.path.exists(real) and os.stat(real).st_nlink > 1:
            raise OSError("the database file has more than one name (a hard link): refused")
        self._lock_path = f"{real}.lock"
        self._lock_fd = self._take_lock(self._lock_path)
        self._lock_id = _fd_id(self._lock_fd)

    @staticmethod
    def _take_lock(path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        for wait in (*LOCK_TRIES_S, None):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if wait is None:
                    os.close(fd)
                    raise OSError("another live-bridge is serving from this database") from None
                time.sleep(wait)  # an outbox command's look (_served) holds it for a moment
        raise AssertionError("unreachable")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = self._lock_path = None
        if self._write_lock_fd is not None:
            os.close(self._write_lock_fd)
            self._write_lock_fd = None

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        with self._reading:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self._unlock()

    def _check_file(self, conn: sqlite3.Connection) -> None:
        """Before each of the writer's batches, on its thread (a few stats a batch, none on the
        event loop): the file at `path` must still be the one open. Removed, or replaced by a
        restored copy, what is written goes to a file nobody will open again, and callbacks
        acknowledged meanwhile were gone at the next start.

        So must its -wal and -shm. A -wal removed held every commit since the last checkpoint,
        lost at a crash; a -shm removed let the next process make another, and the two
        corrupted the database. What the open -wal holds is written into the database file
        first (a checkpoint through this connection), then nothing more until a restart.

        The lock file too: removed, a second server started on the same database and sent
        again what this one had in flight. It is made and taken again, if nobody else has."""
        if _file_id_or_none(self.path) != self._file_id:
            raise sqlite3.OperationalError(
                f"{self.path} was removed or replaced while open: restart"
            )
        for side, known in self._side_ids.items():
            if _file_id_or_none(side) != known:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                raise sqlite3.OperationalError(
                    f"{side} was removed or replaced while open: restart (what it held is in "
                    "the database file)"
                )
        if self._lock_path is not None and _file_id_or_none(self._lock_path) != self._lock_id:
            self._relock(self._lock_path)

    def _relock(self, path: str) -> None:
        try:
            fd = self._take_lock(path)
        except OSError as exc:
            raise sqlite3.OperationalError(
                f"{path} was removed while open, and {exc}: restart"
            ) from None
        assert self._lock_fd is not None
        os.close(self._lock_fd)
        self._lock_fd, self._lock_id = fd, _fd_id(fd)
        log.warning("%s was removed while open: made and taken again", path)

    async def _submit(self, op: Callable[[sqlite3.Connection], T], urgent: bool = False) -> T:
        return await self._enqueue(op, urgent)

    def _enqueue(
        self, op: Callable[[sqlite3.Connection], T], urgent: bool = False
    ) -> asyncio.Future[T]:
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        return self._writer.enqueue(op, urgent)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """`op` on a connection of its own, in a thread: what the status page, /metrics and the
        outbox commands read (counting every row, say) never holds up the writer's commits."""
        if self._writer is None:
            raise StoreUnavailable("store is not open")

        def run() -> T:
            with self._reading:
                try:
                    if self._reader is None:
                        self._reader = self._open_reader()
                    return op(self._reader)
                except sqlite3.Error as exc:
                    if self._writer is not None:
                        self._writer.note_damage(exc)
                    raise StoreUnavailable(f"store read failed: {exc}") from None

        return await asyncio.to_thread(run)

    def _open_reader(self) -> sqlite3.Connection:
        reader = connect(self.path)
        reader.execute("PRAGMA query_only=ON")
        return reader

    async def _execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._submit(op)

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        def op(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql, params).fetchall()

        return await self._submit(op)
