"""`connect`: a connection to a SQLite store in the settings every user of the file shares (WAL;
fsync on commit at `sync = "full"`; a small page cache and statement cache), whatever process it
is: the server, its delivery process, an outbox command, the benchmarks' journal.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Literal

Sync = Literal["full", "normal"]  # [store] sync
WAL_LIMIT_BYTES = 16 << 20  # steady load keeps the WAL near 4 MB (checkpoints every 1,000 pages)
# Each connection's page cache, in KiB (SQLite's default is 2,000). In WAL mode a connection's
# cache is emptied whenever another one commits: the reader's at every commit of the writer,
# and with a delivery process the two writers' at each other's, hundreds of times a second. A
# large cache mostly held pages about to be dropped, and the heap kept what a large read had
# filled: the delivery process's pair peaked 4 MB higher for it under benchmark 1.
CACHE_KIB = 256
# Prepared statements each connection keeps (sqlite3's default is 128). A batch's statements
# are as long as the batch (`insert_rows`' INSERT of n rows, `sql_in`'s n ids), so one text for
# each size, and the prepared ones grow with n: kept by the 128, 2.4 MB in the server under
# benchmark 1 and 1.6 MB in its delivery process. The few statements every batch runs stay among
# the 32 most recent.
STATEMENTS_KEPT = 32


_TEXT = functools.partial(str, encoding="utf-8", errors="replace")


def connect(path: Path, sync: Sync = "full") -> sqlite3.Connection:
    """A connection in the settings every user of the file must share; `sync` ("full" or
    "normal") is the writer's."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=10.0,
        cached_statements=STATEMENTS_KEPT,
    )  # fmt: skip
    # Text that is not UTF-8 (a flipped bit) read as U+FFFD: raised, one such row failed every
    # claim of its channel, for good; read, its event no longer parses, and it is a dead letter.
    conn.text_factory = _TEXT
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the OK packet goes out, power loss included. NORMAL
        # (in WAL mode): a commit is in the operating system's hands, safe from a crash of the
        # process.
        conn.execute("PRAGMA synchronous=FULL" if sync == "full" else "PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # A large transaction grows the WAL file to its size, and SQLite reuses the file without
        # giving the space back: truncated to this once a checkpoint lets the WAL start again.
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        # Temporary files (a large statement's journal) in memory: each needed a descriptor of
        # its own, and at the process's limit of open files one callback in 15 that had got in
        # was refused with "unable to open database file".
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except BaseException:
        conn.close()  # not a database, say: nobody else holds it to close it
        raise
    return conn
