"""Decoded callback fields into their command's model: `parse_event(fields)`, or `BadEvent`
for what cannot be a callback. A field whose value is not of the type Tencent documents is left
unset: Tencent's own tables and samples disagree on types, and an acknowledged event is worth
more than one of its fields.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import ValidationError

from bridge.events import MODELS, Envelope
from bridge.events_body import BadEvent, structure_in_text

log = logging.getLogger("bridge.events")  # the events' log lines, under their name


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
                decoded = structure_in_text(child)  # the error is inside what it holds
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
