"""The host's wall clock steps under a running bridge (NTP correcting a drift, a VM restored from
a snapshot, a host whose clock was wrong at boot): nothing is delayed by the size of the step,
nothing is sent twice beyond what was in flight, a room's messages keep their order, and nothing
still owed is pruned.

The bridge runs as a real subprocess under libfaketime (Debian's `libfaketime`, which .ci/run
installs), its wall clock offset by what the test writes to a file; its monotonic clock is left
alone, as a real step leaves CLOCK_MONOTONIC alone.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bridge_server import (
    OWNER,
    SEED_BODY,
    Subprocess,
    db_rows,
    free_port,
    post_callback,
    signing_secret,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
HOUR = 3600
DAYS_30 = 30 * 86400


class Clock:
    """The subprocesses' wall clock: real time plus an offset this test sets."""

    def __init__(self, directory: Path) -> None:
        self._file = directory / "faketime.rc"
        self.step(0)

    def step(self, offset_s: int) -> None:
        """From now on the clock reads real time plus `offset_s` (a step of the difference)."""
        spare = self._file.with_suffix(".new")
        spare.write_text(f"{offset_s:+d}\n")
        spare.replace(self._file)  # whole: the library reads it at every clock reading

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(FAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self._file),
            "FAKETIME_NO_CACHE": "1",  # read the file at every reading: a step takes at once
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # a real step moves CLOCK_REALTIME only
        }


