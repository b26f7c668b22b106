"""Crash loop: a subprocess bridge under steady callbacks while the webhook sink flaps is killed
with SIGKILL several times at random moments and restarted on the same port and database. At the
end every acknowledged event has been delivered, and a delivery reached the sink twice with a 200
only when it was in flight at a kill.

A callback that cannot connect while the bridge is down, or whose connection dies with it, is not
acknowledged: Tencent sees a failure and sends it again, so it is not counted.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bridge_server import (
    OK_PACKET,
    SEED_BODY,
    SINK_ROUTE,
    Subprocess,
    db_rows,
    delivery_states,
    free_port,
    post_callback,
    signed_sink,
    signing_secret,
    wait_until,
    write_config,
)
from tests.slack_standin import SinkRequest, SlackStandIn

SEED = 20240611  # kill moments; printed with every failure, change it to explore
KILLS = 5
MAX_IN_FLIGHT = 4
CALLBACKS_PER_S = 60.0
FLAP_S = 0.3
SINK_DELAY_S = 0.02  # so that sends are in flight when a kill comes


def owner_change(room: str) -> bytes:
    return SEED_BODY.replace(b'"room_id"', json.dumps(room).encode())


@dataclass
class Callbacks:
    """Distinct callbacks posted at a steady rate from a thread, and what the bridge answered."""

    url: str
    acknowledged: list[str] = field(default_factory=list)
    not_ok: list[tuple[str, int, bytes]] = field(default_factory=list)  # answered, but not OK
    unanswered: int = 0  # the bridge was down or died mid-request
    stop: threading.Event = field(default_factory=threading.Event)
    # Set: kill the bridge the moment the next OK arrives (then cleared). An OK sent before its
    # commit would lose that event; a kill at a random moment rarely lands in so short a gap.
    kill_at_next_ok: threading.Event = field(default_factory=threading.Event)
    kill: Callable[[], None] = lambda: None

    def run(self) -> None:
        next_at = time.monotonic()
        for n in itertools.count():
            if self.stop.is_set():
                return
            room = f"crash-{n}"
            try:
                answer = post_callback(self.url, owner_change(room))
            except (OSError, http.client.HTTPException):
                self.unanswered += 1
            else:
                if answer == (200, OK_PACKET):
                    self.acknowledged.append(room)
                    if self.kill_at_next_ok.is_set():
                        self.kill()
                        self.kill_at_next_ok.clear()
                else:
                    self.not_ok.append((room, *answer))
            next_at = max(next_at + 1 / CALLBACKS_PER_S, time.monotonic() - 0.5)
            time.sleep(max(0.0, next_at - time.monotonic()))


@dataclass
class Flapper:
    """Switches the sink between 200 and 503; remembers when, to tell what each request got.

    The stand-in reads its status under the lock it records a request under, so a request
    recorded before a switch began got the old status and one recorded after it ended the new."""

    slack: SlackStandIn
    names: tuple[str, ...] = ("sink",)  # the sinks switched, together
    switches: list[tuple[float, float, int]] = field(default_factory=list)  # began, ended, status
    stop: threading.Event = field(default_factory=threading.Event)

    def set(self, status: int) -> None:
        began = time.monotonic()
        for name in self.names:
            self.slack.set_sink_status(name, status)
        self.switches.append((began, time.monotonic(), status))

    def run(self) -> None:
        status = 200
        while not self.stop.wait(FLAP_S):
            status = 503 if status == 200 else 200
            self.set(status)

    def answered(self, request: SinkRequest) -> int | None:
        """The status the sink gave `request`; None when it came in during a switch."""
        status = None
        for began, ended, new in self.switches:
            if request.received_at < began:
                break
            if request.received_at <= ended:
                return None
            status = new
        return status


def delivered_rooms(db: Path) -> set[str]:
    delivered = (
        "SELECT e.room_id FROM deliveries d JOIN events e ON e.id = d.event_id"
        " WHERE d.state = 'delivered'"
    )
    return {r[0] for r in db_rows(db, delivered)}


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
def test_kill_9_in_a_loop_loses_no_acknowledged_event(
    tmp_path: Path, slack: SlackStandIn, own_process: bool
) -> None:
    """With `own_process`, the kill hits the serving process; its delivery process reads the end
    of its pipe and stops with its sends, as the one process's worker does when killed."""
    rng = random.Random(SEED)
    port = free_port()
    secret = signing_secret()
    channels, routes = signed_sink(slack.sink_url(), secret, MAX_IN_FLIGHT), SINK_ROUTE
    # Short backoff: retries keep up with the flapping; nothing may become a dead letter.
    delivery = "initial_backoff_s = 0.05\nmax_backoff_s = 0.3\nmax_attempts = 1000\n"
    delivery += f"own_process = {str(own_process).lower()}\n"
    config = write_config(tmp_path, port, channels=channels, routes=routes, delivery=delivery)
    log = tmp_path / "bridge.log"
    slack.set_sink_delay("sink", SINK_DELAY_S)
    flapper = Flapper(slack)
    flapper.set(200)
    kill_after = [round(rng.uniform(0.1, 2.5), 2) for _ in range(KILLS)]
    down_for = [round(rng.uniform(0.0, 0.3), 2) for _ in range(KILLS)]
    context = f"seed {SEED}: kills after {kill_after}s, down {down_for}s; log {log}"

    killed_at: list[float] = []
    with Subprocess(config, port, log) as bridge:
        callbacks = Callbacks(bridge.url, kill=bridge.kill)
        threads = [threading.Thread(target=callbacks.run), threading.Thread(target=flapper.run)]
        for thread in threads:
            thread.start()
        try:
            for n, (after, down) in enumerate(zip(kill_after, down_for, strict=True)):
                time.sleep(after)
                if n % 2:  # every other kill comes right after an acknowledgement
                    callbacks.kill_at_next_ok.set()
                    assert wait_until(lambda: not callbacks.kill_at_next_ok.is_set()), context
                else:
                    bridge.kill()
                killed_at.append(time.monotonic())
                time.sleep(down)
                bridge.start()
            time.sleep(1.0)  # callbacks into the last run too
        finally:
            callbacks.stop.set()
            flapper.stop.set()
            for thread in threads:
                thread.join(timeout=15)
        flapper.set(200)

        acknowledged = set(callbacks.acknowledged)
        assert len(acknowledged) > 200, context  # the loop ran under load
        assert callbacks.unanswered > 0, context  # and the kills did hit it
        assert callbacks.not_ok == [], context  # a running bridge acknowledges every callback

        def not_refused_rooms(s: SlackStandIn) -> set[str]:
            return {
                json.loads(r.body)["event"]["RoomId"]
                for r in s.sink_requests
                if flapper.answered(r) != 503
            }

        assert slack.wait_for(lambda s: not_refused_rooms(s) >= acknowledged, timeout=20), (
            f"{context}; never delivered: {sorted(acknowledged - not_refused_rooms(slack))[:20]}"
        )
        db = tmp_path / "bridge.db"
        assert wait_until(lambda: set(delivery_states(db)) == {"delivered"}, timeout=10), (
            f"{context}; {delivery_states(db)}"
        )
        assert delivered_rooms(db) >= acknowledged, context

    requests = slack.sink_requests
    ids_by_room: dict[str, set[str]] = {}
    answered_200: dict[str, list[float]] = {}
    for request in requests:
        room = json.loads(request.body)["event"]["RoomId"]
        ids_by_room.setdefault(room, set()).add(request.headers["webhook-id"])
        if flapper.answered(request) == 200:
            answered_200.setdefault(request.headers["webhook-id"], []).append(request.received_at)
    # A delivery keeps its webhook-id across attempts and restarts: a receiver can drop repeats.
    assert all(len(ids) == 1 for ids in ids_by_room.values()), context
    # A 200 that came back after the last commit before a kill is sent again; nothing else is:
    # each repeat's first 200 came just before a kill, and a kill repeats what was in flight.
    repeats_by_kill = Counter[int]()
    for webhook_id, times in answered_200.items():
        if len(times) > 1:
            # The sink records a request when it answers: up to SINK_DELAY_S after a kill.
            kill = next((k for k, at in enumerate(killed_at) if at > times[0] - 0.25), None)
            assert kill is not None and killed_at[kill] - times[0] < 1.0, (
                f"{context}; {webhook_id} answered 200 at {times}, kills at {killed_at}"
            )
            repeats_by_kill[kill] += len(times) - 1
    repeats = sum(repeats_by_kill.values())
    attempts = len(requests) / max(1, len(ids_by_room))
    print(f"{context}: {len(acknowledged)} acknowledged, {callbacks.unanswered} unanswered, "
          f"repeated 200s by kill {[repeats_by_kill[k] for k in range(KILLS)]}, "
          f"{attempts:.2f} requests per delivery")  # fmt: skip
    assert repeats <= KILLS * MAX_IN_FLIGHT, (
        f"{context}; deliveries sent twice, by kill: {dict(repeats_by_kill)}"
    )
