from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import aiohttp
import psycopg
import pytest
from pydantic import SecretStr

from bridge.channels import Outcome, Sender, Thread
from bridge.channels.console import ConsoleSender
from bridge.channels.slack import SlackSender
from bridge.channels.webhook import WebhookSender
from bridge.compose import Composer
from bridge.config import load_config
from bridge.config_channels import SlackChannel, WebhookChannel
from bridge.config_tables import DeliveryConfig
from bridge.metrics import Metrics
from bridge.policy import ChannelPolicy
from bridge.render import Renderer
from bridge.samples import sample
from bridge.store import Claimed, NewDelivery, NewEvent, Pace, Store, StoreUnavailable
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore
from bridge.worker import SHARED_POLL_S, Worker
from tests.bridge_server import OWNER, db_rows, write_config
from tests.slack_standin import SlackStandIn
from tests.store_rows import opener, sqlite_opener

pytestmark = pytest.mark.anyio

SETTINGS = DeliveryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2, timeout_s=2)
CHANNEL = "C0123456789"  # the bot channel ("bot")
OTHER = "C0OTHER00"  # the incoming webhook's channel ("hook")


OpenStore = Callable[[], Awaitable[SQLiteStore]]


open_store = pytest.fixture(sqlite_opener)


def make_composer(tmp_path: Path, channels: dict[str, str]) -> Composer:
    """A Composer whose config declares `channels` (name -> the TOML lines of its table): a
    digest is rendered with the template of the channel's type."""
    tables = "".join(f"[channels.{name}]\n{lines}\n" for name, lines in channels.items())
    routes = f'[[routes]]\nname = "all"\nchannels = {json.dumps(list(channels))}\n'
    config = load_config(write_config(tmp_path, channels=tables, routes=routes))
    return Composer(config, Renderer(config.templates))


def make_worker(store: SQLiteStore, senders: dict[str, Sender], tmp_path: Path) -> Worker:
    """A worker with no pacing and no digests: what these tests look at is outcomes."""
    composer = make_composer(tmp_path, {name: 'type = "console"' for name in senders})
    policies = {name: ChannelPolicy(name, sender) for name, sender in senders.items()}
    return Worker(store, policies, SETTINGS, composer, 3600)


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
    return db_rows(path, "SELECT channel, state, attempts, last_error FROM deliveries ORDER BY id")


def states(path: Path) -> list[str]:
    return [row[1] for row in deliveries(path)]


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "the expected state never came"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    worker.wake()
    try:
        yield worker
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


