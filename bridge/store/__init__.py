"""The durable store: what the receiver records, what the worker claims, what operators inspect.

`Store` is the protocol every engine implements: SQLite (one serving process, embedded) and
PostgreSQL (any number of serving processes on one database). Every method is one transaction:
`record` writes an event and its pending deliveries together, so an acknowledged event always has
its deliveries; `claim` leases due deliveries and counts the attempt in the same commit, and never
hands out a delivery while an earlier one for the same channel and room is still undelivered.

Several processes share a channel by taking turns: `take_channel` leases the whole channel to one
process at a time and hands it the channel's pacing state, `leave_channel` saves that state for the
next holder. So pacing, Retry-After blocks, per-room order, threads and digests need no other
coordination. Outcomes (`mark_*`, `release`) apply only to deliveries this store instance claimed
and still holds: a process whose lease ran out cannot overwrite what another process did since.

Processes sharing a store may run different configs for a while (a rolling deploy): each
`announce`s the channels it serves, and `bury_unknown_channels` spares a channel another one has
announced (bridge/presence.py decides when).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A pending delivery written (updated_at) more than this after `now` was written before the wall
# clock went back: it is due at once rather than when the clock reaches its time again, which
# after an hour's step back would be an hour late, and its room's later deliveries with it. A
# send in flight keeps its lease: it may be under way, and a longer lease sends nothing twice.
# A minute, not less: PostgreSQL replicas whose clocks disagree by more would take each other's
# backoffs as steps back, and retry a failing channel at once, using up its attempts. A smaller
# step back delays by at most its size, as before.
CLOCK_STEP_S = 60.0


# After the grace period, the most a stop waits for the store's last work (the worker's last
# outcomes, the withdrawal, closing): past it, the process ends as after a crash.
STORE_STOP_S = 2.0


class StoreUnavailable(Exception):
    """The store could not commit; the caller must not acknowledge."""


class State(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    IN_FLIGHT = "in_flight"  # claimed by a worker under a lease
    DELIVERED = "delivered"  # the far end accepted it
    DEAD = "dead"  # gave up: permanent failure, attempts used up, or unrenderable


@dataclass(frozen=True)
class NewEvent:
    sdk_app_id: int
    command: str
    room_id: str | None
    event_time: int | None  # Tencent's EventTime, milliseconds
    body: str  # the callback body as received (decoded UTF-8)
    query: str  # the query parameters as JSON, Sign removed
    dedup_key: str

    @property
    def room_key(self) -> str | None:
        """What orders a room's deliveries and threads its Slack messages (room_key)."""
        return None if self.room_id is None else room_key(self.sdk_app_id, self.room_id)


def room_key(sdk_app_id: int, room_id: str) -> str:
    """A room within its app. Two apps may name a room alike, and one bridge may serve both
    (`[tencent] sdk_app_id` lists them): their events are two rooms' events, each in order of its
    own and in a Slack thread of its own. Stored as deliveries.room_id and threads.room_id."""
    return f"{sdk_app_id}:{room_id}"


@dataclass(frozen=True)
class NewDelivery:
    channel: str
    payload: str | None  # the rendered message; None: rendered when sent (bridge.compose)
    error: str | None = None  # why rendering failed: such a delivery starts dead


@dataclass(frozen=True)
class Recorded:
    event_id: int
    duplicate: bool  # the same command and body was recorded within the dedup window


@dataclass(frozen=True)
class Claimed:
    """A delivery leased to a worker, with its event for digests and re-rendering."""

    id: int
    event_id: int
    channel: str
    payload: str | None  # None: rendering failed before; render again
    attempts: int  # including this one
    room_key: str | None  # store.room_key: what orders and threads it
    command: str
    body: str
    query: str
    received_at: float
    sdk_app_id: int

    @property
    def message_key(self) -> str:
        """The same at every attempt, and never another message's (a webhook-id is made of it):
        the delivery's id, and its event's time of receipt. Ids alone repeat where a store is
        restored from a copy, which holds the ids it gave out until then; the time does not."""
        return f"{self.id}@{self.received_at!r}"


