"""The admin surface: /metrics, /status (with its login and retry button) and /-/reload.

Who may use it: with `[admin] token` set, a request carrying `Authorization: Bearer TOKEN`, or the
cookie the status page sets once the token has been typed in; with no token, a loopback client
that names a loopback host (so that a DNS-rebound name cannot reach it from a browser) and comes
through no proxy (whose forwarded address uvicorn may believe). A POST a
browser marks as sent from another site is refused, and the page's retry button carries a form
token (derived from the admin token, so any replica takes it; per process without one).
/healthz, /readyz and the callback endpoint are not part of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from zoneinfo import ZoneInfo

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from bridge import __version__
from bridge.logs import one_line
from bridge.metrics import CONTENT_TYPE
from bridge.receive import read_body
from bridge.store import StoreUnavailable
from bridge.verify import Refused

if TYPE_CHECKING:
    from bridge.app import Bridge

log = logging.getLogger(__name__)

COOKIE = "live_bridge_admin"
RECENT_EVENTS = 25
REFRESH_S = 10
FORM_BYTES = 16_384  # the pages' forms: a token, or a form token and a channel name
PAGES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    auto_reload=False,
)
SHOWN_CHARS = 120  # of a value a callback chose (a room, a command), on the status page
ERROR_CHARS = 500  # of a delivery's or channel's last error, which may quote such a value


def shown(value: object, chars: int = SHOWN_CHARS) -> str:
    """A callback's value as the status page shows it: controls and bidirectional overrides as
    their escapes (`abc\u202egnp.exe` read "abcexe.png"), and cut short (25 rooms of 125 KB
    made a page of 15 MB, reloaded every 10 s, its other columns one character wide)."""
    text = one_line(str(value))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def shown_error(value: object) -> str:
    """A last error as the status page shows it (a template's error may quote a room)."""
    return shown(value, ERROR_CHARS)


PAGES.filters["shown"] = shown
PAGES.filters["shown_error"] = shown_error
# Compiled here, once: read from disk at the first request, a page needed a file descriptor, and
# a process at its limit of open files answered /status with a 500 and a traceback.
BASE_PAGE, LOGIN_PAGE, STATUS_PAGE = (
    PAGES.get_template(f"{name}.html.j2") for name in ("base", "login", "status")
)


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def names_loopback(host_header: str) -> bool:
    """Whether a Host header names this machine's loopback: localhost or a loopback address."""
    try:
        name = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return name == "localhost" or is_loopback(name)


def came_through_a_proxy(request: Request) -> bool:
    """Whether the request carries a proxy's headers. uvicorn takes the client's address from
    X-Forwarded-For when the connection comes from an address in FORWARDED_ALLOW_IPS; set to `*`,
    any client could name 127.0.0.1 there. A client that is really on loopback needs no proxy."""
    return "x-forwarded-for" in request.headers or "forwarded" in request.headers


def cross_site(request: Request) -> bool:
    """Whether a browser says this request comes from another site (`Sec-Fetch-Site`, which
    every current browser sends and a page cannot forge). curl and scripts send none. Not the
    Origin against the Host: a reverse proxy may rewrite the Host."""
    return request.headers.get("sec-fetch-site", "none") not in ("same-origin", "none")


async def small_form(request: Request) -> dict[str, str] | None:
    """The urlencoded form the pages post, or None when its body is over FORM_BYTES (the rest
    is not read). Not Starlette's form parser: the login form is open to anyone, and that parser
    holds 1,000 fields of 1 MB each, or spools a file of any size to disk, before the token is
    even looked at."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        body = await read_body(request, FORM_BYTES)
    except Refused:
        return None
    if content_type != "application/x-www-form-urlencoded":
        return {}
    return dict(parse_qsl(body.decode("latin-1")))


def form_too_large() -> Response:
    return JSONResponse({"error": f"form over {FORM_BYTES} bytes"}, 413)


def store_unavailable(path: str, exc: StoreUnavailable) -> Response:
    """A page or metrics the store could not give (a database away, no file descriptor left
    for a connection): 503 saying so, as /readyz does, not a 500 and a traceback."""
    log.warning("%s: %s", path, exc)
    return JSONResponse({"error": str(exc)}, 503)


# Pages with buttons: never in another site's frame, where a click could be lured onto them
# (a loopback-only bridge trusts the operator's own browser), and never cached.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


GONE_SHOWN = 20  # channels not in the config that the status page lists; the rest counted


GUESSES = 10  # wrong admin tokens one client address may give in GUESS_WINDOW_S
GUESSES_PER_48 = 100  # and the IPv6 /48 it is in (guessers)
GUESS_WINDOW_S = 60.0
GUESSERS_KEPT = 10_000  # addresses remembered at most; the oldest windows let go first


def guessers(host: str) -> tuple[tuple[str, int], ...]:
    """Whom a wrong token from `host` counts against, each with the guesses it may give in a
    window: its address; for IPv6 its /64, and its /48 at GUESSES_PER_48. A host is given a /64
    to pick addresses from at will, and may be routed a /56 or a /48 (256 or 65,536 /64s): by
    address, it could guess on from a new one every tenth guess, by /64 alone 655,000 times a
    minute from a /48."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ((host, GUESSES),)  # not an address ("-", a test client's name): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return ((str(ip.ipv4_mapped), GUESSES),)
        return (
            (str(ipaddress.IPv6Network((ip, 64), strict=False)), GUESSES),
            (str(ipaddress.IPv6Network((ip, 48), strict=False)), GUESSES_PER_48),
        )
    return ((str(ip), GUESSES),)


class Guesses:
    """Wrong admin tokens by client address (`guessers`). Past its limit in a window, that
    address (or network) is refused (429), the right token too, until its window ends: the
    login form took 3,400 guesses a second, and a short token falls to that in minutes. Behind
    a proxy every client is the proxy's address, and one guesser locks them all out for a
    minute: no worse than guessing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wrong: dict[str, tuple[float, int]] = {}  # address -> (window's start, count)

    def wait(self, host: str) -> float:
        """Seconds until `host` may try again; 0 when it may now."""
        waits = [0.0]
        for key, limit in guessers(host):
            start, count = self._wrong.get(key, (0.0, 0))
            left = start + GUESS_WINDOW_S - self._clock()
            if count >= limit and left > 0:
                waits.append(left)
        return max(waits)

    def wrong(self, host: str) -> None:
        now = self._clock()
        for key, limit in guessers(host):
            start, count = self._wrong.pop(key, (now, 0))
            if now - start >= GUESS_WINDOW_S:
                start, count = now, 0
            self._wrong[key] = (start, count + 1)  # last in the dict: the newest window
            if len(self._wrong) > GUESSERS_KEPT:
                del self._wrong[next(iter(self._wrong))]
            if count + 1 == limit:
                log.warning(
                    "%d wrong admin tokens from %s within %gs: refused until %gs have passed",
                    limit, key, GUESS_WINDOW_S, GUESS_WINDOW_S,
                )  # fmt: skip


def _host(request: Request) -> str:
    return request.client.host if request.client else "-"


def too_many_guesses(wait: float) -> Response:
    return JSONResponse(
        {"error": "too many wrong admin tokens from this address: try again later"}, 429,
        headers={"Retry-After": str(math.ceil(wait))},
    )  # fmt: skip


class Admin:
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._random_form_token = secrets.token_urlsafe(32)
        self._guesses = Guesses()

    def _refused(self, request: Request, page: bool = False) -> Response | None:
        """None when `request` may use the admin endpoints; else the answer refusing it."""
        if (wait := self._guesses.wait(_host(request))) > 0:
            return too_many_guesses(wait)
        return None if self.allowed(request) else self._refuse(request, page)

    def _token(self) -> str | None:
        token = self._bridge.config.admin.token
        return token.get_secret_value() if token is not None else None

    def _session(self, token: str) -> str:
        # The cookie holds a value derived from the token, not the token itself.
        return hmac.new(token.encode(), b"live-bridge status page", hashlib.sha256).hexdigest()

    def _form_token(self) -> str:
        """The retry button's: from the admin token, the same on every replica behind a load
        balancer; without one (loopback only, one process), random per process."""
        token = self._token()
        if token is None:
            return self._random_form_token
        return hmac.new(token.encode(), b"live-bridge retry form", hashlib.sha256).hexdigest()

    def allowed(self, request: Request) -> bool:
        token = self._token()
        if token is None:
            client = request.client.host if request.client else None
            return (
                is_loopback(client)
                and names_loopback(request.headers.get("host", ""))
                and not came_through_a_proxy(request)
            )
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            if hmac.compare_digest(header[7:].strip().encode(), token.encode()):
                return True
            self._guesses.wrong(_host(request))
            return False
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self._session(token).encode())

    def _refuse(self, request: Request, page: bool = False) -> Response:
        if self._token() is None:
            return JSONResponse({"error": "admin endpoints answer loopback clients only"}, 403)
        if page:
            return HTMLResponse(LOGIN_PAGE.render(error=None), 401, headers=PAGE_HEADERS)
        return JSONResponse(
            {"error": "admin token required"}, 401, headers={"WWW-Authenticate": "Bearer"}
        )

    async def metrics(self, request: Request) -> Response:
        if (refusal := self._refused(request)) is not None:
            return refusal
        bridge = self._bridge
        try:
            stats = await bridge.store.stats()
        except StoreUnavailable as exc:
            return store_unavailable("/metrics", exc)
        bridge.metrics.tasks.set(len(asyncio.all_tasks()))  # this request's among them
        # On a thread, as the status page: a store holding many channels' numbers makes a long
        # text (10,000 channels, 2 MB: 0.45 s on the event loop, no callback answered).
        body = await asyncio.to_thread(bridge.metrics.render, stats, list(bridge.config.channels))
        # Counts change every moment, and name every channel: no cache keeps them.
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    async def reload(self, request: Request) -> Response:
        if (refusal := self._refused(request)) is not None:
            return refusal
        if cross_site(request):
            return JSONResponse({"error": "refused: sent from another site"}, 403)
        ok, message = await self._bridge.reload()
        return JSONResponse(
            {"status": "reloaded" if ok else "refused", "message": message}, 200 if ok else 400
        )

    async def login(self, request: Request) -> Response:
        token = self._token()
        form = await small_form(request)
        if form is None:
            return form_too_large()
        given = form.get("token", "")
        if (wait := self._guesses.wait(_host(request))) > 0:
            return too_many_guesses(wait)
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            if token is not None:
                self._guesses.wrong(_host(request))
            page = LOGIN_PAGE.render(error="That token is not right.")
            return HTMLResponse(page, 401, headers=PAGE_HEADERS)
        response = RedirectResponse("/status", 303)
        response.set_cookie(
            COOKIE, self._session(token), httponly=True, samesite="strict",
            secure=request.url.scheme == "https", path="/",
        )  # fmt: skip
        return response

    async def retry(self, request: Request) -> Response:
        if (refusal := self._refused(request, page=True)) is not None:
            return refusal
        if cross_site(request):
            return JSONResponse({"error": "refused: sent from another site"}, 403)
        form = await small_form(request)
        if form is None:
            return form_too_large()
        csrf = form.get("csrf", "")
        if not hmac.compare_digest(csrf.encode(), self._form_token().encode()):
            return JSONResponse({"error": "stale or missing form token: reload the page"}, 403)
        channel = form.get("channel", "")
        if channel not in self._bridge.config.channels:
            return JSONResponse({"error": "unknown channel"}, 400)
        try:
            retried = await self._bridge.store.retry_dead(channel, time.time())
        except StoreUnavailable as exc:
            return store_unavailable("/status/retry", exc)
        self._bridge.wake()
        return RedirectResponse(
            "/status?" + urlencode({"retried": retried, "channel": channel}), 303
        )

    async def status(self, request: Request) -> Response:
        if (refusal := self._refused(request, page=True)) is not None:
            return refusal
        try:
            # Rendered on a thread: the event loop goes on answering callbacks meanwhile.
            page = await asyncio.to_thread(STATUS_PAGE.render, await self._page(request))
        except StoreUnavailable as exc:
            return store_unavailable("/status", exc)
        return HTMLResponse(page, headers=PAGE_HEADERS)

    async def _page(self, request: Request) -> dict[str, Any]:
        bridge = self._bridge
        config = bridge.config
        zone = ZoneInfo(config.templates.timezone)
        now = time.time()

        def when(ts: float | None) -> str:
            if ts is None:
                return "—"
            return datetime.fromtimestamp(ts, UTC).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")

        stats = {s.channel: s for s in await bridge.store.stats()}
        # Channels gone from the config whose deliveries the store still holds (dead letters a
        # reload buried) are listed too, as /metrics counts them, without a retry button: they
        # would be buried again; `outbox drop` removes them, or the channel can come back.
        gone = sorted(set(stats) - set(config.channels))
        # Only the first of them, the rest counted: 10,000 removed channels made a page of
        # 14 MB that held every callback for 1.5 s to render, again at every refresh.
        shown_gone, unshown = gone[:GONE_SHOWN], gone[GONE_SHOWN:]
        channels = []
        for name in [*config.channels, *shown_gone]:
            s, channel = stats.get(name), config.channels.get(name)
            state, blocked = bridge.channel_state(name) if channel else (None, 0.0)
            channels.append({
                "name": name, "type": channel.type if channel else "not in the config",
                "pending": s.pending if s else 0, "in_flight": s.in_flight if s else 0,
                "dead": s.dead if s else 0, "delivered": s.delivered if s else 0,
                "oldest": f"{now - s.oldest_pending_at:.0f}s" if s and s.oldest_pending_at else "—",
                "last_success": when(state.last_success_at if state else None),
                "last_error": state.last_error if state else None,
                "last_error_at": when(state.last_error_at if state else None),
                "blocked_until": when(now + blocked) if blocked > 0 else None,
                "rate": getattr(channel, "rate_per_s", None), "configured": channel is not None,
            })  # fmt: skip
        recent = await bridge.store.recent_events(RECENT_EVENTS)
        events = [
            {"when": when(e.received_at), "command": e.command, "app": e.sdk_app_id,
             "room": e.room_id or "—", "deliveries": e.deliveries}
            for e in recent
        ]  # fmt: skip
        # Two apps may name a room alike: their app beside it, once there are two to tell apart.
        apps = {e.sdk_app_id for e in recent} | set(config.tencent.sdk_app_id)
        # Said only of a count and a channel there is: the query is anyone's to write, and a
        # link could make the page say "Session expired: sign in again at https://…".
        retried, retried_channel = (
            request.query_params.get("retried"), request.query_params.get("channel")
        )  # fmt: skip
        if not (retried or "").isdigit() or retried_channel not in config.channels:
            retried = retried_channel = None
        return {
            "channels": channels, "events": events, "several_apps": len(apps) > 1, "now": when(now),
            "zone": config.templates.timezone, "version": __version__, "csrf": self._form_token(),
            "refresh": REFRESH_S,
            "retried": retried, "retried_channel": retried_channel,
            "draining": bridge.draining,
            "unshown": {
                "channels": len(unshown),
                "pending": sum(stats[n].pending + stats[n].in_flight for n in unshown),
                "dead": sum(stats[n].dead for n in unshown),
            },
            "reload": None if bridge.last_reload is None else {
                "when": when(bridge.last_reload[0]), "refused": bridge.last_reload[1],
            },
        }  # fmt: skip
