"""The delivery worker: claim due deliveries, send them, record delivered / retry / dead.

A dispatcher starts one lane per channel that has claimable work (lane.py); a lane claims that
channel's deliveries (each room's in Tencent's order), paces them, and sends them one by one or,
past `digest_after`, as digests. The worker alone decides what a sender's outcome means
(attempts.py): backoff with jitter for a retry, a block on the whole channel for a 429's
Retry-After (the attempt is given back, and so are the claim's unsent deliveries, with the
channel, at once: no lane waits a block out), a dead letter after a permanent failure or the last
attempt. A retry holds back the later deliveries of its room (the store will not hand them out
before it), never other rooms. While the store cannot commit, claims pause, longer each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from bridge.attempts import ChannelState
from bridge.clock import LeaseClock
from bridge.compose import Composer
from bridge.config import Config
from bridge.config_tables import DeliveryConfig
from bridge.lane import Lanes
from bridge.outcomes import Outcomes
from bridge.pacing import Pacer
from bridge.policy import THREAD_TTL_S, ChannelPolicy, strictest
from bridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

IDLE_POLL_S = 5.0  # a wake-up even with nothing due, for leases that expire
SHARED_POLL_S = 1.0  # the same with a shared store, where other processes' callbacks wake nobody
PRUNE_EVERY_S = 60.0
STORE_RETRY_MAX_S = 5.0  # the longest wait between tries while the store cannot commit


class Worker(Lanes):
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
        self.pacers: dict[str, Pacer] = {}  # by channel: channels of one far end share one
        self._pacers_by_key: dict[tuple[str, str], Pacer] = {}  # ChannelPolicy.pace_key
        self._paced_with: dict[str, tuple[str, ...]] = {}
        self._lane_rates: dict[str, float | None] = {}
        self._holding: dict[str, int] = {}
        self._elsewhere: dict[str, float] = {}  # channel -> time.monotonic() to look again
        self._settling: set[str] = set()  # channels whose lanes wait for a reload to settle them
        # In a delivery process, its server's pid (bridge/deliver.py): once the server is gone,
        # no send starts (bridge/lane.py).
        self.server_pid: int | None = None
        self.states: dict[str, ChannelState] = {}
        self._failing: dict[str, set[int]] = {}
        self.rewriting: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._arrivals = 0  # wake() calls: new work may be in the store
        self._lingering: set[asyncio.Future[None]] = set()  # lanes waiting for new work
        self._busy: set[str] = set()
        self._lanes: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._hurried = False  # a second signal: no grace for the sends in flight
        self._last_prune: float | None = None  # time.monotonic(): unmoved by a clock step
        self._pruning: asyncio.Task[None] | None = None
        self._store_failures = 0
        self._store_retry_at = 0.0  # time.monotonic(): no claims before this
        self._lease_clock = LeaseClock()
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
        composer: Composer, retention_s: float, held: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """Take a new configuration; lanes already running finish their claim with the old one.
        Channels `held` start no lane under it until `release`d (see bridge/reload.py).
        A channel keeps its pacer, retuned to new pacing: a new one would forget what was just
        sent (a full bucket straight away, over Slack's own count) and any 429 block, while a
        running lane, which holds the old one, would keep claiming rows the new one refuses.
        Channels that post to one Slack channel share a pacer (ChannelPolicy.destination), at
        the strictest of their pacings: Slack counts them as one."""
        self._policies = policies
        self._settings = settings
        self._composer = composer
        self._settling.update(held)
        self._retention_s = retention_s
        shared: dict[tuple[str, str], list[ChannelPolicy]] = {}
        for policy in policies.values():
            shared.setdefault(policy.pace_key, []).append(policy)
        kept, self._pacers_by_key = self._pacers_by_key, {}
        self.pacers.clear()  # and filled again: a running lane holds its pacer, not this dict
        self._paced_with, self._lane_rates = {}, {}
        for key, group in shared.items():
            rate, burst = strictest(group)
            for policy in group:  # each lane's share of the pacer, for its lease
                self._lane_rates[policy.name] = rate / len(group) if rate else None
            if (pacer := kept.get(key)) is not None:
                pacer.retune(rate, burst)
            else:
                pacer = Pacer(rate, burst)
            self._pacers_by_key[key] = pacer
            names = tuple(sorted(p.name for p in group))
            for policy in group:
                self.pacers[policy.name] = pacer
                self._paced_with[policy.name] = names
            if len(group) > 1:
                pace = f"{rate:g}/s, burst {burst}" if rate else "unpaced"
                log.info("channels %s post to one Slack channel: paced together, %s",
                         ", ".join(names), pace)  # fmt: skip
        # Leases taken before a step forward, under the old config's too, with room to spare.
        timeout_s = settings.timeout_s
        leases = (p.lease_s(timeout_s, self._lane_rates[p.name]) for p in policies.values())
        self._lease_clock.guard_s = max(self._lease_clock.guard_s, 2 * max(leases, default=0.0))
        for name in policies:
            self.states.setdefault(name, ChannelState())
        for name in set(self.states) - set(policies):
            del self.states[name]
        self._wake.set()

    def release(self, held: Sequence[str]) -> None:
        """Channels held by `configure` may have lanes again."""
        self._settling.difference_update(held)
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
            self._start_prune()
            try:
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
        if self._pruning is not None:
            self._pruning.cancel()  # what is left of it, the next prune deletes
            await asyncio.gather(self._pruning, return_exceptions=True)
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
            name in self._busy or self._kept_out(name) > 0 for name in self._policies
        )

    def _kept_out(self, name: str) -> float:
        """Seconds until channel `name` may have a lane again: a block on it, or another process
        holding a channel of its Slack channel (bridge/lane.py), which is looked at again then."""
        if name in self._settling:
            return self._poll_s  # looked at again then, or when released
        pacer = self.pacers.get(name)
        blocked = pacer.blocked_for() if pacer else 0.0
        if (until := self._elsewhere.get(name)) is None:  # as a rule: one clock reading less
            return blocked
        return max(blocked, until - time.monotonic(), 0.0)

    def _blocks_end(self) -> float:
        """Until the first block on a channel without a lane ends, at most the poll interval."""
        ends = [self._kept_out(name) for name in self._policies if name not in self._busy]
        return max(0.01, min([self._poll_s, *(e for e in ends if e > 0)]))

    async def _dispatch(self, now: float) -> list[str]:
        """Start a lane for each channel with claimable work; returns the blocked ones skipped."""
        ticks = time.monotonic()
        self._elsewhere = {n: t for n, t in self._elsewhere.items() if t > ticks}
        blocked = [name for name in self._policies if self._kept_out(name) > 0]
        leases_at = self._lease_clock.leases_at(now)
        for channel in await self._store.due_channels(now, [*self._busy, *blocked], leases_at):
            policy = self._policies.get(channel)
            if policy is None or self._stopping or self._server_gone():
                continue  # not configured here: another replica's, or buried (bridge/presence.py)
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
            delay = min(delay, self._kept_out(name))
        return max(delay, 0.01)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _start_prune(self) -> None:
        """A prune, when one is due, beside the dispatching: a backlog of old rows takes many
        transactions to prune (seconds, after downtime), and lanes start meanwhile."""
        due = self._last_prune is None or time.monotonic() - self._last_prune >= PRUNE_EVERY_S
        if due and (self._pruning is None or self._pruning.done()):
            self._pruning = asyncio.create_task(self._prune_or_pause(), name="prune")

    async def _prune_or_pause(self) -> None:
        try:
            await self._prune()
        except StoreUnavailable as exc:
            self._store_failed(exc)

    async def _prune(self) -> None:
        now, ticks = time.time(), time.monotonic()
        if self._last_prune is None or ticks - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = ticks
            cutoff = now - self._retention_s
            dedup = now - max(self._retention_s, self._settings.dedup_window_s)
            # Threads by the longest thread_ttl_h of the channels that thread by room: a room
            # keeps its thread that long, however short the retention. The others have no TTL
            # to give (their default kept every thread a day); with none, the default stays,
            # for a replica on the same database whose config threads (a rolling deploy).
            threading = [p.thread_ttl_s for p in self._policies.values() if p.thread_by_room]
            ttl = max(threading, default=THREAD_TTL_S)
            if pruned := await self._store.prune(cutoff, dedup, now - ttl):
                log.info("pruned %d rows older than the retention", pruned)
