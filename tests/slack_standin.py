"""A local HTTP server that answers like Slack, for tests and benchmarks.

Contract:
- ``POST {api_url}chat.postMessage`` behaves like Slack's Web API method: JSON or form body,
  bot token in ``Authorization: Bearer`` (or a form ``token`` field). Every refusal is HTTP 200
  ``{"ok": false, "error": ...}`` except rate limiting (HTTP 429, ``ratelimited``); success is
  ``{"ok": true, "channel", "ts", "message"}``. Other ``/api/`` methods answer ``unknown_method``.
- ``add_webhook()`` URLs behave like incoming webhooks, answering plain-text codes:
  404 ``no_service``; 400 ``invalid_payload``, ``no_text``, ``invalid_blocks``;
  410 ``channel_is_archived``; 200 ``ok``. Their ``thread_ts`` is recorded, not checked.
- ``sink_url()`` records every request and answers the status set by ``set_sink_status`` (200),
  after ``set_sink_delay`` seconds; ``sink_max_concurrent`` is the most it held at once.
- With ``rate_per_s``, each channel has one token bucket (capacity ``burst``) shared by the API
  and webhooks; an empty bucket answers 429 with ``Retry-After`` in whole seconds and posts
  nothing. Requests that reach a known, open channel take a token even if their content is bad.
- Blocks are checked against the limits in ../shared/reference/slack.md (50 blocks; a header's
  plain text of 150; a section's text of 3000 and 10 fields of 2000; a context's 10 elements,
  each text of 3000; buttons' plain text of 75 and URLs of 3000) and against the reported total
  of 12,000 characters (``msg_blocks_too_long``, ``invalid_blocks`` from a webhook).
- ``fail_next`` forces answers ahead of all normal handling, first matching rule first.
  ``answer_normally`` drops what is left of them.
- One lock guards everything recorded, so any thread may read ``posted`` and the counters.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_API_DEFAULT_ERRORS = {429: "ratelimited", 503: "service_unavailable"}


@dataclass(frozen=True)
class Posted:
    """One message Slack accepted."""

    via: str  # "api" or "webhook"
    channel: str
    payload: dict[str, Any]
    ts: str
    received_at: float


@dataclass(frozen=True)
class SinkRequest:
    """One request to the generic webhook sink."""

    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float


@dataclass
class _ForcedAnswer:
    remaining: int
    status: int
    error: str | None
    retry_after: int | None
    channel: str | None
    kind: str


@dataclass
class _Bucket:
    tokens: float
    updated: float


class _Server(uvicorn.Server):
    async def main_loop(self) -> None:
        # uvicorn checks should_exit every 0.1 s; tests start many servers, so check more often.
        counter = 0
        while not await self.on_tick(counter):
            counter += 1
            await asyncio.sleep(0.01)


def _blocks_problem(blocks: Any) -> str | None:
    """Return Slack's error code for a ``blocks`` value, or None if Slack would accept it."""
    if not isinstance(blocks, list) or not all(
        isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks
    ):
        return "invalid_blocks_format"
    if len(blocks) > 50 or not all(_block_is_valid(block) for block in blocks):
        return "invalid_blocks"
    # Not in Slack's reference, but reported of chat.postMessage (bridge/blockkit_limits.py):
    # blocks of about 12,000 characters in all are refused, each block within its own limits.
    if _units(json.dumps(blocks, ensure_ascii=False, separators=(",", ":"))) > 12_000:
        return "msg_blocks_too_long"
    return None


def _units(text: str) -> int:
    """Its length in UTF-16 code units, as JavaScript counts (an emoji is two): Slack does not
    say how it counts, and this is the stricter of the two ways it may."""
    return len(text.encode("utf-16-le")) // 2


def _fits(text_object: Any, limit: int) -> bool:
    text = text_object.get("text") if isinstance(text_object, dict) else None
    return isinstance(text, str) and 0 < _units(text) <= limit


