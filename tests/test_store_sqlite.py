"""What only the SQLite engine does: group commit of callbacks, a full disk, its own migrations,
recovery at start-up. The Store contract itself is tested in test_store.py; the file, its locks
and connections in test_store_sqlite_file.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.receive import dedup_key
from bridge.store import (
    UNKNOWN_TAT,
    NewDelivery,
    NewEvent,
    Pace,
    StoreUnavailable,
    dedup_digest,
    room_key,
)
from bridge.store.schema import MIGRATIONS, SCHEMA_VERSION, _key_in_millis, migrate
from bridge.store.sqlite import SQLiteStore
from bridge.store.sqlite_connect import Sync, connect
from bridge.store.sqlite_outbox import BATCH
from bridge.store.sqlite_statements import CLAIM_SQL, DUE_SQL, STATS_SQL
from tests.bridge_server import OWNER, db_rows
from tests.store_rows import (
    APP,
    DELIVERIES_OF_TWO_APPS,
    KEYED_BEFORE,
    OLD_KEYS,
    ROOM_KEYS,
    ROOMS_OF_TWO_APPS,
    THREADS_OF_TWO_APPS,
    add,
    assert_retries_are_duplicates,
    new_event,
    sqlite_store,
)

pytestmark = pytest.mark.anyio


store = pytest.fixture(sqlite_store)


async def test_concurrent_records_share_commits(store: SQLiteStore) -> None:
    before = store.commits
    now = time.time()
    results = await asyncio.gather(
        *(store.record(new_event(f"k{i}"), [NewDelivery("a", "p")], now, 600) for i in range(200))
    )
    assert len({r.event_id for r in results}) == 200
    assert store.commits - before < 100  # one fsync per batch, not per callback
    assert db_rows(store.path, "SELECT COUNT(*) FROM deliveries") == [(200,)]


async def test_records_in_one_batch_get_their_own_ids_and_repeats_are_duplicates(
    store: SQLiteStore,
) -> None:
    # A batch of callbacks is recorded in one statement per table: each event keeps its own
    # deliveries, and a repeat within the same batch is a duplicate of the first.
    now = time.time()
    keys = ["k0", "k1", "k0", "k2", "k1"]
    results = await asyncio.gather(
        *(store.record(new_event(k, room=f"r{k}"), [NewDelivery("a", f"p-{k}"),
                       NewDelivery("b", f"q-{k}")], now, 600) for k in keys)
    )  # fmt: skip
    assert [r.duplicate for r in results] == [False, False, True, False, True]
    assert results[2].event_id == results[0].event_id
    assert results[4].event_id == results[1].event_id
    assert len({r.event_id for r in results}) == 3
    for result, key in zip(results, keys, strict=True):
        assert db_rows(
            store.path, "SELECT channel, payload, room_id FROM deliveries WHERE event_id = ?"
            " ORDER BY channel", (result.event_id,)
        ) == [("a", f"p-{key}", f"{APP}:r{key}"), ("b", f"q-{key}", f"{APP}:r{key}")]  # fmt: skip
    assert db_rows(store.path, "SELECT COUNT(*) FROM dedup") == [(3,)]


async def test_recover_releases_what_a_dead_process_had_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    now = time.time()
    await add(s, "k", now=now)
    assert await s.take_channel("a", now, 3600) == Pace(0, 0)
    assert len(await s.claim("a", now, 10, 3600)) == 1
    await s.close()  # as if killed: the row stays in flight and the channel held, long leases
    s = SQLiteStore(path)
    await s.open()
    try:
        # Opening alone changes nothing.
        assert await s.claim("a", time.time(), 10, 30) == []
        assert await s.take_channel("a", time.time(), 30) is None
        assert await s.recover() == 1
        assert await s.due_channels(time.time(), []) == ["a"]
        # Held at the kill: what it sent since the pace was last saved is unknown.
        assert await s.take_channel("a", time.time(), 30) == Pace(UNKNOWN_TAT, 0)
        assert [c.payload for c in await s.claim("a", time.time(), 10, 30)] == ["p-k"]
    finally:
        await s.close()


async def test_recover_frees_a_dead_letter_buried_while_a_dead_process_sent_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    now = time.time()
    await add(s, "k", now=now)
    (claimed,) = await s.claim("a", now, 10, 3600)
    assert await s.bury_unknown_channels([], now, "channel removed") == 1
    await s.close()  # killed mid-send: the lease would hold the retry for an hour
    s = SQLiteStore(path)
    await s.open()
    try:
        assert await s.retry([claimed.id], time.time()) == []
        assert await s.recover() == 0  # nothing in flight: the dead letter stays dead
        assert await s.retry([claimed.id], time.time()) == [claimed.id]
    finally:
        await s.close()


async def test_full_database_is_unavailable_then_recovers(store: SQLiteStore) -> None:
    now = time.time()
    big = [NewDelivery("a", "x" * 20000)]

    def full(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    await store._submit(full)
    with pytest.raises(StoreUnavailable, match="full"):
        for i in range(10):
            await store.record(new_event(f"k{i}"), big, now, 600)
    await store._submit(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    assert not (await store.record(new_event("after"), big, now, 600)).duplicate


async def test_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    s = SQLiteStore(path)
    await s.open()
    await s.ping()
    await s.close()
    assert db_rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    for version, refusal in [("999", "newer"), ("seven", "'seven' is not a number")]:
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        conn.commit()
        conn.close()
        with pytest.raises(StoreUnavailable, match=refusal):
            await SQLiteStore(path).open()


def old_database(path: Path, version: int) -> sqlite3.Connection:
    """A database as live-bridge left it at schema `version`, open for rows to be added."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.create_function(  # what migrations 8 and 9 ask of the connection
        "live_bridge_dedup_digest", 3, lambda c, a, b: dedup_digest(c, a, b.encode())
    )
    conn.create_function("live_bridge_key_in_millis", 1, _key_in_millis)
    for migration in MIGRATIONS[:version]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    return conn


