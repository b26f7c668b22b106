"""The delivery worker: claim due deliveries, send them, record delivered / retry / dead.

One lane per channel at a time sends that channel's claimed deliveries in order, so channels never
hold each other up. The worker alone decides what a sender's outcome means: exponential backoff
with jitter for a retry, a block on the whole channel for a 429's Retry-After (the attempt is
given back), a dead letter after a permanent failure or the last attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Mapping

from bridge.channels import Outcome, Result, Sender, retry
from bridge.config import DeliveryConfig
from bridge.store import Claimed, Store, StoreUnavailable

log = logging.getLogger(__name__)

PER_CHANNEL = 16  # deliveries one lane takes per claim
IDLE_POLL_S = 5.0  # a wake-up even with nothing due, for leases that expire
PRUNE_EVERY_S = 60.0


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before attempt `attempt + 1`: doubling from `initial`, capped, jittered."""
    # The exponent is capped: 2 ** 1024 no longer converts to a float, and max_attempts is open.
    base = min(maximum, initial * 2 ** min(attempt - 1, 64))
    return max(initial, random.uniform(base / 2, base))


class Worker:
    def __init__(
        self, store: Store, senders: Mapping[str, Sender], settings: DeliveryConfig
    ) -> None:
        self._store = store
        self._senders = senders
        self._settings = settings
        self._wake = asyncio.Event()
        self._busy: set[str] = set()
        self._blocked: dict[str, float] = {}
        self._lanes: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._last_prune = 0.0

    def wake(self) -> None:
        """Something new may be due: look now instead of at the next poll."""
        self._wake.set()

    def blocked_until(self, channel: str) -> float | None:
        until = self._blocked.get(channel)
        return until if until is not None and until > time.time() else None

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                await self._prune()
                claimed = await self._claim()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                log.error("worker cannot reach the store: %s", exc)
                await self._sleep(min(30.0, 0.5 * 2**failures))
                continue
            if claimed:
                continue
            await self._sleep(await self._idle_delay())

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give lanes `grace_s` to finish. Unfinished sends stay leased in the
        store and are sent again after restart."""
        self._stopping = True
        self._wake.set()
        if self._lanes:
            _, pending = await asyncio.wait(self._lanes, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _claim(self) -> bool:
        now = time.time()
        # Ended blocks are dropped here, so every block _idle_delay sees was one claim skipped.
        self._blocked = {c: until for c, until in self._blocked.items() if until > now}
        exclude = self._busy | self._blocked.keys()
        lease = (self._settings.timeout_s + 5.0) * PER_CHANNEL
        rows = await self._store.claim(now, PER_CHANNEL * 8, PER_CHANNEL, lease, sorted(exclude))
        lanes: dict[str, list[Claimed]] = defaultdict(list)
        for row in rows:
            lanes[row.channel].append(row)
        for channel, batch in lanes.items():
            self._busy.add(channel)
            task = asyncio.create_task(self._lane(channel, batch), name=f"lane:{channel}")
            self._lanes.add(task)
            task.add_done_callback(self._lanes.discard)
        return bool(rows)

    async def _idle_delay(self) -> float:
        now = time.time()
        delay = IDLE_POLL_S
        due = await self._store.next_due()
        if due is not None and due > now:
            delay = min(delay, due - now)
        # A block that ended after the claim means a claim now, not at the next idle poll.
        for until in self._blocked.values():
            delay = min(delay, until - now)
        return max(delay, 0.01)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            await self._store.prune_dedup(now - self._settings.dedup_window_s)

    async def _lane(self, channel: str, batch: list[Claimed]) -> None:
        try:
            for index, row in enumerate(batch):
                if self._stopping:
                    await self._give_back(batch[index:], time.time(), "shutting down")
                    return
                outcome = await self._attempt(row)
                await self._settle(row, outcome)
                if outcome.rate_limited:
                    until = time.time() + (outcome.retry_after or 1.0)
                    self._blocked[channel] = until
                    log.warning("channel %s rate limited for %.1fs", channel, until - time.time())
                    await self._give_back(batch[index + 1 :], until, "channel rate limited")
                    return
        except StoreUnavailable as exc:
            # The leases expire and the deliveries are claimed again: sent at least once.
            log.error("channel %s: cannot record outcome: %s", channel, exc)
        finally:
            self._busy.discard(channel)
            self._wake.set()

    async def _attempt(self, row: Claimed) -> Outcome:
        sender = self._senders.get(row.channel)
        if sender is None:
            return Outcome(Result.PERMANENT, f"channel {row.channel!r} is not configured")
        try:
            async with asyncio.timeout(self._settings.timeout_s + 5.0):
                return await sender.send(row.payload, row.id)
        except TimeoutError:
            return retry("timed out")
        except Exception:
            log.exception("event=%d channel=%s: sender failed", row.event_id, row.channel)
            return retry("internal error in sender")

    async def _settle(self, row: Claimed, outcome: Outcome) -> None:
        now = time.time()
        tag = f"event={row.event_id} delivery={row.id} channel={row.channel}"
        if outcome.result is Result.DELIVERED:
            await self._store.mark_delivered(row.id, now)
            log.info("delivered %s attempt=%d", tag, row.attempts)
        elif outcome.result is Result.PERMANENT:
            await self._store.mark_dead(row.id, now, outcome.error)
            log.warning("dead letter %s attempt=%d: %s", tag, row.attempts, outcome.error)
        elif outcome.rate_limited:
            wait = outcome.retry_after or 1.0
            await self._store.mark_retry(row.id, now, now + wait, outcome.error, count=False)
            log.info("rate limited %s attempt=%d: retry in %.1fs", tag, row.attempts, wait)
        elif row.attempts >= self._settings.max_attempts:
            error = f"gave up after {row.attempts} attempts: {outcome.error}"
            await self._store.mark_dead(row.id, now, error)
            log.warning("dead letter %s: %s", tag, error)
        else:
            s = self._settings
            delay = max(
                backoff(row.attempts, s.initial_backoff_s, s.max_backoff_s),
                outcome.retry_after or 0.0,
            )
            await self._store.mark_retry(row.id, now, now + delay, outcome.error, count=True)
            log.info("retry %s attempt=%d in %.1fs: %s", tag, row.attempts, delay, outcome.error)

    async def _give_back(self, rows: list[Claimed], at: float, why: str) -> None:
        for row in rows:
            await self._store.mark_retry(row.id, time.time(), at, why, count=False)
