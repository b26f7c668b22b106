"""Channel senders and the one outcome type they all return.

A sender makes exactly one attempt and classifies it: delivered, retry (with the delay the far end
asked for, if any), or permanent. Only the worker decides backoff, pacing and dead letters. Error
texts are built from status codes and error names, never from URLs, headers or tokens: the HTTP
rules the Slack and webhook senders share are in `bridge/channels/http.py`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Protocol

# slack-sdk logs full webhook URLs at DEBUG; its clients get this logger, which never goes below.
SDK_LOG = logging.getLogger("bridge.channels.sdk")
SDK_LOG.setLevel(logging.WARNING)


class Result(enum.StrEnum):
    DELIVERED = "delivered"  # the far end accepted the message
    RETRY = "retry"  # worth another attempt later
    PERMANENT = "permanent"  # the same request will never succeed


@dataclass(frozen=True)
class Outcome:
    result: Result
    error: str = ""
    retry_after: float | None = None  # seconds the far end asked us to wait (Retry-After)
    rate_limited: bool = False  # a 429: the channel is blocked, the message did not fail
    ts: str | None = None  # Slack's id of the posted message (bot token only)
    free: bool = False  # retry without counting an attempt: nothing was wrong with the message
    # This process, not the channel, failed (out of file descriptors): the channel pauses for
    # retry_after, as for a 429, and the attempt is given back (free).
    local: bool = False


DELIVERED = Outcome(Result.DELIVERED)


@dataclass(frozen=True)
class Thread:
    """Post as a reply in the thread whose parent message is `ts`."""

    ts: str
    broadcast: bool = False  # also show the reply in the channel


def retry(error: str, retry_after: float | None = None, rate_limited: bool = False) -> Outcome:
    return Outcome(Result.RETRY, error, retry_after, rate_limited)


def permanent(error: str) -> Outcome:
    return Outcome(Result.PERMANENT, error)


class Sender(Protocol):
    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        """One attempt to deliver a rendered payload. `message_key` (store.Claimed.message_key)
        is the same at every attempt of one message and never another's. Senders that cannot
        thread ignore `thread`."""
        ...
