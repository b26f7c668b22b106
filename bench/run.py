"""`python -m bench.run`: the six benchmarks, side by side in one run, into docs/benchmarks.md.

Every contender runs as its own process under the same uvicorn, on loopback; pairs alternate
round by round and the report gives medians and the ratio measured in this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from bench.claims import CLAIM_BACKLOGS, claim_costs
from bench.load import Sent, WrkResult, burst, fixed_rate, percentile, wrk
from bench.procs import ROOT, Proc, bridge, free_port, url_of, uvicorn_app
from bench.replicas import compare, server_problem
from bench.report import Report

sys.path.insert(0, str(ROOT))  # for the Slack stand-in the tests use
from tests.slack_standin import SlackStandIn

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SUSTAIN_S = int(os.environ.get("BENCH_SUSTAIN_S", "30"))
OWN_PROCESS = "[delivery]\nown_process = true\n"


def ack_ceiling(work: Path, report: Report, sink_url: str) -> None:
    hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink_url}"\nmax_in_flight = 16\n'
    route = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    bare = uvicorn_app("bench.apps:bare", free_port())
    live = bridge(work / "ack", hook, route)
    # The same, delivering from a process of its own ([delivery] own_process).
    own = bridge(work / "ack-own", hook, route, OWN_PROCESS)
    # The same at [store] sync = "normal": commits left to the OS, no disk flush per commit.
    normal = bridge(work / "ack-normal", hook, route, store='path = "bridge.db"\nsync = "normal"')
    # Receiving only: verified, parsed and committed, but no route matches, so nothing is
    # rendered or delivered. What acknowledging costs apart from delivering in the same process.
    unrouted = '[[routes]]\nname = "none"\ncommands = ["Live.NoSuchCommand"]\nchannels = ["sink"]\n'
    receive = bridge(work / "ack-receive", hook, unrouted)
    # The floor of a durable acknowledgement: append the body to SQLite, commit, answer.
    journal = uvicorn_app("bench.apps:journal", free_port(), {"JOURNAL_DB": str(work / "j.db")})
    servers = (bare, live, own, normal, receive, journal)
    for server in servers:
        server.start()
    time.sleep(1)
    report.idle_rss_mb = live.rss() / 2**20
    try:
        results: dict[str, list[WrkResult]] = {
            name: [] for name in ("bare", "journal", "bridge", "own", "receive")
        }
        # Every round samples its server's memory, not only live-bridge's: the sampler's own CPU
        # (about 5% of a core) then weighs on both sides of each ratio alike.
        for _ in range(ROUNDS):  # alternating, so drift hits both alike
            with bare.sampling(), cpu_share(report.threads, "bare", bare):
                results["bare"].append(wrk(url_of(bare), SECONDS))
            with journal.sampling(), cpu_share(report.threads, "journal", journal):
                results["journal"].append(wrk(url_of(journal), SECONDS))
            with live.sampling(), cpu_share(report.threads, "bridge", live):
                results["bridge"].append(wrk(url_of(live), SECONDS))
            live.drain()
            with own.sampling(), cpu_share(report.threads, "own", own):
                results["own"].append(wrk(url_of(own), SECONDS))
            own.drain()
            with receive.sampling(), cpu_share(report.threads, "receive", receive):
                results["receive"].append(wrk(url_of(receive), SECONDS))
        report.saturation = results
        report.peak_rss_mb = live.peak_rss / 2**20
        report.peak_rss_own_mb = own.peak_rss / 2**20
        report.peak_pss_own_mb = own.peak_pss / 2**20
        contenders = (
            ("bare", bare), ("journal", journal), ("bridge", live), ("own", own),
            ("normal", normal), ("receive", receive),
        )  # fmt: skip
        fixed: dict[str, list[list[float]]] = {name: [] for name, _ in contenders}
        for n in range(ROUNDS):
            for name, proc in contenders:
                prefix = f"fixed{n}-{name}"  # new rooms each round: never a duplicate
                sent = asyncio.run(fixed_rate(url_of(proc), 1000, SECONDS / 2, prefix))
                if proc not in (bare, journal):
                    proc.drain()
                fixed[name].append(ack_latencies_ms(sent))
            report.disk.append(disk_flushes(work, SECONDS / 2))
        report.fixed_rate = fixed
    finally:
        for server in servers:
            server.stop()


def ack_latencies_ms(sent: list[Sent]) -> list[float]:
    """Each callback's latency from when it was due; one refused (a FAIL packet) or never
    answered counts as infinitely late rather than leaving the percentiles, so that a p99 is
    never met by refusing the slowest one percent."""
    return [(s.acked - s.started) * 1000 if s.status == 200 else math.inf for s in sent]


@contextlib.contextmanager
def cpu_share(into: dict[str, list[tuple[float, ...]]], name: str, proc: Proc) -> Iterator[None]:
    """The share of a core `proc`'s main thread, its other threads and its children used
    meanwhile, and the cores the whole machine kept busy (wrk and the sink included)."""
    started, before = time.monotonic(), (*proc.thread_cpu(), busy_cpu())
    yield
    elapsed, after = time.monotonic() - started, (*proc.thread_cpu(), busy_cpu())
    shares = tuple((a - b) / elapsed for a, b in zip(after, before, strict=True))
    into.setdefault(name, []).append(shares)


def busy_cpu() -> float:
    """CPU seconds the machine has spent on anything but idling and waiting for the disk."""
    times = psutil.cpu_times()
    busy: float = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    return busy


def disk_flushes(work: Path, seconds: float) -> list[float]:
    """The disk alone, as SQLite's writer uses it at about this load: 20 KB written over a
    preallocated file, then flushed (fdatasync), a thousand times a second; ms per flush."""
    path = work / "flushes"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, 8 << 20)
        block, offset, times = b"x" * 20_000, 0, []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.pwrite(fd, block, offset)
            offset = (offset + len(block)) % (8 << 20)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
            time.sleep(0.001)
        return times
    finally:
        os.close(fd)
        path.unlink()


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


def delivery(work: Path, report: Report, sink: str, extra: str = "") -> None:
    """Benchmark 3 for the default config, or with `extra` (the delivery process)."""
    hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink}/hook"\nmax_in_flight = 16\n'
    route = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    live = bridge(work / f"delivery{len(extra)}", hook, route, extra)
    live.start()
    key = "own" if extra else "bridge"

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
        report.sustained[key] = {
            "acked_per_s": acked.rps,
            "delivered_per_s": len(in_window) / (ended - started),
        }
        live.drain()
        reset()
        sent = asyncio.run(fixed_rate(url_of(live), 500, SECONDS, "lat"))
        acks = {s.room: s.acked for s in sent if s.status == 200}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(sink_log()) < len(acks):
            time.sleep(0.2)
        arrived = {room: t for room, t in sink_log()}
        latency = [(arrived[r] - a) * 1000 for r, a in acks.items() if r in arrived]
        report.latency_500[key] = {
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


def replicas(work: Path, report: Report, sink_url: str) -> None:
    report.replicas_skipped = server_problem()
    if report.replicas_skipped is None:
        report.replicas = compare(work, sink_url, ROUNDS, SECONDS)


def claims(work: Path, report: Report) -> None:
    report.claims = claim_costs(work / "claims.db", CLAIM_BACKLOGS)


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
            ("delivery, own process", lambda: delivery(work, report, sink_url, OWN_PROCESS)),
            ("start-up", lambda: startup(work, report, f"{sink_url}/hook")),
            ("replicas on PostgreSQL", lambda: replicas(work, report, f"{sink_url}/hook")),
            ("claims against a backlog", lambda: claims(work, report)),
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
