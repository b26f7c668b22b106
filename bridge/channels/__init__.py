"""Channel senders and the one outcome type they all return.

A sender makes exactly one attempt and classifies it: delivered, retry (with the delay the far end
asked for, if any), or permanent. Only the worker decides backoff, pacing and dead letters. Error
texts are built from status codes and error names, never from URLs, headers or tokens.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

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
    async def send(self, payload: str, delivery_id: int, thread: Thread | None = None) -> Outcome:
        """One attempt to deliver a rendered payload; `delivery_id` is stable across attempts.
        Senders that cannot thread ignore `thread`."""
        ...


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true, and float() refuses it
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_status(status: int, headers: Mapping[str, str] | None, detail: str = "") -> Outcome:
    """The shared HTTP rule: 2xx delivered; 408, 429 and 5xx retry; every other status permanent."""
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    if 200 <= status < 300:
        return DELIVERED
    if status == 429:
        return retry(error, parse_retry_after(headers) or 1.0, rate_limited=True)
    if status == 408 or status >= 500:
        return retry(error, parse_retry_after(headers))
    return permanent(error)


def describe_exception(exc: BaseException) -> str:
    """A transport failure in words that cannot carry a URL or a credential."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return f"transport error: {type(exc).__name__}"


TRANSPORT_ERRORS = (asyncio.TimeoutError, aiohttp.ClientError, OSError)
