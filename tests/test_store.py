"""The Store contract, run against every engine: SQLite on a file, PostgreSQL on the server that
LIVE_BRIDGE_TEST_POSTGRES_URL names (skipped where it is unset). Everything is asserted through
the Store interface, so one test speaks for both engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bridge.store import UNKNOWN_TAT, Claimed, DeliveryRow, NewDelivery, Pace, State, Store
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore
from tests.store_rows import APP, add, new_event, opener

pytestmark = pytest.mark.anyio

OpenStore = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Makes store instances that share one database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return lambda: PostgresStore(url)
    return lambda: SQLiteStore(tmp_path / "bridge.db")


@pytest.fixture
async def open_store(engine: Callable[[], Store]) -> AsyncIterator[OpenStore]:
    """Opens another instance on the test's database, as a second process would; closes them
    all at the end."""
    async with opener(engine) as open_:
        yield open_


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


async def deliveries(store: Store) -> list[DeliveryRow]:
    """Every delivery, delivered ones included, oldest first."""
    return sorted((d for e in await store.recent_events(1000) for d in e.deliveries),
                  key=lambda d: d.id)  # fmt: skip


async def test_record_writes_event_and_deliveries_together(store: Store) -> None:
    now = time.time()
    recorded = await store.record(
        new_event(app=7), [NewDelivery("a", "p1"), NewDelivery("b", None, "render failed: x")],
        now, 600,
    )  # fmt: skip
    assert not recorded.duplicate
    (event,) = await store.recent_events(10)
    assert (event.id, event.command, event.sdk_app_id, event.room_id) == (
        recorded.event_id, "Live.CallbackAfterChangeOwner", 7, "r1",
    )  # fmt: skip
    # Each as Tencent named it, with its app: not the room_key the store orders by.
    expected = [("a", State.PENDING, None, 7, "r1"), ("b", State.DEAD, "render failed: x", 7, "r1")]
    for listed in (event.deliveries, (await store.list_deliveries(False, None, 10))[::-1]):
        assert [(d.channel, d.state, d.last_error, d.sdk_app_id, d.room_id) for d in listed] == (
            expected
        )
    (claimed,) = await store.claim("a", now, 10, 30)
    assert (claimed.payload, claimed.event_id, claimed.received_at) == ("p1", event.id, now)


async def test_duplicate_within_window_is_stored_once(store: Store) -> None:
    now = time.time()
    first = await store.record(new_event(), [NewDelivery("a", "p")], now, 600)
    again = await store.record(new_event(), [NewDelivery("a", "p")], now + 599, 600)
    assert again.duplicate and again.event_id == first.event_id
    later = await store.record(new_event(), [NewDelivery("a", "p")], now + 1300, 600)
    assert not later.duplicate and later.event_id != first.event_id
    assert len(await deliveries(store)) == 2


async def test_dedup_window_zero_disables(store: Store) -> None:
    now = time.time()
    await store.record(new_event(), [], now, 0)
    assert not (await store.record(new_event(), [], now, 0)).duplicate


async def test_dedup_holds_across_instances_recording_at_once(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    now = time.time()
    keys = [f"k{n}" for n in range(20)]
    results = await asyncio.gather(
        *(s.record(new_event(key), [NewDelivery("a", "p")], now, 600)
          for key in keys for s in (a, b))
    )  # fmt: skip
    for first, second in zip(results[::2], results[1::2], strict=True):
        assert sorted([first.duplicate, second.duplicate]) == [False, True]
        assert first.event_id == second.event_id
    assert len(await deliveries(a)) == len(keys)


async def test_claim_is_per_channel_in_event_time_order(store: Store) -> None:
    now = time.time()
    await add(store, "late", room="r1", event_time=3000, now=now)
    await add(store, "early", room="r2", event_time=1000, now=now)
    await add(store, "no-time", room="r3", event_time=None, now=now - 10)
    await add(store, "other", channel="b", now=now)
    claimed = await store.claim("a", now, 10, 30)
    assert [c.payload for c in claimed] == ["p-early", "p-late", "p-no-time"]
    assert all(c.attempts == 1 and c.channel == "a" for c in claimed)
    assert claimed[0].body == '{"CallbackCommand":"x"}' and claimed[0].sdk_app_id == 1400000000
    assert await store.claim("a", now, 10, 30) == []  # leased
    assert [c.payload for c in await store.claim("b", now, 10, 30)] == ["p-other"]


async def test_a_room_waits_for_its_earlier_delivery(store: Store) -> None:
    now = time.time()
    for n in range(3):
        await add(store, f"r1-{n}", room="r1", event_time=1000 + n, now=now)
    await add(store, "r2-0", room="r2", event_time=1500, now=now)
    await add(store, "roomless", room=None, event_time=500, now=now)
    first, *_ = await store.claim("a", now, limit=1, lease_s=30)
    assert first.payload == "p-roomless"
    head = await store.claim("a", now, limit=1, lease_s=30)
    assert [c.payload for c in head] == ["p-r1-0"]
    # r1-0 is in flight: r1's later events wait, r2 does not.
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == ["p-r2-0"]
    assert await store.due_channels(now, []) == []
    # r1-0 fails and is due again later: still nothing for r1 until then.
    await store.mark_retry(head[0].id, now, now + 60, "HTTP 500", count=True)
    assert await store.claim("a", now, 10, 30) == []
    assert await store.next_due(now) == pytest.approx(now + 30)  # leases of r2-0, roomless
    # Once it is due, it comes first and the rest follow in the same claim, in order.
    later = await store.claim("a", now + 61, 10, 30)  # the other leases have expired too
    r1 = [c for c in later if c.room_key == f"{APP}:r1"]
    assert [c.payload for c in r1] == ["p-r1-0", "p-r1-1", "p-r1-2"]
    assert r1[0].attempts == 2


async def test_rooms_of_one_name_in_two_apps_are_two_rooms(store: Store) -> None:
    # One bridge may serve several apps ([tencent] sdk_app_id), each naming its own rooms: app
    # 2's "r1" neither waits for app 1's "r1" nor, without an EventTime, goes after it.
    now = time.time()
    later = int((now + 3600) * 1000)
    await add(store, "one-0", room="r1", event_time=later, now=now)
    await add(store, "one-1", room="r1", event_time=later + 1, now=now)
    await add(store, "two-0", room="r1", event_time=later + 2, now=now, app=APP + 1)
    await add(store, "three", room="r1", event_time=None, now=now, app=APP + 2)
    [three, head] = await store.claim("a", now, 2, 30)
    assert (three.payload, three.room_key) == ("p-three", f"{APP + 2}:r1")
    assert (head.payload, head.room_key) == ("p-one-0", f"{APP}:r1")
    # App 1's r1 is in flight: its next event waits, app 2's r1 does not.
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == ["p-two-0"]


async def test_dead_letter_releases_its_room(store: Store) -> None:
    now = time.time()
    await add(store, "first", event_time=1, now=now)
    await add(store, "second", event_time=2, now=now)
    (head,) = await store.claim("a", now, 1, 30)
    await store.mark_retry(head.id, now, now + 60, "HTTP 500", count=True)
    assert await store.claim("a", now, 10, 30) == []
    (again,) = await store.claim("a", now + 61, 1, 30)
    await store.mark_dead(again.id, now, "gave up")
    assert [c.payload for c in await store.claim("a", now + 61, 10, 30)] == ["p-second"]


async def test_outcomes_apply_only_to_what_is_in_flight(store: Store) -> None:
    now = time.time()
    await add(store, "1", room="x", now=now)
    await add(store, "2", room="y", now=now)
    one, two = await store.claim("a", now, 10, 30)
    assert await store.bury_unknown_channels([], now, "channel removed") == 2
    # too late: stays dead
    assert not await store.mark_retry(one.id, now, now, "HTTP 503", count=True)
    assert await store.mark_delivered(two.id, now)  # it did get through: recorded as delivered
    assert [(d.state, d.last_error) for d in await deliveries(store)] == [
        (State.DEAD, "channel removed"), (State.DELIVERED, "channel removed"),
    ]  # fmt: skip


async def test_outcomes_belong_to_the_instance_that_claimed(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    now = time.time()
    await add(a, "1", room="x", now=now)
    await add(a, "2", room="y", now=now)
    one, two = await a.claim("a", now, 10, 30)
    # b holds neither: its outcomes change nothing, and it is told so.
    assert not await b.mark_delivered(one.id, now)
    assert not await b.mark_retry(one.id, now, now, "HTTP 500", count=True)
    assert not await b.mark_dead(two.id, now, "HTTP 404")
    await b.release([one.id, two.id], now, now)
    assert [(d.state, d.attempts, d.last_error) for d in await deliveries(a)] == [
        (State.IN_FLIGHT, 1, None), (State.IN_FLIGHT, 1, None),
    ]  # fmt: skip
    # a's lease runs out and b claims both again: a's late outcomes change nothing either.
    assert [c.attempts for c in await b.claim("a", now + 31, 10, 30)] == [2, 2]
    assert not await a.mark_retry(one.id, now + 32, now + 32, "HTTP 500", count=True)
    assert not await a.mark_dead(two.id, now + 32, "HTTP 404")
    await a.release([one.id, two.id], now + 32, now + 32)
    assert not await a.mark_delivered(one.id, now + 32)
    assert [(d.state, d.attempts, d.last_error) for d in await deliveries(a)] == [
        (State.IN_FLIGHT, 2, None), (State.IN_FLIGHT, 2, None),
    ]  # fmt: skip
    assert await b.mark_delivered(one.id, now + 33)
    assert await b.mark_dead(two.id, now + 33, "HTTP 404")
    assert [(d.state, d.last_error) for d in await deliveries(a)] == [
        (State.DELIVERED, None), (State.DEAD, "HTTP 404"),
    ]  # fmt: skip


async def test_a_late_outcome_counts_while_nobody_took_over(store: Store) -> None:
    now = time.time()
    await add(store, "1", now=now)
    (claimed,) = await store.claim("a", now, 10, 30)
    # The lease ran out, the row is still ours.
    assert await store.mark_delivered(claimed.id, now + 100)
    assert [d.state for d in await deliveries(store)] == [State.DELIVERED]


async def test_delivered_marks_sent_together_each_say_whether_they_took(
    open_store: OpenStore,
) -> None:
    # SQLite marks a batch's deliveries in one statement: each is told of its own row.
    a, b = await open_store(), await open_store()
    now = time.time()
    for room in ("x", "y", "z"):
        await add(a, room, room=room, now=now)
    claimed = await a.claim("a", now, 10, 30)
    (taken,) = await b.claim("a", now + 31, 1, 30)  # a's lease ran out: b takes the first over
    marked = await asyncio.gather(*(a.mark_delivered(c.id, now + 32) for c in claimed))
    assert marked == [c.id != taken.id for c in claimed] == [False, True, True]


async def test_retry_dead_leaves_a_letter_dead_since_it_began(store: Store) -> None:
    # SQLite retries in batches, callbacks and sends in between: a letter it retried, sent and
    # dead again meanwhile was taken again by a later batch (sent three times, counted thrice).
    now = time.time()
    await add(store, "a", channel="x", now=now)
    (claimed,) = await store.claim("x", now, 10, 30)
    await store.mark_dead(claimed.id, now + 5, "HTTP 404")  # while the command runs
    assert await store.retry_dead("x", now) == 0
    assert await store.retry_dead(None, now) == 0
    assert await store.retry_dead("x", now + 6) == 1


async def test_a_retried_delivery_is_rendered_again_when_sent(store: Store) -> None:
    # Its stored message may be one its channel's type no longer takes (a webhook's body for a
    # channel that is Slack's now, rendered by a replica still on the old config): retried as
    # it was, it died again with no_text.
    now = time.time()
    for key in ("a", "b"):
        await add(store, key, channel="x", room=key, now=now)
    first, second = await store.claim("x", now, 10, 30)
    for claimed in (first, second):
        await store.mark_dead(claimed.id, now, "HTTP 200: no_text")
    assert await store.retry([first.id], now) == [first.id]
    assert await store.retry_dead("x", now) == 1
    assert [c.payload for c in await store.claim("x", now, 10, 30)] == [None, None]


async def test_resume_makes_a_channels_backed_off_deliveries_due_now(store: Store) -> None:
    now = time.time()
    for n in range(4):
        await add(store, f"a{n}", channel="a", room=f"r{n}", now=now)
    await add(store, "b0", channel="b", now=now)
    a0, a1, a2, _in_flight = await store.claim("a", now, 10, 30)
    (b0,) = await store.claim("b", now, 10, 30)
    await store.mark_retry(a0.id, now, now + 60, "HTTP 503", count=True)
    await store.mark_retry(a1.id, now, now + 5, "HTTP 503", count=True)
    await store.mark_delivered(a2.id, now)  # a3 stays in flight
    await store.mark_retry(b0.id, now, now + 60, "HTTP 503", count=True)  # another channel
    assert await store.claim("a", now + 1, 10, 30) == []
    assert await store.resume("a", now + 1) == 2
    assert sorted(c.id for c in await store.claim("a", now + 1, 10, 30)) == [a0.id, a1.id]
    assert await store.claim("b", now + 1, 10, 30) == []  # still backing off
    assert await store.resume("a", now + 2) == 0


async def test_a_channel_is_taken_in_turns(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    now = time.time()
    await add(a, "1", channel="ch", now=now)
    assert await a.take_channel("ch", now, 30) == Pace(0, 0)  # never sent to
    assert await a.take_channel("ch", now + 1, 30) == Pace(0, 0)  # renewing its own lease
    assert await b.take_channel("ch", now + 2, 30) is None
    assert await b.due_channels(now + 2, []) == []  # a holds it
    assert await a.due_channels(now + 2, []) == ["ch"]
    await b.leave_channel("ch", Pace(1.0, 1.0))  # not b's: nothing saved
    await a.leave_channel("ch", Pace(now + 2.5, now + 7.25))
    assert await b.due_channels(now + 3, []) == ["ch"]
    assert await b.take_channel("ch", now + 3, 30) == Pace(now + 2.5, now + 7.25)
    assert await a.take_channel("ch", now + 4, 30) is None
    await a.leave_channel("ch", Pace(0, 0))  # b holds it now: nothing saved
    # b stops without leaving (killed): once its lease has run out, a takes over. The pace saved
    # last is older than b's sends since: unknown, the bucket taken as empty; the block stays.
    assert await a.take_channel("ch", now + 32, 30) is None
    assert await a.take_channel("ch", now + 34, 30) == Pace(UNKNOWN_TAT, now + 7.25)
    assert await a.take_channel("ch", now + 35, 30) == Pace(UNKNOWN_TAT, now + 7.25)  # a's own
    assert await b.due_channels(now + 35, []) == []
    await a.leave_channel("ch", Pace(now + 36, 0))
    assert await b.take_channel("ch", now + 37, 30) == Pace(now + 36, 0)  # left: known again


async def test_a_block_is_saved_at_once_and_outlives_its_holder(open_store: OpenStore) -> None:
    # Saved only when the channel was left, a 429's block was lost to a holder killed first.
    a, b = await open_store(), await open_store()
    now = time.time()
    await add(a, "1", channel="ch", now=now)
    assert await a.take_channel("ch", now, 30) == Pace(0, 0)
    await a.block_channel("ch", now + 60)
    await b.block_channel("ch", now + 10)  # anyone's 429 blocks it; never shortened
    # a is killed holding it: once its lease has run out, b takes it over, blocked.
    assert await b.take_channel("ch", now + 31, 30) == Pace(UNKNOWN_TAT, now + 60)


async def test_due_channels_and_exclusions(store: Store) -> None:
    now = time.time()
    await add(store, "1", channel="a", now=now)
    await add(store, "2", channel="b", now=now)
    await add(store, "3", channel="c", now=now)
    (waiting,) = await store.claim("c", now, 10, 30)
    await store.mark_retry(waiting.id, now, now + 100, "HTTP 503", count=True)
    assert sorted(await store.due_channels(now, [])) == ["a", "b"]
    assert await store.due_channels(now, ["a"]) == ["b"]


async def test_what_was_written_before_the_clock_went_back_waits_no_longer(store: Store) -> None:
    """Rows written an hour ahead of `now` (the wall clock stepped back since): pending ones,
    just recorded or backing off, are due at once, and hold back no later delivery of their
    room; one in flight keeps its lease, as its send may be under way."""
    now = time.time()
    before = now + 3600  # the clock read this when they were written
    await add(store, "recorded", channel="a", room="r1", event_time=1000, now=before)
    await add(store, "retried", channel="a", room="r2", event_time=1000, now=before)
    await add(store, "sending", channel="a", room="r3", event_time=1000, now=before)
    claimed = {c.room_key: c for c in await store.claim("a", before, 10, 30)}
    await store.release([claimed[f"{APP}:r1"].id], before, before)
    await store.mark_retry(claimed[f"{APP}:r2"].id, before, before + 60, "HTTP 503", count=True)
    for room in ("r1", "r2", "r3"):  # the clock went back: the rooms' next events
        await add(store, f"later-{room}", channel="a", room=room, event_time=2000, now=now)
    assert await store.due_channels(now, []) == ["a"]
    assert await store.next_due(now) == before + 30  # the lease; the pending ones are due now
    got = await store.claim("a", now, 10, 30)
    assert [(c.room_key.removeprefix(f"{APP}:"), c.payload) for c in got if c.room_key] == [
        ("r1", "p-recorded"), ("r2", "p-retried"), ("r1", "p-later-r1"), ("r2", "p-later-r2"),
    ]  # fmt: skip
    # A small step (under CLOCK_STEP_S) waits for the clock as before.
    await add(store, "small", channel="b", room="r4", now=now)
    (small,) = await store.claim("b", now, 10, 30)
    await store.mark_retry(small.id, now + 0.5, now + 10, "HTTP 503", count=True)
    assert await store.claim("b", now, 10, 30) == []


async def test_an_event_without_event_time_goes_after_its_room(store: Store) -> None:
    """By arrival, and after everything its room has already in the channel: one that comes
    after the clock went back does not overtake its room's earlier events."""
    now = time.time()
    await add(store, "early", room="r1", event_time=None, now=now + 3600)
    await add(store, "tencent", room="r1", event_time=int((now + 7200) * 1000), now=now + 3600)
    await add(store, "late", room="r1", event_time=None, now=now)
    await add(store, "other-room", room="r2", event_time=None, now=now)
    got = await store.claim("a", now, 10, 30)
    assert [c.payload for c in got] == ["p-other-room", "p-early", "p-tencent", "p-late"]


