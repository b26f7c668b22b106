"""Which channels an event goes to, by the ordered `[[routes]]` of the config.

Routes are tried in order; every matcher a route gives must hold (rooms: globs on the room,
room_regex: `re.search` on the room, commands and operators: globs; the room is
`Envelope.room()`, RoomId or the room inside RoomInfo); the first match ends the search
unless it has `continue = true`. Each channel appears once in the result, in first-named order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import translate

from bridge.config_tables import Route
from bridge.events import Envelope


@dataclass(frozen=True)
class Match:
    channels: tuple[str, ...]
    routes: tuple[str, ...]  # names of the routes that matched, for logs


def _compile_globs(patterns: Sequence[str] | None) -> re.Pattern[str] | None:
    """One regex for a list of globs, as fnmatchcase reads each; None: no matcher given."""
    if patterns is None:
        return None
    return re.compile("|".join(translate(p) for p in patterns) or "(?!)")  # []: matches nothing


def _globs(compiled: re.Pattern[str] | None, value: str | None) -> bool:
    if compiled is None:
        return True
    return value is not None and compiled.match(value) is not None


@dataclass(frozen=True)
class _Compiled:
    route: Route
    regex: re.Pattern[str] | None
    rooms: re.Pattern[str] | None
    commands: re.Pattern[str] | None
    operators: re.Pattern[str] | None

    @classmethod
    def of(cls, route: Route) -> _Compiled:
        regex = re.compile(route.room_regex) if route.room_regex is not None else None
        return cls(
            route, regex, _compile_globs(route.rooms), _compile_globs(route.commands),
            _compile_globs(route.operators),
        )  # fmt: skip

    def matches(self, event: Envelope) -> bool:
        room = event.room()
        if not _globs(self.rooms, room):
            return False
        if self.regex is not None and (room is None or self.regex.search(room) is None):
            return False
        if not _globs(self.commands, event.CallbackCommand):
            return False
        return _globs(self.operators, event.Operator_Account)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = [_Compiled.of(r) for r in routes]

    def route_event(self, event: Envelope) -> Match:
        channels: dict[str, None] = {}
        names: list[str] = []
        for compiled in self._routes:
            if not compiled.matches(event):
                continue
            names.append(compiled.route.name)
            channels.update(dict.fromkeys(compiled.route.channels))
            if not compiled.route.continue_:
                break
        return Match(channels=tuple(channels), routes=tuple(names))
