"""Tencent Live callback bodies as pydantic models: one envelope, one model per known command.

The models' fields are typed here; the body is decoded in bridge/events_body.py and parsed into a
model in bridge/events_parse.py (`parse_event`), which says what happens to a field whose value is
not as Tencent documents it. Account and room IDs that arrive as JSON numbers (even above 2**53)
keep their exact digits, as strings. Unknown fields are kept; commands outside the table parse as
the bare `Envelope`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from bridge.events_body import structure_in_text


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


# Before 1973-03-03 in milliseconds, or before the year 5138 in seconds.
SECONDS_BELOW = 10**11


def _seconds_as_millis(value: int) -> int:
    # Tencent documents EventTime in milliseconds ("usually"), its siblings CreateTime, StartTime
    # and GiftWater.Time in seconds. A sender that mixes them up writes 1703589922 for a time in
    # 2023: as milliseconds a date in January 1970, shown as such and delivered before every
    # earlier event of its room. No callback comes from before 1973; the stored body keeps the
    # value as it arrived.
    return value * 1000 if 0 < value < SECONDS_BELOW else value


# Stored as SQLite INTEGER: a 64-bit signed range; anything else is not a time.
Millis = Annotated[
    int,
    BeforeValidator(_not_bool),
    Field(ge=-(2**63), le=2**63 - 1),
    AfterValidator(_seconds_as_millis),
]

# Tencent's Integer fields are 64 bits, signed or not. Python's are unbounded: 10**400 would
# pass the JSON decoder, then fail a template's arithmetic (`Duration / 1000` as a float) or
# formatting ('%d' stops at 4,300 digits) at delivery, a dead letter for an acknowledged event.
# Beyond, the field is left unset at receipt (parse_event), as any of another type.
Integer = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


# An object or list of objects, which may also come as its JSON text.
InText = BeforeValidator(structure_in_text)


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
    MaxMemberCount: Integer | None = None
    IsMessageDisabled: bool | None = None
    CustomInfo: str | None = None
    IsSeatEnabled: bool | None = None
    TakeSeatMode: str | None = None
    MaxSeatCount: Integer | None = None
    CreateTime: Integer | None = None
    IsPublicVisible: bool | None = None
    CoverURL: str | None = None
    Category: list[Integer] | None = None
    ActivityStatus: Integer | None = None
    ViewCount: Integer | None = None
    BackgroundURL: str | None = None
    IsUnlimitedRoomEnabled: bool | None = None


class RoomCreated(Envelope):
    RoomInfo: Annotated[RoomDetails | None, InText] = None


class RoomStatistic(_Loose):
    TotalViewers: Integer | None = None
    TotalGiftsSent: Integer | None = None
    TotalGiftCoins: Integer | None = None
    TotalUniqueGiftSenders: Integer | None = None
    TotalLikesReceived: Integer | None = None


class RoomDestroyed(Envelope):
    EventType: str | None = None
    RoomInfo: Annotated[RoomDetails | None, InText] = None
    Statistic: Annotated[RoomStatistic | None, InText] = None


class RoomInfoUpdated(Envelope):
    RoomInfo: Annotated[RoomDetails | None, InText] = None


class MetadataItem(_Loose):
    # Text; a number sent for one (the samples' sloppiness) is read as its digits.
    Key: Id
    Value: Id | None = None


class MetadataSet(Envelope):
    Metadata: Annotated[list[MetadataItem] | None, InText] = None


class MetadataDeleted(Envelope):
    # As MetadataItem.Key: a number among them (the samples' sloppiness) is read as its digits,
    # not the whole list left unset.
    Keys: list[Id] | None = None


class RoomThresholdReached(Envelope):
    CurRoomCount: Integer | None = None
    MaxRoomCount: Integer | None = None


class Member(_Loose):
    Member_Account: Id | None = None


class MemberStateChanged(Envelope):
    EventType: str | None = None
    EventCause: str | None = None
    MemberList: Annotated[list[Member] | None, InText] = None


class AdminsModified(Envelope):
    Admin_Account: list[Id] | None = None
    opType: str | None = None


class Seat(_Loose):
    Index: Integer | None = None
    Member_Account: Id | None = None
    IsTakenDisabled: bool | None = None
    IsVideoDisabled: bool | None = None
    IsAudioDisabled: bool | None = None


class SeatInfoChanged(Envelope):
    SeatList: Annotated[list[Seat] | None, InText] = None


class BattleCreated(Envelope):
    BattleId: Id | None = None
    FromRoomId: Id | None = None
    ToRoomIdList: list[Id] | None = None
    Timeout: Integer | None = None
    Duration: Integer | None = None
    NeedResponse: bool | None = None
    ExtensionInfo: str | None = None


class BattleRoom(_Loose):
    RoomId: Id | None = None
    Owner_Account: Id | None = None
    Score: Integer | None = None


class BattleStarted(Envelope):
    BattleId: Id | None = None
    Duration: Integer | None = None
    CreateTime: Integer | None = None
    StartTime: Integer | None = None
    FromRoomInfo: Annotated[BattleRoom | None, InText] = None
    ToRoomList: Annotated[list[BattleRoom] | None, InText] = None


class BattleEnded(BattleStarted):
    EndTime: Integer | None = None
    OpType: Integer | None = None


class GiftRecord(_Loose):
    From_Account: Id | None = None
    To_Account: list[Id] | None = None
    Time: Integer | None = None
    GiftId: Id | None = None
    Count: Integer | None = None
    Coins: Integer | None = None


class GiftSending(Envelope):
    GiftWater: Annotated[GiftRecord | None, InText] = None


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


# Tencent's pages name some commands one way in the URL and another in the body (the body is
# right): the URL's name, and the body's.
URL_NAMES = {"Live.CallbackMemberStateChanged": "Live.CallbackAfterMemberStateChanged"}