async def test_lease_expiry_reclaims(store: Store) -> None:
    now = time.time()
    await add(store, "k", now=now)
    assert len(await store.claim("a", now, 10, lease_s=30)) == 1
    assert await store.claim("a", now + 29, 10, 30) == []
    assert [c.attempts for c in await store.claim("a", now + 31, 10, 30)] == [2]


async def test_expired_leases_and_pending_are_claimed_in_one_order(store: Store) -> None:
    # A claim takes in-flight deliveries whose lease ran out (a process died) and pending ones
    # together, by Tencent's time, up to the limit.
    now = time.time()
    await add(store, "early", room="r1", event_time=1000, now=now)
    await add(store, "late", room="r2", event_time=3000, now=now)
    assert [c.payload for c in await store.claim("a", now, 10, lease_s=30)] == ["p-early", "p-late"]
    await add(store, "middle", room="r3", event_time=2000, now=now)
    assert await store.due_channels(now + 1, []) == ["a"]  # pending "middle"
    assert [c.payload for c in await store.claim("a", now + 1, 10, 30)] == ["p-middle"]
    assert await store.due_channels(now + 2, []) == []  # all three in flight, leases running
    assert await store.due_channels(now + 40, []) == ["a"]  # their leases ran out
    claimed = await store.claim("a", now + 40, 2, 30)
    assert [c.payload for c in claimed] == ["p-early", "p-middle"]
    assert [c.payload for c in await store.claim("a", now + 40, 2, 30)] == ["p-late"]


