from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from bridge.pacing import Pacer
from bridge.store import UNKNOWN_TAT, Pace
from tests.bridge_server import OK_PACKET, SEED_BODY, InThread, post_callback, write_config
from tests.slack_standin import SlackStandIn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("rate", "burst", "sends", "expected"),
    [
        (1.0, 3, 3, 0.0),  # the burst goes at once
        (1.0, 3, 4, 1.0),  # then one a second
        (2.0, 1, 2, 0.5),
        (None, 1, 100, 0.0),  # no rate: never waits
    ],
)
def test_bucket_delay(rate: float | None, burst: int, sends: int, expected: float) -> None:
    clock = Clock()
    pacer = Pacer(rate, burst, clock)
    for _ in range(sends - 1):
        assert pacer.delay() == 0.0
        asyncio.run(pacer.wait())
    assert pacer.delay() == pytest.approx(expected)


def test_bucket_refills_up_to_burst() -> None:
    clock = Clock()
    pacer = Pacer(1.0, 3, clock)
    for _ in range(3):
        asyncio.run(pacer.wait())
    clock.now += 10.0
    for _ in range(3):
        assert pacer.delay() == 0.0
        asyncio.run(pacer.wait())
    assert pacer.delay() == pytest.approx(1.0)


def test_block_holds_everything_then_refills_from_empty() -> None:
    clock = Clock()
    pacer = Pacer(1.0, 3, clock)
    pacer.block(2.0)
    assert pacer.blocked_for() == pytest.approx(2.0)
    assert pacer.delay() == pytest.approx(2.0)
    clock.now += 2.0
    assert pacer.blocked_for() == 0.0
    assert pacer.delay() == 0.0  # two seconds of refill: two tokens, not the whole burst
    asyncio.run(pacer.wait())
    asyncio.run(pacer.wait())
    assert pacer.delay() == pytest.approx(1.0)


def test_block_without_rate_still_blocks() -> None:
    clock = Clock()
    pacer = Pacer(None, 1, clock)
    pacer.block(5.0)
    assert pacer.delay() == pytest.approx(5.0)
    clock.now += 5.0
    assert pacer.delay() == 0.0


def test_wait_refuses_during_a_block_instead_of_waiting_it_out() -> None:
    # Whoever waits holds claimed deliveries, whose lease a long Retry-After outlasts: a block,
    # set before wait() or while it waits its turn, sends the caller away at once.
    pacer = Pacer(10.0, 1)

    async def scenario() -> tuple[bool, bool, bool, float]:
        first = await pacer.wait()  # the bucket is full: at once
        paced = asyncio.create_task(pacer.wait())  # its turn in 0.1 s
        await asyncio.sleep(0.02)
        pacer.block(30.0)  # a 429 meanwhile
        start = time.monotonic()
        refused = await asyncio.wait_for(paced, 2.0)
        again = await asyncio.wait_for(pacer.wait(), 2.0)
        return first, refused, again, time.monotonic() - start

    first, refused, again, took = asyncio.run(scenario())
    assert (first, refused, again) == (True, False, False)
    assert took < 0.5


def test_pace_hands_the_bucket_to_another_process() -> None:
    # Two processes with different monotonic clocks, one wall clock: what the first spent, the
    # second does not spend again.
    wall = Clock()
    first = Pacer(1.0, 3, Clock(), wall)
    for _ in range(3):
        asyncio.run(first.wait())
    second_clock = Clock()
    second_clock.now = 50.0
    second = Pacer(1.0, 3, second_clock, wall)
    assert second.delay() == 0.0
    second.adopt(first.pace())
    assert second.delay() == pytest.approx(1.0)


def test_pace_carries_a_block() -> None:
    wall = Clock()
    first = Pacer(1.0, 1, Clock(), wall)
    first.block(30.0)
    second = Pacer(1.0, 1, Clock(), wall)
    second.adopt(first.pace())
    assert second.blocked_for() == pytest.approx(30.0)


@pytest.mark.parametrize(("rate", "expected"), [(1.0, 1.0), (None, 0.0)])
def test_a_message_counts_from_when_the_far_end_answered(
    rate: float | None, expected: float
) -> None:
    # The far end counted it on arrival, after we sent it: the next one waits a whole interval
    # from the answer, not from the send.
    clock = Clock()
    pacer = Pacer(rate, 1, clock)
    asyncio.run(pacer.wait())
    clock.now += 5.0  # a slow answer
    assert pacer.delay() == 0.0
    pacer.done()
    assert pacer.delay() == pytest.approx(expected)


def test_answers_to_senders_sharing_a_bucket_each_count_from_when_they_came() -> None:
    # Two channels posting to one Slack channel share a pacer: the burst's three messages are
    # booked at once, and arrive (and are answered) a little later. Slack counts from the
    # arrivals: the fourth may go a second after the first answer, not after the first booking.
    clock = Clock()
    pacer = Pacer(1.0, 3, clock)

    async def burst() -> None:
        for _ in range(3):
            assert await pacer.wait()

    asyncio.run(burst())
    clock.now += 0.01  # the three answers
    for _ in range(3):
        pacer.done()
    assert pacer.delay() == pytest.approx(1.0)  # at 1.01: Slack's fourth slot; 0.99 was a 429


