"""Tencent Live callback bodies as pydantic models: one envelope, one model per known command.

`parse_event(body)` turns the raw JSON bytes into a model or raises `BadEvent`. Account and room
IDs that arrive as JSON numbers (even above 2**53) keep their exact digits, as strings. Unknown
fields are kept; commands outside the table parse as the bare `Envelope`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class BadEvent(ValueError):
    """The body is not a callback we can accept; the message is short and safe to return."""


def _id_digits(value: object) -> object:
    # Python's json keeps integers exact; pydantic would refuse int for str, so convert here.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Id = Annotated[str, BeforeValidator(_id_digits)]


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number of milliseconds, not true or false")
    return value


# Stored as SQLite INTEGER: a 64-bit signed range; anything else is not a time.
Millis = Annotated[int, BeforeValidator(_not_bool), Field(ge=-(2**63), le=2**63 - 1)]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Envelope(_Loose):
    """Fields every Live callback shares; any command parses at least as this."""

    CallbackCommand: str
    EventTime: Millis | None = None  # milliseconds; some of Tencent's samples lack it
    RoomId: Id | None = None
    Operator_Account: Id | None = None

    def room(self) -> str | None:
        """The room the event is about: RoomId, else RoomInfo's, else a battle's first room."""
        if self.RoomId is not None:
            return self.RoomId
        for holder, key in (
            ("RoomInfo", "RoomId"),
            ("FromRoomInfo", "RoomId"),
            (None, "FromRoomId"),
        ):
            node: Any = getattr(self, holder, None) if holder else self
            value = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
            if isinstance(value, str | int) and not isinstance(value, bool):
                return str(value)
        return None


class OwnerChanged(Envelope):
    CurrentOwner_Account: Id | None = None
    OriginalOwner_Account: Id | None = None


class RoomDetails(_Loose):
    RoomId: Id | None = None
    RoomName: str | None = None
    RoomType: str | None = None
    Owner_Account: Id | None = None
    MaxMemberCount: int | None = None
    IsMessageDisabled: bool | None = None
    CustomInfo: str | None = None
    IsSeatEnabled: bool | None = None
    TakeSeatMode: str | None = None
    MaxSeatCount: int | None = None
    CreateTime: int | None = None
    IsPublicVisible: bool | None = None
    CoverURL: str | None = None
    Category: list[int] | None = None
    ActivityStatus: int | None = None
    ViewCount: int | None = None
    BackgroundURL: str | None = None
    IsUnlimitedRoomEnabled: bool | None = None


class RoomCreated(Envelope):
    RoomInfo: RoomDetails | None = None


class RoomStatistic(_Loose):
    TotalViewers: int | None = None
    TotalGiftsSent: int | None = None
    TotalGiftCoins: int | None = None
    TotalUniqueGiftSenders: int | None = None
    TotalLikesReceived: int | None = None


class RoomDestroyed(Envelope):
    EventType: str | None = None
    RoomInfo: RoomDetails | None = None
    Statistic: RoomStatistic | None = None


class RoomInfoUpdated(Envelope):
    RoomInfo: RoomDetails | None = None


class MetadataItem(_Loose):
    Key: str
    Value: str | None = None


class MetadataSet(Envelope):
    Metadata: list[MetadataItem] | None = None


class MetadataDeleted(Envelope):
    Keys: list[str] | None = None


class RoomThresholdReached(Envelope):
    CurRoomCount: int | None = None
    MaxRoomCount: int | None = None


class Member(_Loose):
    Member_Account: Id | None = None


class MemberStateChanged(Envelope):
    EventType: str | None = None
    EventCause: str | None = None
    MemberList: list[Member] | None = None


class AdminsModified(Envelope):
    Admin_Account: list[Id] | None = None
    opType: str | None = None


class Seat(_Loose):
    Index: int | None = None
    Member_Account: Id | None = None
    IsTakenDisabled: bool | None = None
    IsVideoDisabled: bool | None = None
    IsAudioDisabled: bool | None = None


class SeatInfoChanged(Envelope):
    SeatList: list[Seat] | None = None


class BattleCreated(Envelope):
    BattleId: Id | None = None
    FromRoomId: Id | None = None
    ToRoomIdList: list[Id] | None = None
    Timeout: int | None = None
    Duration: int | None = None
    NeedResponse: bool | None = None
    ExtensionInfo: str | None = None


class BattleRoom(_Loose):
    RoomId: Id | None = None
    Owner_Account: Id | None = None
    Score: int | None = None


class BattleStarted(Envelope):
    BattleId: Id | None = None
    Duration: int | None = None
    CreateTime: int | None = None
    StartTime: int | None = None
    FromRoomInfo: BattleRoom | None = None
    ToRoomList: list[BattleRoom] | None = None


class BattleEnded(BattleStarted):
    EndTime: int | None = None
    OpType: int | None = None


class GiftRecord(_Loose):
    From_Account: Id | None = None
    To_Account: list[Id] | None = None
    Time: int | None = None
    GiftId: Id | None = None
    Count: int | None = None
    Coins: int | None = None


class GiftSending(Envelope):
    GiftWater: GiftRecord | None = None


OWNER_CHANGED = "Live.CallbackAfterChangeOwner"

MODELS: dict[str, type[Envelope]] = {
    "Live.CallbackAfterCreateRoom": RoomCreated,
    "Live.CallbackAfterDestroyRoom": RoomDestroyed,
    "Live.CallbackAfterUpdateRoomInfo": RoomInfoUpdated,
    "Live.CallbackAfterSetMetadata": MetadataSet,
    "Live.CallbackAfterDelMetadata": MetadataDeleted,
    "Live.CallbackAfterCreateRoomReachingThreshold": RoomThresholdReached,
    "Live.CallbackAfterMemberStateChanged": MemberStateChanged,
    OWNER_CHANGED: OwnerChanged,
    "Live.CallbackAfterModifyAdmin": AdminsModified,
    "Mic.CallbackAfterSeatInfoChanged": SeatInfoChanged,
    "Live.CallbackAfterCreateBattle": BattleCreated,
    "Live.CallbackAfterStartBattle": BattleStarted,
    "Live.CallbackAfterEndBattle": BattleEnded,
    "Live.CallbackBeforeSendGift": GiftSending,
}


def _no_constants(name: str) -> Any:
    raise BadEvent(f"body is not JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON allows the literal, nothing downstream does
        raise BadEvent("body is not JSON: a number is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite)
# Valid UTF-8 cannot hold a surrogate; only a \uD800-\uDFFF escape in the JSON text can.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`, integers exact; `BadEvent` for anything else."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEvent("body is not UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except BadEvent:
        raise
    except (ValueError, RecursionError):
        raise BadEvent("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadEvent("body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # valid JSON, but no text Slack or a database takes
            raise BadEvent("body contains a lone surrogate") from None
    return value


def parse_event(fields: dict[str, Any]) -> Envelope:
    """Validate decoded callback fields against the model for their CallbackCommand."""
    command = fields.get("CallbackCommand")
    if not isinstance(command, str) or not command:
        raise BadEvent("body needs a string CallbackCommand")
    model = MODELS.get(command, Envelope)
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadEvent(f"{where}: {first['msg']}"[:200]) from None
    # The command and the room are stored as text columns, which in PostgreSQL cannot hold NUL:
    # refused here as malformed, not later as a store outage (503) that Tencent would retry.
    room = event.room()
    if "\0" in command or (room is not None and "\0" in room):
        raise BadEvent("CallbackCommand and the room ID cannot contain NUL")
    return event
