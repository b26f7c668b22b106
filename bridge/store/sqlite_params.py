"""Statements within SQLite's limit on bound parameters: `sql_in` for a list of values, `chunks`
to split one, `insert_rows` for many rows in as few INSERTs as the limit allows."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def sql_in(sql: str, values: Sequence[object]) -> str:
    """`sql` with its `{marks}` replaced by one `?` per value: values stay parameters."""
    return sql.replace("{marks}", ",".join("?" * len(values)))


def chunks(values: Sequence[T], size: int) -> list[Sequence[T]]:
    """`values` in runs of at most `size`: one statement each within SQLite's parameter limit."""
    return [values[start : start + size] for start in range(0, len(values), size)]


# Bound parameters per statement: SQLite's limit before 3.32, the lowest a build may have.
MAX_PARAMS = 999


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`head` ("INSERT … VALUES") for all `rows`, in as few statements as the limit allows."""
    if not rows:
        return
    width = len(rows[0])
    per = MAX_PARAMS // width
    mark = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.execute(f"{head} {','.join([mark] * len(chunk))}", [v for row in chunk for v in row])
