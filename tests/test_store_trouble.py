"""Store trouble: the database on a full or read-only filesystem. Callbacks are answered 503 with a
FAIL packet (Tencent sends them again), the process stays up and idle, /readyz says 503, and it
all recovers when the space or the write access comes back; nothing acknowledged is lost.

The filesystems are real and need root. A full one is a small tmpfs filled with a filler file.
SQLite's -wal and -shm files live next to the database, on the same filesystem: the WAL keeps its
size after a checkpoint and is written over from the start, so a full filesystem may take a few
more commits (callbacks are posted until the first 503), and SQLite writes every page of the -shm
when it maps it, so a full tmpfs shows up as an error, not as a SIGBUS.

Linux refuses `mount -o remount,ro` while a process holds a file open for writing (EBUSY), as a
running bridge does, so a filesystem turns read-only under a running bridge only when the kernel
does it after an error: ext4 mounted with errors=remount-ro, set off through
/sys/fs/ext4/<device>/trigger_fs_error. Such a filesystem comes back only through umount, fsck and
mount, so the bridge is restarted for that. A tmpfs remounted read-only while the bridge is
stopped is the read-only case at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.bridge_server import (
    OK_PACKET,
    SEED_BODY,
    Subprocess,
    children,
    cpu_seconds,
    delivery_states,
    free_port,
    get,
    gone,
    post_callback,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn

FAIL_503 = {"ActionStatus": "FAIL", "ErrorInfo": "store unavailable", "ErrorCode": 503}


def owner_change(room: str) -> bytes:
    return SEED_BODY.replace(b'"room_id"', json.dumps(room).encode())


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def unmount(directory: Path) -> None:
    if run("umount", str(directory)).returncode != 0:
        run("umount", "-l", str(directory))


def mount(*command: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting a filesystem needs root: running as uid {os.geteuid()}")
    done = run("mount", *command)
    if done.returncode != 0:
        pytest.skip(f"mounting a filesystem needs root (and loop devices for ext4): "
                    f"`mount {' '.join(command)}` says {done.stderr.strip()}")  # fmt: skip


class Trouble(Protocol):
    """A filesystem for the store that can go wrong under the bridge and be put right."""

    def mounted(self, directory: Path) -> contextlib.AbstractContextManager[None]: ...
    def begin(self) -> None: ...
    def end(self, bridge: Subprocess) -> None: ...


class DiskFull:
    """A small tmpfs, filled to the last byte by a filler file; deleting it brings space back."""

    def __init__(self) -> None:
        self.filler: Path | None = None

    @contextlib.contextmanager
    def mounted(self, directory: Path) -> Iterator[None]:
        self.directory = directory
        mount("-t", "tmpfs", "-o", "size=8192k", "tmpfs", str(directory))
        try:
            yield
        finally:
            unmount(directory)

    def begin(self) -> None:
        self.filler = fill(self.directory)

    def end(self, bridge: Subprocess) -> None:
        assert self.filler is not None
        self.filler.unlink()


class TurnsReadOnly:
    """ext4 on a loop device; the kernel turns it read-only on an error, as it would on a disk
    that fails. It comes back after umount, e2fsck and mount, with the bridge restarted."""

    @contextlib.contextmanager
    def mounted(self, directory: Path) -> Iterator[None]:
        if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
            pytest.skip("an ext4 filesystem needs mkfs.ext4 and e2fsck (e2fsprogs)")
        self.directory = directory
        self.image = directory.parent / "ext4.img"
        with self.image.open("wb") as image:
            image.truncate(16 << 20)
        made = run("mkfs.ext4", "-q", "-F", str(self.image))
        assert made.returncode == 0, made.stderr
        self._mount()
        try:
            yield
        finally:
            unmount(directory)

    def _mount(self) -> None:
        mount("-o", "loop,errors=remount-ro", str(self.image), str(self.directory))

    def begin(self) -> None:
        device = next(
            line.split()[0]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(self.directory)
        )
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger}")
        trigger.write_text("1")

    def end(self, bridge: Subprocess) -> None:
        assert bridge.process is not None
        delivering = children(bridge.process.pid)
        bridge.kill()
        # The delivery process (own_process) ends by itself; then nothing holds the filesystem.
        assert wait_until(lambda: all(gone(pid) for pid in delivering))
        unmount(self.directory)
        checked = run("e2fsck", "-fy", str(self.image))
        assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: fixed
        self._mount()
        bridge.start()


TROUBLES: dict[str, Callable[[], Trouble]] = {"full": DiskFull, "read-only": TurnsReadOnly}


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem has not one byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    with pytest.raises(OSError) as caught:
        (directory / "probe").write_bytes(b"x")
    assert caught.value.errno == errno.ENOSPC
    return filler


def store_config(
    tmp_path: Path, store: Path, slack: SlackStandIn, own_process: bool = False
) -> tuple[Path, int]:
    port = free_port()
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    delivery = "initial_backoff_s = 0.1\nmax_backoff_s = 0.5\nmax_attempts = 1000\n"
    delivery += f"own_process = {str(own_process).lower()}\n"
    config = write_config(tmp_path, port, channels=channels, routes=routes, delivery=delivery)
    text = config.read_text()
    assert 'path = "bridge.db"' in text
    config.write_text(text.replace('path = "bridge.db"', f'path = "{store / "bridge.db"}"'))
    return config, port


def rooms_received(slack: SlackStandIn, since: float = 0.0) -> set[str]:
    return {
        json.loads(r.body)["event"]["RoomId"] for r in slack.sink_requests if r.received_at > since
    }


def post_all(bridge: Subprocess, rooms: list[str]) -> None:
    for room in rooms:
        assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET), room


def assert_all_delivered(
    slack: SlackStandIn, db: Path, rooms: set[str], since: float = 0.0
) -> None:
    """Every room reached the sink after `since` (when it answers 200), and the store agrees."""
    arrived = slack.wait_for(lambda s: rooms_received(s, since) >= rooms, timeout=15)
    assert arrived, f"never delivered: {sorted(rooms - rooms_received(slack, since))}"
    assert wait_until(lambda: set(delivery_states(db)) == {"delivered"}), delivery_states(db)


@contextlib.contextmanager
def bridge_in_trouble(
    kind: str, tmp_path: Path, slack: SlackStandIn, own_process: bool = False
) -> Iterator[tuple[Trouble, Subprocess, Path]]:
    """A bridge whose store lives on a filesystem that `trouble.begin()` breaks."""
    trouble = TROUBLES[kind]()
    store = tmp_path / "store"
    store.mkdir()
    with trouble.mounted(store):
        config, port = store_config(tmp_path, store, slack, own_process)
        with Subprocess(config, port, tmp_path / "bridge.log") as bridge:
            assert bridge.process is not None
            yield trouble, bridge, store


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
@pytest.mark.parametrize("kind", TROUBLES)
def test_callbacks_answer_503_and_the_bridge_recovers(
    kind: str, own_process: bool, tmp_path: Path, slack: SlackStandIn
) -> None:
    with bridge_in_trouble(kind, tmp_path, slack, own_process) as (trouble, bridge, store):
        assert bridge.process is not None
        acknowledged = {f"before-{n}" for n in range(10)}
        post_all(bridge, sorted(acknowledged))
        assert_all_delivered(slack, store / "bridge.db", acknowledged)
        assert {"bridge.db-wal", "bridge.db-shm"} <= {p.name for p in store.iterdir()}

        trouble.begin()
        refused = 0
        for n in range(500):  # the WAL may have room for a few more commits
            room = f"during-{n}"
            status, body = post_callback(bridge.url, owner_change(room))
            if status == 200:
                assert body == OK_PACKET
                assert refused == 0, f"{room} acknowledged after a refusal"
                acknowledged.add(room)
                continue
            assert (status, json.loads(body)) == (503, FAIL_503), (status, body)
            refused += 1
            if refused == 5:
                break
        assert refused == 5
        assert bridge.process.poll() is None
        assert get(bridge.url + "/healthz") == (200, {"status": "ok"})

        trouble.end(bridge)
        assert get(bridge.url + "/readyz") == (200, {"status": "ready"})
        after = [f"after-{n}" for n in range(10)]
        post_all(bridge, after)
        acknowledged.update(after)
        assert_all_delivered(slack, store / "bridge.db", acknowledged)
        assert bridge.process.poll() is None
    log = (tmp_path / "bridge.log").read_text()
    assert log.count("cannot store callbacks") == 1  # the outage, not each callback
    if kind == "full":  # the same process recovers (a read-only disk takes a restart)
        assert "store available again: 5 callbacks were refused with 503" in log


@pytest.mark.parametrize("kind", TROUBLES)
def test_readyz_answers_503_while_the_store_cannot_commit(
    kind: str, tmp_path: Path, slack: SlackStandIn
) -> None:
    with bridge_in_trouble(kind, tmp_path, slack) as (trouble, bridge, _):
        post_all(bridge, ["before"])
        trouble.begin()
        # The store refuses commits: the callback says so, and so must /readyz. Its ping writes
        # one small row, which may still fit, once, where a callback's batch did not (space the
        # WAL already holds): CI's clone met one 200 first. Then every probe says 503.
        status, _ = post_callback(bridge.url, owner_change("during"))
        assert status == 503
        assert wait_until(lambda: get(bridge.url + "/readyz")[0] == 503, 5)
        answers = []
        for _ in range(5):
            answers.append(get(bridge.url + "/readyz"))
            time.sleep(0.1)
        assert {status for status, _ in answers} == {503}, (
            f"/readyz answered {answers} while callbacks get 503"
        )


@pytest.mark.parametrize("kind", TROUBLES)
def test_retries_due_meanwhile_wait_idle_then_go_out(
    kind: str, tmp_path: Path, slack: SlackStandIn
) -> None:
    slack.set_sink_status("sink", 503)  # retries come due while the store is broken
    with bridge_in_trouble(kind, tmp_path, slack) as (trouble, bridge, store):
        assert bridge.process is not None
        db = store / "bridge.db"
        rooms = {f"room-{n}" for n in range(10)}
        post_all(bridge, sorted(rooms))
        assert slack.wait_for(lambda s: rooms_received(s) == rooms)
        trouble.begin()
        cpu_before, wall_before = cpu_seconds(bridge.process.pid), time.monotonic()
        time.sleep(2.5)  # the retries are due within 0.5 s; the worker cannot claim them
        cpu = cpu_seconds(bridge.process.pid) - cpu_before
        wall = time.monotonic() - wall_before
        assert bridge.process.poll() is None

        trouble.end(bridge)
        slack.set_sink_status("sink", 200)
        up_since = time.monotonic()
        post_all(bridge, ["after"])  # as Tencent would; it also wakes a worker backing off
        wanted = {*rooms, "after"}
        delivered = slack.wait_for(
            lambda s: rooms_received(s, up_since) >= wanted, timeout=15
        ) and wait_until(lambda: set(delivery_states(db)) == {"delivered"})
        missing = sorted(wanted - rooms_received(slack, up_since))
        states = dict(delivery_states(db))
    # A worker spinning on the store shows as a whole core; one that gave up, as no deliveries.
    assert cpu / wall < 0.15 and delivered, (
        f"the bridge used {cpu:.2f}s of CPU in {wall:.2f}s of store trouble; after it, "
        f"not delivered: {missing}, deliveries: {states}"
    )


def test_read_only_store_stops_start_up_until_it_is_writable(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    slack.set_sink_status("sink", 503)  # the events stay pending across the restarts
    mount("-t", "tmpfs", "-o", "size=8192k", "tmpfs", str(store))
    try:
        config, port = store_config(tmp_path, store, slack)
        log = tmp_path / "bridge.log"
        rooms = {f"room-{n}" for n in range(5)}
        with Subprocess(config, port, log) as bridge:
            post_all(bridge, sorted(rooms))
            bridge.kill()  # its -wal and -shm stay behind, as after a crash
        remounted = run("mount", "-o", "remount,ro", str(store))
        assert remounted.returncode == 0, remounted.stderr

        refused = subprocess.run(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert f"cannot open store {store / 'bridge.db'}" in refused.stderr, refused.stderr
        assert "Read-only file system" in refused.stderr

        remounted = run("mount", "-o", "remount,rw", str(store))
        assert remounted.returncode == 0, remounted.stderr
        slack.set_sink_status("sink", 200)
        up_since = time.monotonic()
        with Subprocess(config, port, log):
            assert_all_delivered(slack, store / "bridge.db", rooms, up_since)
    finally:
        unmount(store)


def damage(db: Path, table: str) -> None:
    """Writes over the first page of `table`'s B-tree, as a failing disk or a stray write would."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with db.open("r+b") as file:
        file.seek((root[0] - 1) * page_size)
        file.write(b"\xde\xad\xbe\xef" * (page_size // 4))


@pytest.mark.parametrize("table", ["events", "deliveries"])
def test_a_damaged_database_is_not_ready_and_refuses_callbacks_with_503(
    table: str, tmp_path: Path, slack: SlackStandIn
) -> None:
    # A damaged page that a ping's write does not touch (the meta table's is sound): /readyz
    # answered 200 while every callback was refused 503, so a balancer kept sending them here.
    store = tmp_path / "store"
    store.mkdir()
    config, port = store_config(tmp_path, store, slack)
    log = tmp_path / "bridge.log"
    with Subprocess(config, port, log) as bridge:
        post_all(bridge, ["before"])
        assert slack.wait_for(lambda s: rooms_received(s) == {"before"})
    damage(store / "bridge.db", table)
    with Subprocess(config, port, log, ready="/healthz") as bridge:
        assert bridge.process is not None
        status, body = post_callback(bridge.url, owner_change("during"))
        assert (status, json.loads(body)) == (503, FAIL_503)
        assert wait_until(lambda: get(bridge.url + "/readyz")[0] == 503, 5)
        status, ready = get(bridge.url + "/readyz")
        assert status == 503
        assert "is damaged (database disk image is malformed)" in ready["reason"], ready
        assert bridge.process.poll() is None
    said = log.read_text()
    assert said.count("the database file is damaged") == 1, said
