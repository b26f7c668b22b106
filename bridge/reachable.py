"""Which commands a route can see, for the template checks: the commands of Tencent's table
its globs match, the names it spells out, and for each glob a command outside the table that it
matches (such a command gets `T/default.j2`, which must render too).
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator
from fnmatch import fnmatchcase

from bridge.config_tables import Route
from bridge.events import MODELS
from bridge.samples import UNKNOWN_SAMPLE

UNLISTED = str(UNKNOWN_SAMPLE["CallbackCommand"])  # a command outside Tencent's table
GLOB = set("*?[")
FILL = "SomethingNew"  # what a "*" stands for in a command made up to match a glob
CHARACTERS = string.ascii_letters + string.digits + string.punctuation  # what "?" and "[" try


def reachable_commands(route: Route) -> list[str]:
    """The commands a route can see: known ones its globs match, names it spells out, and a
    command outside Tencent's table for each glob that matches one (it gets `T/default.j2`)."""
    if route.commands is None:
        return [*MODELS, UNLISTED]
    known = [c for c in MODELS if any(fnmatchcase(c, p) for p in route.commands)]
    spelled = [p for p in route.commands if p not in MODELS and not GLOB & set(p)]
    unlisted = [_unlisted(p) for p in route.commands if GLOB & set(p)]
    return list(dict.fromkeys([*known, *spelled, *(c for c in unlisted if c is not None)]))


def route_sees(route: Route, command: str) -> bool:
    """Whether `route`'s commands admit `command` (its other matchers aside)."""
    return route.commands is None or any(fnmatchcase(command, p) for p in route.commands)


def _unlisted(pattern: str) -> str | None:
    """A command outside Tencent's table that the glob `pattern` matches: the unknown sample's,
    or the pattern with its wildcards filled in ("Group.*" → "Group.SomethingNew",
    "Live.CallbackAfter[CD]*" → "Live.CallbackAfterCSomethingNew"); None if it matches none."""
    if fnmatchcase(UNLISTED, pattern):
        return UNLISTED
    # Each filling differs from the others: of len(MODELS) + 1 of them, one is not in the table.
    for parts in itertools.islice(itertools.product(*_choices(pattern)), len(MODELS) + 1):
        command = "".join(parts)
        if command not in MODELS and fnmatchcase(command, pattern):
            return command
    return None


def _choices(pattern: str) -> Iterator[list[str]]:
    """What each part of a glob may stand for, as fnmatch reads it: a "*" FILL, a "?" any
    character ("X" first), a "[...]" class the characters it admits, anything else itself."""
    start = 0
    while start < len(pattern):
        char, end = pattern[start], start
        if char == "*":
            yield [FILL]
        elif char == "?":
            yield list(dict.fromkeys("X" + CHARACTERS))
        elif char == "[" and (close := _class_end(pattern, start)) != -1:
            group, end = pattern[start : close + 1], close
            # Its own characters too: "[é]" admits none of CHARACTERS.
            yield [c for c in dict.fromkeys(CHARACTERS + group) if fnmatchcase(c, group)]
        else:
            yield [char]
        start = end + 1


def _class_end(pattern: str, start: int) -> int:
    """Where the "[" at `start` is closed, as fnmatch reads it ("!" first negates, a "]" first
    is a member), or -1: an unclosed "[" is itself."""
    end = start + 1
    if pattern.startswith("!", end):
        end += 1
    if pattern.startswith("]", end):
        end += 1
    return pattern.find("]", end)