def _element_is_valid(element: Any) -> bool:
    if not isinstance(element, dict):
        return False
    if element.get("type") in ("mrkdwn", "plain_text"):
        return _fits(element, 3000)  # a text object
    return element.get("type") == "image"


def _button_is_valid(element: Any) -> bool:
    if not isinstance(element, dict) or element.get("type") != "button":
        return True  # other interactive elements: not checked here
    text = element.get("text")
    url = element.get("url", "")
    plain = isinstance(text, dict) and text.get("type") == "plain_text"
    return plain and _fits(text, 75) and isinstance(url, str) and _units(url) <= 3000


def _block_is_valid(block: dict[str, Any]) -> bool:
    kind = block["type"]
    if kind == "header":
        text = block.get("text")
        return isinstance(text, dict) and text.get("type") == "plain_text" and _fits(text, 150)
    if kind == "section":
        fields = block.get("fields")
        if "text" not in block and not fields:
            return False
        if "text" in block and not _fits(block["text"], 3000):
            return False
        if fields is None:
            return True
        return (
            isinstance(fields, list) and len(fields) <= 10 and all(_fits(f, 2000) for f in fields)
        )
    if kind == "context":
        return _elements_are_valid(block, 10, _element_is_valid)
    if kind == "actions":
        return _elements_are_valid(block, 25, _button_is_valid)
    return True


def _elements_are_valid(block: dict[str, Any], most: int, valid: Callable[[Any], bool]) -> bool:
    elements = block.get("elements")
    return isinstance(elements, list) and 0 < len(elements) <= most and all(map(valid, elements))