def test_pace_is_on_the_wall_clock_whatever_each_process_monotonic_clock_reads() -> None:
    # Each process's monotonic clock starts anywhere; only the wall clock is shared.
    wall = Clock()
    wall.now = 5000.0
    sender, blocked = Pacer(1.0, 3, Clock(), wall), Pacer(1.0, 1, Clock(), wall)
    for _ in range(3):
        asyncio.run(sender.wait())
    blocked.block(30.0)
    assert sender.pace().tat == pytest.approx(5003.0)
    assert blocked.pace().blocked_until == pytest.approx(5030.0)
    later_clock = Clock()
    later_clock.now = 50.0
    later = Pacer(1.0, 3, later_clock, wall)
    later.adopt(sender.pace())
    assert later.delay() == pytest.approx(1.0)
    later.adopt(blocked.pace())
    assert later.blocked_for() == pytest.approx(30.0)


@pytest.mark.parametrize("rate", [1.0, None])
def test_adopting_nothing_or_an_older_state_changes_nothing(rate: float | None) -> None:
    clock = Clock()
    pacer = Pacer(rate, 2, clock, clock)
    asyncio.run(pacer.wait())
    before = (pacer.delay(), pacer.blocked_for())
    pacer.adopt(Pace(0.0, 0.0))  # a channel never sent to
    pacer.adopt(Pace(clock.now - 100, clock.now - 100))  # long past
    assert (pacer.delay(), pacer.blocked_for()) == before
    if rate is None:
        assert pacer.pace() == Pace(0.0, 0.0)


@pytest.mark.parametrize("burst", [1, 3])
def test_a_pace_its_holder_was_killed_before_saving_is_taken_as_an_empty_bucket(
    burst: int,
) -> None:
    # The process sending to the channel was killed: the far end may have counted a full burst
    # just now. The next message waits one interval, as after a burst; no block is set.
    clock = Clock()
    pacer = Pacer(1.0, burst, clock, clock)
    pacer.adopt(Pace(UNKNOWN_TAT, 0.0))
    assert pacer.delay() == pytest.approx(1.0)
    assert pacer.blocked_for() == 0
    clock.now += 1.0
    assert asyncio.run(pacer.wait()) and pacer.delay() == pytest.approx(1.0)  # no burst yet
    unpaced = Pacer(None, 1, clock, clock)
    unpaced.adopt(Pace(UNKNOWN_TAT, 0.0))
    assert unpaced.delay() == 0


def test_burst_of_60_to_a_slack_enforcing_1_per_s_gets_no_429(tmp_path: Path) -> None:
    # The stand-in enforces Slack's limit itself: 1 message a second per channel, burst 3.
    with SlackStandIn(rate_per_s=1.0, burst=3) as slack:
        channels = (
            '[channels.bot]\ntype = "slack"\ntoken = "xoxb-test-token"\n'
            f'channel = "C0123456789"\napi_url = "{slack.api_url}"\ndigest_after = 0\n'
        )
        routes = '[[routes]]\nname = "all"\nchannels = ["bot"]\n'
        with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
            for n in range(60):
                room, owner = f"room-{n % 3}", f"owner-{n}"
                body = SEED_BODY.replace(b'"room_id"', json.dumps(room).encode())
                body = body.replace(b'"user2"', json.dumps(owner).encode())
                body = body.replace(b"1703589922780", str(1703589922780 + n).encode())
                assert post_callback(bridge.url, body) == (200, OK_PACKET)
            assert slack.wait_for(lambda s: len(s.posted) == 60, timeout=90)
    assert slack.rejected_429 == 0
    for index in range(3):
        owners = [
            int(field["text"].rsplit("-", 1)[1])
            for p in slack.posted
            for field in p.payload["blocks"][1]["fields"][1:2]
            if p.payload["blocks"][1]["fields"][0]["text"] == f"*Room*\nroom-{index}"
        ]
        assert owners == list(range(index, 60, 3))  # Tencent's order, per room
    times = [p.received_at for p in slack.posted]
    assert times[-1] - times[0] >= 56  # 3 at once, then one a second


def test_channels_posting_to_one_slack_channel_together_get_no_429(tmp_path: Path) -> None:
    # Paced together, their lanes booked the burst's three messages at once, and the fourth
    # went a second after the first booking: a few ms before Slack's bucket let it in.
    with SlackStandIn(rate_per_s=1.0, burst=3) as slack:
        channels = "".join(
            f'[channels.{name}]\ntype = "slack"\ntoken = "xoxb-test-token"\n'
            f'channel = "C0123456789"\napi_url = "{slack.api_url}"\ndigest_after = 0\n'
            for name in ("rest", "vip")
        )
        routes = '[[routes]]\nname = "all"\nchannels = ["rest", "vip"]\n'
        with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
            for n in range(4):
                body = SEED_BODY.replace(b'"room_id"', json.dumps(f"room-{n}").encode())
                assert post_callback(bridge.url, body) == (200, OK_PACKET)
            assert slack.wait_for(lambda s: len(s.posted) == 8, timeout=30)
    assert slack.rejected_429 == 0


def test_a_pace_saved_before_the_clock_went_back_is_taken_at_most_as_far_ahead_as_it_goes() -> None:
    # A sender saves its pace; the wall clock then steps an hour back before the next holder
    # takes it. Taken as it reads, it would hold the channel an hour longer.
    wall, ticks = Clock(), Clock()
    wall.now = 5000.0
    sender = Pacer(1.0, 3, Clock(), wall)
    for _ in range(3):
        asyncio.run(sender.wait())  # the burst: the bucket is empty
    sender.block(30.0)
    saved = sender.pace()
    wall.now -= 3600.0
    later = Pacer(1.0, 3, ticks, wall)
    later.adopt(saved)
    assert later.pace().tat == pytest.approx(wall.now + 3.0)  # the burst and one message
    assert later.blocked_for() == pytest.approx(3600.0)  # the longest block a 429 sets
