"""One attempt at a delivery, and what its outcome makes of the delivery.

An attempt renders the delivery if it was stored unrendered (bridge.compose), finds its room's
Slack thread, and sends it within the channel's timeout. The worker alone decides what a sender's
outcome means: delivered; a dead letter after a permanent failure or the last attempt; otherwise a
retry after a backoff with jitter (or the far end's Retry-After), which costs no attempt when the
far end only asked to wait. Each is one store write and one log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bridge.channels import Outcome, Result, Thread, permanent, retry
from bridge.compose import Composer
from bridge.config_tables import DeliveryConfig
from bridge.outcomes import Outcomes
from bridge.policy import ChannelPolicy, send_s
from bridge.render import RenderError
from bridge.store import Claimed, Store, StoreUnavailable

log = logging.getLogger("bridge.worker")  # the worker's log lines, under its name


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before attempt `attempt + 1`: doubling from `initial`, capped, jittered."""
    # The exponent is capped: 2 ** 1024 no longer converts to a float, and max_attempts is open.
    base = min(maximum, initial * 2 ** min(attempt - 1, 64))
    return max(initial, random.uniform(base / 2, base))


@dataclass
class ChannelState:
    """What the status page shows of a channel beyond the store's counts."""

    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


# The waits before writing an outcome again, when the store could not take it: a connection the
# server ended, or one not free in time (PostgreSQL's pool held by late callback writes), lost a
# delivered mark, and the message went out again when its claim's lease ran out, its room held
# up meanwhile. The writes are idempotent (they apply to a delivery this instance still holds).
OUTCOME_RETRIES_S = (0.5, 1.0)