async def test_a_channel_without_a_policy_is_left_alone(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # The app buries such deliveries at start-up and reload; the worker never claims them.
    store = await open_store()
    await record(store, "unconfigured")
    async with running(make_worker(store, senders(slack, session), tmp_path)):
        await asyncio.sleep(0.2)
    assert deliveries(store.path) == [("unconfigured", "pending", 0, None)]


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


# -- events in rooms, policies built per test (test_lane.py and test_attempts.py use these too) --

SLACK = 'type = "slack"\nwebhook_url = "https://hooks.example.invalid/x"'  # digests: slack/
CONSOLE = 'type = "console"'


def owner_change(room: str, event_time: int) -> str:
    """A real owner-change body for `room` at `event_time` (ms), as Tencent sends it."""
    body = sample(OWNER) | {
        "RoomId": room,
        "EventTime": event_time,
        "OriginalOwner_Account": f"{room}-old",
        "CurrentOwner_Account": f"{room}-new",
    }
    return json.dumps(body)


async def record_in(
    store: Store, channel: str, room: str, event_time: int, app: int = 1400000000
) -> None:
    """One owner change in app `app`'s `room` at `event_time`, to `channel`, as
    `{"text": "room@time"}`."""
    event = NewEvent(
        sdk_app_id=app, command=OWNER, room_id=room, event_time=event_time,
        body=owner_change(room, event_time), query="{}", dedup_key=uuid.uuid4().hex,
    )  # fmt: skip
    payload = json.dumps({"text": f"{room}@{event_time}"})
    await store.record(event, [NewDelivery(channel, payload)], time.time(), 0)


async def record_rooms(store: Store, channel: str, prefix: str, count: int) -> None:
    """`count` owner changes to `channel`, in rooms `prefix`-0, -1, …, at times 1000, 1001, …"""
    for i in range(count):
        await record_in(store, channel, f"{prefix}-{i}", 1000 + i)


def labels(payloads: list[dict[str, Any]]) -> list[str]:
    return [str(p["text"]) for p in payloads]


def attempts(path: Path) -> list[int]:
    return [row[2] for row in deliveries(path)]


def sink_sender(
    slack: SlackStandIn, session: aiohttp.ClientSession, timeout_s: float = 2.0,
    identity: str = "store",
) -> WebhookSender:  # fmt: skip
    """A webhook sender to the stand-in's sink "hook"."""
    settings = WebhookChannel(type="webhook", url=SecretStr(slack.sink_url("hook")))
    return WebhookSender("hook", settings, session, timeout_s, identity)


def worker_with(
    store: Store, composer: Composer, *policies: ChannelPolicy,
    settings: DeliveryConfig = SETTINGS,
) -> Worker:  # fmt: skip
    return Worker(store, {p.name: p for p in policies}, settings, composer, 3600)


class CountingStore(SQLiteStore):
    """Records which channels lanes take and leave."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.taken: list[str] = []
        self.leases: list[float] = []  # the lease_s of each take
        self.left: list[str] = []
        self.released = 0  # release() calls: claimed deliveries given back

    async def take_channel(
        self, channel: str, now: float, lease_s: float, leases_at: float | None = None
    ) -> Pace | None:
        self.taken.append(channel)
        self.leases.append(lease_s)
        return await super().take_channel(channel, now, lease_s, leases_at)

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        self.left.append(channel)
        await super().leave_channel(channel, pace)

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        self.released += 1
        await super().release(ids, now, next_attempt_at)


async def test_a_reload_that_changes_a_channels_pacing_keeps_its_count_and_its_blocks(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A reload gave a channel whose rate or burst changed a new pacer with a full bucket: the
    # lane's next claim went out at once, over Slack's own count, even at a stricter rate. The
    # 429 that earned blocked the new pacer while the running lane looked at the old one, so
    # it claimed the channel's rows and gave them back in a loop for the whole Retry-After.
    async with opener(lambda: CountingStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        for i in range(12):
            await record_in(store, "bot", f"room-{i:02d}", 1000 + i)
        # The stand-in allows a burst of 2 at 4/s: a pair that a stall of this machine brought
        # together is not a 429; the rest channel's own pacing, 8/s with a burst of 3, is.
        with SlackStandIn(rate_per_s=4.0, burst=2) as paced:
            bot = senders(paced, session)["bot"]
            composer = make_composer(tmp_path, {"bot": SLACK})
            worker = worker_with(store, composer, ChannelPolicy("bot", bot, rate_per_s=4.0))
            async with running(worker):
                await eventually(lambda: len(paced.posted) == 1)
                slower = {"bot": ChannelPolicy("bot", bot, rate_per_s=2.0)}
                worker.configure(slower, SETTINGS, composer, 3600)  # what a reload does
                await eventually(lambda: len(paced.posted) >= 7, within_s=10)
                released = store.released
        times = [p.received_at for p in paced.posted]
    assert paced.rejected_429 == 0
    assert released == 0
    assert min(b - a for a, b in itertools.pairwise(times[1:7])) >= 0.45  # the new rate


def _slack(**fields: Any) -> SlackChannel:
    values: dict[str, Any] = {"type": "slack"} | fields
    for secret in ("token", "webhook_url"):
        if secret in values:
            values[secret] = SecretStr(values[secret])
    return SlackChannel(**values)


BOT = {"token": "xoxb-a", "channel": CHANNEL}
HOOK = {"webhook_url": "https://hooks.slack.com/services/T0/B0/secret"}


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        (BOT, BOT, True),
        (BOT, BOT | {"token": "xoxb-another-bot"}, True),  # Slack counts the channel, not the bot
        (BOT, BOT | {"template": "other.json.j2", "thread_by_room": True}, True),
        (BOT, BOT | {"channel": OTHER}, False),
        (BOT, BOT | {"api_url": "https://slack-gov.com/api/"}, False),
        (HOOK, HOOK, True),
        (HOOK, HOOK | {"webhook_url": HOOK["webhook_url"] + "2"}, False),
        # Where a webhook posts only Slack knows: never taken for a bot's channel.
        (BOT, HOOK, False),
    ],
)  # fmt: skip
def test_which_channels_are_paced_together(
    first: dict[str, str], second: dict[str, str], shared: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    a = ChannelPolicy.from_config("a", _slack(**first), ConsoleSender())
    b = ChannelPolicy.from_config("b", _slack(**second), ConsoleSender())
    with caplog.at_level(logging.INFO, "bridge.worker"):
        worker = Worker(cast(Store, None), {"a": a, "b": b}, SETTINGS, cast(Composer, None), 3600)
    assert (worker.pacers["a"] is worker.pacers["b"]) is shared
    said = "channels a, b post to one Slack channel: paced together, 1/s, burst 3"
    assert (said in caplog.text) is shared
    assert HOOK["webhook_url"] not in repr(a) + repr(b)  # the key holds a hash of the secret


def test_generic_webhooks_to_one_url_keep_their_own_pacers() -> None:
    # A generic webhook's limits are its owner's, and may be per credential (its headers).
    hook = WebhookChannel(type="webhook", url=SecretStr("https://example.com/in"), rate_per_s=5)
    a = ChannelPolicy.from_config("a", hook, ConsoleSender())
    b = ChannelPolicy.from_config("b", hook, ConsoleSender())
    worker = Worker(cast(Store, None), {"a": a, "b": b}, SETTINGS, cast(Composer, None), 3600)
    assert worker.pacers["a"] is not worker.pacers["b"]


async def test_channels_that_post_to_one_slack_channel_share_its_rate(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Two channels of the config for one Slack channel (say, one template for VIP rooms and one
    # for the rest) were paced each on its own: together twice Slack's rate, and 429s.
    async with opener(lambda: SQLiteStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        await record_rooms(store, "vip", "vip", 4)
        await record_rooms(store, "rest", "room", 4)
        # The stand-in allows a burst of 2 at 4/s: a pair that a stall of this machine brought
        # together is not a 429; the rest channel's own pacing, 8/s with a burst of 3, is.
        with SlackStandIn(rate_per_s=4.0, burst=2) as paced:
            bot = senders(paced, session)["bot"]
            composer = make_composer(tmp_path, {"vip": SLACK, "rest": SLACK})
            policies = [
                ChannelPolicy("vip", bot, rate_per_s=4.0, destination="C"),
                ChannelPolicy("rest", bot, rate_per_s=8.0, burst=3, destination="C"),
            ]  # the stricter pacing is the one kept: 4/s, burst 1
            worker = worker_with(store, composer, *policies)
            async with running(worker):
                await eventually(lambda: len(paced.posted) == 8, within_s=10)
            times = [p.received_at for p in paced.posted]
    assert paced.rejected_429 == 0
    # 4/s for the eight together: seven intervals of 0.25 s at least (a slow machine only
    # stretches them); paced apart, the rest channel's 8/s made it about 0.9 s.
    assert times[-1] - times[0] >= 1.5


async def test_a_429_to_one_channel_blocks_the_others_of_its_slack_channel(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with opener(lambda: SQLiteStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        with SlackStandIn() as slack:
            bot = senders(slack, session)["bot"]
            composer = make_composer(tmp_path, {"vip": SLACK, "rest": SLACK})
            worker = worker_with(
                store, composer, ChannelPolicy("vip", bot, destination="C"),
                ChannelPolicy("rest", bot, destination="C"),
            )  # fmt: skip
            slack.fail_next(1, status=429, retry_after=1, kind="api")
            await record_in(store, "vip", "vip-1", 1000)
            async with running(worker):
                await eventually(lambda: worker.blocked_for("vip") > 0)
                # When each block ends, on the clock the stand-in stamps a request's arrival
                # by (at most a clock reading early): the same end, not a delay of its own.
                vip_until = time.monotonic() + worker.blocked_for("vip")
                rest_until = time.monotonic() + worker.blocked_for("rest")
                assert vip_until - 0.05 < rest_until < vip_until + 0.05
                await record_in(store, "rest", "room-1", 1000)
                worker.wake()
                await eventually(lambda: len(slack.posted) == 2, within_s=5)
                # rest waits out the block vip met, however late this test looks
                assert min(p.received_at for p in slack.posted) >= vip_until


async def test_a_reload_that_moves_a_channel_to_another_slack_channel_gives_it_a_pacer(
    tmp_path: Path,
) -> None:
    a = ChannelPolicy("a", ConsoleSender(), rate_per_s=1.0, destination="C")
    b = ChannelPolicy("b", ConsoleSender(), rate_per_s=2.0, destination="C")
    worker = Worker(cast(Store, None), {"a": a, "b": b}, SETTINGS, cast(Composer, None), 3600)
    shared = worker.pacers["a"]
    shared.block(30)
    moved = ChannelPolicy("b", ConsoleSender(), rate_per_s=2.0, destination="D")
    worker.configure({"a": a, "b": moved}, SETTINGS, cast(Composer, None), 3600)
    assert worker.pacers["a"] is shared and shared.blocked_for() > 29  # kept, with its block
    assert worker.pacers["b"] is not shared and worker.pacers["b"].blocked_for() == 0


async def test_a_reload_reaches_a_lane_that_callbacks_keep_busy(
    open_store: OpenStore, tmp_path: Path
) -> None:
    # A lane claimed again and again with the policy it started with while callbacks kept
    # coming (each within its 50 ms linger): a reload that fixed the channel (a Slack channel
    # id, a token, a URL) reached it only once the traffic paused. It finishes its claim with
    # the old policy, and the next claim is the new one's.
    store = await open_store()
    old, new = io.StringIO(), io.StringIO()
    composer = make_composer(tmp_path, {"c": CONSOLE})
    worker = worker_with(store, composer, ChannelPolicy("c", ConsoleSender(old)))

    async def callbacks() -> None:
        for n in itertools.count():
            await record_in(store, "c", f"room-{n}", 1000 + n)
            worker.wake()
            await asyncio.sleep(0.01)

    async with running(worker):
        feeding = asyncio.create_task(callbacks())
        try:
            await eventually(lambda: old.getvalue().count("\n") >= 3)
            reloaded = {"c": ChannelPolicy("c", ConsoleSender(new))}
            worker.configure(reloaded, SETTINGS, composer, 3600)
            await eventually(lambda: new.getvalue().count("\n") >= 3, within_s=3)
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding


# -- several store instances on one database: PostgreSQL replicas, or SQLite's two processes ---

OpenShared = Callable[[], Awaitable[Store]]
LEASE_S = 1.0


@pytest.fixture(params=["sqlite", "postgres"])
async def open_shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenShared]:
    """Opens another store instance on the test's database, as another process would."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")

        def make() -> Store:
            return PostgresStore(url)
    else:

        def make() -> Store:
            return SQLiteStore(tmp_path / "bridge.db")

    async with opener(make) as open_:
        yield open_


async def delivery_rows(store: Store) -> list[tuple[str, int]]:
    """(state, attempts) of every delivery, oldest first, through the Store interface."""
    rows = sorted((d for e in await store.recent_events(100) for d in e.deliveries),
                  key=lambda d: d.id)  # fmt: skip
    return [(d.state, d.attempts) for d in rows]


class ShortLease(ChannelPolicy):
    """A lease of LEASE_S rather than the half-minute or more a claim's sends may take."""

    def lease_s(self, timeout_s: float, rate_per_s: float | None = None) -> float:
        return LEASE_S


async def test_a_429_longer_than_the_lease_keeps_every_worker_out_until_it_ends(
    open_shared: OpenShared, slack: SlackStandIn, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Two rooms' deliveries claimed at once; the first meets a 429 whose Retry-After (2 s)
    # outlasts the lease (1 s). Holding the second through the block let the other worker take
    # the channel and the delivery when the lease ran out and send inside the block, and then
    # the first worker sent it again.
    first, second = await open_shared(), await open_shared()
    await record_in(first, "hook", "r1", 1000)
    await record_in(first, "hook", "r2", 2000)
    slack.fail_next(1, status=429, retry_after=2, kind="webhook")
    composer = make_composer(tmp_path, {"hook": SLACK})
    one, other = (
        worker_with(store, composer, ShortLease("hook", senders(slack, session)["hook"]))
        for store in (first, second)
    )
    async with running(one):
        await eventually(lambda: slack.rejected_429 == 1)
        seen_429 = time.monotonic()  # no earlier than the 429 itself
        async with running(other):
            await eventually(lambda: len(slack.posted) >= 2)
            await asyncio.sleep(LEASE_S)  # time for a repeat to show
    assert min(p.received_at for p in slack.posted) - seen_429 >= 1.9
    assert sorted(labels([p.payload for p in slack.posted])) == ["r1@1000", "r2@2000"]
    assert await delivery_rows(first) == [("delivered", 1), ("delivered", 1)]


class PausedOnce:
    """A sender whose first send takes `pause_s`, as a process stopped mid-send (a paused VM)."""

    def __init__(self, sender: Sender, pause_s: float) -> None:
        self._sender, self._pause_s = sender, pause_s

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        pause, self._pause_s = self._pause_s, 0.0
        await asyncio.sleep(pause)
        return await self._sender.send(payload, message_key, thread)


async def test_a_worker_paused_past_its_lease_sends_none_of_the_rest_of_its_claim(
    open_shared: OpenShared, slack: SlackStandIn, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # The worker stopped (SIGSTOP) mid-claim; the other took the channel and the claim once
    # their leases ran out, and sent it. Woken, the first sent the rest of its claim again.
    first, second = await open_shared(), await open_shared()
    for room in ("r1", "r2", "r3"):
        await record_in(first, "hook", room, 1000 + int(room[1]))
    hook = senders(slack, session)["hook"]
    composer = make_composer(tmp_path, {"hook": SLACK})
    paused = ShortLease("hook", PausedOnce(hook, 3 * LEASE_S), max_in_flight=1)
    async with running(worker_with(first, composer, paused)):
        await asyncio.sleep(0.2)  # its first send has begun: r1, in flight through the pause
        async with running(worker_with(second, composer, ShortLease("hook", hook))):
            await eventually(lambda: {"r2", "r3"} <= {p.payload["text"][:2] for p in slack.posted})
            await asyncio.sleep(4 * LEASE_S)  # the first wakes, and would send r2 and r3 again
    posted = sorted(p.payload["text"].split("@")[0] for p in slack.posted)
    assert posted.count("r2") == posted.count("r3") == 1, posted
    assert posted.count("r1") in (1, 2)  # in flight at the pause: sent again, as documented


async def test_workers_on_one_database_pace_the_channels_of_one_slack_channel_together(
    open_shared: OpenShared, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # One worker sending "vip", another took "rest", the other channel of the same Slack
    # channel: each paced its own, together twice Slack's rate. A lane now holds every channel
    # of its Slack channel, so the other worker waits until the first leaves them.
    first, second = await open_shared(), await open_shared()
    await record_rooms(first, "vip", "vip", 4)
    with SlackStandIn(rate_per_s=4.0, burst=1) as paced:
        bot = senders(paced, session)["bot"]
        composer = make_composer(tmp_path, {"vip": SLACK, "rest": SLACK})
        policies = [
            ChannelPolicy("vip", bot, rate_per_s=4.0, destination="C"),
            ChannelPolicy("rest", bot, rate_per_s=4.0, destination="C"),
        ]
        one, other = (worker_with(store, composer, *policies) for store in (first, second))
        async with running(one):
            await eventually(lambda: len(paced.posted) == 1)
            await record_rooms(second, "rest", "room", 4)
            async with running(other):  # `one` is not woken: it looks at its next poll
                await eventually(lambda: len(paced.posted) == 8, within_s=10)
        times = [p.received_at for p in paced.posted]
    assert paced.rejected_429 == 0
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.18  # 4/s, across workers too
    assert await delivery_rows(first) == [("delivered", 1)] * 8


async def test_a_worker_kept_out_of_a_slack_channel_looks_again_at_its_poll_not_per_callback(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A lane holds all the channels of its Slack channel, so the dispatchers of other workers
    # pass over them all; but during a rolling reload a worker still on the old config holds
    # "vip" alone. The new one sees "rest" due and free, and only its lane's take finds "vip",
    # paced with it, held. Woken by every callback, it would take and leave in a loop for as
    # long as the old worker keeps sending.
    async with opener(lambda: CountingStore(tmp_path / "bridge.db")) as open_:
        first, second = await open_(), await open_()
        await record_rooms(first, "vip", "vip", 30)
        with SlackStandIn(latency_s=0.1) as slow:
            bot = senders(slow, session)["bot"]
            composer = make_composer(tmp_path, {"vip": SLACK, "rest": SLACK})
            names = ("vip", "rest")
            old_config = {name: ChannelPolicy(name, bot) for name in names}
            new_config = {name: ChannelPolicy(name, bot, destination="C") for name in names}
            one = Worker(first, old_config, SETTINGS, composer, 3600)
            other = Worker(second, new_config, SETTINGS, composer, 3600, poll_s=0.5)
            async with running(one):
                await eventually(lambda: len(slow.posted) == 1)
                await record_in(second, "rest", "room-1", 1000)
                async with running(other):
                    began = time.monotonic()
                    for _ in range(50):  # a callback every 20 ms for a second
                        other.wake()
                        await asyncio.sleep(0.02)
                    takes = len(second.taken)
                    # The polls that fit in the time the callbacks took: a second, or more
                    # on a busy machine (CPU stalls stretch it, and each 0.5 s adds a poll).
                    polls = 1 + math.ceil((time.monotonic() - began) / 0.5)
                    assert not any("room" in p.payload["text"] for p in slow.posted)
                    assert len(slow.posted) < 30  # `one` still sending all along
                await eventually(lambda: len(slow.posted) == 31, within_s=10)
    assert 1 <= takes <= 2 * polls  # a try at the start and after each 0.5 s poll, two channels
    # each; one per callback would be 50 or more


@contextlib.asynccontextmanager
async def vip_and_rest(
    tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[CountingStore, SlackStandIn, Sender, Composer]]:
    """A store, a Slack that answers in 0.1 s, its bot's sender, and a composer for two
    channels, "vip" and "rest"."""
    async with opener(lambda: CountingStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        with SlackStandIn(latency_s=0.1) as slow:
            composer = make_composer(tmp_path, {"vip": SLACK, "rest": SLACK})
            yield store, slow, senders(slow, session)["bot"], composer


async def test_a_lane_that_shares_its_slack_channel_takes_a_lease_for_its_share_of_the_rate(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Three channels share one message every 20 s: a lane's four sends may take 4 minutes, but
    # its lease allowed 80 s of pacing (its own rate), and could run out mid-claim for another
    # process to take the channels and send the same deliveries again.
    async with vip_and_rest(tmp_path, session) as (store, _, bot, composer):
        await record_in(store, "vip", "vip-1", 1000)
        names = ("vip", "rest", "more")
        policies = [ChannelPolicy(n, bot, rate_per_s=0.05, destination="C") for n in names]
        async with running(worker_with(store, composer, *policies)):
            await eventually(lambda: len(store.left) == 3)
    own, shared = policies[0].lease_s(SETTINGS.timeout_s), policies[0].lease_s(2.0, 0.05 / 3)
    assert shared > own + 150
    assert store.leases == [shared] * 3


async def test_the_channels_of_one_slack_channel_are_left_by_the_last_lane_to_end(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # "rest" has one delivery, "vip" ten: rest's lane ends first, and leaving its channels then
    # would hand "vip" to another process while vip's lane still sends.
    async with vip_and_rest(tmp_path, session) as (store, slow, bot, composer):
        await record_rooms(store, "vip", "vip", 10)
        await record_in(store, "rest", "room-1", 1000)
        policies = [ChannelPolicy(name, bot, destination="C") for name in ("vip", "rest")]
        async with running(worker_with(store, composer, *policies)):
            await eventually(lambda: any("room" in p.payload["text"] for p in slow.posted))
            await asyncio.sleep(0.2)  # rest's lane lingers 50 ms, then ends
            assert len(slow.posted) < 11
            assert store.left == []
            await eventually(lambda: len(slow.posted) == 11)
            await eventually(lambda: len(store.left) == 2)
    assert sorted(store.left) == ["rest", "vip"]
    assert sorted(set(store.taken)) == ["rest", "vip"]


async def test_a_reload_that_paces_channels_apart_leaves_none_a_running_lane_holds(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # rest's lane, started while vip and rest were one Slack channel's, holds both; a reload
    # parts them and vip's own lane starts. When rest's lane ended it left vip too, which
    # another process could then take while vip's lane still sent.
    async with vip_and_rest(tmp_path, session) as (store, slow, bot, composer):
        await record_rooms(store, "rest", "room", 3)
        together = [ChannelPolicy(name, bot, destination="C") for name in ("vip", "rest")]
        worker = worker_with(store, composer, *together)
        async with running(worker):
            await eventually(lambda: len(slow.posted) == 1)
            apart = {"vip": ChannelPolicy("vip", bot), "rest": ChannelPolicy("rest", bot)}
            worker.configure(apart, SETTINGS, composer, 3600)
            await record_rooms(store, "vip", "vip", 10)
            worker.wake()
            await eventually(lambda: "rest" in store.left)  # rest's lane has ended
            assert sum("vip" in p.payload["text"] for p in slow.posted) < 10
            assert "vip" not in store.left
            await eventually(lambda: "vip" in store.left, within_s=5)
    assert len(slow.posted) == 13


async def test_a_stopping_worker_lets_a_send_finish_and_starts_no_other(
    session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # Rooms A and B share the channel's one slot: B's event waits for A's slow send. Stopped
    # meanwhile, A's send may finish in the grace period; B's, not started, stays pending. It
    # went out as soon as the slot was free, and, cut off or unrecorded at the end of the grace,
    # would be sent again at the next start though nothing of it was in flight at the stop.
    store = await open_store()
    await record_in(store, "bot", "A", 1000)
    await record_in(store, "bot", "B", 2000)
    with SlackStandIn(latency_s=0.5) as slack:
        policy = ChannelPolicy("bot", senders(slack, session)["bot"])
        worker = worker_with(store, make_composer(tmp_path, {"bot": SLACK}), policy)
        task = asyncio.create_task(worker.run())
        worker.wake()
        await eventually(lambda: states(store.path) == ["in_flight", "in_flight"])
        # A's send under way: claimed is not yet sent (CI met a stop in between).
        await eventually(lambda: slack.api_requests_arrived == 1)
        await worker.stop(2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # a send that did start would have arrived by now
        assert labels([p.payload for p in slack.posted]) == ["A@1000"]
    assert states(store.path) == ["delivered", "pending"]
    assert attempts(store.path) == [1, 0]


async def test_a_locked_due_delivery_leaves_the_worker_idle(
    postgres_url: str, tmp_path: Path
) -> None:
    # Due to the dispatcher's plain read, passed over by the claim's SKIP LOCKED: a lane that
    # found nothing woke the dispatcher at once, which saw the row due again, over and over.
    async with opener(lambda: PostgresStore(postgres_url)) as open_:
        store = await open_()
        await record_in(store, "console", "r1", 1000)
        stream = io.StringIO()
        policy = ChannelPolicy("console", ConsoleSender(stream))
        composer = make_composer(tmp_path, {"console": CONSOLE})
        worker = Worker(store, {"console": policy}, SETTINGS, composer, 3600, poll_s=SHARED_POLL_S)
        with psycopg.connect(postgres_url) as conn:  # a transaction left open, holding the row
            conn.execute("SELECT id FROM deliveries FOR UPDATE")
            async with running(worker):
                await asyncio.sleep(0.2)
                before, start = store.commits, time.monotonic()
                await asyncio.sleep(1.5)
                rate = (store.commits - before) / (time.monotonic() - start)
                conn.rollback()
                # The next poll finds it free.
                await eventually(lambda: stream.getvalue().count("\n") == 1, 2 * SHARED_POLL_S)
    # A poll is about five transactions: a look for due channels, a lane (take, claim, leave)
    # and the next due time.
    assert rate < 10 / SHARED_POLL_S


class SlowPruneStore(SQLiteStore):
    """A prune that lasts until `finish` is set, as a backlog of old rows makes it last."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.pruning = asyncio.Event()
        self.finish = asyncio.Event()

    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        self.pruning.set()
        await self.finish.wait()
        return await super().prune(delivered_before, dedup_before, threads_before)


async def test_a_long_prune_does_not_hold_up_deliveries(
    slack: SlackStandIn, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A backlog of old rows (after downtime, or a shorter retention) is pruned in many small
    # transactions, seconds in all: the worker waited for it before it started any lane.
    async with opener(lambda: SlowPruneStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        try:
            async with running(make_worker(store, senders(slack, session), tmp_path)) as worker:
                await asyncio.wait_for(store.pruning.wait(), 5)
                await record(store, "hook")
                worker.wake()
                await eventually(lambda: states(store.path) == ["delivered"])
        finally:
            store.finish.set()


class DiskFullStore(SQLiteStore):
    """SQLite on a full disk, as the worker meets it: while `full`, reads work and the lane's
    writes (take the channel, claim) fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full = False
        self.tries: list[float] = []  # time.monotonic() of each write refused

    def _refuse(self) -> None:
        if self.full:
            self.tries.append(time.monotonic())
            raise StoreUnavailable("store commit failed: database or disk is full")

    async def take_channel(
        self, channel: str, now: float, lease_s: float, leases_at: float | None = None
    ) -> Pace | None:
        self._refuse()
        return await super().take_channel(channel, now, lease_s, leases_at)

    async def claim(
        self, channel: str, now: float, limit: int, lease_s: float, leases_at: float | None = None
    ) -> list[Claimed]:
        self._refuse()
        return await super().claim(channel, now, limit, lease_s, leases_at)


async def test_writes_failing_while_reads_work_back_off_and_log_rarely(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The dispatcher's reads succeeding reset the count of failures the lanes' writes made: the
    # wait stayed at 0.5 s and every failure was the first, an ERROR line each.
    async with opener(lambda: DiskFullStore(tmp_path / "bridge.db")) as open_:
        store = await open_()
        await record(store, "console")
        store.full = True
        stream = io.StringIO()
        caplog.set_level(logging.ERROR, logger="bridge.worker")
        async with running(make_worker(store, {"console": ConsoleSender(stream)}, tmp_path)):
            await asyncio.sleep(2.7)  # tries at 0, 0.5 and 1.5 s; the next at 3.5 s
            tries = list(store.tries)
            store.full = False
            await eventually(lambda: states(store.path) == ["delivered"])
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert len(tries) == 3 and gaps[0] >= 0.45 and gaps[1] >= 0.95
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("store unavailable (1 times)")


HOUR = 3600.0


@pytest.mark.parametrize(
    ("policies", "kept_h", "gone_h"),
    [
        # The retention (12 h here) is for delivered rows: a room's thread lasts the longest
        # thread_ttl_h of the channels that thread.
        (
            [ChannelPolicy("bot", ConsoleSender(), thread_by_room=True, thread_ttl_s=24 * HOUR),
             ChannelPolicy("short", ConsoleSender(), thread_by_room=True, thread_ttl_s=HOUR)],
            13, 25,
        ),
        # A channel that keeps no threads (a webhook, a console, a Slack incoming webhook) has
        # no TTL to give: its default of 24 h kept every room's thread a day, whatever
        # thread_ttl_h the channel that threads was given, so ever-new rooms piled up a day of
        # rows.
        (
            [ChannelPolicy("bot", ConsoleSender(), thread_by_room=True, thread_ttl_s=HOUR),
             ChannelPolicy("plain", ConsoleSender())],
            0.5, 2,
        ),
    ],
    ids=["the longest ttl, not the retention", "only the channels that thread"],
)  # fmt: skip
async def test_prune_keeps_a_thread_for_its_channels_ttl(
    open_store: OpenStore, tmp_path: Path, policies: list[ChannelPolicy], kept_h: float,
    gone_h: float,
) -> None:  # fmt: skip
    store = await open_store()
    now = time.time()
    await store.set_thread("bot", "R", "1.1", now - kept_h * HOUR)  # within the TTL
    await store.set_thread("bot", "S", "2.2", now - gone_h * HOUR)  # past it
    composer = make_composer(tmp_path, {p.name: 'type = "console"' for p in policies})
    by_name = {p.name: p for p in policies}
    await Worker(store, by_name, SETTINGS, composer, retention_s=12 * HOUR)._prune()
    assert db_rows(store.path, "SELECT room_id, ts FROM threads") == [("R", "1.1")]


class PruneCutoffs(SQLiteStore):
    """SQLite that keeps the cutoffs each prune is asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.cutoffs: list[tuple[float, float, float]] = []

    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        self.cutoffs.append((delivered_before, dedup_before, threads_before))
        return await super().prune(delivered_before, dedup_before, threads_before)


@pytest.mark.parametrize(
    ("retention_h", "dedup_window_s", "delivered_kept_s", "dedup_kept_s"),
    [
        (2, 600, 2 * HOUR, 2 * HOUR),  # dedup keys as long as the retention
        (0.5, 3 * HOUR, 0.5 * HOUR, 3 * HOUR),  # but never shorter than the dedup window
    ],
)
async def test_the_configs_retention_and_dedup_window_make_the_prunes_cutoffs(
    tmp_path: Path, retention_h: float, dedup_window_s: float, delivered_kept_s: float,
    dedup_kept_s: float,
) -> None:  # fmt: skip
    config = load_config(
        write_config(
            tmp_path, store=f'path = "bridge.db"\nretention_h = {retention_h}\n',
            delivery=f"dedup_window_s = {dedup_window_s}\n",
        )
    )  # fmt: skip
    store = PruneCutoffs(config.store.path)
    await store.open()
    try:
        composer = Composer(config, Renderer(config.templates))
        worker = Worker.for_config(config, store, {}, composer, Metrics())
        before = time.time()
        await worker._prune()
        after = time.time()
    finally:
        await store.close()
    ((delivered, dedup, _),) = store.cutoffs
    assert before - delivered_kept_s <= delivered <= after - delivered_kept_s
    assert before - dedup_kept_s <= dedup <= after - dedup_kept_s


@pytest.mark.parametrize(
    ("store_lines", "poll_s"),
    [('path = "bridge.db"\n', 5.0), ('url = "postgresql://bridge@127.0.0.1:9/bridge"\n', 1.0)],
    ids=["sqlite", "postgres"],
)
def test_a_store_other_processes_write_is_looked_at_every_second(
    tmp_path: Path, store_lines: str, poll_s: float
) -> None:
    # Within 5 s on SQLite (its callbacks wake the worker), 1 s on PostgreSQL, whose other
    # replicas' callbacks and outbox commands wake nobody here (README).
    config = load_config(write_config(tmp_path, store=store_lines))
    composer = Composer(config, Renderer(config.templates))
    store = SQLiteStore(tmp_path / "unused.db")  # not opened: the worker is only built
    assert Worker.for_config(config, store, {}, composer, Metrics())._poll_s == poll_s


async def test_a_channel_a_reload_removes_is_sent_nothing_more(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # Its lane has claimed four deliveries of one room and is sending the first when a reload
    # removes the channel: that send finishes, the three after it are not sent.
    store = await open_store()
    for event_time in range(1000, 1004):
        await record_in(store, "hook", "room-1", event_time)
    slack.set_sink_delay("hook", 0.5)
    policy = ChannelPolicy("hook", sink_sender(slack, session))
    composer = make_composer(tmp_path, {"hook": 'type = "webhook"\nurl = "https://x.invalid/"'})
    worker = worker_with(store, composer, policy)
    async with running(worker):
        await eventually(lambda: slack.sink_max_concurrent.get("hook") == 1)  # the first send
        worker.configure({}, SETTINGS, composer, 3600)  # the reload, then its burial
        assert await store.bury_unknown_channels([], time.time(), "channel removed") == 4
        await eventually(lambda: len(slack.sink_requests) == 1)
        await asyncio.sleep(1.2)  # the next two sends would have arrived by now
    assert len(slack.sink_requests) == 1
    assert states(store.path) == ["delivered", "dead", "dead", "dead"]


async def test_a_dead_letter_buried_mid_send_and_retried_at_once_is_sent_once(
    slack: SlackStandIn, session: aiohttp.ClientSession, open_store: OpenStore, tmp_path: Path
) -> None:
    # A reload removes the channel while its send is under way (the delivery is buried), the
    # channel comes back and `outbox retry --dead` runs before that send has finished.
    store = await open_store()
    await record_in(store, "hook", "room-1", 1000)
    slack.set_sink_delay("hook", 0.5)
    policy = ChannelPolicy("hook", sink_sender(slack, session))
    table = 'type = "webhook"\nurl = "https://sink.example.invalid/"'
    async with running(worker_with(store, make_composer(tmp_path, {"hook": table}), policy)):
        await eventually(lambda: states(store.path) == ["in_flight"])
        assert await store.bury_unknown_channels([], time.time(), "channel removed") == 1
        outbox = await open_store()  # the command's own connection
        retried = await outbox.retry_dead(None, time.time())
        await eventually(lambda: states(store.path) == ["delivered"])
        await asyncio.sleep(1.0)  # a second send would have arrived by now
    assert (retried, len(slack.sink_requests)) == (0, 1)  # its send may still get through
