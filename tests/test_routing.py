from __future__ import annotations

import pytest

from bridge.config_tables import Route
from bridge.events import Envelope
from bridge.routing import Router

OWNER = "Live.CallbackAfterChangeOwner"
CREATE = "Live.CallbackAfterCreateRoom"

ROUTES = (
    Route(name="vip", rooms=("vip-*",), channels=("moderators", "audit")),
    Route(
        name="games", room_regex="^game-[0-9]+$", commands=(OWNER,), operators=("admin*",),
        channels=("mod-bot", "audit"), continue_=True,
    ),
    Route(name="creations", commands=("*CreateRoom",), channels=("audit",), continue_=True),
    Route(name="everything else", channels=("console",)),
)  # fmt: skip


def event(command: str = OWNER, room: str | None = "r", operator: str | None = "u") -> Envelope:
    return Envelope(CallbackCommand=command, RoomId=room, Operator_Account=operator)


@pytest.mark.parametrize(
    ("incoming", "channels", "routes"),
    [
        (event(room="vip-1"), ("moderators", "audit"), ("vip",)),
        (event(room="VIP-1"), ("console",), ("everything else",)),  # globs are case-sensitive
        (event(room="game-12", operator="admin7"),
         ("mod-bot", "audit", "console"), ("games", "everything else")),
        (event(room="game-12", operator="user"), ("console",), ("everything else",)),
        (event(room="game-12x", operator="admin"), ("console",), ("everything else",)),
        (event(CREATE, room="game-12", operator="admin"),
         ("audit", "console"), ("creations", "everything else")),
        (event(room=None), ("console",), ("everything else",)),
        (event(operator=None, room="game-1"), ("console",), ("everything else",)),
        (event(CREATE, room="vip-2"), ("moderators", "audit"), ("vip",)),  # first match stops
    ],
)  # fmt: skip
def test_route_order_continue_and_unique_channels(
    incoming: Envelope, channels: tuple[str, ...], routes: tuple[str, ...]
) -> None:
    match = Router(ROUTES).route_event(incoming)
    assert match.channels == channels
    assert match.routes == routes


def test_no_route_matches() -> None:
    router = Router((Route(name="vip", rooms=("vip-*",), channels=("c",)),))
    match = router.route_event(event(room="plain"))
    assert match.channels == () and match.routes == ()


def test_channel_named_by_two_routes_appears_once() -> None:
    router = Router(
        (Route(name="a", channels=("x", "y"), continue_=True), Route(name="b", channels=("y", "x")))
    )
    assert router.route_event(event()).channels == ("x", "y")


@pytest.mark.parametrize(
    ("regex", "room", "matches"),
    [
        ("game-[0-9]+$", "x-game-1", True),  # re.search: anywhere in the room, unless anchored
        ("game-[0-9]+", "game-1-final", True),
        ("^game-[0-9]+$", "x-game-1", False),
        ("game", None, False),  # no room, no match
    ],
)
def test_room_regex_is_searched_in_the_room(regex: str, room: str | None, matches: bool) -> None:
    router = Router((Route(name="r", room_regex=regex, channels=("c",)),))
    assert router.route_event(event(room=room)).channels == (("c",) if matches else ())
