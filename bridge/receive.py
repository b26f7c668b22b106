"""The callback endpoint: verify, parse, route, render, commit, then answer Tencent.

The OK packet goes out only after the event and one pending delivery per matched channel are
committed together; delivery happens later, from the store, in the worker. Every answer, refusals
included, is a Tencent response packet. With `[delivery] own_process` the receiver renders
nothing: the delivery process renders each message from the stored event when it sends it, so
the serving process does only what acknowledging needs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from bridge.config import Config
from bridge.events import URL_NAMES, Envelope
from bridge.events_body import BadEvent, decode_body
from bridge.events_parse import parse_event
from bridge.metrics import Metrics
from bridge.render import Context, Renderer, RenderError
from bridge.routing import Router
from bridge.store import NewDelivery, NewEvent, Store, StoreUnavailable, dedup_digest
from bridge.verify import Refused, check_app_id, check_signature, query_keys

log = logging.getLogger(__name__)

OK_PACKET = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'


def packet(status: int, info: str = "") -> Response:
    """A Tencent response packet; ErrorCode is the HTTP status of a refusal, 0 for OK."""
    if status == 200:
        return _OK  # a Response keeps no per-request state: one serves every OK
    body = json.dumps(
        {"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": status}, separators=(",", ":")
    ).encode()
    return Response(body, status_code=status, media_type="application/json")


_OK = Response(OK_PACKET, status_code=200, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or Refused(413) as soon as it is known to exceed `limit`."""
    # The raw header list: building Starlette's Headers for one value costs more than the scan.
    declared = next((v for k, v in request.scope["headers"] if k == b"content-length"), b"")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def dedup_key(command: str, sdk_app_id: int, body: bytes, event_time: int | None) -> str:
    """The same app, command and body again, byte for byte: what Tencent's retry-on-timeout
    sends (`store.dedup_digest`).

    The body's EventTime (part of the bytes hashed, so a retry carries the same one) leads the
    key as 16 hex digits, two's complement as SQLite's printf and PostgreSQL's to_hex write it:
    keys arrive in about the order they sort, so each commit adds to the last pages of the
    dedup index instead of one page at random per callback (for a batch of 16 callbacks, 12
    pages written instead of 31, measured). A body without EventTime gets an empty prefix."""
    digest = dedup_digest(command, sdk_app_id, body)
    if event_time is None:
        return f":{digest}"
    return f"{event_time & 0xFFFF_FFFF_FFFF_FFFF:016x}:{digest}"


QUIET_S = 60.0  # the least time between two lines about one kind of refusal


class Quiet:
    """One line a minute for each kind of refusal, saying how many went unsaid since: anyone
    who can reach the callback URL can be refused by the thousand a second (a wrong SdkAppid, a
    stale signature, a client that hangs up), and a line each filled the log's queue, whose
    overflow drops the lines that matter. The metrics count every one."""

    def __init__(self) -> None:
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (its last line, unsaid since)

    def unsaid(self, kind: str) -> str | None:
        """None to stay quiet; else what to add to this kind's line (how many went unsaid)."""
        now = time.monotonic()
        said_at, unsaid = self._kinds.get(kind, (-QUIET_S, 0))
        if now - said_at < QUIET_S:
            self._kinds[kind] = (said_at, unsaid + 1)
            return None
        self._kinds[kind] = (now, 0)
        return f" ({unsaid} more since the last line, not logged)" if unsaid else ""


def _said(query: dict[str, str]) -> str | None:
    """The command the query names, as the body would name it."""
    said = query.get("callbackcommand") or query.get("webhookcommand")
    return URL_NAMES.get(said, said) if said else None


ENCODED = "Content-Encoding is not taken: send the body as it is"


def _encoded(request: Request) -> bool:
    """Whether the body came compressed (Tencent compresses nothing): it was refused as "body is
    not UTF-8"."""
    return any(
        name == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
        for name, value in request.scope["headers"]
    )


def _query_command(request: Request) -> str | None:
    raw = request.scope["query_string"].decode("latin-1")
    return _said(query_keys(parse_qsl(raw, keep_blank_values=True)))


