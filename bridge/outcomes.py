"""What the worker counts of each attempt, apart from where it is counted: the serving
process's Prometheus registry (`bridge.metrics`) or a delivery process's report to it
(`bridge.deliver`), which so loads no prometheus_client."""

from __future__ import annotations

import time
from typing import Protocol


class Outcomes(Protocol):
    """Where the worker counts what became of each attempt: the serving process's `Metrics`,
    or a delivery process's report to it (`bridge.deliver`)."""

    def outcome(self, channel: str, outcome: str, received_at: float | None = None) -> None: ...


def delivery_latency(outcome: str, received_at: float | None) -> float | None:
    """Seconds from acknowledgement to now, for an attempt that delivered; else None."""
    if outcome == "delivered" and received_at is not None:
        return max(0.0, time.time() - received_at)
    return None