def add_keyed_before(conn: sqlite3.Connection, now: float) -> None:
    """The events of KEYED_BEFORE with their dedup keys as written before schema 5."""
    for (event_id, at, body), key in zip(KEYED_BEFORE, OLD_KEYS, strict=True):
        conn.execute(
            "INSERT INTO events VALUES (?, ?, 1400000000, ?, ?, ?, ?, '{}')",
            (event_id, now, OWNER, f"r{event_id}", at, body),
        )
        conn.execute("INSERT INTO dedup VALUES (?, ?, ?)", (key, now, event_id))


@pytest.mark.parametrize(
    ("version", "room_and_order"),
    [
        (1, ("1:r9", 1700000000500)),  # version 2 filled room and order in, 11 named its app
        (2, (None, 0)),  # written by version 2 without them
    ],
)
async def test_older_database_is_migrated_keeping_its_rows(
    tmp_path: Path, version: int, room_and_order: tuple[object, ...]
) -> None:
    path = tmp_path / "old.db"
    conn = old_database(path, version)
    conn.execute(
        "INSERT INTO events VALUES (1, 1700000000.5, 1, 'Live.CallbackAfterChangeOwner', 'r9',"
        " NULL, '{}', '{}')"
    )
    # In flight under a long lease, as a process killed mid-send leaves it.
    conn.execute(
        "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at, lease_until,"
        " created_at, updated_at) VALUES (1, 'a', 'in_flight', 'p', 0, 1e12, 0, 0)"
    )
    migrate(conn)
    conn.close()
    assert db_rows(path, "SELECT room_id, order_ts, owner FROM deliveries") == [
        (*room_and_order, None)
    ]
    s = SQLiteStore(path)
    await s.open()
    try:
        now = time.time()
        assert await s.claim("a", now, 10, 30) == []
        assert await s.recover() == 1
        (claimed,) = await s.claim("a", now, 10, 30)
        assert claimed.payload is None  # rendered again from its event when sent (schema 9)
        await s.mark_delivered(claimed.id, now)
        assert await s.take_channel("a", now, 30) is not None
    finally:
        await s.close()
    assert db_rows(path, "SELECT state FROM deliveries") == [("delivered",)]


@pytest.mark.parametrize("sql", [CLAIM_SQL, DUE_SQL], ids=["claim", "due_channels"])
def test_claims_walk_the_index_instead_of_sorting_the_backlog(tmp_path: Path, sql: str) -> None:
    # What keeps a claim's cost flat however long the backlog: each part searches
    # deliveries_claim by channel and state, in order, and nothing sorts or de-duplicates
    # every waiting row (the outer sort sees at most twice the claim's limit).
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        migrate(conn)
        params = {"channel": "a", "now": 0.0, "limit": 4, "owner": "x", "leases": 0.0}
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    searches = [step for step in plan if step.startswith("SEARCH d USING INDEX deliveries_claim")]
    assert len(searches) == 2, plan
    assert all("(channel=? AND state=?)" in step for step in searches), plan
    assert not any("FOR DISTINCT" in step or "deliveries_due" in step for step in plan), plan


