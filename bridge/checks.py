"""Start-up checks that need more than the config file: every template a route can reach.

Each (route, channel, command) a route can produce is rendered once with a sample event, so a
missing template, a syntax error or a StrictUndefined typo stops start-up with the route, the
channel and the template line named, instead of failing when an event arrives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase

from bridge.config import Config, Route
from bridge.events import MODELS, parse_event
from bridge.render import Context, Renderer, RenderError
from bridge.samples import UNKNOWN_SAMPLE, sample


@dataclass(frozen=True)
class Problem:
    route: str | None  # None: a channel's own template (its digest), whichever route uses it
    channel: str
    command: str
    error: str

    def __str__(self) -> str:
        where = f"route {self.route!r}, " if self.route is not None else ""
        return f"{where}channel {self.channel!r}, {self.command}: {self.error}"


def reachable_commands(route: Route) -> list[str]:
    """The commands a route can see: known ones its globs match, plus names it spells out."""
    if route.commands is None:
        return [*MODELS, str(UNKNOWN_SAMPLE["CallbackCommand"])]
    known = [c for c in MODELS if any(fnmatchcase(c, p) for p in route.commands)]
    spelled = [p for p in route.commands if p not in MODELS and not set("*?[") & set(p)]
    return known + spelled


def _combinations(config: Config) -> Iterator[tuple[Route, str, str]]:
    for route in config.routes:
        for channel in route.channels:
            for command in reachable_commands(route):
                yield route, channel, command


def check_templates(config: Config, renderer: Renderer) -> list[Problem]:
    """Every problem found rendering what the routes can send; empty when all is well."""
    ctx = Context(sdk_app_id=config.tencent.sdk_app_id[0], received_at=time.time(), query={})
    problems = _check_digests(config, renderer, ctx)
    done: set[tuple[str, str, str | None]] = set()
    for route, name, command in _combinations(config):
        channel = config.channels[name]
        key = (channel.type, command, channel.template)
        if key in done:
            continue
        done.add(key)
        fields = sample(command)
        try:
            renderer.render(channel.type, parse_event(fields), fields, ctx, channel.template)
        except RenderError as exc:
            problems.append(Problem(route.name, name, command, str(exc)))
    return problems


def _check_digests(config: Config, renderer: Renderer, ctx: Context) -> list[Problem]:
    """A digest of one sample of every command, for each channel that makes digests."""
    items = [(parse_event(fields), fields, ctx) for fields in map(sample, [*MODELS, "Live.X"])]
    problems = []
    for name, channel in config.channels.items():
        if getattr(channel, "digest_after", 0):
            explicit = getattr(channel, "digest_template", None)
            try:
                renderer.render_digest(channel.type, items, explicit, whole=False)
            except RenderError as exc:
                problems.append(Problem(None, name, "digest", str(exc)))
    return problems
