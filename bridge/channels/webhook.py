"""Generic webhooks: POST the rendered JSON, with Standard Webhooks signatures when configured."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import aiohttp
from standardwebhooks.webhooks import Webhook

from bridge.channels import Outcome, Thread
from bridge.channels.http import (
    TRANSPORT_ERRORS,
    Redirected,
    classify_status,
    transport_failure,
)
from bridge.config_channels import WebhookChannel

# Of an answer's body, at most this much is read: the status decides the outcome, and the body
# is read only so that the connection can carry the next request. A longer one (a receiver that
# echoes a download, a URL that names a file) closes the connection instead: read whole, it grew
# the process for as long as it lasted, and one that never ended turned a delivered message
# into a timeout, retried for ever.
MAX_ANSWER_BYTES = 65_536


def message_id(store: str, channel: str, message_key: str) -> str:
    """Stable per delivery, so a receiver can drop a repeat after a crash or retry. `store` is
    the store's identity: another database hands out the same delivery ids again, and its
    messages must not look like repeats."""
    digest = hashlib.sha256(f"{store}\0{channel}\0{message_key}".encode()).hexdigest()[:24]
    return f"msg_{digest}"


class WebhookSender:
    def __init__(
        self, name: str, settings: WebhookChannel, session: aiohttp.ClientSession,
        timeout_s: float, store: str,
    ) -> None:  # fmt: skip
        self._name = name
        self._store = store  # the store's identity, for message_id
        self._url, authorization = _split_credentials(settings.url.get_secret_value())
        # Standard Webhooks' own headers are the sender's to write, whatever their case.
        self._headers = {
            k: v.get_secret_value() for k, v in settings.headers.items()
            if k.lower() not in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }  # fmt: skip
        if authorization is not None:  # the config refuses an Authorization header beside it
            self._headers["Authorization"] = authorization
        self._signer = (
            Webhook(settings.signing_secret.get_secret_value())
            if settings.signing_secret is not None
            else None
        )
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        # The id and time with or without a signature: a receiver drops a repeat (after a crash,
        # a timeout) by its webhook-id, signed or not.
        msg_id = message_id(self._store, self._name, message_key)
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json", **self._headers,
            "webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
        }  # fmt: skip
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(msg_id, now, payload)
        try:
            async with self._session.post(
                self._url, data=payload.encode(), headers=headers, timeout=self._timeout,
                allow_redirects=False,
            ) as response:  # fmt: skip
                await _read_some(response)
                return classify_status(response.status, response.headers)
        except Redirected as exc:  # not followed (allow_redirects, and the session's own rule)
            return classify_status(exc.status, exc.headers)
        except TRANSPORT_ERRORS as exc:
            return transport_failure(exc)


async def _read_some(response: aiohttp.ClientResponse) -> None:
    """Read the body to its end if it is short and whole; else close the connection. A body
    that stalls, is cut short, reset or badly chunked changes nothing: the status line has
    already said whether the receiver took the message, and a 200 taken for a failure would be
    sent again at every attempt (stalled, until the send times out), each one delivered."""
    read = 0
    try:
        while read <= MAX_ANSWER_BYTES:
            chunk = await response.content.readany()
            if not chunk:
                return
            read += len(chunk)
    except TRANSPORT_ERRORS:  # aiohttp's own timeout included: what is left of the send's
        pass
    response.close()


def _split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without `user:password@`, and those as a Basic Authorization header. aiohttp
    would encode them as Latin-1 itself, and raise for a character outside it (the error naming
    the character, a piece of the password, in a traceback) at every send: such a password is
    sent as UTF-8, RFC 7617's charset; any other as aiohttp sent it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    login, password = unquote(parts.username or ""), unquote(parts.password or "")
    credentials = f"{login}:{password}"
    try:
        raw = credentials.encode("latin-1")
    except UnicodeEncodeError:
        raw = credentials.encode()
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl(), "Basic " + base64.b64encode(raw).decode()
