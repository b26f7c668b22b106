"""The HTTP rules the Slack and webhook senders share: which status is delivered, retried or
permanent, what Retry-After asks for, and transport failures in words that carry no URL.

Only the senders import this (and so aiohttp): a server whose delivery process sends loads
neither.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import os
import re
import time
from collections.abc import Mapping

import aiohttp

from bridge.channels import DELIVERED, Outcome, Result, permanent, retry

# The most of an answer a sender's session reads whole. slack-sdk reads every answer so, and
# grew the process by its size (three times it, as bytes, text and JSON): 100 MiB took 350 MB,
# and an answer that never ends 500 MB a second until the send timed out. Slack's largest
# (chat.postMessage echoing a message of 40,000 characters and 50 blocks) is far below it.
MAX_READ_BYTES = 1_048_576

# The longest wait a far end may ask for. More is taken as this: a wrong header, or 400 nines
# (infinity as a float), would otherwise hold a channel, or a delivery, past any date.
RETRY_AFTER_MAX_S = 3600.0


# ASCII digits only: "²".isdigit() is true, and float() refuses it.
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), at most RETRY_AFTER_MAX_S; None
    when absent or unreadable."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):  # whole seconds as HTTP says, or a fraction some servers send
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), RETRY_AFTER_MAX_S)


def classify_status(status: int, headers: Mapping[str, str] | None, detail: str = "") -> Outcome:
    """The shared HTTP rule: 2xx delivered; 408, 429 and 5xx retry; every other status permanent."""
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    if 200 <= status < 300:
        return DELIVERED
    if status == 429:
        # None for none (or 0): the lane then waits longer at each such 429 in a row (lane.py).
        return retry(error, parse_retry_after(headers) or None, rate_limited=True)
    if status == 408 or status >= 500:
        return retry(error, parse_retry_after(headers))
    return permanent(error)


_PLAIN_WORDS = re.compile(r"[a-z][a-z -]{0,79}")


def describe_exception(exc: BaseException) -> str:
    """A transport failure in words that cannot carry a URL or a credential."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # OpenSSL's reason ("self-signed certificate", "certificate has expired"), but for the
        # one that names the host it was not for.
        why = getattr(exc.certificate_error, "verify_message", "")
        why = why if _PLAIN_WORDS.fullmatch(why) else "not for this host"
        return f"cannot connect: TLS certificate not accepted ({why})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "cannot connect: TLS failed"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "cannot connect: name not resolved"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # The error number's words, not the error's text: asyncio's names the address and port
        # ("Connect call failed ('10.1.2.3', 443)"), as a secret URL's host may be.
        code = exc.os_error.errno
        return f"cannot connect: {os.strerror(code) if code else type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "answer cut short"  # a body closed, reset or wrongly encoded midway
    if isinstance(exc, aiohttp.ClientResponseError):
        return "malformed answer"  # not HTTP aiohttp can parse: a head over its limits, …
    return f"transport error: {type(exc).__name__}"


TRANSPORT_ERRORS = (asyncio.TimeoutError, aiohttp.ClientError, OSError)

# Errors that say this process (EMFILE: its `nofile` limit) or the machine (ENFILE) has no file
# descriptor left for a socket: the channel is not at fault, and counted as attempts they made
# dead letters of every delivery within minutes of a leak or a crowd of idle connections.
OUT_OF_DESCRIPTORS = {
    errno.EMFILE: "too many open files in live-bridge",
    errno.ENFILE: "too many open files on the host",
}

# How long a channel pauses after a send found no descriptor: one attempt per channel this
# often, not one per delivery (a backlog of thousands would be a busy loop of failing connects).
LOCAL_PAUSE_S = 2.0


def out_of_descriptors(exc: BaseException) -> int | None:
    """EMFILE or ENFILE when that is why `exc` (or an error it wraps) happened, else None."""
    seen: BaseException | None = exc
    for _ in range(8):  # aiohttp and slack-sdk wrap a few levels deep at most
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in OUT_OF_DESCRIPTORS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def transport_failure(exc: BaseException) -> Outcome:
    """A transport error's outcome: a retry, which pauses the channel and costs no attempt when
    this process could not open a socket."""
    code = out_of_descriptors(exc)
    if code is not None:
        error = f"cannot connect: {OUT_OF_DESCRIPTORS[code]} (not the channel)"
        return Outcome(Result.RETRY, error, LOCAL_PAUSE_S, free=True, local=True)
    return retry(describe_exception(exc))


class AnswerTooLong(aiohttp.ClientPayloadError):
    """An answer over MAX_READ_BYTES, its connection closed; its status and headers kept."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"an answer over {MAX_READ_BYTES} bytes")
        self.status = status
        self.headers = headers


class BoundedResponse(aiohttp.ClientResponse):
    """A response whose whole-body read (read, text, json) stops past MAX_READ_BYTES, raising
    AnswerTooLong. Streaming reads of `content` (the webhook sender's) are left alone."""

    async def read(self) -> bytes:
        if self._body is None:
            body = bytearray()
            try:
                while chunk := await self.content.readany():
                    body += chunk
                    if len(body) > MAX_READ_BYTES:
                        raise AnswerTooLong(self.status, self.headers)
            except BaseException:
                self.close()
                raise
            self._body = bytes(body)  # aiohttp's own read() then takes it as read
        return await super().read()


class Redirected(aiohttp.ClientError):
    """A redirect the session did not follow; its status and headers kept."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}: a redirect, not followed")
        self.status = status
        self.headers = headers


_REDIRECTS = {301, 302, 303, 307, 308}  # what aiohttp follows


async def _no_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """slack-sdk's clients let aiohttp follow redirects: a 307 or 308 posted the message to
    whatever host the far end named (an unconfigured one, or plain HTTP), which then counted
    as delivered; a 301 or 302 became a GET that posted nothing, and its 200 did too. No
    sender follows one: the answer is the redirect's (the webhook sender asks for that itself)."""
    response = await handler(request)
    if response.status in _REDIRECTS:
        response.release()
        raise Redirected(response.status, response.headers)
    return response


def sender_session() -> aiohttp.ClientSession:
    """The session the senders share (the worker's, send-test's). No cookies: one far end's
    would go back to every channel on its host."""
    return aiohttp.ClientSession(
        response_class=BoundedResponse,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=(_no_redirects,),
    )
