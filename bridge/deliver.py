"""The delivery process: with `[delivery] own_process = true`, `live-bridge serve` starts a
second process that runs the worker, and the serving process only acknowledges.

On two cores, delivering on the event loop that acknowledges took half of what receiving could
use (bench/notes.md). The two processes share the store; SQLite's writers take turns through
the writer's lock (bridge/store/writer.py), so the handover is immediate.

This module is the child (`python -m bridge.deliver`); the serving process starts and watches it
(bridge/supervise.py). Its stdin wakes it (a byte whenever a callback or a retry may have made
something due; end-of-file when the serving process dies, and it stops at once), SIGHUP reloads
its config from the file, SIGTERM stops it (SIGUSR1: at once, its sends in flight cut short); it
reports on a pipe of its own (`--report-fd`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from bridge import log_writer, logs
from bridge.checks import load_validated, validate
from bridge.compose import Composer
from bridge.config import Config, ConfigError, load_config
from bridge.outcomes import delivery_latency
from bridge.policy import ChannelPolicy, build_policies
from bridge.render import Renderer
from bridge.store import STORE_STOP_S, StoreUnavailable
from bridge.store.engines import make_store
from bridge.worker import Worker

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("bridge.deliver")  # also when run as __main__

REPORT_EVERY_S = 0.1  # how often the child sends what it counted
# The most the child stays silent: with nothing to report, an empty line says it is alive
# (supervise.STALL_S: a child silent for long is stopped or hung, and is started again).
HEARTBEAT_S = 1.0
REPORT_MAX = 1000  # outcomes a report line carries at most
STATES_MAX = 200  # channel states a report line carries at most (each error up to ERROR_CHARS)
ERROR_CHARS = 500  # of a channel's last error, in a report
GATHER_S = 0.002  # the child's SQLite writer: fewer, fuller transactions (store/writer.py)
RELOAD_AGAIN_S = (1.0, 60.0)  # the first and the longest wait before a refused reload is retried

# A channel's state as the child reports it: last success, last error, its time, block end.
Reported = tuple[float | None, str | None, float | None, float]


# Report bytes kept while the server reads none (it is stopped, say); past this, new outcome
# reports are dropped (counts on /metrics, not deliveries). About 30 bytes an outcome.
PENDING_MAX = 16 << 20


class Report:
    """What the worker counted, written to the report pipe as JSON lines every REPORT_EVERY_S.

    The pipe does not block: what the server has not read yet waits here. Blocking, a server
    that stalled (stopped, or its event loop held up) for a 64 KiB pipe's worth of reports
    stopped the delivery process with it: no delivery meanwhile, and the sends under way, their
    answers unread until their timeouts, were sent again."""

    def __init__(self, out: IO[bytes]) -> None:
        self._fd = out.fileno()
        os.set_blocking(self._fd, False)
        self._pending = bytearray()  # written to the pipe as it takes them, in order
        self._outcomes: list[tuple[str, str, float | None]] = []
        self._states: dict[str, Reported] = {}
        self._dropped = 0  # log lines dropped, as last reported
        self._said_at = time.monotonic()  # when a line was last written

    def outcome(self, channel: str, outcome: str, received_at: float | None = None) -> None:
        self._outcomes.append((channel, outcome, delivery_latency(outcome, received_at)))

    def flush(self, worker: Worker) -> None:
        """Outcomes since the last flush, and the channel states that changed."""
        now = time.time()
        states: dict[str, Reported] = {}
        for name, s in worker.states.items():
            blocked = worker.blocked_for(name)
            states[name] = (
                s.last_success_at, s.last_error and s.last_error[:ERROR_CHARS], s.last_error_at,
                round(now + blocked, 3) if blocked > 0 else 0.0,
            )  # fmt: skip
        changed = [(k, v) for k, v in states.items() if self._states.get(k) != v]
        outcomes, self._outcomes, self._states = self._outcomes, [], states
        # The log lines this process could not write (its stderr stalled), counted by the
        # server's metrics: it has only its own.
        dropped = log_writer.dropped_total()
        lines = []
        if dropped != self._dropped:
            lines.append(b'{"d":%d}\n' % dropped)
            self._dropped = dropped
        # Lines the server reads whole (supervise.REPORT_LIMIT, 1 MiB): outcomes and states
        # by the hundred, not all of 2,000 channels' errors at once.
        while outcomes or changed:
            report = {"o": outcomes[:REPORT_MAX], "s": dict(changed[:STATES_MAX])}
            lines.append(json.dumps(report, separators=(",", ":")).encode() + b"\n")
            outcomes, changed = outcomes[REPORT_MAX:], changed[STATES_MAX:]
        data = b"".join(lines)
        if data or time.monotonic() - self._said_at >= HEARTBEAT_S:
            data = data or b"{}\n"  # alive, with nothing to report
            self._said_at = time.monotonic()
        if len(self._pending) + len(data) > PENDING_MAX:
            data = b""  # the server has read nothing for a long while: these counts are lost
            self._states = {}  # and every channel's state is sent again, once it reads
        self._write(data)

    def _write(self, data: bytes) -> None:
        """`data` after what waits, as much as the pipe takes now; BrokenPipeError once the
        server is gone."""
        self._pending += data
        if self._pending:
            with contextlib.suppress(BlockingIOError):
                del self._pending[: os.write(self._fd, self._pending)]

    def close(self) -> None:
        """What still waits, written before the process ends (the server reads it as the
        child stops, or kills it after the grace period)."""
        os.set_blocking(self._fd, True)
        self._write(b"")

    def ready(self, digest: str) -> None:
        self.loaded(digest, ready=True)

    def loaded(self, digest: str, ready: bool = False) -> None:
        """Which version of the config file this process runs (Config.digest)."""
        report = {"ready": 1, "config": digest} if ready else {"config": digest}
        with contextlib.suppress(BrokenPipeError):  # the server is gone; stdin's end says so
            self._write(json.dumps(report).encode() + b"\n")


class Child:
    """The worker of one config file, in a process of its own."""

    def __init__(self, path: Path, config: Config, report: IO[bytes]) -> None:
        self.server_pid = os.getppid()  # once another, the server is gone: no send starts
        self._path = path
        self.config = config
        self._renderer = validate(config)
        # The server holds SQLite's serving lock; the write lock is taken for each transaction.
        self.store = make_store(config.store, serving=False, gather_s=GATHER_S)
        self.report = Report(report)
        self.worker: Worker | None = None
        self.stopped_by: int | None = None  # the signal that asked it to stop
        self._session: aiohttp.ClientSession | None = None
        self._reload_again: asyncio.TimerHandle | None = None
        self._reload_wait = RELOAD_AGAIN_S[0]

    def _parts(
        self, config: Config, renderer: Renderer
    ) -> tuple[dict[str, ChannelPolicy], Composer]:
        from bridge.channels.build import build_senders  # the child's alone: see run()

        assert self._session is not None
        policies = build_policies(config, build_senders(config, self._session, self.store.identity))
        return policies, Composer(config, renderer)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.store.open()
        # Imported here, not with the module, whose DeliveryProcess the server imports too:
        # the server sends nothing.
        from bridge.channels.http import sender_session

        self._session = sender_session()
        config = self.config
        policies, composer = self._parts(config, self._renderer)
        self.worker = Worker.for_config(config, self.store, policies, composer, self.report)
        self.worker.server_pid = self.server_pid
        stop = asyncio.Event()

        def asked(sig: signal.Signals) -> None:
            self.stopped_by = sig
            stop.set()

        def now() -> None:
            # The server got a second signal: stop, and cut the sends in flight short. The
            # status stays a SIGTERM's, so the server, stopping, takes it as its own stop.
            self.stopped_by = self.stopped_by or signal.SIGTERM
            stop.set()
            assert self.worker is not None
            self.worker.hurry()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, asked, sig)
        loop.add_signal_handler(signal.SIGUSR1, now)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.report.ready(self.config.digest)
        gc.collect()
        gc.freeze()
        work = asyncio.create_task(self.worker.run(), name="worker")
        report = asyncio.create_task(self._report(), name="report")
        parent = asyncio.create_task(self._wake_ups(), name="wake-ups")
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({work, parent, stopped}, return_when=asyncio.FIRST_COMPLETED)
        # The server gone (end of its pipe): stop now, another may start soon. Asked: finish.
        grace = self.config.delivery.shutdown_grace_s if stopped in done else 0.0
        if self._reload_again is not None:
            self._reload_again.cancel()
        # Past the grace, the rest may wait on a PostgreSQL that does not answer (as the
        # server's stop): bounded, and left as after a crash.
        closing = asyncio.ensure_future(self._close_store(grace, work))
        bound = grace + STORE_STOP_S if self.config.store.url is not None else None
        abandoned = not (await asyncio.wait({closing}, timeout=bound))[0]
        if abandoned:
            log.warning("the store did not close within %gs of the grace period: left as after"
                        " a crash", STORE_STOP_S)  # fmt: skip
        for task in (report, parent, stopped):
            task.cancel()
        await asyncio.gather(report, parent, stopped, return_exceptions=True)
        with contextlib.suppress(BrokenPipeError):
            self.report.flush(self.worker)
            self.report.close()
        await self._session.close()
        if abandoned:
            # Now: asyncio.run would cancel the store's work and wait for it (psycopg waits
            # 5 s for each cancellation), and the server killed the child first.
            logs.flush()
            os._exit(128 + self.stopped_by if self.stopped_by else 0)
        if work in done:
            work.result()  # the worker failed: its traceback, exit status 1, and a restart

    async def _close_store(self, grace: float, work: asyncio.Task[None]) -> None:
        assert self.worker is not None
        await self.worker.stop(grace)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        await self.store.close()

    async def _wake_ups(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        try:
            while await reader.read(4096):
                assert self.worker is not None
                self.worker.wake()
        finally:
            transport.close()  # also when cancelled at a stop

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            assert self.worker is not None
            self.report.flush(self.worker)

    def reload(self) -> None:
        """The server has reloaded this file: so does the child. Refused, it tries again, as
        the server took the file (the child may have failed alone, at its limit of open files,
        say); otherwise it would deliver by the old config, a new channel's messages not at all,
        until the next reload."""
        if self._reload_again is not None:
            self._reload_again.cancel()
            self._reload_again = None
        try:
            config, renderer = load_validated(self._path)
        except ConfigError as exc:
            wait, self._reload_wait = (
                self._reload_wait,
                min(RELOAD_AGAIN_S[1], self._reload_wait * 2),
            )
            log.error(
                "delivery process: reload refused, the running config stays: %s; trying again"
                " in %.0fs", exc, wait,
            )  # fmt: skip
            self._reload_again = asyncio.get_running_loop().call_later(wait, self.reload)
            return
        self._reload_wait = RELOAD_AGAIN_S[0]
        assert self.worker is not None
        policies, composer = self._parts(config, renderer)
        self.worker.configure(policies, config.delivery, composer, config.store.retention_h * 3600)
        self.config, self._renderer = config, renderer
        log.info("delivery process: reloaded, %d channels", len(config.channels))
        self.report.loaded(config.digest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.deliver")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format, None, process="delivery")
    # What loading the config warns of (a missing templates folder), the server has said, at
    # start-up and at each reload, for the same file: not twice.
    logging.getLogger("bridge.config").setLevel(logging.ERROR)
    try:
        with open(args.report_fd, "wb") as report:
            child = Child(args.config, load_config(args.config), report)
            asyncio.run(child.run())
    except (ConfigError, StoreUnavailable) as exc:
        log.error("delivery process: %s", exc)
        return 2
    except BrokenPipeError:
        # The server is gone (killed): the last report, flushed as the pipe closes, has nobody
        # to read it. The child has stopped as it should.
        return 0
    # Stopped by a signal: the status a shell reports for it, so that the server can tell a
    # SIGTERM (its own, or one sent to the whole service) from a crash.
    return 128 + child.stopped_by if child.stopped_by else 0


if __name__ == "__main__":
    raise SystemExit(main())
