"""The delivery process: with `[delivery] own_process = true`, `live-bridge serve` starts a
second process that runs the worker, and the serving process only acknowledges.

On two cores, delivering on the event loop that acknowledges took half of what receiving could
use (bench/notes.md). The two processes share the store; SQLite's writers take turns through
the writer's lock (bridge/store/writer.py), so the handover is immediate.

The serving process (`DeliveryProcess`) starts the child (`python -m bridge.deliver`) and watches
it. It writes a byte to the child's stdin whenever a callback or a retry may have made something
due; a pipe of its own (`--report-fd`; stdout stays the console channel's) brings back, as JSON
lines, that the child is ready, each attempt's outcome (for `/metrics`) and each channel's last
success, last error and block (for `/status`). SIGHUP and `/-/reload` reach the child as SIGHUP
once it is ready; it reads the config file again. Should the child end unasked, the serving
process releases what it held in the store and starts it again, after 1 s, then 2, up to 30; not
while it is stopping itself, as when a SIGTERM reaches both (systemd stops a unit so). Should the
serving process die, the child reads end-of-file on stdin and stops at once.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from bridge import logs
from bridge.checks import load_validated, validate
from bridge.compose import Composer
from bridge.config import Config, ConfigError, load_config
from bridge.metrics import Metrics, delivery_latency
from bridge.render import Renderer
from bridge.store import Store, StoreUnavailable
from bridge.store.engines import make_store
from bridge.worker import ChannelPolicy, ChannelState, Worker, build_policies

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("bridge.deliver")  # also when run as __main__

REPORT_EVERY_S = 0.1  # how often the child sends what it counted
REPORT_MAX = 1000  # outcomes a report line carries at most
REPORT_LIMIT = 1 << 20  # bytes a report line may have
ERROR_CHARS = 500  # of a channel's last error, in a report
RESTART_S = (1.0, 30.0)  # the first and the longest wait before starting the child again
STOP_MARGIN_S = 5.0  # past the grace period, before a child that does not stop is killed
GATHER_S = 0.002  # the child's SQLite writer: fewer, fuller transactions (store/writer.py)
SIGNAL_SETTLE_S = 0.5  # a child ended on SIGTERM: time for the server's own to be handled
# The child's exit status after a SIGTERM: 128 + 15 from its handler, as a shell reports it, or
# -15 when the signal came before the handler was in place.
TERMINATED = (128 + signal.SIGTERM, -signal.SIGTERM)

# A channel's state as the child reports it: last success, last error, its time, block end.
Reported = tuple[float | None, str | None, float | None, float]


# --- the serving process's side ------------------------------------------------------------


class DeliveryProcess:
    """Starts, wakes, reloads, watches and stops the delivery process."""

    def __init__(
        self, config_path: Path, store: Store, metrics: Metrics, running: Callable[[], Config],
        stopping: Callable[[], bool],
    ) -> None:  # fmt: skip
        """`running`: the config the server runs now, which a child started again must match.
        `stopping`: whether the server is stopping (draining after a SIGTERM): no child is
        started then, and one that ended on SIGTERM too is no crash."""
        self._path = config_path
        self._running = running
        self._server_stopping = stopping
        self._store = store
        self._metrics = metrics
        self._proc: asyncio.subprocess.Process | None = None
        self._reports: asyncio.StreamReader | None = None
        self._report_pipe: tuple[asyncio.ReadTransport, IO[bytes]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake_due = False
        self._ready = False  # the child handles SIGHUP: until then, a reload waits
        self._reload_due = False
        self.states: dict[str, Reported] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        """The child has said it is ready: its signal handlers are in place."""
        return self._ready

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name="delivery-process")

    def wake(self) -> None:
        """Something may be due: one byte to the child per turn of the event loop, at most."""
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        if proc.stdin.transport.get_write_buffer_size() == 0:  # else a wake-up is on its way
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.write(b"w")

    def reload(self) -> None:
        """SIGHUP to the child; one still starting gets it once it is ready."""
        self._reload_due = True
        if self._ready and self._proc is not None and self._proc.returncode is None:
            self._reload_due = False
            self._proc.send_signal(signal.SIGHUP)

    def channel_state(self, name: str) -> tuple[ChannelState, float]:
        """The child's last report on `name`: its state, and how long its block has to run."""
        success, error, error_at, blocked_until = self.states.get(name, (None, None, None, 0.0))
        return ChannelState(success, error, error_at), max(0.0, blocked_until - time.time())

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: the child lets its sends finish for `grace_s`, then ends; killed if not."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s + STOP_MARGIN_S)
            except TimeoutError:
                log.error("the delivery process did not stop in time: killed")
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _spawn(self) -> None:
        self._ready = False
        root = logging.getLogger()
        json_logs = any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers)
        theirs, ours = os.pipe()[::-1]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                # -P: bridge comes from where the server's came from, not from a bridge/ folder
                # in the working directory.
                sys.executable, "-P", "-m", "bridge.deliver",
                "--config", str(self._path.resolve()),
                "--log-level", logging.getLevelName(root.getEffectiveLevel()).lower(),
                "--log-format", "json" if json_logs else "text", "--report-fd", str(theirs),
                stdin=asyncio.subprocess.PIPE, pass_fds=(theirs,),
                start_new_session=True,  # a Ctrl-C reaches the server, which stops the child
            )  # fmt: skip
        except BaseException:
            os.close(ours)
            raise
        finally:
            os.close(theirs)
        self._reports = asyncio.StreamReader(limit=REPORT_LIMIT)
        protocol = asyncio.StreamReaderProtocol(self._reports)
        pipe = os.fdopen(ours, "rb")
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, pipe)
        self._report_pipe = transport, pipe
        log.info("delivery process started: pid %d", self._proc.pid)

    async def _watch(self) -> None:
        wait = RESTART_S[0]
        while True:
            proc, reports = self._proc, self._reports
            assert proc is not None and reports is not None
            started = time.monotonic()
            try:
                while line := await reports.readline():
                    self._take(line)
                status = await proc.wait()
            finally:
                self._close_reports()
            if self._stopping or await self._ended_with_server(status):
                return
            # Ended unasked: killed, crashed, or sent a SIGTERM of its own. It is the one that
            # delivers: started again, as after a crash. (The server's SIGTERM stops both.)
            self._metrics.delivery_restarts.inc()
            if time.monotonic() - started > RESTART_S[1]:
                wait = RESTART_S[0]  # it ran for a while: this is not a crash loop
            log.error(
                "the delivery process ended with status %d; starting it again in %.0fs",
                status, wait,
            )  # fmt: skip
            while True:
                await asyncio.sleep(wait)
                wait = min(RESTART_S[1], wait * 2)
                # SQLite has one serving process, so nothing else delivers from this store:
                # what the child had in flight or held is free again now, not when its leases
                # end. (PostgreSQL's replicas share the store: there its leases run out.)
                with contextlib.suppress(StoreUnavailable):
                    await self._store.recover()
                if problem := await self._config_problem():
                    log.error(
                        "the delivery process is not started again: %s; deliveries wait in the "
                        "store; again in %.0fs", problem, wait,
                    )  # fmt: skip
                    continue
                if self._server_stopping():
                    return  # what waits is delivered after the next start
                try:
                    await self._spawn()
                    break
                except OSError as exc:
                    log.error("cannot start the delivery process: %s; again in %.0fs", exc, wait)

    async def _ended_with_server(self, status: int) -> bool:
        """Whether the server is stopping too, so that no child is started again. A child that
        ended on SIGTERM then is no crash: a SIGTERM sent to the whole service (as systemd
        stops a unit) reaches both, and the server's own may not have been handled yet."""
        if status in TERMINATED and not self._server_stopping():
            await asyncio.sleep(SIGNAL_SETTLE_S)
        if not self._server_stopping():
            return False
        if status in TERMINATED:
            log.info("the delivery process stopped on SIGTERM, as the server does")
        else:
            log.error("the delivery process ended with status %d as the server stops", status)
        return True

    def _close_reports(self) -> None:
        """Closes the report pipe of a child that has ended. asyncio's transport would close it
        at the end of the reports, but uvloop's reads a copy of the descriptor and, as the
        stream's protocol asks at the end of input, keeps it open: both would stay open, one
        pair per restart, until the garbage collector found them."""
        if self._report_pipe is not None:
            transport, pipe = self._report_pipe
            self._report_pipe = None
            transport.close()
            pipe.close()

    async def _config_problem(self) -> str | None:
        """Why the config file as it is now must not start a delivery process, or None. The
        child reads the file, which may have changed since the server loaded it: another
        `[store]` (a reload refuses that) would have it deliver from another database, and a file
        that does not load would have it fail at every start."""
        try:
            config, _ = await asyncio.to_thread(load_validated, self._path)
        except ConfigError as exc:
            return str(exc)
        running = self._running()
        if config.store != running.store:
            return f"{self._path} names another [store] than the server's (a restart applies it)"
        if config != running:
            log.warning(
                "the delivery process starts with %s as it is now, which the server has not "
                "loaded: reload to apply it to both", self._path,
            )  # fmt: skip
        return None

    def _take(self, line: bytes) -> None:
        try:
            report = json.loads(line)
            if report.get("ready"):
                self._ready = True
                if self._reload_due:  # asked while it was starting
                    self.reload()
            for channel, outcome, latency in report.get("o", ()):
                self._metrics.count_outcome(channel, outcome, latency)
            for channel, (success, error, error_at, blocked) in report.get("s", {}).items():
                # A child started again reports what it has seen itself: nothing yet. What the
                # one before saw stays on the status page until there is news.
                before = self.states.get(channel)
                if before is not None:
                    success = before[0] if success is None else success
                    if error is None:
                        error, error_at = before[1], before[2]
                self.states[channel] = (success, error, error_at, float(blocked))
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable report from the delivery process: %.200r", line)