UNKNOWN_TAT = -1.0


def dedup_digest(command: str, sdk_app_id: int, body: bytes) -> str:
    """The part of a dedup key that says "the same callback": its SDKAppID, command and body,
    byte for byte (receive.dedup_key puts the EventTime before it). Two apps sending the same
    bytes are two events: Tencent calls each app's URL for its own."""
    return hashlib.sha256(b"%s\0%d\0%s" % (command.encode(), sdk_app_id, body)).hexdigest()


@dataclass(frozen=True)
class Pace:
    """A channel's pacing state, shared by the processes that take turns sending to it. Both on
    the wall clock (time.time()), which every process reads alike."""

    # GCRA's theoretical arrival time of the next message; 0: the bucket is full; UNKNOWN_TAT:
    # its last holder stopped without leaving it (killed), so what it sent since it last saved
    # this is unknown, and the bucket is taken as empty.
    tat: float
    blocked_until: float  # a 429's Retry-After holds the channel until then; 0: not blocked


@dataclass(frozen=True)
class ChannelStats:
    channel: str
    pending: int
    in_flight: int
    dead: int
    delivered: int
    oldest_pending_at: float | None  # created_at of the oldest pending delivery


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: int
    channel: str
    room_id: str | None  # as Tencent named it (events.room_id), not the room_key
    command: str
    state: State
    attempts: int
    last_error: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    sdk_app_id: int  # the room's app: two apps may name a room alike

    @classmethod
    def of(cls, r: Sequence[Any]) -> DeliveryRow:
        """From a row of the stores' delivery columns (sqlite_statements.LIST_SQL's, in its
        order)."""
        return cls(
            id=r[0], event_id=r[1], channel=r[2], room_id=r[3], command=r[4], state=State(r[5]),
            attempts=r[6], last_error=r[7], created_at=r[8], updated_at=r[9],
            next_attempt_at=r[10], sdk_app_id=r[11],
        )  # fmt: skip


@dataclass(frozen=True)
class RecentEvent:
    """An event and the state of its deliveries, for the status page."""

    id: int
    received_at: float
    command: str
    room_id: str | None
    deliveries: tuple[DeliveryRow, ...]
    sdk_app_id: int


