from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bridge.channels import Sender
from bridge.channels.slack import SlackSender
from bridge.compose import Composer
from bridge.config import DeliveryConfig, SlackChannel, load_config
from bridge.render import Renderer
from bridge.store import NewDelivery, NewEvent
from bridge.store.sqlite import SQLiteStore
from bridge.worker import ChannelPolicy, Worker, backoff
from tests.bridge_server import write_config
from tests.slack_standin import SlackStandIn

pytestmark = pytest.mark.anyio

SETTINGS = DeliveryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2, timeout_s=2)
CHANNEL = "C0123456789"  # the bot channel ("bot")
OTHER = "C0OTHER00"  # the incoming webhook's channel ("hook")

PROHIBITED = {"status": 403, "error": "action_prohibited", "kind": "webhook"}

OpenStore = Callable[[], Awaitable[SQLiteStore]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens the test's database, as often as a test restarts; closes every store at the end."""
    stores: list[SQLiteStore] = []

    async def open_() -> SQLiteStore:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


def make_worker(store: SQLiteStore, senders: dict[str, Sender], tmp_path: Path) -> Worker:
    """A worker with no pacing and no digests: what these tests look at is outcomes."""
    channels = "".join(f'[channels.{name}]\ntype = "console"\n' for name in senders)
    routes = f'[[routes]]\nname = "all"\nchannels = {json.dumps(list(senders))}\n'
    config = load_config(write_config(tmp_path, channels=channels, routes=routes))
    policies = {name: ChannelPolicy(name, sender) for name, sender in senders.items()}
    return Worker(store, policies, SETTINGS, Composer(config, Renderer(config.templates)), 3600)


def senders(
    slack: SlackStandIn, session: aiohttp.ClientSession, bot_channel: str = CHANNEL
) -> dict[str, Sender]:
    bot = SlackChannel(
        type="slack", token=SecretStr("xoxb-test-token"), channel=bot_channel,
        api_url=slack.api_url,
    )  # fmt: skip
    hook = SlackChannel(type="slack", webhook_url=SecretStr(slack.add_webhook(OTHER)))
    return {
        "bot": SlackSender(bot, session, SETTINGS.timeout_s),
        "hook": SlackSender(hook, session, SETTINGS.timeout_s),
    }


async def record(store: SQLiteStore, *channels: str) -> None:
    event = NewEvent(
        sdk_app_id=1400000000, command="Live.CallbackAfterCreateRoom", room_id="r1",
        event_time=None, body="{}", query="{}", dedup_key=uuid.uuid4().hex,
    )  # fmt: skip
    payload = json.dumps({"text": "room r1 created"})
    await store.record(event, [NewDelivery(c, payload) for c in channels], time.time(), 0)


def deliveries(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT channel, state, attempts, last_error FROM deliveries ORDER BY id"
        ).fetchall()


def states(path: Path) -> list[str]:
    return [row[1] for row in deliveries(path)]


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "the expected state never came"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    task = asyncio.create_task(worker.run())
    worker.wake()
    try:
        yield
    finally:
        await worker.stop(1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_each_delivery_is_sent_once(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    await record(store, "bot", "hook")
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await eventually(lambda: states(store.path) == ["delivered", "delivered"])
        await asyncio.sleep(0.1)
    assert deliveries(store.path) == [("bot", "delivered", 1, None), ("hook", "delivered", 1, None)]
    assert sorted((p.via, p.channel) for p in slack.posted) == [
        ("api", CHANNEL),
        ("webhook", OTHER),
    ]
    assert slack.requests_seen == 2


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


async def test_a_channel_without_a_policy_is_left_alone(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # The app buries such deliveries at start-up and reload; the worker never claims them.
    store = await open_store()
    await record(store, "unconfigured")
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await asyncio.sleep(0.2)
    assert deliveries(store.path) == [("unconfigured", "pending", 0, None)]


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


async def test_rate_limit_blocks_only_its_channel_and_costs_no_attempt(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    slack.fail_next(1, status=429, retry_after=1, channel=CHANNEL, kind="api")
    await record(store, "bot", "hook")
    await record(store, "bot")
    worker = make_worker(store, senders(slack, session), tmp_path)
    async with running(worker):
        await eventually(lambda: slack.rejected_429 == 1)
        seen_429 = time.monotonic()  # no earlier than the 429 itself
        await record(store, "hook")
        worker.wake()
        await eventually(lambda: len([p for p in slack.posted if p.channel == OTHER]) == 2)
        assert worker.pacers["bot"].blocked_for() > 0
        await eventually(lambda: states(store.path).count("delivered") == 4)
    bot_posts = [p.received_at for p in slack.posted if p.channel == CHANNEL]
    hook_posts = [p.received_at for p in slack.posted if p.channel == OTHER]
    assert len(bot_posts) == 2 and min(bot_posts) - seen_429 >= 0.9
    assert max(bot_posts) - seen_429 < 1.5  # sent when the block ends, not at the next idle poll
    assert max(hook_posts) < min(bot_posts)  # the other channel went on meanwhile
    assert [row[2] for row in deliveries(store.path)] == [1, 1, 1, 1]
    assert (slack.requests_seen, slack.rejected_429) == (5, 1)


async def test_in_flight_at_a_crash_is_sent_after_restart(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    await record(store, "bot")
    await store.close()
    # What a crash mid-send leaves behind: claimed, attempt counted, lease far from expiry.
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        conn.execute(
            "UPDATE deliveries SET state = 'in_flight', attempts = 1, lease_until = ?",
            (time.time() + 3600,),
        )
        conn.commit()
    store = await open_store()
    assert await store.recover() == 1  # what serve does at start-up
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await eventually(lambda: states(store.path) == ["delivered"])
    assert deliveries(store.path) == [("bot", "delivered", 2, None)]
    assert len(slack.posted) == 1


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
