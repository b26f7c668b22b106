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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bridge.events import Envelope
from bridge.logs import one_line
from bridge.output import bounded


class Verbatim(str):
    """Text the bridge built itself: JSON-escaped where it lands, never Slack-escaped."""


class Json(str):
    """A complete JSON value (from `tojson`): inserted exactly as it is."""


class Escaped(str):
    """Template output, escaped already where it was written: a macro's (a `{% call %}`'s
    caller's too) or a `{% set %}…{% endset %}` block's. Inserted as it is: escaped again, a
    room `Q&A` showed as `Q&amp;amp;A`, and the bridge's `<!date^…>` token as text."""


def escaped_concat(parts: Iterable[str]) -> Escaped:
    """The environments' `concat`, which Jinja joins every captured buffer with: escaped
    already, as each piece was written, and bounded (bridge/output.py) as it is written."""
    return Escaped("".join(bounded(parts)))


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
