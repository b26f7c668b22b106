from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from bridge.events import (
    MODELS,
    OWNER_CHANGED,
    BadEvent,
    Envelope,
    OwnerChanged,
    RoomDestroyed,
    decode_body,
    parse_event,
)
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


def test_a_byte_order_mark_in_front_is_read_past() -> None:
    body = b"\xef\xbb\xbf" + json.dumps(SAMPLES[OWNER_CHANGED]).encode()
    assert parse_event(decode_body(body)).RoomId == SAMPLES[OWNER_CHANGED]["RoomId"]
    with pytest.raises(BadEvent, match="not valid JSON"):
        decode_body(b"\xef\xbb\xbf\xef\xbb\xbf{}")  # one, in front: no more


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"CallbackCommand": NaN}', "not a JSON number"),
        (b'{"a": 1e999999}', None),  # parses (inf) but then lacks CallbackCommand
        (b"{}", "string CallbackCommand"),
        (b'{"CallbackCommand": 5}', "string CallbackCommand"),
        (b'{"CallbackCommand": ""}', "string CallbackCommand"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"CallbackCommand": "x", "RoomId": "' + b"9" * 5000 + b'"}', None),  # fine: a string
        (b'{"CallbackCommand": "x", "v": 1e400}', "out of range"),
        (b'{"CallbackCommand": "x", "v": -1e400}', "out of range"),
        (b'{"CallbackCommand": "x\\u0000"}', "NUL"),
        (b'{"CallbackCommand": "x", "RoomId": "r\\u0000"}', "NUL"),
        (b'{"CallbackCommand": "x", "FromRoomId": "r\\u0000"}', "NUL"),
    ],
)
def test_bad_bodies_are_refused_with_a_short_reason(body: bytes, message: str | None) -> None:
    if message is None and b'"x"' in body:
        assert parse_event(decode_body(body)).RoomId == "9" * 5000
        return
    with pytest.raises(BadEvent) as caught:
        parse_event(decode_body(body))
    if message is not None:
        assert message in str(caught.value)
    assert len(str(caught.value)) <= 200


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


ODD_FIELDS = [
    # Tencent's tables type some fields otherwise than its samples; none of these is refused.
    ("Live.CallbackAfterChangeOwner", {"RoomId": {}}, "RoomId"),
    ("Live.CallbackAfterChangeOwner", {"EventTime": "soon"}, "EventTime"),
    ("x", {"EventTime": 2**63}, "EventTime"),
    ("x", {"EventTime": -(2**63) - 1}, "EventTime"),
    ("x", {"EventTime": True}, "EventTime"),
    ("x", {"EventTime": [1703589922780]}, "EventTime"),
    ("x", {"Operator_Account": [1]}, "Operator_Account"),
    ("Live.CallbackAfterModifyAdmin", {"Admin_Account": "a"}, "Admin_Account"),
    ("Live.CallbackAfterStartBattle", {"FromRoomInfo": "live-42"}, "FromRoomInfo"),
    ("Live.CallbackAfterStartBattle", {"Duration": 1.5}, "Duration"),
    ("Live.CallbackAfterCreateBattle", {"Duration": 10**400}, "Duration"),
    ("Live.CallbackAfterCreateBattle", {"Timeout": 2**64}, "Timeout"),
    ("Live.CallbackAfterCreateBattle", {"ExtensionInfo": {"a": 1}}, "ExtensionInfo"),
    ("Live.CallbackAfterCreateRoom", {"RoomInfo": {"Category": 3}}, "RoomInfo.Category"),
    ("Live.CallbackAfterCreateRoom", {"RoomInfo": "r"}, "RoomInfo"),
    ("Live.CallbackAfterCreateRoom", {"RoomInfo": '{"RoomId": "r", "Category": "music"}'},
     "RoomInfo.Category"),  # sent as its JSON text: read, and only the bad field left out
    ("Live.CallbackAfterCreateRoom", {"RoomInfo": '{"RoomId": "\\ud800"}'}, "RoomInfo"),
    ("Live.CallbackAfterSetMetadata", {"Metadata": [{"Key": [5]}]}, "Metadata"),  # Key: required
    ("Live.CallbackAfterSetMetadata", {"Metadata": [{"Key": "k", "Value": [5]}]},
     "Metadata.0.Value"),
    ("Live.CallbackAfterSetMetadata", {"Metadata": [{"Key": "k"}, 5]}, "Metadata"),  # no item
    ("Live.CallbackAfterDelMetadata", {"Keys": "k"}, "Keys"),
    ("Live.CallbackAfterDelMetadata", {"Keys": ["k", ["j"]]}, "Keys"),
    ("Live.CallbackBeforeSendGift", {"GiftWater": {"To_Account": "u"}}, "GiftWater.To_Account"),
    ("Live.CallbackAfterDestroyRoom", {"Statistic": {"TotalGiftCoins": 2.5}},
     "Statistic.TotalGiftCoins"),
    ("Live.CallbackAfterEndBattle", {"ToRoomList": [{"RoomId": "a"}, {"Score": "high"}]},
     "ToRoomList.1.Score"),
]  # fmt: skip


