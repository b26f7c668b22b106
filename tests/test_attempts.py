"""What attempts.py makes of each outcome: retries with backoff, dead letters, threads; through a
running Worker against the Slack stand-in and a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from bridge.attempts import backoff
from bridge.channels import Outcome, Result, Thread
from bridge.policy import ChannelPolicy
from bridge.store import StoreUnavailable
from bridge.store.sqlite import SQLiteStore
from tests.bridge_server import db_rows
from tests.slack_standin import SlackStandIn
from tests.store_rows import sqlite_opener
from tests.test_worker import (
    CHANNEL,
    SETTINGS,
    SLACK,
    OpenStore,
    attempts,
    deliveries,
    eventually,
    make_composer,
    make_worker,
    record,
    record_in,
    running,
    senders,
    states,
    worker_with,
)

pytestmark = pytest.mark.anyio


open_store = pytest.fixture(sqlite_opener)


PROHIBITED = {"status": 403, "error": "action_prohibited", "kind": "webhook"}


@pytest.mark.parametrize(
    ("channel", "force"),
    [
        ("bot", {"status": 500, "kind": "api"}),
        ("bot", {"status": 200, "error": "internal_error", "kind": "api"}),
        ("hook", {"status": 503, "kind": "webhook"}),
    ],
)
async def test_transient_errors_are_retried_until_delivered(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    open_store: OpenStore,
    channel: str,
    force: dict[str, Any],
    tmp_path: Path,
) -> None:
    store = await open_store()
    slack.fail_next(2, **force)
    await record(store, channel)
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await eventually(lambda: states(store.path) == ["delivered"])
    ((_, _, attempts, _),) = deliveries(store.path)
    assert attempts == 3  # every try counts, the successful one included
    assert (slack.requests_seen, len(slack.posted)) == (3, 1)


@pytest.mark.parametrize(
    ("channel", "bot_channel", "force", "error"),
    [
        ("bot", "C0NOTHERE", None, "HTTP 200: channel_not_found"),
        ("bot", CHANNEL, {"error": "not_in_channel"}, "HTTP 200: not_in_channel"),
        ("bot", CHANNEL, {"error": "invalid_auth"}, "HTTP 200: invalid_auth"),
        ("hook", CHANNEL, PROHIBITED, "HTTP 403: action_prohibited"),
    ],
)
async def test_permanent_failure_is_dead_after_one_attempt(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    open_store: OpenStore,
    channel: str,
    bot_channel: str,
    force: dict[str, Any] | None,
    error: str,
    tmp_path: Path,
) -> None:
    store = await open_store()
    if force is not None:
        slack.fail_next(1, **force)
    await record(store, channel)
    async with running(make_worker(store, senders(slack, session, bot_channel), tmp_path)):
        await eventually(lambda: states(store.path) == ["dead"])
        await asyncio.sleep(SETTINGS.max_backoff_s)  # time for a retry that must not come
    assert deliveries(store.path) == [(channel, "dead", 1, error)]
    assert slack.requests_seen == 1
    assert slack.posted == []


class Unexpected:
    """A sender that fails in a way no sender classifies, quoting a secret as libraries may."""

    url = "https://hooks.example/T0/B0/s3cr3tPath"

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        raise ValueError(f"cannot post to {self.url}: bad header")


async def test_an_unexpected_sender_error_is_retried_and_logged_without_its_message(
    open_store: OpenStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    await record(store, "odd")
    with caplog.at_level(logging.ERROR, logger="bridge.worker"):
        async with running(make_worker(store, {"odd": Unexpected()}, tmp_path)):
            await eventually(lambda: states(store.path) == ["dead"])
    assert deliveries(store.path) == [
        ("odd", "dead", 3, "gave up after 3 attempts: internal error in sender")
    ]
    logged = "\n".join(caplog.text.splitlines())
    assert "sender failed: ValueError" in logged and "in send" in logged  # type and frames
    assert "s3cr3t" not in logged and "hooks.example" not in logged


class Answers:
    """A sender that gives `outcome` and counts its sends."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.sends = 0

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        self.sends += 1
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "wait_s", "attempts_counted"),
    [
        # A 5xx's Retry-After is a minimum over the backoff (0.05 s here).
        (Outcome(Result.RETRY, "HTTP 503", 600.0), 600.0, 1),
        # A 429 waits what it says, its attempt given back.
        (Outcome(Result.RETRY, "HTTP 429", 30.0, rate_limited=True), 30.0, 0),
    ],
    ids=["503 with Retry-After", "429"],
)
async def test_a_retry_is_due_when_the_far_end_said(
    open_store: OpenStore, tmp_path: Path, outcome: Outcome, wait_s: float, attempts_counted: int
) -> None:
    store = await open_store()
    await record(store, "odd")
    sender = Answers(outcome)
    before = time.time()
    async with running(make_worker(store, {"odd": sender}, tmp_path)):
        await eventually(lambda: sender.sends == 1 and states(store.path) == ["pending"])
        await asyncio.sleep(0.3)  # past the backoff: no second send before the time said
    assert sender.sends == 1
    ((due, attempts),) = db_rows(store.path, "SELECT next_attempt_at, attempts FROM deliveries")
    assert before + wait_s <= due <= time.time() + wait_s
    assert attempts == attempts_counted