async def test_outcomes_and_release(store: Store) -> None:
    now = time.time()
    for key in ("1", "2", "3", "4"):
        await add(store, key, room=key, now=now)
    c1, c2, c3, c4 = await store.claim("a", now, 10, 30)
    await store.mark_delivered(c1.id, now)
    await store.mark_retry(c2.id, now, now + 5, "HTTP 500", count=True)
    await store.mark_retry(c3.id, now, now + 1, "HTTP 429", count=False)
    await store.mark_retry(c4.id, now, now + 5, "HTTP 500", count=True)
    (again,) = await store.claim("a", now + 6, 1, 30)
    await store.release([again.id], now, now + 2)
    assert [(d.state, d.attempts, d.last_error) for d in await deliveries(store)] == [
        (State.DELIVERED, 1, None),
        (State.PENDING, 1, "HTTP 500"),  # released: attempt given back, error kept
        (State.PENDING, 0, "HTTP 429"),
        (State.PENDING, 1, "HTTP 500"),
    ]
    assert await store.next_due(now) == pytest.approx(now + 1)


async def test_threads_expire_and_are_forgotten(store: Store) -> None:
    now = time.time()
    assert await store.get_thread("bot", "r1", now - 3600) is None
    await store.set_thread("bot", "r1", "1700000000.000100", now)
    assert await store.get_thread("bot", "r1", now - 3600) == "1700000000.000100"
    assert await store.get_thread("bot", "r1", now + 1) is None  # older than the TTL allows
    assert await store.get_thread("other", "r1", now - 3600) is None
    await store.set_thread("bot", "r1", "1700000000.000200", now + 2)  # a new thread replaces
    assert await store.get_thread("bot", "r1", now + 1) == "1700000000.000200"
    await store.forget_thread("bot", "r1")
    assert await store.get_thread("bot", "r1", now - 3600) is None


