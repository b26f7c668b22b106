from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest

from bridge.config_tables import ServerConfig
from bridge.logs import JsonFormatter, SkipPath, TextFormatter, one_line, setup

FORGED = "x\n2026-01-01 00:00:00,000 ERROR bridge.receive: cannot store callbacks"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("room-1 ü 🎁 <b>", "room-1 ü 🎁 <b>"),
        ("two\nlines", "two\\nlines"),
        ("cr\rlf", "cr\\rlf"),
        ("tab\there", "tab\\there"),
        ("nul\0", "nul\\u0000"),
        ("\x1b[31mred", "\\u001b[31mred"),
        ("del\x7f c1\x85", "del\\u007f c1\\u0085"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("bidi\u202etxt.exe", "bidi\\u202etxt.exe"),
        ("isolate\u2066x\u2069", "isolate\\u2066x\\u2069"),
    ],
)
def test_one_line_escapes_what_could_break_or_reorder_a_line(text: str, shown: str) -> None:
    assert one_line(text) == shown


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError as caught:
            info = (type(caught), caught, caught.__traceback__)
    return logging.LogRecord("bridge.receive", logging.INFO, __file__, 1, message, args, info)


def test_a_value_from_a_callback_cannot_forge_a_text_line() -> None:
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(
        record("query says %s, body says %s: using the body", FORGED, "Live.X")
    )
    assert "\n" not in line
    assert line == (
        "INFO bridge.receive: query says x\\n2026-01-01 00:00:00,000 ERROR bridge.receive: "
        "cannot store callbacks, body says Live.X: using the body"
    )


def test_a_traceback_keeps_its_lines_below_the_one_line_message() -> None:
    text = TextFormatter("%(message)s").format(record("failed: %s", "a\nb", exc=True))
    first, *rest = text.splitlines()
    assert first == "failed: a\\nb"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_text_lines_carry_the_time_in_utc_with_a_z() -> None:
    formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    made = record("hello")
    made.created, made.msecs = 1765092360.873, 873.0  # 2025-12-07 07:26:00.873 UTC
    assert formatter.format(made) == "2025-12-07 07:26:00.873Z INFO bridge.receive: hello"


def test_json_lines_are_one_line_with_the_value_intact() -> None:
    line = JsonFormatter("delivery").format(record("says %s", FORGED))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == f"says {FORGED}"
    assert entry["level"] == "info" and entry["process"] == "delivery"


@pytest.mark.parametrize(
    ("path", "kept"),
    [("/tencent/callback", False), ("/tencent/callback?SdkAppid=1", False), ("/healthz", True)],
)
def test_the_access_log_leaves_out_the_callback_path(path: str, kept: bool) -> None:
    access = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    assert SkipPath(ServerConfig().callback_paths).filter(access) is kept


@pytest.mark.parametrize("configured", ["/tencent/callback", "/tencent/callback/"])
@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("/tencent/callback", False),
        ("/tencent/callback/", False),
        ("/tencent/callback/?SdkAppid=1", False),
        ("/tencent/callback//", True),
        ("/tencent/callbacks", True),
    ],
)
def test_the_access_log_leaves_out_the_callback_path_with_or_without_a_trailing_slash(
    configured: str, path: str, kept: bool
) -> None:
    # The receiver answers at both (Tencent follows no redirect), so both are left out.
    access = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    assert SkipPath(ServerConfig(callback_path=configured).callback_paths).filter(access) is kept


@pytest.mark.parametrize(("fmt", "formatter"), [("text", TextFormatter), ("json", JsonFormatter)])
def test_setup_writes_every_line_through_a_one_line_formatter(
    fmt: str, formatter: type[logging.Formatter]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup("info", fmt, ServerConfig().callback_paths)
        (handler,) = root.handlers
        assert type(handler.formatter) is formatter
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def raised(throw: Callable[[], None]) -> logging.LogRecord:
    """The record `log.exception("failed")` makes of what `throw` raises."""
    try:
        throw()
    except BaseException as caught:
        info = (type(caught), caught, caught.__traceback__)
    return logging.LogRecord("bridge.worker", logging.ERROR, __file__, 1, "failed", (), info)


def message() -> None:
    raise ValueError(FORGED)


def note() -> None:
    exc = KeyError("room")
    exc.add_note(FORGED)
    raise exc


def cause() -> None:
    try:
        message()
    except ValueError as exc:
        raise RuntimeError("cannot render") from exc


def group() -> None:
    raise ExceptionGroup("sends failed", [ValueError(FORGED), OSError("x")])


def escape() -> None:
    raise ValueError("x\x1b[2K\r\u202eforged")


def syntax() -> None:
    # Python formats a SyntaxError from its msg and text, not from what str() says.
    raise SyntaxError(FORGED, ("cb.txt", 1, 2, "x\x1b[2Kforged\n", 1, 3))


# How an exception can carry a callback's value into a traceback.
CARRIERS: dict[str, Callable[[], None]] = {
    "its message": message,
    "a note": note,
    "the exception it was raised from": cause,
    "an exception group": group,
    "a terminal escape": escape,
    "a syntax error": syntax,
}


@pytest.mark.parametrize("carrier", CARRIERS)
def test_what_an_exception_says_cannot_forge_a_text_line(carrier: str) -> None:
    text = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(
        raised(CARRIERS[carrier])
    )
    lines = text.split("\n")
    assert lines[1].endswith("Traceback (most recent call last):")  # it keeps its lines
    assert not any(line.startswith("2026-01-01") for line in lines), text
    assert one_line(text) == "\\n".join(lines)  # nothing else that breaks or moves a line
    if carrier != "a terminal escape":
        assert "x\\n2026-01-01 00:00:00,000 ERROR bridge.receive: cannot store callbacks" in text


def test_stack_text_is_escaped_line_by_line() -> None:
    formatter = TextFormatter("%(message)s")
    stack = 'Stack (most recent call last):\n  File "x\x1b[2K.py", line 1, in <module>'
    assert formatter.formatStack(stack) == (
        'Stack (most recent call last):\n  File "x\\u001b[2K.py", line 1, in <module>'
    )


def test_json_lines_escape_what_json_leaves_as_it_is() -> None:
    # JSON needs only the C0 characters escaped: a C1 escape, a line separator or a bidi
    # override would reach a terminal that shows the file, or a reader that splits on them.
    value = "a\x85b\x9b2Kc\u2028d\u202ee"

    def throw() -> None:
        raise ValueError(value)

    entry = raised(throw)
    entry.msg, entry.args, entry.stack_info = "says %s", (value,), "Stack:\n  in x\u2029"
    line = JsonFormatter().format(entry)
    assert one_line(line) == line and "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == f"says {value}"
    assert parsed["exception"].endswith(f"ValueError: {value}")
    assert parsed["stack"] == "Stack:\n  in x\u2029"