class Attempts:
    """The worker's attempts (bridge.worker.Worker, through its lanes)."""

    _store: Store
    _settings: DeliveryConfig
    _composer: Composer
    _metrics: Outcomes | None
    states: dict[str, ChannelState]
    # By channel, deliveries whose attempts failed (and back off) since its last success; two
    # are enough to tell: one failing alone is its own trouble, not its far end's.
    _failing: dict[str, set[int]]
    # By channel, outcomes the store could not take that are being written again: its lanes
    # start no send meanwhile.
    rewriting: dict[str, int]

    async def _attempt(self, policy: ChannelPolicy, composer: Composer, row: Claimed) -> Outcome:
        try:
            payload = composer.payload(row)
        except RenderError as exc:
            return permanent(f"render failed: {exc}")
        thread = None
        if policy.thread_by_room and row.room_key is not None:
            not_before = time.time() - policy.thread_ttl_s
            if ts := await self._store.get_thread(policy.name, row.room_key, not_before):
                thread = Thread(ts, policy.reply_broadcast)
        outcome = await self._send(policy, payload, row, thread)
        if policy.thread_by_room and row.room_key is not None:
            if thread is None and outcome.result is Result.DELIVERED and outcome.ts:
                await self._store.set_thread(policy.name, row.room_key, outcome.ts, time.time())
            elif thread is not None and outcome.error.endswith("thread_not_found"):
                await self._store.forget_thread(policy.name, row.room_key)
                return Outcome(Result.RETRY, "thread is gone: starting a new one", 0.0, free=True)
        return outcome

    async def _send(
        self, policy: ChannelPolicy, payload: str, row: Claimed, thread: Thread | None
    ) -> Outcome:
        try:
            async with asyncio.timeout(send_s(self._settings.timeout_s)):
                return await policy.sender.send(payload, row.message_key, thread)
        except TimeoutError:
            return retry("timed out")
        except Exception as exc:
            # A sender's own errors are classified without their text; this one is not, and a
            # library's message may quote a URL, a header or a password: the traceback's frames
            # and the exception's type, not what it says.
            log.error(
                "delivery=%d channel=%s: sender failed: %s (its message is left out: it may "
                "hold a secret)\n%s", row.id, policy.name, type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )  # fmt: skip
            return retry("internal error in sender")

    def note_error(self, channel: str, error: str) -> None:
        """The channel's last error, for its status (one found before any send, say)."""
        state = self.states.setdefault(channel, ChannelState())
        state.last_error, state.last_error_at = error, time.time()

    def _note(self, row: Claimed, kind: str, error: str | None = None) -> None:
        if error is None:
            self.states.setdefault(row.channel, ChannelState()).last_success_at = time.time()
        else:
            self.note_error(row.channel, error)
        if self._metrics is not None:
            self._metrics.outcome(row.channel, kind, row.received_at)

    async def _written(self, row: Claimed, write: Callable[[], Awaitable[bool]]) -> bool:
        """`write` (an outcome), tried again after OUTCOME_RETRIES_S when the store cannot take
        it. Meanwhile the channel's lanes start no send (Lanes: `rewriting`): each would go out
        unrecorded if the store stays away, and again when the lease runs out.

        False when the store took no outcome: the delivery is no longer this instance's claim.
        A write tried again may have been committed the first time, so only a first try tells."""
        troubled = False
        try:
            for wait in (*OUTCOME_RETRIES_S, None):
                try:
                    return await write() or troubled
                except StoreUnavailable:
                    if wait is None:
                        raise
                    if not troubled:
                        troubled = True
                        self.rewriting[row.channel] = self.rewriting.get(row.channel, 0) + 1
                    await asyncio.sleep(wait)
        finally:
            if troubled:
                self.rewriting[row.channel] -= 1
        raise AssertionError("unreachable")  # the last try returns or raises

    def _unrecorded(self, row: Claimed, tag: str, outcome: Outcome) -> None:
        """An outcome the store did not take: the delivery's claim had passed from this instance
        (its lease ran out while the send was under way, and another took it over), or it was
        buried or dropped meanwhile. Whoever holds it now records its own outcome."""
        log.warning(
            "not recorded %s attempt=%d: %s, but the delivery is no longer this process's "
            "claim (its lease ran out, or it was buried or dropped meanwhile)",
            tag, row.attempts, "sent" if outcome.result is Result.DELIVERED else outcome.error,
        )  # fmt: skip

    async def _settle(self, row: Claimed, outcome: Outcome) -> None:
        now = time.time()
        tag = f"event={row.event_id} delivery={row.id} channel={row.channel}"
        if outcome.result is Result.DELIVERED:
            if not await self._written(row, lambda: self._store.mark_delivered(row.id, now)):
                return self._unrecorded(row, tag, outcome)
            self._note(row, "delivered")
            log.info("delivered %s attempt=%d", tag, row.attempts)
            # Its far end answers again after failing for several deliveries (an outage). What
            # failed meanwhile backs off, each delivery due at its own time, and would trickle
            # out one message at a time: due now, the next claim sees them together, and a
            # backlog goes as digests. A delivery that fails alone among successes (its own
            # trouble) keeps its backoff.
            outage = len(self._failing.pop(row.channel, ())) >= 2
            if outage and (resumed := await self._store.resume(row.channel, now)):
                log.info("channel %s answers again: %d deliveries backing off are due now",
                         row.channel, resumed)  # fmt: skip
        elif outcome.result is Result.PERMANENT:
            if not await self._written(
                row, lambda: self._store.mark_dead(row.id, now, outcome.error)
            ):
                return self._unrecorded(row, tag, outcome)
            self._note(row, "dead", outcome.error)
            log.warning("dead letter %s attempt=%d: %s", tag, row.attempts, outcome.error)
        elif outcome.rate_limited or outcome.free:
            wait = outcome.retry_after
            if wait is None:  # a 429 that says not how long: its channel's block (lane.py) holds
                wait = 0.0 if outcome.rate_limited else 1.0
            if not await self._written(
                row,
                lambda: self._store.mark_retry(row.id, now, now + wait, outcome.error, count=False),
            ):
                return self._unrecorded(row, tag, outcome)
            self._note(row, "rate_limited" if outcome.rate_limited else "retry", outcome.error)
            log.info("%s %s attempt=%d: again %s (attempt given back): %s",
                     "rate limited" if outcome.rate_limited else "retry", tag, row.attempts,
                     f"in {wait:.1f}s" if wait else "when its channel's block ends",
                     outcome.error)  # fmt: skip
        elif row.attempts >= self._settings.max_attempts:
            error = f"gave up after {row.attempts} attempts: {outcome.error}"
            if not await self._written(row, lambda: self._store.mark_dead(row.id, now, error)):
                return self._unrecorded(row, tag, outcome)
            self._note(row, "dead", error)
            log.warning("dead letter %s: %s", tag, error)
        else:
            s = self._settings
            delay = max(
                backoff(row.attempts, s.initial_backoff_s, s.max_backoff_s),
                outcome.retry_after or 0.0,
            )
            if not await self._written(
                row,
                lambda: self._store.mark_retry(row.id, now, now + delay, outcome.error, count=True),
            ):
                return self._unrecorded(row, tag, outcome)
            self._note(row, "retry", outcome.error)
            failing = self._failing.setdefault(row.channel, set())
            if len(failing) < 2:
                failing.add(row.id)
            log.info("retry %s attempt=%d in %.1fs: %s", tag, row.attempts, delay, outcome.error)

    async def _give_back(self, rows: Sequence[Claimed], at: float, why: str) -> None:
        if rows:
            log.debug(
                "channel %s: %d deliveries back to pending: %s", rows[0].channel, len(rows), why
            )
            await self._store.release([row.id for row in rows], time.time(), at)
