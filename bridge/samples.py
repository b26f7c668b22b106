"""Realistic Tencent Live callback bodies, one per known command, for tests and template previews.

`SAMPLES` maps every command in `bridge.events.MODELS` to a decoded callback body modelled on
Tencent's own request samples (including their quirks: account IDs as bare JSON integers above
2**53, `@TIM#SYSTEM` as the operator of system actions). `sample(command)` returns a fresh copy;
`hostile(command, value)` returns one with every string replaced by `value`, to prove that
templates escape whatever a client manages to put into a room name, an account or a key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

# Tencent's samples send some accounts as bare integers above 2**53; they must keep every digit.
BIG_ACCOUNT = 144115233775727695
BIG_ACCOUNT_2 = 144115245442327522

SAMPLES: dict[str, dict[str, Any]] = {
    "Live.CallbackAfterCreateRoom": {
        "CallbackCommand": "Live.CallbackAfterCreateRoom",
        "Operator_Account": "brennanli",
        "EventTime": 1703589922780,
        "RoomInfo": {
            "RoomId": "live-42",
            "RoomName": "Friday night karaoke",
            "RoomType": "Live",
            "Owner_Account": BIG_ACCOUNT,
            "MaxMemberCount": 400,
            "IsMessageDisabled": False,
            "CustomInfo": "",
            "IsSeatEnabled": True,
            "TakeSeatMode": "ApplyToTake",
            "MaxSeatCount": 4,
            "CreateTime": 1703589922,
            "IsPublicVisible": True,
            "CoverURL": "https://cdn.example.com/covers/live-42.png",
            "Category": [1, 2, 3],
        },
    },
    "Live.CallbackAfterDestroyRoom": {
        "CallbackCommand": "Live.CallbackAfterDestroyRoom",
        "Operator_Account": "@TIM#SYSTEM",
        "RoomId": "live-42",
        "EventType": "DestroyBySystem",
        "EventTime": 1703593522780,
        "RoomInfo": {
            "RoomName": "Friday night karaoke",
            "RoomType": "Live",
            "Owner_Account": BIG_ACCOUNT,
            "IsSeatEnabled": True,
            "TakeSeatMode": "ApplyToTake",
            "MaxMemberCount": 400,
            "MaxSeatCount": 4,
            "Category": [1, 2, 3],
            "CustomInfo": "",
            "IsMessageDisabled": False,
            "CoverURL": "https://cdn.example.com/covers/live-42.png",
            "ActivityStatus": 0,
            "IsPublicVisible": True,
            "ViewCount": 1284,
            "BackgroundURL": "https://cdn.example.com/backgrounds/stage.png",
            "IsUnlimitedRoomEnabled": False,
        },
        "Statistic": {
            "TotalViewers": 1284,
            "TotalGiftsSent": 57,
            "TotalGiftCoins": 23000,
            "TotalUniqueGiftSenders": 19,
            "TotalLikesReceived": 4410,
        },
    },
    "Live.CallbackAfterUpdateRoomInfo": {
        "CallbackCommand": "Live.CallbackAfterUpdateRoomInfo",
        "Operator_Account": "host_anna",
        "RoomId": "live-42",
        "EventTime": 1703590222780,
        "RoomInfo": {
            "RoomId": "live-42",
            "RoomName": "Friday night karaoke (requests open)",
            "MaxMemberCount": 500,
            "IsMessageDisabled": True,
            "CoverURL": "https://cdn.example.com/covers/live-42-v2.png",
            "Category": [2],
            "ActivityStatus": 1,
            "IsPublicVisible": True,
            "TakeSeatMode": "FreeToTake",
            "CustomInfo": '{"theme":"80s"}',
        },
    },
    "Live.CallbackAfterSetMetadata": {
        "CallbackCommand": "Live.CallbackAfterSetMetadata",
        "Operator_Account": "host_anna",
        "RoomId": "live-42",
        "EventTime": 1703590322780,
        "Metadata": [
            {"Key": "announcement", "Value": "Requests close at 23:00"},
            {"Key": "song_queue", "Value": '["Take On Me","Africa"]'},
        ],
    },
    "Live.CallbackAfterDelMetadata": {
        "CallbackCommand": "Live.CallbackAfterDelMetadata",
        "Operator_Account": "host_anna",
        "RoomId": "live-42",
        "EventTime": 1703590422780,
        "Keys": ["announcement", "song_queue"],
    },
    "Live.CallbackAfterCreateRoomReachingThreshold": {
        "CallbackCommand": "Live.CallbackAfterCreateRoomReachingThreshold",
        "Operator_Account": "brennanli",
        "EventTime": 1703590522780,
        "CurRoomCount": 950,
        "MaxRoomCount": 1000,
    },
    "Live.CallbackAfterMemberStateChanged": {
        "CallbackCommand": "Live.CallbackAfterMemberStateChanged",
        "RoomId": "live-42",
        "EventTime": 1703590622780,
        "EventType": "Online",
        "EventCause": "Enter",
        "MemberList": [
            {"Member_Account": "viewer_01"},
            {"Member_Account": BIG_ACCOUNT_2},
            {"Member_Account": "viewer_03"},
        ],
    },
    "Live.CallbackAfterChangeOwner": {
        "CallbackCommand": "Live.CallbackAfterChangeOwner",
        "RoomId": "room_id",
        "EventTime": 1703589922780,
        "Operator_Account": "admin",
        "CurrentOwner_Account": "user2",
        "OriginalOwner_Account": "user1",
    },
    "Live.CallbackAfterModifyAdmin": {
        "CallbackCommand": "Live.CallbackAfterModifyAdmin",
        "RoomId": "live-42",
        "EventTime": 1703590722780,
        "Operator_Account": "host_anna",
        "Admin_Account": ["mod_ben", BIG_ACCOUNT_2],
        "opType": "add",
    },
    # An empty seat has no Member_Account at all (Tencent: "otherwise this field will not be set").
    "Mic.CallbackAfterSeatInfoChanged": {
        "CallbackCommand": "Mic.CallbackAfterSeatInfoChanged",
        "RoomId": "live-42",
        "EventTime": 1703590822780,
        "SeatList": [
            {
                "Index": 0,
                "Member_Account": BIG_ACCOUNT,
                "IsTakenDisabled": False,
                "IsVideoDisabled": False,
                "IsAudioDisabled": False,
            },
            {
                "Index": 1,
                "Member_Account": "viewer_01",
                "IsTakenDisabled": False,
                "IsVideoDisabled": True,
                "IsAudioDisabled": False,
            },
            {
                "Index": 2,
                "IsTakenDisabled": True,
                "IsVideoDisabled": False,
                "IsAudioDisabled": False,
            },
            {
                "Index": 3,
                "IsTakenDisabled": False,
                "IsVideoDisabled": False,
                "IsAudioDisabled": False,
            },
        ],
    },
    "Live.CallbackAfterCreateBattle": {
        "CallbackCommand": "Live.CallbackAfterCreateBattle",
        "Operator_Account": "host_anna",
        "BattleId": "4siHsNsWN/T3aub9zKraqPbSEGRX2z6gs3LDFi+d/3M=",
        "FromRoomId": "live-42",
        "ToRoomIdList": ["live-77", "live-81"],
        "Timeout": 30000,  # ms the callees have to answer
        "Duration": 60000,  # ms the battle lasts once started
        "NeedResponse": True,
        "ExtensionInfo": "weekend league round 3",
        "EventTime": 1739954005000,
    },
    "Live.CallbackAfterStartBattle": {
        "CallbackCommand": "Live.CallbackAfterStartBattle",
        "BattleId": "4siHsNsWN/T3aub9zKraqPbSEGRX2z6gs3LDFi+d/3M=",
        "Duration": 60000,
        "CreateTime": 1739954005,  # seconds
        "StartTime": 1739954012,
        "FromRoomInfo": {"RoomId": "live-42", "Owner_Account": BIG_ACCOUNT},
        "ToRoomList": [
            {"RoomId": "live-77", "Owner_Account": BIG_ACCOUNT_2},
            {"RoomId": "live-81", "Owner_Account": "host_carl"},
        ],
        "EventTime": 1739954012480,
    },
    "Live.CallbackAfterEndBattle": {
        "CallbackCommand": "Live.CallbackAfterEndBattle",
        "BattleId": "4siHsNsWN/T3aub9zKraqPbSEGRX2z6gs3LDFi+d/3M=",
        "Duration": 60000,
        "CreateTime": 1739954005,
        "StartTime": 1739954012,
        "EndTime": 1739954072,
        "OpType": 0,  # 0 time up, 1 all hosts left, 2 never started
        "FromRoomInfo": {"RoomId": "live-42", "Score": 1250, "Owner_Account": BIG_ACCOUNT},
        "ToRoomList": [
            {"RoomId": "live-77", "Score": 980, "Owner_Account": BIG_ACCOUNT_2},
            {"RoomId": "live-81", "Score": 0, "Owner_Account": "host_carl"},
        ],
        "EventTime": 1739954073119,
    },
    "Live.CallbackBeforeSendGift": {
        "CallbackCommand": "Live.CallbackBeforeSendGift",
        "Operator_Account": "viewer_01",
        "RoomId": "live-42",
        # No EventTime, as in Tencent's own sample: the bridge falls back to the time received.
        "GiftWater": {
            "From_Account": "viewer_01",
            "To_Account": [BIG_ACCOUNT],
            "Time": 1703590922,
            "GiftId": "rocket",
            "Count": 3,
            "Coins": 3000,
        },
    },
}

UNKNOWN_SAMPLE: dict[str, Any] = {
    "CallbackCommand": "Live.CallbackAfterSomethingNew",
    "RoomId": "live-42",
    "Operator_Account": "host_anna",
    "EventTime": 1703591022780,
    "SomethingNew": {"Level": 2, "Tags": ["beta", "preview"]},
}

HOSTILE_VALUES: tuple[str, ...] = (
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<@U123ABC>",
    "<!subteam^S123>",
    "<http://evil.example|click me>",
    "a & b",
    'quote " and \\ backslash',
    "line1\nline2",
    "\x1b[31mred",
    5000 * "x",
)


# Integers at the edges of Tencent's 64 bits, and the ones arithmetic trips on (0 divides
# nothing, -1 counts nothing): in every integer but EventTime, which orders the room.
HOSTILE_INTEGERS: tuple[int, ...] = (0, -1, -(2**63), 2**64 - 1)


def sample(command: str) -> dict[str, Any]:
    """A fresh copy of the sample body for `command`; unknown commands get `UNKNOWN_SAMPLE`."""
    known = SAMPLES.get(command)
    if known is not None:
        return copy.deepcopy(known)
    body = copy.deepcopy(UNKNOWN_SAMPLE)
    body["CallbackCommand"] = command
    return body


def _replace(node: Any, leaf: Callable[[Any], bool], value: object) -> Any:
    """`node` with every value `leaf` picks, however deep, set to `value`."""
    if leaf(node):
        return value
    if isinstance(node, dict):
        return {k: _replace(v, leaf, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, leaf, value) for v in node]
    return node


def _is_string(node: Any) -> bool:
    return isinstance(node, str)


def _is_integer(node: Any) -> bool:
    return isinstance(node, int) and not isinstance(node, bool)


def hostile_integers(command: str, value: int) -> dict[str, Any]:
    """The sample for `command` with every integer in it, except EventTime, set to `value`."""
    body = sample(command)
    event_time = body.pop("EventTime", None)
    body = dict(_replace(body, _is_integer, value))
    if event_time is not None:
        body["EventTime"] = event_time
    return body


def hostile(command: str, value: str) -> dict[str, Any]:
    """The sample for `command` with every string in it, except CallbackCommand, set to `value`."""
    body: dict[str, Any] = _replace(sample(command), _is_string, value)
    body["CallbackCommand"] = command
    return body
