"""LeaseClock: after a step forward of the wall clock, leases are judged by the clock as it was,
for `guard_s` on the monotonic clock; a step back, slow drift and a steady clock change nothing."""

from __future__ import annotations

import pytest

from bridge.clock import LeaseClock

T0 = 1_700_000_000.0


class Clocks:
    def __init__(self) -> None:
        self.wall, self.ticks = T0, 100.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.ticks += seconds


@pytest.mark.parametrize(
    ("steps", "expected_behind"),
    [
        ([], 0.0),  # a steady clock
        ([("run", 30.0)], 0.0),
        ([("step", 3600.0)], 3600.0),  # forward: judged by the clock as it was
        ([("step", 3600.0), ("run", 59.0)], 3600.0),  # within guard_s
        ([("step", 3600.0), ("run", 61.0)], 0.0),  # past it: leases since are the new clock's
        ([("step", -3600.0)], 0.0),  # back: leases only last longer
        ([("step", 3600.0), ("step", -3600.0)], 0.0),  # forward, then put right
        ([("step", 600.0), ("run", 30.0), ("step", 600.0)], 1200.0),  # two steps add up
        ([("step", 0.5)], 0.0),  # under JUMP_S: noise, or NTP's own small steps
        ([("step", 0.5), ("step", 0.5), ("step", 0.5)], 0.0),  # drift, read often
    ],
)
def test_leases_are_judged_by_the_clock_before_a_step_forward(
    steps: list[tuple[str, float]], expected_behind: float
) -> None:
    clocks = Clocks()
    clock = LeaseClock(lambda: clocks.wall, lambda: clocks.ticks)
    clock.guard_s = 60.0
    for kind, seconds in steps:
        if kind == "run":
            clocks.run(seconds)
        else:
            clocks.wall += seconds
        clock.leases_at(clocks.wall)
    assert clock.leases_at(clocks.wall) == pytest.approx(clocks.wall - expected_behind)