def _at(node: Any, path: str) -> Any:
    """The value at a dotted path of a dumped event; None where any step of it is unset."""
    for step in path.split("."):
        if node is None:
            return None
        node = node[int(step)] if isinstance(node, list) else node[step]
    return node


@pytest.mark.parametrize(("command", "odd", "path"), ODD_FIELDS)
def test_a_field_not_as_documented_is_left_unset_and_the_event_kept(
    command: str, odd: dict[str, Any], path: str, caplog: pytest.LogCaptureFixture
) -> None:
    fields = {"CallbackCommand": command, "Operator_Account": "admin", **odd}
    arrived = copy.deepcopy(fields)
    event = parse_event(fields)
    dumped = event.model_dump()
    assert _at(dumped, path) is None
    if "." in path:  # only the field: what holds it is read as usual
        assert _at(dumped, path.rpartition(".")[0]) is not None
    assert event.CallbackCommand == command
    if path != "Operator_Account":
        assert event.Operator_Account == "admin"  # the rest is read as usual
    assert fields == arrived  # the templates' `fields` keep it as it arrived


def test_a_room_keeps_its_id_whatever_else_in_it_is_not_as_documented() -> None:
    # One field of another type dropped all of RoomInfo: the room, its owner and name with it,
    # so the event matched no room route and was ordered and threaded with no room.
    room_info = {
        "RoomId": "vip-1", "RoomName": "Friday", "Owner_Account": 144115233775727695,
        "Category": "1", "ActivityStatus": "live", "MaxSeatCount": [8], "CustomInfo": {"a": 1},
    }  # fmt: skip
    for command in ("Live.CallbackAfterCreateRoom", "Live.CallbackAfterUpdateRoomInfo"):
        event = parse_event({"CallbackCommand": command, "RoomInfo": room_info})
        assert event.room() == "vip-1"
        got = event.model_dump()["RoomInfo"]
        assert (got["RoomName"], got["Owner_Account"]) == ("Friday", "144115233775727695")
        assert [got[k] for k in ("Category", "ActivityStatus", "MaxSeatCount", "CustomInfo")] == [
            None, None, None, None,
        ]  # fmt: skip


def test_a_list_of_many_bad_items_is_copied_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Copied once an error, a list of 26,000 bad items (a 256 KiB body) took 3 s on the event
    # loop, and every other callback waited.
    copies = 0
    real = copy.copy

    def counted(value: Any) -> Any:
        nonlocal copies
        copies += isinstance(value, list)  # the items are copied each once: theirs change
        return real(value)

    monkeypatch.setattr(copy, "copy", counted)
    fields = {"CallbackCommand": "Live.CallbackAfterSetMetadata", "RoomId": "r",
              "Metadata": [{"Key": [n]} for n in range(5000)]}  # fmt: skip
    assert parse_event(fields).model_dump()["Metadata"] is None and copies == 1


def test_one_metadata_item_not_as_documented_leaves_the_others() -> None:
    fields = {
        "CallbackCommand": "Live.CallbackAfterSetMetadata", "RoomId": "r",
        "Metadata": [{"Key": "viewers", "Value": [5]}, {"Key": "title", "Value": "hello"},
                     {"Key": 7, "Value": 8}],  # numbers for text: read as their digits
    }  # fmt: skip
    event = parse_event(fields)
    assert event.model_dump()["Metadata"] == [
        {"Key": "viewers", "Value": None}, {"Key": "title", "Value": "hello"},
        {"Key": "7", "Value": "8"},
    ]  # fmt: skip


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


def test_a_deep_unknown_field_beside_one_not_as_documented_is_no_error() -> None:
    # Only what is left out is copied: the rest of the body, however deep, is not walked.
    text = (
        '{"CallbackCommand":"Live.CallbackAfterCreateRoom","RoomInfo":{"RoomId":"r","Category":"1"},'
        f'"deep":{"[" * 600 + "]" * 600}}}'
    )
    event = parse_event(decode_body(text.encode()))
    assert event.room() == "r"


def test_a_field_not_as_documented_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bridge.events")
    for n in range(3):
        parse_event({"CallbackCommand": "Mic.CallbackAfterSeatInfoChanged", "SeatList": n})
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "SeatList" in warned[0] and "the event is kept" in warned[0]


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


def test_fractional_numbers_keep_their_value() -> None:
    fields = decode_body(b'{"CallbackCommand": "x", "Score": 1.5, "Ratio": -2.5e-3}')
    assert (fields["Score"], fields["Ratio"]) == (1.5, -0.0025)


def test_nul_elsewhere_is_kept() -> None:
    # Only the command and the room are stored as columns; other values stay in the JSON body.
    event = parse_event(decode_body(b'{"CallbackCommand": "x", "Operator_Account": "a\\u0000"}'))
    assert event.Operator_Account == "a\0"


def test_huge_integer_literal_is_refused_not_crashing() -> None:
    with pytest.raises(BadEvent):
        decode_body(b'{"CallbackCommand": "x", "n": ' + b"9" * 5000 + b"}")


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(BadEvent, match="surrogate"):
        decode_body(b'{"CallbackCommand": "x", "RoomId": "\\ud800"}')


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
