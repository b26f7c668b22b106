"""Steps of the wall clock, as this process sees them, for judging leases.

Leases (a claimed delivery's, a channel's) are on the wall clock, shared by the processes on one
store. A step forward (NTP, a VM restored from a snapshot) would make every lease taken before it
look run out, and another replica would claim sends that are under way and send them again. So
each process watches its wall clock against its monotonic clock: after a step forward it judges
leases by the clock as it was (`leases_at`) until the longest lease taken before the step has run
out. A step back needs nothing here: leases only last longer (bridge.store.CLOCK_STEP_S for what
is due).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("bridge.worker")  # the worker's log lines, under its name

# A change of the wall clock against the monotonic one larger than this is a step (NTP slews
# smaller differences, at most half a millisecond a second).
JUMP_S = 1.0


class LeaseClock:
    def __init__(
        self, wall: Callable[[], float] = time.time, ticks: Callable[[], float] = time.monotonic
    ) -> None:
        self._wall = wall
        self._ticks = ticks
        self._offset = wall() - ticks()  # the wall clock's reading less the monotonic one
        self._ahead = 0.0  # how far the wall clock has stepped forward, lately
        self._until = 0.0  # on the monotonic clock: when leases are judged by `now` again
        self.guard_s = 0.0  # the longest lease this process takes (the worker sets it)

    def leases_at(self, now: float) -> float:
        """The time to judge leases by, for a pass or a claim at wall time `now`."""
        ticks = self._ticks()
        offset = self._wall() - ticks
        jump, self._offset = offset - self._offset, offset
        if abs(jump) > JUMP_S:
            self._ahead = max(0.0, self._ahead + jump)
            self._until = ticks + self.guard_s
            log.warning("the wall clock stepped %s by %.1fs", "forward" if jump > 0 else "back",
                        abs(jump))  # fmt: skip
        if ticks >= self._until:
            self._ahead = 0.0
        return now - self._ahead