class SlackStandIn:
    """A Slack look-alike served by uvicorn in a background thread on 127.0.0.1."""

    def __init__(
        self,
        *,
        tokens: Iterable[str] = ("xoxb-test-token",),
        channels: Iterable[str] = ("C0123456789",),
        rate_per_s: float | None = None,
        burst: int = 1,
        latency_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = frozenset(tokens)
        self._clock = clock  # the rate limit's: a test may turn it by hand
        self._latency_s = latency_s  # Slack's own answer time, before any check
        self._channels = set(channels)
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._lock = threading.Lock()
        self._archived: set[str] = set()
        self._webhooks: dict[str, str] = {}  # path -> channel
        self._sink_status: dict[str, int] = {}
        self._sink_delay: dict[str, float] = {}
        self._sink_active: dict[str, int] = {}
        self.sink_max_concurrent: dict[str, int] = {}  # the most requests a sink held at once
        self._forced: list[_ForcedAnswer] = []
        self._buckets: dict[str, _Bucket] = {}
        self._posted: list[Posted] = []
        self._ts_by_channel: dict[str, set[str]] = {}
        self._sink_requests: list[SinkRequest] = []
        self._last_ts_us = 0
        self.requests_seen = 0
        self.api_requests_arrived = 0  # chat.postMessage requests, counted before the latency
        self.rejected_429 = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._app = Starlette(
            routes=[
                Route("/api/chat.postMessage", self._post_message, methods=["POST"]),
                Route("/api/{method}", self._unknown_method, methods=["GET", "POST"]),
                Route("/services/{rest:path}", self._webhook, methods=["POST"]),
                Route("/sink/{name}", self._sink, methods=["POST", "PUT"]),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> SlackStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind an ephemeral port and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("SlackStandIn is already running")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", ws="none"
        )
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SlackStandIn failed to start")
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the server and join its thread; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    @property
    def base_url(self) -> str:
        if self._sock is None:
            raise RuntimeError("SlackStandIn is not running")
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    # -- configuration ---------------------------------------------------------------------------

    def add_webhook(self, channel: str = "C0123456789") -> str:
        """Register an incoming webhook posting to ``channel`` and return its full URL."""
        secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))
        path = f"/services/T0000TEST/B{secrets.token_hex(4).upper()}/{secret}"
        with self._lock:
            self._channels.add(channel)
            self._webhooks[path] = channel
        return self.base_url + path

    def sink_url(self, name: str = "sink") -> str:
        return f"{self.base_url}/sink/{name}"

    def archive(self, channel: str) -> None:
        with self._lock:
            self._archived.add(channel)

    def set_sink_status(self, name: str, status: int) -> None:
        with self._lock:
            self._sink_status[name] = status

    def set_sink_delay(self, name: str, seconds: float) -> None:
        """The sink holds each request this long before recording and answering it."""
        with self._lock:
            self._sink_delay[name] = seconds

    def fail_next(
        self,
        n: int,
        *,
        status: int = 200,
        error: str | None = None,
        retry_after: int | None = None,
        channel: str | None = None,
        kind: str = "any",
    ) -> None:
        """Force the answer to the next ``n`` matching requests (kind: any/api/webhook/sink)."""
        if kind not in ("any", "api", "webhook", "sink"):
            raise ValueError(f"unknown kind {kind!r}")
        with self._lock:
            self._forced.append(_ForcedAnswer(n, status, error, retry_after, channel, kind))

    def answer_normally(self) -> None:
        """Drop every forced answer not used yet: the outage is over."""
        with self._lock:
            self._forced.clear()

    # -- inspection ------------------------------------------------------------------------------

    @property
    def posted(self) -> list[Posted]:
        with self._lock:
            return list(self._posted)

    @property
    def sink_requests(self) -> list[SinkRequest]:
        with self._lock:
            return list(self._sink_requests)

    def wait_for(self, predicate: Callable[[SlackStandIn], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate(self)`` until it is true (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- shared request steps (each called with the lock held) -----------------------------------

    def _take_forced(self, kind: str, channel: str | None) -> _ForcedAnswer | None:
        """Count the request; return the forced answer it uses up, if one matches."""
        self.requests_seen += 1
        for rule in self._forced:
            if rule.kind in ("any", kind) and rule.channel in (None, channel):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._forced.remove(rule)
                if rule.status == 429:
                    self.rejected_429 += 1
                return rule
        return None

    def _retry_after(self, channel: str) -> int | None:
        """Take a token from the channel's bucket; return a Retry-After if it was empty."""
        if self._rate_per_s is None:
            return None
        now = self._clock()
        bucket = self._buckets.setdefault(channel, _Bucket(float(self._burst), now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        self.rejected_429 += 1
        return max(1, math.ceil((1 - bucket.tokens) / self._rate_per_s))

    def _record(self, via: str, channel: str, payload: dict[str, Any]) -> str:
        # Slack's ts must be unique and increasing within a channel; keep it so globally.
        self._last_ts_us = max(self._last_ts_us + 1, time.time_ns() // 1000)
        ts = f"{self._last_ts_us // 1_000_000}.{self._last_ts_us % 1_000_000:06d}"
        self._posted.append(Posted(via, channel, payload, ts, time.monotonic()))
        self._ts_by_channel.setdefault(channel, set()).add(ts)
        return ts

    # -- endpoints -------------------------------------------------------------------------------

    async def _post_message(self, request: Request) -> Response:
        self.api_requests_arrived += 1
        body = await request.body()
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        payload = self._parse_api_body(request, body)
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth else payload.get("token")
        channel = payload.get("channel") if isinstance(payload.get("channel"), str) else None
        with self._lock:
            forced = self._take_forced("api", channel)
            if forced is not None:
                error = forced.error or _API_DEFAULT_ERRORS.get(forced.status, "internal_error")
                return _api_error(error, forced.status, forced.retry_after)
            if not token:
                return _api_error("not_authed")
            if token not in self._tokens:
                return _api_error("invalid_auth")
            if channel is None or channel not in self._channels:
                return _api_error("channel_not_found")
            if channel in self._archived:
                return _api_error("is_archived")
            retry_after = self._retry_after(channel)
            if retry_after is not None:
                return _api_error("ratelimited", 429, retry_after)
            problem = self._content_problem(payload, channel)
            if problem is not None:
                return _api_error(problem)
            ts = self._record("api", channel, payload)
        message = {k: v for k, v in payload.items() if k in ("text", "blocks", "thread_ts")}
        message |= {"type": "message", "ts": ts, "bot_id": "B0STANDIN"}
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "message": message})

    @staticmethod
    def _parse_api_body(request: Request, body: bytes) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            payload = parsed if isinstance(parsed, dict) else {}
        else:
            payload = dict(parse_qsl(body.decode("utf-8", "replace")))
        if isinstance(payload.get("blocks"), str):
            # Slack takes blocks as a JSON-encoded string too (always so in form posts).
            try:
                payload["blocks"] = json.loads(payload["blocks"])
            except ValueError:
                payload["blocks"] = None
        return payload

    def _content_problem(self, payload: dict[str, Any], channel: str) -> str | None:
        blocks = payload.get("blocks")
        if "blocks" in payload and (problem := _blocks_problem(blocks)) is not None:
            return problem
        text = payload.get("text")
        if not text and not blocks:
            return "no_text"
        if isinstance(text, str) and _units(text) > 40_000:
            return "msg_too_long"
        thread_ts = payload.get("thread_ts")
        if thread_ts is not None and thread_ts not in self._ts_by_channel.get(channel, set()):
            return "thread_not_found"
        return None

    async def _webhook(self, request: Request) -> Response:
        body = await request.body()
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        with self._lock:
            channel = self._webhooks.get(request.url.path)
            forced = self._take_forced("webhook", channel)
            if forced is not None:
                return _text(forced.error or "", forced.status, forced.retry_after)
            if channel is None:
                return _text("no_service", 404)
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                return _text("invalid_payload", 400)
            if channel in self._archived:
                return _text("channel_is_archived", 410)
            retry_after = self._retry_after(channel)
            if retry_after is not None:
                return _text("", 429, retry_after)
            if "blocks" in payload and _blocks_problem(payload["blocks"]) is not None:
                return _text("invalid_blocks", 400)  # a webhook's one name for them all
            if not payload.get("text") and not payload.get("blocks"):
                return _text("no_text", 400)
            self._record("webhook", channel, payload)
        return _text("ok", 200)

    async def _sink(self, request: Request) -> Response:
        body = await request.body()
        name = request.path_params["name"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            delay = self._sink_delay.get(name, 0.0)
            self._sink_active[name] = active = self._sink_active.get(name, 0) + 1
            self.sink_max_concurrent[name] = max(self.sink_max_concurrent.get(name, 0), active)
        try:
            if delay:
                await asyncio.sleep(delay)
            return self._sink_answer(name, request.url.path, headers, body, str(request.url))
        finally:
            with self._lock:
                self._sink_active[name] -= 1

    def _sink_answer(
        self, name: str, path: str, headers: dict[str, str], body: bytes, url: str = ""
    ) -> Response:
        with self._lock:
            forced = self._take_forced("sink", None)
            if forced is not None:  # "{url}" in the error: a gateway page echoing the request
                page = (forced.error or "").replace("{url}", url).encode()
                return Response(page, forced.status, _retry_header(forced.retry_after))
            self._sink_requests.append(SinkRequest(path, headers, body, time.monotonic()))
            status = self._sink_status.get(name, 200)
        return Response(b"ok", status, media_type="text/plain")

    async def _unknown_method(self, request: Request) -> Response:
        with self._lock:
            self.requests_seen += 1
        return _api_error("unknown_method")


def _retry_header(retry_after: int | None) -> dict[str, str] | None:
    return None if retry_after is None else {"Retry-After": str(retry_after)}


def _api_error(error: str, status: int = 200, retry_after: int | None = None) -> Response:
    return JSONResponse({"ok": False, "error": error}, status, _retry_header(retry_after))


def _text(body: str, status: int, retry_after: int | None = None) -> Response:
    return Response(body, status, _retry_header(retry_after), media_type="text/html")
