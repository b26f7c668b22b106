"""How a value lands in a template's output: escaped by construction, for where it lands.

Every `{{ … }}` passes through the environment's `finalize` (FINALIZE, by channel type): inside a
JSON string and Slack's mrkdwn for slack templates (`&`, `<` and `>` as Slack's entities, so a
room called `<!channel>` pings nobody; line breaks and bidirectional overrides as their
escapes), inside a JSON string for webhook templates, as one visible line for console templates.
`tojson` (TOJSON) gives a complete JSON value escaped the same way.
Values the bridge builds itself for Slack (the `<!date^…>` token, the room link) are `Verbatim`.
What a macro or a `{% set %}` block gives is escaped already, as it was written: `Escaped`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from types import FrameType, GeneratorType
from typing import Any

from bridge.events import Envelope
from bridge.logs import one_line


class Verbatim(str):
    """Text the bridge built itself: JSON-escaped where it lands, never Slack-escaped."""


class Json(str):
    """A complete JSON value (from `tojson`): inserted exactly as it is."""


class Escaped(str):
    """Template output, escaped already where it was written: a macro's (a `{% call %}`'s
    caller's too) or a `{% set %}…{% endset %}` block's. Inserted as it is: escaped again, a
    room `Q&A` showed as `Q&amp;amp;A`, and the bridge's `<!date^…>` token as text."""


# The most pieces (texts between tags, and each {{ }}) one buffer of a template joins: a loop
# that writes something stops here, however deep its loops are nested. And the most characters
# (a string doubled 26 times with `~` was a 67 MB message, stored and sent).
PIECES_LIMIT = 200_000
CHARS_LIMIT = 16_777_216


class OutputTooLong(OverflowError):
    """A buffer over PIECES_LIMIT or CHARS_LIMIT; `where` is the template's `file, line N` that
    was writing it. The limit is met in Jinja's own code, which joins the buffer, so the error's
    traceback names no line of the template as other errors' do."""

    def __init__(self, message: str, where: str | None) -> None:
        super().__init__(message)
        self.where = where


class OutputBuffer(list[str]):
    """A buffer Jinja collects in a list and joins where it ends: a macro's, a `{% set %}` or
    `{% call %}` block's (bridge/sandbox.py has Jinja's compiled code make one). Held whole until
    then, so bounded as it is written: a set block of 60 pieces of 4 MB held 229 MB before
    escaped_concat saw it, and of the 10,000 range() allows, 40 GB."""

    __slots__ = ("_size",)

    def __init__(self) -> None:
        super().__init__()
        self._size = 0

    def append(self, piece: str) -> None:
        self._size += len(piece)
        super().append(piece)
        if self._size > CHARS_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {CHARS_LIMIT} characters", _calling(sys._getframe(1))
            )
        if len(self) > PIECES_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {PIECES_LIMIT} pieces", _calling(sys._getframe(1))
            )

    def extend(self, pieces: Iterable[str]) -> None:
        for piece in pieces:
            self.append(piece)


def escaped_concat(parts: Iterable[str]) -> Escaped:
    """The environments' `concat`, which Jinja joins every captured buffer with. Counted as the
    template writes each piece: measured once joined, a loop of 250 pieces of 4 MB each held
    2 GB before it was refused (and 10,000 would have held 40)."""
    pieces: list[str] = []
    size = 0
    for piece in parts:
        size += len(piece)
        if size > CHARS_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {CHARS_LIMIT} characters", _writing(parts)
            )
        pieces.append(piece)
        if len(pieces) > PIECES_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {PIECES_LIMIT} pieces", _writing(parts)
            )
    return Escaped("".join(pieces))


def _writing(parts: Iterable[str]) -> str | None:
    """`file, line N` of the template code that wrote the buffer's last piece: the innermost
    template generator `parts` is suspended in (a block or an included template is a generator
    the outer one yields from), or, for a buffer Jinja collected in a list (a macro's, a
    `{% set %}` block's), the template code that joins it."""
    found = None
    generator: Any = parts
    while (frame := getattr(generator, "gi_frame", None)) is not None:
        found = _template_line(frame) or found
        generator = getattr(generator, "gi_yieldfrom", None) or _iterating(frame)
    return found or _calling(sys._getframe(2))  # escaped_concat's caller


