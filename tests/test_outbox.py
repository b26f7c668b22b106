from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.store import DeliveryRow, NewDelivery, NewEvent, State
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore
from tests.conftest import PostgresSQL

TEMPLATES = Path(__file__).parent.parent / "templates"
AGE_S = 125.0  # the oldest pending delivery was recorded this long ago
MANY = 10_000  # delivery IDs given to one command
MISSED = "not found, or delivered or in flight"

CONFIG = f"""
[tencent]
sdk_app_id = 1400000000
[store]
path = "bridge.db"
[templates]
dir = "{TEMPLATES}"
[channels.console]
type = "console"
[channels.hook]
type = "webhook"
url = "http://127.0.0.1:9/x"
[channels.quiet]
type = "console"
[[routes]]
name = "all"
channels = ["console", "hook"]
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "outbox", *args], capture_output=True, text=True,
        timeout=30, env={**clean, **(env or {})},
    )  # fmt: skip


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    return config


def populate(tmp_path: Path) -> dict[str, int]:
    """hook: B pending, C in flight, A dead (HTTP 404); console: A dead (render), B delivered."""

    async def go() -> dict[str, int]:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        try:
            now = time.time() - AGE_S
            for key, app, room, event_time in (
                ("a", 1400000000, "room-a", 1000), ("b", 1400000001, "b\nfake", 2000)
            ):  # fmt: skip
                event = NewEvent(app, "Live.CallbackAfterCreateRoom", room, event_time, "{}",
                                 "{}", key)  # fmt: skip
                deliveries = [NewDelivery("hook", "payload")]
                deliveries.append(
                    NewDelivery("console", None, error="render failed: x")
                    if key == "a"
                    else NewDelivery("console", "text")
                )
                await store.record(event, deliveries, now, 0)
            event = NewEvent(1400000000, "Live.CallbackAfterDestroyRoom", "room-c", 500, "{}",
                             "{}", "c")  # fmt: skip
            await store.record(event, [NewDelivery("hook", "payload")], now, 0)
            in_flight, hook_dead = await store.claim("hook", now + 1, 2, 3600)
            await store.mark_dead(hook_dead.id, now + 2, "HTTP 404: " + "x" * 100)
            (delivered,) = await store.claim("console", now + 1, 10, 3600)
            await store.mark_delivered(delivered.id, now + 2)
            listed = await store.list_deliveries(False, None, 9)
            rows = {(r.channel, r.room_id): r.id for r in listed}
        finally:
            await store.close()
        assert (hook_dead.room_key, in_flight.room_key) == (
            "1400000000:room-a",
            "1400000000:room-c",
        )
        return {
            "hook_dead": hook_dead.id, "hook_in_flight": in_flight.id,
            "hook_pending": rows[("hook", "b\nfake")], "console_dead": rows[("console", "room-a")],
            "console_delivered": delivered.id,
        }  # fmt: skip

    return asyncio.run(go())


def deliveries(tmp_path: Path) -> dict[int, DeliveryRow]:
    async def go() -> dict[int, DeliveryRow]:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        try:
            return {r.id: r for r in await store.list_deliveries(False, None, 100)}
        finally:
            await store.close()

    return asyncio.run(go())


def test_stats_table_and_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    populate(tmp_path)
    table = run("stats", "--config", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "CHANNEL", "PENDING", "IN FLIGHT", "DEAD", "DELIVERED", "OLDEST PENDING",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["console"] == ["0", "0", "1", "1", "-"]
    assert rows["quiet"] == ["0", "0", "0", "0", "-"]  # configured, nothing recorded yet
    assert rows["hook"][:4] == ["1", "1", "1", "0"] and re.fullmatch(r"2m0\ds", rows["hook"][4])
    assert rows["TOTAL"][:4] == ["1", "1", "2", "1"] and rows["TOTAL"][4] == rows["hook"][4]
    column = lines[0].index("PENDING")
    assert all(line[column - 1] == " " and line[column] != " " for line in lines)

    as_json = run("--config", str(config), "--json", "stats")  # options before the subcommand
    assert as_json.returncode == 0, as_json.stderr
    stats = {s.pop("channel"): s for s in json.loads(as_json.stdout)}
    assert stats["console"] == {
        "pending": 0, "in_flight": 0, "dead": 1, "delivered": 1, "oldest_pending_age_s": None,
    }  # fmt: skip
    assert stats["quiet"]["oldest_pending_age_s"] is None and stats["quiet"]["dead"] == 0
    hook = stats["hook"]
    assert (hook["pending"], hook["in_flight"], hook["dead"]) == (1, 1, 1)
    assert AGE_S <= hook["oldest_pending_age_s"] < AGE_S + 15


@pytest.mark.parametrize(("channels", "total"), [(1, False), (2, True)])
def test_stats_adds_a_total_row_for_two_channels_or_more(
    tmp_path: Path, channels: int, total: bool
) -> None:
    text = CONFIG.replace('[channels.quiet]\ntype = "console"\n', "")  # console and hook
    if channels == 1:
        text = text.replace('channels = ["console", "hook"]', 'channels = ["console"]')
        text = text.replace('[channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/x"\n', "")
    config = tmp_path / "config.toml"
    config.write_text(text)

    async def served_before() -> None:  # a store with no deliveries yet
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        await store.close()

    asyncio.run(served_before())
    lines = run("stats", "--config", str(config)).stdout.splitlines()
    assert len(lines) == 1 + channels + total
    assert lines[-1].startswith("TOTAL") == total


def test_list_filters_table_and_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ids = populate(tmp_path)
    every = json.loads(run("list", "--config", str(config), "--json").stdout)
    assert [d["id"] for d in every] == sorted(set(ids.values()) - {ids["console_delivered"]})[::-1]
    dead = {d["id"]: d for d in every if d["state"] == "dead"}
    assert dead[ids["hook_dead"]]["last_error"] == "HTTP 404: " + "x" * 100  # whole in JSON
    assert dead[ids["hook_dead"]]["attempts"] == 1 and dead[ids["hook_dead"]]["room_id"] == "room-a"
    pending = next(d for d in every if d["state"] == "pending")
    assert pending["room_id"] == "b\nfake" and pending["next_attempt_at"].endswith("Z")
    assert (pending["sdk_app_id"], dead[ids["hook_dead"]]["sdk_app_id"]) == (1400000001, 1400000000)
    assert all(d["next_attempt_at"] is None for d in every if d["state"] != "pending")

    table = run("list", "--dead", "--channel", "hook", "--config", str(config))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["ID", "CHANNEL", "APP", "ROOM", "COMMAND"]
    assert row.split()[:7] == [str(ids["hook_dead"]), "hook", "1400000000", "room-a",
                               "Live.CallbackAfterCreateRoom", "dead", "1"]  # fmt: skip
    assert "HTTP 404: " + "x" * 49 + "…" in row and "x" * 51 not in row
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ +\S+Z +-$", row)  # dead: no next attempt

    newest = run("list", "--limit", "2", "--config", str(config))
    lines = newest.stdout.splitlines()
    assert len(lines) == 3  # the room's newline is shown escaped, not started anew
    assert lines[2].startswith(str(ids["hook_pending"])) and "b\\nfake" in lines[2]
    assert run("list", "--dead", "--channel", "quiet", "--config", str(config)).stdout == (
        "no deliveries\n"
    )


def test_list_cuts_a_long_room_and_command_in_the_table(tmp_path: Path) -> None:
    # A callback's 100 KB room padded every row of the table to its width: 11 MB for 116 rows.
    async def record() -> None:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        try:
            for room, command in (("r" * 100_000, "Live." + "C" * 5000), ("short", "Live.X")):
                event = NewEvent(1400000000, command, room, None, "{}", "{}", room)
                await store.record(event, [NewDelivery("hook", "payload")], time.time(), 0)
        finally:
            await store.close()

    asyncio.run(record())
    config = write_config(tmp_path)
    header, short, long = run("list", "--config", str(config)).stdout.splitlines()  # newest first
    assert max(len(header), len(long), len(short)) < 300
    assert "r" * 49 + "…" in long and "Live." + "C" * 44 + "…" in long and "r" * 50 not in long
    assert short.split()[3:5] == ["short", "Live.X"]
    whole = json.loads(run("list", "--config", str(config), "--json").stdout)
    assert {(d["room_id"], d["command"]) for d in whole} == {
        ("r" * 100_000, "Live." + "C" * 5000), ("short", "Live.X"),
    }  # fmt: skip


@pytest.mark.parametrize("wait", [1e14, float("inf")])  # past year 9999; 400 nines
def test_list_shows_a_retry_no_date_can_hold(tmp_path: Path, wait: float) -> None:
    # Before Retry-After was capped at an hour, a far end's could set the next attempt past any
    # date; such rows may still be in a store.
    config = write_config(tmp_path)

    async def go() -> None:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        try:
            now = time.time()
            await store.record(NewEvent(1400000000, "Live.X", "r", 1, "{}", "{}", "k"),
                               [NewDelivery("hook", "p")], now, 0)  # fmt: skip
            (claimed,) = await store.claim("hook", now, 1, 30)
            await store.mark_retry(claimed.id, now, now + wait, "HTTP 503", count=True)
        finally:
            await store.close()

    asyncio.run(go())
    table = run("list", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].endswith("Z  never"), table.stdout
    as_json = run("list", "--json", "--config", str(config))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[0]["next_attempt_at"] == "never"


def test_retry_by_id_and_dead_by_channel(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ids = populate(tmp_path)
    one = run("retry", str(ids["hook_dead"]), "--config", str(config))
    assert (one.returncode, one.stdout) == (0, "1 delivery back to pending\n"), one.stderr
    row = deliveries(tmp_path)[ids["hook_dead"]]
    assert (row.state, row.attempts) == (State.PENDING, 0)
    assert row.next_attempt_at <= time.time()

    by_channel = run("retry", "--dead", "--channel", "console", "--json", "--config", str(config))
    assert (by_channel.returncode, json.loads(by_channel.stdout)) == (0, {"retried": 1})
    after = deliveries(tmp_path)
    assert after[ids["console_dead"]].state == State.PENDING
    assert not [r for r in after.values() if r.state == State.DEAD]

    missing = run("retry", "999", str(ids["hook_in_flight"]), "--json", "--config", str(config))
    assert (missing.returncode, json.loads(missing.stdout)) == (1, {"retried": 0})
    assert "delivery 999: not found" in missing.stderr
    assert f"delivery {ids['hook_in_flight']}: " in missing.stderr


def test_retry_dead_leaves_a_channel_the_config_no_longer_has(tmp_path: Path) -> None:
    # Back to pending with no lane to send them, they aged there until a restart buried them
    # again, and the command had said "back to pending".
    ids = populate(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(
        CONFIG.replace(
            '[channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/x"\n', ""
        ).replace('channels = ["console", "hook"]', 'channels = ["console"]')
    )
    every = run("retry", "--dead", "--config", str(config))
    assert (every.returncode, every.stdout) == (0, "1 delivery back to pending\n"), every.stderr
    assert "channel 'hook' is not in the config: its 1 dead letters stay dead" in every.stderr
    after = deliveries(tmp_path)
    assert after[ids["console_dead"]].state == State.PENDING
    assert after[ids["hook_dead"]].state == State.DEAD
    named = run("retry", "--dead", "--channel", "hook", "--config", str(config))
    assert named.returncode == 1 and named.stdout == ""
    assert "no channel 'hook' in" in named.stderr and "they stay dead" in named.stderr
    assert deliveries(tmp_path)[ids["hook_dead"]].state == State.DEAD
    # By id too: pending again, it waited with nothing to send it, counted on /metrics.
    wanted = [str(ids["hook_dead"]), str(ids["console_dead"])]
    by_id = run("retry", *wanted, "--config", str(config))
    assert (by_id.returncode, by_id.stdout) == (1, "1 delivery back to pending\n"), by_id.stderr
    said = f"delivery {ids['hook_dead']}: channel 'hook' is not in the config: nothing would send"
    assert said in by_id.stderr
    assert deliveries(tmp_path)[ids["hook_dead"]].state == State.DEAD


def test_retry_takes_ids_or_dead(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for args, told in [
        ([], "give delivery IDs, or --dead\n"), (["1", "--dead"], "or --dead, not both\n"),
        (["1", "--channel", "hook"], "--channel goes with --dead\n"),
    ]:  # fmt: skip
        result = run("retry", *args, "--config", str(config))
        assert result.returncode == 2 and "usage:" in result.stderr
        assert result.stderr.endswith(told)


@pytest.mark.parametrize(
    "args", [["list", "--limit", "0"], ["drop", "0"], ["retry", str(2**63)], ["drop", "x"]]
)
def test_ids_and_limits_are_positive_whole_numbers(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, "--config", str(write_config(tmp_path)))
    assert result.returncode == 2 and "not a positive whole number" in result.stderr


def test_drop_names_what_it_could_not_drop(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ids = populate(tmp_path)
    drop = ids["console_dead"], ids["hook_in_flight"], 999, ids["console_dead"]
    result = run("drop", *map(str, drop), "--config", str(config))
    assert (result.returncode, result.stdout) == (1, "1 delivery dropped\n")
    assert "delivery 999: not found" in result.stderr
    in_flight = ids["hook_in_flight"]
    assert f"delivery {in_flight}: not found, or delivered or in flight" in result.stderr
    assert f"delivery {ids['console_dead']}:" not in result.stderr  # repeated, not missed
    left = deliveries(tmp_path)
    assert ids["console_dead"] not in left and left[ids["hook_in_flight"]].state == State.IN_FLIGHT


def test_works_while_the_server_holds_the_store(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ids = populate(tmp_path)

    async def go() -> subprocess.CompletedProcess[str]:
        server = SQLiteStore(tmp_path / "bridge.db", exclusive=True)
        await server.open()
        try:
            return await asyncio.to_thread(run, "drop", str(ids["hook_dead"]), "--json",
                                           env={"LIVE_BRIDGE_CONFIG": str(config)})  # fmt: skip
        finally:
            await server.close()

    result = asyncio.run(go())
    assert (result.returncode, json.loads(result.stdout)) == (0, {"dropped": 1}), result.stderr


def test_a_write_behind_a_stopped_writer_fails_after_10_s_and_says_why(tmp_path: Path) -> None:
    # Another outbox command stopped with Ctrl-Z while it held the write lock: the next one
    # waited without a word for as long as it stayed stopped.
    config = write_config(tmp_path)
    ids = populate(tmp_path)
    fd = os.open(tmp_path / "bridge.db.write-lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the stopped command holds it
        started = time.monotonic()
        held = run("drop", str(ids["hook_dead"]), "--config", str(config))
        assert 10 <= time.monotonic() - started < 25
    finally:
        os.close(fd)
    assert held.returncode == 1
    assert "the write lock held by another process for over 10 s" in held.stderr
    dropped = run("drop", str(ids["hook_dead"]), "--config", str(config), "--json")
    assert (dropped.returncode, json.loads(dropped.stdout)) == (0, {"dropped": 1})


@pytest.mark.parametrize(
    ("name", "said"),
    [("x" * 300 + ".db", "cannot be read: File name too long"), ("a-folder", "a folder")],
)
def test_a_store_path_that_cannot_be_a_database_is_said_so(
    tmp_path: Path, name: str, said: str
) -> None:
    # A name over 255 bytes ended outbox in a traceback; a folder was "a hard link".
    (tmp_path / "a-folder").mkdir()
    config = write_config(tmp_path)
    config.write_text(CONFIG.replace('path = "bridge.db"', f'path = "{name}"'))
    assert name in config.read_text()
    result = run("stats", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert said in result.stderr


def test_missing_database_exits_1_and_creates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run("stats", "--config", str(config))
    assert result.returncode == 1
    assert f"{tmp_path / 'bridge.db'}: no such database (store.path in {config})" in result.stderr
    assert not (tmp_path / "bridge.db").exists()


@pytest.mark.parametrize(
    "tables",
    [
        [],
        ["CREATE TABLE users (id INTEGER PRIMARY KEY)"],
        ["PRAGMA journal_mode=wal", "CREATE TABLE users (id INTEGER PRIMARY KEY)"],
    ],
)
def test_a_sqlite_file_no_bridge_served_exits_1_and_is_left_as_it_was(
    tmp_path: Path, tables: list[str]
) -> None:
    # An empty file, or another program's database, at store.path: outbox commands made
    # live-bridge's tables in it, and answered "no deliveries".
    config = write_config(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        for statement in tables:
            conn.execute(statement)
    before = (tmp_path / "bridge.db").read_bytes()
    for command in ("stats", "list", "retry --dead", "drop 1"):
        result = run(*command.split(), "--config", str(config))
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr.endswith("no live-bridge tables: no live-bridge has served here\n")
    assert (tmp_path / "bridge.db").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.db", "config.toml"]


def test_database_no_bridge_served_exits_1_and_creates_nothing(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    # As a SQLite path to no file: a URL naming another application's database, say.
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.replace('path = "bridge.db"', f'url = "{postgres_url}"'))
    for command in ("stats", "list", "retry --dead", "drop 1"):
        result = run(*command.split(), "--config", str(config))
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr.endswith("no live-bridge tables: no live-bridge has served here\n")
    assert postgres_sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    asyncio.run(migrated(postgres_url))  # as a server's start does
    assert run("stats", "--config", str(config)).returncode == 0


def test_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('type = "webhook"', 'type = "webhook"\nextra = 1'))
    result = run("list", "--config", str(bad))
    assert result.returncode == 2
    assert "[channels.hook] extra: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "key", "left"), [("retry", "retried", [("pending", MANY)]), ("drop", "dropped", [])]
)
def test_many_ids_on_postgresql_act_in_one_go(
    tmp_path: Path, postgres_sql: PostgresSQL, postgres_url: str, command: str, key: str,
    left: list[tuple[str, int]],
) -> None:  # fmt: skip
    # IDs from `list --json`, say: one operation per ID took a pooled connection each, and
    # thousands waited past the pool's timeout: the command failed partway, a traceback per ID.
    config = tmp_path / "config.toml"
    store = f'url = "{postgres_url}"\npool_size = 1'
    config.write_text(CONFIG.replace('path = "bridge.db"', store))
    asyncio.run(migrated(postgres_url))
    postgres_sql("INSERT INTO events VALUES (1, 0, 1400000000, 'Live.X', 'r', 1, '{}', '{}')")
    postgres_sql(
        "INSERT INTO deliveries (event_id, channel, state, next_attempt_at, created_at,"
        " updated_at, order_ts) SELECT 1, 'hook', 'dead', 0, 0, 0, 1 FROM generate_series(1, %s)",
        MANY,
    )
    ids = [str(row[0]) for row in postgres_sql("SELECT id FROM deliveries")]
    result = run(command, *ids, "999999999", "--json", "--config", str(config))
    expected = json.dumps({key: MANY}, indent=2) + "\n"
    assert (result.returncode, result.stdout) == (1, expected), result.stderr[-2000:]
    assert result.stderr == f"live-bridge: delivery 999999999: {MISSED}\n"
    assert postgres_sql("SELECT state, count(*) FROM deliveries GROUP BY state") == left


async def migrated(url: str) -> None:
    store = PostgresStore(url)
    await store.open()
    await store.close()
