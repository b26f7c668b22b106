"""A callback's body as JSON: `decode_body(body)` turns the raw bytes into fields, integers
exact, or raises `BadEvent` for what cannot be a callback; `structure_in_text` reads an object
Tencent sent as its JSON text (bridge/events.py's `InText`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


class BadEvent(ValueError):
    """The body is not a callback we can accept; the message is short and safe to return."""


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


def structure_in_text(value: object) -> object:
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
