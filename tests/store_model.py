"""A plain-Python model of the Store contract, for tests/test_store_model.py: what every store
method should do to the events, deliveries, dedup keys, channel leases and threads, written from
bridge/store/__init__.py's docstrings and the README (Delivery, Several replicas, Dead letters
and the outbox), not from the SQL. The state machine runs each operation on the real store and on
this model and compares what both answer and hold."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bridge.store import (
    CLOCK_STEP_S,
    UNKNOWN_TAT,
    ChannelStats,
    Claimed,
    DeliveryRow,
    NewDelivery,
    NewEvent,
    Pace,
    RecentEvent,
    State,
)

UNDELIVERED = (State.PENDING, State.IN_FLIGHT)


@dataclass
class Row:
    """A delivery, with what the store keeps but does not show (owner, lease, payload)."""

    id: int
    event_id: int
    channel: str
    room_key: str | None  # store.room_key
    order_ts: int
    state: State
    payload: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    attempts: int = 0
    lease_until: float | None = None
    owner: str | None = None
    delivered_at: float | None = None

    def key(self) -> tuple[int, int]:
        return (self.order_ts, self.id)


@dataclass
class Lease:
    owner: str
    until: float
    pace: Pace = field(default_factory=lambda: Pace(0.0, 0.0))  # what the last holder left


@dataclass
class Model:
    events: dict[int, tuple[NewEvent, float]] = field(default_factory=dict)  # id: (event, at)
    rows: dict[int, Row] = field(default_factory=dict)
    dedup: dict[str, tuple[int, float]] = field(default_factory=dict)  # key: (event id, seen at)
    threads: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    channels: dict[str, Lease] = field(default_factory=dict)
    top_event: int = 0  # the largest id ever handed out: none is handed out again
    top_delivery: int = 0
    gone: dict[int, str] = field(default_factory=dict)  # delivery id: "pruned" or "dropped"
    acknowledged: set[int] = field(default_factory=set)  # every delivery id ever recorded

    # --- the receiver ---------------------------------------------------------------------------

    def duplicate_of(self, event: NewEvent, now: float, window: float) -> int | None:
        """The event id a record of `event` is a duplicate of, or None: stored anew."""
        hit = self.dedup.get(event.dedup_key) if window > 0 else None
        return hit[0] if hit is not None and hit[1] > now - window else None

    def add_event(
        self, event_id: int, event: NewEvent, deliveries: Sequence[tuple[int, NewDelivery]],
        now: float, window: float,
    ) -> None:  # fmt: skip
        """A record the store took as new, with the ids it gave; those must be new ones."""
        assert event_id > self.top_event, f"event id {event_id} handed out before"
        self.top_event = event_id
        self.events[event_id] = (event, now)
        for delivery_id, d in deliveries:
            assert delivery_id > self.top_delivery, f"delivery id {delivery_id} handed out before"
            self.top_delivery = delivery_id
            self.acknowledged.add(delivery_id)
            order_ts = event.event_time
            if order_ts is None:  # by arrival, after what its room has already
                order_ts = max([int(now * 1000)] + [r.order_ts for r in self.rows.values()
                               if r.channel == d.channel and event.room_key is not None
                               and r.room_key == event.room_key])  # fmt: skip
            self.rows[delivery_id] = Row(
                delivery_id, event_id, d.channel, event.room_key, order_ts,
                State.PENDING if d.error is None else State.DEAD, d.payload, d.error,
                created_at=now, updated_at=now, next_attempt_at=now,
            )  # fmt: skip
        if window > 0:
            self.dedup[event.dedup_key] = (event_id, now)

    # --- the worker -----------------------------------------------------------------------------

    def _due(self, r: Row, now: float) -> bool:
        if r.state is State.PENDING:  # or written before the clock went back
            return r.next_attempt_at <= now or r.updated_at > now + CLOCK_STEP_S
        return r.state is State.IN_FLIGHT and r.lease_until is not None and r.lease_until <= now

    def _holds_back(self, b: Row, now: float) -> bool:
        """Whether undelivered `b` keeps the later deliveries of its room waiting."""
        if b.state is State.PENDING:
            return b.next_attempt_at > now and b.updated_at <= now + CLOCK_STEP_S
        return b.state is State.IN_FLIGHT and b.lease_until is not None and b.lease_until > now

    def claimable(self, channel: str, now: float) -> list[Row]:
        mine = [r for r in self.rows.values() if r.channel == channel]
        held = [r for r in mine if r.room_key is not None and self._holds_back(r, now)]
        return sorted(
            (r for r in mine if self._due(r, now)
             and not any(b.room_key == r.room_key and b.key() < r.key() for b in held)),
            key=Row.key,
        )  # fmt: skip

    def claim(self, channel: str, now: float, limit: int, lease_s: float, owner: str) -> list[Row]:
        taken = self.claimable(channel, now)[:limit]
        for r in taken:
            r.state, r.attempts, r.lease_until = State.IN_FLIGHT, r.attempts + 1, now + lease_s
            r.updated_at, r.owner = now, owner
        return taken

    def claimed(self, r: Row) -> Claimed:
        event, at = self.events[r.event_id]
        return Claimed(
            id=r.id, event_id=r.event_id, channel=r.channel, payload=r.payload,
            attempts=r.attempts, room_key=r.room_key, command=event.command, body=event.body,
            query=event.query, received_at=at, sdk_app_id=event.sdk_app_id,
        )  # fmt: skip

    def due_channels(self, now: float, owner: str) -> set[str]:
        def held_elsewhere(channel: str) -> bool:
            lease = self.channels.get(channel)
            return lease is not None and lease.owner != owner and lease.until > now

        names = {r.channel for r in self.rows.values()}
        return {c for c in names if not held_elsewhere(c) and self.claimable(c, now)}

    def next_due(self, now: float) -> float | None:
        times = [r.next_attempt_at for r in self.rows.values()
                 if r.state is State.PENDING and r.next_attempt_at > now
                 and r.updated_at <= now + CLOCK_STEP_S]  # fmt: skip
        times += [r.lease_until for r in self.rows.values() if r.state is State.IN_FLIGHT
                  and r.lease_until is not None and r.lease_until > now]  # fmt: skip
        return min(times, default=None)

    def take_channel(self, channel: str, now: float, lease_s: float, owner: str) -> Pace | None:
        lease = self.channels.get(channel)
        if lease is None:
            self.channels[channel] = Lease(owner, now + lease_s)
            return Pace(0.0, 0.0)
        if lease.owner != owner and lease.until > now:
            return None
        if lease.owner != owner and lease.until > 0:  # its holder never left it: killed
            lease.pace = Pace(UNKNOWN_TAT, lease.pace.blocked_until)
        lease.owner, lease.until = owner, now + lease_s
        return lease.pace

    def leave_channel(self, channel: str, pace: Pace, owner: str) -> None:
        lease = self.channels.get(channel)
        if lease is not None and lease.owner == owner:
            lease.until, lease.pace = 0.0, pace

    def _held(self, delivery_id: int, owner: str, states: Iterable[State]) -> Row | None:
        r = self.rows.get(delivery_id)
        return r if r is not None and r.owner == owner and r.state in states else None

    def mark_delivered(self, delivery_id: int, now: float, owner: str) -> bool:
        # A delivery buried while in flight still counts as delivered if the send got through.
        if (r := self._held(delivery_id, owner, (State.IN_FLIGHT, State.DEAD))) is None:
            return False
        r.state, r.delivered_at, r.updated_at = State.DELIVERED, now, now
        r.lease_until = r.owner = None
        return True

    def mark_retry(
        self, delivery_id: int, now: float, at: float, error: str, count: bool, owner: str
    ) -> bool:
        if (r := self._held(delivery_id, owner, (State.IN_FLIGHT,))) is None:
            return False
        r.state, r.next_attempt_at, r.last_error, r.updated_at = State.PENDING, at, error, now
        r.attempts -= 0 if count else 1
        r.lease_until = r.owner = None
        return True

    def mark_dead(self, delivery_id: int, now: float, error: str, owner: str) -> bool:
        if (r := self._held(delivery_id, owner, (State.IN_FLIGHT,))) is None:
            return False
        r.state, r.last_error, r.updated_at = State.DEAD, error, now
        r.lease_until = r.owner = None
        return True

    def release(self, ids: Sequence[int], now: float, at: float, owner: str) -> None:
        for delivery_id in set(ids):
            if (r := self._held(delivery_id, owner, (State.IN_FLIGHT,))) is not None:
                r.state, r.attempts, r.next_attempt_at, r.updated_at = (
                    State.PENDING, r.attempts - 1, at, now,
                )  # fmt: skip
                r.lease_until = r.owner = None

    def recover(self) -> int:
        """SQLite at a server's start: nothing else runs, so nothing is in flight any more."""
        for lease in self.channels.values():
            if lease.until > 0:  # held at the stop: never left
                lease.pace = Pace(UNKNOWN_TAT, lease.pace.blocked_until)
            lease.until = 0.0
        released = 0
        for r in self.rows.values():
            if r.state is State.DEAD and r.owner is not None:
                r.lease_until = r.owner = None
            elif r.state is State.IN_FLIGHT:
                r.state, r.lease_until, r.owner = State.PENDING, None, None
                released += 1
        return released

    def get_thread(self, channel: str, room: str, not_before: float) -> str | None:
        found = self.threads.get((channel, room))
        return found[0] if found is not None and found[1] >= not_before else None

    # --- operators and upkeep -------------------------------------------------------------------

    def free(self, r: Row, now: float) -> bool:
        """Not being sent: a dead letter buried in flight waits for its lease (README)."""
        return r.lease_until is None or r.lease_until <= now

    def _retry(self, r: Row, now: float) -> None:
        r.state, r.attempts, r.next_attempt_at, r.updated_at = State.PENDING, 0, now, now
        r.lease_until = r.owner = r.payload = None  # rendered again when sent

    def retry(self, ids: Sequence[int], now: float) -> set[int]:
        back = {i for i in set(ids) if (r := self.rows.get(i)) is not None
                and r.state in (State.DEAD, State.PENDING) and self.free(r, now)}  # fmt: skip
        for i in back:
            self._retry(self.rows[i], now)
        return back

    def retry_dead(self, channel: str | None, now: float) -> int:
        back = [r for r in self.rows.values() if r.state is State.DEAD and r.updated_at <= now
                and channel in (None, r.channel) and self.free(r, now)]  # fmt: skip
        for r in back:
            self._retry(r, now)
        return len(back)

    def drop(self, ids: Sequence[int], now: float) -> set[int]:
        dropped = {i for i in set(ids) if (r := self.rows.get(i)) is not None
                   and r.state in (State.DEAD, State.PENDING) and self.free(r, now)}  # fmt: skip
        for i in dropped:
            del self.rows[i]
            self.gone[i] = "dropped"
        return dropped

    def bury(self, known: Sequence[str], now: float, error: str) -> int:
        # The owner and the lease stay: a send under way may still be recorded as delivered.
        buried = [
            r for r in self.rows.values() if r.state in UNDELIVERED and r.channel not in known
        ]
        for r in buried:
            r.state, r.last_error, r.updated_at = State.DEAD, error, now
        return len(buried)

    def forget_payloads(self, channels: Sequence[str]) -> int:
        forgot = [r for r in self.rows.values() if r.state is not State.DELIVERED
                  and r.payload is not None and r.channel in channels]  # fmt: skip
        for r in forgot:
            r.payload = None
        return len(forgot)

    def prune(self, delivered_before: float, dedup_before: float, threads_before: float) -> int:
        old = [i for i, r in self.rows.items() if r.state is State.DELIVERED
               and r.delivered_at is not None and r.delivered_at < delivered_before]  # fmt: skip
        for i in old:
            del self.rows[i]
            self.gone[i] = "pruned"
        used = {r.event_id for r in self.rows.values()}
        events = [
            i for i, (_, at) in self.events.items() if at < delivered_before and i not in used
        ]
        for i in events:
            del self.events[i]
        keys = [k for k, (_, at) in self.dedup.items() if at < dedup_before]
        for key in keys:
            del self.dedup[key]
        threads = [t for t, (_, at) in self.threads.items() if at < threads_before]
        for thread in threads:
            del self.threads[thread]
        return len(old) + len(events) + len(keys) + len(threads)

    def tables(self) -> dict[str, list[tuple[object, ...]]]:
        """What the store's tables should hold, as test_store_model.HIDDEN reads them."""
        return {
            "deliveries": sorted((r.id, r.owner, r.lease_until, r.payload, r.delivered_at,
                                  r.order_ts) for r in self.rows.values()),
            "events": sorted((i, at, e.sdk_app_id, e.event_time, e.body, e.query)
                             for i, (e, at) in self.events.items()),
            "channels": sorted((c, x.owner, x.until, x.pace.tat, x.pace.blocked_until)
                               for c, x in self.channels.items()),
            "dedup": sorted((k, at, i) for k, (i, at) in self.dedup.items()),
            "threads": sorted((c, r, ts, at) for (c, r), (ts, at) in self.threads.items()),
        }  # fmt: skip

    # --- what operators read --------------------------------------------------------------------

    def stats(self) -> list[ChannelStats]:
        out = []
        for channel in sorted({r.channel for r in self.rows.values()}):
            rows = [r for r in self.rows.values() if r.channel == channel]
            count = {s: sum(r.state is s for r in rows) for s in State}
            pending = [r.created_at for r in rows if r.state is State.PENDING]
            out.append(ChannelStats(
                channel, count[State.PENDING], count[State.IN_FLIGHT], count[State.DEAD],
                count[State.DELIVERED], min(pending, default=None),
            ))  # fmt: skip
        return out

    def delivery_row(self, r: Row) -> DeliveryRow:
        event = self.events[r.event_id][0]
        return DeliveryRow(
            id=r.id, event_id=r.event_id, channel=r.channel, room_id=event.room_id,
            command=event.command, state=r.state, attempts=r.attempts,
            last_error=r.last_error, created_at=r.created_at, updated_at=r.updated_at,
            next_attempt_at=r.next_attempt_at, sdk_app_id=event.sdk_app_id,
        )  # fmt: skip

    def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]:
        rows = sorted(
            (r for r in self.rows.values() if r.state is not State.DELIVERED
             and (not dead_only or r.state is State.DEAD) and channel in (None, r.channel)),
            key=lambda r: -r.id,
        )  # fmt: skip
        return [self.delivery_row(r) for r in rows[:limit]]

    def recent_events(self, limit: int) -> list[RecentEvent]:
        out = []
        for event_id in sorted(self.events, reverse=True)[:limit]:
            event, at = self.events[event_id]
            rows = sorted(
                (r for r in self.rows.values() if r.event_id == event_id), key=lambda r: r.id
            )
            out.append(RecentEvent(event_id, at, event.command, event.room_id,
                                   tuple(self.delivery_row(r) for r in rows),
                                   event.sdk_app_id))  # fmt: skip
        return out