class Flaky(SQLiteStore):
    """A store that cannot take the first `failures` outcomes (a connection the server ended)."""

    failures = 2

    async def mark_delivered(self, delivery_id: int, now: float) -> bool:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("store unavailable: terminating connection")
        return await super().mark_delivered(delivery_id, now)


async def test_an_outcome_the_store_could_not_take_is_written_again(tmp_path: Path) -> None:
    # Lost, the delivered mark left the claim to its lease: the message went out again when it
    # ran out, its room held up meanwhile.
    store = Flaky(tmp_path / "bridge.db")
    await store.open()
    try:
        await record(store, "odd")
        sender = Answers(Outcome(Result.DELIVERED))
        async with running(make_worker(store, {"odd": sender}, tmp_path)):
            await eventually(lambda: states(store.path) == ["delivered"])
        assert (sender.sends, store.failures) == (1, 0)
    finally:
        await store.close()


class TakenOverMidSend:
    """A sender during whose send another store instance claims the delivery, as when this
    process stalled past its claim's lease; then it gives `outcome`."""

    def __init__(self, other: SQLiteStore, outcome: Outcome) -> None:
        self.other, self.outcome = other, outcome

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        assert len(await self.other.claim("odd", time.time() + 3600, 10, 30)) == 1
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "said"),
    [
        (Outcome(Result.DELIVERED), "sent"),
        (Outcome(Result.RETRY, "HTTP 503"), "HTTP 503"),
        (Outcome(Result.RETRY, "HTTP 429", 30.0, rate_limited=True), "HTTP 429"),
        (Outcome(Result.PERMANENT, "HTTP 404: no_service"), "HTTP 404: no_service"),
    ],
    ids=["delivered", "retry", "rate limited", "dead"],
)
async def test_an_outcome_after_the_claim_passed_on_is_logged_as_not_recorded(
    open_store: OpenStore, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    outcome: Outcome, said: str,
) -> None:  # fmt: skip
    # It was logged as the outcome ("delivered", "retry in 5.0s") though the store kept none of
    # it: the delivery is the other instance's, which sends it and records its own outcome.
    store, other = await open_store(), await open_store()
    await record(store, "odd")
    sender = TakenOverMidSend(other, outcome)
    with caplog.at_level(logging.INFO, logger="bridge.worker"):
        worker = make_worker(store, {"odd": sender}, tmp_path)
        async with running(worker):
            await eventually(lambda: "not recorded" in caplog.text)
    ((line,),) = [[r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]]
    assert line.startswith("not recorded event=") and "channel=odd attempt=1: " in line
    assert f": {said}, but the delivery is no longer this process's claim" in line
    logged = caplog.text
    assert "delivered event=" not in logged and "dead letter" not in logged
    assert "retry event=" not in logged and "rate limited event=" not in logged
    assert deliveries(store.path) == [("odd", "in_flight", 2, None)]  # the other's claim
    state = worker.states["odd"]  # neither a success nor an error of its own
    assert (state.last_success_at, state.last_error) == (None, None)


async def test_dead_when_attempts_run_out(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    slack.fail_next(10, status=500, kind="api")
    await record(store, "bot")
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await eventually(lambda: states(store.path) == ["dead"])
        await asyncio.sleep(SETTINGS.max_backoff_s)
    assert deliveries(store.path) == [
        ("bot", "dead", 3, "gave up after 3 attempts: HTTP 500: internal_error")
    ]
    assert (slack.requests_seen, slack.posted) == (3, [])


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum", "low", "high"),
    [
        (1, 1.0, 300.0, 1.0, 1.0),
        (2, 1.0, 300.0, 1.0, 2.0),
        (3, 1.0, 300.0, 2.0, 4.0),
        (4, 1.0, 300.0, 4.0, 8.0),
        (9, 1.0, 300.0, 128.0, 256.0),
        (10, 1.0, 300.0, 150.0, 300.0),
        (5000, 1.0, 300.0, 150.0, 300.0),
        (2, 1.0, 1.5, 1.0, 1.5),
        (3, 0.05, 0.2, 0.1, 0.2),
        (7, 5.0, 5.0, 5.0, 5.0),
    ],
)
def test_backoff_doubles_with_jitter_within_bounds(
    attempt: int, initial: float, maximum: float, low: float, high: float
) -> None:
    delays = [backoff(attempt, initial, maximum) for _ in range(300)]
    assert all(low <= d <= high for d in delays)
    assert all(initial <= d <= maximum for d in delays)
    assert (len(set(delays)) > 1) == (low < high)  # jittered wherever there is room