async def test_prune_keeps_dead_letters_and_recent_rows(store: Store) -> None:
    now = time.time()
    old = now - 100 * 3600
    await store.record(new_event("old-done", "r1"), [NewDelivery("a", "p")], old, 600)
    await store.record(new_event("old-dead", "r2"), [NewDelivery("a", None, "x")], old, 600)
    await store.record(new_event("new-done", "r3"), [NewDelivery("a", "p")], now, 600)
    await store.record(new_event("unrouted", "r4"), [], old, 600)
    for c in await store.claim("a", now, 10, 30):
        await store.mark_delivered(c.id, old if c.room_key == f"{APP}:r1" else now)
    await store.set_thread("bot", "r1", "1.2", old)
    await store.set_thread("bot", "r2", "1.3", now - 80 * 3600)  # older than the retention
    pruned = await store.prune(now - 72 * 3600, now - 72 * 3600, now - 96 * 3600)
    assert pruned == 1 + 2 + 3 + 1  # a delivery, two events, three dedup keys, a thread
    events = await store.recent_events(10)
    assert [(e.room_id, [d.state for d in e.deliveries]) for e in events] == [
        ("r3", [State.DELIVERED]), ("r2", [State.DEAD]),
    ]  # fmt: skip
    assert await store.get_thread("bot", "r1", 0) is None
    assert await store.get_thread("bot", "r2", 0) == "1.3"  # threads have a cutoff of their own


