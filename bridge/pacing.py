"""Pacing a channel before the far end has to say no: GCRA and a Retry-After block.

`Pacer` is a token bucket (`rate_per_s`, `burst`) kept as a theoretical arrival time (GCRA).
`wait()` returns when one more message may go out and reserves it; `done()` is called when the
far end has answered and counts the message again from then, because the far end counted it on
arrival, which is after we sent it and before its answer. The answers run a bucket of their own
(`_answered`), as if each message had arrived when it was answered: the far end's, on the real
arrivals, can be no further ahead, so our schedule, the later of the two, never runs ahead of
it, whatever the network did to the first requests of a burst. Counting each answer apart
matters where several senders share the bucket (channels posting to one Slack channel): their
three messages of a burst were booked at once, and an answer counted as one message from then
fell short of the three. A block set from a 429's Retry-After holds everything until it ends:
`wait()` turns its callers away meanwhile.

Processes that take turns at a channel hand its state on as a `Pace` on the wall clock: `pace()`
gives it, `adopt()` takes whichever of the two states is stricter, and an empty bucket from a
holder that was killed before it could hand its state on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bridge.store import UNKNOWN_TAT, Pace

# The longest block a 429 sets: the senders cap its Retry-After (bridge.channels.http).
LONGEST_BLOCK_S = 3600.0


class Pacer:
    def __init__(
        self, rate_per_s: float | None, burst: int = 1,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.retune(rate_per_s, burst)
        self._clock = clock
        self._wall = wall
        self._tat = clock()  # theoretical arrival time of the next message: the bucket is full
        self._answered = self._tat  # the same, counting each message when it was answered
        self._blocked_until = 0.0  # on the same clock
        self.unasked = 0  # 429s in a row that said not how long to wait (lane.py)
        self._lock = asyncio.Lock()

    def retune(self, rate_per_s: float | None, burst: int = 1) -> None:
        """Pace at a new rate and burst from now on. What was sent and any block stay: a reload
        must not hand out a full bucket the far end has not refilled, nor lift its block."""
        self._interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self._tolerance = (burst - 1) * self._interval  # how far ahead a burst may run

    def block(self, seconds: float) -> None:
        """Nothing goes out for `seconds` (a 429's Retry-After); the bucket refills from empty
        meanwhile, so what was allowed before the 429 is not spent again at once."""
        now = self._clock()
        self._blocked_until = max(self._blocked_until, now + seconds)
        self._tat = max(self._tat, now + self._tolerance + self._interval)

    def pace(self) -> Pace:
        """This pacer's state on the wall clock, for the next process to send to the channel."""
        now = self._clock()
        shift = self._wall() - now
        return Pace(
            tat=self._tat + shift if self._interval else 0.0,
            blocked_until=self._blocked_until + shift if self._blocked_until > now else 0.0,
        )

    def adopt(self, pace: Pace) -> None:
        """Continue from what another process left (Pace(0, 0): nothing), or from our own state
        if that is stricter: neither process's messages are forgotten. Nothing is taken further
        ahead than a pacer ever sets it: a state saved before the wall clock went back would
        otherwise hold the channel for the size of the step."""
        now = self._clock()
        shift = now - self._wall()
        latest = now + self._tolerance + self._interval  # wait(), done() and block() at most
        if pace.tat == UNKNOWN_TAT:
            # Its last holder was killed while sending: the far end's bucket may be empty now.
            self._tat = max(self._tat, latest)
        elif pace.tat and self._interval:
            self._tat = max(self._tat, min(pace.tat + shift, latest))
        if pace.blocked_until:
            latest = now + LONGEST_BLOCK_S
            self._blocked_until = max(self._blocked_until, min(pace.blocked_until + shift, latest))

    def blocked_for(self) -> float:
        """Seconds until the block ends; 0 when not blocked."""
        return max(0.0, self._blocked_until - self._clock())

    def delay(self) -> float:
        """Seconds until one more message may go out."""
        now = self._clock()
        pause = self._blocked_until - now
        if self._interval:
            pause = max(pause, self._tat - self._tolerance - now)
        return max(0.0, pause)

    async def wait(self) -> bool:
        """Returns when one more message may go out, and reserves it; or False, reserving
        nothing, as soon as a block is on: whoever waits holds claimed deliveries, whose lease a
        long Retry-After outlasts, so it gives them back rather than wait the block out."""
        async with self._lock:  # concurrent senders of one channel queue here, in order
            while (pause := self.delay()) > 0:  # waiting on the clock
                if self.blocked_for() > 0:
                    return False
                await asyncio.sleep(pause)
            if self._interval:
                self._tat = max(self._tat, self._clock()) + self._interval
            return True

    def done(self) -> None:
        """The far end has answered a message `wait()` let through."""
        if self._interval:
            self._answered = max(self._answered, self._clock()) + self._interval
            self._tat = max(self._tat, self._answered)
