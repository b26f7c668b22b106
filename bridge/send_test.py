"""`live-bridge send-test`: send a sample owner change through one channel now.

    live-bridge send-test --channel NAME [--config PATH]

Tencent's own owner-change sample is rendered with the channel's template and sent by the
channel's sender, once, bypassing routes, pacing, threads and the store (nothing is recorded; a
server may be running). Prints what the far end answered: delivered (with Slack's message ts for
a bot token), retry or permanent, with the error. Never prints a URL or a token. Exit status: 0
delivered; 1 not delivered or the template fails; 2 a config that does not load or an unknown
channel.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from typing import Any

from bridge.channels import Outcome, Result
from bridge.config import CONFIG_HELP, Config
from bridge.config_channels import Channel, SlackChannel
from bridge.events import OWNER_CHANGED
from bridge.preview import Unusable, channel_named, load, render_for
from bridge.samples import sample


def register(commands: Any) -> None:
    """Add `send-test` to the top-level parser's subparsers."""
    send = commands.add_parser("send-test", help="send a sample owner change through a channel")
    send.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    send.add_argument("--channel", metavar="NAME", required=True, help="a configured channel")


def main(args: argparse.Namespace) -> int:
    """Send once and print the outcome; the return value is the exit status."""
    try:
        path, config = load(args.config)
        name, channel = channel_named(config, path, args.channel)
    except Unusable as exc:
        print(f"live-bridge: {exc}", file=sys.stderr)
        return 2
    payload = render_for(config, name, channel, sample(OWNER_CHANGED))
    if payload is None:
        return 1
    outcome = asyncio.run(_send(config, name, payload))
    print(f"{name} ({_describe(channel)}): {_outcome(outcome)}")
    return 0 if outcome.result == Result.DELIVERED else 1


async def _send(config: Config, name: str, payload: str) -> Outcome:
    # Imported only for this command: the CLI loads every command's module, `serve` included.
    from bridge.channels.build import build_senders
    from bridge.channels.http import sender_session

    async with sender_session() as session:
        # No store: never a key one makes (an id, `@`, a time), and a new one each time, so a
        # webhook receiver that drops repeats by webhook-id takes a second test too.
        sender = build_senders(config, session, "send-test")[name]
        return await sender.send(payload, f"send-test-{secrets.token_hex(8)}")


def _describe(channel: Channel) -> str:
    if isinstance(channel, SlackChannel):
        if channel.token is not None:
            return f"slack, bot token, channel {channel.channel}"
        return "slack, incoming webhook"
    return channel.type


def _outcome(outcome: Outcome) -> str:
    if outcome.result == Result.DELIVERED:
        return "delivered" + (f", ts {outcome.ts}" if outcome.ts else "")
    text = f"{outcome.result}: {outcome.error or 'no detail'}"
    if outcome.retry_after is not None:
        text += f" (Retry-After {outcome.retry_after:g}s)"
    if outcome.rate_limited:
        text += ", rate limited"
    return text
