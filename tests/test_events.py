from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from bridge.events import MODELS, Envelope, OwnerChanged, RoomDestroyed
from bridge.events_body import decode_body
from bridge.events_parse import parse_event
from bridge.samples import SAMPLES

SEED = (
    b'{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":"room_id",'
    b'"EventTime":1703589922780,"Operator_Account":"admin","CurrentOwner_Account":"user2",'
    b'"OriginalOwner_Account":"user1"}'
)


def test_seed_sample_parses_as_owner_changed() -> None:
    event = parse_event(decode_body(SEED))
    assert isinstance(event, OwnerChanged)
    assert (event.RoomId, event.CurrentOwner_Account, event.OriginalOwner_Account) == (
        "room_id", "user2", "user1",
    )  # fmt: skip
    assert event.Operator_Account == "admin" and event.EventTime == 1703589922780


def test_big_integer_accounts_keep_every_digit() -> None:
    body = (
        b'{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":9007199254740993,'
        b'"Operator_Account":144115233775727695,"CurrentOwner_Account":18446744073709551617,'
        b'"OriginalOwner_Account":"user1"}'
    )
    fields = decode_body(body)
    event = parse_event(fields)
    assert isinstance(event, OwnerChanged)
    assert event.RoomId == "9007199254740993"
    assert event.Operator_Account == "144115233775727695"
    assert event.CurrentOwner_Account == "18446744073709551617"
    # The raw fields keep the numbers as exact integers for webhook bodies.
    assert json.dumps(fields["Operator_Account"]) == "144115233775727695"


def test_nested_accounts_too() -> None:
    fields = decode_body(
        b'{"CallbackCommand":"Live.CallbackAfterMemberStateChanged","RoomId":"r",'
        b'"MemberList":[{"Member_Account":144115233775727695}]}'
    )
    event = parse_event(fields)
    assert event.model_dump()["MemberList"][0]["Member_Account"] == "144115233775727695"


def test_system_operator_and_missing_event_time() -> None:
    event = parse_event(
        {"CallbackCommand": "Live.CallbackAfterDestroyRoom", "RoomId": "r",
         "Operator_Account": "@TIM#SYSTEM", "EventType": "DestroyBySystem"}
    )  # fmt: skip
    assert isinstance(event, RoomDestroyed)
    assert event.EventTime is None and event.Operator_Account == "@TIM#SYSTEM"


def test_unknown_command_passes_through_the_envelope_keeping_fields() -> None:
    event = parse_event({"CallbackCommand": "Follow.CallbackAfterFollowAdd", "Extra": {"a": 1}})
    assert type(event) is Envelope
    assert event.model_dump()["Extra"] == {"a": 1}


def test_every_command_in_the_table_has_a_model() -> None:
    assert len(MODELS) == 14
    assert all(issubclass(m, Envelope) for m in MODELS.values())


@pytest.mark.parametrize("millis", [-(2**63), -1, 0, 10**11, 1703589922780, 2**63 - 1])
def test_event_time_takes_the_whole_64_bit_range(millis: int) -> None:
    body = b'{"CallbackCommand": "x", "EventTime": %d}' % millis
    assert parse_event(decode_body(body)).EventTime == millis


@pytest.mark.parametrize(
    ("seconds", "millis"),
    [(1703589922, 1703589922000), (1, 1000), (10**11 - 1, (10**11 - 1) * 1000)],
)
def test_an_event_time_in_seconds_is_read_as_seconds(seconds: int, millis: int) -> None:
    body = b'{"CallbackCommand": "x", "EventTime": %d}' % seconds
    assert parse_event(decode_body(body)).EventTime == millis


def test_a_number_among_deleted_metadata_keys_is_read_as_its_digits() -> None:
    # As a metadata item's Key: the whole list was left unset ("? keys") for one number.
    fields = {"CallbackCommand": "Live.CallbackAfterDelMetadata", "RoomId": "r",
              "Keys": [7, "k2", 144115233775727695]}  # fmt: skip
    assert parse_event(fields).model_dump()["Keys"] == ["7", "k2", "144115233775727695"]


@pytest.mark.parametrize(
    ("fields", "room"),
    [
        ({"FromRoomInfo": '{"RoomId": "from", "Score": 3}'}, "from"),
        ({"FromRoomInfo": ' {"RoomId": 144115233775727695}'}, "144115233775727695"),
        ({"ToRoomList": '[{"RoomId": "to"}]', "FromRoomId": "x"}, "x"),
        ({"FromRoomInfo": "{not json"}, None),
        ({"FromRoomInfo": "[1, 2]"}, None),
    ],
)
def test_an_object_sent_as_its_json_text_is_read(fields: dict[str, Any], room: str | None) -> None:
    # Tencent's tables type FromRoomInfo as a String.
    event = parse_event({"CallbackCommand": "Live.CallbackAfterStartBattle", **fields})
    assert event.room() == room
    if "ToRoomList" in fields:
        assert event.model_dump()["ToRoomList"] == [{"RoomId": "to", "Owner_Account": None,
                                                     "Score": None}]  # fmt: skip


def _at(node: Any, path: str) -> Any:
    """The value at a dotted path of a dumped event; None where any step of it is unset."""
    for step in path.split("."):
        if node is None:
            return None
        node = node[int(step)] if isinstance(node, list) else node[step]
    return node


def _int_paths(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _int_paths(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _int_paths(v, (*path, i))]
    return [path] if isinstance(node, int) and not isinstance(node, bool) else []


def _typed_int(command: str, path: tuple[str | int, ...]) -> bool:
    node: Any = parse_event(SAMPLES[command]).model_dump()
    for step in path:
        node = node[step]
    return isinstance(node, int)  # accounts and room IDs become text, with every digit


def _with(body: dict[str, Any], path: tuple[str | int, ...], value: int) -> dict[str, Any]:
    body = copy.deepcopy(body)
    node: Any = body
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return body


INTEGERS = [
    (command, path)
    for command, body in SAMPLES.items()
    for path in _int_paths(body)
    if path != ("EventTime",) and _typed_int(command, path)
]


@pytest.mark.parametrize(("command", "path"), INTEGERS)
def test_integers_take_64_bits_signed_or_not(command: str, path: tuple[str | int, ...]) -> None:
    for value in (-(2**63), 2**64 - 1):
        event = parse_event(_with(SAMPLES[command], path, value))
        assert event.model_dump()[str(path[0])] is not None
    for value in (-(2**63) - 1, 2**64, 10**400):
        # Beyond Tencent's Integer: left unset, where a template's arithmetic would fail.
        event = parse_event(_with(SAMPLES[command], path, value))
        assert _at(event.model_dump(), ".".join(map(str, path))) is None


@pytest.mark.parametrize(
    ("fields", "room"),
    [
        ({"RoomId": "r1", "RoomInfo": {"RoomId": "r2"}}, "r1"),
        ({"RoomInfo": {"RoomId": "r2"}}, "r2"),
        ({"RoomInfo": {"RoomId": 144115233775727695}}, "144115233775727695"),
        ({"FromRoomInfo": {"RoomId": "r3"}}, "r3"),
        ({"FromRoomId": "r4"}, "r4"),
        ({}, None),
    ],
)
@pytest.mark.parametrize(
    "command",
    ["Live.CallbackAfterCreateRoom", "Live.CallbackAfterStartBattle", "Live.CallbackAfterNew"],
)
def test_room_falls_back_to_nested_room_ids(
    command: str, fields: dict[str, object], room: str | None
) -> None:
    # Typed nested models and unknown fields kept as plain dicts both resolve.
    assert parse_event({"CallbackCommand": command, **fields}).room() == room
