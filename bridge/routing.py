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
from fnmatch import fnmatchcase

from bridge.config import Route
from bridge.events import Envelope


@dataclass(frozen=True)
class Match:
    channels: tuple[str, ...]
    routes: tuple[str, ...]  # names of the routes that matched, for logs


def _globs(patterns: Sequence[str] | None, value: str | None) -> bool:
    if patterns is None:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class _Compiled:
    route: Route
    regex: re.Pattern[str] | None

    def matches(self, event: Envelope) -> bool:
        route = self.route
        room = event.room()
        if not _globs(route.rooms, room):
            return False
        if self.regex is not None and (room is None or self.regex.search(room) is None):
            return False
        if not _globs(route.commands, event.CallbackCommand):
            return False
        return _globs(route.operators, event.Operator_Account)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = [
            _Compiled(r, re.compile(r.room_regex) if r.room_regex is not None else None)
            for r in routes
        ]

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
