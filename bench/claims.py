"""What one claim and one due-channels query cost in the SQLite store as the backlog grows.

The worker asks both for every batch it sends, inside the writer's transaction, so whatever they
cost every callback waits for too. A backlog of `n` deliveries pending to one channel, each room
its own; each query is timed over repeated runs on the same database (ms per query, median).
Beside them, the claim as it was until schema 4 (one condition with OR, sorted), for the record.
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import time
from pathlib import Path

from bridge.store.schema import migrate
from bridge.store.sqlite_statements import CLAIM_SQL, DUE_SQL, ROOM_FREE

CLAIM_BACKLOGS = (1_000, 20_000, 200_000)
LIMIT = 64  # what a webhook channel with max_in_flight = 16 claims at once

BEFORE_CLAIM_SQL = f"""
SELECT d.id, d.event_id, d.channel, d.payload, d.attempts, d.room_id, e.command, e.body, e.query,
       e.received_at, e.sdk_app_id
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.channel = :channel
  AND ((d.state = 'pending' AND d.next_attempt_at <= :now)
    OR (d.state = 'in_flight' AND d.lease_until <= :now))
  AND {ROOM_FREE}
ORDER BY d.order_ts, d.id LIMIT :limit
"""  # noqa: S608  # constant text, no values


def claim_costs(path: Path, backlogs: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """{backlog: {"claim": ms, "due": ms, "claim_before": ms}}"""
    out: dict[int, dict[str, float]] = {}
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        migrate(conn)
        now, have = time.time(), 0
        for backlog in backlogs:
            conn.execute("BEGIN")
            for n in range(have, backlog):
                event = conn.execute(
                    "INSERT INTO events (received_at, sdk_app_id, command, room_id, event_time,"
                    " body, query) VALUES (?, 1, 'Live.CallbackAfterChangeOwner', ?, ?, '{}',"
                    " '{}')",
                    (now, f"room{n}", n),
                ).lastrowid
                conn.execute(
                    "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at,"
                    " created_at, updated_at, room_id, order_ts)"
                    " VALUES (?, 'sink', 'pending', '{}', ?, ?, ?, ?, ?)",
                    (event, now, now, now, f"room{n}", n),
                )
            conn.execute("COMMIT")
            have = backlog
            params = {"channel": "sink", "now": now + 1, "limit": LIMIT, "owner": "bench",
                      "leases": now + 1}  # fmt: skip
            out[backlog] = {
                name: _ms_per_query(conn, sql, params)
                for name, sql in (
                    ("claim", CLAIM_SQL),
                    ("due", DUE_SQL),
                    ("claim_before", BEFORE_CLAIM_SQL),
                )
            }
    return out


def _ms_per_query(conn: sqlite3.Connection, sql: str, params: dict[str, object]) -> float:
    times = []
    for _ in range(20):
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