@pytest.mark.parametrize("delete", ["prune", "drop"])
async def test_ids_of_deleted_rows_are_not_handed_out_again(store: Store, delete: str) -> None:
    # A webhook's webhook-id is derived from its delivery's id, and a receiver drops a message
    # whose id it has seen: a new message with a deleted delivery's id would be dropped as well.
    now = time.time()
    old = now - 100 * 3600
    first = await store.record(new_event("k1"), [NewDelivery("a", "p1")], old, 600)
    (sent,) = await store.claim("a", old, 10, 30)
    if delete == "prune":
        await store.mark_delivered(sent.id, old)
        assert await store.prune(now - 72 * 3600, now - 72 * 3600, now) == 3  # delivery, event, key
    else:  # given up on, though the receiver may have processed it (a timeout, say)
        await store.mark_dead(sent.id, old, "timed out")
        assert await store.drop([sent.id], now) == [sent.id]
    second = await store.record(new_event("k2"), [NewDelivery("a", "p2")], now, 600)
    (again,) = await store.claim("a", now, 10, 30)
    assert second.event_id > first.event_id
    assert again.id > sent.id
    assert again.message_key != sent.message_key


async def test_stats_list_retry_drop(store: Store) -> None:
    now = time.time()
    for n in range(3):
        await add(store, f"a{n}", channel="a", room=f"r{n}", now=now - n)
    await store.record(new_event("b0", "rb"), [NewDelivery("b", None, "render failed")], now, 0)
    c0, c1, c2 = await store.claim("a", now, 10, 30)
    await store.mark_delivered(c0.id, now)
    await store.mark_dead(c1.id, now, "HTTP 404")
    stats = {s.channel: s for s in await store.stats()}
    assert (stats["a"].pending, stats["a"].in_flight, stats["a"].dead, stats["a"].delivered) == (
        0, 1, 1, 1,
    )  # fmt: skip
    assert stats["b"].dead == 1 and stats["b"].oldest_pending_at is None
    dead = await store.list_deliveries(True, None, 10)
    assert [(d.channel, d.state, d.last_error) for d in dead] == [
        ("b", State.DEAD, "render failed"), ("a", State.DEAD, "HTTP 404"),
    ]  # fmt: skip
    assert [d.id for d in await store.list_deliveries(False, "a", 10)] == [c2.id, c1.id]
    assert await store.retry([c1.id, c2.id], now) == [c1.id]  # the in-flight one is not touched
    assert await store.retry_dead("b", now) == 1
    stats = {s.channel: s for s in await store.stats()}
    assert {name: s.pending for name, s in stats.items()} == {"a": 1, "b": 1}
    assert stats["a"].oldest_pending_at == pytest.approx(now - 1)  # c1's event
    assert await store.drop([c1.id, c2.id, 999], now) == [c1.id]
    assert [d.attempts for d in await store.list_deliveries(False, None, 10)] == [0, 1]


