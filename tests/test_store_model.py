"""A model-based test of the store: Hypothesis drives the real store (SQLite; PostgreSQL where
LIVE_BRIDGE_TEST_POSTGRES_URL is set) through random sequences of what the receiver, the worker's
lanes and the operators do, runs each step on a plain model too (tests/store_model.py), and after
every step compares what the store answers, and every row of its tables, with the model.

Only sequences the real code can produce: a lane takes its channel before it claims, claims again
only once everything it claimed is settled, renews its channel once half the lease has gone, and
settles only what it claimed (perhaps after its lease ran out and another took the delivery);
SQLite's `recover` runs at a start, when no process of before is left. Times are arguments, so
leases run out when the step `advance` says.

`make test` runs a few dozen sequences a store (15 s for both). A long hunt, outside make test,
which prints how often each interesting turn came up:
LIVE_BRIDGE_MODEL_EXAMPLES=3000 LIVE_BRIDGE_MODEL_STEPS=100 pytest -q -s tests/test_store_model.py
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bridge.store import Claimed, NewDelivery, NewEvent, Pace, Recorded, Store, sqlite_outbox
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore
from tests.store_model import Model

T = TypeVar("T")

T0 = 1_700_000_000.0  # the model's wall clock starts here and moves in quarter seconds
CHANNELS = ("a", "b", "c")
LEASE = {"a": 10.0, "b": 10.0, "c": 30.0}  # each channel's lease, as its policy gives it
ROOMS = ("r1", "r2", None)
MS = int(T0 * 1000)
# Callbacks by number: a repeat of one is Tencent's retry (same key, same bytes). Their
# EventTimes interleave with the arrival times of those without one.
EVENT_TIMES = (None, MS + 1000, MS, MS + 1000, None, MS - 5000, MS + 250, None)
CALLBACKS = tuple(
    NewEvent(
        sdk_app_id=1400000000 + n % 2,
        command="Live.CallbackBeforeEnterRoom" if n == 7 else "Live.CallbackAfterChangeOwner",
        room_id=ROOMS[n % len(ROOMS)],
        event_time=at,
        body=f'{{"n":{n}}}',
        query=f'{{"q":{n}}}',
        dedup_key=f"{at or 0:016x}:key{n}",
    )
    for n, at in enumerate(EVENT_TIMES)
)
# Where each callback's route sends it, for the steps that record several; "c!" fails to render.
ROUTED = (("a",), ("a", "b"), ("b", "c!"), ("a", "c"), (), ("c",), ("a", "b", "c"), ("b",))
STEPS = st.sampled_from([0.0, 0.25, 1.0, 2.5, 5.0, 9.75, 10.0, 15.0, 30.0, 31.0, 120.0])
DELAYS = st.sampled_from([0.0, 0.25, 1.0, 5.0, 30.0])
OUTCOMES = ("delivered", "retry", "free", "dead", "release")
EXAMPLES = int(os.environ.get("LIVE_BRIDGE_MODEL_EXAMPLES", "0"))
STEPS_EACH = int(os.environ.get("LIVE_BRIDGE_MODEL_STEPS", "0"))
SEEN: collections.Counter[str] = collections.Counter()  # what the sequences got to, for long runs


def seen(what: str) -> None:
    event(what)
    SEEN[what] += 1


# What the store keeps and shows only through later answers (an owner, a lease, when it was
# delivered), read straight from its tables after every step.
HIDDEN = {
    "deliveries": "SELECT id, owner, lease_until, payload, delivered_at, order_ts FROM deliveries",
    "events": "SELECT id, received_at, sdk_app_id, event_time, body, query FROM events",
    "channels": "SELECT channel, owner, lease_until, tat, blocked_until FROM channels",
    "dedup": "SELECT key, seen_at, event_id FROM dedup",
    "threads": "SELECT channel, room_id, ts, started_at FROM threads",
}
Tables = dict[str, list[tuple[object, ...]]]


class Engine(Protocol):
    postgres: bool

    def fresh(self) -> None:
        """An empty database for the next sequence."""

    def make(self, serving: bool) -> Store: ...

    def peek(self) -> Tables:
        """Every row of HIDDEN's queries, sorted."""

    def done(self) -> None:
        """The sequence is over: its database may go."""


