"""The settings every connection to a SQLite store shares (bridge/store/sqlite_connect.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from bridge.store.sqlite_connect import CACHE_KIB, Sync, connect


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_every_connection_keeps_a_small_page_cache(tmp_path: Path, sync: Sync) -> None:
    # Another connection's commit empties it (WAL mode): a large one held pages about to be
    # dropped, and the process the memory a large read had filled.
    with contextlib.closing(connect(tmp_path / "bridge.db", sync)) as conn:
        assert conn.execute("PRAGMA cache_size").fetchone() == (-CACHE_KIB,)
