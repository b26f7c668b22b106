"""A long run in short, on a subprocess bridge (one process, and with `own_process`).

Soak: phases of callbacks to ever-new rooms, unknown and odd commands, refusals of every kind,
duplicate retries and scrapes, while a webhook sink flaps and a Slack stand-in answers 429s.
After a warm-up phase, nothing a process holds may grow with the traffic: descriptors, threads,
memory, the /metrics page; and once the retention has passed, the store keeps only what it must.

Reload storm: SIGHUP tens of times a second while callbacks flow, the config alternating between
valid variants and broken ones. Every acknowledged event is delivered to each channel it was
routed to, once, unless a reload removed that channel (a dead letter saying so); each reload is
counted as what it was; nothing crashes or logs a traceback; descriptors and threads come back.

Growth is measured between phases with generous bounds, never against the clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, cast

import pytest

from tests.bridge_server import (
    APP_ID,
    DELIVERY,
    OK_PACKET,
    OWNER,
    Subprocess,
    children,
    db_rows,
    free_port,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.conftest import PostgresSQL
from tests.slack_standin import SlackStandIn
from tests.test_admin import CHANNEL, ROUTE

TOKEN = "soak-callback-token"
MAX_BODY = 65536
PHASES = 4  # the first warms up
PER_PHASE = 200  # rounds of requests (see phase) a phase
ODD_BYTES = 60_000  # an odd command's length: what a cache keyed by commands would keep

CHANNELS = """\
[channels.hook]
type = "webhook"
url = "{sink}"

[channels.bot]
type = "slack"
token = "xoxb-test-token"
channel = "C0123456789"
api_url = "{api}"
thread_by_room = true
thread_ttl_h = 0.0003
rate_per_s = 40
burst = 10
digest_after = 0
"""
ROUTES = """\
[[routes]]
name = "owners"
commands = ["Live.CallbackAfterChangeOwner"]
channels = ["bot"]
continue = true

