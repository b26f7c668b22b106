from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from bridge.events_body import decode_body
from bridge.events_parse import parse_event
from tests.test_events import _at

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


def test_nul_elsewhere_is_kept() -> None:
    # Only the command and the room are stored as columns; other values stay in the JSON body.
    event = parse_event(decode_body(b'{"CallbackCommand": "x", "Operator_Account": "a\\u0000"}'))
    assert event.Operator_Account == "a\0"