@pytest.fixture
def clock(tmp_path: Path) -> Iterator[Clock]:
    if not FAKETIME.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME}; .ci/run installs it)")
    yield Clock(tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str:
    """The [store] table's body: SQLite beside the config, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return 'path = "bridge.db"\n'
    return f'url = "{request.getfixturevalue("postgres_url")}"\n'


def event(room: str, event_time: int | None, n: int) -> bytes:
    """An owner change in `room`; without EventTime when `event_time` is None."""
    body = json.loads(SEED_BODY)
    body.update(RoomId=room, CurrentOwner_Account=f"user-{n}")
    if event_time is None:
        del body["EventTime"]
    else:
        body["EventTime"] = event_time
    return json.dumps(body).encode()


def post(url: str, body: bytes) -> None:
    query = {"SdkAppid": "1400000000", "CallbackCommand": OWNER, "contenttype": "json"}
    assert post_callback(url, body, query)[0] == 200


def sink(name: str, url: str, extra: str = "") -> str:
    return (
        f'[channels.{name}]\ntype = "webhook"\nurl = "{url}"\nmax_in_flight = 4\n'
        f'signing_secret = "{signing_secret()}"\n{extra}'
    )


def sent(slack: SlackStandIn, name: str, after: float = 0.0) -> list[tuple[str, str, str]]:
    """(room, owner, webhook-id) of the requests to sink `name` since `after`, in order."""
    return [
        (
            json.loads(r.body)["event"]["RoomId"],
            json.loads(r.body)["event"]["CurrentOwner_Account"],
            r.headers["webhook-id"],
        )
        for r in slack.sink_requests
        if r.path == f"/sink/{name}" and r.received_at > after
    ]


def rooms_tried(slack: SlackStandIn, name: str) -> set[str]:
    return {room for room, _, _ in sent(slack, name)}


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
def test_a_step_back_delays_nothing_and_keeps_each_room_in_order(
    tmp_path: Path, slack: SlackStandIn, clock: Clock, store: str, own_process: bool
) -> None:
    """Deliveries backing off, a paced channel that was sent to, and new events for those rooms
    and others: an hour back, each goes out within seconds, each room's in order."""
    port = free_port()
    channels = sink("paced", slack.sink_url("paced"), "rate_per_s = 5.0\n")
    routes = '[[routes]]\nname = "all"\nchannels = ["paced"]\n'
    delivery = "initial_backoff_s = 0.3\nmax_backoff_s = 1.0\nmax_attempts = 1000\n"
    delivery += f"own_process = {str(own_process).lower()}\n"
    config = write_config(
        tmp_path, port, channels=channels, routes=routes, delivery=delivery, store=store
    )
    base = int(time.time() * 1000)
    with Subprocess(config, port, tmp_path / "bridge.log", clock.env()) as bridge:
        post(bridge.url, event("first", base, 0))
        assert slack.wait_for(lambda s: rooms_tried(s, "paced") == {"first"}, timeout=20)
        # The far end fails: these back off, each tried at least once before the step.
        slack.set_sink_status("paced", 503)
        post(bridge.url, event("backing-off", base + 1, 1))
        post(bridge.url, event("no-event-time", None, 2))
        assert slack.wait_for(lambda s: len(rooms_tried(s, "paced")) == 3, timeout=20)
        time.sleep(0.5)  # the lane ends and leaves the channel, its pacing saved
        clock.step(-HOUR)
        back = time.monotonic()
        slack.set_sink_status("paced", 200)
        post(bridge.url, event("backing-off", base + 2, 3))  # later than its room's first
        post(bridge.url, event("no-event-time", None, 4))
        post(bridge.url, event("new-room", base + 3, 5))

        def delivered() -> Counter[str]:
            return Counter(room for room, _, _ in sent(slack, "paced", back))

        expected = Counter({"backing-off": 2, "no-event-time": 2, "new-room": 1})
        assert slack.wait_for(lambda s: delivered() == expected, timeout=30), (
            f"delivered since the step: {dict(delivered())}\n"
            + (tmp_path / "bridge.log").read_text()[-3000:]
        )
    owners = [owner for room, owner, _ in sent(slack, "paced", back) if room != "new-room"]
    assert owners.index("user-1") < owners.index("user-3"), owners
    assert owners.index("user-2") < owners.index("user-4"), owners


def test_a_step_forward_sends_nothing_twice_and_prunes_nothing_owed(
    tmp_path: Path, slack: SlackStandIn, clock: Clock, store: str
) -> None:
    """Thirty days forward while messages are in flight to one far end (slow) and backing off
    from another (down): each message goes to the slow one once, and the retention's prune,
    now due, keeps every event the down one is still owed."""
    port = free_port()
    channels = sink("slow", slack.sink_url("slow")) + sink("down", slack.sink_url("down"))
    routes = '[[routes]]\nname = "all"\nchannels = ["slow", "down"]\n'
    delivery = "initial_backoff_s = 0.3\nmax_backoff_s = 1.0\nmax_attempts = 1000\n"
    config = write_config(
        tmp_path, port, channels=channels, routes=routes, delivery=delivery,
        store=store + "retention_h = 1.0\n",
    )  # fmt: skip
    slack.set_sink_delay("slow", 3.0)
    slack.set_sink_status("down", 503)
    base = int(time.time() * 1000)
    rooms = [f"room-{n}" for n in range(3)]
    env = {**clock.env(), "LIVE_BRIDGE_DELIVERY__TIMEOUT_S": "10"}  # slow, not failing
    with Subprocess(config, port, tmp_path / "bridge.log", env) as bridge:
        for n, room in enumerate(rooms):
            post(bridge.url, event(room, base + n, n))
        assert slack.wait_for(lambda s: rooms_tried(s, "down") == set(rooms), timeout=20)
        assert wait_until(lambda: slack.sink_max_concurrent.get("slow", 0) > 0, timeout=20)
        clock.step(DAYS_30)  # sends to "slow" are under way
        time.sleep(4.0)  # the slow sends answer; a claim of them again would have been made
        slack.set_sink_status("down", 200)
        forward = time.monotonic()

        def delivered(name: str, after: float = 0.0) -> set[str]:
            return {room for room, _, _ in sent(slack, name, after)}

        assert slack.wait_for(lambda s: delivered("down", forward) == set(rooms), timeout=30), (
            tmp_path / "bridge.log"
        ).read_text()[-3000:]
        assert wait_until(lambda: delivered("slow") == set(rooms), timeout=20)
        time.sleep(2.0)  # time for a second, wrong, send of anything still held
    ids = Counter(webhook_id for _, _, webhook_id in sent(slack, "slow"))
    assert set(ids.values()) == {1}, f"sent more than once to the slow far end: {ids}"


def test_sqlite_rows_written_before_a_step_back_are_due_at_once(
    tmp_path: Path, slack: SlackStandIn, clock: Clock
) -> None:
    """The store file as a bridge whose clock was a day ahead left it (a host wrong at boot,
    corrected while the bridge was down): its pending deliveries go out at the next start."""
    port = free_port()
    channels = sink("sink", slack.sink_url("sink"), "rate_per_s = 5.0\n")
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    delivery = "initial_backoff_s = 0.3\nmax_backoff_s = 1.0\nmax_attempts = 1000\n"
    config = write_config(tmp_path, port, channels=channels, routes=routes, delivery=delivery)
    slack.set_sink_status("sink", 503)
    clock.step(86400)
    base = int(time.time() * 1000)
    with Subprocess(config, port, tmp_path / "bridge.log", clock.env()) as bridge:
        for n in range(3):
            post(bridge.url, event(f"room-{n}", base + n, n))
        assert slack.wait_for(lambda s: len(rooms_tried(s, "sink")) == 3, timeout=20)
    clock.step(0)
    slack.set_sink_status("sink", 200)
    restarted = time.monotonic()
    with Subprocess(config, port, tmp_path / "bridge.log", clock.env()):
        assert slack.wait_for(
            lambda s: len({room for room, _, _ in sent(s, "sink", restarted)}) == 3, timeout=20
        ), db_rows(tmp_path / "bridge.db", "SELECT state, next_attempt_at FROM deliveries")


def test_a_step_forward_on_postgres_replicas_sends_nothing_twice(
    tmp_path: Path, slack: SlackStandIn, clock: Clock, postgres_url: str
) -> None:
    """Two replicas on one host share a database; an hour forward while one sends: the other
    must not take the sends under way for ones whose lease ran out."""
    channels = sink("slow", slack.sink_url("slow"))
    routes = '[[routes]]\nname = "all"\nchannels = ["slow"]\n'
    delivery = "initial_backoff_s = 0.3\nmax_backoff_s = 1.0\nmax_attempts = 1000\n"
    slack.set_sink_delay("slow", 3.0)
    env = {**clock.env(), "LIVE_BRIDGE_DELIVERY__TIMEOUT_S": "10"}
    bridges = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        port = free_port()
        config = write_config(
            folder, port, channels=channels, routes=routes, delivery=delivery,
            store=f'url = "{postgres_url}"\n',
        )  # fmt: skip
        bridges.append(Subprocess(config, port, folder / "bridge.log", env))
    base = int(time.time() * 1000)
    rooms = [f"room-{n}" for n in range(3)]
    with bridges[0] as a, bridges[1]:
        for n, room in enumerate(rooms):
            post(a.url, event(room, base + n, n))
        assert wait_until(lambda: slack.sink_max_concurrent.get("slow", 0) > 0, timeout=20)
        clock.step(HOUR)  # sends are under way
        assert wait_until(lambda: rooms_tried(slack, "slow") == set(rooms), timeout=30)
        time.sleep(5.0)  # time for a second, wrong, send of anything still held
    ids = Counter(webhook_id for _, _, webhook_id in sent(slack, "slow"))
    assert set(ids.values()) == {1}, f"sent more than once: {ids}"
