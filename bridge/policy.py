"""How each channel is sent to: pacing, concurrency, digests and threads, from its config.

A lane claims what one turn of its channel may send (`claim_limit`) under a lease long enough to
send all of it, paced (`lease_s`). Slack counts its limit per Slack channel, whatever the route:
channels of the config that post to one Slack channel (the same `channel` at the same `api_url`,
or the same `webhook_url`) share one `destination`, and the worker paces them together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from bridge.channels import Sender
from bridge.compose import DIGEST_ENTRIES
from bridge.config import Config
from bridge.config_channels import Channel, ConsoleChannel, SlackChannel

PER_SEND = 4  # deliveries a lane claims per message it may have in flight
DIGEST_CLAIM = 200  # deliveries a digesting lane claims at once
THREAD_TTL_S = 86400.0  # how long a room keeps its Slack thread, unless thread_ttl_h says


def send_s(timeout_s: float) -> float:
    """The longest one send may take: `[delivery] timeout_s`, and a margin for a sender that
    overruns its own (the worker cuts it off then)."""
    return timeout_s + 5.0


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
    # The far end's own rate bucket, for channels that share one; None: this channel's alone.
    destination: str | None = None

    @classmethod
    def from_config(cls, name: str, channel: Channel, sender: Sender) -> ChannelPolicy:
        if isinstance(channel, SlackChannel):
            return cls(
                name, sender, channel.rate_per_s, channel.burst, 1, channel.digest_after,
                channel.thread_by_room, channel.reply_broadcast, channel.thread_ttl_h * 3600,
                slack_destination(channel),
            )  # fmt: skip
        if isinstance(channel, ConsoleChannel):
            return cls(name, sender, digest_after=channel.digest_after)
        return cls(name, sender, channel.rate_per_s, channel.burst, channel.max_in_flight)

    @property
    def pace_key(self) -> tuple[str, str]:
        """Channels with the same key are paced together: one bucket, one 429 block."""
        return ("far end", self.destination) if self.destination else ("channel", self.name)

    def claim_limit(self) -> int:
        if self.digest_after:
            return max(DIGEST_CLAIM, self.digest_after + 1)
        return PER_SEND * self.max_in_flight

    def lease_s(self, timeout_s: float, rate_per_s: float | None = None) -> float:
        """Long enough for every send a claim can lead to, paced, then some. `rate_per_s`: the
        rate the lane's sends go out at when it shares a pacer (the channels of one Slack
        channel: their strictest rate, shared among them); else the channel's own."""
        limit = self.claim_limit()
        sends = (
            max(self.digest_after, math.ceil(limit / DIGEST_ENTRIES))
            if self.digest_after
            else limit
        )
        rate = rate_per_s or self.rate_per_s
        paced = sends / rate if rate else 0.0
        return math.ceil(sends / self.max_in_flight) * send_s(timeout_s) + paced + 10.0


def strictest(policies: Sequence[ChannelPolicy]) -> tuple[float | None, int]:
    """The pacing that keeps every one of `policies` within its own: the lowest rate (None when
    none is paced) and the smallest burst."""
    rates = [p.rate_per_s for p in policies if p.rate_per_s is not None]
    return (min(rates) if rates else None), min(p.burst for p in policies)


def slack_destination(channel: SlackChannel) -> str:
    """The Slack channel `channel` posts to, as far as the config tells: a bot's channel at its
    API, or the incoming webhook's URL, hashed (it is a secret), whose channel Slack alone knows.
    Never logged all the same."""
    if channel.webhook_url is not None:
        url = same_url(channel.webhook_url.get_secret_value()).encode()
        return "slack webhook " + hashlib.sha256(url).hexdigest()
    return f"slack {same_url(channel.api_url)} {channel.channel}"


DEFAULT_PORTS = {"http": 80, "https": 443}


def same_url(url: str) -> str:
    """`url` as every spelling of it is written: the scheme and host in lower case, without a
    trailing dot or the scheme's own port. Compared as written, `HTTPS://Hooks.slack.com/…`
    and `https://hooks.slack.com:443/…` were two Slack channels, each paced to Slack's whole
    limit: twice that reached the one channel."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    try:
        port = parts.port
    except ValueError:  # the config refuses such a URL; whatever it is, as written
        return url
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme.lower()):
        host += f":{port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path, parts.query, parts.fragment))


def build_policies(config: Config, senders: Mapping[str, Sender]) -> dict[str, ChannelPolicy]:
    """Each configured channel's policy, around its sender."""
    return {
        name: ChannelPolicy.from_config(name, channel, senders[name])
        for name, channel in config.channels.items()
    }
