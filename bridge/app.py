"""`create_app(config)`: the ASGI application with its store, router, renderer and worker (or,
with `[delivery] own_process`, the delivery process that runs the worker: bridge/deliver.py,
watched by bridge/supervise.py).

Start-up refuses a config whose templates do not render (`ConfigError`). The lifespan opens the
store before the first request and, on shutdown, lets in-flight sends finish for a grace period;
whatever is left stays in the store for the next start. `Bridge.reload()` (SIGHUP, POST
/-/reload) swaps in a new config only once it has been validated whole; a bad one changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bridge.admin import Admin
from bridge.attempts import ChannelState
from bridge.channels import Sender
from bridge.checks import validate
from bridge.compose import Composer
from bridge.config import Config, ConfigError
from bridge.metrics import Metrics
from bridge.policy import ChannelPolicy, build_policies
from bridge.presence import Presence
from bridge.receive import Receiver, packet
from bridge.reload import Reloads
from bridge.render import Renderer
from bridge.routing import Router
from bridge.store import STORE_STOP_S, Store, StoreUnavailable
from bridge.store.engines import describe, make_store
from bridge.worker import Worker

if TYPE_CHECKING:
    import aiohttp

    from bridge.supervise import DeliveryProcess

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0


class Bridge(Reloads):
    """Everything one running live-bridge holds; the app's state."""

    def __init__(
        self, config: Config, store: Store | None = None,
        senders: Mapping[str, Sender] | None = None, path: Path | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.path = path
        self.own_process = config.delivery.own_process  # a reload changes it at the next start
        if self.own_process and path is None:
            raise ConfigError("[delivery] own_process needs a config file, which the process reads")
        self.renderer = validate(config)
        self.store: Store = store or make_store(config.store, serving=True)
        self.presence = Presence(self.store)  # which channels this replica serves
        self.metrics = Metrics()
        self.admin = Admin(self)
        self._senders = senders
        self._session: aiohttp.ClientSession | None = None
        self.worker: Worker | None = None  # delivering in this process
        self.delivery: DeliveryProcess | None = None  # delivering in a process of its own
        self.draining = False  # set on SIGTERM: /readyz answers 503 from then on
        self._stop_now = False  # set on a second signal: no grace for the sends in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self.receiver = self._receiver(config, self.renderer)
        self._reloading = asyncio.Lock()
        self.last_reload: tuple[float, str | None] | None = None
        self._ping: asyncio.Future[None] | None = None  # the store ping /readyz waits for
        self._late_burials: set[asyncio.Task[None]] = set()  # see reload()

    def _receiver(self, config: Config, renderer: Renderer) -> Receiver:
        router = Router(config.routes)
        # With a delivery process, that process renders each message when it sends it.
        render = not self.own_process
        return Receiver(
            config, self.store, router, renderer, self.wake, self.metrics, render, self._dead
        )

    def _dead(self, channel: str, error: str) -> None:
        """A delivery stored dead at receipt (its template failed to render): counted and shown
        as the channel's last error, as a send's dead letter is."""
        self.metrics.outcome(channel, "dead")
        if self.worker is not None:
            self.worker.note_error(channel, error)

    def _worker_setup(
        self, config: Config, renderer: Renderer
    ) -> tuple[dict[str, ChannelPolicy], Composer]:
        from bridge.channels.build import build_senders  # and aiohttp: see lifespan

        assert self._session is not None
        senders = self._senders or build_senders(config, self._session, self.store.identity)
        return build_policies(config, senders), Composer(config, renderer)

    def stop_now(self) -> None:
        """A second SIGTERM or Ctrl-C: the sends in flight get no grace (they stay claimed and
        are sent again at the next start). Called from a signal handler, which may have
        interrupted the event loop anywhere: the loop does the rest when it comes to it."""
        self._stop_now = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_grace)

    def _cut_grace(self) -> None:
        if self.worker is not None:
            self.worker.hurry()
        if self.delivery is not None:
            self.delivery.hurry()

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()
        elif self.delivery is not None:
            self.delivery.wake()

    def channel_state(self, name: str) -> tuple[ChannelState | None, float]:
        """What the worker knows of a channel: its state, and how long its block has to run."""
        if self.delivery is not None:
            return self.delivery.channel_state(name)
        if self.worker is None:
            return None, 0.0
        return self.worker.states.get(name), self.worker.blocked_for(name)

    async def callback(self, request: Request) -> Response:
        return await self.receiver.handle(request)  # the receiver of the config now in force

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        config = self.config
        await self.store.open()
        await self.store.recover()
        await self.presence.announce(list(config.channels))  # before any callback is recorded
        if buried := await self.presence.bury():
            log.warning("%d deliveries to channels no longer configured are dead letters", buried)
        task: asyncio.Task[None] | None = None
        if self.own_process:
            from bridge.supervise import DeliveryProcess

            assert self.path is not None
            self.delivery = DeliveryProcess(
                self.path,
                self.store,
                self.metrics,
                lambda: self.config,
                lambda: self.draining,
                lambda: asyncio.get_running_loop().create_task(self.reload()),
            )
            await self.delivery.start()
        else:
            # Imported only here: with a delivery process, this one sends nothing, and aiohttp
            # would cost it about 9 MB.
            from bridge.channels.http import sender_session

            self._session = sender_session()  # the senders' (the worker runs here)
            policies, composer = self._worker_setup(config, self.renderer)
            self.worker = Worker.for_config(config, self.store, policies, composer, self.metrics)
            task = asyncio.create_task(self.worker.run(), name="worker")
        # Shared: other replicas' configs may differ, and one may die without withdrawing.
        shared = config.store.url is not None
        announcing = asyncio.create_task(self.presence.run(), name="presence") if shared else None
        loop = self._loop = asyncio.get_running_loop()
        hangup = threading.current_thread() is threading.main_thread()
        if hangup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        log.info(
            "live-bridge ready: callbacks at %s, %d channels, %d routes, store %s",
            config.server.callback_path, len(config.channels), len(config.routes),
            describe(config.store),
        )  # fmt: skip
        try:
            yield
        finally:
            if hangup:
                # Stopping: a reload asked now (logrotate's postrotate, `systemctl reload`
                # racing a stop) is ignored. Removed, asyncio gave SIGHUP its default action,
                # which ended the process there: no store closed, no "live-bridge stopped".
                loop.remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self.draining = True
            if self._stop_now:  # a second signal came before the first was acted on
                self._cut_grace()
            for burial in self._late_burials:
                burial.cancel()  # what they would bury, the next start does
            await asyncio.gather(*self._late_burials, return_exceptions=True)
            grace = self.config.delivery.shutdown_grace_s
            if self.delivery is not None:
                await self.delivery.stop(grace)
            # Past the grace, what is left touches the store alone: the sends' last outcomes,
            # the withdrawal, closing. PostgreSQL's may not answer (a database that hangs, a
            # table locked): it held the stop 20 to 40 s past the grace. Left undone, it is as
            # after a crash: what was in flight is sent again at the next start, and this
            # replica's announcement runs out. (SQLite's is a file: closed.)
            closing = asyncio.ensure_future(self._close_store(grace, task, announcing))
            sending = self.worker is not None  # else the delivery process, stopped above
            bound = (grace if sending else 0.0) + STORE_STOP_S if shared else None
            if not (await asyncio.wait({closing}, timeout=bound))[0]:
                log.warning("the store did not close within %gs of the grace period: left as"
                            " after a crash", STORE_STOP_S)  # fmt: skip
            if self._session is not None:
                await self._session.close()
            log.info("live-bridge stopped")

    async def _close_store(
        self, grace: float, worker: asyncio.Task[None] | None,
        announcing: asyncio.Task[None] | None,
    ) -> None:  # fmt: skip
        if self.worker is not None:
            await self.worker.stop(grace)
        for task in (worker, announcing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.presence.withdraw()  # once nothing is sent here any more
        await self.store.close()

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ping_store(self) -> None:
        """One ping of the store for every probe that asks while it runs: /readyz is open to
        anyone, and a ping is a committed write. A probe that gives up leaves it running (so a
        hung database gets one ping, not one more per probe)."""
        if self._ping is None:
            self._ping = asyncio.ensure_future(self.store.ping())
            self._ping.add_done_callback(self._pinged)
        await asyncio.shield(self._ping)

    def _pinged(self, ping: asyncio.Future[None]) -> None:
        self._ping = None
        if not ping.cancelled():
            ping.exception()  # retrieved: every probe may have given up on it

    async def readyz(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._ping_store()
        except StoreUnavailable as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        except TimeoutError:  # its message is empty
            reason = f"the store did not commit a write within {READY_TIMEOUT_S:g} s"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})


