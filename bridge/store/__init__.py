"""The durable store: what the receiver records and what the worker claims.

`Store` is the protocol every engine implements (SQLite now). Every method is one transaction:
`record` writes an event and its pending deliveries together, so an acknowledged event always has
its deliveries; `claim` leases due deliveries and counts the attempt in the same commit.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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
    event_time: int | None
    body: str  # the callback body as received (decoded UTF-8)
    query: str  # the query parameters as JSON, Sign removed
    dedup_key: str


@dataclass(frozen=True)
class NewDelivery:
    channel: str
    payload: str | None  # the rendered message; None when rendering failed
    error: str | None = None  # why rendering failed: such a delivery starts dead


@dataclass(frozen=True)
class Recorded:
    event_id: int
    duplicate: bool  # the same command and body was recorded within the dedup window


@dataclass(frozen=True)
class Claimed:
    id: int
    event_id: int
    channel: str
    payload: str
    attempts: int  # including this one
    room_id: str | None
    command: str


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def record(
        self, event: NewEvent, deliveries: Sequence[NewDelivery], now: float, dedup_window_s: float
    ) -> Recorded: ...

    async def claim(
        self, now: float, limit: int, per_channel: int, lease_s: float,
        exclude_channels: Sequence[str],
    ) -> list[Claimed]: ...  # fmt: skip

    async def mark_delivered(self, delivery_id: int, now: float) -> None: ...

    async def mark_retry(
        self, delivery_id: int, now: float, next_attempt_at: float, error: str, count: bool
    ) -> None: ...

    async def mark_dead(self, delivery_id: int, now: float, error: str) -> None: ...

    async def next_due(self) -> float | None: ...

    async def ping(self) -> None: ...

    async def prune_dedup(self, before: float) -> int: ...
