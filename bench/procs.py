"""The processes a benchmark runs: live-bridge and the comparison apps, each under uvicorn."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.load import TOKEN

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except OSError:
        return False


class Proc:
    """A server process; `peak_rss` and `peak_pss` are sampled while `sampling()` is active."""

    def __init__(
        self, args: list[str], port: int, env: dict[str, str] | None = None,
        ready_path: str | None = "/readyz",
    ) -> None:  # fmt: skip
        self.args, self.port, self.env, self.ready_path = args, port, env, ready_path
        self.callback_url = f"http://127.0.0.1:{port}/tencent/callback"
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self.peak_pss = 0

    def ready(self) -> bool:
        """/readyz says 200; without a ready path (the comparison apps), the port accepts."""
        if self.ready_path is not None:
            return _answers(f"http://127.0.0.1:{self.port}{self.ready_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def start(self) -> float:
        """Seconds from spawn to ready."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.args, env={**os.environ, **(self.env or {})}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() - started > 30:
                raise RuntimeError(f"did not start: {' '.join(self.args)}")
            time.sleep(0.005)
        return time.monotonic() - started

    def backlog(self) -> int:
        """live-bridge's deliveries pending or in flight, from its /metrics."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith(("live_bridge_pending{", "live_bridge_in_flight{"))
        )

    def drain(self, timeout: float = 180.0) -> None:
        """Wait until live-bridge has delivered what it acknowledged, so its backlog does not
        take CPU from whatever is measured next."""
        deadline = time.monotonic() + timeout
        while self.backlog() and time.monotonic() < deadline:
            time.sleep(0.5)

    def rss(self) -> int:
        """The process's resident memory, with its children's (a delivery process)."""
        assert self.process is not None
        process = psutil.Process(self.process.pid)
        return sum(int(p.memory_info().rss) for p in (process, *process.children(True)))

    def pss(self) -> int:
        """The same, proportional: a page the process shares with its children (libpython's,
        pydantic-core's, OpenSSL's) counted once between them, not once each."""
        assert self.process is not None
        process = psutil.Process(self.process.pid)
        return sum(int(p.memory_full_info().pss) for p in (process, *process.children(True)))

    def thread_cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far: the main thread's (the event loop), all its others' together
        (for live-bridge, its SQLite writer), and its children's (a delivery process)."""
        assert self.process is not None
        pid = self.process.pid
        main = other = children = 0.0
        process = psutil.Process(pid)
        for thread in process.threads():
            used = thread.user_time + thread.system_time
            if thread.id == pid:
                main += used
            else:
                other += used
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                children += times.user + times.system
        return main, other, children

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        stop = threading.Event()

        def sample() -> None:
            n = 0
            while not stop.wait(0.05):
                with contextlib.suppress(psutil.Error):
                    self.peak_rss = max(self.peak_rss, self.rss())
                    if n % 10 == 0:  # reads smaps: every half second is enough, and cheaper
                        self.peak_pss = max(self.peak_pss, self.pss())
                n += 1

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def uvicorn_app(app: str, port: int, env: dict[str, str] | None = None) -> Proc:
    args = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning",
            "--no-access-log"]  # fmt: skip
    return Proc(args, port, env, ready_path=None)


def bridge(
    directory: Path, channels: str, routes: str, extra: str = "",
    store: str = 'path = "bridge.db"', name: str = "config.toml",
) -> Proc:  # fmt: skip
    """live-bridge serving `directory/name`; `store` is the [store] table's body."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / name
    config.write_text(
        f"[server]\nport = {port}\n[tencent]\nsdk_app_id = 1400000000\n"
        f'callback_token = "{TOKEN}"\n'
        f'[store]\n{store}\n[templates]\ndir = "{ROOT / "templates"}"\n'
        f"{extra}\n{channels}\n{routes}"
    )
    args = [sys.executable, "-m", "bridge", "serve", "--config", str(config), "--log-level",
            "warning", "--no-access-log"]  # fmt: skip
    return Proc(args, port)


def url_of(proc: Proc) -> str:
    return proc.callback_url