# --- the delivery process itself ------------------------------------------------------------


class Report:
    """What the worker counted, written to the report pipe as JSON lines every REPORT_EVERY_S."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._outcomes: list[tuple[str, str, float | None]] = []
        self._states: dict[str, Reported] = {}

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
        changed = {k: v for k, v in states.items() if self._states.get(k) != v}
        outcomes, self._outcomes, self._states = self._outcomes, [], states
        while outcomes or changed:
            report = {"o": outcomes[:REPORT_MAX], "s": changed}
            self._out.write(json.dumps(report, separators=(",", ":")).encode() + b"\n")
            outcomes, changed = outcomes[REPORT_MAX:], {}
        self._out.flush()

    def ready(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # the server is gone; stdin's end says so
            self._out.write(b'{"ready":1}\n')
            self._out.flush()


class Child:
    """The worker of one config file, in a process of its own."""

    def __init__(self, path: Path, config: Config, report: IO[bytes]) -> None:
        self._path = path
        self.config = config
        self._renderer = validate(config)
        # The server holds SQLite's serving lock; the write lock is taken for each transaction.
        self.store = make_store(config.store, serving=False, gather_s=GATHER_S)
        self.report = Report(report)
        self.worker: Worker | None = None
        self.stopped_by: int | None = None  # the signal that asked it to stop
        self._session: aiohttp.ClientSession | None = None

    def _parts(
        self, config: Config, renderer: Renderer
    ) -> tuple[dict[str, ChannelPolicy], Composer]:
        from bridge.channels.build import build_senders  # the child's alone: see run()

        assert self._session is not None
        policies = build_policies(config, build_senders(config, self._session))
        return policies, Composer(config, renderer)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.store.open()
        # Imported here, not with the module, whose DeliveryProcess the server imports too:
        # the server sends nothing.
        import aiohttp

        self._session = aiohttp.ClientSession()
        config = self.config
        policies, composer = self._parts(config, self._renderer)
        self.worker = Worker.for_config(config, self.store, policies, composer, self.report)
        stop = asyncio.Event()

        def asked(sig: signal.Signals) -> None:
            self.stopped_by = sig
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, asked, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.report.ready()
        gc.collect()
        gc.freeze()
        work = asyncio.create_task(self.worker.run(), name="worker")
        report = asyncio.create_task(self._report(), name="report")
        parent = asyncio.create_task(self._wake_ups(), name="wake-ups")
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({work, parent, stopped}, return_when=asyncio.FIRST_COMPLETED)
        # The server gone (end of its pipe): stop now, another may start soon. Asked: finish.
        grace = self.config.delivery.shutdown_grace_s if stopped in done else 0.0
        await self.worker.stop(grace)
        for task in (work, report, parent, stopped):
            task.cancel()
        await asyncio.gather(work, report, parent, stopped, return_exceptions=True)
        with contextlib.suppress(BrokenPipeError):
            self.report.flush(self.worker)
        await self._session.close()
        await self.store.close()
        if work in done:
            work.result()  # the worker failed: its traceback, exit status 1, and a restart

    async def _wake_ups(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(4096):
            assert self.worker is not None
            self.worker.wake()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            assert self.worker is not None
            self.report.flush(self.worker)

    def reload(self) -> None:
        try:
            config, renderer = load_validated(self._path)
        except ConfigError as exc:
            log.error("delivery process: reload refused, the running config stays: %s", exc)
            return
        assert self.worker is not None
        policies, composer = self._parts(config, renderer)
        self.worker.configure(policies, config.delivery, composer, config.store.retention_h * 3600)
        self.config, self._renderer = config, renderer
        log.info("delivery process: reloaded, %d channels", len(config.channels))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.deliver")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format, None, process="delivery")
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
