"""`live-bridge serve`: run the bridge under uvicorn, with SIGTERM drain and SIGHUP reload."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.lifespan.on import LifespanOn

from bridge import logs
from bridge.config import CONFIG_HELP, ConfigError, load_for_command
from bridge.config_tables import StoreConfig

if TYPE_CHECKING:
    from bridge.app import Bridge

LEVELS = ["debug", "info", "warning", "error"]


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="receive callbacks and deliver them")
    serve.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    serve.add_argument("--log-level", default="info", choices=LEVELS)
    serve.add_argument("--log-format", default="text", choices=["text", "json"])
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false",
        help="no access log at all (by default it covers every path but the callback's)",
    )  # fmt: skip
    serve.add_argument(
        "--access-log-callbacks", action="store_true",
        help="also log each callback request in the access log",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    # A reload asked before the bridge is ready would end the process (SIGHUP's default): it
    # is ignored until the app takes it as a reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # What loading the config warns of is a log line too, in the format asked for: held back
    # until logging is set up, which the config's callback paths take part in.
    with logs.held_back() as warnings:
        path, config = load_for_command(args.config)
    skip = None if args.access_log_callbacks else config.server.callback_paths
    logs.setup(args.log_level, args.log_format, skip)
    logs.replay(warnings)
    from bridge.app import create_app  # after logging is set up
    from bridge.protocol import protocol_for

    try:
        app = create_app(config, path)
    except ConfigError as exc:  # its templates, which name themselves: the config names them
        print(f"live-bridge: {path}: {exc}", file=sys.stderr)
        return 2
    # The port first: taken, it stops start-up before a store is made for a server that never
    # ran.
    try:
        sockets = listen(config.server.host, config.server.port)
    except OSError as exc:
        where = f"{config.server.host}:{config.server.port}"
        print(f"live-bridge: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if problem := asyncio.run(store_problem(config.store)):
        for sock in sockets:
            sock.close()
        print(f"live-bridge: {problem}", file=sys.stderr)
        return 1
    # uvicorn says where it listens only for the sockets it binds itself.
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        logging.getLogger(__name__).info("listening on http://%s:%d", shown, port)
    # What start-up built (modules, models, compiled templates) lives as long as the process.
    # Frozen, a full collection under load walks about 9,000 objects instead of 52,000, and no
    # callback is answered while it runs. (After a reload the first config's objects are never
    # freed: one config's worth, once.)
    gc.collect()
    gc.freeze()
    raise_descriptor_limit()
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            http=protocol_for(config.server, app.bridge.metrics.request_refused),
            ws="none",  # no WebSocket here: an upgrade offer is served as plain HTTP
            log_config=None,
            access_log=args.access_log,
            lifespan="on",
            server_header=False,
        ),
        app.state.bridge,
        config.server.drain_s,
    )
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn stopped as for SIGTERM, then raised SIGINT again for the exit status
        # to say why, which asyncio's runner turns into this exception: no traceback after a
        # clean stop, and the status a shell gives a process Ctrl-C ended.
        return 128 + signal.SIGINT
    if server.stopped_by is not None:
        # Raised again, the signal did not end the process: its parent had it ignored (a job a
        # script starts with & ignores SIGINT), and so did this process once uvicorn put the
        # handler back. The status still says which it was.
        return 128 + server.stopped_by
    return 0 if server.started else 1


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to `host`'s addresses at `port`, before anything starts: uvicorn binds after
    the app's start-up, which had logged "live-bridge ready" and started a delivery process by
    then, and then exited with status 3 for a port already taken. Bound as asyncio's
    create_server binds them (each address getaddrinfo gives, SO_REUSEADDR, IPv6 sockets IPv6
    only); uvicorn listens on them."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def raise_descriptor_limit() -> None:
    """Every connection holds a file descriptor, idle ones too (until `request_timeout_s`), and
    the soft limit a service starts with is often 1024: a thousand idle connections from anyone
    would shut Tencent out. The soft limit goes up to the hard one, as Go's runtime does; a
    system that refuses keeps its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def store_problem(config: StoreConfig) -> str | None:
    """Why the store cannot be opened for serving, or None: opened, written to and closed again
    here, so a read-only disk, a full one, a locked file or a database that is down is one line
    and exit status 1 rather than a traceback from the server's start-up. (The server opens it
    again; should it fail in between, that traceback is still the answer.)"""
    from bridge.store import StoreUnavailable
    from bridge.store.engines import make_store

    store = make_store(config, serving=True)
    try:
        await store.open()
    except StoreUnavailable as exc:
        return str(exc)
    try:
        # A write too: a full disk, or a file made read-only, opens but takes none, and the
        # server's start then failed with a traceback and exit status 3.
        await store.ping()
    except StoreUnavailable as exc:
        return str(exc)
    finally:
        await store.close()
    return None


STOP_NOW_S = 5.0  # after a second signal, the most the process takes to end


def _exit_now(sig: int, bridge: Bridge) -> None:
    if bridge.delivery is not None:
        bridge.delivery.kill_now()  # else left running behind the exit, the store open
    logs.flush()
    os._exit(128 + sig)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT, /readyz turns 503 at once and the listener closes
    `drain_s` later; callbacks meanwhile are acknowledged as usual. A second signal stops now."""

    def __init__(self, config: uvicorn.Config, bridge: Bridge, drain_s: float) -> None:
        super().__init__(config)
        self._bridge = bridge
        self._drain_s = drain_s
        self._timer: threading.Timer | None = None
        self._signalled = False
        self.stopped_by: int | None = None  # the first signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn raises the signal that stopped it again once it has, for the exit status:
        # SIGTERM's default action ends the process there, before exit handlers run. The log
        # lines still queued for stderr (bridge/log_writer.py) go out first.
        with super().capture_signals():
            try:
                yield
            finally:
                logs.flush()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # uvicorn leaves the app's shutdown out when the second signal comes before it began:
        # the bridge then closed no store, left no channel to the next holder with its pacing,
        # and did not say it stopped. Its shutdown, with the grace cut (stop_now), takes no
        # time, and the watchdog bounds it.
        lifespan = self.lifespan
        if (
            self.force_exit and isinstance(lifespan, LifespanOn)
            and not (lifespan.shutdown_event.is_set() or lifespan.error_occurred)
        ):  # fmt: skip
            await lifespan.shutdown()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            # uvicorn alone would only stop waiting for connections, and only on SIGINT; the
            # sends in flight would still have their whole grace period. The drain ends too,
            # and its timer with it (it would count as one more signal).
            self._bridge.stop_now()
            if self._timer is not None:
                self._timer.cancel()
            self.force_exit = True  # SIGTERM too: no waiting for requests under way
            # A thread that does not end (a reload rendering a template for ever) would hold
            # the exit: Python waits for its threads. Stopping at once is what was asked.
            watchdog = threading.Timer(STOP_NOW_S, _exit_now, (sig, self._bridge))
            watchdog.daemon = True
            watchdog.start()
        self._signalled = True
        if self.stopped_by is None:
            self.stopped_by = sig
        self._bridge.draining = True
        if self._drain_s > 0 and self._timer is None and not self.should_exit:
            logging.getLogger(__name__).info("draining for %.1fs before closing", self._drain_s)
            self._timer = threading.Timer(self._drain_s, super().handle_exit, (sig, frame))
            self._timer.daemon = True
            self._timer.start()
            return
        super().handle_exit(sig, frame)