async def test_retry_and_drop_take_more_ids_than_a_statement_holds(store: Store) -> None:
    # SQLite's older builds take 999 parameters a statement.
    now = time.time()
    await store.record(new_event("many"), [NewDelivery("a", "p")] * 2500, now, 0)
    ids = [d.id for d in await deliveries(store)]
    assert sorted(await store.retry([*ids, 10**9], now)) == ids
    assert sorted(await store.drop([10**9, *ids], now)) == ids
    assert await deliveries(store) == []


async def test_channels_of_names_each_delivery_there_is(store: Store) -> None:
    now = time.time()
    await store.record(new_event("many"), [NewDelivery("a", "p"), NewDelivery("b", "p")] * 600,
                       now, 0)  # fmt: skip
    rows = await deliveries(store)
    found = await store.channels_of([10**9, *(d.id for d in rows), rows[0].id])
    assert found == {d.id: d.channel for d in rows}  # more ids than a statement holds
    assert await store.channels_of([]) == {}


async def test_bury_unknown_channels(store: Store) -> None:
    now = time.time()
    await add(store, "1", channel="kept", now=now)
    await add(store, "2", channel="gone", now=now)
    assert await store.bury_unknown_channels(["kept"], now, "channel removed") == 1
    assert [(d.channel, d.state, d.last_error) for d in await deliveries(store)] == [
        ("kept", State.PENDING, None), ("gone", State.DEAD, "channel removed"),
    ]  # fmt: skip
    assert await store.bury_unknown_channels([], now, "channel removed") == 1


