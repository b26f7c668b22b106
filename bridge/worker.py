"""The delivery worker: claim due deliveries, send them, record delivered / retry / dead.

A dispatcher starts one lane per channel that has claimable work; a lane claims that channel's
deliveries (each room's in Tencent's order), paces them, and sends them one by one or, past
`digest_after`, as digests. The worker alone decides what a sender's outcome means: backoff with
jitter for a retry, a block on the whole channel for a 429's Retry-After (the attempt is given
back, and so are the claim's unsent deliveries, with the channel, at once: no lane waits a block
out), a dead letter after a permanent failure or the last attempt. A retry holds back the later
deliveries of its room (the store will not hand them out before it), never other rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.channels import Outcome, Result, Sender, Thread, permanent, retry
from bridge.compose import DIGEST_ENTRIES, Composer
from bridge.config import Config
from bridge.config_tables import Channel, ConsoleChannel, DeliveryConfig, SlackChannel
from bridge.metrics import Outcomes
from bridge.pacing import Pacer
from bridge.render import RenderError
from bridge.store import Claimed, Store, StoreUnavailable

log = logging.getLogger(__name__)

PER_SEND = 4  # deliveries a lane claims per message it may have in flight
DIGEST_CLAIM = 200  # deliveries a digesting lane claims at once
IDLE_POLL_S = 5.0  # a wake-up even with nothing due, for leases that expire
SHARED_POLL_S = 1.0  # the same with a shared store, where other processes' callbacks wake nobody
PRUNE_EVERY_S = 60.0
LINGER_S = 0.05  # how long a lane with nothing to send waits for more before it ends
STORE_RETRY_MAX_S = 5.0  # the longest wait between tries while the store cannot commit


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before attempt `attempt + 1`: doubling from `initial`, capped, jittered."""
    # The exponent is capped: 2 ** 1024 no longer converts to a float, and max_attempts is open.
    base = min(maximum, initial * 2 ** min(attempt - 1, 64))
    return max(initial, random.uniform(base / 2, base))


@dataclass(frozen=True)
class ChannelPolicy:
    """How one channel is sent to; built from its config."""

    name: str
    sender: Sender
    rate_per_s: float | None = None
    burst: int = 1
    max_in_flight: int = 1
    digest_after: int = 0  # 0: never digest
    thread_by_room: bool = False
    reply_broadcast: bool = False
    thread_ttl_s: float = 86400.0

    @classmethod
    def from_config(cls, name: str, channel: Channel, sender: Sender) -> ChannelPolicy:
        if isinstance(channel, SlackChannel):
            return cls(
                name, sender, channel.rate_per_s, channel.burst, 1, channel.digest_after,
                channel.thread_by_room, channel.reply_broadcast, channel.thread_ttl_h * 3600,
            )  # fmt: skip
        if isinstance(channel, ConsoleChannel):
            return cls(name, sender, digest_after=channel.digest_after)
        return cls(name, sender, channel.rate_per_s, channel.burst, channel.max_in_flight)

    def claim_limit(self) -> int:
        if self.digest_after:
            return max(DIGEST_CLAIM, self.digest_after + 1)
        return PER_SEND * self.max_in_flight

    def lease_s(self, timeout_s: float) -> float:
        """Long enough for every send a claim can lead to, paced, then some."""
        limit = self.claim_limit()
        sends = (
            max(self.digest_after, math.ceil(limit / DIGEST_ENTRIES))
            if self.digest_after
            else limit
        )
        paced = sends / self.rate_per_s if self.rate_per_s else 0.0
        return math.ceil(sends / self.max_in_flight) * (timeout_s + 5.0) + paced + 10.0


@dataclass
class ChannelState:
    """What the status page shows of a channel beyond the store's counts."""

    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


def build_policies(config: Config, senders: Mapping[str, Sender]) -> dict[str, ChannelPolicy]:
    """Each configured channel's policy, around its sender."""
    return {
        name: ChannelPolicy.from_config(name, channel, senders[name])
        for name, channel in config.channels.items()
    }