class SQLiteEngine:
    postgres = False

    def __init__(self, folder: Path) -> None:
        self._folder, self._n = folder, 0
        self.path = folder / "model.db"

    def fresh(self) -> None:
        self._n += 1
        self.path = self._folder / f"model-{self._n}.db"

    def make(self, serving: bool) -> Store:
        return SQLiteStore(self.path, exclusive=serving, sync="normal")

    def peek(self) -> Tables:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return {name: sorted(conn.execute(sql).fetchall()) for name, sql in HIDDEN.items()}

    def done(self) -> None:
        for suffix in ("", "-wal", "-shm", ".lock", ".write-lock"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


class PostgresEngine:
    postgres = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def fresh(self) -> None:
        # The test's own database (the postgres_url fixture), emptied for each sequence.
        self._conn = self._conn or psycopg.connect(self.url, autocommit=True)
        if self._conn.execute("SELECT to_regclass('deliveries')").fetchone() != (None,):
            self._conn.execute(
                "TRUNCATE events, deliveries, dedup, threads, channels RESTART IDENTITY"
            )

    def make(self, serving: bool) -> Store:
        return PostgresStore(self.url, max_size=4)

    def peek(self) -> Tables:
        assert self._conn is not None
        return {name: sorted(self._conn.execute(sql).fetchall()) for name, sql in HIDDEN.items()}

    def done(self) -> None:
        pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


@dataclass
class Claimer:
    """A process's worker: its store instance, the channels its lanes hold (until when, as the
    lane sees it) and what it claimed and has not settled."""

    store: Store
    lanes: dict[str, float] = field(default_factory=dict)
    held: dict[int, Claimed] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        owner: str = getattr(self.store, "owner")  # noqa: B009  # not part of the protocol
        return owner

    def holds(self, channel: str) -> bool:
        return any(c.channel == channel for c in self.held.values())


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.model = Model()
        self.now = T0
        self.window = 0.0
        self.opened: list[Store] = []
        SEEN["sequences"] += 1
        engine.fresh()
        self.server = self.open(serving=True)
        self.claimers = [Claimer(self.server), Claimer(self.open())]  # the server delivers too
        self.outbox = self.open()  # `live-bridge outbox …`

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    def run_all(self, steps: list[Awaitable[T]]) -> list[T]:
        async def together() -> list[T]:
            return list(await asyncio.gather(*steps))

        return self.run(together())

    def open(self, serving: bool = False) -> Store:
        store = self.engine.make(serving)
        self.run(store.open())
        self.opened.append(store)
        return store

    def close(self, store: Store) -> None:
        self.opened.remove(store)
        self.run(store.close())

    def teardown(self) -> None:
        try:
            for store in list(self.opened):
                self.close(store)
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            self.engine.done()

    @initialize(window=st.sampled_from([0.0, 5.0, 60.0]))
    def configure(self, window: float) -> None:
        self.window = window  # [delivery] dedup_window_s

    # --- the receiver ---------------------------------------------------------------------------

    def window_of(self, callback: NewEvent) -> float:
        return 0.0 if ".CallbackBefore" in callback.command else self.window

    def routed(self, n: int) -> list[NewDelivery]:
        return [NewDelivery(c[0], None, "render failed: x") if c.endswith("!")
                else NewDelivery(c, f"p{n}-{c}") for c in ROUTED[n]]  # fmt: skip

    def recorded(self, callback: NewEvent, deliveries: list[NewDelivery], got: Recorded) -> None:
        """Checks what the store answered a record, in the order records were made, and gives
        the model the ids the store gave a new event."""
        first = self.model.duplicate_of(callback, self.now, self.window_of(callback))
        if first is not None:
            seen("a retry of a callback is a duplicate")
            assert got == Recorded(first, duplicate=True)
            return
        assert not got.duplicate
        (stored,) = [e for e in self.run(self.server.recent_events(8)) if e.id == got.event_id]
        ids = {d.channel: d.id for d in stored.deliveries}
        assert sorted(ids) == sorted(d.channel for d in deliveries)
        pairs = sorted((ids[d.channel], d) for d in deliveries)
        self.model.add_event(got.event_id, callback, pairs, self.now, self.window_of(callback))

    @rule(
        n=st.integers(0, len(CALLBACKS) - 1),
        channels=st.lists(st.sampled_from(CHANNELS), unique=True, max_size=3),
        broken=st.lists(st.booleans(), min_size=3, max_size=3),
    )
    def record(self, n: int, channels: list[str], broken: list[bool]) -> None:
        """A callback, routed as the config of the moment has it (a reload changes routes)."""
        callback = CALLBACKS[n]
        deliveries = [
            NewDelivery(c, None, "render failed: x") if bad else NewDelivery(c, f"p{n}-{c}")
            for c, bad in zip(channels, broken, strict=False)
        ]
        got = self.run(self.server.record(callback, deliveries, self.now, self.window_of(callback)))
        self.recorded(callback, deliveries, got)

    @rule(numbers=st.lists(st.integers(0, len(CALLBACKS) - 1), min_size=2, max_size=5))
    def record_one_by_one(self, numbers: list[int]) -> None:
        for n in numbers:
            callback, deliveries = CALLBACKS[n], self.routed(n)
            got = self.server.record(callback, deliveries, self.now, self.window_of(callback))
            self.recorded(callback, deliveries, self.run(got))

    # SQLite only: PostgreSQL's transactions side by side give ids in any order, and Hypothesis
    # must replay a sequence alike (test_store.py has them storing one callback once).
    @precondition(lambda self: not self.engine.postgres)
    @rule(numbers=st.lists(st.integers(0, len(CALLBACKS) - 1), min_size=2, max_size=5))
    def record_at_once(self, numbers: list[int]) -> None:
        # Callbacks arriving together: SQLite's writer records them in one batch, in the order
        # they came, a repeat within the batch being a duplicate of the first.
        calls = [(CALLBACKS[n], self.routed(n)) for n in numbers]
        answers = self.run_all(
            [self.server.record(e, d, self.now, self.window_of(e)) for e, d in calls]
        )
        for (callback, deliveries), got in zip(calls, answers, strict=True):
            self.recorded(callback, deliveries, got)

    # --- the worker's lanes ---------------------------------------------------------------------

    def pick(self, data: st.DataObject, options: list[T]) -> T:
        """One of `options`, drawn alike whatever their number: the draws stay the same when
        Hypothesis replays a sequence."""
        return options[data.draw(st.integers(0, 255)) % len(options)]

    @rule(i=st.integers(0, 1), channel=st.sampled_from(CHANNELS), limit=st.integers(1, 4),
          sent=st.lists(st.sampled_from(OUTCOMES), max_size=4), delay=DELAYS)  # fmt: skip
    def lane(self, i: int, channel: str, limit: int, sent: list[str], delay: float) -> None:
        """A round of a lane: take (or renew) the channel if due, claim, and record the outcomes
        of the sends that end at once (`sent`); the others end in later steps."""
        claimer, lease = self.claimers[i], LEASE[channel]
        if claimer.holds(channel):
            return  # still sending what it claimed: the lane claims again once that is settled
        if channel not in claimer.lanes or self.now > claimer.lanes[channel] - lease / 2:
            pace = self.run(claimer.store.take_channel(channel, self.now, lease))
            assert pace == self.model.take_channel(channel, self.now, lease, claimer.owner)
            if pace is None:  # another process holds it: the lane ends
                if channel in claimer.lanes:
                    seen("a lane lost its channel to another process")
                    del claimer.lanes[channel]  # what it leaves is not its own any more
                    self.leave(claimer, channel, Pace(self.now, 0.0))
                return
            claimer.lanes[channel] = self.now + lease
        others = {d for c in self.claimers if c is not claimer for d in c.held}
        leased = {d: r.lease_until for d, r in self.model.rows.items() if r.state == "in_flight"}
        rows = self.run(claimer.store.claim(channel, self.now, limit, lease))
        expected = self.model.claim(channel, self.now, limit, lease, claimer.owner)
        assert rows == [self.model.claimed(r) for r in expected]
        seen(f"a claim took {min(len(rows), 2)}+ deliveries")
        for row in rows:
            if row.id in leased:  # in flight: handed out again only once its lease ran out
                until = leased[row.id]
                assert until is not None and until <= self.now
                if row.id in others:
                    seen("a claim took a delivery whose lease ran out, its claimer still running")
            claimer.held[row.id] = row
        for row, outcome in zip(rows, sent, strict=False):
            assert self.settle(claimer, row.id, outcome, delay)  # its own, and in time

    # Lanes run often: each round is one rule, and Hypothesis picks rules alike.
    @rule(i=st.integers(0, 1), channel=st.sampled_from(CHANNELS), limit=st.integers(1, 4),
          sent=st.lists(st.sampled_from(OUTCOMES), max_size=4), delay=DELAYS)  # fmt: skip
    def another_lane(self, i: int, channel: str, limit: int, sent: list[str], delay: float) -> None:
        self.lane(i, channel, limit, sent, delay)

    def leave(self, claimer: Claimer, channel: str, pace: Pace) -> None:
        self.run(claimer.store.leave_channel(channel, pace))
        self.model.leave_channel(channel, pace, claimer.owner)

    @rule(data=st.data(), i=st.integers(0, 1), blocked=st.sampled_from([0.0, 5.0]))
    def lane_ends(self, data: st.DataObject, i: int, blocked: float) -> None:
        claimer = self.claimers[i]
        ending = [c for c in sorted(claimer.lanes) if not claimer.holds(c)]
        if ending:
            channel = self.pick(data, ending)
            del claimer.lanes[channel]
            self.leave(claimer, channel, Pace(self.now + 0.5, self.now + blocked if blocked else 0))

    def holdings(self) -> list[tuple[int, int]]:
        return [(i, d) for i, c in enumerate(self.claimers) for d in sorted(c.held)]

    def ended(
        self, claimer: Claimer, delivery_id: int, outcome: str, delay: float
    ) -> tuple[Awaitable[bool | None], bool]:
        """A send of `claimer`'s ends: the store call that records its outcome (to be awaited;
        a mark says whether it took, a give-back says nothing), and whether the model, to which
        it is applied now, takes it."""
        store, model, now, owner = claimer.store, self.model, self.now, claimer.owner
        del claimer.held[delivery_id]
        row = model.rows.get(delivery_id)
        if outcome == "delivered":
            if row is not None and row.state == "dead" and row.owner == owner:
                seen("a delivery buried while it was sent is recorded as delivered")
            applied = model.mark_delivered(delivery_id, now, owner)
            return store.mark_delivered(delivery_id, now), applied
        if outcome == "dead":
            applied = model.mark_dead(delivery_id, now, "HTTP 404", owner)
            return store.mark_dead(delivery_id, now, "HTTP 404"), applied
        if outcome in ("retry", "free"):  # "free": a 429, whose attempt is given back
            count, error = outcome == "retry", "HTTP 503" if outcome == "retry" else "HTTP 429"
            applied = model.mark_retry(delivery_id, now, now + delay, error, count, owner)
            return store.mark_retry(delivery_id, now, now + delay, error, count), applied
        applied = row is not None and row.owner == owner and row.state == "in_flight"
        model.release([delivery_id], now, now, owner)
        return store.release([delivery_id], now, now), applied

    def settle(self, claimer: Claimer, delivery_id: int, outcome: str, delay: float) -> bool:
        step, applied = self.ended(claimer, delivery_id, outcome, delay)
        took = self.run(step)
        assert took in (None, applied), "the store says it took what the model did not"
        return applied

    @precondition(lambda self: bool(self.holdings()))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), delay=DELAYS)
    def outcome(self, data: st.DataObject, outcome: str, delay: float) -> None:
        i, delivery_id = self.pick(data, self.holdings())
        if not self.settle(self.claimers[i], delivery_id, outcome, delay):
            seen(f"a late outcome ({outcome}) left alone")

    # Sends end often too, each one a rule.
    @precondition(lambda self: bool(self.holdings()))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), delay=DELAYS)
    def another_outcome(self, data: st.DataObject, outcome: str, delay: float) -> None:
        self.outcome(data, outcome, delay)

    @precondition(lambda self: bool(self.holdings()))
    @rule(i=st.integers(0, 1), outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=12,
                                                 max_size=12))  # fmt: skip
    def outcomes_at_once(self, i: int, outcomes: list[str]) -> None:
        # A claim's rooms are sent side by side and their outcomes written together: marked
        # delivered in one SQLite statement, in one batch with the rest.
        claimer = self.claimers[i]
        ids = sorted(claimer.held)
        ended = [self.ended(claimer, d, o, 1.0) for d, o in zip(ids, outcomes, strict=False)]
        took = self.run_all([step for step, _ in ended])
        for said, (_, applied) in zip(took, ended, strict=True):
            assert said in (None, applied), "a batch's mark says it took what the model did not"

    @precondition(lambda self: bool(self.holdings()))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        # A stop, a 429's block, or a room's later deliveries after a retry: back unsent.
        i, first = self.pick(data, self.holdings())
        claimer = self.claimers[i]
        channel = claimer.held[first].channel
        ids = [d for d, c in sorted(claimer.held.items()) if c.channel == channel]
        for delivery_id in ids:
            del claimer.held[delivery_id]
        self.run(claimer.store.release(ids, self.now, self.now))
        self.model.release(ids, self.now, self.now, claimer.owner)

    @precondition(lambda self: bool(self.holdings()))
    @rule(data=st.data(), past=st.sampled_from([0.0, 0.25, 5.0]), limit=st.integers(1, 4),
          sent=st.lists(st.sampled_from(OUTCOMES), max_size=2))  # fmt: skip
    def a_send_hangs(self, data: st.DataObject, past: float, limit: int, sent: list[str]) -> None:
        """A send outlasts its lease (until `past` after it) and the other process's lane takes
        the channel: the race the owner checks are for, made likelier than chance makes it."""
        i, delivery_id = self.pick(data, self.holdings())
        row = self.model.rows.get(delivery_id)
        if row is None or row.lease_until is None:
            return  # settled by an operator meanwhile (dropped, or buried and retried)
        self.now = max(self.now, row.lease_until + past)
        self.lane(1 - i, self.claimers[i].held[delivery_id].channel, limit, sent, 1.0)

    @rule(dt=STEPS)
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(dt=STEPS)
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.engine.postgres)
    @rule(i=st.integers(0, 1))
    def replica_dies(self, i: int) -> None:
        # kill -9: its claims and its channels stay leased until their leases run out.
        old = self.claimers[i].store
        self.claimers[i] = Claimer(self.open(serving=old is self.server))
        if old is self.server:
            self.server = self.claimers[i].store
        self.close(old)
        assert self.run(self.server.recover()) == 0  # others' claims are theirs: leases run out

    @rule()
    def restart(self) -> None:
        # Every process that delivers stops (or dies) and the server starts again: SQLite's
        # recover frees what was in flight or held at once; PostgreSQL's replicas wait for the
        # leases. (An outbox command holds nothing: it may stay.)
        for claimer in self.claimers:
            self.close(claimer.store)
        self.server = self.open(serving=True)
        self.claimers = [Claimer(self.server), Claimer(self.open())]
        released = self.run(self.server.recover())
        if released:
            seen("recover released deliveries in flight")
        assert released == (0 if self.engine.postgres else self.model.recover())

    @rule(channel=st.sampled_from(CHANNELS), room=st.sampled_from(["r1", "r2"]),
          ts=st.sampled_from(["1.1", "2.2"]), ttl=st.sampled_from([0.0, 5.0, 100.0]))  # fmt: skip
    def thread(self, channel: str, room: str, ts: str, ttl: float) -> None:
        store = self.claimers[0].store
        expected = self.model.get_thread(channel, room, self.now - ttl)
        assert self.run(store.get_thread(channel, room, self.now - ttl)) == expected
        if expected is None:
            self.run(store.set_thread(channel, room, ts, self.now))
            self.model.threads[(channel, room)] = (ts, self.now)
        elif ts == "2.2":  # Slack no longer knows it
            self.run(store.forget_thread(channel, room))
            self.model.threads.pop((channel, room), None)

    # --- operators and upkeep -------------------------------------------------------------------

    def some_ids(self, data: st.DataObject) -> list[int]:
        return data.draw(st.lists(st.integers(1, 64), max_size=4))  # some never handed out

    @rule(data=st.data())
    def outbox_retry(self, data: st.DataObject) -> None:
        ids = self.some_ids(data)
        rows = [r for i in ids if (r := self.model.rows.get(i)) is not None]
        if any(r.state == "dead" and not self.model.free(r, self.now) for r in rows):
            seen("a retry waited for the lease of a dead letter buried while sent")
        back = self.run(self.outbox.retry(ids, self.now))
        assert sorted(back) == sorted(self.model.retry(ids, self.now))

    @rule(channel=st.sampled_from([None, *CHANNELS]))
    def outbox_retry_dead(self, channel: str | None) -> None:
        count = self.run(self.outbox.retry_dead(channel, self.now))
        assert count == self.model.retry_dead(channel, self.now)

    @rule(data=st.data())
    def outbox_drop(self, data: st.DataObject) -> None:
        ids = self.some_ids(data)
        dropped = self.run(self.outbox.drop(ids, self.now))
        assert sorted(dropped) == sorted(self.model.drop(ids, self.now))

    @rule(known=st.lists(st.sampled_from(CHANNELS), unique=True, min_size=2, max_size=3))
    def reload_removes_channels(self, known: list[str]) -> None:
        buried = self.run(self.server.bury_unknown_channels(known, self.now, "channel removed"))
        assert buried == self.model.bury(known, self.now, "channel removed")

    @rule(channels=st.lists(st.sampled_from(CHANNELS), unique=True, min_size=1, max_size=3))
    def reload_retypes_channels(self, channels: list[str]) -> None:
        assert self.run(self.server.forget_payloads(channels)) == self.model.forget_payloads(
            channels
        )

    @rule(retention=st.sampled_from([0.0, 1.0, 5.0, 30.0, 120.0]),
          ttl=st.sampled_from([0.0, 10.0, 100.0]))  # fmt: skip
    def prune(self, retention: float, ttl: float) -> None:
        # The worker's cut-offs (worker.py): dedup keys live as long as the window, at least.
        cuts = (self.now - retention, self.now - max(retention, self.window), self.now - ttl)
        pruned = self.run(self.claimers[0].store.prune(*cuts))
        assert pruned == self.model.prune(*cuts)
        if pruned:
            seen("prune deleted rows")

    @rule(dead=st.booleans(), channel=st.sampled_from([None, *CHANNELS]),
          limit=st.integers(1, 5), events=st.integers(1, 5))  # fmt: skip
    def look(self, dead: bool, channel: str | None, limit: int, events: int) -> None:
        found = self.run(self.outbox.list_deliveries(dead, channel, limit))
        assert found == self.model.list_deliveries(dead, channel, limit)
        assert self.run(self.server.recent_events(events)) == self.model.recent_events(events)

    # --- after every step -----------------------------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        SEEN["steps"] += 1
        model, everything = self.model, 10**6
        shown = self.run(self.server.recent_events(everything))
        assert shown == model.recent_events(everything)
        # Every delivery ever acknowledged is still there, in one state, or was pruned after
        # it was delivered, or dropped by an operator.
        ids = {d.id for e in shown for d in e.deliveries}
        assert ids.isdisjoint(model.gone)
        assert ids | set(model.gone) == model.acknowledged
        assert self.run(self.outbox.stats()) == model.stats()
        assert self.run(self.outbox.list_deliveries(False, None, everything)) == (
            model.list_deliveries(False, None, everything)
        )
        assert self.run(self.server.next_due(self.now)) == model.next_due(self.now)
        for claimer in self.claimers:
            due = self.run(claimer.store.due_channels(self.now, []))
            assert len(due) == len(set(due))
            assert set(due) == model.due_channels(self.now, claimer.owner)

    @invariant()
    def hidden_state_agrees_with_model(self) -> None:
        assert self.engine.peek() == self.model.tables()


def run_machine(engine: Engine, examples: int, steps: int) -> None:
    class Machine(StoreMachine):
        def __init__(self) -> None:
            super().__init__(engine)

    SEEN.clear()
    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES or examples, stateful_step_count=STEPS_EACH or steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )  # fmt: skip
    finally:
        if EXAMPLES:  # a long run says what it covered (pytest -s)
            print(f"\n{type(engine).__name__}:", dict(sorted(SEEN.items())))


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # SQLite prunes, retries and buries a batch a transaction: batches of two walk the batching
    # with a few rows.
    monkeypatch.setattr(sqlite_outbox, "BATCH", 2)
    yield


@pytest.mark.usefixtures("small_batches")
def test_sqlite_store_follows_the_model(tmp_path: Path) -> None:
    run_machine(SQLiteEngine(tmp_path), examples=40, steps=40)


def test_postgres_store_follows_the_model(postgres_url: str) -> None:
    engine = PostgresEngine(postgres_url)
    try:
        run_machine(engine, examples=15, steps=40)
    finally:
        engine.close()
