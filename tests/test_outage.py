"""Outage: the sink is down for a while, then up. The bridge backs off visibly (each delivery's
attempts spread out, doubling up to the cap), stays idle while it waits (its own CPU time, so a
loaded machine does not matter), and delivers everything once the sink is back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge.channels import Outcome, retry
from bridge.config_tables import DeliveryConfig
from bridge.policy import ChannelPolicy
from bridge.store import NewDelivery, NewEvent
from bridge.store.sqlite import SQLiteStore
from bridge.worker import Worker
from tests.bridge_server import (
    OK_PACKET,
    SEED_BODY,
    SINK_ROUTE,
    Subprocess,
    children,
    cpu_seconds,
    delivery_states,
    free_port,
    post_callback,
    signed_sink,
    signing_secret,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn
from tests.test_worker import make_composer

APP = 1400000000
OWNER = "Live.CallbackAfterChangeOwner"

INITIAL_S = 0.2
CAP_S = 2.0
OUTAGE_S = 6.5
LATE_S = 1.0  # how much later than its backoff an attempt may come on a busy machine (a stall
# of the bridge process of 0.5-0.7 s, as a helper froze it, made 0.5 too little)
ROOMS = [f"outage-{n}" for n in range(20)]


def owner_change(room: str) -> bytes:
    return SEED_BODY.replace(b'"room_id"', json.dumps(room).encode())


def backoff_bounds(attempt: int) -> tuple[float, float]:
    """The worker's wait after failed attempt `attempt`: doubling, capped, jittered to half."""
    base = min(CAP_S, INITIAL_S * 2 ** (attempt - 1))
    return max(INITIAL_S, base / 2), base


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
def test_outage_backs_off_idles_and_then_delivers_everything(
    tmp_path: Path, slack: SlackStandIn, own_process: bool
) -> None:
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("reading a process's CPU time needs Linux /proc")
    port = free_port()
    secret = signing_secret()
    channels, routes = signed_sink(slack.sink_url(), secret), SINK_ROUTE
    delivery = f"initial_backoff_s = {INITIAL_S}\nmax_backoff_s = {CAP_S}\nmax_attempts = 50\n"
    delivery += f"own_process = {str(own_process).lower()}\n"
    config = write_config(tmp_path, port, channels=channels, routes=routes, delivery=delivery)
    slack.set_sink_status("sink", 503)
    with Subprocess(config, port, tmp_path / "bridge.log") as bridge:
        assert bridge.process is not None
        began = time.monotonic()
        for room in ROOMS:
            assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
            time.sleep(0.05)
        time.sleep(max(0.0, began + 2.5 - time.monotonic()))
        processes = [bridge.process.pid, *children(bridge.process.pid)]
        assert len(processes) == (2 if own_process else 1)
        cpu_before, wall_before = cpu_seconds(*processes), time.monotonic()
        time.sleep(3.0)
        cpu = cpu_seconds(*processes) - cpu_before
        wall = time.monotonic() - wall_before
        time.sleep(max(0.0, began + OUTAGE_S - time.monotonic()))
        outage_ended = time.monotonic()
        slack.set_sink_status("sink", 200)

        def rooms_delivered(s: SlackStandIn) -> set[str]:
            return {
                json.loads(r.body)["event"]["RoomId"]
                for r in s.sink_requests
                if r.received_at > outage_ended
            }

        assert slack.wait_for(lambda s: rooms_delivered(s) == set(ROOMS), timeout=CAP_S + 8)
        db = tmp_path / "bridge.db"
        assert wait_until(lambda: delivery_states(db) == {"delivered": len(ROOMS)})

    # Waiting for a backoff is sleeping: a busy loop would show as a whole core.
    assert cpu / wall < 0.15, f"the bridge used {cpu:.2f}s of CPU in {wall:.2f}s of outage"

    attempts: dict[str, list[float]] = {}
    for request in slack.sink_requests:
        attempts.setdefault(request.headers["webhook-id"], []).append(request.received_at)
    assert len(attempts) == len(ROOMS)  # one stable webhook-id per delivery
    gaps_by_attempt: dict[int, list[float]] = {}
    for webhook_id, times in attempts.items():
        failed = [t for t in times if t < outage_ended]
        assert len(failed) >= 5, f"{webhook_id}: only {len(failed)} attempts in the outage"
        after = [t - outage_ended for t in times if t >= outage_ended]
        assert len(after) == 1, f"{webhook_id}: attempts after the outage at {after}"
        for attempt, (sent, again) in enumerate(itertools.pairwise(times), start=1):
            low, high = backoff_bounds(attempt)
            if again >= outage_ended:
                # Once a delivery gets through, those backing off are due at once (together,
                # as digests where the channel has them): never later than their backoff.
                low = 0.0
            gap = again - sent
            assert low - 0.02 <= gap <= high + LATE_S, (
                f"{webhook_id}: {gap:.2f}s after attempt {attempt}, not in [{low}, {high}]s"
            )
            if again < outage_ended:
                gaps_by_attempt.setdefault(attempt, []).append(gap)
    medians = {n: round(statistics.median(g), 2) for n, g in sorted(gaps_by_attempt.items())}
    print(f"CPU {cpu:.2f}s in {wall:.2f}s; median wait after each attempt: {medians}")
    # Visible growth: the fourth wait is longer than the first by most of what doubling adds
    # (0.2 s, then 0.8-1.6 s), and the cap holds. By the difference, not a ratio: a machine that
    # stalls the bridge lengthens every wait alike (a helper's stalls made them 0.56 and 1.18 s).
    first, fourth = (statistics.median(gaps_by_attempt[n]) for n in (1, 4))
    assert fourth - first > 0.5, f"median waits {first:.2f}s then {fourth:.2f}s"
    assert max(max(gaps) for gaps in gaps_by_attempt.values()) <= CAP_S + LATE_S


@pytest.mark.anyio
async def test_waiting_out_a_backoff_does_not_poll_the_store(tmp_path: Path) -> None:
    """CPU time cannot tell a 50 Hz poll of a small store from sleeping; the store's calls can."""

    class Down:
        async def send(self, payload: str, message_key: str, thread: Any = None) -> Outcome:
            return retry("HTTP 503")

    store = SQLiteStore(tmp_path / "bridge.db")
    await store.open()
    calls: Counter[str] = Counter()
    for name in ("due_channels", "next_due"):
        real = getattr(store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return await _real(*args)

        setattr(store, name, counted)
    for n in range(5):
        event = NewEvent(APP, OWNER, f"r{n}", None, "{}", "{}", f"k{n}")
        await store.record(event, [NewDelivery("sink", '{"text": "x"}')], time.time(), 0)
    settings = DeliveryConfig(initial_backoff_s=1.0, max_backoff_s=1.0, max_attempts=50)
    composer = make_composer(tmp_path, {"sink": 'type = "console"'})
    worker = Worker(store, {"sink": ChannelPolicy("sink", Down())}, settings, composer, 3600)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(3.0)
    await worker.stop(1.0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()
    # About two passes per retry round (a lane ends, the backoff ends): a dozen in 3 s.
    assert sum(calls.values()) < 60, calls
