"""`build_senders(config, session, store)`: the sender of each configured channel, by name.

Shared by the server (one process), the delivery process and `live-bridge send-test`, none of
which needs the others' modules for it.
"""

from __future__ import annotations

import aiohttp

from bridge.channels import Sender
from bridge.channels.console import ConsoleSender
from bridge.channels.webhook import WebhookSender
from bridge.config import Config
from bridge.config_channels import ConsoleChannel, SlackChannel


def build_senders(config: Config, session: aiohttp.ClientSession, store: str) -> dict[str, Sender]:
    """`store`: the identity of the store whose delivery ids the senders get (Store.identity)."""
    timeout = config.delivery.timeout_s
    senders: dict[str, Sender] = {}
    for name, channel in config.channels.items():
        if isinstance(channel, ConsoleChannel):
            senders[name] = ConsoleSender(timeout_s=timeout)
        elif isinstance(channel, SlackChannel):
            # Imported only when a Slack channel is configured: slack-sdk costs a tenth of a
            # second at every start.
            from bridge.channels.slack import SlackSender

            senders[name] = SlackSender(channel, session, timeout)
        else:
            senders[name] = WebhookSender(name, channel, session, timeout, store)
    return senders
