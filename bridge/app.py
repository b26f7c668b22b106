"""`create_app(config)`: the Starlette application with its store, router, renderer and worker.

Start-up refuses a config whose templates do not render (`ConfigError`). The lifespan opens the
store before the first request and, on shutdown, lets in-flight sends finish for a grace period;
whatever is left stays in the store for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.channels import Sender
from bridge.channels.console import ConsoleSender
from bridge.channels.slack import SlackSender
from bridge.channels.webhook import WebhookSender
from bridge.checks import check_templates
from bridge.compose import Composer
from bridge.config import Config, ConfigError, ConsoleChannel, SlackChannel
from bridge.receive import Receiver, packet
from bridge.render import Renderer
from bridge.routing import Router
from bridge.store import Store, StoreUnavailable
from bridge.store.sqlite import SQLiteStore
from bridge.worker import ChannelPolicy, Worker

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0


def build_senders(config: Config, session: aiohttp.ClientSession) -> dict[str, Sender]:
    timeout = config.delivery.timeout_s
    senders: dict[str, Sender] = {}
    for name, channel in config.channels.items():
        if isinstance(channel, ConsoleChannel):
            senders[name] = ConsoleSender()
        elif isinstance(channel, SlackChannel):
            senders[name] = SlackSender(channel, session, timeout)
        else:
            senders[name] = WebhookSender(name, channel, session, timeout)
    return senders


def build_policies(config: Config, senders: Mapping[str, Sender]) -> dict[str, ChannelPolicy]:
    return {
        name: ChannelPolicy.from_config(name, channel, senders[name])
        for name, channel in config.channels.items()
    }


def validate(config: Config) -> Renderer:
    """The renderer for `config`, or ConfigError listing every template that does not render."""
    renderer = Renderer(config.templates)
    problems = check_templates(config, renderer)
    if problems:
        raise ConfigError("templates do not render:\n" + "\n".join(f"  {p}" for p in problems))
    return renderer


class Bridge:
    """Everything one running live-bridge holds; the app's state."""

    def __init__(
        self, config: Config, store: Store | None = None,
        senders: Mapping[str, Sender] | None = None, path: Path | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.path = path
        self.renderer = validate(config)
        self.store: Store = store or SQLiteStore(config.store.path, exclusive=True)
        self._senders = senders
        self.worker: Worker | None = None
        self.draining = False  # set on SIGTERM: /readyz answers 503 from then on
        self.receiver = Receiver(
            config, self.store, Router(config.routes), self.renderer, self._wake
        )

    def _wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        config = self.config
        await self.store.open()
        await self.store.recover()
        buried = await self.store.bury_unknown_channels(
            list(config.channels), time.time(), "channel removed from the config"
        )
        if buried:
            log.warning("%d deliveries to channels no longer configured are dead letters", buried)
        session = aiohttp.ClientSession()
        senders = self._senders or build_senders(config, session)
        self.worker = Worker(
            self.store, build_policies(config, senders), config.delivery,
            Composer(config, self.renderer), config.store.retention_h * 3600,
        )  # fmt: skip
        task = asyncio.create_task(self.worker.run(), name="worker")
        log.info(
            "live-bridge ready: callbacks at %s, %d channels, %d routes",
            self.config.server.callback_path, len(self.config.channels), len(self.config.routes),
        )  # fmt: skip
        try:
            yield
        finally:
            self.draining = True
            await self.worker.stop(config.delivery.shutdown_grace_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await session.close()
            await self.store.close()
            log.info("live-bridge stopped")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self.store.ping()
        except (StoreUnavailable, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})


async def _http_error(request: Request, exc: Exception) -> Response:
    # Anything but a packet (Starlette's text or HTML pages) would be a protocol error to Tencent.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return packet(status, HTTPStatus(status).phrase.lower())


def create_app(
    config: Config, path: Path | None = None, store: Store | None = None,
    senders: Mapping[str, Sender] | None = None,
) -> Starlette:  # fmt: skip
    """The app for `config`; `path` is where a reload reads the config again."""
    bridge = Bridge(config, store, senders, path)
    routes = [
        Route(config.server.callback_path, bridge.receiver.handle, methods=["POST"]),
        Route("/healthz", bridge.healthz, methods=["GET"]),
        Route("/readyz", bridge.readyz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=bridge.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    app.state.bridge = bridge
    return app