class Receiver:
    def __init__(
        self, config: Config, store: Store, router: Router, renderer: Renderer,
        on_recorded: Callable[[], None], metrics: Metrics, render: bool = True,
        on_dead: Callable[[str, str], None] | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        # False with a delivery process: rendering is its work (bridge.compose), not the ack's.
        self.render = render
        # Channels a reload gave another type, once this receiver is the old config's: what it
        # still handles is stored unrendered, rendered when sent for the type the channel has
        # then (bridge/reload.py). Rendered here, for the old type, the new lane could claim it
        # before the reload forgot it: Slack's JSON posted to a webhook, or no_text from Slack.
        self.retyped: frozenset[str] = frozenset()
        self.store = store
        self.router = router
        self.renderer = renderer
        self.on_recorded = on_recorded
        self.metrics = metrics  # counts every callback by command and result
        # A delivery stored dead at receipt (its template failed): its channel and why, for the
        # outcome counts and the channel's last error, as a send's would be.
        self.on_dead = on_dead
        self._unstored = 0  # callbacks refused in a row because the store could not commit
        self.in_flight = 0  # callbacks being handled: a reload waits for the old receiver's
        self._mismatches: set[tuple[str, str]] = set()  # query and body commands, logged once
        self._quiet = Quiet()

    def take_over(self, old: Receiver) -> None:
        """What the receiver of the config before has said stays said: a reload neither logs
        again a refusal logged within the minute (nor loses the count of those not logged
        since), nor a query/body mismatch logged once, nor forgets an outage's count."""
        self._quiet, self._mismatches = old._quiet, old._mismatches
        self._unstored = old._unstored

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        command: str | None = None  # known once the body parses
        self.in_flight += 1
        try:
            response, result, command = await self._handle(request)
        except Refused as exc:
            if (unsaid := self._quiet.unsaid(f"HTTP {exc.status}")) is not None:
                log.info("refused callback: HTTP %d %s%s", exc.status, exc.info, unsaid)
            response, result = packet(exc.status, exc.info), f"refused_{exc.status}"
            command = _query_command(request)  # for the metrics: no body to say otherwise
        except ClientDisconnect:
            # The client hung up (or bridge.protocol cut off a body that did not arrive in
            # time): nobody to answer, nothing stored, and nothing wrong here.
            if (unsaid := self._quiet.unsaid("the client went away")) is not None:
                log.info("refused callback: client went away before its body arrived%s", unsaid)
            response, result = packet(400, "client went away"), "disconnected"
            command = _query_command(request)
        except Exception:
            if (unsaid := self._quiet.unsaid("callback failed")) is not None:
                log.exception("callback failed%s", unsaid)
            response, result = packet(500, "internal error"), "error"
        finally:
            self.in_flight -= 1
        self.metrics.callback(command, result, time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> tuple[Response, str, str]:
        now = time.time()
        tencent = self.config.tencent
        # parse_qsl straight from the scope: what Starlette's QueryParams does, minus its
        # multi-dict, which nothing here needs.
        raw = request.scope["query_string"].decode("latin-1")
        query = query_keys(parse_qsl(raw, keep_blank_values=True))
        app_id = check_app_id(query, tencent.sdk_app_id)
        check_signature(query, tencent.token_for(app_id), tencent.max_request_age_s, now)
        body = await read_body(request, self.config.server.max_body_bytes)
        try:
            fields = decode_body(body)
            event = parse_event(fields)
        except BadEvent as exc:
            # The header is looked for only here: a callback that parses pays nothing for it.
            status, info = (415, ENCODED) if _encoded(request) else (400, str(exc))
            raise Refused(status, info) from None
        said = _said(query)
        if said and said != event.CallbackCommand:
            self._mismatch(said, event.CallbackCommand)

        visible = {k: v for k, v in query.items() if k != "sign"}  # templates and store
        deliveries = self._deliveries(event, fields, app_id, now, visible)
        record = NewEvent(
            sdk_app_id=app_id,
            command=event.CallbackCommand,
            room_id=event.room(),
            event_time=event.EventTime,
            body=body.decode(),
            query=json.dumps(visible),
            dedup_key=dedup_key(event.CallbackCommand, app_id, body, event.EventTime),
        )
        # Tencent retries only "after" callbacks (on timeout, when the console says so). A
        # "before" callback asks permission for something happening now, and two of them can be
        # byte for byte the same (a gift sent twice in the second its `Time` counts): each one
        # is an event of its own.
        window = 0.0 if ".CallbackBefore" in record.command else self.config.delivery.dedup_window_s
        try:
            recorded = await self.store.record(record, deliveries, now, window)
        except StoreUnavailable as exc:
            # One line for an outage, not one per callback: Tencent may call a thousand times
            # a second, and the metrics count every refusal.
            self._unstored += 1
            if self._unstored == 1 or self._unstored % 1000 == 0:
                log.error("cannot store callbacks (%d refused with 503 so far): %s",
                          self._unstored, exc)  # fmt: skip
            return packet(503, "store unavailable"), "store_unavailable", record.command
        if self._unstored:
            log.warning("store available again: %d callbacks were refused with 503", self._unstored)
            self._unstored = 0
        if recorded.duplicate:
            log.info("duplicate of event=%d within the dedup window", recorded.event_id)
            return packet(200), "duplicate", record.command
        if not deliveries:
            return packet(200), "unrouted", record.command
        if self.on_dead is not None:
            for delivery in deliveries:
                if delivery.error is not None:
                    self.on_dead(delivery.channel, delivery.error)
        self.on_recorded()
        return packet(200), "accepted", record.command

    def _mismatch(self, said: str, command: str) -> None:
        # Once per pair: a sender that names a command its own way does so in every callback,
        # and Tencent may call a thousand times a second. The pairs come from callers: bounded.
        pair = (said[:100], command[:100])
        if pair not in self._mismatches and len(self._mismatches) < 100:
            self._mismatches.add(pair)
            log.info("query says %s, body says %s: using the body (logged once)", *pair)

    def _deliveries(
        self, event: Envelope, fields: dict[str, Any], app_id: int, now: float,
        query: dict[str, str],
    ) -> list[NewDelivery]:  # fmt: skip
        match = self.router.route_event(event)
        if not match.channels:
            # Counted in the metrics (result "unrouted"); a line each would flood the log.
            log.debug("no route matched %s room=%s", event.CallbackCommand, event.room())
            return []
        if not self.render:
            return [NewDelivery(name, None) for name in match.channels]
        ctx = Context(sdk_app_id=app_id, received_at=now, query=query)
        deliveries = []
        for name in match.channels:
            channel = self.config.channels[name]
            if name in self.retyped:
                deliveries.append(NewDelivery(name, None))
                continue
            try:
                payload = self.renderer.render(channel.type, event, fields, ctx, channel.template)
            except RenderError as exc:
                # Stored as a dead letter with the reason: visible, retryable, never silent.
                log.error("channel %s: cannot render %s: %s", name, event.CallbackCommand, exc)
                deliveries.append(NewDelivery(name, None, error=f"render failed: {exc}"))
                continue
            deliveries.append(NewDelivery(name, payload))
        return deliveries
