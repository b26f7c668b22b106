"""Every sample parses and renders through its own templates; hostile values stay inert."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config_tables import TemplatesConfig
from bridge.events import MODELS, OWNER_CHANGED, GiftSending, RoomCreated
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer
from bridge.samples import HOSTILE_VALUES, SAMPLES, UNKNOWN_SAMPLE, hostile, sample
from tests.bridge_server import SEED_BODY
from tests.payloads import strings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RENDERER = Renderer(
    TemplatesConfig(dir=TEMPLATES, room_url="https://console.example.com/rooms/{room_id}")
)
CTX = Context(sdk_app_id=1400000000, received_at=1703589923.0, query={})

KNOWN = sorted(MODELS)
UNKNOWN = str(UNKNOWN_SAMPLE["CallbackCommand"])
ALL = [*KNOWN, UNKNOWN]
KINDS = ("slack", "console", "webhook")

# Slack tokens that notify people or disguise links; none may survive into a payload.
FORBIDDEN = ("<!channel>", "<!here>", "<!everyone>", "<@U", "<!subteam", "<http://evil")
DATE_TOKEN = re.compile(r"<!date\^[^<>]*>")


def render(kind: str, body: dict[str, Any]) -> str:
    return RENDERER.render(kind, parse_event(body), body, CTX)


def render_slack(body: dict[str, Any]) -> dict[str, Any]:
    payload = json.loads(render("slack", body))
    assert isinstance(payload, dict)
    return payload


def check_slack_shape(payload: dict[str, Any]) -> None:
    assert isinstance(payload["text"], str) and payload["text"].strip()
    blocks = payload["blocks"]
    assert isinstance(blocks, list) and 0 < len(blocks) <= 50
    for block in blocks:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= 150
        elif block["type"] == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                assert 0 < len(block["text"]["text"]) <= 3000
            assert len(block.get("fields", [])) <= 10
            assert all(len(f["text"]) <= 2000 for f in block.get("fields", []))
        elif block["type"] == "context":
            assert 0 < len(block["elements"]) <= 10


# --- the samples themselves ------------------------------------------------------------------


def test_a_sample_for_every_known_command() -> None:
    assert set(SAMPLES) == set(MODELS)
    for command, body in SAMPLES.items():
        assert body["CallbackCommand"] == command
    assert UNKNOWN not in MODELS


def test_owner_change_sample_is_tencents_own() -> None:
    assert SAMPLES[OWNER_CHANGED] == json.loads(SEED_BODY)


def test_samples_carry_tencents_quirks() -> None:
    ints = [v for body in SAMPLES.values() for v in _leaves(body) if type(v) is int]
    assert any(v > 2**53 for v in ints)
    destroyed = SAMPLES["Live.CallbackAfterDestroyRoom"]
    assert destroyed["EventType"] == "DestroyBySystem"
    assert destroyed["Operator_Account"] == "@TIM#SYSTEM"


def test_big_account_keeps_every_digit() -> None:
    event = parse_event(sample("Live.CallbackAfterCreateRoom"))
    assert isinstance(event, RoomCreated) and event.RoomInfo is not None
    assert event.RoomInfo.Owner_Account == "144115233775727695"


def test_sample_returns_an_independent_copy() -> None:
    body = sample("Live.CallbackAfterSetMetadata")
    body["Metadata"][0]["Key"] = "changed"
    assert sample("Live.CallbackAfterSetMetadata")["Metadata"][0]["Key"] != "changed"


def test_sample_for_an_unknown_command_uses_the_unknown_sample() -> None:
    body = sample("Live.CallbackAfterNeverHeardOf")
    assert body["CallbackCommand"] == "Live.CallbackAfterNeverHeardOf"
    assert {k: v for k, v in body.items() if k != "CallbackCommand"} == {
        k: v for k, v in UNKNOWN_SAMPLE.items() if k != "CallbackCommand"
    }
    assert UNKNOWN_SAMPLE["CallbackCommand"] == UNKNOWN  # the shared sample is untouched


@pytest.mark.parametrize("command", ALL)
def test_hostile_replaces_every_string_but_the_command(command: str) -> None:
    body = hostile(command, "<!here>")
    assert body["CallbackCommand"] == command
    rest = [v for k, v in body.items() if k != "CallbackCommand"]
    assert all(v == "<!here>" for v in _leaves(rest) if isinstance(v, str))
    assert any(v == "<!here>" for v in _leaves(rest))
    assert sample(command)["CallbackCommand"] == command  # the sample is untouched


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for value in node:
            yield from _leaves(value)
    else:
        yield node


# --- rendering the samples -------------------------------------------------------------------


@pytest.mark.parametrize("command", ALL)
def test_sample_parses(command: str) -> None:
    event = parse_event(sample(command))
    assert event.CallbackCommand == command
    assert type(event) is MODELS.get(command, type(event))


@pytest.mark.parametrize("command", KNOWN)
@pytest.mark.parametrize("kind", ("slack", "console"))
def test_known_commands_have_their_own_templates(kind: str, command: str) -> None:
    assert RENDERER.template_name(kind, command, None) == f"{kind}/{command}.j2"


def test_unknown_command_falls_back_to_default() -> None:
    for kind in KINDS:
        assert RENDERER.template_name(kind, UNKNOWN, None) == f"{kind}/default.j2"


@pytest.mark.parametrize("command", ALL)
def test_sample_renders_for_slack(command: str) -> None:
    payload = render_slack(sample(command))
    check_slack_shape(payload)
    blocks = payload["blocks"]
    if command in MODELS:
        assert blocks[0]["type"] == "header"
        context = [b for b in blocks if b["type"] == "context"]
        assert any(
            e["text"] == f"{command} · SDKAppID 1400000000" for b in context for e in b["elements"]
        )
        assert any("*When*\n<!date^" in s for s in strings(blocks))


@pytest.mark.parametrize("command", ALL)
def test_sample_renders_for_console(command: str) -> None:
    line = render("console", sample(command))
    assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\] ", line)
    assert "\n" not in line
    if command in MODELS:
        assert command not in line  # its own template, not default.j2's raw dump


@pytest.mark.parametrize("command", ALL)
def test_sample_renders_for_webhook(command: str) -> None:
    body = sample(command)
    payload = json.loads(render("webhook", body))
    assert payload["type"] == command
    assert payload["event"] == body  # big integers come back with every digit


@pytest.mark.parametrize("command", ALL)
def test_open_room_button_when_the_event_names_a_room(command: str) -> None:
    body = sample(command)
    buttons = [
        e
        for b in render_slack(body)["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["type"] == "button"
    ]
    if command not in MODELS:
        return  # default.j2 has no button
    room = parse_event(body).room()  # RoomId, or the room inside RoomInfo / a battle
    expected = [] if room is None else [f"https://console.example.com/rooms/{room}"]
    assert [b["url"] for b in buttons] == expected


def test_owner_change_reads_well() -> None:
    payload = render_slack(sample(OWNER_CHANGED))
    assert payload["text"] == "Room owner changed in room_id: user1 → user2"


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_an_all_none_event_renders(kind: str, command: str) -> None:
    out = render(kind, {"CallbackCommand": command})
    if kind == "console":
        assert out.startswith("[") and "\n" not in out
    elif kind == "slack":
        check_slack_shape(json.loads(out))
    else:
        assert json.loads(out)["event"] == {"CallbackCommand": command}


# --- hostile values --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v[:20]))
def test_hostile_values_cannot_ping_or_link_in_slack(value: str, command: str) -> None:
    payload = render_slack(hostile(command, value))
    check_slack_shape(payload)
    for text in strings(payload):
        for token in FORBIDDEN:
            assert token not in text
        # Nothing but the bridge's own date token may open a Slack control sequence.
        assert "<" not in DATE_TOKEN.sub("", text)


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v[:20]))
def test_hostile_values_keep_the_console_to_one_line(value: str, command: str) -> None:
    line = render("console", hostile(command, value))
    assert "\n" not in line and "\r" not in line
    assert "\x1b" not in line


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v[:20]))
def test_hostile_values_pass_through_webhooks_untouched(value: str, command: str) -> None:
    body = hostile(command, value)
    assert json.loads(render("webhook", body))["event"] == body


# --- long lists ------------------------------------------------------------------------------


def _many(body: dict[str, Any], key: str, item: Callable[[int], Any]) -> None:
    body[key] = [item(i) for i in range(25)]


LONG_LISTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Live.CallbackAfterSetMetadata": lambda b: _many(
        b, "Metadata", lambda i: {"Key": f"item{i:02d}", "Value": "v"}
    ),
    "Live.CallbackAfterDelMetadata": lambda b: _many(b, "Keys", lambda i: f"item{i:02d}"),
    "Live.CallbackAfterMemberStateChanged": lambda b: _many(
        b, "MemberList", lambda i: {"Member_Account": f"item{i:02d}"}
    ),
    "Live.CallbackAfterModifyAdmin": lambda b: _many(b, "Admin_Account", lambda i: f"item{i:02d}"),
    "Mic.CallbackAfterSeatInfoChanged": lambda b: _many(
        b, "SeatList", lambda i: {"Index": i, "Member_Account": f"item{i:02d}"}
    ),
    "Live.CallbackAfterCreateBattle": lambda b: _many(b, "ToRoomIdList", lambda i: f"item{i:02d}"),
    "Live.CallbackAfterStartBattle": lambda b: _many(
        b, "ToRoomList", lambda i: {"RoomId": f"item{i:02d}"}
    ),
    "Live.CallbackAfterEndBattle": lambda b: _many(
        b, "ToRoomList", lambda i: {"RoomId": f"item{i:02d}", "Score": 0}
    ),
    "Live.CallbackBeforeSendGift": lambda b: _many(
        b["GiftWater"], "To_Account", lambda i: f"item{i:02d}"
    ),
}


@pytest.mark.parametrize("command", sorted(LONG_LISTS))
def test_long_lists_are_cut_and_counted(command: str) -> None:
    body = sample(command)
    LONG_LISTS[command](body)
    payload = render_slack(body)
    check_slack_shape(payload)
    shown = "\n".join(strings(payload["blocks"]))
    assert "item00" in shown
    assert "item24" not in shown
    assert "more" in shown
    line = render("console", body)
    assert "item00" in line and "item24" not in line and "more" in line


# --- a list left unset -----------------------------------------------------------------------

# A list with an entry that is no item at all is left unset whole (bridge/events_parse.py): its
# count shows as `?`, never as 0, none or nobody; an empty list still shows 0. Each row: the
# command, the list's path in the body, and a value the event model leaves unset.
UNSET_LISTS: list[tuple[str, str, Any]] = [
    ("Live.CallbackAfterMemberStateChanged", "MemberList", [{"Member_Account": "u1"}, 5]),
    ("Mic.CallbackAfterSeatInfoChanged", "SeatList", [{"Index": 0, "Member_Account": "u1"}, 5]),
    ("Live.CallbackAfterModifyAdmin", "Admin_Account", [["x"]]),
    ("Live.CallbackBeforeSendGift", "GiftWater.To_Account", [["x"]]),
    ("Live.CallbackAfterCreateBattle", "ToRoomIdList", [["x"]]),
    ("Live.CallbackAfterStartBattle", "ToRoomList", [{"RoomId": "r1"}, 5]),
    ("Live.CallbackAfterEndBattle", "ToRoomList", [{"RoomId": "r1", "Score": 1}, 5]),
]
LIST_KINDS = ("console", "slack", "digest", "console digest")

# What each kind shows (each fragment, in the sample's otherwise untouched body): for the list
# unset, then for it empty. The console digest writes each event's own console line.
LIST_SHOWS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "Live.CallbackAfterMemberStateChanged": {
        "console": (("live-42, cause Enter, ? members (",), ("cause Enter, 0 members (",)),
        "slack": (
            ("? members went online in room live-42", "*Members*\n—"),
            ("0 members went online in room live-42", "*Members*\n0"),
        ),
        "digest": (("Room *live-42*: ? members went online",), ("*live-42*: 0 members went",)),
    },
    "Mic.CallbackAfterSeatInfoChanged": {
        "console": (("room live-42, ? of ? taken (",), ("room live-42, 0 of 0 taken (",)),
        "slack": (
            ("live-42: ? of ? seats taken", "*Seats taken*\n—"),
            ("live-42: 0 of 0 seats taken", "*Seats taken*\n0 of 0"),
        ),
        "digest": (("seats changed, ? of ? taken",), ("seats changed, 0 of 0 taken",)),
    },
    "Live.CallbackAfterModifyAdmin": {
        "console": (("room live-42, ? (by host_anna",), ("room live-42, none (by host_anna",)),
        "slack": (("*Admins (?)*\n—",), ("*Admins (0)*\n—",)),
        "digest": (("*live-42*: ? admins added",), ("*live-42*: 0 admins added",)),
    },
    "Live.CallbackBeforeSendGift": {
        # The console line shows `?` for no recipient listed, as for recipients unknown.
        "console": (("viewer_01 -> ?, gift rocket",), ("viewer_01 -> ?, gift rocket",)),
        "slack": (("(3000 coins) to ? in room", "*To (?)*\n—"), ("to nobody listed", "*To (0)*")),
        "digest": (("(3000 coins) to ?",), ("(3000 coins) to nobody listed",)),
    },
    "Live.CallbackAfterCreateBattle": {
        "console": (("live-42 vs ?, duration",), ("live-42 vs ?, duration",)),
        "slack": (
            ("live-42 vs ? (60 s)", "*Invited rooms (?)*\n—"),
            ("live-42 vs no rooms (60 s)", "*Invited rooms (0)*\n—"),
        ),
        "digest": (("*live-42* vs ? (60 s)",), ("*live-42* vs no rooms (60 s)",)),
    },
    "Live.CallbackAfterStartBattle": {
        "console": (("live-42 vs ?, duration",), ("live-42 vs ?, duration",)),
        "slack": (
            ("live-42 vs ? (60 s)", "*Opponents (?)*\n—"),
            ("live-42 vs no rooms (60 s)", "*Opponents (0)*\n—"),
        ),
        "digest": (("*live-42* vs ? (60 s)",), ("*live-42* vs no rooms (60 s)",)),
    },
    "Live.CallbackAfterEndBattle": {
        # The opponents unknown: no leader either, the origin's score being all that is known.
        "console": (("scores: live-42=1250, opponents=? (",), ("scores: live-42=1250 (",)),
        "slack": (
            ("(time up): live-42 1250 · opponents ?", "*Leader*\n—", "1250\nOpponents: ?"),
            ("(time up): live-42 1250", "*Leader*\nlive-42 with 1250"),
        ),
        "digest": (("*live-42* 1250 · opponents ?",), ("(time up): *live-42* 1250",)),
    },
}

# What would claim the list empty: a count of 0, none, nobody, no rooms.
CLAIMS_EMPTY = re.compile(
    r"\b0 (?:members?|admins?|of)\b|\bof 0\b|\(0\)|\*\n0\b|\bnone\b|nobody|no rooms"
)


def _set_path(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        body = body[key]
    body[last] = value


def _event_value(body: dict[str, Any], path: str) -> Any:
    node: Any = parse_event(body)
    for key in path.split("."):
        node = getattr(node, key)
    return node


def shown(kind: str, body: dict[str, Any]) -> str:
    """Every text `kind` shows for the event `body`: a digest is one of the event alone."""
    if kind == "console":
        return render("console", body)
    if kind == "slack":
        payload = render_slack(body)
        check_slack_shape(payload)
        return "\n".join(strings(payload))
    digest = RENDERER.render_digest(
        "slack" if kind == "digest" else "console", [(parse_event(body), body, CTX)]
    )
    if kind == "console digest":
        return digest
    payload = json.loads(digest)
    check_slack_shape(payload)
    return "\n".join(strings(payload))


def _shows(command: str, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return LIST_SHOWS[command]["console" if kind == "console digest" else kind]


def test_every_unset_list_has_what_it_shows() -> None:
    assert {command for command, _, _ in UNSET_LISTS} == set(LIST_SHOWS)
    assert all(set(shows) == {"console", "slack", "digest"} for shows in LIST_SHOWS.values())


@pytest.mark.parametrize(("command", "path", "value"), UNSET_LISTS)
@pytest.mark.parametrize("kind", LIST_KINDS)
def test_an_unset_list_shows_its_count_as_unknown(
    kind: str, command: str, path: str, value: Any
) -> None:
    body = sample(command)
    _set_path(body, path, value)
    assert _event_value(body, path) is None  # the event model leaves the whole list unset
    out = shown(kind, body)
    unset, _ = _shows(command, kind)
    for fragment in unset:
        assert fragment in out
    assert not CLAIMS_EMPTY.search(out), out


@pytest.mark.parametrize(("command", "path", "value"), UNSET_LISTS)
@pytest.mark.parametrize("kind", LIST_KINDS)
def test_an_empty_list_still_shows_none(kind: str, command: str, path: str, value: Any) -> None:
    body = sample(command)
    _set_path(body, path, [])
    assert _event_value(body, path) == []
    out = shown(kind, body)
    unset, empty = _shows(command, kind)
    for fragment in empty:
        assert fragment in out
    for fragment in set(unset) - set(empty):
        assert fragment not in out


@pytest.mark.parametrize("kind", LIST_KINDS)
def test_an_unset_gift_shows_its_recipients_as_unknown(kind: str) -> None:
    body = sample("Live.CallbackBeforeSendGift")
    body["GiftWater"] = 5
    event = parse_event(body)
    assert isinstance(event, GiftSending) and event.GiftWater is None
    out = shown(kind, body)
    assert {"console": "-> ?", "slack": "*To (?)*", "digest": " to ?"}.get(kind, "-> ?") in out
    assert not CLAIMS_EMPTY.search(out), out
