from __future__ import annotations

import time

import pytest

from bridge.outcomes import delivery_latency


@pytest.mark.parametrize("outcome", ["retry", "dead", "permanent"])
def test_only_a_delivery_has_a_latency(outcome: str) -> None:
    assert delivery_latency(outcome, time.time() - 5) is None


def test_a_delivery_without_its_receipt_time_has_none() -> None:
    assert delivery_latency("delivered", None) is None


def test_a_delivery_latency_is_seconds_since_receipt_never_negative() -> None:
    latency = delivery_latency("delivered", time.time() - 5)
    assert latency is not None and 5 <= latency < 6
    assert delivery_latency("delivered", time.time() + 60) == 0.0
