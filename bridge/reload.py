"""`reload()`, on SIGHUP and POST /-/reload: the config file read and validated again, and swapped
in whole (receiver, routes, templates, the worker's channels, the delivery process's), or refused
with the running config kept. Deliveries to channels no replica serves any more become dead
letters (bridge/presence.py), those to channels of another type are rendered again when sent;
callbacks still being received under the old config are waited for, and what a slow one records
is settled when it finishes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.checks import load_validated_within
from bridge.compose import Composer
from bridge.config import Config, ConfigError
from bridge.metrics import Metrics
from bridge.policy import ChannelPolicy
from bridge.presence import Presence
from bridge.receive import Receiver
from bridge.render import Renderer
from bridge.store import Store, StoreUnavailable
from bridge.worker import Worker

if TYPE_CHECKING:
    import aiohttp

    from bridge.supervise import DeliveryProcess

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # how long a reload waits for callbacks received under the old config
SETTLE_AGAIN_S = 5.0  # between tries to settle channels when the store could not take it


class Reloads(abc.ABC):
    """Bridge's reloading; the attributes are Bridge's (bridge/app.py)."""

    config: Config
    path: Path | None
    own_process: bool
    renderer: Renderer
    receiver: Receiver
    store: Store
    presence: Presence
    metrics: Metrics
    worker: Worker | None
    delivery: DeliveryProcess | None
    _session: aiohttp.ClientSession | None
    _reloading: asyncio.Lock
    draining: bool  # stopping: a reload under way, or waiting for one, gives up
    _late_burials: set[asyncio.Task[None]]
    last_reload: tuple[float, str | None] | None  # when, and why it was refused (None: it was not)

    @abc.abstractmethod
    def _receiver(self, config: Config, renderer: Renderer) -> Receiver:
        """A receiver for `config`."""

    @abc.abstractmethod
    def _worker_setup(
        self, config: Config, renderer: Renderer
    ) -> tuple[dict[str, ChannelPolicy], Composer]:
        """The worker's channel policies and composer for `config`."""

    async def reload(self) -> tuple[bool, str]:
        """Read and validate the config file again; swap it in whole, or keep the old one."""
        async with self._reloading:
            announced = False
            try:
                if self.path is None:
                    raise ConfigError("started without a config file: nothing to reload")
                if self.draining:  # waited behind a reload that gave up as the bridge stops
                    raise ConfigError(f"{self.path}: not checked: the bridge is stopping")
                # On a thread: compiling and trying every template takes a few hundred ms
                # (0.3 s for one Slack channel's), and on the event loop no callback was
                # answered meanwhile.
                config, renderer = await load_validated_within(
                    self.path, stopping=lambda: self.draining
                )
                if config.store != self.config.store:
                    raise ConfigError("[store] changes take effect at the next start")
                # Before anything is recorded under it: a replica lacking a channel it adds
                # must not bury that channel's deliveries meanwhile. The running config's
                # channels too, till the reload has settled: announced as the new config's
                # alone, a channel only the old one has was buried by the next announcement
                # (every 15 s) while the reload still ran, and kept if it was refused.
                both = dict.fromkeys([*self.config.channels, *config.channels])
                await self.presence.announce(list(both))
                announced = True
                # A message rendered at receipt for a channel's old type (a webhook's body, a
                # console line) is not one its new type can send: Slack refused it (no_text),
                # a dead letter for an acknowledged event, or a webhook got Slack's JSON.
                # Forgotten, it is rendered again when sent: before the new config is in place,
                # or one of its lanes could send one meanwhile (a lane of the old config renders
                # for the old type); and again once the callbacks under way have settled.
                retyped = [
                    name for name, channel in config.channels.items()
                    if (before := self.config.channels.get(name)) and before.type != channel.type
                ]  # fmt: skip
                if retyped and (rerendered := await self.store.forget_payloads(retyped)):
                    log.info("%d deliveries to channels of another type are rendered again "
                             "when sent", rerendered)  # fmt: skip
            except (ConfigError, StoreUnavailable) as exc:
                if announced:  # the running config stays, and so do its channels alone
                    with contextlib.suppress(StoreUnavailable):
                        await self.presence.announce(list(self.config.channels))
                self.metrics.reloads.labels("failure").inc()
                self.last_reload = (time.time(), str(exc))  # on /status until the next one
                log.error("reload refused, the running config stays: %s", exc)
                if exc.__cause__ is not None:  # not a config error: a bug, to be found
                    log.debug("what the reload ran into", exc_info=exc.__cause__)
                return False, str(exc)
            if config.server != self.config.server:
                log.warning("[server] changes take effect at the next start")
            if config.delivery.own_process != self.own_process:
                log.warning("[delivery] own_process changes take effect at the next start")
            if self.worker is not None and self._session is not None:
                policies, composer = self._worker_setup(config, renderer)
                # A channel of another type now starts no lane until what the old receiver
                # rendered for its old type is forgotten (below): a callback rendered before
                # the swap may commit after the first forgetting.
                self.worker.configure(
                    policies,
                    config.delivery,
                    composer,
                    config.store.retention_h * 3600,
                    held=retyped,
                )
            if self.delivery is not None:
                self.delivery.reload()  # the delivery process reads the file again
            self.config, self.renderer = config, renderer
            old, self.receiver = self.receiver, self._receiver(config, renderer)
            self.receiver.take_over(old)
            old.retyped = frozenset(retyped)  # what it still handles is rendered when sent
            # A callback the old receiver is still handling (its body still arriving) is routed
            # by the old routes: it may yet record a delivery to a removed channel, which no lane
            # would ever send. Bury once such callbacks have finished; the slow ones, later.
            if unfinished := await _finish(old, SETTLE_S):
                log.warning(
                    "%d callbacks received under the old config still unfinished after %gs: "
                    "their deliveries to removed channels are buried when they finish",
                    unfinished, SETTLE_S,
                )  # fmt: skip
            try:
                buried, settled = await self._settle_channels(retyped), True
            except StoreUnavailable as exc:
                # The new config is in force: the reload is not refused for this (it answered
                # 500 with a traceback, and nothing settled the channels again).
                log.error("reload: deliveries to removed or retyped channels are settled once "
                          "the store takes it: %s", exc)  # fmt: skip
                buried, settled = 0, False
            if unfinished or not settled:
                # Settled (again) later; retyped channels wait till then, for the callbacks
                # still unfinished, each of which may have rendered for the old type.
                self._settle_later(old, retyped)
            elif self.worker is not None:
                self.worker.release(retyped)
            self.metrics.reloads.labels("success").inc()
            self.last_reload = (time.time(), None)
            message = f"reloaded: {len(config.channels)} channels, {len(config.routes)} routes"
            if buried:
                message += f"; {buried} deliveries to removed channels are dead letters"
            log.info("%s", message)
            return True, message

    async def _settle_channels(self, retyped: list[str]) -> int:
        """Undelivered deliveries to channels no running replica serves (on SQLite: the running
        config lacks) become dead letters (bridge/presence.py); those to `retyped` channels
        (another type now) are rendered again when sent. How many were buried."""
        await self.presence.announce(list(self.config.channels))  # the old config's no more
        buried = await self.presence.bury()
        if retyped and (rerendered := await self.store.forget_payloads(retyped)):
            log.info("%d deliveries to channels of another type are rendered again when sent",
                     rerendered)  # fmt: skip
        return buried

    def _settle_later(self, old: Receiver, retyped: list[str]) -> None:
        burial = asyncio.create_task(self._bury_when_finished(old, retyped))
        self._late_burials.add(burial)
        burial.add_done_callback(self._late_burials.discard)

    async def _bury_when_finished(self, old: Receiver, retyped: list[str]) -> None:
        """Settle the channels (bury, forget) once `old`'s callbacks have finished, and until
        the store takes it; then release the retyped ones. A stop cancels it: the next start
        buries what removed channels still have."""
        try:
            await _finish(old, None, step_s=0.1)
            while True:
                try:
                    # Not amid another reload: it announces its channels and the running
                    # config's, which this would announce alone.
                    async with self._reloading:
                        buried = await self._settle_channels(retyped)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(SETTLE_AGAIN_S)
        finally:
            if self.worker is not None:
                self.worker.release(retyped)
        if buried:
            log.warning("%d deliveries to removed channels are dead letters (recorded by "
                        "callbacks received under the old config)", buried)  # fmt: skip


async def _finish(receiver: Receiver, within_s: float | None, step_s: float = 0.01) -> int:
    """Wait up to `within_s` (None: as long as it takes) for the callbacks `receiver` is
    handling; returns how many are still unfinished."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within_s):
            # Polled: the callback path only counts, and a reload can afford the steps.
            while receiver.in_flight:  # noqa: ASYNC110
                await asyncio.sleep(step_s)
    return receiver.in_flight
