from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from bridge.config_tables import Route
from bridge.events import MODELS
from bridge.reachable import UNLISTED, reachable_commands


def route(commands: list[str] | None) -> Route:
    return Route(name="r", commands=commands, channels=["console"])


# A glob in `commands` and whether a command outside Tencent's table can match it.
GLOBS = [
    ("Live.*", True),
    ("Live.CallbackAfter[CD]*", True),  # neither the unknown sample nor "[CD]SomethingNew"
    ("Live.CallbackAfter[!C]*", True),
    ("Live.*[0-9]", True),
    ("[LM]i?.Callback*", True),
    ("Live.CallbackAfterChangeOwne[rs]", True),
    ("Live.CallbackAfterChangeOwne[r]", False),  # only the owner change itself
    ("Live.CallbackAfter[", True),  # an unclosed "[" is itself
    ("Live.CallbackAfter[z-a]*", False),  # an empty range: it matches nothing at all
]


@pytest.mark.parametrize(("glob", "unlisted"), GLOBS)
def test_a_glob_is_checked_with_a_command_outside_the_table_it_matches(
    glob: str, unlisted: bool
) -> None:
    commands = reachable_commands(route([glob]))
    outside = [c for c in commands if c not in MODELS]
    assert all(fnmatchcase(c, glob) for c in commands)
    assert len(outside) == unlisted


def test_a_route_without_commands_sees_every_command_and_one_outside_the_table() -> None:
    assert reachable_commands(route(None)) == [*MODELS, UNLISTED]


def test_names_spelled_out_are_kept_in_order_once() -> None:
    commands = reachable_commands(
        route(["Group.Custom", "Live.CallbackAfterChangeOwner", "Group.Custom"])
    )
    assert commands == ["Live.CallbackAfterChangeOwner", "Group.Custom"]


def test_a_glob_matching_the_unknown_sample_uses_it() -> None:
    assert UNLISTED in reachable_commands(route(["*"]))
