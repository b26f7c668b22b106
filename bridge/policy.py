"""How each channel is sent to: pacing, concurrency, digests and threads, from its config.

A lane claims what one turn of its channel may send (`claim_limit`) under a lease long enough to
send all of it, paced (`lease_s`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from bridge.channels import Sender
from bridge.compose import DIGEST_ENTRIES
from bridge.config import Config
from bridge.config_tables import Channel, ConsoleChannel, SlackChannel

PER_SEND = 4  # deliveries a lane claims per message it may have in flight
DIGEST_CLAIM = 200  # deliveries a digesting lane claims at once
THREAD_TTL_S = 86400.0  # how long a room keeps its Slack thread, unless thread_ttl_h says


@dataclass(frozen=True)
class ChannelPolicy:
    """How one channel is sent to; built from its config."""

    name: str
    sender: Sender
    rate_per_s: float | None = None
    burst: int = 1
    max_in_flight: int = 1
    digest_after: int = 0  # 0: never digest
    thread_by_room: bool = False
    reply_broadcast: bool = False
    thread_ttl_s: float = THREAD_TTL_S

    @classmethod
    def from_config(cls, name: str, channel: Channel, sender: Sender) -> ChannelPolicy:
        if isinstance(channel, SlackChannel):
            return cls(
                name, sender, channel.rate_per_s, channel.burst, 1, channel.digest_after,
                channel.thread_by_room, channel.reply_broadcast, channel.thread_ttl_h * 3600,
            )  # fmt: skip
        if isinstance(channel, ConsoleChannel):
            return cls(name, sender, digest_after=channel.digest_after)
        return cls(name, sender, channel.rate_per_s, channel.burst, channel.max_in_flight)

    def claim_limit(self) -> int:
        if self.digest_after:
            return max(DIGEST_CLAIM, self.digest_after + 1)
        return PER_SEND * self.max_in_flight

    def lease_s(self, timeout_s: float) -> float:
        """Long enough for every send a claim can lead to, paced, then some."""
        limit = self.claim_limit()
        sends = (
            max(self.digest_after, math.ceil(limit / DIGEST_ENTRIES))
            if self.digest_after
            else limit
        )
        paced = sends / self.rate_per_s if self.rate_per_s else 0.0
        return math.ceil(sends / self.max_in_flight) * (timeout_s + 5.0) + paced + 10.0


def build_policies(config: Config, senders: Mapping[str, Sender]) -> dict[str, ChannelPolicy]:
    """Each configured channel's policy, around its sender."""
    return {
        name: ChannelPolicy.from_config(name, channel, senders[name])
        for name, channel in config.channels.items()
    }
