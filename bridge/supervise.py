"""The serving process's side of `[delivery] own_process = true`: it starts the delivery process
(`python -m bridge.deliver`, bridge/deliver.py), wakes it, passes reloads on, takes back its
reports, and starts it again should it end unasked.

It writes a byte to the child's stdin whenever a callback or a retry may have made something
due; a pipe of its own (`--report-fd`; stdout stays the console channel's) brings back, as JSON
lines, that the child is ready, each attempt's outcome (for `/metrics`) and each channel's last
success, last error and block (for `/status`). SIGHUP and `/-/reload` reach the child as SIGHUP
once it is ready; it reads the config file again. Should the child end unasked, the serving
process releases what it held in the store and starts it again, after 1 s, then 2, up to 30; not
while it is stopping itself, as when a SIGTERM reaches both (systemd stops a unit so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bridge import logs
from bridge.attempts import ChannelState
from bridge.checks import load_validated_within
from bridge.config import Config, ConfigError
from bridge.deliver import Reported
from bridge.metrics import Metrics
from bridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

REPORT_LIMIT = 1 << 20  # bytes a report line may have
RESTART_S = (1.0, 30.0)  # the first and the longest wait before starting the child again
STOP_MARGIN_S = 5.0  # past the grace period, before a child that does not stop is killed
# After a second signal, before a child that does not stop is killed: within the server's own
# STOP_NOW_S (bridge/serve.py), or the server exited and left it running (stopped, say), with
# the store open and its claims to be sent again beside the next server's.
HURRIED_KILL_S = 2.0
# A ready child that reports nothing for this long (it says it is alive every
# deliver.HEARTBEAT_S) is stopped (SIGSTOP, a debugger) or hung: killed and started again, as
# after a crash. Nothing delivered meanwhile, and nothing said of it, before.
STALL_S = 60.0
STALL_AGAIN_S = 1.0
SIGNAL_SETTLE_S = 0.5  # a child ended on SIGTERM: time for the server's own to be handled
# The child's exit status after a SIGTERM: 128 + 15 from its handler, as a shell reports it, or
# -15 when the signal came before the handler was in place; -10 for the server's own SIGUSR1
# (hurry) that came before its handler.
TERMINATED = (128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGUSR1)


class DeliveryProcess:
    """Starts, wakes, reloads, watches and stops the delivery process."""

    def __init__(
        self, config_path: Path, store: Store, metrics: Metrics, running: Callable[[], Config],
        stopping: Callable[[], bool], reload_server: Callable[[], object] = lambda: None,
    ) -> None:  # fmt: skip
        """`running`: the config the server runs now, which a child started again must match.
        `stopping`: whether the server is stopping (draining after a SIGTERM): no child is
        started then, and one that ended on SIGTERM too is no crash. `reload_server`: has the
        server read its file again, when the child has loaded another version of it."""
        self._path = config_path
        self._running = running
        self._reload_server = reload_server
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
        self._dropped = 0  # log lines the running child has reported dropped

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

    def hurry(self) -> None:
        """The server got a second signal: the child stops now too, with no grace for its sends
        (SIGUSR1; a second SIGTERM sent right after stop()'s could merge with it, as two of one
        signal pending at once are delivered once)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGUSR1)
            asyncio.get_running_loop().call_later(HURRIED_KILL_S, self._kill, proc)

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            log.error("the delivery process did not stop at once when told to: killed")
            proc.kill()

    def kill_now(self) -> None:
        """SIGKILL to the child, from any thread: the server is exiting this moment."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    async def _spawn(self) -> None:
        self._ready = False
        self._dropped = 0  # a new child counts from 0
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
                while line := await self._next_or_stalled(proc, reports):
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
                    log.error(
                        "cannot start the delivery process: %s (%s); again in %.0fs",
                        exc, open_files(), wait,
                    )  # fmt: skip

    async def _next_or_stalled(
        self, proc: asyncio.subprocess.Process, reports: asyncio.StreamReader
    ) -> bytes:
        """The next report line; a ready child that says nothing for STALL_S is killed (the
        lines it wrote before it died are still read, then the end)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STALL_S if self._ready else None):
                    return await next_report(reports)
            # A line may have come as the timer ran out (this process's own loop held up):
            # one more look, and it is news from a child alive.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STALL_AGAIN_S):
                    return await next_report(reports)
            if proc.returncode is None and not self._stopping:
                log.error(
                    "the delivery process has reported nothing for %.0fs (stopped or hung): "
                    "killed, to be started again", STALL_S + STALL_AGAIN_S,
                )  # fmt: skip
                proc.kill()
            self._ready = False  # no timer again: its end follows

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
            config, _ = await load_validated_within(self._path)
        except ConfigError as exc:
            return str(exc)
        running = self._running()
        if config.store != running.store:
            return f"{self._path} names another [store] than the server's (a restart applies it)"
        if config != running:
            log.warning(
                "the delivery process starts with %s as it is now, which the server has not "
                "loaded: the server reloads it too", self._path,
            )  # fmt: skip
        return None

    def _compare(self, digest: str) -> None:
        """The child has loaded the config file: as the server runs it, or the file changed
        between their reads (an editor saving twice, a deploy writing in two steps). Then the
        two would route and deliver by different channels, a channel only the server has left
        pending unseen: the server reads the file again, and passes the reload on, until both
        have read the same bytes."""
        running = self._running().digest
        if digest != running and running and not self._server_stopping():
            log.warning(
                "the delivery process loaded %s as it is now, not as the server did (it changed "
                "in between): reloading it again in both", self._path,
            )  # fmt: skip
            self._reload_server()

    def _take(self, line: bytes) -> None:
        try:
            report = json.loads(line)
            if "d" in report:  # log lines the child dropped, in all
                dropped = int(report["d"])
                self._metrics.log_lines_dropped.inc(max(0, dropped - self._dropped))
                self._dropped = max(self._dropped, dropped)
            if report.get("ready"):
                self._ready = True
                if self._reload_due:  # asked while it was starting
                    self.reload()
            if "config" in report:
                self._compare(str(report["config"]))
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


async def next_report(reports: asyncio.StreamReader) -> bytes:
    """The next report line; b"" at the end. One over the reader's limit (REPORT_LIMIT) is
    skipped with a warning: raised, it ended the watch, and with it the reports and the
    restarts."""
    while True:
        try:
            return await reports.readline()
        except ValueError:  # the line is dropped from the buffer; the next one follows
            log.warning("a report from the delivery process over %d bytes: skipped", REPORT_LIMIT)


def open_files() -> str:
    """This process's open files against its limit: at the limit, starting the child fails
    for want of a pipe, with an error that may not say so ("[Errno -1] Unknown error -1")."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        count = len(os.listdir("/proc/self/fd")) - 1  # less the one that lists them
    except OSError:  # not Linux, or no descriptor even for that
        return f"limit of open files {limit}"
    return f"{count} open files of a limit of {limit}"