def _calling(frame: FrameType | None) -> str | None:
    """`file, line N` of the innermost template code on the stack from `frame` outwards."""
    while frame is not None:
        if found := _template_line(frame):
            return found
        frame = frame.f_back
    return None


def _iterating(frame: FrameType) -> Any:
    """The template generator a suspended template frame is looping over: an included
    template's, which Jinja writes as `gen = ….root_render_func(…)` and `for event in gen:
    yield event`, not `yield from`."""
    for held in frame.f_locals.values():
        frame_held = held.gi_frame if isinstance(held, GeneratorType) else None
        if frame_held is not None and "__jinja_template__" in frame_held.f_globals:
            return held
    return None


def _template_line(frame: FrameType) -> str | None:
    # Jinja keeps the template in its compiled code's globals, and maps that code's lines to the
    # template's (what jinja2.debug does for a traceback).
    template = frame.f_globals.get("__jinja_template__")
    if template is None:
        return None
    line = template.get_corresponding_lineno(frame.f_lineno)
    return f"{template.filename or template.name or '<template>'}, line {line}"


def slack_escape(text: str) -> str:
    """Slack's three control characters; nothing else is touched."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(text: str) -> str:
    """An event's value as Slack shows it: on its own line, in its own order. Line breaks, other
    controls and bidirectional overrides are written as their escapes (`\\n`, `\\u202e`), as
    in the logs: a room ID with a line break in it forged a "New owner" line of its own in the
    message, and a right-to-left override reordered the "old → new" around it. Then Slack's
    three control characters."""
    return slack_escape(one_line(text))


def _json_text(text: str) -> str:
    return _encode_string(text)[1:-1]


# What json.dumps(text, ensure_ascii=False) calls for a string, minus the encoder it builds.
_encode_string: Callable[[str], str] = json.encoder.encode_basestring


def _finalize_slack(value: Any) -> str:
    if isinstance(value, Json | Escaped):
        return str(value)
    if isinstance(value, Verbatim):
        return _json_text(value)
    return _json_text(slack_text("" if value is None else str(value)))


def _finalize_webhook(value: Any) -> str:
    if isinstance(value, Json | Escaped):
        return str(value)
    return _json_text("" if value is None else str(value))


def _finalize_console(value: Any) -> str:
    if isinstance(value, Json | Verbatim | Escaped):
        return str(value)
    return one_line("" if value is None else str(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Envelope) or hasattr(value, "model_dump"):
        return value.model_dump(mode="python")
    return value


def _deep(value: Any, leaf: Callable[[str], str]) -> Any:
    value = _plain(value)
    if isinstance(value, str) and not isinstance(value, Verbatim | Json):
        return leaf(value)
    if isinstance(value, Mapping):
        return {leaf(str(k)): _deep(v, leaf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep(v, leaf) for v in value]
    return value


def _tojson_for(leaf: Callable[[str], str]) -> Callable[[Any], Json]:
    def tojson(value: Any) -> Json:
        return Json(json.dumps(_deep(value, leaf), ensure_ascii=False))

    return tojson


def _jsonable(value: Any) -> Any:
    """What json.dumps cannot encode itself: read-only mappings and models."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="python")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Built once: json.dumps with any option builds an encoder per call.
_PLAIN = json.JSONEncoder(ensure_ascii=False, default=_jsonable)


def _tojson_plain(value: Any) -> Json:
    # Nothing to escape inside the strings: the encoder works in C, walking the value in Python
    # only for what it cannot encode. The same JSON as _tojson_for with no escaping, cheaper.
    return Json(_PLAIN.encode(value))


def as_text(value: Any) -> str:
    """Any value as plain one-line text (JSON for lists and objects), to be escaped like text."""
    value = _plain(value)
    if isinstance(value, str):
        return str.__str__(value)
    # `fields` and `query` are read-only mappings, which json.dumps cannot encode itself.
    return json.dumps(value, ensure_ascii=False, default=_jsonable)


FINALIZE: dict[str, Callable[[Any], str]] = {
    "slack": _finalize_slack,
    "webhook": _finalize_webhook,
    "console": _finalize_console,
}


def _console_tojson(value: Any) -> Json:
    # JSON leaves C1 controls and U+2028 raw; on a terminal they are escapes and line breaks.
    return Json(one_line(_tojson_plain(value)))


TOJSON: dict[str, Callable[[Any], Json]] = {
    "slack": _tojson_for(slack_text),
    "webhook": _tojson_plain,
    "console": _console_tojson,
}