[[routes]]
name = "all"
channels = ["hook"]
"""
# About a second: what is delivered, and the dedup keys, are old by the restart at the end.
STORE = 'path = "bridge.db"\nretention_h = 0.0003\n'
SOAK_DELIVERY = DELIVERY + "dedup_window_s = 1\n"


def signed_query() -> str:
    now = str(int(time.time()))
    sign = hashlib.sha256((TOKEN + now).encode()).hexdigest()
    return f"SdkAppid={APP_ID}&RequestTime={now}&Sign={sign}"


def event(command: str, room: str, n: int) -> bytes:
    return json.dumps({
        "CallbackCommand": command, "RoomId": room, "EventTime": 1703589922780 + n,
        "Operator_Account": "admin", "CurrentOwner_Account": "u2", "OriginalOwner_Account": "u1",
    }).encode()  # fmt: skip


def odd_command(n: int) -> str:
    """Commands no template names, each new: unknown, malformed, escapes, long."""
    return [
        f"Live.CallbackAfterSomethingNew{n}",
        f"Group.Callback\u202eAfter{n}\n",
        f"{n}." + "x" * ODD_BYTES,
        f"Live.{'A' * ODD_BYTES}{n}",
    ][n % 4]


class Client:
    """One keep-alive connection, opened again whenever the bridge closes it."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, target: str, body: bytes | None = None) -> int:
        for _ in range(3):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
            try:
                self._conn.request(method, target, body=body)
                response = self._conn.getresponse()
                response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status
            except (OSError, http.client.HTTPException):
                self.close()
        raise AssertionError(f"no answer to {method} {target[:80]}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def callback(client: Client, body: bytes, query: str | None = None) -> int:
    return client.request("POST", f"/tencent/callback?{query or signed_query()}", body)


# Each refusal, and the answer it gets.
REFUSALS = (
    (lambda c, n: callback(c, b'{"CallbackCommand": '), 400),
    (lambda c, n: callback(c, event(OWNER, "r", n), f"SdkAppid=1{n}"), 403),
    (lambda c, n: callback(c, event(OWNER, "r", n), f"SdkAppid={APP_ID}&RequestTime=1"), 401),
    (lambda c, n: callback(c, b"x" * (MAX_BODY + 1)), 413),
    (lambda c, n: c.request("GET", "/tencent/callback"), 405),
    (lambda c, n: c.request("POST", f"/nowhere/{n}", b"{}"), 404),
)  # fmt: skip


def phase(port: int, first: int, answers: dict[str, int]) -> None:
    """PER_PHASE rounds of: an owner change in a new room (every fifth sent twice, as a retry),
    an odd command, a refusal; scrapes every 50 rounds."""
    callbacks, others = Client(port), Client(port)

    def count(kind: str, status: int) -> None:
        answers[f"{kind} {status}"] = answers.get(f"{kind} {status}", 0) + 1

    try:
        for n in range(first, first + PER_PHASE):
            owner = event(OWNER, f"room-{n}", n)
            count("owner", callback(callbacks, owner))
            if n % 5 == 0:
                count("retry", callback(callbacks, owner))
            count("odd", callback(callbacks, event(odd_command(n), f"odd-{n}", n)))
            refuse, _ = REFUSALS[n % len(REFUSALS)]
            count(f"refusal {n % len(REFUSALS)}", refuse(others, n))
            if n % 50 == 0:
                for path in ("/metrics", "/status", "/readyz", "/healthz"):
                    count(path, others.request("GET", path))
    finally:
        callbacks.close()
        others.close()


@dataclass
class Sample:
    fds: int  # sockets apart
    sockets: int
    threads: int
    rss_kb: int
    metrics_bytes: int
    tasks: int  # the serving process's (live_bridge_event_loop_tasks)


def sample(pid: int, url: str) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = sum(1 for fd in fds if fd.startswith("socket:"))
    metrics = http_request(url + "/metrics")[2]
    tasks = next(
        line
        for line in metrics.decode().splitlines()
        if line.startswith("live_bridge_event_loop_tasks ")
    )
    return Sample(
        len(fds) - sockets, sockets, len(os.listdir(f"/proc/{pid}/task")), rss, len(metrics),
        int(float(tasks.split()[1])),
    )  # fmt: skip


@pytest.fixture
def flapping() -> Iterator[SlackStandIn]:
    """A Slack stand-in that allows 20 messages a second (a channel paced faster meets 429s),
    its webhook sink answering 503 every other 0.3 s."""
    slack = SlackStandIn(rate_per_s=20, burst=5)
    stop = threading.Event()

    def flap() -> None:
        up = True
        while not stop.wait(0.3):
            up = not up
            slack.set_sink_status("sink", 200 if up else 503)

    with slack:
        flapper = threading.Thread(target=flap)
        flapper.start()
        try:
            yield slack
        finally:
            stop.set()
            flapper.join()


Rows = Callable[..., list[tuple[Any, ...]]]  # (query with ? placeholders, *params) -> rows


@pytest.mark.parametrize(
    ("engine", "own_process"),
    [("sqlite", False), ("sqlite", True), ("postgres", False)],
    ids=["one process", "own_process", "postgresql"],
)
def test_a_long_run_stays_bounded(
    tmp_path: Path, flapping: SlackStandIn, engine: str, own_process: bool,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    slack = flapping
    port = free_port()
    db = tmp_path / "bridge.db"
    store, rows = STORE, cast(Rows, lambda query, *params: db_rows(db, query, params))
    if engine == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        store = f'url = "{url}"\nretention_h = 0.0003\n'
        on_server: PostgresSQL = request.getfixturevalue("postgres_sql")
        rows = cast(Rows, lambda query, *params: on_server(query.replace("?", "%s"), *params))
    config = write_config(
        tmp_path, port, channels=CHANNELS.format(sink=slack.sink_url(), api=slack.api_url),
        routes=ROUTES, tencent=f'callback_token = "{TOKEN}"\n', store=store,
        server=f"max_body_bytes = {MAX_BODY}\n",
        delivery=SOAK_DELIVERY + ("own_process = true\n" if own_process else ""),
    )  # fmt: skip
    answers: dict[str, int] = {}
    log = tmp_path / "serve.log"
    with Subprocess(config, port, log) as bridge:
        assert bridge.process is not None
        pids = [bridge.process.pid]
        if own_process:
            assert wait_until(lambda: len(children(pids[0])) == 1)
            pids += children(pids[0])
        samples: list[list[Sample]] = []
        for n in range(PHASES):
            phase(port, n * PER_PHASE, answers)
            samples.append([sample(pid, bridge.url) for pid in pids])
        assert slack.rejected_429 > 0
    report = "\n".join(f"phase {n}: {s}" for n, s in enumerate(samples))
    assert answers == expected_answers(), answers
    for p in range(len(pids)):
        warm, later = samples[1][p], [s[p] for s in samples[2:]]
        # Connections come and go; a leak of one per callback would be hundreds.
        assert all(s.fds <= warm.fds + 2 and s.sockets <= warm.sockets + 10 for s in later), report
        assert all(s.threads <= warm.threads + 2 for s in later), report
        # A scrape sees whatever is under way then (lanes, callbacks, a prune): 6 to 18 in
        # CI's runs. A leak of one per callback or per refusal would be hundreds.
        assert all(s.tasks <= warm.tasks + 40 for s in later), report
        # A phase sends 100 odd commands of 60 KB: 6 MB a phase, were they kept.
        assert later[-1].rss_kb - warm.rss_kb < 4_000, report
        assert later[-1].metrics_bytes < warm.metrics_bytes * 1.05, report
    # Past the retention, a start prunes: only what is not delivered stays, with its events.
    # (What is still pending is sent meanwhile: only rows from before the restart count.)
    time.sleep(2)
    restarted = time.time()
    with Subprocess(config, port, log):
        assert wait_until(lambda: "pruned" in log.read_text().rsplit("live-bridge ready", 1)[-1])
    assert rows("SELECT COUNT(*) FROM threads WHERE started_at < ?", restarted) == [(0,)]
    delivered = "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered' AND delivered_at < ?"
    assert rows(delivered, restarted) == [(0,)]
    assert rows("SELECT COUNT(*) FROM dedup") == [(0,)]
    assert rows(
        "SELECT COUNT(*) FROM events e WHERE NOT EXISTS"
        " (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)"
    ) == [(0,)]
    assert "Traceback" not in log.read_text()


def expected_answers() -> dict[str, int]:
    total = PHASES * PER_PHASE
    rounds = {i: sum(1 for n in range(total) if n % len(REFUSALS) == i) for i in range(6)}
    answers = {
        "owner 200": total, "odd 200": total,
        "retry 200": sum(1 for n in range(total) if n % 5 == 0),
        **{f"refusal {i} {status}": rounds[i] for i, (_, status) in enumerate(REFUSALS)},
    }  # fmt: skip
    scrapes = sum(1 for n in range(total) if n % 50 == 0)
    answers.update(
        {f"{path} 200": scrapes for path in ("/metrics", "/status", "/readyz", "/healthz")}
    )
    return answers


def variants(config: Path, slack: SlackStandIn) -> dict[str, str]:
    """The config (channels a and b, one route to both) and what the storm turns it into."""
    base = config.read_text()
    two = CHANNEL.format(name="a", url=slack.sink_url("a")) + CHANNEL.format(
        name="b", url=slack.sink_url("b")
    )
    for folder, template in (
        ("good", '{"variant": "changed", "event": {{ fields | tojson }}}'),
        ("bad", '{"room": "{{ room_id }"}'),
    ):
        (config.parent / folder / "webhook").mkdir(parents=True)
        (config.parent / folder / "webhook" / "default.j2").write_text(template)
    return {
        "added": base.replace(two, two + CHANNEL.format(name="c", url=slack.sink_url("c")))
        .replace('["a", "b"]', '["a", "b", "c"]'),
        "bad toml": base + "\n[[[\n",
        "removed": base.replace(two, CHANNEL.format(name="a", url=slack.sink_url("a")))
        .replace('["a", "b"]', '["a"]'),
        "bad template": base.replace('[templates]\ndir = ', '[templates]\ndir = "bad"\n# '),
        "route": base.replace('name = "all"', 'name = "all"\nrooms = ["storm-1*"]'),
        "missing var": base.replace(slack.sink_url("a"), "${LIVE_BRIDGE_SOAK_UNSET}"),
        "template": base.replace('[templates]\ndir = ', '[templates]\ndir = "good"\n# '),
        "base": base,
    }  # fmt: skip


STORM_S = 3.0
SIGHUP_EVERY_S = 0.03
REMOVED = "channel removed from the config"


@dataclass
class Traffic:
    """Owner changes in new rooms from a thread, and the rooms the bridge acknowledged."""

    url: str
    acknowledged: list[str]
    stop: threading.Event

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            room = f"storm-{n}"
            try:
                answer = post_callback(self.url, event(OWNER, room, n))
            except OSError:
                answer = None  # not acknowledged: Tencent would send it again
            if answer == (200, OK_PACKET):
                self.acknowledged.append(room)
            n += 1


def routed(room: str) -> list[set[str]]:
    """The channels a room may be routed to, under one config of the storm or another."""
    return [{"a", "b"}, {"a", "b", "c"}, {"a"}, {"a", "b"} if fnmatch(room, "storm-1*") else set()]


@pytest.mark.parametrize("own_process", [False, True], ids=["one process", "own_process"])
def test_a_reload_storm_loses_nothing(
    tmp_path: Path, slack: SlackStandIn, own_process: bool
) -> None:
    port = free_port()
    two = CHANNEL.format(name="a", url=slack.sink_url("a")) + CHANNEL.format(
        name="b", url=slack.sink_url("b")
    )
    config = write_config(
        tmp_path, port, channels=two, routes=ROUTE.replace('["hook"]', '["a", "b"]'),
        delivery=DELIVERY + ("own_process = true\n" if own_process else ""),
    )  # fmt: skip
    configs = variants(config, slack)
    log = tmp_path / "serve.log"
    with Subprocess(config, port, log) as bridge:
        assert bridge.process is not None
        server = bridge.process.pid
        # Warmed up: a callback delivered (by a delivery process that is ready).
        assert post_callback(bridge.url, event(OWNER, "warm-up", -1)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 2)
        pids = [server, *children(server)]
        before = [sample(pid, bridge.url) for pid in pids]
        traffic = Traffic(bridge.url, [], threading.Event())
        sender = threading.Thread(target=traffic.run)
        sender.start()
        signals = 0
        try:
            names = sorted(configs)
            started = time.monotonic()
            while time.monotonic() - started < STORM_S:
                config.write_text(configs[names[signals % len(names)]])
                os.kill(server, signal.SIGHUP)
                signals += 1
                time.sleep(SIGHUP_EVERY_S)
            config.write_text(configs["base"])
            # The last word: every SIGHUP before it has been handled once this is answered.
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert status == 200
            assert json.loads(body)["message"].startswith("reloaded: 2 channels, 1 routes")
        finally:
            traffic.stop.set()
            sender.join()
        db = tmp_path / "bridge.db"
        waiting = "SELECT 1 FROM deliveries WHERE state IN ('pending', 'in_flight')"
        assert wait_until(lambda: not db_rows(db, waiting), timeout=30)
        counts = samples(bridge.url)
        after = [sample(pid, bridge.url) for pid in pids]
        assert bridge.process.poll() is None
    text = log.read_text()
    assert "Traceback" not in text
    # Each reload the server made is counted once, as what it was.
    assert counts[("live_bridge_config_reloads_total", (("result", "success"),))] == text.count(
        "bridge.reload: reloaded: "
    )
    assert counts[("live_bridge_config_reloads_total", (("result", "failure"),))] == text.count(
        "bridge.reload: reload refused"
    )
    # One a signal, and one more each time the delivery process read a later version of the file
    # than the server had (the storm rewrites it as fast as they read it).
    again = text.count("reloading it again in both")
    assert text.count("bridge.reload: reload") <= signals + 1 + again
    # Every acknowledged event was recorded for the channels one config routed it to; each
    # delivery went out once, but those to a channel a reload removed (dead letters saying so).
    events = dict(db_rows(db, "SELECT room_id, id FROM events"))
    assert set(traffic.acknowledged) <= set(events)
    rows = db_rows(
        db, "SELECT e.room_id, d.channel, d.state, d.last_error FROM deliveries d"
        " JOIN events e ON e.id = d.event_id WHERE e.room_id LIKE 'storm-%'",
    )  # fmt: skip
    channels: dict[str, set[str]] = {room: set() for room in traffic.acknowledged}
    for room, channel, _, _ in rows:
        channels.setdefault(room, set()).add(channel)
    assert all(channels[room] in routed(room) for room in traffic.acknowledged)
    sent = Counter(
        (r.path.rsplit("/", 1)[1], json.loads(r.body)["event"]["RoomId"])
        for r in slack.sink_requests
    )
    for room, channel, state, error in rows:
        if (channel, state) != ("a", "delivered"):
            # Buried while it was being sent, a delivery that got through is delivered still.
            assert channel in "bc" and (state, error) in (
                ("delivered", None), ("delivered", REMOVED), ("dead", REMOVED),
            )  # fmt: skip
        assert sent[(channel, room)] == (state == "delivered"), (room, channel, state, error)
    assert signals > 50 and len(traffic.acknowledged) > 20
    # Idle connections to the sinks stay open a while (aiohttp keeps them 15 s): at most
    # max_in_flight to each of the three channels. One more a reload would be tens.
    for was, now in zip(before, after, strict=True):
        assert now.fds <= was.fds + 2 and now.threads <= was.threads + 1, (before, after)
        assert now.tasks <= was.tasks + 10, (before, after)
        assert now.sockets <= was.sockets + 3 * 4, (before, after)
