"""Prometheus metrics, one registry per running bridge (prometheus-client).

Counters and histograms are updated where things happen (the receiver, the worker, reloads);
the per-channel gauges (pending, in flight, dead, oldest pending age) are read from the store
when `/metrics` is scraped. Label values are bounded: commands outside Tencent's table count as
"other", so a caller cannot grow the series without limit. No label or value carries a secret.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bridge import log_writer
from bridge.events import MODELS
from bridge.outcomes import delivery_latency
from bridge.store import ChannelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


def command_label(command: str) -> str:
    return command if command in MODELS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.callbacks = Counter(
            "live_bridge_callbacks", "Callbacks received, by command and result.",
            ["command", "result"], registry=r,
        )  # fmt: skip
        self.refused_early = Counter(
            "live_bridge_requests_refused_total",
            "Requests the HTTP layer refused before any reached the app (bridge.protocol), by"
            " the status of the packet it wrote; 0: a pipelining client cut off unanswered.",
            ["status"], registry=r,
        )  # fmt: skip
        self.ack_latency = Histogram(
            "live_bridge_ack_latency_seconds", "From request start to the reply packet.",
            buckets=ACK_BUCKETS, registry=r,
        )  # fmt: skip
        self.deliveries = Counter(
            "live_bridge_deliveries",
            "Delivery outcomes, by channel and outcome (a digest's send: one for each event).",
            ["channel", "outcome"], registry=r,
        )  # fmt: skip
        self.delivery_latency = Histogram(
            "live_bridge_delivery_latency_seconds", "From acknowledgement to delivery.",
            ["channel"], buckets=DELIVERY_BUCKETS, registry=r,
        )  # fmt: skip
        self.pending = Gauge("live_bridge_pending", "Deliveries waiting.", ["channel"], registry=r)
        self.in_flight = Gauge(
            "live_bridge_in_flight", "Deliveries being sent.", ["channel"], registry=r
        )
        self.dead = Gauge("live_bridge_dead", "Dead letters.", ["channel"], registry=r)
        self.oldest_pending = Gauge(
            "live_bridge_oldest_pending_age_seconds", "Age of the oldest pending delivery.",
            ["channel"], registry=r,
        )  # fmt: skip
        self.delivery_restarts = Counter(
            "live_bridge_delivery_process_restarts",
            "Times the delivery process ended unasked and was started again.", registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "live_bridge_config_reloads", "Configuration reloads, by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.log_lines_dropped = Counter(
            "live_bridge_log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough (bridge/log_writer.py).",
            registry=r,
        )  # fmt: skip
        self.tasks = Gauge(
            "live_bridge_event_loop_tasks",
            "Tasks on the serving process's event loop at the scrape: callbacks being handled,"
            " lanes, timers. One that climbs with the traffic or the reloads is a leak.",
            registry=r,
        )  # fmt: skip
        self._log_drops_counted = 0
        self._rendering = threading.Lock()
        self._callback_series: dict[tuple[str | None, str], Counter] = {}

    def callback(self, command: str | None, result: str, seconds: float) -> None:
        # labels() builds and locks on every call; the series are few (bounded labels), so
        # each is looked up once.
        # Keyed by the label, never the command: a caller's command may be 250 KB of anything.
        key = (command_label(command or ""), result)
        series = self._callback_series.get(key)
        if series is None:
            series = self.callbacks.labels(*key)
            if len(self._callback_series) < 1000:  # commands come from callers
                self._callback_series[key] = series
        series.inc()
        self.ack_latency.observe(seconds)

    def request_refused(self, status: int) -> None:
        self.refused_early.labels(str(status)).inc()

    def outcome(self, channel: str, outcome: str, received_at: float | None = None) -> None:
        self.count_outcome(channel, outcome, delivery_latency(outcome, received_at))

    def count_outcome(self, channel: str, outcome: str, latency: float | None) -> None:
        self.deliveries.labels(channel, outcome).inc()
        if latency is not None:
            self.delivery_latency.labels(channel).observe(latency)

    def render(self, stats: Sequence[ChannelStats], channels: Sequence[str]) -> bytes:
        """The exposition text, with the store's per-channel numbers as of now. One at a time:
        scrapes render on threads, and one clearing the gauges must not meet another's text."""
        with self._rendering:
            return self._render(stats, channels)

    def _render(self, stats: Sequence[ChannelStats], channels: Sequence[str]) -> bytes:
        now = time.time()
        dropped = log_writer.dropped_total()
        if dropped > self._log_drops_counted:  # counted where it happens, for every registry
            self.log_lines_dropped.inc(dropped - self._log_drops_counted)
            self._log_drops_counted = dropped
        by_name = {s.channel: s for s in stats}
        # A channel gone from the config and the store goes from these too, not stuck at its
        # last value (a dead-letter alert that never clears). Nothing renders in between.
        for gauge in (self.pending, self.in_flight, self.dead, self.oldest_pending):
            gauge.clear()
        for name in sorted({*channels, *by_name}):
            s = by_name.get(name)
            self.pending.labels(name).set(s.pending if s else 0)
            self.in_flight.labels(name).set(s.in_flight if s else 0)
            self.dead.labels(name).set(s.dead if s else 0)
            oldest = s.oldest_pending_at if s else None
            self.oldest_pending.labels(name).set(max(0.0, now - oldest) if oldest else 0)
        return generate_latest(self.registry)
