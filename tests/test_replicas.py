"""Several `live-bridge serve` replicas on one PostgreSQL database, as subprocesses behind
alternating requests: every acknowledged event reaches every channel, Slack's pacing holds across
replicas, a replica killed with SIGKILL loses nothing, a database that goes away is answered with
503 and no busy loop, and the outbox CLI, /metrics and /status read the shared store.

Every test takes `postgres_url`, so all of them skip unless LIVE_BRIDGE_TEST_POSTGRES_URL names a
server. The store URL written into each config carries a password (trust auth ignores it): no log
line and no CLI output may show it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bridge.channels.webhook import message_id
from tests.bridge_server import (
    OK_PACKET,
    OWNER,
    Subprocess,
    free_port,
    get,
    http_request,
    post_callback,
    samples,
    write_config,
)
from tests.conftest import PostgresSQL
from tests.pg_proxy import PgProxy
from tests.slack_standin import Posted, SlackStandIn

PASSWORD = "Distinct-Pw-123"
EVENT_TIME_MS = 1_717_000_000_000
KEY = re.compile(r"ev-\d{5}")  # each event's CurrentOwner_Account: found in any message about it
ROUTE_ALL = '[[routes]]\nname = "all"\nchannels = [{}]\n'


def store_url(postgres_url: str, port: int | None = None) -> str:
    """`postgres_url` with a password, and another port (a proxy's) if given."""
    parts = urlsplit(postgres_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{host}:{port or parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl()


def event_body(n: int, room: str) -> bytes:
    return json.dumps({
        "CallbackCommand": OWNER, "RoomId": room, "EventTime": EVENT_TIME_MS + n,
        "Operator_Account": "admin", "CurrentOwner_Account": f"ev-{n:05d}",
        "OriginalOwner_Account": "before",
    }).encode()  # fmt: skip


def send_all(
    targets: Sequence[str], numbers: Iterable[int], room: Callable[[int], str]
) -> dict[int, tuple[int, bytes]]:
    """Post event `n` to `targets[n % len(targets)]`, 16 at a time; the answer to each."""

    def one(n: int) -> tuple[int, tuple[int, bytes]]:
        return n, post_callback(targets[n % len(targets)], event_body(n, room(n)))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(pool.map(one, numbers))


def acknowledged(answers: dict[int, tuple[int, bytes]]) -> set[str]:
    return {f"ev-{n:05d}" for n, answer in answers.items() if answer == (200, OK_PACKET)}


def keys_in(payload: Any) -> set[str]:
    """The events a message speaks of: a digest lists many, a single message names its own."""
    return set(KEY.findall(json.dumps(payload)))


def slack_counts(slack: SlackStandIn, channel: str) -> Counter[str]:
    """How many of Slack channel `channel`'s messages speak of each event."""
    return Counter(key for m in slack.posted if m.channel == channel for key in keys_in(m.payload))


def posted_to(channel: str, key: str) -> Callable[[SlackStandIn], bool]:
    return lambda slack: key in slack_counts(slack, channel)


def sink_keys(slack: SlackStandIn, name: str) -> Counter[str]:
    """How often each event reached sink `name`, whatever the sink answered."""
    return Counter(
        json.loads(r.body)["event"]["CurrentOwner_Account"]
        for r in slack.sink_requests
        if r.path == f"/sink/{name}"
    )


def eventually(predicate: Callable[[], bool], timeout: float, every: float = 0.25) -> bool:
    """Like wait_until, polling less often: the predicates here scan thousands of requests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
    return True


def states(postgres_sql: PostgresSQL) -> dict[tuple[str, str], int]:
    rows = postgres_sql("SELECT channel, state, count(*) FROM deliveries GROUP BY 1, 2")
    return {(channel, state): count for channel, state, count in rows}


def assert_no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text, "the store's password leaked:\n" + text[-3000:]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name before ")" may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def replicas(
    tmp_path: Path, count: int, channels: str, routes: str, store: str
) -> Iterator[list[Subprocess]]:
    """`count` bridges, each with its own folder, port and log, all on one store; stopped (and
    their logs checked for the password) afterwards."""
    with contextlib.ExitStack() as stack:
        started = []
        for name in "abcdefgh"[:count]:
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            config = write_config(folder, port, channels=channels, routes=routes, store=store)
            started.append(stack.enter_context(Subprocess(config, port, folder / "bridge.log")))
        yield started
    assert_no_password(*(bridge.log.read_text() for bridge in started))


def outbox(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "outbox", "--config", str(config), *args],
        capture_output=True, text=True, timeout=30, env=clean,
    )  # fmt: skip
    assert_no_password(done.stdout, done.stderr)
    return done


# -- 1. two replicas, three channels, 1,000 callbacks ---------------------------------------------

EVENTS = 1000
ROOMS = 50
PREAMBLE = 4  # sent one by one: each a message of its own, in two rooms, so two thread replies
RATE_PER_S = 1.0
BURST = 3
ROOM = re.compile(r"room-\d{2}")


def room_of(n: int) -> str:
    return f"room-{n % (2 if n < PREAMBLE else ROOMS):02d}"


def room_in(message: Posted) -> str | None:
    """The room a single message names in its text; a digest's text names none."""
    found = ROOM.search(str(message.payload.get("text", "")))
    return found[0] if found else None


def most_in_any_window(times: Sequence[float], rate_per_s: float) -> float:
    """The largest excess of messages over what a token bucket refills between two of them."""
    ordered = sorted(times)
    return max(
        (j - i + 1 - rate_per_s * (ordered[j] - ordered[i])
         for i in range(len(ordered)) for j in range(i, len(ordered))),
        default=0.0,
    )  # fmt: skip


def test_two_replicas_deliver_every_event_once_to_each_channel(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    with SlackStandIn(channels=("CBOT",), rate_per_s=RATE_PER_S, burst=BURST) as slack:
        paced = f"rate_per_s = {RATE_PER_S}\nburst = {BURST}\ndigest_after = 10\n"
        channels = (
            f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url("sink")}"\n'
            f'[channels.hook]\ntype = "slack"\nwebhook_url = "{slack.add_webhook("CHOOK")}"\n'
            f"{paced}"
            f'[channels.bot]\ntype = "slack"\ntoken = "xoxb-test-token"\nchannel = "CBOT"\n'
            f'api_url = "{slack.api_url}"\nthread_by_room = true\n{paced}'
        )
        routes = ROUTE_ALL.format('"sink", "hook", "bot"')
        store = f'url = "{store_url(postgres_url)}"\n'
        with replicas(tmp_path, 2, channels, routes, store) as (a, b):
            began = time.monotonic()
            answers: dict[int, tuple[int, bytes]] = {}
            for n in range(PREAMBLE):
                answers |= send_all([a.url, b.url], [n], room_of)
                assert slack.wait_for(posted_to("CBOT", f"ev-{n:05d}")), n
            answers |= send_all([a.url, b.url], range(PREAMBLE, EVENTS), room_of)
            sent_s = time.monotonic() - began
            assert all(answer == (200, OK_PACKET) for answer in answers.values()), Counter(
                answers.values()
            )
            everything = acknowledged(answers)
            assert len(everything) == EVENTS

            def all_there() -> bool:
                return set(sink_keys(slack, "sink")) == everything and all(
                    set(slack_counts(slack, c)) == everything for c in ("CHOOK", "CBOT")
                )

            assert eventually(all_there, timeout=90), (
                f"sink {len(sink_keys(slack, 'sink'))}, hook {len(slack_counts(slack, 'CHOOK'))}, "
                f"bot {len(slack_counts(slack, 'CBOT'))} of {EVENTS}; states {states(postgres_sql)}"
            )
            delivered_s = time.monotonic() - began
            done = {(c, "delivered"): EVENTS for c in ("sink", "hook", "bot")}
            assert eventually(lambda: states(postgres_sql) == done, timeout=15), states(
                postgres_sql
            )
            # Each replica acknowledged its half itself.
            accepted = ("live_bridge_callbacks_total", (("command", OWNER), ("result", "accepted")))
            assert [samples(bridge.url)[accepted] for bridge in (a, b)] == [EVENTS / 2] * 2
            logs = [a.log.read_text(), b.log.read_text()]

    # Exactly once: no event twice in the sink, nor in two Slack messages of one channel.
    assert sink_keys(slack, "sink") == Counter(dict.fromkeys(everything, 1))
    for channel in ("CHOOK", "CBOT"):
        assert slack_counts(slack, channel) == Counter(dict.fromkeys(everything, 1)), channel
    # Pacing held across both replicas: Slack never said 429, and no window of either channel
    # holds more messages than a bucket of BURST refilled at RATE_PER_S lets through.
    assert slack.rejected_429 == 0
    for channel in ("CHOOK", "CBOT"):
        times = [m.received_at for m in slack.posted if m.channel == channel]
        assert most_in_any_window(times, RATE_PER_S) <= BURST + 0.05, (channel, times)
    # Threads are shared too: a reply goes to the thread its room's first message started,
    # whichever replica sent either.
    bot = [m for m in slack.posted if m.channel == "CBOT"]
    started = {m.ts: room_in(m) for m in bot if "thread_ts" not in m.payload and room_in(m)}
    replies = [m for m in bot if "thread_ts" in m.payload]
    assert len(replies) >= PREAMBLE // 2
    assert all(started.get(m.payload["thread_ts"]) == room_in(m) for m in replies), replies
    messages = Counter(m.channel for m in slack.posted)
    sends = [log.count("delivered event=") for log in logs]
    print(f"{EVENTS} callbacks in {sent_s:.1f}s, all delivered after {delivered_s:.1f}s; "
          f"Slack messages {dict(messages)} ({len(replies)} thread replies); "
          f"delivered by A/B {sends}")  # fmt: skip


# -- 2. kill -9 of one replica mid-burst --------------------------------------------------------

SINK_DELAY_S = 0.1  # sends stay in flight long enough for the kill to catch some
MAX_IN_FLIGHT = 4


def test_kill_9_of_one_replica_loses_no_acknowledged_event(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL, slack: SlackStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The dead replica's leases last ceil(16 / 4) * (timeout_s + 5) + 10 s: 34 s with 1.0.
    monkeypatch.setenv("LIVE_BRIDGE_DELIVERY__TIMEOUT_S", "1.0")
    slack.set_sink_delay("sink", SINK_DELAY_S)
    channels = (
        f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url("sink")}"\n'
        f'max_in_flight = {MAX_IN_FLIGHT}\nsigning_secret = "whsec_{"A" * 32}"\n'
    )
    store = f'url = "{store_url(postgres_url)}"\n'
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir()
    folder_b.mkdir()
    port_a, port_b = free_port(), free_port()
    routes = ROUTE_ALL.format('"sink"')
    config_a = write_config(folder_a, port_a, channels=channels, routes=routes, store=store)
    config_b = write_config(folder_b, port_b, channels=channels, routes=routes, store=store)

    def room(n: int) -> str:
        return f"room-{n:05d}"

    with Subprocess(config_a, port_a, folder_a / "bridge.log") as a:
        # A alone first: it takes the channel, and the channels table shows A's owner id.
        answers = send_all([a.url], range(5), room)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 5)
        ((owner_a,),) = postgres_sql("SELECT owner FROM channels WHERE channel = 'sink'")
        with Subprocess(config_b, port_b, folder_b / "bridge.log") as b:
            # A's own callbacks wake its worker at once, B's only at its next poll: the burst
            # begins at A, so A usually holds the channel while the backlog lasts. But a lane
            # that finds nothing for a moment lets go of it, and on a busy machine B may take it:
            # the replica killed is whichever holds the channel with sends in flight.
            answers |= send_all([a.url], range(5, 45), room)
            answers |= send_all([a.url, b.url], range(45, 345), room)
            assert slack.wait_for(lambda s: len(s.sink_requests) >= 70, timeout=20)

            def holder_sending() -> str | None:
                rows = postgres_sql(
                    "SELECT c.owner FROM channels c WHERE c.channel = 'sink' AND EXISTS ("
                    " SELECT 1 FROM deliveries d WHERE d.state = 'in_flight'"
                    " AND d.owner = c.owner)"
                )
                return str(rows[0][0]) if rows else None

            # It claims 16 at a time and sends 4 at once, 0.1 s each: mid-round, some of what
            # it holds has been sent, some is on the wire and some not yet sent.
            # The owner seen is kept: asked again, a lane between two claims may hold nothing.
            seen: list[str] = []

            def sending() -> bool:
                owner = holder_sending()
                seen.extend([owner] if owner is not None else [])
                return owner is not None

            assert eventually(sending, timeout=20, every=0.01)
            owner = seen[-1]
            victim, survivor = (a, b) if owner == owner_a else (b, a)
            victim.kill()
            killed_at = time.monotonic()
            # What it held when it died: only these may reach the sink twice.
            held = {  # as store.Claimed.message_key
                f"{delivery_id}@{received_at!r}"
                for delivery_id, received_at in postgres_sql(
                    "SELECT d.id, e.received_at FROM deliveries d"
                    " JOIN events e ON e.id = d.event_id"
                    " WHERE d.state = 'in_flight' AND d.owner = %s",
                    owner,
                )
            }
            ((holder,),) = postgres_sql("SELECT owner FROM channels WHERE channel = 'sink'")
            assert held and holder == owner, (len(held), holder, owner)
            answers |= send_all([survivor.url], range(345, 445), room)
            everything = acknowledged(answers)
            # Every callback reached a running replica before or after the kill: all answered.
            assert len(everything) == 445, Counter(answers.values())

            assert eventually(lambda: set(sink_keys(slack, "sink")) >= everything, timeout=60), (
                f"never delivered: {sorted(everything - set(sink_keys(slack, 'sink')))[:20]}"
            )
            recovered_s = time.monotonic() - killed_at
            assert eventually(
                lambda: states(postgres_sql) == {("sink", "delivered"): 445}, timeout=15
            ), states(postgres_sql)
            log_b = b.log.read_text()
        log_a = a.log.read_text()
    assert_no_password(log_a, log_b)
    log_survivor = log_b if survivor is b else log_a

    requests = slack.sink_requests
    # The sink records the victim's last requests up to SINK_DELAY_S after the kill: later
    # ones are the survivor's.
    after_kill = [r for r in requests if r.received_at > killed_at + SINK_DELAY_S + 0.5]
    assert after_kill and "delivered event=" in log_survivor  # the survivor finished the work
    first_after = min(r.received_at for r in after_kill) - killed_at
    by_id = Counter(r.headers["webhook-id"] for r in requests)
    repeated = {webhook_id for webhook_id, n in by_id.items() if n > 1}
    # At least once, and twice only for what the victim held in flight when it died.
    # The replicas share one database, so one identity: a repeat's webhook-id is the same.
    ((identity,),) = postgres_sql("SELECT value FROM meta WHERE key = 'store_id'")
    assert repeated <= {message_id(identity, "sink", key) for key in held}, (
        f"{len(repeated)} sent twice, the killed replica held {len(held)}"
    )
    assert len(by_id) == 445  # one delivery (one webhook-id) per event
    print(f"{'A' if victim is a else 'B'} killed holding {len(held)} deliveries; the other sent "
          f"again {first_after:.1f}s later, all "
          f"delivered {recovered_s:.1f}s after the kill; {len(repeated)} sent twice")  # fmt: skip


# -- 3. the database goes away and comes back ----------------------------------------------------


def test_database_unavailable_is_answered_503_then_recovered(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL, slack: SlackStandIn
) -> None:
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("reading a process's CPU time needs Linux /proc")
    server = urlsplit(postgres_url)
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url("sink")}"\n'
    with PgProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        store = f'url = "{store_url(postgres_url, proxy.port)}"\n'
        with replicas(tmp_path, 1, channels, ROUTE_ALL.format('"sink"'), store) as (bridge,):
            assert bridge.process is not None
            answers = send_all([bridge.url], range(5), lambda n: f"room-{n}")
            assert eventually(lambda: states(postgres_sql) == {("sink", "delivered"): 5}, 10)

            proxy.cut()
            cut_at = time.monotonic()
            refused = send_all([bridge.url], range(5, 8), lambda n: f"room-{n}")
            refused_s = time.monotonic() - cut_at
            # Each waits for a pooled connection until the store gives up, not for the client.
            assert refused_s < 8.0
            for status, body in refused.values():
                assert status == 503, (status, body)
                packet = json.loads(body)
                assert (packet["ActionStatus"], packet["ErrorCode"]) == ("FAIL", 503), packet
            assert get(bridge.url + "/readyz")[0] == 503
            # Waiting for the database is sleeping: a busy loop would show as a whole core.
            cpu_before, wall_before = cpu_seconds(bridge.process.pid), time.monotonic()
            time.sleep(3.0)
            cpu = cpu_seconds(bridge.process.pid) - cpu_before
            wall = time.monotonic() - wall_before
            assert bridge.process.poll() is None  # still up
            assert get(bridge.url + "/healthz")[0] == 200

            proxy.restore()
            restored_at = time.monotonic()
            assert eventually(lambda: get(bridge.url + "/readyz")[0] == 200, 20, every=0.1)
            ready_s = time.monotonic() - restored_at
            later = send_all([bridge.url], range(8, 13), lambda n: f"room-{n}")
            assert all(answer == (200, OK_PACKET) for answer in later.values()), later
            answers |= later
            everything = acknowledged(answers)
            assert len(everything) == 10
            assert eventually(lambda: set(sink_keys(slack, "sink")) >= everything, 20)
            assert eventually(lambda: states(postgres_sql) == {("sink", "delivered"): 10}, 10)
            log = bridge.log.read_text()
    assert cpu / wall < 0.15, f"the bridge used {cpu:.2f}s of CPU in {wall:.2f}s without a store"
    assert "store unavailable" in log  # the outage was seen and said
    print(f"cut: 3 callbacks answered 503 within {refused_s:.1f}s, CPU {cpu:.2f}s in "
          f"{wall:.1f}s; ready {ready_s:.1f}s after the restore")  # fmt: skip


# -- 4. outbox CLI, /metrics and /status on PostgreSQL -------------------------------------------


def test_outbox_metrics_and_status_read_the_shared_store(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL, slack: SlackStandIn
) -> None:
    slack.set_sink_status("bad", 400)  # a permanent failure: dead at the first attempt
    channels = "".join(
        f'[channels.{name}]\ntype = "webhook"\nurl = "{slack.sink_url(name)}"\n'
        for name in ("good", "bad")
    )
    store = f'url = "{store_url(postgres_url)}"\n'
    routes = ROUTE_ALL.format('"good", "bad"')
    with replicas(tmp_path, 2, channels, routes, store) as (a, b):
        answers = send_all([a.url, b.url], range(6), lambda n: f"room-{n}")
        assert all(answer == (200, OK_PACKET) for answer in answers.values())
        settled = {("good", "delivered"): 6, ("bad", "dead"): 6}
        assert eventually(lambda: states(postgres_sql) == settled, 15), states(postgres_sql)
        config = a.config_path

        stats = outbox(config, "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        counts = {
            s["channel"]: (s["pending"], s["in_flight"], s["dead"], s["delivered"])
            for s in json.loads(stats.stdout)
        }
        assert counts == {"bad": (0, 0, 6, 0), "good": (0, 0, 0, 6)}
        listed = outbox(config, "list", "--dead", "--json")
        assert listed.returncode == 0, listed.stderr
        dead = json.loads(listed.stdout)
        assert len(dead) == 6 and {d["channel"] for d in dead} == {"bad"}
        assert all("400" in d["last_error"] and d["state"] == "dead" for d in dead), dead
        assert {d["room_id"] for d in dead} == {f"room-{n}" for n in range(6)}

        # The gauges come from the shared store: alike on both replicas. The counters are each
        # replica's own: together they count every outcome once.
        both = [samples(a.url), samples(b.url)]
        for seen in both:
            assert seen[("live_bridge_dead", (("channel", "bad"),))] == 6
            assert seen[("live_bridge_pending", (("channel", "good"),))] == 0
        for channel, outcome in (("good", "delivered"), ("bad", "dead")):
            key = ("live_bridge_deliveries_total", (("channel", channel), ("outcome", outcome)))
            assert sum(seen.get(key, 0.0) for seen in both) == 6, (channel, outcome)
        for bridge in (a, b):
            status, _, page = http_request(bridge.url + "/status")
            assert status == 200
            row = re.search(rb'<tr data-channel="bad">.*?</tr>', page, re.S)
            assert row is not None, page
            assert b'<td class="num dead-count" data-label="Dead">6</td>' in row[0]
            assert b"Retry 6 dead" in row[0]
            assert b"bad: dead" in page  # the recent events show each delivery's state

        slack.set_sink_status("bad", 200)
        retried = outbox(config, "retry", "--dead", "--channel", "bad", "--json")
        assert (retried.returncode, json.loads(retried.stdout)) == (0, {"retried": 6})
        # Nothing wakes the replicas: their shared-store poll finds the work within a second.
        done = {("good", "delivered"): 6, ("bad", "delivered"): 6}
        assert eventually(lambda: states(postgres_sql) == done, 10), states(postgres_sql)
        assert sink_keys(slack, "bad") == Counter(
            {f"ev-{n:05d}": 2 for n in range(6)}
        )  # once refused, once accepted
        stats = outbox(config, "stats", "--json")
        after = {s["channel"]: (s["dead"], s["delivered"]) for s in json.loads(stats.stdout)}
        assert after == {"bad": (0, 6), "good": (0, 6)}
        assert outbox(config, "list", "--dead").stdout.strip() == "no deliveries"