async def _http_error(request: Request, exc: Exception) -> Response:
    # Anything but a packet (Starlette's text or HTML pages) would be a protocol error to Tencent.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    response = packet(status, HTTPStatus(status).phrase.lower())
    if isinstance(exc, HTTPException) and exc.headers:
        response.headers.update(exc.headers)  # a 405's Allow, which HTTP requires
    return response


class App:
    """The ASGI application: a callback goes straight to the receiver, everything else (and a
    callback path asked with another method: 405) through Starlette's middleware and routing.

    Profiling under load showed Starlette's exception middleware, router and endpoint wrapper
    taking about a third of the event loop's time per callback; the receiver needs none of it,
    since it answers every outcome, errors included, with a Tencent packet itself."""

    def __init__(self, starlette: Starlette, bridge: Bridge) -> None:
        self.starlette = starlette
        self.bridge = bridge
        self.state = starlette.state
        # [server]: fixed until restart.
        self._callback_paths = bridge.config.server.callback_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        callback = scope["type"] == "http" and scope["method"] == "POST"
        if callback and scope["path"] in self._callback_paths:
            response = await self.bridge.callback(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def create_app(
    config: Config, path: Path | None = None, store: Store | None = None,
    senders: Mapping[str, Sender] | None = None,
) -> App:  # fmt: skip
    """The app for `config`; `path` is where a reload reads the config again."""
    bridge = Bridge(config, store, senders, path)
    admin = bridge.admin
    # Both forms, as App answers a POST at both: another method gets 405 at either.
    callbacks = [
        Route(p, bridge.callback, methods=["POST"]) for p in sorted(config.server.callback_paths)
    ]
    routes = [
        *callbacks,
        Route("/healthz", bridge.healthz, methods=["GET"]),
        Route("/readyz", bridge.readyz, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/status", admin.status, methods=["GET"]),
        Route("/status/login", admin.login, methods=["POST"]),
        Route("/status/retry", admin.retry, methods=["POST"]),
        Route("/-/reload", admin.reload, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=bridge.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    # Starlette would answer a path with a stray trailing slash with an empty 307 redirect: a
    # 404 packet instead, like any other unknown path.
    app.router.redirect_slashes = False
    app.state.bridge = bridge
    return App(app, bridge)
