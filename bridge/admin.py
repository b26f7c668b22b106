"""The admin surface: /metrics, /status (with its login and retry button) and /-/reload.

Who may use it: with `[admin] token` set, a request carrying `Authorization: Bearer TOKEN`, or the
cookie the status page sets once the token has been typed in; with no token, a loopback client
that names a loopback host (so that a DNS-rebound name cannot reach it from a browser) and comes
through no proxy (whose forwarded address uvicorn may believe). A POST a
browser marks as sent from another site is refused, and the page's retry button carries a form
token (derived from the admin token, so any replica takes it; per process without one).
/healthz, /readyz and the callback endpoint are not part of it.
The pages and what they show are in admin_pages.py; wrong tokens are counted in admin_guesses.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from bridge.admin_guesses import Guesses, too_many_guesses
from bridge.admin_pages import LOGIN_PAGE, PAGE_HEADERS, STATUS_PAGE, status_values
from bridge.metrics import CONTENT_TYPE
from bridge.receive import read_body
from bridge.store import StoreUnavailable
from bridge.verify import Refused

if TYPE_CHECKING:
    from bridge.app import Bridge

log = logging.getLogger(__name__)

COOKIE = "live_bridge_admin"
FORM_BYTES = 16_384  # the pages' forms: a token, or a form token and a channel name


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


def _host(request: Request) -> str:
    return request.client.host if request.client else "-"


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
            page = await asyncio.to_thread(
                STATUS_PAGE.render,
                await status_values(self._bridge, request, self._form_token),
            )
        except StoreUnavailable as exc:
            return store_unavailable("/status", exc)
        return HTMLResponse(page, headers=PAGE_HEADERS)
