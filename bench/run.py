"""`python -m bench.run`: the four benchmarks, side by side in one run, into docs/benchmarks.md.

Every contender runs as its own process under the same uvicorn, on loopback; pairs alternate
round by round and the report gives medians and the ratio measured in this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from bench.load import WrkResult, burst, fixed_rate, percentile, wrk
from bench.report import Report

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))  # for the Slack stand-in the tests use
from tests.slack_standin import SlackStandIn  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SUSTAIN_S = int(os.environ.get("BENCH_SUSTAIN_S", "30"))


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
    """A server process; `peak_rss` is sampled while `sampling()` is active."""

    def __init__(
        self, args: list[str], port: int, env: dict[str, str] | None = None,
        ready_path: str | None = "/readyz",
    ) -> None:  # fmt: skip
        self.args, self.port, self.env, self.ready_path = args, port, env, ready_path
        self.callback_url = f"http://127.0.0.1:{port}/tencent/callback"
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0

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

    def rss(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                with contextlib.suppress(psutil.Error):
                    self.peak_rss = max(self.peak_rss, self.rss())

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


def bridge(directory: Path, channels: str, routes: str, extra: str = "") -> Proc:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.toml"
    config.write_text(
        f"[server]\nport = {port}\n[tencent]\nsdk_app_id = 1400000000\n"
        f'[store]\npath = "bridge.db"\n[templates]\ndir = "{ROOT / "templates"}"\n'
        f"{extra}\n{channels}\n{routes}"
    )
    args = [sys.executable, "-m", "bridge", "serve", "--config", str(config), "--log-level",
            "warning", "--no-access-log"]  # fmt: skip
    return Proc(args, port)


def url_of(proc: Proc) -> str:
    return proc.callback_url


def ack_ceiling(work: Path, report: Report, sink_url: str) -> None:
    hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink_url}"\nmax_in_flight = 16\n'
    route = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    bare = uvicorn_app("bench.apps:bare", free_port())
    live = bridge(work / "ack", hook, route)
    bare.start()
    live.start()
    time.sleep(1)
    report.idle_rss_mb = live.rss() / 2**20
    try:
        results: dict[str, list[WrkResult]] = {"bare": [], "bridge": []}
        for _ in range(ROUNDS):  # alternating, so drift hits both alike
            results["bare"].append(wrk(url_of(bare), SECONDS))
            with live.sampling():
                results["bridge"].append(wrk(url_of(live), SECONDS))
        report.saturation = results
        report.peak_rss_mb = live.peak_rss / 2**20
        fixed: dict[str, list[list[float]]] = {"bare": [], "bridge": []}
        for _ in range(ROUNDS):
            for name, proc in (("bare", bare), ("bridge", live)):
                sent = asyncio.run(fixed_rate(url_of(proc), 1000, SECONDS / 2, f"fixed-{name}"))
                fixed[name].append([(s.acked - s.started) * 1000 for s in sent if s.status == 200])
        report.fixed_rate = fixed
    finally:
        bare.stop()
        live.stop()


def handwritten_vs_bridge(work: Path, report: Report) -> None:
    for name in ("handwritten", "bridge"):
        with SlackStandIn(rate_per_s=1.0, burst=3, latency_s=0.3) as slack:
            hook = slack.add_webhook()
            if name == "handwritten":
                proc = uvicorn_app(
                    "bench.apps:handwritten", free_port(), {"SLACK_WEBHOOK_URL": hook}
                )
            else:
                channel = f'[channels.slack]\ntype = "slack"\nwebhook_url = "{hook}"\n'
                proc = bridge(
                    work / "slack", channel, '[[routes]]\nname = "all"\nchannels = ["slack"]\n'
                )
            proc.start()
            try:
                sent = asyncio.run(burst(url_of(proc), 200, 50, f"b2{name}"))
                rooms = {s.room for s in sent if s.status == 200}
                deadline = time.monotonic() + 90

                def arrived(rooms: set[str] = rooms, slack: SlackStandIn = slack) -> int:
                    text = json.dumps([p.payload for p in slack.posted])
                    marks = ('"', "*", ":", " ")  # how a room ends in a message or a digest
                    return sum(1 for room in rooms if any(room + m in text for m in marks))

                while arrived() < len(rooms) and time.monotonic() < deadline:
                    if name == "handwritten":
                        break  # nothing more will come: it posted inside the request
                    time.sleep(0.5)
                report.slack[name] = {
                    "acked": len(rooms),
                    "in_slack": arrived(),
                    "messages": len(slack.posted),
                    "rejected_429": slack.rejected_429,
                    "ack_p50_ms": percentile([(s.acked - s.started) * 1000 for s in sent], 50),
                    "ack_p99_ms": percentile([(s.acked - s.started) * 1000 for s in sent], 99),
                    "over_2s": sum(1 for s in sent if s.acked - s.started > 2.0),
                }
            finally:
                proc.stop()


def delivery(work: Path, report: Report, sink: str) -> None:
    hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink}/hook"\nmax_in_flight = 16\n'
    live = bridge(work / "delivery", hook, '[[routes]]\nname = "all"\nchannels = ["sink"]\n')
    live.start()

    def sink_log() -> list[tuple[str, float]]:
        with urllib.request.urlopen(f"{sink}/log", timeout=30) as reply:  # noqa: S310
            return [(r, t) for r, t in json.loads(reply.read())]

    def reset() -> None:
        urllib.request.urlopen(urllib.request.Request(f"{sink}/reset", method="POST"))  # noqa: S310

    try:
        reset()
        started = time.monotonic()
        acked = wrk(url_of(live), SUSTAIN_S, connections=16)
        ended = time.monotonic()
        in_window = [t for _, t in sink_log() if started <= t <= ended]
        report.sustained = {
            "acked_per_s": acked.rps,
            "delivered_per_s": len(in_window) / (ended - started),
        }
        time.sleep(2)
        reset()
        sent = asyncio.run(fixed_rate(url_of(live), 500, SECONDS, "lat"))
        acks = {s.room: s.acked for s in sent if s.status == 200}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(sink_log()) < len(acks):
            time.sleep(0.2)
        arrived = {room: t for room, t in sink_log()}
        latency = [(arrived[r] - a) * 1000 for r, a in acks.items() if r in arrived]
        report.latency_500 = {
            "acked": len(acks), "delivered": len(latency),
            "p50_ms": percentile(latency, 50), "p99_ms": percentile(latency, 99),
        }  # fmt: skip
    finally:
        live.stop()


def startup(work: Path, report: Report, sink_url: str) -> None:
    times = []
    for n in range(5):
        hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink_url}"\n'
        proc = bridge(work / f"start{n}", hook, '[[routes]]\nname = "all"\nchannels = ["sink"]\n')
        times.append(proc.start())
        proc.stop()
    report.startup_s = times


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())  # fmt: skip
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[
        0
    ]
    return {
        "cpu": cpu, "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "os": platform.platform(),
        "wrk": wrk_version.split(" Copyright")[0].strip(),  # the version, not the notice
    }  # fmt: skip


def main() -> None:
    report = Report(machine=machine(), rounds=ROUNDS, seconds=SECONDS, sustain_s=SUSTAIN_S)
    sink_port = free_port()
    sink = uvicorn_app("bench.sink:app", sink_port)
    sink.start()
    sink_url = f"http://127.0.0.1:{sink_port}"
    steps: list[tuple[str, Callable[[], None]]] = []
    with tempfile.TemporaryDirectory(prefix="live-bridge-bench-") as tmp:
        work = Path(tmp)
        steps = [
            ("ack ceiling", lambda: ack_ceiling(work, report, f"{sink_url}/hook")),
            ("hand-written receiver", lambda: handwritten_vs_bridge(work, report)),
            ("delivery", lambda: delivery(work, report, sink_url)),
            ("start-up", lambda: startup(work, report, f"{sink_url}/hook")),
        ]
        try:
            for name, step in steps:
                print(f"bench: {name} …", flush=True)
                step()
        finally:
            sink.stop()
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text(report.markdown())
    print(report.summary())
    print(f"bench: written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