class Store(Protocol):
    # Random, made with the database and kept in it: ids start from 1 again in another one
    # (replaced, or a second bridge's), so webhook-ids mix this in (channels/webhook.py).
    identity: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def recover(self) -> int:
        """At a server's start: deliveries left in flight by a dead process are due again."""
        ...

    async def record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded: ...

    async def due_channels(
        self, now: float, exclude: Sequence[str], leases_at: float | None = None
    ) -> list[str]:
        """Channels with claimable deliveries, less `exclude` and channels another process
        holds (its `take_channel` lease not yet run out). `leases_at` (None: `now`) is the time
        leases are judged by, here and in `take_channel` and `claim`: earlier than `now` after
        the clock stepped forward, so that leases taken before the step do not run out by it
        (bridge/clock.py)."""
        ...

    async def take_channel(
        self, channel: str, now: float, lease_s: float, leases_at: float | None = None
    ) -> Pace | None:
        """Lease `channel` to this store instance until `now + lease_s` (renewing a lease it
        holds already); None while another instance holds it. Returns the pacing state the last
        holder left, Pace(0, 0) for a channel never sent to."""
        ...

    async def leave_channel(self, channel: str, pace: Pace) -> None:
        """Give up this instance's lease of `channel`, saving `pace` for the next holder."""
        ...

    async def block_channel(self, channel: str, blocked_until: float) -> None:
        """Nothing is sent to `channel` before `blocked_until` (a 429's Retry-After), saved at
        once, whoever holds it: kept only until the channel was left, the block was lost to a
        process killed meanwhile, and the next one sent into it."""
        ...

    async def claim(
        self, channel: str, now: float, limit: int, lease_s: float, leases_at: float | None = None
    ) -> list[Claimed]:
        """Due deliveries of `channel` in (EventTime, arrival) order, each room's in sequence."""
        ...

    # An outcome is recorded only while this instance holds the delivery's claim: each of these
    # is False when it no longer does (its lease ran out and another took the delivery over).
    async def mark_delivered(self, delivery_id: int, now: float) -> bool: ...

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> bool: ...

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> bool: ...

    async def release(self, ids: Sequence[int], now: float, next_attempt_at: float) -> None:
        """Claimed but not attempted: back to pending, the attempt given back, error kept."""
        ...

    async def resume(self, channel: str, now: float) -> int:
        """The channel's pending deliveries backing off after a failed attempt are due now (its
        far end answers again), so that they go out together, as digests. How many."""
        ...

    async def next_due(self, now: float) -> float | None:
        """The next time after `now` a delivery becomes due or a lease runs out. Deliveries
        already due are either claimable or waiting for an earlier one of their room, whose
        change of state wakes the worker."""
        ...

    async def get_thread(self, channel: str, room: str, not_before: float) -> str | None: ...

    async def set_thread(self, channel: str, room: str, ts: str, now: float) -> None: ...

    async def forget_thread(self, channel: str, room: str) -> None: ...

    async def ping(self) -> None: ...

    async def prune(
        self, delivered_before: float, dedup_before: float, threads_before: float
    ) -> int:
        """Deletes delivered deliveries and their events, dedup keys and room → thread entries
        older than each cutoff; dead letters stay. The number of rows deleted."""
        ...

    async def stats(self) -> list[ChannelStats]: ...

    async def list_deliveries(
        self, dead_only: bool, channel: str | None, limit: int
    ) -> list[DeliveryRow]: ...

    async def recent_events(self, limit: int) -> list[RecentEvent]:
        """The newest events with their deliveries, newest first."""
        ...

    async def channels_of(self, ids: Sequence[int]) -> dict[int, str]:
        """The channel of each delivery of `ids` there is, by id."""
        ...

    async def retry(self, ids: Sequence[int], now: float) -> list[int]:
        """Dead or pending deliveries of `ids` back to pending, due at `now`, attempts reset,
        their message to be rendered again when sent (with today's templates, for the channel's
        type now); PostgreSQL in one statement, however many, SQLite 500 a transaction. The
        ids it put back, in no order."""
        ...

    async def retry_dead(self, channel: str | None, now: float) -> int:
        """As `retry`, for every dead letter (of `channel`); how many."""
        ...

    async def drop(self, ids: Sequence[int], now: float) -> list[int]:
        """Deletes the dead or pending deliveries of `ids`, batched as `retry`;
        not a dead letter buried while it was being sent, until that send's lease has run out
        (as `retry`). The ids it deleted, in no particular order."""
        ...

    async def announce(self, channels: Sequence[str], now: float) -> None:
        """This store instance serves `channels` as of `now`, for the other instances sharing
        the store (SQLite has none: nothing is written)."""
        ...

    async def withdraw(self) -> None:
        """This instance serves no channel any more (it stops)."""
        ...

    async def bury_unknown_channels(
        self, known: Sequence[str], now: float, error: str, announced_since: float | None = None
    ) -> int:
        """Undelivered deliveries to channels neither in `known` nor announced by another
        instance at or after `announced_since` (None: whenever) become dead letters. Another
        instance's announcements older than `announced_since` are forgotten."""
        ...

    async def forget_payloads(self, channels: Sequence[str]) -> int:
        """Undelivered deliveries to `channels` drop their rendered message: each is rendered
        again from its event when it is sent. How many did."""
        ...
