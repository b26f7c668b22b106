"""The benchmark report: figures in, docs/benchmarks.md out (medians and in-run ratios)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import WrkResult, median, percentile
from bench.replicas import CONNECTIONS

NAN = float("nan")
NOTES = Path(__file__).parent / "notes.md"  # profiling findings, carried into every report
TARGETS = {
    "throughput_ratio": 0.5, "p99_at_1000_ms": 10.0, "deliveries_per_s": 1000.0,
    "rss_mb": 100.0, "startup_s": 1.0,
}  # fmt: skip


@dataclass
class Report:
    machine: dict[str, str]
    rounds: int
    seconds: int
    sustain_s: int
    saturation: dict[str, list[WrkResult]] = field(default_factory=dict)
    fixed_rate: dict[str, list[list[float]]] = field(default_factory=dict)
    slack: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "bridge" (the default config) and "own" ([delivery] own_process): figure: value
    sustained: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_500: dict[str, dict[str, float]] = field(default_factory=dict)
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_rss_own_mb: float = 0.0  # both processes
    peak_pss_own_mb: float = 0.0  # both processes, shared pages counted once
    startup_s: list[float] = field(default_factory=list)
    replicas: dict[str, list[WrkResult]] = field(default_factory=dict)  # sqlite, pg1, pg2
    replicas_skipped: str | None = None
    disk: list[list[float]] = field(default_factory=list)  # ms per flush, one list a round
    claims: dict[int, dict[str, float]] = field(default_factory=dict)  # backlog: query: ms
    # contender: (main thread, other threads, child processes, the whole machine) share of a
    # core under wrk, one tuple a round
    threads: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)

    def _sat(self, name: str, attr: str) -> float:
        return median([getattr(r, attr) for r in self.saturation.get(name, [])])

    def _fixed(self, name: str, pct: float) -> float:
        return median([percentile(run, pct) for run in self.fixed_rate.get(name, [])])

    def figures(self) -> dict[str, float]:
        """Each target's figure for the default config, then with `own_process` ("/own")."""
        bare = self._sat("bare", "rps")
        figures: dict[str, float] = {}
        for name, suffix in (("bridge", ""), ("own", "/own")):
            figures |= {
                f"throughput_ratio{suffix}": self._sat(name, "rps") / bare if bare else NAN,
                f"p99_at_1000_ms{suffix}": self._fixed(name, 99),
                f"deliveries_per_s{suffix}": self.sustained.get(name, {}).get(
                    "delivered_per_s", NAN
                ),
                f"rss_mb{suffix}": self.peak_rss_own_mb if suffix else self.peak_rss_mb,
            }
        return figures | {"startup_s": median(self.startup_s)}

    def summary(self) -> str:
        f = self.figures()
        lines = []
        for key, value in f.items():
            base = key.removesuffix("/own")
            target = TARGETS[base]
            good = (
                value >= target
                if base in ("throughput_ratio", "deliveries_per_s")
                else value <= target
            )
            lines.append(
                f"{key:22} {value:10.3f}   target {target:<8} {'met' if good else 'MISSED'}"
            )
        return "\n".join(lines)

    def _disk(self, pct: float) -> float:
        return median([percentile(run, pct) for run in self.disk])

    def _claims_section(self) -> str:
        rows = [
            f"| {backlog:,} | {c['claim']:.2f} | {c['due']:.2f} | {c['claim_before']:.2f} |"
            for backlog, c in sorted(self.claims.items())
        ]
        return (
            "| deliveries waiting | claim ms | due channels ms | claim before schema 4 ms |\n"
            "|---|---|---|---|\n" + "\n".join(rows)
        )

    def _threads(self, name: str) -> str:
        shares = self.threads.get(name, [])
        main, other, child, machine = (
            median([s[i] * 100 for s in shares if len(s) > i]) for i in range(4)
        )
        text = f"event loop {main:.0f}%, writer {other:.0f}%"
        if child > 0.5:
            text += f", delivery process {child:.0f}%"
        return f"{text}, {main + other + child:.0f}% in all; the machine {machine:.0f}% busy"

    def _sat_row(self, label: str, name: str) -> str:
        rps, p50, p99 = (self._sat(name, a) for a in ("rps", "p50_ms", "p99_ms"))
        return f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} |"

    def _replica(self, name: str, attr: str) -> float:
        return median([getattr(r, attr) for r in self.replicas.get(name, [])])

    def _replicas_section(self) -> str:
        if self.replicas_skipped is not None or not self.replicas:
            return f"Not measured in this run: {self.replicas_skipped or 'not run'}."
        rows = []
        for label, name in (("SQLite, one process", "sqlite"),
                            ("PostgreSQL, one replica", "pg1"),
                            ("PostgreSQL, two replicas", "pg2")):  # fmt: skip
            rps, p50, p99 = (self._replica(name, a) for a in ("rps", "p50_ms", "p99_ms"))
            per_round = ", ".join(f"{r.rps:.0f}" for r in self.replicas[name])
            rows.append(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {per_round} |")
        sqlite, one, two = (self._replica(n, "rps") for n in ("sqlite", "pg1", "pg2"))
        return (
            "| | req/s (median) | p50 ms | p99 ms | per round |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
            + f"\n\nPostgreSQL / SQLite for one process: **{one / sqlite:.2f}**; two replicas /"
            f" one on PostgreSQL: **{two / one:.2f}**."
        )

    def _delivery_row(self, label: str, name: str) -> str:
        s, lat = self.sustained.get(name, {}), self.latency_500.get(name, {})
        return (
            f"| {label} | {s.get('acked_per_s', 0):.0f} | **{s.get('delivered_per_s', 0):.0f}** "
            f"| {lat.get('delivered', 0):.0f} of {lat.get('acked', 0):.0f} "
            f"| {lat.get('p50_ms', 0):.1f} | {lat.get('p99_ms', 0):.1f} |"
        )

    @staticmethod
    def _slack_row(label: str, r: dict[str, Any]) -> str:
        return (
            f"| {label} | {r.get('ack_p50_ms', 0):.0f} | {r.get('ack_p99_ms', 0):.0f} "
            f"| {r.get('over_2s', 0)} | {r.get('in_slack', 0)} of {r.get('acked', 0)} "
            f"| {r.get('messages', 0)} | {r.get('rejected_429', 0)} |"
        )

    def markdown(self) -> str:
        m, f = self.machine, self.figures()
        met = self.summary().splitlines()
        bare_row = self._sat_row("bare Starlette", "bare")
        live_row = self._sat_row("live-bridge", "bridge")
        own_row = self._sat_row("live-bridge, delivering from its own process", "own")
        receive_row = self._sat_row("live-bridge receiving only (no route matches)", "receive")
        receive_ratio = self._sat("receive", "rps") / (self._sat("bare", "rps") or float("nan"))
        journal_row = self._sat_row("journal: append the body to SQLite, commit, answer", "journal")
        journal_ratio = self._sat("journal", "rps") / (self._sat("bare", "rps") or float("nan"))
        hand_row = self._slack_row("hand-written", self.slack.get("handwritten", {}))
        slack_row = self._slack_row("live-bridge", self.slack.get("bridge", {}))
        rss = f"RSS idle {self.idle_rss_mb:.0f} MB, under benchmark 1 **{self.peak_rss_mb:.0f} MB**"
        own_rss = (
            f"**{self.peak_rss_own_mb:.0f} MB** for the two processes together (the target's "
            f"figure; their PSS, which counts the pages they share once, peaked at "
            f"{self.peak_pss_own_mb:.0f} MB)"
        )
        return f"""# Benchmarks

Produced by `make bench` (`python -m bench.run`); every figure below comes from one run on the
machine described, each pair measured side by side and alternating ({self.rounds} rounds), on
loopback. These machines are noisy: the ratios measured within the run are the figures that
count, absolute numbers vary between runs.

**Machine:** {m["cpu"]}, {m["cores"]} cores, {m["memory"]}; Python {m["python"]};
{m["os"]}; {m["wrk"]}.

**Command:** `make bench` (installs wrk from Debian's packages and psutil, then runs
`python -m bench.run`; `BENCH_ROUNDS`, `BENCH_SECONDS`, `BENCH_SUSTAIN_S` shorten it).

## Targets

```
{chr(10).join(met)}
```

## 1. Ack ceiling

`wrk -t2 -c32 -d{self.seconds}s --latency -s bench/post.lua URL` (a different room every request,
so deduplication never short-cuts the work), against a bare Starlette endpoint that reads the
body and returns the OK packet (`bench/apps.py:bare`, under the same uvicorn) and against
live-bridge verifying (`callback_token` set: each callback's `Sign`, as in production),
parsing, routing, rendering and committing each callback with a route to a webhook sink
(delivering in the background while it is measured; the next contender is
measured only once that backlog is delivered). live-bridge runs as configured by default, and
again with `[delivery] own_process = true`: a second process renders and delivers, the serving
process only acknowledges.

| | req/s (median) | p50 ms | p99 ms |
|---|---|---|---|
{bare_row}
{journal_row}
{live_row}
{own_row}
{receive_row}
| **ratio**, live-bridge / bare | **{f["throughput_ratio"]:.2f}** | | |
| **ratio**, with its delivery process / bare | **{f["throughput_ratio/own"]:.2f}** | | |

Receiving only (verify, parse, commit the event; no route matches, so nothing is rendered or
delivered) against the bare endpoint: **{receive_ratio:.2f}**. The journal
(`bench/apps.py:journal`) is the floor of a durable acknowledgement under the same uvicorn: it
appends each body to SQLite through live-bridge's own writer and connection settings (the
requests that wait together in one commit, WAL, `synchronous=FULL`) and answers once that commit
is on disk; it verifies, parses, deduplicates, routes and delivers nothing.
Journal / bare: **{journal_ratio:.2f}**.

Where the CPU goes under wrk, as a share of one core (median of the rounds; the event loop's
thread runs uvicorn, and in live-bridge the receiver and the worker; the other threads are the
SQLite writer, or for the bare endpoint none that work):
- the bare endpoint: {self._threads("bare")};
- the journal: {self._threads("journal")};
- live-bridge: {self._threads("bridge")};
- live-bridge with its delivery process: {self._threads("own")};
- receiving only: {self._threads("receive")}.

Python runs one thread at a time (the GIL), so the two shares add up to about one core: only the
writer's SQLite calls, its commit's flush and the event loop's waits for the network let go of it.
"The machine" is every process together, wrk and the webhook sink included, out of
{int(m["cores"]) * 100}% for its {m["cores"]} cores.

At a fixed 1,000 req/s (open loop, `bench/load.py:fixed_rate`: requests built beforehand, sent
on keep-alive connections, each one's latency counted from when it was due;
{self.seconds / 2:.0f} s per round):
p50 {self._fixed("bridge", 50):.2f} ms, **p99 {f["p99_at_1000_ms"]:.2f} ms** for live-bridge;
the bare endpoint p50 {self._fixed("bare", 50):.2f} ms, p99 {self._fixed("bare", 99):.2f} ms.
With its delivery process, live-bridge gives p50 {self._fixed("own", 50):.2f} ms, **p99
{f["p99_at_1000_ms/own"]:.2f} ms**.
With `[store] sync = "normal"` (commits left to the operating system: they survive the process
being killed, not the machine losing power) live-bridge gives p50 {self._fixed("normal", 50):.2f}
ms, p99 {self._fixed("normal", 99):.2f} ms. Receiving only (no route matches, nothing
delivered): p50 {self._fixed("receive", 50):.2f} ms, p99 {self._fixed("receive", 99):.2f} ms.
The journal: p50 {self._fixed("journal", 50):.2f} ms, p99 {self._fixed("journal", 99):.2f} ms.

The disk alone, measured between those rounds (`bench/run.py:disk_flushes`: 20 KB written and
flushed with fdatasync a thousand times a second, as the writer does at this rate): p50
{self._disk(50):.2f} ms, p99 {self._disk(99):.2f} ms, p99.9 {self._disk(99.9):.2f} ms, slowest
{max((max(r) for r in self.disk if r), default=float("nan")):.1f} ms. Every callback waiting
for a commit waits for its flush: with the default `sync = "full"`, the disk's slowest flushes
are among the slowest acknowledgements; the notes below show that the event loop's own load
weighs more.

Per round (req/s): bare {", ".join(f"{r.rps:.0f}" for r in self.saturation.get("bare", []))};
live-bridge {", ".join(f"{r.rps:.0f}" for r in self.saturation.get("bridge", []))};
with its delivery process {", ".join(f"{r.rps:.0f}" for r in self.saturation.get("own", []))};
receiving only {", ".join(f"{r.rps:.0f}" for r in self.saturation.get("receive", []))};
journal {", ".join(f"{r.rps:.0f}" for r in self.saturation.get("journal", []))}.

## 2. What users write instead

200 owner changes, 50 at a time, against a Slack stand-in (`tests/slack_standin.py`) that answers
in 300 ms and enforces 1 message/s per channel with a burst of 3 (429 with Retry-After beyond).
The hand-written receiver (`bench/apps.py:handwritten`) posts to Slack inside the request;
live-bridge acknowledges after its commit and delivers from the store (paced, digests past 10).

| | ack p50 ms | ack p99 ms | acks over Tencent's 2 s | events in Slack | Slack messages | 429s |
|---|---|---|---|---|---|---|
{hand_row}
{slack_row}

## 3. Delivery

Sustained {self.sustain_s} s: wrk (16 connections) offers callbacks as fast as they are
acknowledged; a webhook channel (`max_in_flight = 16`) delivers to a local sink
(`bench/sink.py`). Then 500 events/s for {self.seconds} s, each event's time from its
acknowledgement to its arrival at the sink. Both for the default config, then with the delivery
process (`[delivery] own_process = true`).

| | acked/s | **delivered/s** in the window | delivered at 500/s | ack → delivery p50 ms | p99 ms |
|---|---|---|---|---|---|
{self._delivery_row("live-bridge", "bridge")}
{self._delivery_row("live-bridge with its delivery process", "own")}

## 4. Footprint

live-bridge {rss}; with its delivery process, {own_rss}.
Start-up to `/readyz` answering 200 (5 starts): median **{f["startup_s"]:.2f} s**
({", ".join(f"{t:.2f}" for t in self.startup_s)}).

## 5. Several replicas on PostgreSQL

The ack ceiling again (wrk, {CONNECTIONS} connections in all, route to the webhook sink),
alternating each round: live-bridge on SQLite; on PostgreSQL (`[store] url`, the local server,
each contender a database of its own, created and dropped by the run) with one replica; and two
replicas on one database, each sent half of the connections by its own wrk, as behind a load
balancer (throughput added up, latency the worse of the two). Every replica also delivers what
it acknowledges, as in benchmark 1, and on this 2-core machine the replicas, PostgreSQL, wrk and
the sink all share the same two cores.

{self._replicas_section()}

## 6. Claims against a backlog

What the SQLite store's claim (`LIMIT 64`) and due-channels query cost with a backlog waiting on
one channel (`bench/claims.py`, median of 20 runs each), beside the claim query used until
schema 4 (one condition with OR, which sorted every claimable row). The worker runs both for
every batch inside the writer's transaction, so every callback waits for them too.

{self._claims_section()}

{NOTES.read_text() if NOTES.exists() else ""}"""
