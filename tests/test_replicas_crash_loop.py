"""Crash loop on PostgreSQL: three `live-bridge serve` replicas on one database, each reaching it
through a proxy of its own (tests/pg_proxy.py), under steady callbacks spread over them while two
webhook sinks flap between 200 and 503. Meanwhile, at random moments: a replica killed with
SIGKILL (now and then the moment it has acknowledged a callback) and started again; the delivery
process of the replica with `[delivery] own_process = true` killed alone; the database cut away
from one replica or from all (sometimes with a kill during the cut) and restored. The real server
is never touched: other tests share it.

What the test holds the bridge to:
- Every callback is answered 200 OK, or 503 FAIL (its replica's database away), or not at all
  (its replica down or killed mid-request).
- A callback refused (503) or unanswered is Tencent's to send again, and the test does, once
  everything is back. Such a callback was either not stored, or stored all the same (its write
  committed, the answer was lost or late) and delivered like any other: either way its retry is
  acknowledged, and the event is stored once (dedup) and delivered once per channel.
- At the end every event reached both sinks with a 200, one webhook-id per delivery, every
  delivery is 'delivered' (nothing pending, in flight or dead), each event stored once with its
  two deliveries, and no delivery process outlived its server.
- Each room in Tencent's order: no event of a room reached a sink before the room's event
  acknowledged before it had been taken there (each replica's callbacks go to rooms of its own,
  in turn, so an event is acknowledged before the next of its room is posted).
- A delivery reached a sink twice with a 200 only where a disruption explains it: a kill takes
  the sends in flight with it (at most `max_in_flight` a channel), a cut the outcomes of what the
  replica had claimed (at most a claim, `claim_limit`, a channel); their first 200 came shortly
  before the kill, or from shortly before the cut until its replica reached the database again.

CRASH_LOOP_SEED picks another schedule (the default is fixed; a failure prints the seed and the
schedule). A kill or a cut that hits a replica holding a channel leaves its leases to run out
(README, "A replica that dies"): the run lasts about the schedule plus one lease.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import pytest

from bridge.channels import Sender
from bridge.policy import ChannelPolicy
from tests.bridge_server import (
    OK_PACKET,
    Subprocess,
    children,
    free_port,
    get,
    gone,
    post_callback,
    write_config,
)
from tests.conftest import PostgresSQL
from tests.pg_proxy import PgProxy
from tests.slack_standin import SinkRequest, SlackStandIn
from tests.test_crash_loop import Flapper
from tests.test_replicas import EVENT_TIME_MS, event_body, eventually, states, store_url

SEED = int(os.environ.get("CRASH_LOOP_SEED", "20261207"))
REPLICAS = ("a", "b", "c")
OWN_PROCESS = "b"  # delivers from a process of its own
SINKS = ("one", "two")  # every event goes to both
MAX_IN_FLIGHT = 4
TIMEOUT_S = 1.0  # [delivery] timeout_s: the leases of a dead replica run out sooner
CALLBACKS_PER_S = 15.0  # to each replica
ROOMS = 8  # each replica's callbacks go to its own rooms, in turn
SINK_DELAY_S = 0.02  # so that sends are in flight when a kill or a cut comes
# Each kind once a run, in an order the seed draws.
KINDS = ("kill", "kill at ok", "kill delivery", "cut one", "cut all", "kill")
REFUSED = (503, b'{"ActionStatus":"FAIL","ErrorInfo":"store unavailable","ErrorCode":503}')

UNDELIVERED_SQL = """
SELECT id, channel, state, owner, lease_until - extract(epoch FROM clock_timestamp())
FROM deliveries WHERE state <> 'delivered' ORDER BY id LIMIT 20
"""

POLICY = ChannelPolicy("sink", cast(Sender, None), max_in_flight=MAX_IN_FLIGHT)
LEASE_S = POLICY.lease_s(TIMEOUT_S)


def body(key: str) -> bytes:
    """The callback of event `key`: "ROOM/N", the Nth callback a poster made, in room ROOM."""
    room, n = key.split("/")
    return event_body(int(n), room)


def key_of(request: SinkRequest) -> str:
    event = json.loads(request.body)["event"]
    return f"{event['RoomId']}/{event['EventTime'] - EVENT_TIME_MS}"


@dataclass
class Poster:
    """Distinct callbacks posted to one replica at a steady rate from a thread (as a load
    balancer passes them on), and what it answered."""

    name: str
    url: str
    kill: Callable[[], None]
    acknowledged: list[str] = field(default_factory=list)  # event keys, in the order posted
    refused: list[str] = field(default_factory=list)  # 503 FAIL: the database away
    unanswered: list[str] = field(default_factory=list)  # down, or died mid-request
    not_ok: list[tuple[str, int, bytes]] = field(default_factory=list)  # any other answer
    stop: threading.Event = field(default_factory=threading.Event)
    # Set: kill the replica the moment its next OK arrives (then cleared).
    kill_at_next_ok: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        next_at = time.monotonic()
        for n in itertools.count():
            if self.stop.is_set():
                return
            key = f"{self.name}-{n % ROOMS}/{n}"
            try:
                answer = post_callback(self.url, body(key))
            except (OSError, http.client.HTTPException):
                self.unanswered.append(key)
            else:
                if answer == (200, OK_PACKET):
                    self.acknowledged.append(key)
                    if self.kill_at_next_ok.is_set():
                        self.kill()
                        self.kill_at_next_ok.clear()
                elif answer == REFUSED:
                    self.refused.append(key)
                else:
                    self.not_ok.append((key, *answer))
            next_at = max(next_at + 1 / CALLBACKS_PER_S, time.monotonic() - 0.5)
            time.sleep(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True)
class Round:
    kind: str
    after_s: float  # from the end of the round before
    victim: str  # a replica; for "cut all", the one killed during the cut if `kill`
    down_s: float  # how long the replica stays dead, or the database away
    kill: bool = False  # "cut one" and "cut all": the victim is also killed during the cut

    def __str__(self) -> str:
        during = f" + kill {self.victim}" if self.kill else ""
        return f"{self.after_s}s {self.kind} {self.victim} {self.down_s}s{during}"


def schedule(rng: random.Random) -> list[Round]:
    rounds = []
    for kind in rng.sample(KINDS, len(KINDS)):
        after, victim = round(rng.uniform(0.3, 1.5), 2), rng.choice(REPLICAS)
        if kind == "kill delivery":
            rounds.append(Round(kind, after, OWN_PROCESS, 0.0))
        elif kind.startswith("cut"):
            # Longer than a callback waits for a connection (1.5 s): some are refused.
            down = round(rng.uniform(2.0, 3.0), 2)
            rounds.append(Round(kind, after, victim, down, kill=rng.random() < 0.5))
        else:
            rounds.append(Round(kind, after, victim, round(rng.uniform(0.0, 0.3), 2)))
    return rounds


@dataclass
class Disruption:
    """One kill or cut: when, and how many sends it may have left unrecorded."""

    began: float
    ended: float
    repeats_at_most: int

    def explains(self, first_200: float) -> bool:
        """Whether a delivery answered 200 at `first_200` and sent again may owe it to this.
        A kill: sent within a second before it (the outcome not committed yet), or answered
        just after it (the sink records a request when it answers). A cut: sent shortly
        before or during it, or up to a few seconds after it, while the replica's pool connects
        again (psycopg_pool backs off between tries) and the outcome fails to commit."""
        return self.began - 1.0 < first_200 < self.ended + 5.0


def sink_keys(slack: SlackStandIn, flapper: Flapper, sink: str) -> set[str]:
    """The events sink `sink` took with a 200 (or while switching, unknowable)."""
    return {
        key_of(r)
        for r in slack.sink_requests
        if r.path == f"/sink/{sink}" and flapper.answered(r) != 503
    }


def stored_keys(postgres_sql: PostgresSQL) -> set[str]:
    rows = postgres_sql("SELECT room_id || '/' || (event_time - %s) FROM events", EVENT_TIME_MS)
    return {row[0] for row in rows}


def out_of_order(
    requests: list[SinkRequest], flapper: Flapper, posters: Iterable[Poster]
) -> list[tuple[str, str, str]]:
    """(sink, earlier, later) for each event a sink got before it had taken (200) the event
    acknowledged before it in its room: each room goes out in Tencent's order, kills and cuts
    notwithstanding. Only events acknowledged at once count: Tencent's later retries of the
    others come out of order by nature."""
    first_sent: dict[tuple[str, str], float] = {}
    first_taken: dict[tuple[str, str], float] = {}
    for request in requests:  # in the order the sink answered them
        at = (request.path, key_of(request))
        first_sent.setdefault(at, request.received_at)
        if flapper.answered(request) != 503:  # 200, or unknowable: never a false alarm
            first_taken.setdefault(at, request.received_at)
    found = []
    for poster in posters:
        last: dict[str, str] = {}  # each room's event acknowledged last
        for key in poster.acknowledged:
            room = key.split("/")[0]
            if (earlier := last.get(room)) is not None:
                for sink in SINKS:
                    path = f"/sink/{sink}"
                    if first_sent[(path, key)] < first_taken[(path, earlier)]:
                        found.append((sink, earlier, key))
            last[room] = key
    return found


def delivery_pids(bridge: Subprocess) -> list[int]:
    assert bridge.process is not None
    return children(bridge.process.pid)


@dataclass
class Replicas:
    """The replicas, their proxies and callers, and the rounds played on them so far."""

    bridges: dict[str, Subprocess]
    proxies: dict[str, PgProxy]
    posters: dict[str, Poster]
    context: str
    disruptions: list[Disruption] = field(default_factory=list)
    delivery_pids: set[int] = field(default_factory=set)  # every one seen

    def play(self, step: Round) -> None:
        self.note_delivery_pids()
        if step.kind.startswith("cut"):
            self.cut(step)
            return
        if step.kind == "kill":
            self.bridges[step.victim].kill()
        elif step.kind == "kill at ok":
            at_ok = self.posters[step.victim].kill_at_next_ok
            at_ok.set()
            assert eventually(lambda: not at_ok.is_set(), 10, every=0.01), self.context
        else:  # the delivery process alone: its server starts another
            owner = self.bridges[OWN_PROCESS]
            assert eventually(lambda: bool(delivery_pids(owner)), 20), self.context
            for pid in delivery_pids(owner):
                os.kill(pid, signal.SIGKILL)
        self.killed()
        if step.kind != "kill delivery":
            time.sleep(step.down_s)
            self.restart(step.victim)

    def cut(self, step: Round) -> None:
        began = time.monotonic()
        cut = [step.victim] if step.kind == "cut one" else list(REPLICAS)
        for name in cut:
            self.proxies[name].cut()
        if step.kill:
            time.sleep(step.down_s / 2)
            self.bridges[step.victim].kill()
            self.killed()
            time.sleep(step.down_s / 2)
        else:
            time.sleep(step.down_s)
        for name in cut:
            self.proxies[name].restore()
        claims = len(cut) * len(SINKS) * POLICY.claim_limit()
        self.disruptions.append(Disruption(began, time.monotonic(), claims))
        if step.kill:
            self.restart(step.victim)

    def killed(self) -> None:
        now = time.monotonic()
        self.disruptions.append(Disruption(now, now, len(SINKS) * MAX_IN_FLIGHT))

    def restart(self, name: str) -> None:
        bridge = self.bridges[name]
        bridge.start()
        assert bridge.process is not None and bridge.process.poll() is None, (
            f"{self.context}; {name} did not start again"
        )

    def note_delivery_pids(self) -> None:
        self.delivery_pids.update(delivery_pids(self.bridges[OWN_PROCESS]))

    def ready(self) -> bool:
        return all(get(bridge.url + "/readyz")[0] == 200 for bridge in self.bridges.values())


def start_replicas(
    stack: contextlib.ExitStack, tmp_path: Path, postgres_url: str, channels: str, routes: str
) -> tuple[dict[str, Subprocess], dict[str, PgProxy]]:
    """Each replica behind a proxy of its own, started side by side; all stopped with `stack`."""
    server = urlsplit(postgres_url)
    upstream = (server.hostname or "127.0.0.1", server.port or 5432)
    proxies = {name: stack.enter_context(PgProxy(*upstream)) for name in REPLICAS}
    # Short backoff: retries keep up with the flapping; nothing may become a dead letter.
    delivery = "initial_backoff_s = 0.05\nmax_backoff_s = 0.3\nmax_attempts = 1000\n"
    bridges: dict[str, Subprocess] = {}
    for name in REPLICAS:
        folder = tmp_path / name
        folder.mkdir()
        port = free_port()
        own = f"own_process = {str(name == OWN_PROCESS).lower()}\n"
        store = f'url = "{store_url(postgres_url, proxies[name].port)}"\n'
        config = write_config(
            folder, port, channels=channels, routes=routes, store=store, delivery=delivery + own
        )
        bridges[name] = Subprocess(config, port, folder / "bridge.log")
        stack.callback(bridges[name].__exit__, None, None, None)
    starting = [threading.Thread(target=bridge.start) for bridge in bridges.values()]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    return bridges, proxies


def test_replicas_in_a_crash_loop_with_the_database_cut_lose_no_acknowledged_event(
    tmp_path: Path, postgres_url: str, postgres_sql: PostgresSQL, slack: SlackStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("finding the delivery process needs Linux /proc")
    monkeypatch.setenv("LIVE_BRIDGE_DELIVERY__TIMEOUT_S", str(TIMEOUT_S))
    rounds = schedule(random.Random(SEED))
    context = f"seed {SEED} (CRASH_LOOP_SEED): {'; '.join(map(str, rounds))}; logs in {tmp_path}"
    channels = "".join(
        f'[channels.{sink}]\ntype = "webhook"\nurl = "{slack.sink_url(sink)}"\n'
        f'max_in_flight = {MAX_IN_FLIGHT}\nsigning_secret = "whsec_{"A" * 32}"\n'
        for sink in SINKS
    )
    routes = f'[[routes]]\nname = "all"\nchannels = {json.dumps(list(SINKS))}\n'
    for sink in SINKS:
        slack.set_sink_delay(sink, SINK_DELAY_S)
    flapper = Flapper(slack, names=SINKS)
    flapper.set(200)

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        bridges, proxies = start_replicas(stack, tmp_path, postgres_url, channels, routes)
        for bridge in bridges.values():
            assert bridge.process is not None and bridge.process.poll() is None, context
        started_s = time.monotonic() - began
        posters = {name: Poster(name, bridges[name].url, bridges[name].kill) for name in REPLICAS}
        replicas = Replicas(bridges, proxies, posters, context)
        threads = [threading.Thread(target=p.run) for p in posters.values()]
        threads.append(threading.Thread(target=flapper.run))
        for thread in threads:
            thread.start()
        try:
            for step in rounds:
                time.sleep(step.after_s)
                replicas.play(step)
            time.sleep(1.0)  # callbacks into the last runs too
        finally:
            for poster in posters.values():
                poster.stop.set()
            flapper.stop.set()
            for thread in threads:
                thread.join(timeout=15)
        flapper.set(200)
        replicas.note_delivery_pids()
        disrupted_until = time.monotonic()

        acknowledged = {key for p in posters.values() for key in p.acknowledged}
        refused = {key for p in posters.values() for key in p.refused}
        unanswered = {key for p in posters.values() for key in p.unanswered}
        assert [a for p in posters.values() for a in p.not_ok] == [], context
        assert len(acknowledged) > 300, context  # the loop ran under load
        assert unanswered, context  # the kills hit it
        assert refused, context  # and so did the cuts
        # Refused or unanswered, and stored all the same: the write committed, the answer lost.
        stored_anyway = len(stored_keys(postgres_sql) & (refused | unanswered))

        # Tencent sends a failed callback again; by now every replica reaches the database.
        assert eventually(replicas.ready, 30), context
        retried: dict[str, tuple[int, bytes]] = {}
        for n, key in enumerate(sorted(refused | unanswered)):
            url = bridges[REPLICAS[n % len(REPLICAS)]].url
            retried[key] = post_callback(url, body(key))
        assert all(answer == (200, OK_PACKET) for answer in retried.values()), (
            f"{context}; {Counter(retried.values())}"
        )
        everything = acknowledged | refused | unanswered

        # A dead replica's leases run out within LEASE_S; then what it held is sent again.
        def all_there() -> bool:
            return all(sink_keys(slack, flapper, sink) >= everything for sink in SINKS)

        assert eventually(all_there, LEASE_S + 30), (
            f"{context}; never delivered: "
            f"{ {s: sorted(everything - sink_keys(slack, flapper, s))[:10] for s in SINKS} }"
        )
        drained_s = time.monotonic() - disrupted_until
        # A delivery sent just before its replica died (answered 200, not recorded) stays in
        # flight until its lease runs out, then is sent again.
        done = {(sink, "delivered"): len(everything) for sink in SINKS}
        assert eventually(lambda: states(postgres_sql) == done, LEASE_S + 30), (
            f"{context}; {states(postgres_sql)}; not delivered (id, channel, state, owner, lease "
            f"left): {postgres_sql(UNDELIVERED_SQL)}"
        )
    # Every process stopped, the delivery processes with their servers (killed or not).
    left = replicas.delivery_pids
    assert eventually(lambda: all(gone(pid) for pid in left), 15), (
        f"{context}; delivery processes left: {[pid for pid in left if not gone(pid)]}"
    )

    # Stored once each (Tencent's retries of the stored ones were duplicates), with both
    # deliveries.
    events = postgres_sql(
        "SELECT e.room_id || '/' || (e.event_time - %s), count(DISTINCT e.id), count(d.id)"
        " FROM events e JOIN deliveries d ON d.event_id = e.id GROUP BY 1",
        EVENT_TIME_MS,
    )
    assert {key for key, _, _ in events} == everything, context
    assert [row for row in events if row[1:] != (1, len(SINKS))] == [], context

    ids_by_delivery: dict[tuple[str, str], set[str]] = {}
    answered_200: dict[str, list[float]] = {}
    requests = slack.sink_requests
    for request in requests:
        webhook_id = request.headers["webhook-id"]
        ids_by_delivery.setdefault((request.path, key_of(request)), set()).add(webhook_id)
        if flapper.answered(request) == 200:
            answered_200.setdefault(webhook_id, []).append(request.received_at)
    # A delivery keeps its webhook-id across attempts, replicas and restarts.
    assert all(len(ids) == 1 for ids in ids_by_delivery.values()), context
    disorder = out_of_order(requests, flapper, posters.values())
    assert disorder == [], f"{context}; sent before its room's event before: {disorder[:10]}"
    repeated = {w: times for w, times in answered_200.items() if len(times) > 1}
    unexplained = {
        w: times
        for w, times in repeated.items()
        if not any(d.explains(min(times)) for d in replicas.disruptions)
    }
    assert unexplained == {}, (
        f"{context}; sent twice with no kill or cut near: {unexplained}; "
        f"disruptions {[(d.began, d.ended) for d in replicas.disruptions]}"
    )
    repeats = sum(len(times) - 1 for times in repeated.values())
    bound = sum(d.repeats_at_most for d in replicas.disruptions)
    print(f"{context}: started in {started_s:.1f}s, rounds done {disrupted_until - began:.1f}s "
          f"in; {len(acknowledged)} acknowledged, {len(refused)} refused, {len(unanswered)} "
          f"unanswered ({stored_anyway} of these stored all the same); all delivered "
          f"{drained_s:.1f}s after the rounds; {repeats} repeated 200s (at most {bound}); "
          f"{len(requests) / len(ids_by_delivery):.2f} requests a delivery")  # fmt: skip
    assert repeats <= bound, context
