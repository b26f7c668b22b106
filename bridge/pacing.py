"""Pacing a channel before the far end has to say no: a token bucket and a Retry-After block.

`Pacer.wait()` returns when one more message may go out: the bucket holds `burst` tokens and
refills at `rate_per_s`; a block set from a 429's Retry-After holds everything until it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Pacer:
    def __init__(
        self, rate_per_s: float | None, burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()
        self._blocked_until = 0.0  # on the same clock
        self._lock = asyncio.Lock()

    def block(self, seconds: float) -> None:
        """Nothing goes out for `seconds` (a 429's Retry-After); the bucket refills from empty
        meanwhile, so what was allowed before the 429 is not spent again at once."""
        now = self._clock()
        self._refill(now)
        self._tokens = 0.0
        self._blocked_until = max(self._blocked_until, now + seconds)

    def blocked_for(self) -> float:
        """Seconds until the block ends; 0 when not blocked."""
        return max(0.0, self._blocked_until - self._clock())

    def _refill(self, now: float) -> None:
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until one message may go out."""
        now = self._clock()
        if now < self._blocked_until:
            return self._blocked_until - now
        if self._rate is None:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    async def wait(self) -> None:
        async with self._lock:  # concurrent senders of one channel queue here, in order
            while (pause := self.delay()) > 0:  # noqa: ASYNC110  # waiting on the clock
                await asyncio.sleep(pause)
            if self._rate is not None:
                self._refill(self._clock())
                self._tokens -= 1.0