async def test_forget_payloads_of_undelivered_deliveries(store: Store) -> None:
    # A reload that gives a channel another type: its waiting messages are rendered again.
    now = time.time()
    await add(store, "1", channel="a", room="r1", now=now)
    await add(store, "2", channel="a", room="r2", now=now)
    await add(store, "3", channel="b", room="r3", now=now)
    (first,) = await store.claim("a", now, 1, 30)
    await store.mark_delivered(first.id, now)
    assert await store.forget_payloads(["a"]) == 1  # the delivered one keeps what it sent
    assert [c.payload for c in await store.claim("a", now, 10, 30)] == [None]
    assert [c.payload for c in await store.claim("b", now, 10, 30)] == ["p-3"]


async def test_ping_writes(store: Store) -> None:
    await store.ping()
    await store.ping()


async def buried_in_flight(
    store: Store, open_store: OpenStore, now: float
) -> tuple[Claimed, Claimed, Store]:
    """Two deliveries claimed (in flight until now + 30), then buried by a reload that removed
    their channel; and a second store on the same data, as the outbox commands open."""
    await add(store, "1", channel="a", room="r1", now=now)
    await add(store, "2", channel="a", room="r2", now=now)
    sent, failed = await store.claim("a", now, 10, 30)
    assert await store.bury_unknown_channels([], now + 1, "channel removed") == 2
    return sent, failed, await open_store()


