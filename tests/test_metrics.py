from __future__ import annotations

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
