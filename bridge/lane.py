"""A lane: one channel's deliveries claimed, paced and sent while the channel is this process's.

A lane takes its channel (with the pacing the last holder left), and with it the channels paced
together with it (one Slack channel's: bridge.policy), so that no other process sends to that
Slack channel meanwhile; lanes of this process share them, and the last to end leaves them.
It claims its due deliveries (each
room's in Tencent's order), paces them, and sends them one by one, rooms side by side up to
`max_in_flight`, or, past `digest_after`, as digests. What it claimed and will not send now it
gives back at once: at a stop; on a 429's block on the channel, with the channel (no lane waits a
block out); after a retry, the later deliveries of that room (never other rooms'). An outcome the
store cannot take ends the lane once the sends under way finish; the rest of the claim is given
back, or, if the store cannot take that either, waits for its lease to run out. With nothing left
to claim it lingers briefly for new callbacks, then leaves the channel.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

from bridge.attempts import Attempts, backoff
from bridge.channels import Outcome, Result
from bridge.clock import LeaseClock
from bridge.compose import Composer
from bridge.pacing import Pacer
from bridge.policy import ChannelPolicy, send_s
from bridge.store import Claimed, Pace, StoreUnavailable

log = logging.getLogger("bridge.worker")  # the worker's log lines, under its name

LINGER_S = 0.05  # how long a lane with nothing to send waits for more before it ends


class Lanes(Attempts, abc.ABC):
    """The worker's lanes (bridge.worker.Worker starts one per channel with work)."""

    _stopping: bool
    _arrivals: int
    _lingering: set[asyncio.Future[None]]
    _busy: set[str]
    _wake: asyncio.Event
    _store_failures: int
    _lease_clock: LeaseClock
    pacers: dict[str, Pacer]
    _policies: Mapping[str, ChannelPolicy]
    _paced_with: Mapping[str, tuple[str, ...]]  # channel -> those paced with it, itself too
    _lane_rates: Mapping[str, float | None]  # channel -> its share of a shared pacer's rate
    _holding: dict[str, int]  # channel -> lanes of this process holding it (its own or paced with)
    _elsewhere: dict[str, float]  # channel -> time.monotonic() before which no lane starts
    _poll_s: float
    server_pid: int | None

    def _halted(self, policy: ChannelPolicy) -> bool:
        """Whether `policy`'s lane should start no new send: the worker is stopping, or a reload
        has removed the channel (its deliveries are dead letters now, or, given back, another
        replica's to send), or, in a delivery process, its server is gone: a server started
        since may have sent again what this one claimed. (A delivery process stopped when its
        server was killed, and continued after the next server had sent its claims, sent them
        once more before it read the end of its server's pipe.)"""
        return self._stopping or policy.name not in self._policies or self._server_gone()

    def _server_gone(self) -> bool:
        """In a delivery process: its server is gone (it has another parent now)."""
        return self.server_pid is not None and os.getppid() != self.server_pid

    @abc.abstractmethod
    def _store_failed(self, exc: StoreUnavailable) -> None:
        """The store could not commit: the worker pauses its claims for a while."""

    async def _lane(self, policy: ChannelPolicy) -> None:
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)
        group = self._paced_with.get(policy.name, (policy.name,))
        # The config's composer that `policy` came with: a reload swaps the worker's while this
        # lane finishes its claim with the old sender. With the new one, a channel whose type
        # changed had the rest of its claim rendered for the new type and posted by the old
        # sender (Slack refused a webhook's body: no_text), and a removed channel's digests
        # were composed from a config that lacked it (a KeyError in the lane).
        composer = self._composer
        lease = policy.lease_s(self._settings.timeout_s, self._lane_rates.get(policy.name))
        held_until = 0.0  # time.monotonic(): the channel is ours until then (0: not taken)
        sent = False  # the last claim found something: worth waiting for more
        found = False  # some claim found something: outcomes may have made more due
        idle = False  # ended by a claim that found nothing, having found nothing before
        seen = self._arrivals
        try:
            # A reload gives the channel a new policy (its sender, pacing, template): this lane
            # finishes its claim with the old one and ends, and the dispatcher, woken, starts
            # one with the new. Under steady callbacks a lane never runs out of work, and kept
            # sending with the old settings.
            while (
                not self._halted(policy)
                and self._policies.get(policy.name) is policy
                and pacer.blocked_for() == 0
            ):
                # The channel is ours for one claim's worth of sends, taken again once half of
                # that has gone: no other process paces, threads or orders it meanwhile, so the
                # pacer here is the channel's state, and taking it every round (a commit each,
                # several per event under a steady trickle) would tell nothing new.
                if time.monotonic() > held_until - lease / 2:
                    taken = time.monotonic()
                    paces = await self._take(group, lease)
                    if paces is None:
                        # Another process is sending to this channel, or to another of its Slack
                        # channel, which the dispatcher cannot see: it looks again after a poll,
                        # not at every callback.
                        until = time.monotonic() + self._poll_s
                        self._elsewhere.update(dict.fromkeys(group, until))
                        return
                    if not held_until:
                        for name in group:
                            self._holding[name] = self._holding.get(name, 0) + 1
                    held_until = taken + lease
                    for pace in paces:
                        pacer.adopt(pace)
                    if pacer.blocked_for() > 0:
                        return  # blocked by a 429 another process met
                seen = self._arrivals
                now, claimed_at = time.time(), time.monotonic()
                rows = await self._store.claim(
                    policy.name, now, policy.claim_limit(), lease, self._lease_clock.leases_at(now)
                )
                # The last moment a send may start and still end under the claim's lease (on
                # the monotonic clock, which runs on while the process is stopped). The lease
                # covers every send of the claim, paced, with time to spare; past it, another
                # process may have claimed the rest: a replica frozen (a paused VM) sent the
                # rest of its claim when it woke, again, and past the pace.
                until = claimed_at + lease - min(send_s(self._settings.timeout_s), lease / 2)
                self._store_failures = 0  # a write went through: the store commits again
                if not rows and not (sent and await self._more_soon(seen)):
                    idle = not found
                    return  # nothing twice running, or nothing came: the lane ends
                sent = bool(rows)
                found = found or sent
                if policy.digest_after and len(rows) > policy.digest_after:
                    await self._send_digests(policy, composer, rows, until)
                elif rows:
                    await self._send_each(policy, composer, rows, until)
        except StoreUnavailable as exc:
            # The leases expire and the deliveries are claimed again: sent at least once.
            self._store_failed(exc)
        finally:
            if held_until:
                # Unsaved (store down), the channel's lease runs out and the next holder starts
                # from its own pacing: at worst one burst early.
                with contextlib.suppress(StoreUnavailable):
                    for name in self._let_go(group):
                        await self._store.leave_channel(name, pacer.pace())
            self._busy.discard(policy.name)
            # A lane that claimed nothing changed nothing, and the dispatcher's plain read may
            # still find the channel due: a delivery another transaction holds locked, which
            # claims pass over (SKIP LOCKED). Woken, it would start another lane at once, a busy
            # loop for as long as the lock is held; it looks at its next poll or due time
            # instead, or sooner for a callback that came since the claim.
            if not idle or self._arrivals != seen:
                self._wake.set()

    async def _take(self, group: tuple[str, ...], lease: float) -> list[Pace] | None:
        """Each channel of `group` leased to this process, with the pacing each holds; None when
        another process holds one of them, and those just taken are left as they were, but for
        those another lane of this process holds."""
        paces: list[Pace] = []
        for name in group:
            now = time.time()
            pace = await self._store.take_channel(
                name, now, lease, self._lease_clock.leases_at(now)
            )
            if pace is None:
                for taken, left in zip(group, paces, strict=False):
                    if not self._holding.get(taken):
                        await self._store.leave_channel(taken, left)
                return None
            paces.append(pace)
        return paces

    def _let_go(self, group: tuple[str, ...]) -> list[str]:
        """A lane that held `group` ends: the channels no other lane of this process holds, to
        leave. Counted by channel, not by group: a reload may pace a channel with others, or
        no longer, while a lane taken under the old grouping still runs."""
        free = []
        for name in group:
            self._holding[name] -= 1
            if not self._holding[name]:
                del self._holding[name]
                free.append(name)
        return free

    async def _answered(self, policy: ChannelPolicy, pacer: Pacer, outcome: Outcome) -> None:
        """The far end answered a send (a message or a digest) the pacer let through."""
        pacer.done()
        if outcome.rate_limited or outcome.local:
            self._pause(policy, pacer, outcome)
            # Saved now for every channel paced with it: left in memory until the lanes leave
            # the channel (another lane of its Slack channel may wait on a slow answer for
            # seconds), the block was lost to a kill -9, and the next process sent into it.
            until = pacer.pace().blocked_until
            with contextlib.suppress(StoreUnavailable):  # held here still; a restart loses it
                for name in self._paced_with.get(policy.name, (policy.name,)):
                    await self._store.block_channel(name, until)
        else:
            pacer.unasked = 0  # the 429s without a Retry-After in a row end

    def _pause(self, policy: ChannelPolicy, pacer: Pacer, outcome: Outcome) -> None:
        """Nothing more to the channel for the outcome's Retry-After: a 429, or a send this
        process could not make (no file descriptor), which would fail for every delivery."""
        seconds = outcome.retry_after
        if not seconds and outcome.rate_limited:
            # A 429 that says not how long (a generic endpoint's; Slack's always say): each one
            # in a row waits as a failed attempt would, up to max_backoff_s. At 1 s each, a far
            # end that kept answering 429 had a request a second for ever.
            if pacer.blocked_for() <= 0:  # not the sends of one round, each its 429: one more
                pacer.unasked += 1
            s = self._settings
            seconds = backoff(pacer.unasked, s.initial_backoff_s, s.max_backoff_s)
        pacer.block(seconds or 1.0)
        if outcome.rate_limited:
            log.warning("channel %s rate limited for %.1fs", policy.name, pacer.blocked_for())
        else:
            log.warning("channel %s paused for %.1fs: %s", policy.name, pacer.blocked_for(),
                        outcome.error)  # fmt: skip

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

    def _late(self, policy: ChannelPolicy, until: float) -> bool:
        """Too late to start a send under the claim's lease: said once a lane."""
        if time.monotonic() <= until:
            return False
        log.warning("channel %s: the lease ran out before the claim's sends (was the process "
                    "stopped?): the rest given back", policy.name)  # fmt: skip
        return True

    async def _send_each(
        self, policy: ChannelPolicy, composer: Composer, rows: Sequence[Claimed],
        until: float = math.inf,
    ) -> None:  # fmt: skip
        rooms: dict[str | int, list[Claimed]] = {}
        for row in rows:  # each room in order; a delivery without a room waits for nothing
            rooms.setdefault(row.room_key if row.room_key is not None else row.id, []).append(row)
        slots = asyncio.Semaphore(policy.max_in_flight)
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)
        # The store's first failure to take an outcome: the rooms start no other send. Each would
        # go out unrecorded (the store is away), and again when the lease runs out.
        failed: list[StoreUnavailable] = []
        unsent: list[Claimed] = []

        late: list[bool] = []  # the claim's lease is too near its end for another send

        def may_send() -> bool:
            if not late and self._late(policy, until):
                late.append(True)
            rewriting = self.rewriting.get(policy.name, 0)  # an outcome the store did not take
            return not failed and not late and not rewriting and not self._halted(policy)

        async def room(sequence: list[Claimed]) -> None:
            for index, row in enumerate(sequence):
                outcome: Outcome | None = None
                async with slots:
                    # Stopping is checked again once the slot and the pace allow a send: a stop
                    # may have come while this room waited for them, and only sends in flight at
                    # the stop may finish. One started in the grace period, cut off at its end,
                    # would be sent again at the next start. So is a reload that removed the
                    # channel: the rest of its claim, up to 200 rows, must not follow.
                    if may_send() and await pacer.wait() and may_send():
                        outcome = await self._attempt(policy, composer, row)
                        await self._answered(policy, pacer, outcome)  # before the slot is free
                if failed and outcome is None:
                    unsent.extend(sequence[index:])
                    return
                if self._halted(policy) and outcome is None:
                    gone = self._stopping or self._server_gone()
                    why = "shutting down" if gone else "channel removed"
                    await self._give_back(sequence[index:], time.time(), why)
                    return
                if late and outcome is None:
                    # Given back if still ours; taken by another process, left to it.
                    await self._give_back(sequence[index:], time.time(), "lease ran out")
                    return
                if outcome is None and self.rewriting.get(policy.name):
                    # Given back if the store takes it (a passing failure): claimable at once.
                    why = "an outcome the store did not take is being written again"
                    await self._give_back(sequence[index:], time.time(), why)
                    return
                if outcome is None:
                    # A 429 blocks the channel. Waiting it out would hold these rows and the
                    # channel past their lease, when another process takes both and sends inside
                    # the block, and this one sends them again after it. Given back, the lane
                    # ends and leaves the channel with the block for whoever takes it next.
                    await self._give_back(sequence[index:], time.time(), "channel blocked")
                    return
                await self._settle(row, outcome)
                if outcome.result is Result.RETRY:  # its room's later events wait for it
                    await self._give_back(sequence[index + 1 :], time.time(), "waiting for room")
                    return

        async def until_failed(sequence: list[Claimed]) -> None:
            try:
                await room(sequence)
            except StoreUnavailable as exc:
                failed.append(exc)

        # Every room ends before the lane does: none sends on beside the channel's next lane.
        await asyncio.gather(*(until_failed(sequence) for sequence in rooms.values()))
        if failed:
            # Given back if the store takes it (a passing failure): claimable at once. If not,
            # sent when the lease runs out.
            with contextlib.suppress(StoreUnavailable):
                await self._give_back(unsent, time.time(), "store unavailable")
            raise failed[0]

    async def _send_digests(
        self, policy: ChannelPolicy, composer: Composer, rows: Sequence[Claimed],
        until: float = math.inf,
    ) -> None:  # fmt: skip
        # On a thread: a claim of 200 rows renders 200 events, seconds of CPU for bodies near
        # max_body_bytes, and on the event loop every callback waited for it meanwhile (7-9 s,
        # past Tencent's 2). The loop takes the GIL back at each switch interval.
        digests, apart = await asyncio.to_thread(composer.digests, policy.name, rows)
        if apart:
            # Sent as they would be without a backlog: their stored message, or rendered alone
            # (a dead letter if that fails too). The rest still go as digests.
            for row, error in apart:
                log.warning("channel %s: delivery %d is sent alone, not in a digest: %s",
                            policy.name, row.id, error)  # fmt: skip
            await self._send_each(policy, composer, [row for row, _ in apart], until)
        pacer = self.pacers.get(policy.name) or Pacer(policy.rate_per_s, policy.burst)
        log.info("channel %s: %d pending, sending %d digests", policy.name, len(rows), len(digests))
        for index, (payload, carried) in enumerate(digests):
            # Stopping or removed (also once the pace allows it: see _send_each), or blocked by a
            # 429.
            if (
                self._halted(policy) or not await pacer.wait() or self._halted(policy)
                or self._late(policy, until)
            ):  # fmt: skip
                rest = [row for _, later in digests[index:] for row in later]
                await self._give_back(rest, time.time(), "digest not sent yet")
                return
            outcome = await self._send(policy, payload, carried[0], None)
            await self._answered(policy, pacer, outcome)
            await asyncio.gather(*(self._settle(row, outcome) for row in carried))
            if outcome.result is Result.RETRY:
                rest = [row for _, later in digests[index + 1 :] for row in later]
                await self._give_back(rest, time.time(), "waiting for an earlier digest")
                return