def thread_policy(
    slack: SlackStandIn, session: aiohttp.ClientSession, ttl_s: float
) -> ChannelPolicy:
    bot = senders(slack, session)["bot"]
    return ChannelPolicy("bot", bot, thread_by_room=True, reply_broadcast=True, thread_ttl_s=ttl_s)


def by_label(slack: SlackStandIn) -> dict[str, dict[str, Any]]:
    return {str(p.payload["text"]): p.payload | {"ts": p.ts} for p in slack.posted}


async def test_each_room_has_its_thread_across_restarts(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    composer = make_composer(tmp_path, {"bot": SLACK})
    store = await open_store()
    for room, event_time in [("R", 1000), ("S", 1500), ("R", 2000), ("S", 2500)]:
        await record_in(store, "bot", room, event_time)
    async with running(worker_with(store, composer, thread_policy(slack, session, 3600))):
        await eventually(lambda: len(slack.posted) == 4)
    posts = by_label(slack)
    parent, other = posts["R@1000"], posts["S@1500"]
    assert "thread_ts" not in parent and "thread_ts" not in other  # each room starts its own
    for reply, thread in [(posts["R@2000"], parent), (posts["S@2500"], other)]:
        assert (reply["thread_ts"], reply["reply_broadcast"]) == (thread["ts"], True)

    # A restart: a new store on the same file, a new sender and worker remember the thread.
    await store.close()
    store = await open_store()
    await record_in(store, "bot", "R", 3000)
    async with running(worker_with(store, composer, thread_policy(slack, session, 3600))):
        await eventually(lambda: len(slack.posted) == 5)
    assert by_label(slack)["R@3000"]["thread_ts"] == parent["ts"]

    # A workspace that never saw the parent answers thread_not_found: the worker forgets the
    # thread and the message goes out again as the parent of a new one.
    await record_in(store, "bot", "R", 4000)
    with SlackStandIn() as fresh:
        worker = worker_with(store, composer, thread_policy(fresh, session, 3600))
        async with running(worker):
            await eventually(lambda: len(fresh.posted) == 1)
            await record_in(store, "bot", "R", 5000)
            worker.wake()
            await eventually(lambda: len(fresh.posted) == 2)
        posts = by_label(fresh)
        assert fresh.requests_seen == 3
    assert "thread_ts" not in posts["R@4000"]
    assert posts["R@5000"]["thread_ts"] == posts["R@4000"]["ts"]
    assert attempts(store.path)[-2:] == [1, 1]  # the refused reply cost no attempt


async def test_rooms_of_one_name_in_two_apps_have_a_thread_each(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # One bridge may serve several apps, each naming its own rooms: app 2's "R" is not app 1's.
    composer = make_composer(tmp_path, {"bot": SLACK})
    store = await open_store()
    for app, event_time in [(1, 1000), (2, 1500), (1, 2000), (2, 2500)]:
        await record_in(store, "bot", "R", event_time, app=1400000000 + app)
    async with running(worker_with(store, composer, thread_policy(slack, session, 3600))):
        await eventually(lambda: len(slack.posted) == 4)
    posts = by_label(slack)
    assert "thread_ts" not in posts["R@1000"] and "thread_ts" not in posts["R@1500"]
    assert posts["R@2000"]["thread_ts"] == posts["R@1000"]["ts"]
    assert posts["R@2500"]["thread_ts"] == posts["R@1500"]["ts"]


async def test_a_thread_older_than_its_ttl_is_not_replied_to(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    open_store: OpenStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The threads' wall clock moves only when the test turns it: on the real clock, a worker
    # held up for 0.5 s between R@2000's thread and R@3000's send found that thread too old.
    now = [time.time()]
    monkeypatch.setattr("bridge.attempts.time", SimpleNamespace(time=lambda: now[0]))
    store = await open_store()
    await record_in(store, "bot", "R", 1000)
    policy = thread_policy(slack, session, ttl_s=0.5)
    worker = worker_with(store, make_composer(tmp_path, {"bot": SLACK}), policy)
    async with running(worker):
        await eventually(lambda: len(slack.posted) == 1)
        await eventually(lambda: len(db_rows(store.path, "SELECT * FROM threads")) == 1)
        now[0] += 0.7  # past the thread's 0.5 s
        await record_in(store, "bot", "R", 2000)
        await record_in(store, "bot", "R", 3000)
        worker.wake()
        await eventually(lambda: len(slack.posted) == 3)
    posts = by_label(slack)
    assert "thread_ts" not in posts["R@1000"] and "thread_ts" not in posts["R@2000"]
    assert posts["R@3000"]["thread_ts"] == posts["R@2000"]["ts"]
