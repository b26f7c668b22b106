"""Template checks: cheap ones at every start-up, thorough ones in `live-bridge check`.

At start-up (`check_templates`) each (route, channel, command) a route can produce, and each
digest, is rendered once with a sample event: a missing template, a syntax error, a StrictUndefined
typo or a message Slack would refuse stops start-up naming the route, channel and template line.

    live-bridge check [--config PATH]

loads the config as `serve` does (every `${VAR}` set), then renders each of those again with every
string and ID of the event set to each hostile value (mentions, quotes, newlines, 5000 characters,
empty), and every integer to each of 0, -1 and the ends of Tencent's 64 bits. It fails what does
not render, a payload that is not JSON, a message Slack would refuse, would take only with fields
or context elements folded (`blockkit_problems.crowded`), or that lets a
`<!channel>`/`<@…>`/`<http…>` through unescaped, and a console line a value can break.
A value cut to fit Slack's limits is documented behaviour: shown, not a failure. Prints a table
(route, channel, command, result). Exit status: 0 all well; 1 problems, each on stderr naming the
config file, route, channel, command and the template's file and line; 2 a config that does not
load (as `serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge import blockkit_limits, blockkit_problems
from bridge.config import CONFIG_HELP, Config, ConfigError, load_config, load_for_command
from bridge.config_tables import Route
from bridge.events import MODELS
from bridge.events_parse import parse_event
from bridge.jinja_env import COMMAND_NAME
from bridge.reachable import reachable_commands, route_sees
from bridge.render import Context, Renderer, RenderError
from bridge.samples import HOSTILE_INTEGERS, HOSTILE_VALUES, hostile, hostile_integers, sample

# An empty room name or account is no attack, but it leaves a message with no text.
HOSTILE: tuple[str | int, ...] = (*HOSTILE_VALUES, "", *HOSTILE_INTEGERS)
DIGEST = "digest"


@dataclass(frozen=True)
class Problem:
    route: str | None  # None: a channel's own template (its digest), whichever route uses it
    channel: str
    command: str
    error: str

    def __str__(self) -> str:
        where = f"route {self.route!r}, " if self.route is not None else ""
        return f"{where}channel {self.channel!r}, {self.command}: {self.error}"


class Result(enum.StrEnum):
    OK = "ok"
    CUT = "ok (long values cut to fit Slack)"  # documented behaviour, not a failure
    FAIL = "FAIL"


@dataclass(frozen=True)
class Verdict:
    result: Result
    detail: str = ""  # why, for FAIL


@dataclass(frozen=True)
class Row:
    route: str  # "-" for a channel's digest
    channel: str
    command: str
    verdict: Verdict


def _combinations(config: Config) -> Iterator[tuple[Route, str, str]]:
    overrides = _override_commands(config.templates.dir)
    for route in config.routes:
        # A command outside Tencent's table that a file of [templates] dir is named after: its
        # own template, which no other command tries (one that did not load was found only by
        # its first callback).
        reached = reachable_commands(route)
        seen = [c for c in overrides if c not in reached and route_sees(route, c)]
        for channel in route.channels:
            for command in [*reached, *seen]:
                yield route, channel, command


def _override_commands(folder: Path) -> list[str]:
    """The commands outside Tencent's table that files in `folder`'s kinds are named after."""
    try:
        files = [f.name for kind in folder.iterdir() if kind.is_dir() for f in kind.iterdir()]
    except OSError:  # no folder: the shipped templates alone (config.py warns)
        return []
    names = sorted({f.removesuffix(".j2") for f in files if f.endswith(".j2")})
    return [n for n in names if COMMAND_NAME.fullmatch(n) and n not in MODELS]


# Renders the sample (None) or the sample with every string (or integer) set to a hostile value.
Render = Callable[[str | int | None], str]


def validate(config: Config) -> Renderer:
    """The renderer for `config`, or ConfigError listing every template that does not render."""
    renderer = Renderer(config.templates)
    problems = check_templates(config, renderer)
    if problems:
        raise ConfigError("templates do not render:\n" + "\n".join(f"  {p}" for p in problems))
    return renderer


def load_validated(path: Path) -> tuple[Config, Renderer]:
    """For a reload: the config at `path` and its renderer, validated as at start-up, or
    ConfigError saying why not. Whatever else goes wrong loading them is a ConfigError too (its
    type and message; the original is its __cause__), so a reload refuses instead of crashing."""
    try:
        config = load_config(path)
        return config, validate(config)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: cannot be loaded: {type(exc).__name__}: {exc}") from exc


# How long a reload's check may take: a few hundred ms for a config of many channels; a template
# whose loops never end (nested loops over a long string write nothing, and no bound of the
# sandbox is met) never finishes.
CHECK_WITHIN_S = 60.0
STOP_POLL_S = 0.1  # how often a check under way asks whether the bridge is stopping


async def load_validated_within(
    path: Path, within_s: float | None = None, stopping: Callable[[], bool] = lambda: False
) -> tuple[Config, Renderer]:
    """load_validated on a thread of its own, or ConfigError after `within_s`, or as soon as
    `stopping()`. Not the default executor's: a check that never ends held every later reload
    behind it (and the reload endpoint's answer), and the process at its end, whose executor
    waits for its threads and whose server waits for the requests under way: a SIGTERM did not
    stop it. The thread goes on until it ends, or the process does."""
    within_s = CHECK_WITHIN_S if within_s is None else within_s
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[Config, Renderer]] = loop.create_future()

    def settle(result: tuple[Config, Renderer] | BaseException) -> None:
        if done.done():  # given up on
            return
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def check() -> None:
        result: tuple[Config, Renderer] | BaseException
        try:
            result = load_validated(path)
        except BaseException as exc:  # handed to the waiting task
            result = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=check, name="config-check", daemon=True).start()
    deadline = loop.time() + within_s
    while not done.done():
        if stopping():
            raise ConfigError(f"{path}: not checked: the bridge is stopping")
        if (left := deadline - loop.time()) <= 0:
            raise ConfigError(
                f"{path}: checking the templates took over {within_s:g}s (a loop that never"
                " ends?); the check goes on in the background until it ends, or the process does"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), min(STOP_POLL_S, left))
    return done.result()


def check_templates(config: Config, renderer: Renderer) -> list[Problem]:
    """Every problem found rendering samples of what the routes can send; empty when all is well."""
    return _check(config, renderer, ())[1]


def check_config(config: Config, renderer: Renderer) -> tuple[list[Row], list[Problem]]:
    """`check_templates` and hostile values: a row per (route, channel, command) and per digest,
    and the problems, one per failing template and command (named with the first route)."""
    return _check(config, renderer, HOSTILE)


def _check(
    config: Config, renderer: Renderer, values: tuple[str | int, ...]
) -> tuple[list[Row], list[Problem]]:
    ctx = Context(sdk_app_id=config.tencent.sdk_app_id[0], received_at=time.time(), query={})
    rows, problems = [], []
    for name, channel in config.channels.items():
        if getattr(channel, "digest_after", 0):
            explicit = getattr(channel, "digest_template", None)
            template = explicit or f"{channel.type}/digest.j2"
            render = _render(renderer, channel.type, explicit, ctx, None, strict=False)
            verdict = _verdict(template, render, channel.type, values)
            rows.append(Row("-", name, DIGEST, verdict))
            if verdict.result == Result.FAIL:
                problems.append(Problem(None, name, DIGEST, verdict.detail))
    done: dict[tuple[str, str, str | None], Verdict] = {}
    for route, name, command in _combinations(config):
        kind, explicit = config.channels[name].type, config.channels[name].template
        if (kind, command, explicit) not in done:
            template = renderer.template_name(kind, command, explicit)
            render = _render(renderer, kind, explicit, ctx, command, strict=bool(values))
            verdict = done[kind, command, explicit] = _verdict(template, render, kind, values)
            if verdict.result == Result.FAIL:
                problems.append(Problem(route.name, name, command, verdict.detail))
        rows.append(Row(route.name, name, command, done[kind, command, explicit]))
    return rows, problems


def _render(
    renderer: Renderer, kind: str, explicit: str | None, ctx: Context, command: str | None,
    strict: bool,
) -> Render:  # fmt: skip
    """Renders `command`'s event or, for None, a digest of one event of every command. With
    `strict` (`live-bridge check`, not start-up), a message whose fields or context elements
    would be folded to fit Slack fails: it is sent, but not as its template lays it out."""

    def render(value: str | int | None) -> str:
        bodies = [
            sample(c) if value is None else _hostile_body(c, value)
            for c in ([command] if command else [*MODELS, "Live.X"])
        ]
        items = [(parse_event(fields), fields, ctx) for fields in bodies]
        if command is None:
            return renderer.render_digest(kind, items, explicit, whole=False)
        return renderer.render(kind, *items[0], explicit, strict)

    return render


def _verdict(template: str, render: Render, kind: str, values: tuple[str | int, ...]) -> Verdict:
    try:
        base = render(None)
    except RenderError as exc:
        return Verdict(Result.FAIL, str(exc))
    trouble = _payload_problem(kind, base, None, base)
    if trouble:
        return Verdict(Result.FAIL, f"sample event: {template}: {trouble}")
    failures, cut = [], False
    for value in values:
        label = f"hostile value {_label(value)}"
        try:
            payload = render(value)
        except RenderError as exc:
            failures.append(f"{label}: {exc}")
            continue
        trouble = _payload_problem(kind, payload, value, base)
        if trouble:
            failures.append(f"{label}: {template}: {trouble}")
        elif payload.count(blockkit_limits.ELLIPSIS) > base.count(blockkit_limits.ELLIPSIS):
            # render() has already cut it; a cut leaves an ellipsis the sample did not have.
            cut = True
    if len(failures) > 1:
        return Verdict(Result.FAIL, f"{failures[0]} (and {len(failures) - 1} more hostile values)")
    if failures:
        return Verdict(Result.FAIL, failures[0])
    return Verdict(Result.CUT if cut else Result.OK)


# C0 (the newline too), DEL, C1 and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _payload_problem(kind: str, text: str, value: str | int | None, base: str) -> str | None:
    if kind == "console":
        if len(_CONTROL.findall(text)) > len(_CONTROL.findall(base)):
            return "a line break or terminal escape reaches the console"
        return None
    if kind != "slack":
        return None  # render() has checked that a webhook body is JSON
    payload = json.loads(text)
    found = blockkit_problems.problems(payload)
    if found:
        return "Slack would refuse it: " + "; ".join(found)
    # The hostile values with a "<" have nothing JSON escapes: found in the text, found in a string.
    if isinstance(value, str) and "<" in value and value in text:
        return "it reaches Slack unescaped, where it would notify people or disguise a link"
    return None


def _hostile_body(command: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return hostile_integers(command, value)
    # Tencent sends some IDs as bare numbers; a client picks its own account and room IDs, so a
    # template must not count on digits (an ID written into JSON without quotes).
    body: dict[str, Any] = _with_ids(hostile(command, value), value, "")
    return body


def _with_ids(node: Any, value: str, key: str) -> Any:
    if isinstance(node, dict):
        return {k: _with_ids(v, value, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_ids(v, value, key) for v in node]
    numeric = isinstance(node, int) and not isinstance(node, bool)
    return value if numeric and key.endswith(("_Account", "RoomId")) else node


def _label(value: str | int) -> str:
    if isinstance(value, int):
        return f"integer {value}"
    if len(value) > 40:
        return f"{value[:10]!r}… ({len(value)} characters)"
    return repr(value) + (" (empty)" if not value else "")


def register(commands: Any) -> None:
    """Add `check` to the top-level parser's subparsers."""
    check = commands.add_parser(
        "check", help="validate the config; render every template, hostile values included"
    )
    check.add_argument(
        "--config", metavar="PATH", help=CONFIG_HELP,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Print the table; 0 when everything renders, 1 with the problems on stderr, 2 bad config."""
    path, config = load_for_command(args.config)
    rows, problems = check_config(config, Renderer(config.templates))
    _print_table(
        ["ROUTE", "CHANNEL", "COMMAND", "RESULT"],
        [[r.route, r.channel, r.command, r.verdict.result] for r in rows],
    )
    for problem in problems:
        print(f"live-bridge: {path}: {problem}", file=sys.stderr)
    if problems:
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        print(f"live-bridge: {path}: {count}", file=sys.stderr)
        return 1
    print(f"{path}: {len(rows)} combinations render, hostile values included")
    return 0


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _escaped(match: re.Match[str]) -> str:
    return match.group(0).encode("unicode_escape").decode("ascii")


# What must not reach the terminal raw: controls, and the bidirectional ones, which reorder the
# rest of the row (U+202E reversed it).
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    # A name from the config with a newline or an escape must not reshape the table.
    cells = [header, *([_UNSHOWN.sub(_escaped, c) for c in row] for row in rows)]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        padded = (c + " " * (w - _width(c)) for c, w in zip(row, widths, strict=True))
        print("  ".join(padded).rstrip())
