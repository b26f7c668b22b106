"""Which channels this replica serves, told to the others sharing the store, and the burial of
deliveries to channels no replica serves any more: dead letters, "channel removed from the config".

With SQLite one process serves the store: deliveries to a channel its config lacks are buried at
once, at start-up and at each reload. On PostgreSQL, replicas may run different configs for a
while (a rolling deploy, a staggered reload), and one still on the old config must not bury what
one on the new config records and would send. So each replica announces its channels, at
start-up and at a reload before it records anything under the new config, then every
ANNOUNCE_EVERY_S (burying, each time, what no replica serves); it withdraws them when it stops. A
channel no replica serves is buried as soon as the last one to serve it has reloaded or stopped;
one that only a dead replica served, PRESENCE_S after that replica's last announcement.

A replica takes another for dead only once it has itself announced without a break for
PRESENCE_S: after the database was away, or at its own start, every other announcement may be
old, the living replicas' too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from bridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

ANNOUNCE_EVERY_S = 15.0
PRESENCE_S = 180.0  # a replica not heard from for this long is taken for dead: about a long lease
REMOVED = "channel removed from the config"


class Presence:
    """One replica's announcements; the burials it may make from what the others announced."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # One announcement at a time, so the last one written is the set in force.
        self._lock = asyncio.Lock()
        self._channels: list[str] = []  # as last announced
        # When this run of unbroken announcements began, and its last one; 0: none yet.
        self._since = self._last = 0.0

    async def announce(self, channels: Sequence[str]) -> None:
        """This replica serves `channels` from now on. StoreUnavailable if it could not say so."""
        async with self._lock:
            await self._announce(list(channels))

    async def _announce(self, channels: list[str]) -> None:
        now = time.time()
        try:
            await self._store.announce(channels, now)
        except StoreUnavailable:
            self._since = self._last = 0.0
            raise
        if now - self._last > 2 * ANNOUNCE_EVERY_S:
            self._since = now  # a break (the store away, the loop stalled): judged anew
        self._last = now
        self._channels = channels

    async def bury(self) -> int:
        """Undelivered deliveries to channels no running replica serves become dead letters;
        how many did."""
        now = time.time()
        # By the announcements that went through: a store that answers slowly (just back, say)
        # is no sign that another replica could have announced meanwhile.
        judged = self._last - self._since >= PRESENCE_S
        since = now - PRESENCE_S if judged else None  # None: every announcement counts
        return await self._store.bury_unknown_channels(self._channels, now, REMOVED, since)

    async def run(self) -> None:
        """With a shared store: announce again every ANNOUNCE_EVERY_S and bury what no replica
        serves any more, such as a channel only a replica that died had."""
        failing = False
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY_S)
            try:
                async with self._lock:
                    await self._announce(self._channels)
                    buried = await self.bury()
            except StoreUnavailable as exc:
                if not failing:  # once per outage: the worker and the receiver say the rest
                    log.warning("cannot announce this replica's channels: %s", exc)
                failing = True
                continue
            failing = False
            if buried:
                log.warning("%d deliveries to channels no running replica serves are dead "
                            "letters", buried)  # fmt: skip

    async def withdraw(self) -> None:
        """This replica stops: it serves nothing any more. Unsaid (store away), its announcement
        runs out after PRESENCE_S."""
        try:
            await self._store.withdraw()
        except StoreUnavailable as exc:
            log.warning("cannot withdraw this replica's channels: %s", exc)
