"""Tencent Live callback bodies as pydantic models: one envelope, one model per known command.

`decode_body(body)` turns the raw JSON bytes into fields, `parse_event(fields)` into a model;
both raise `BadEvent` for what cannot be a callback. Account and room IDs that arrive as JSON
numbers (even above 2**53) keep their exact digits, as strings. Unknown fields are kept;
commands outside the table parse as the bare `Envelope`. A field whose value is not of the type
Tencent documents is left unset: Tencent's own tables and samples disagree on types, and an
acknowledged event is worth more than one of its fields.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


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


def _structure_in_text(value: object) -> object:
    # Tencent's tables type some objects as String (FromRoomInfo): one sent as JSON text is read
    # as what it holds. Not one with a surrogate escape, which the body's check cannot see.
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "[") and len(value) <= 65536:
        if _SURROGATE_ESCAPE.search(value):
            return value
        try:
            return _DECODER.decode(value)
        except (BadEvent, ValueError, RecursionError):
            return value
    return value


# An object or list of objects, which may also come as its JSON text.
InText = BeforeValidator(_structure_in_text)


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
        # A byte order mark in front is no part of the JSON (RFC 8259 lets a parser ignore it):
        # refusing the callback would lose it.
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise BadEvent("body is not UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except BadEvent:
        raise
    except RecursionError:
        raise BadEvent("body is nested too deeply") from None
    except ValueError:
        raise BadEvent("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadEvent("body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # valid JSON, but no text Slack or a database takes
            raise BadEvent("body contains a lone surrogate") from None
    return value


_warned: set[tuple[type[Envelope], str]] = set()  # bounded: the models' own field names


def _warn_once(model: type[Envelope], command: str, unread: dict[str, str]) -> None:
    # Once per command and field: a sender that types a field its own way does it every time,
    # and Tencent may call a thousand times a second.
    for name, reason in unread.items():
        if (model, name) not in _warned:
            _warned.add((model, name))
            log.warning(
                "%s: %s; the event is kept, its templates see %s unset (logged once)",
                command[:100], reason[:200], name,
            )  # fmt: skip


def _without_unreadable(
    model: type[Envelope], command: str, fields: dict[str, Any], exc: ValidationError
) -> Envelope:
    """The event with each field that failed left unset, and only that field: a `RoomInfo`
    whose `Category` is a string keeps its `RoomId`, which routes the event and orders it. A
    list with an item that is no item at all is left unset whole (a count of what remains would
    be wrong). A few rounds, for what leaving one field out shows (a required key)."""
    kept = dict(fields)  # copied along each path that changes: `fields` stays as it arrived
    copied = {id(kept)}  # the containers `kept` holds copies of: each is copied once
    unread: dict[str, str] = {}
    for _ in range(4):
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            if (path := _drop(kept, error["loc"], copied)) is not None:
                unread.setdefault(path, f"{where}: {error['msg']}")
        try:
            event = model.model_validate(kept)
        except ValidationError as again:
            exc = again
            continue
        _warn_once(model, command, unread)
        return event
    raise BadEvent("body does not match its command's fields")


def _drop(fields: dict[str, Any], loc: tuple[int | str, ...], copied: set[int]) -> str | None:
    """Removes from `fields` the value an error's `loc` points at: the deepest key of the body
    it names (the rest of a loc names union members and validators). Each container it passes
    through is copied the first time (`copied`: the ids of the copies), so `fields` holds copies
    only where it was changed, and a list of 26,000 bad items is copied once, not once an item.
    An object sent as JSON text (InText) is read, so that only its bad field goes. Returns the
    path, list positions left out (bounded by the models' own names, for the warnings); None if
    nothing was found."""
    parent: dict[str, Any] | None = None
    key = ""
    node: Any = fields
    holder: tuple[Any, Any] = (None, None)  # the container `node` sits in, and where
    path: list[str] = []
    for index, step in enumerate(loc):
        in_dict = isinstance(node, dict) and isinstance(step, str) and step in node
        in_list = isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        if not (in_dict or in_list) or (in_list and not isinstance(node[step], dict)):
            break  # past the body's own keys; or an item that is no item: its list goes whole
        if id(node) not in copied:  # about to change what it holds: a copy of ours first
            node = copy.copy(node)
            copied.add(id(node))
            holder[0][holder[1]] = node  # never `fields`, ours from the start: a holder is set
        child = node[step]
        if isinstance(step, str):  # in a dict
            if isinstance(child, str) and index + 1 < len(loc):
                decoded = _structure_in_text(child)  # the error is inside what it holds
                if isinstance(decoded, dict | list):
                    child = node[step] = decoded
                    copied.add(id(decoded))  # made here: ours to change
            parent, key = node, step
            path.append(step)
        holder, node = (node, step), child
    if parent is None or key == "CallbackCommand":
        return None
    del parent[key]
    return ".".join(path)


def parse_event(fields: dict[str, Any]) -> Envelope:
    """Validate decoded callback fields against the model for their CallbackCommand."""
    command = fields.get("CallbackCommand")
    if not isinstance(command, str) or not command:
        raise BadEvent("body needs a string CallbackCommand")
    model = MODELS.get(command, Envelope)
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        # Refusing would lose the event for good: Tencent does not retry an "after" callback.
        # The field stays in the stored body and in the templates' `fields`, as it arrived.
        event = _without_unreadable(model, command, fields, exc)
    # The command and the room are stored as text columns, which in PostgreSQL cannot hold NUL:
    # refused here as malformed, not later as a store outage (503) that Tencent would retry.
    room = event.room()
    if "\0" in command or (room is not None and "\0" in room):
        raise BadEvent("CallbackCommand and the room ID cannot contain NUL")
    return event