class Worker:
    def __init__(
        self, store: Store, policies: Mapping[str, ChannelPolicy], settings: DeliveryConfig,
        composer: Composer, retention_s: float, metrics: Outcomes | None = None,
        poll_s: float = IDLE_POLL_S,
    ) -> None:  # fmt: skip
        self._store = store
        self._poll_s = poll_s
        self._settings = settings
        self._composer = composer
        self._retention_s = retention_s
        self._metrics = metrics
        self._policies: Mapping[str, ChannelPolicy] = {}
        self.pacers: dict[str, Pacer] = {}
        self.states: dict[str, ChannelState] = {}
        self._wake = asyncio.Event()
        self._arrivals = 0  # wake() calls: new work may be in the store
        self._lingering: set[asyncio.Future[None]] = set()  # lanes waiting for new work
        self._busy: set[str] = set()
        self._lanes: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._hurried = False  # a second signal: no grace for the sends in flight
        self._last_prune = 0.0
        self._store_failures = 0
        self._store_retry_at = 0.0  # time.monotonic(): no claims before this
        self.configure(policies, settings, composer, retention_s)

    @classmethod
    def for_config(
        cls, config: Config, store: Store, policies: Mapping[str, ChannelPolicy],
        composer: Composer, metrics: Outcomes,
    ) -> Worker:  # fmt: skip
        """The worker `config` asks for: with a shared store (PostgreSQL) it polls more often,
        as other processes' callbacks wake nobody here."""
        return cls(
            store, policies, config.delivery, composer, config.store.retention_h * 3600, metrics,
            SHARED_POLL_S if config.store.url is not None else IDLE_POLL_S,
        )  # fmt: skip

    def configure(
        self, policies: Mapping[str, ChannelPolicy], settings: DeliveryConfig,
        composer: Composer, retention_s: float,
    ) -> None:  # fmt: skip
        """Take a new configuration; lanes already running finish their claim with the old one.
        A channel keeps its pacer, retuned to new pacing: a new one would forget what was just
        sent (a full bucket straight away, over Slack's own count) and any 429 block, while a
        running lane, which holds the old one, would keep claiming rows the new one refuses."""
        self._policies = policies
        self._settings = settings
        self._composer = composer
        self._retention_s = retention_s
        for name, policy in policies.items():
            if (pacer := self.pacers.get(name)) is not None:
                pacer.retune(policy.rate_per_s, policy.burst)
            else:
                self.pacers[name] = Pacer(policy.rate_per_s, policy.burst)
            self.states.setdefault(name, ChannelState())
        for name in set(self.pacers) - set(policies):
            del self.pacers[name]
            self.states.pop(name, None)
        self._wake.set()

    def blocked_for(self, name: str) -> float:
        """Seconds until channel `name` may send again after a Retry-After (0: not blocked)."""
        pacer = self.pacers.get(name)
        return pacer.blocked_for() if pacer else 0.0

    def wake(self) -> None:
        """Something new may be due: look now instead of at the next poll."""
        self._wake.set()
        self._arrivals += 1
        for waiter in self._lingering:
            if not waiter.done():
                waiter.set_result(None)

    async def run(self) -> None:
        while not self._stopping:
            if (pause := self._store_pause()) > 0:
                # The store cannot commit: wait it out. Nothing wakes this sleep, so failing
                # lanes and new callbacks cannot turn it into a busy loop.
                await asyncio.sleep(pause)
                continue
            self._wake.clear()
            # One clock reading per pass: what was not due at `now` is what next_due(now) finds.
            now = time.time()
            try:
                await self._prune()
                if self._all_busy():
                    # Every channel has a lane claiming or is blocked: nothing to ask the store
                    # until a lane ends (it wakes this loop). Under load a callback wakes the
                    # loop every time, and two queries per wake-up were most of the writer's time.
                    delay = self._blocks_end()
                else:
                    skipped = await self._dispatch(now)
                    # The store reads. With no lane to write, an outage is over as far as this
                    # worker can tell; with one, only its claim tells: a full disk still reads,
                    # and the backoff and the log lines would restart at every pass.
                    writing = bool(self._busy)  # before an await lets a new lane fail and end
                    delay = await self._idle_delay(now, skipped)
                    if not writing:
                        self._store_failures = 0
            except StoreUnavailable as exc:
                self._store_failed(exc)
                continue
            await self._sleep(delay)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self._store_failures += 1
        # Capped exponent: 2 ** 1024 does not convert to a float, and an outage may be long.
        pause = min(STORE_RETRY_MAX_S, 0.25 * 2 ** min(self._store_failures, 8))
        self._store_retry_at = time.monotonic() + pause
        if self._store_failures == 1 or self._store_failures % 20 == 0:
            log.error("store unavailable (%d times): %s; next try in %.1fs",
                      self._store_failures, exc, pause)  # fmt: skip

    def _store_pause(self) -> float:
        return max(0.0, self._store_retry_at - time.monotonic())

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give lanes `grace_s` to finish their sends. Unfinished ones stay
        claimed in the store and are sent again after restart."""
        self._stopping = True
        self.wake()  # lingering lanes end now
        if self._lanes:
            _, pending = await asyncio.wait(self._lanes, timeout=0 if self._hurried else grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def hurry(self) -> None:
        """Stop now, before or during `stop()`: the lanes are cancelled, and what they hold
        stays claimed in the store, sent again after restart (at least once, as after a
        crash)."""
        self._stopping = self._hurried = True
        for task in self._lanes:
            task.cancel()

    def _all_busy(self) -> bool:
        return bool(self._policies) and all(
            name in self._busy or self.pacers[name].blocked_for() > 0 for name in self._policies
        )

    def _blocks_end(self) -> float:
        """Until the first block on a channel without a lane ends, at most the poll interval."""
        ends = [p.blocked_for() for n, p in self.pacers.items() if n not in self._busy]
        return max(0.01, min([self._poll_s, *(e for e in ends if e > 0)]))

    async def _dispatch(self, now: float) -> list[str]:
        """Start a lane for each channel with claimable work; returns the blocked ones skipped."""
        blocked = [name for name, pacer in self.pacers.items() if pacer.blocked_for() > 0]
        for channel in await self._store.due_channels(now, [*self._busy, *blocked]):
            policy = self._policies.get(channel)
            if policy is None or self._stopping:
                continue  # a channel no longer configured: buried at start-up or reload
            self._busy.add(channel)
            task = asyncio.create_task(self._lane(policy), name=f"lane:{channel}")
            self._lanes.add(task)
            task.add_done_callback(self._lanes.discard)
        return blocked

    async def _idle_delay(self, now: float, skipped: list[str]) -> float:
        """Until the next thing due after `now`, or the end of a block that kept a channel out
        (re-checked even if that block has ended meanwhile); lanes and new events wake sooner."""
        delay = self._poll_s
        due = await self._store.next_due(now)
        if due is not None:
            delay = min(delay, due - time.time())
        for name in skipped:
            if (pacer := self.pacers.get(name)) is not None:
                delay = min(delay, pacer.blocked_for())
        return max(delay, 0.01)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            cutoff = now - self._retention_s
            dedup = now - max(self._retention_s, self._settings.dedup_window_s)
            # Threads by the channels' longest thread_ttl_h: a room keeps its thread that long,
            # however short the retention.
            ttl = max((p.thread_ttl_s for p in self._policies.values()), default=0.0)
            if pruned := await self._store.prune(cutoff, dedup, now - ttl):
                log.info("pruned %d rows older than the retention", pruned)

    async def _lane(self, policy: ChannelPolicy) -> None:
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)
        lease = policy.lease_s(self._settings.timeout_s)
        held_until = 0.0  # wall clock: the channel is ours until then
        sent = False  # the last claim found something: worth waiting for more
        found = False  # some claim found something: outcomes may have made more due
        idle = False  # ended by a claim that found nothing, having found nothing before
        seen = self._arrivals
        try:
            while not self._stopping and pacer.blocked_for() == 0:
                # The channel is ours for one claim's worth of sends, taken again once half of
                # that has gone: no other process paces, threads or orders it meanwhile, so the
                # pacer here is the channel's state, and taking it every round (a commit each,
                # several per event under a steady trickle) would tell nothing new.
                if time.time() > held_until - lease / 2:
                    pace = await self._store.take_channel(policy.name, time.time(), lease)
                    if pace is None:
                        return  # another process is sending to this channel
                    held_until = time.time() + lease
                    pacer.adopt(pace)
                    if pacer.blocked_for() > 0:
                        return  # blocked by a 429 another process met
                seen = self._arrivals
                rows = await self._store.claim(
                    policy.name, time.time(), policy.claim_limit(), lease
                )
                self._store_failures = 0  # a write went through: the store commits again
                if not rows and not (sent and await self._more_soon(seen)):
                    idle = not found
                    return  # nothing twice running, or nothing came: the lane ends
                sent = bool(rows)
                found = found or sent
                if policy.digest_after and len(rows) > policy.digest_after:
                    await self._send_digests(policy, rows)
                elif rows:
                    await self._send_each(policy, rows)
        except StoreUnavailable as exc:
            # The leases expire and the deliveries are claimed again: sent at least once.
            self._store_failed(exc)
        finally:
            if held_until:
                # Unsaved (store down), the channel's lease runs out and the next holder starts
                # from its own pacing: at worst one burst early.
                with contextlib.suppress(StoreUnavailable):
                    await self._store.leave_channel(policy.name, pacer.pace())
            self._busy.discard(policy.name)
            # A lane that claimed nothing changed nothing, and the dispatcher's plain read may
            # still find the channel due: a delivery another transaction holds locked, which
            # claims pass over (SKIP LOCKED). Woken, it would start another lane at once, a busy
            # loop for as long as the lock is held; it looks at its next poll or due time
            # instead, or sooner for a callback that came since the claim.
            if not idle or self._arrivals != seen:
                self._wake.set()

    async def _more_soon(self, seen: int) -> bool:
        """Whether a callback arrived since `seen` (the count before the claim that found
        nothing), waiting up to LINGER_S for one. A lane that has just sent lingers so before
        it leaves its channel: under a steady trickle, leaving and taking the channel again for
        each event would be two more commits per event. It lingers once: a callback for another
        channel wakes it too, and a second claim that finds nothing ends it."""
        if self._arrivals == seen:
            waiter = asyncio.get_running_loop().create_future()
            self._lingering.add(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, LINGER_S)
            finally:
                self._lingering.discard(waiter)
        return self._arrivals != seen and not self._stopping

    async def _send_each(self, policy: ChannelPolicy, rows: Sequence[Claimed]) -> None:
        rooms: dict[str | int, list[Claimed]] = {}
        for row in rows:  # each room in order; a delivery without a room waits for nothing
            rooms.setdefault(row.room_id if row.room_id is not None else row.id, []).append(row)
        slots = asyncio.Semaphore(policy.max_in_flight)
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)

        async def room(sequence: list[Claimed]) -> None:
            for index, row in enumerate(sequence):
                outcome: Outcome | None = None
                async with slots:
                    # Stopping is checked again once the slot and the pace allow a send: a stop
                    # may have come while this room waited for them, and only sends in flight at
                    # the stop may finish. One started in the grace period, cut off at its end,
                    # would be sent again at the next start.
                    if not self._stopping and await pacer.wait() and not self._stopping:
                        outcome = await self._attempt(policy, row)
                        pacer.done()
                        if outcome.rate_limited:  # before the slot is free for another room
                            pacer.block(outcome.retry_after or 1.0)
                            log.warning("channel %s rate limited for %.1fs", policy.name,
                                        pacer.blocked_for())  # fmt: skip
                if self._stopping and outcome is None:
                    await self._give_back(sequence[index:], time.time(), "shutting down")
                    return
                if outcome is None:
                    # A 429 blocks the channel. Waiting it out would hold these rows and the
                    # channel past their lease, when another process takes both and sends inside
                    # the block, and this one sends them again after it. Given back, the lane
                    # ends and leaves the channel with the block for whoever takes it next.
                    await self._give_back(sequence[index:], time.time(), "channel rate limited")
                    return
                await self._settle(row, outcome)
                if outcome.result is Result.RETRY:  # its room's later events wait for it
                    await self._give_back(sequence[index + 1 :], time.time(), "waiting for room")
                    return

        await asyncio.gather(*(room(sequence) for sequence in rooms.values()))

    async def _send_digests(self, policy: ChannelPolicy, rows: Sequence[Claimed]) -> None:
        try:
            digests = self._composer.digests(policy.name, rows)
        except RenderError as exc:
            log.error("channel %s: digest failed, sending one by one: %s", policy.name, exc)
            await self._send_each(policy, rows)
            return
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)
        log.info("channel %s: %d pending, sending %d digests", policy.name, len(rows), len(digests))
        for index, (payload, carried) in enumerate(digests):
            # Stopping (also once the pace allows it: see _send_each), or blocked by a 429.
            if self._stopping or not await pacer.wait() or self._stopping:
                rest = [row for _, later in digests[index:] for row in later]
                await self._give_back(rest, time.time(), "digest not sent yet")
                return
            outcome = await self._send(policy, payload, carried[0].id, None)
            pacer.done()
            if outcome.rate_limited:
                pacer.block(outcome.retry_after or 1.0)
            await asyncio.gather(*(self._settle(row, outcome) for row in carried))
            if outcome.result is Result.RETRY:
                rest = [row for _, later in digests[index + 1 :] for row in later]
                await self._give_back(rest, time.time(), "waiting for an earlier digest")
                return

    async def _attempt(self, policy: ChannelPolicy, row: Claimed) -> Outcome:
        try:
            payload = self._composer.payload(row)
        except RenderError as exc:
            return permanent(f"render failed: {exc}")
        thread = None
        if policy.thread_by_room and row.room_id is not None:
            not_before = time.time() - policy.thread_ttl_s
            if ts := await self._store.get_thread(policy.name, row.room_id, not_before):
                thread = Thread(ts, policy.reply_broadcast)
        outcome = await self._send(policy, payload, row.id, thread)
        if policy.thread_by_room and row.room_id is not None:
            if thread is None and outcome.result is Result.DELIVERED and outcome.ts:
                await self._store.set_thread(policy.name, row.room_id, outcome.ts, time.time())
            elif thread is not None and outcome.error.endswith("thread_not_found"):
                await self._store.forget_thread(policy.name, row.room_id)
                return Outcome(Result.RETRY, "thread is gone: starting a new one", 0.0, free=True)
        return outcome

    async def _send(
        self, policy: ChannelPolicy, payload: str, delivery_id: int, thread: Thread | None
    ) -> Outcome:
        try:
            async with asyncio.timeout(self._settings.timeout_s + 5.0):
                return await policy.sender.send(payload, delivery_id, thread)
        except TimeoutError:
            return retry("timed out")
        except Exception as exc:
            # A sender's own errors are classified without their text; this one is not, and a
            # library's message may quote a URL, a header or a password: the traceback's frames
            # and the exception's type, not what it says.
            log.error(
                "delivery=%d channel=%s: sender failed: %s (its message is left out: it may "
                "hold a secret)\n%s", delivery_id, policy.name, type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )  # fmt: skip
            return retry("internal error in sender")

    def _note(self, row: Claimed, kind: str, error: str | None = None) -> None:
        state = self.states.setdefault(row.channel, ChannelState())
        if error is None:
            state.last_success_at = time.time()
        else:
            state.last_error, state.last_error_at = error, time.time()
        if self._metrics is not None:
            self._metrics.outcome(row.channel, kind, row.received_at)

    async def _settle(self, row: Claimed, outcome: Outcome) -> None:
        now = time.time()
        tag = f"event={row.event_id} delivery={row.id} channel={row.channel}"
        if outcome.result is Result.DELIVERED:
            await self._store.mark_delivered(row.id, now)
            self._note(row, "delivered")
            log.info("delivered %s attempt=%d", tag, row.attempts)
        elif outcome.result is Result.PERMANENT:
            await self._store.mark_dead(row.id, now, outcome.error)
            self._note(row, "dead", outcome.error)
            log.warning("dead letter %s attempt=%d: %s", tag, row.attempts, outcome.error)
        elif outcome.rate_limited or outcome.free:
            wait = outcome.retry_after if outcome.retry_after is not None else 1.0
            await self._store.mark_retry(row.id, now, now + wait, outcome.error, count=False)
            self._note(row, "rate_limited" if outcome.rate_limited else "retry", outcome.error)
            log.info("%s %s attempt=%d: again in %.1fs (attempt given back): %s",
                     "rate limited" if outcome.rate_limited else "retry", tag, row.attempts, wait,
                     outcome.error)  # fmt: skip
        elif row.attempts >= self._settings.max_attempts:
            error = f"gave up after {row.attempts} attempts: {outcome.error}"
            await self._store.mark_dead(row.id, now, error)
            self._note(row, "dead", error)
            log.warning("dead letter %s: %s", tag, error)
        else:
            self._note(row, "retry", outcome.error)
            s = self._settings
            delay = max(
                backoff(row.attempts, s.initial_backoff_s, s.max_backoff_s),
                outcome.retry_after or 0.0,
            )
            await self._store.mark_retry(row.id, now, now + delay, outcome.error, count=True)
            log.info("retry %s attempt=%d in %.1fs: %s", tag, row.attempts, delay, outcome.error)

    async def _give_back(self, rows: Sequence[Claimed], at: float, why: str) -> None:
        if rows:
            log.debug(
                "channel %s: %d deliveries back to pending: %s", rows[0].channel, len(rows), why
            )
            await self._store.release([row.id for row in rows], time.time(), at)
