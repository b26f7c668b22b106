"""Log set-up: text for people, JSON lines for log shippers; the access log without callbacks.

Every line the bridge writes about a delivery names the event, delivery, channel and attempt and
is built from ids, names and error texts that carry no secret (see bridge/channels). The access
log covers the admin and health endpoints; Tencent's callbacks (up to 1000 a second) are left out
unless asked for, since each one's outcome is already logged as a state change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import re
import sys
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from bridge.log_writer import BackgroundHandler

HELD_BACK = 10_000  # records held_back keeps at most (past it, BufferingHandler drops them)

# Attributes every LogRecord has; anything else was passed as `extra=` and goes into JSON.
# uvicorn's color_message repeats the message with terminal colours.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


# C0, DEL, C1, the Unicode line and paragraph separators, and the bidirectional overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """`text` with every character that could start a new line, move the cursor or reorder
    what a terminal shows written as its JSON escape: one event, one line, whatever a callback
    put in its values."""
    return _CONTROL.sub(lambda m: json.dumps(m.group(0))[1:-1], text)


def each_line(text: str) -> str:
    """`text`'s lines, each written by `one_line`."""
    return "\n".join(one_line(line) for line in text.split("\n"))


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _traceback(ei: ExcInfo) -> str:
    """The traceback Python would print, with what each exception says (its message and notes,
    a SyntaxError's text, which may quote a callback's values) written by `one_line`: every line
    is one Python wrote."""
    exc = traceback.TracebackException(*ei, compact=True)
    found, seen = [exc], set()
    while found:
        one = found.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        # format() writes each exception's own part through its format_exception_only(), one
        # string a line, but a note on lines of its own: a note is made one line first.
        if isinstance(one.__notes__, list | tuple):
            one.__notes__ = [one_line(str(note)) for note in one.__notes__]
        one.format_exception_only = _escaped(one.format_exception_only)  # type: ignore[method-assign]
        found += [e for e in (one.__cause__, one.__context__, *(one.exceptions or ())) if e]
    return each_line("".join(exc.format()).removesuffix("\n"))


Lines = Generator[str, None, None]


def _escaped(lines: Callable[..., Lines]) -> Callable[..., Lines]:
    # Arguments passed on: Python 3.13's format() calls it with colorize=.
    def escaped(*args: Any, **kwargs: Any) -> Lines:
        return (one_line(line.removesuffix("\n")) + "\n" for line in lines(*args, **kwargs))

    return escaped


class TextFormatter(logging.Formatter):
    """Lines for people. The message goes through `one_line`: log calls pass values from
    callbacks (a command, a room, a template's error), and a newline in one of them must not
    forge a line of its own. A traceback below it keeps its lines, and each stays one line:
    what an exception says is escaped as the message is (`ValueError: a\\nb`)."""

    # UTC, and said so, as the JSON lines and `outbox list` are: a host's local time without a
    # zone made a line's time ambiguous next to them (2026-12-07 02:26:00,873 for 07:26 UTC).
    default_msec_format = "%s.%03dZ"

    def converter(self, secs: float | None) -> time.struct_time:  # logging's name
        return time.gmtime(secs)

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: ExcInfo) -> str:  # logging's name
        return _traceback(ei) if ei[1] is not None else super().formatException(ei)

    def formatStack(self, stack_info: str) -> str:  # logging's name
        return each_line(stack_info)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any extras; from the delivery
    process, `"process": "delivery"` too. JSON escapes only C0 characters: the rest of what
    `one_line` escapes (C1, line separators, bidi overrides) is escaped too, so a line shows
    as it is wherever it is read."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Each is inside a string, where its JSON escape stands for the same character.
        return one_line(json.dumps(entry, ensure_ascii=False))


class SkipPath(logging.Filter):
    """Drops uvicorn access-log lines for the given paths (query strings ignored)."""

    def __init__(self, paths: frozenset[str]) -> None:
        super().__init__()
        self._paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:
            return str(args[2]).split("?", 1)[0] not in self._paths
        return True


def flush() -> None:
    """Write the lines still queued for stderr, waiting at most a few seconds for its reader:
    before an exit that skips exit handlers."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundHandler):
            handler.flush_within()


def setup(
    level: str, fmt: str, callback_paths: frozenset[str] | None, process: str | None = None
) -> None:
    """Configure the root logger; `callback_paths`, when given, are kept out of the access log.
    `process` names a process other than the server's in each line (the delivery process)."""
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BackgroundHandler):
            old.close()  # set up again (tests): the previous writer thread stops
    handler = BackgroundHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        named = f"[{process}] " if process else ""
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)s {named}%(name)s: %(message)s")
        )
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    access.filters[:] = [SkipPath(callback_paths)] if callback_paths else []


@contextlib.contextmanager
def held_back() -> Iterator[list[logging.LogRecord]]:
    """The records logged meanwhile, kept rather than written (without a handler, Python wrote
    them bare), for `replay` once logging is set up. A config's warnings are a few a channel."""
    handler = logging.handlers.BufferingHandler(capacity=HELD_BACK)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.buffer
    finally:
        root.removeHandler(handler)


def replay(records: list[logging.LogRecord]) -> None:
    """Log what `held_back` kept, through the handlers set up since."""
    for record in records:
        logging.getLogger().handle(record)


def setup_command() -> None:
    """For a command that runs and ends (check, render, …): its warnings on stderr, each line
    saying whose it is, as the command's own complaints do (`live-bridge: …`). Without a
    handler, Python printed them bare. Handlers already there (a caller's, pytest's) stay."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("live-bridge: %(levelname)s: %(message)s"))
        root.addHandler(handler)
