from __future__ import annotations

import time

import pytest

from bridge import log_writer
from bridge.metrics import Metrics
from bridge.store import ChannelStats


def test_callback_series_are_kept_by_label_not_by_the_callers_command() -> None:
    metrics = Metrics()
    for n in range(50):
        metrics.callback(f"Live.Unknown{n}" + "x" * 10_000, "accepted", 0.001)
    metrics.callback("Live.CallbackAfterChangeOwner", "accepted", 0.001)
    assert set(metrics._callback_series) == {
        ("other", "accepted"), ("Live.CallbackAfterChangeOwner", "accepted"),
    }  # fmt: skip
    assert (
        metrics.registry.get_sample_value(
            "live_bridge_callbacks_total", {"command": "other", "result": "accepted"}
        )
        == 50
    )


def stats(channel: str, dead: int) -> ChannelStats:
    return ChannelStats(
        channel=channel, pending=0, in_flight=0, dead=dead, delivered=0, oldest_pending_at=None
    )


def test_a_channel_gone_from_config_and_store_leaves_the_gauges() -> None:
    metrics = Metrics()
    text = metrics.render([stats("gone", 1)], ["hook"]).decode()
    assert 'live_bridge_dead{channel="gone"} 1.0' in text
    text = metrics.render([], ["hook"]).decode()
    assert 'channel="gone"' not in text
    assert 'live_bridge_dead{channel="hook"} 0.0' in text


def test_oldest_pending_age_is_seconds_since_the_oldest_pending_delivery() -> None:
    metrics = Metrics()
    before = time.time()
    pending = ChannelStats(
        channel="hook", pending=2, in_flight=0, dead=0, delivered=0,
        oldest_pending_at=before - 30,
    )  # fmt: skip
    metrics.render([pending, stats("quiet", 0)], ["hook", "quiet"])
    after = time.time()
    age = metrics.registry.get_sample_value(
        "live_bridge_oldest_pending_age_seconds", {"channel": "hook"}
    )
    assert age is not None and 30 <= age <= 30 + (after - before)
    quiet = {"channel": "quiet"}
    assert metrics.registry.get_sample_value("live_bridge_oldest_pending_age_seconds", quiet) == 0


@pytest.mark.parametrize(
    ("outcome", "ago_s", "observed"),
    [
        ("delivered", 5.0, True),
        ("delivered", None, False),  # no received_at: counted, but no latency
        ("retry", 5.0, False),
        ("dead", 5.0, False),
    ],
)
def test_delivery_latency_is_seconds_from_acknowledgement_to_delivery(
    outcome: str, ago_s: float | None, observed: bool
) -> None:
    metrics = Metrics()
    before = time.time()
    metrics.outcome("hook", outcome, None if ago_s is None else before - ago_s)
    after = time.time()
    labels = {"channel": "hook"}
    count = metrics.registry.get_sample_value("live_bridge_delivery_latency_seconds_count", labels)
    total = metrics.registry.get_sample_value("live_bridge_delivery_latency_seconds_sum", labels)
    assert (
        metrics.registry.get_sample_value(
            "live_bridge_deliveries_total", {"channel": "hook", "outcome": outcome}
        )
        == 1
    )
    assert (count or 0) == (1 if observed else 0)
    if observed:
        assert ago_s is not None and total is not None
        assert ago_s <= total <= ago_s + (after - before)


def test_log_lines_dropped_are_counted_since_the_process_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log_writer, "_dropped", 7)
    metrics = Metrics()
    assert "live_bridge_log_lines_dropped_total 7.0" in metrics.render([], []).decode()
    monkeypatch.setattr(log_writer, "_dropped", 10)
    assert "live_bridge_log_lines_dropped_total 10.0" in metrics.render([], []).decode()
    assert "live_bridge_log_lines_dropped_total 10.0" in metrics.render([], []).decode()