async def test_a_dead_letter_buried_in_flight_waits_for_its_lease_to_be_retried(
    store: Store, open_store: OpenStore
) -> None:
    # A reload buries deliveries of a removed channel, those being sent too: until the lease
    # runs out, the send may still get through (and is then recorded as delivered).
    now = time.time()
    sent, failed, outbox = await buried_in_flight(store, open_store, now)
    assert await outbox.retry_dead(None, now + 2) == 0
    assert await outbox.retry([sent.id, failed.id], now + 2) == []
    await store.mark_delivered(sent.id, now + 3)
    await store.mark_retry(failed.id, now + 3, now + 4, "HTTP 503", True)  # stays dead
    assert [d.state for d in await deliveries(store)] == [State.DELIVERED, State.DEAD]
    assert await outbox.retry([failed.id], now + 29) == []
    assert await outbox.retry([failed.id], now + 31) == [failed.id]
    (again,) = await store.claim("a", now + 31, 10, 30)
    assert again.id == failed.id


async def test_a_dead_letter_buried_in_flight_waits_for_its_lease_to_be_dropped(
    store: Store, open_store: OpenStore
) -> None:
    # "dropped" must not name a message that is going out: the send under way may still get
    # through and be recorded as delivered, as for retry above.
    now = time.time()
    sent, failed, outbox = await buried_in_flight(store, open_store, now)
    assert await outbox.drop([sent.id, failed.id], now + 2) == []
    await store.mark_delivered(sent.id, now + 3)
    assert [d.state for d in await deliveries(store)] == [State.DELIVERED, State.DEAD]
    assert await outbox.drop([sent.id, failed.id], now + 29) == []
    assert await outbox.drop([sent.id, failed.id], now + 31) == [failed.id]
    assert [d.state for d in await deliveries(store)] == [State.DELIVERED]