def claim_steps(path: Path, delivered: int) -> int:
    """SQLite's virtual-machine instructions for one claim of 16 from a room that has
    `delivered` deliveries sent before 16 pending (instructions, not time: the same on any
    machine)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        migrate(conn)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO events VALUES (1, 0, 1, 'x', 'r', NULL, '{}', '{}')")
        conn.executemany(
            "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, room_id, order_ts) VALUES (1, 'a', ?, 0, 0, 0, 'r', ?)",
            [("delivered" if n < delivered else "pending", n) for n in range(delivered + 16)],
        )
        conn.execute("COMMIT")
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(step, 100)
        params = {"channel": "a", "now": 1.0, "limit": 16, "owner": "x", "leases": 1.0}
        assert len(conn.execute(CLAIM_SQL, params).fetchall()) == 16
        return steps[0] * 100


def test_a_claim_costs_the_same_whatever_its_rooms_history(tmp_path: Path) -> None:
    # ROOM_FREE walked every earlier delivery of each row's room, the delivered ones the
    # retention keeps included: 60 ms a claim for a room with 19,000 delivered, a backlog in one
    # room drained at 150 a second. deliveries_room_open holds only what is still to send.
    fresh = claim_steps(tmp_path / "fresh.db", 0)
    old = claim_steps(tmp_path / "old.db", 5_000)
    assert old < 2 * fresh, (fresh, old)


def test_stats_count_in_the_index_instead_of_reading_every_row(tmp_path: Path) -> None:
    # /metrics, /status and `outbox stats` count every delivery the retention keeps. Read row by
    # row, each with its rendered payload, a million took 1 to 6 s a scrape; counted in
    # deliveries_claim, channel by channel and state by state, 0.07 to 0.26 s.
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        migrate(conn)
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {STATS_SQL}")]
    reads = [step for step in plan if " deliveries" in step]
    assert all(step.startswith("SEARCH deliveries USING") for step in reads), plan
    counts = "SEARCH deliveries USING COVERING INDEX deliveries_claim (channel=? AND state=?)"
    assert reads.count(counts) == 4, plan  # pending, in flight, dead, delivered


async def assert_file_finds_retries(path: Path, now: float) -> None:
    """`assert_retries_are_duplicates` on the SQLite file at `path`, opened as the server does."""
    store = SQLiteStore(path)
    await store.open()
    try:
        await assert_retries_are_duplicates(store, now)
    finally:
        await store.close()


async def test_dedup_keys_written_before_version_5_still_find_retries(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = old_database(path, 4)
    now = time.time()
    add_keyed_before(conn, now)
    migrate(conn)
    conn.close()
    await assert_file_finds_retries(path, now + 1)
    assert db_rows(path, "SELECT count(*) FROM events") == [(len(KEYED_BEFORE),)]


async def test_dedup_keys_written_before_version_8_name_their_app(tmp_path: Path) -> None:
    # Keys of version 7 were EventTime, then the command and body alone: two apps sending the
    # same bytes were one event. Made again from their events, a retry still finds its own.
    path = tmp_path / "old.db"
    now = time.time()
    body = '{"CallbackCommand":"X","RoomId":"r","EventTime":1703589922780}'
    old_key = f"{1703589922780:016x}:" + hashlib.sha256(f"X\0{body}".encode()).hexdigest()
    with contextlib.closing(old_database(path, 7)) as conn:
        conn.execute(
            "INSERT INTO events VALUES (1, ?, 1400000001, 'X', 'r', 1703589922780, ?, '{}')",
            (now, body),
        )
        conn.execute("INSERT INTO dedup VALUES (?, ?, 1)", (old_key, now))
        conn.execute("INSERT INTO dedup VALUES ('00:gone', ?, 7)", (now,))  # its event pruned
        migrate(conn)
    assert db_rows(path, "SELECT key FROM dedup ORDER BY event_id") == [
        (dedup_key("X", 1400000001, body.encode(), 1703589922780),), ("00:gone",)
    ]  # fmt: skip
    store = SQLiteStore(path)
    await store.open()
    try:
        for app, duplicate in ((1400000001, True), (1400000000, False)):
            event = NewEvent(
                app,
                "X",
                "r",
                1703589922780,
                body,
                "{}",
                dedup_key("X", app, body.encode(), 1703589922780),
            )
            recorded = await store.record(event, [NewDelivery("a", "p")], now + 1, 600)
            assert recorded.duplicate is duplicate
    finally:
        await store.close()


async def test_what_version_8_stored_is_read_as_today(tmp_path: Path) -> None:
    # An EventTime in seconds led its key with the seconds; today's key leads with milliseconds,
    # so a retry across the upgrade missed it. Messages it rendered are made again when sent;
    # one delivered keeps what went out.
    path = tmp_path / "old.db"
    now = time.time()
    body = '{"CallbackCommand":"X","RoomId":"r","EventTime":1703589922}'
    old_key = f"{1703589922:016x}:" + dedup_digest("X", 1, body.encode())
    with contextlib.closing(old_database(path, 8)) as conn:
        conn.execute(
            "INSERT INTO events VALUES (1, ?, 1, 'X', 'r', 1703589922, ?, '{}')", (now, body)
        )
        conn.executemany(
            "INSERT INTO dedup VALUES (?, ?, ?)",
            [(old_key, now, 1), ("0000000000000000:zero", now, 2), (":none", now, 3),
             ("000000zzzzzzzzzz:odd", now, 4), (dedup_key("X", 1, b"{}", 1703589922780), now, 5)],
        )  # fmt: skip
        conn.execute(
            "INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at,"
            " created_at, updated_at) VALUES (1, 'a', 'pending', 'old', 0, 0, 0),"
            " (1, 'b', 'dead', 'old', 0, 0, 0), (1, 'c', 'delivered', 'sent', 0, 0, 0)"
        )
        migrate(conn)
    assert db_rows(path, "SELECT key FROM dedup ORDER BY event_id") == [
        (dedup_key("X", 1, body.encode(), 1703589922000),), ("0000000000000000:zero",),
        (":none",), ("000000zzzzzzzzzz:odd",), (dedup_key("X", 1, b"{}", 1703589922780),),
    ]  # fmt: skip
    assert db_rows(path, "SELECT event_time FROM events") == [(1703589922000,)]
    assert db_rows(path, "SELECT channel, payload FROM deliveries ORDER BY channel") == [
        ("a", None), ("b", None), ("c", "sent")
    ]  # fmt: skip
    store = SQLiteStore(path)
    await store.open()
    try:
        retry = NewEvent(
            1, "X", "r", 1703589922000, body, "{}", dedup_key("X", 1, body.encode(), 1703589922000)
        )
        assert (await store.record(retry, [NewDelivery("a", "p")], now + 1, 600)).duplicate
    finally:
        await store.close()


async def test_rooms_stored_before_version_11_name_their_app(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A delivery's room is its room within its app since (store.room_key). A thread takes the
    # app of the message that started it (delivered when it started), though the other app's
    # messages replied in it since; else its room's latest delivery to its channel. One that
    # none is left for is forgotten.
    path = tmp_path / "old.db"
    with contextlib.closing(old_database(path, 10)) as conn:
        conn.executemany(
            "INSERT INTO events VALUES (?, 0, ?, 'X', ?, NULL, '{}', '{}')", ROOMS_OF_TWO_APPS
        )
        conn.executemany(
            "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, room_id, delivered_at) VALUES (?, ?, ?, 0, 0, 0, ?, ?)",
            DELIVERIES_OF_TWO_APPS,
        )
        conn.executemany("INSERT INTO threads VALUES (?, ?, ?, ?)", THREADS_OF_TWO_APPS)
        with caplog.at_level(logging.INFO, "bridge.store.schema"):
            migrate(conn)
    assert caplog.messages == ["store schema 10 is older: migrating it to 11"]
    assert db_rows(path, "SELECT channel, room_id FROM deliveries ORDER BY id") == ROOM_KEYS
    assert db_rows(path, "SELECT channel, room_id, ts FROM threads ORDER BY ts") == [
        ("bot", "7:r", "1.1"), ("hook", "8:r", "1.2")
    ]  # fmt: skip
    store = SQLiteStore(path)
    await store.open()
    try:  # the rooms are shown as Tencent named them
        rows = await store.list_deliveries(False, None, 10)
        assert [(r.channel, r.room_id) for r in rows] == [
            ("hook", "r"),
            ("bot", "r"),
            ("bot", None),
        ]
        assert await store.get_thread("bot", room_key(7, "r"), 0) == "1.1"
    finally:
        await store.close()


async def test_ids_deleted_before_version_6_are_not_handed_out_again(tmp_path: Path) -> None:
    # Of the rows deleted before the upgrade, only the event ids that dedup keys name are known.
    path = tmp_path / "old.db"
    old = time.time() - 100 * 3600
    with contextlib.closing(old_database(path, 5)) as conn:
        for event_id in (1, 2):
            conn.execute(
                "INSERT INTO events VALUES (?, ?, 1, 'x', 'r1', NULL, '{}', '{}')", (event_id, old)
            )
        conn.execute(
            "INSERT INTO deliveries (id, event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, delivered_at) VALUES (1, 1, 'a', 'delivered', 0, ?, ?, ?),"
            " (2, 2, 'a', 'dead', 0, ?, ?, NULL)",
            (old, old, old, old, old),
        )
        conn.execute("INSERT INTO dedup VALUES ('k9', ?, 9)", (time.time(),))  # event 9 pruned
    s = SQLiteStore(path)
    await s.open()
    try:
        assert await s.drop([2], time.time()) == [2]
        assert await s.prune(time.time() - 72 * 3600, old - 1, old - 1) == 3  # a delivery, 2 events
        recorded = await s.record(new_event("k"), [NewDelivery("a", "p")], time.time(), 600)
        (claimed,) = await s.claim("a", time.time(), 10, 30)
    finally:
        await s.close()
    assert (recorded.event_id, claimed.id) == (10, 3)


def add_old_delivered(path: Path, count: int, at: float) -> None:
    """`count` events of time `at`, each with a delivery delivered then and a dedup key."""
    with contextlib.closing(connect(path)) as conn:
        migrate(conn)
        conn.execute("BEGIN")
        ids = range(1, count + 1)
        events = "INSERT INTO events VALUES (?, ?, 1, 'x', 'r1', NULL, '{}', '{}')"
        conn.executemany(events, ((i, at) for i in ids))
        conn.executemany(
            "INSERT INTO deliveries (id, event_id, channel, state, next_attempt_at, created_at,"
            " updated_at, delivered_at) VALUES (?, ?, 'a', 'delivered', 0, ?, ?, ?)",
            ((i, i, at, at, at) for i in ids),
        )
        conn.executemany("INSERT INTO dedup VALUES (?, ?, ?)", ((f"k{i}", at, i) for i in ids))
        conn.execute("COMMIT")


async def test_a_large_prune_lets_callbacks_commit_meanwhile(tmp_path: Path) -> None:
    # Rows older than the retention pile up while the server is down, or when the retention is
    # shortened. Deleted in one transaction, 300,000 of them held the writer, and with it every
    # acknowledgement, for 5 s (Tencent gives up after 2 s); a steady 300 callbacks/s held it
    # 0.3 s at every minute's prune.
    count = 20_000
    path = tmp_path / "bridge.db"
    old = time.time() - 100 * 3600
    add_old_delivered(path, count, old)
    store = SQLiteStore(path)
    await store.open()
    try:
        now = time.time()
        pruning = asyncio.ensure_future(store.prune(now - 72 * 3600, now - 72 * 3600, now))
        await asyncio.sleep(0)  # the prune has begun
        await store.record(new_event("new"), [NewDelivery("a", "p")], time.time(), 600)
        assert not pruning.done()  # the callback did not wait for the whole prune
        assert await pruning == 3 * count
    finally:
        await store.close()
    assert db_rows(path, "SELECT COUNT(*) FROM events") == [(1,)]
    assert db_rows(path, "SELECT COUNT(*) FROM dedup") == [(1,)]


Operation = Callable[[SQLiteStore, float], Awaitable[int]]


BACKING_OFF = "state = 'pending', attempts = 2, next_attempt_at = 1e12"


@pytest.mark.parametrize(
    ("setting", "operation", "after"),
    [
        ("state = 'dead'", lambda store, now: store.retry_dead(None, now), "pending"),
        ("state = 'dead'", lambda store, now: store.retry_dead("a", now), "pending"),
        (
            "state = 'pending'",
            lambda store, now: store.bury_unknown_channels(["b"], now, "x"),
            "dead",
        ),
        (BACKING_OFF, lambda store, now: store.resume("a", now), "pending"),
        (
            "state = 'pending', payload = 'p'",
            lambda store, now: store.forget_payloads(["a"]),
            "pending",
        ),
    ],
    ids=[
        "retry every channel",
        "retry a channel",
        "bury a removed channel",
        "resume a channel",
        "forget a retyped channel's messages",
    ],
)
async def test_a_change_to_a_whole_channel_lets_callbacks_commit_meanwhile(
    tmp_path: Path, setting: str, operation: Operation, after: str
) -> None:
    # A channel broken for days (a revoked token) holds its dead letters, or its backlog, by
    # the hundred thousand: retried in one transaction, 100,000 held every acknowledgement for
    # 0.6 s; buried in one (the channel removed at a reload), the same.
    count = 3 * BATCH
    path = tmp_path / "bridge.db"
    add_old_delivered(path, count, time.time())
    with contextlib.closing(connect(path)) as conn, conn:
        conn.execute(f"UPDATE deliveries SET {setting}, order_ts = id % 7")  # noqa: S608
    store = SQLiteStore(path)
    await store.open()
    changed: list[int] = []  # rows a transaction
    execute = store._execute

    async def counted(sql: str, params: Any = ()) -> int:
        changed.append(await execute(sql, params))
        return changed[-1]

    store._execute = counted  # type: ignore[method-assign]
    try:
        changing = asyncio.ensure_future(operation(store, time.time()))
        await asyncio.sleep(0)  # it has begun
        await store.record(new_event("new"), [NewDelivery("b", "p")], time.time(), 600)
        assert not changing.done()  # the callback did not wait for the whole change
        assert await changing == count
        assert changed == [BATCH, BATCH, BATCH, 0]
        assert await operation(store, time.time()) == 0
    finally:
        await store.close()
    assert db_rows(path, "SELECT channel, state, COUNT(*) FROM deliveries GROUP BY 1, 2") == [
        ("a", after, count), ("b", "pending", 1)
    ]  # fmt: skip


async def test_dead_letters_are_retried_oldest_first_a_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So that a room's earlier message is pending no later than its next: a lane claiming
    # between two batches sends nothing of the room ahead of what is still dead before it.
    monkeypatch.setattr("bridge.store.sqlite_outbox.BATCH", 2)
    path = tmp_path / "bridge.db"
    add_old_delivered(path, 6, time.time())
    with contextlib.closing(connect(path)) as conn, conn:
        conn.execute("UPDATE deliveries SET state = 'dead', order_ts = 100 - id")  # 6 oldest
    store = SQLiteStore(path)
    await store.open()
    pending_after: list[list[int]] = []  # each batch's transaction
    execute = store._execute

    async def seen(sql: str, params: Any = ()) -> int:
        changed = await execute(sql, params)
        rows = db_rows(path, "SELECT id FROM deliveries WHERE state = 'pending' ORDER BY id")
        pending_after.append([row[0] for row in rows])
        return changed

    store._execute = seen  # type: ignore[method-assign]
    try:
        assert await store.retry_dead("a", time.time()) == 6
    finally:
        await store.close()
    assert pending_after == [[5, 6], [3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("operation", ["retry", "drop"])
async def test_many_ids_go_in_batches_callbacks_committing_meanwhile(
    tmp_path: Path, operation: str
) -> None:
    # `outbox retry` of 100,000 ids in one transaction held every acknowledgement for 3.7 s.
    count = 3 * BATCH
    path = tmp_path / "bridge.db"
    add_old_delivered(path, count, time.time())
    with contextlib.closing(connect(path)) as conn, conn:
        conn.execute("UPDATE deliveries SET state = 'dead'")
    store = SQLiteStore(path)
    await store.open()
    batches: list[int] = []
    submit = store._submit

    async def counted(op: Any, urgent: bool = False) -> Any:
        result = await submit(op, urgent)
        if isinstance(result, list):
            batches.append(len(result))
        return result

    store._submit = counted  # type: ignore[method-assign]
    try:
        ids = [row[0] for row in db_rows(path, "SELECT id FROM deliveries")]
        acting = asyncio.ensure_future(getattr(store, operation)(ids, time.time()))
        await asyncio.sleep(0)  # it has begun
        await store.record(new_event("new"), [NewDelivery("b", "p")], time.time(), 600)
        assert not acting.done()  # the callback did not wait for every id
        assert sorted(await acting) == sorted(ids)
        assert batches == [BATCH, BATCH, BATCH]
    finally:
        await store.close()


async def test_a_prune_does_not_read_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Events within the retention are most of the file (72 h of callbacks by default), and each
    # minute's prune read them all, holding the writer and every acknowledgement meanwhile: 0.2 s
    # a million events from the page cache, seconds after a few days at 100 callbacks a second.
    statements: list[str] = []

    def traced(path: Path, sync: Sync = "full") -> sqlite3.Connection:
        conn = connect(path, sync)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr("bridge.store.sqlite_file.connect", traced)
    path = tmp_path / "bridge.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await add(store, "k")
        statements.clear()
        now = time.time()
        await store.prune(now - 72 * 3600, now - 72 * 3600, now - 72 * 3600)
    finally:
        await store.close()
    reading = [sql for sql in statements if sql.lstrip().startswith(("SELECT", "DELETE"))]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plans = [[row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in reading]
    walks = [plan for plan in plans if any(" events" in step for step in plan)]
    assert walks, plans
    assert not any(step.startswith("SCAN events") for plan in walks for step in plan), walks


async def test_a_prune_walks_past_the_events_of_dead_letters(tmp_path: Path) -> None:
    # More events kept for their dead letters than a batch, all received at one time, before
    # events whose deliveries went: the walk goes on past them, and ends.
    path = tmp_path / "bridge.db"
    old = time.time() - 100 * 3600
    kept = 2 * BATCH + 1
    add_old_delivered(path, kept + 10, old)
    with contextlib.closing(connect(path)) as conn:
        conn.execute("UPDATE deliveries SET state = 'dead' WHERE id <= ?", (kept,))
    store = SQLiteStore(path)
    await store.open()
    try:
        now = time.time()
        assert await store.prune(now - 72 * 3600, old - 1, old - 1) == 10 + 10  # deliveries, events
    finally:
        await store.close()
    assert db_rows(path, "SELECT COUNT(*), MAX(id) FROM events") == [(kept, kept)]


def wal_size(db: Path) -> int:
    return Path(f"{db}-wal").stat().st_size


async def test_the_wal_shrinks_back_after_a_large_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large transaction (an upgrade's migration; retrying dead letters, or forgetting a
    # retyped channel's messages, was one until they went in batches) grows the WAL file to its
    # size, and SQLite reuses the file from its start without giving the space back: 50,000
    # dead letters retried left 11 MB until the server stopped.
    monkeypatch.setattr("bridge.store.sqlite_connect.WAL_LIMIT_BYTES", 1 << 20)
    path = tmp_path / "bridge.db"
    add_old_delivered(path, 40_000, time.time())
    with contextlib.closing(connect(path)) as conn:
        conn.execute("UPDATE deliveries SET state = 'pending', payload = ?", ("x" * 200,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store._execute("UPDATE deliveries SET payload = NULL") == 40_000
        grown = wal_size(path)
        for n in range(3):  # the first commit checkpoints, the next starts the WAL again
            await add(store, f"k{n}")
        assert grown > 4 << 20  # past a checkpoint's 1,000 pages
        assert wal_size(path) <= 1 << 20
    finally:
        await store.close()


class LateConnection(sqlite3.Connection):
    """Runs `meanwhile` just before its first BEGIN IMMEDIATE: another process migrating the
    file after this one read the schema version and before it took the write lock."""

    meanwhile: Callable[[], None] | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE" and (meanwhile := self.meanwhile) is not None:
            self.meanwhile = None
            meanwhile()
        return super().execute(sql, parameters)


@pytest.mark.parametrize("version", [0, 1, 4])
async def test_processes_opening_an_old_database_at_once_migrate_it_once(
    tmp_path: Path, version: int
) -> None:
    # Applied twice, a migration fails (a table or a column already there) or, from version 4,
    # re-keys dedup a second time, and retries of events stored before are no longer found.
    path = tmp_path / "old.db"
    with contextlib.closing(old_database(path, version)) as conn:
        now = time.time()
        if version:
            add_keyed_before(conn, now)
    with (
        contextlib.closing(connect(path)) as first,
        contextlib.closing(
            sqlite3.connect(path, isolation_level=None, factory=LateConnection)
        ) as second,
    ):
        identities: list[str] = []
        second.meanwhile = lambda: identities.append(migrate(first))
        identities.append(migrate(second))
    assert db_rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    assert len(identities) == 2 and len(set(identities)) == 1  # one identity: one webhook-id
    if version:
        await assert_file_finds_retries(path, now + 1)
