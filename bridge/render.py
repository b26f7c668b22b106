"""Turning an event into a channel's payload with Jinja, escaping by construction.

Every `{{ … }}` in a template passes through the environment's `finalize`, which escapes the value
for where it lands (bridge/escape.py): inside a JSON string (and Slack's mrkdwn) for slack
templates, inside a JSON string for webhook templates, and as one visible line for console
templates. Template authors have no filter to remember. The output must be JSON (Slack's, within
its limits: bridge/blockkit.py) for slack and webhook templates.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import jinja2

from bridge import blockkit, blockkit_problems
from bridge.config_tables import TemplatesConfig
from bridge.escape import Verbatim, slack_escape
from bridge.events import Envelope
from bridge.jinja_env import COMMAND_NAME, environments, variables_used
from bridge.logs import one_line

CACHED_COMMAND_CHARS = 128  # Tencent's are under 50; a longer one's template is looked up each time


class RenderError(Exception):
    """A template that cannot produce a valid payload; names the template and line."""


class TooBig(RenderError):
    """A digest that Slack would only take with blocks dropped, fields or context elements
    folded, or its text cut."""


class Crowded(RenderError):
    """A message with more fields or context elements than Slack takes, which `fit` would fold
    (raised only when asked, for `live-bridge check`)."""


@dataclass(frozen=True)
class Context:
    """What the bridge knows about one callback, beyond the event itself."""

    sdk_app_id: int
    received_at: float  # Unix seconds
    query: Mapping[str, str]  # ClientIP, OptPlatform, … as received (lower-case keys)


class Renderer:
    def __init__(self, settings: TemplatesConfig) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.timezone)
        self._envs = environments(settings.dir)
        self._names: dict[tuple[str, str, str | None], str] = {}
        self._loaded: dict[tuple[str, str], tuple[jinja2.Template, frozenset[str] | None]] = {}

    def template_name(self, kind: str, command: str, explicit: str | None) -> str:
        """The channel's own template, else `kind/COMMAND.j2`, else `kind/default.j2`."""
        if explicit is not None:
            return explicit
        key = (kind, command, explicit)
        name = self._names.get(key)
        if name is None:
            name = f"{kind}/{command}.j2"
            # It exists if it loads, or fails to load for any reason but its absence:
            # rendering then reports why, and where (a syntax error or bad bytes and its line,
            # a file it cannot read, nesting too deep for Python). Raised here, outside the
            # render's own catch, any but the first answered the callback 500 and stored
            # nothing, and failed a delivery process's lane.
            with contextlib.suppress(Exception):
                try:
                    if not COMMAND_NAME.match(command):
                        raise jinja2.TemplateNotFound(name)
                    self._envs[kind].get_template(name)
                except jinja2.TemplateNotFound:
                    name = f"{kind}/default.j2"
            # Commands come from callers: the cache is bounded in entries and in their size (a
            # command may be as long as a body: 10,000 of 60 KB would hold 600 MB).
            if len(self._names) < 10_000 and len(command) <= CACHED_COMMAND_CHARS:
                self._names[key] = name
        return name

    def render(
        self, kind: str, event: Envelope, fields: Mapping[str, Any], ctx: Context,
        explicit: str | None = None, strict: bool = False,
    ) -> str:  # fmt: skip
        """The payload text for a channel of type `kind`; RenderError names template and line.
        With `strict`, a Slack message whose fields or context elements would be folded raises
        Crowded."""
        name = self.template_name(kind, event.CallbackCommand, explicit)
        text = self._render(kind, name, lambda uses: self._variables(event, fields, ctx, uses))
        if kind == "console":
            return text.strip()
        return _encode(kind, name, _decode(name, text), strict=strict)

    def render_digest(
        self, kind: str, items: Sequence[tuple[Envelope, Mapping[str, Any], Context]],
        explicit: str | None = None, whole: bool = True,
    ) -> str:  # fmt: skip
        """One message for several events (`kind/digest.j2`, oldest first). With `whole`, a
        digest that would lose entries to Slack's limits raises TooBig, so the caller can split
        it: fields or context elements over Slack's count, a text cut that holds more than one
        entry (a template that lists them all in one section). A single over-long value, cut
        as it would be alone, is cut as in any message."""
        name = explicit or f"{kind}/digest.j2"
        text = self._render(kind, name, lambda uses: self._digest_variables(items))
        if kind == "console":
            return text.strip()
        payload = _decode(name, text)
        fitted = _encode(kind, name, payload, whole)
        if whole and kind == "slack" and len(items) > 1:
            cut = set(blockkit.cut_texts(payload))
            for item in items:
                if not cut:
                    break
                cut -= self._cut_alone(name, item)
            if cut:
                raise TooBig(f"{name}: a text over Slack's limit holds more than one entry")
        return fitted

    def _digest_variables(
        self, items: Sequence[tuple[Envelope, Mapping[str, Any], Context]]
    ) -> dict[str, Any]:
        entries = [self._variables(e, f, c) for e, f, c in items]
        return {
            "entries": entries,
            "count": len(entries),
            "sdk_app_id": items[0][2].sdk_app_id if items else 0,
            "first": entries[0] if entries else None,
            "last": entries[-1] if entries else None,
        }

    def _cut_alone(self, name: str, item: tuple[Envelope, Mapping[str, Any], Context]) -> set[str]:
        """The texts Slack's limits would cut in a digest of `item` alone."""
        try:
            alone = self._render("slack", name, lambda uses: self._digest_variables([item]))
            return set(blockkit.cut_texts(json.loads(alone)))
        except (RenderError, ValueError):
            return set()

    def _render(
        self, kind: str, name: str,
        variables: Callable[[frozenset[str] | None], dict[str, Any]],
    ) -> str:  # fmt: skip
        template: jinja2.Template | None = None
        try:
            template, uses = self._template(kind, name)
            return template.render(variables(uses))
        # Names come from the config and from callers (a command names its template): shown
        # escaped, so that no name can write a line of its own to a terminal or log.
        except jinja2.TemplateNotFound as exc:
            if template is None:
                raise RenderError(f"template {one_line(name)} not found") from None
            where = _where(exc) or name  # a template it includes, imports or extends
            missing = one_line(str(exc.name))
            raise RenderError(
                f"{one_line(where)}: includes {missing}, which does not exist"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            where = one_line(exc.filename or name)
            raise RenderError(
                f"{where}, line {exc.lineno}: {one_line(exc.message or '')}"
            ) from None
        except Exception as exc:
            where = one_line(_where(exc) or name)
            raise RenderError(f"{where}: {type(exc).__name__}: {one_line(str(exc))}") from None

    def _template(self, kind: str, name: str) -> tuple[jinja2.Template, frozenset[str] | None]:
        """The compiled template, and the variables it names (None: it includes, imports or
        extends another, so it may name any)."""
        key = (kind, name)
        loaded = self._loaded.get(key)
        if loaded is None:
            env = self._envs[kind]
            template = env.get_template(name)
            # A plain dict for the ChainMap of globals: every render copies them, and copying a
            # ChainMap walks it in Python.
            template.globals = dict(template.globals)
            loaded = template, variables_used(env, name)
            self._loaded[key] = loaded
        return loaded

    def _variables(
        self, event: Envelope, fields: Mapping[str, Any], ctx: Context,
        uses: frozenset[str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The template's variables; with `uses`, only those it names are worked out (the
        times and their text cost more than the rest of the webhook body)."""
        room = event.room()
        variables: dict[str, Any] = {
            "command": event.CallbackCommand,
            "event": event,
            "sdk_app_id": ctx.sdk_app_id,
            "room_id": room,
        }
        if uses is None or "fields" in uses:
            variables["fields"] = types.MappingProxyType(dict(fields))
        if uses is None or "query" in uses:
            variables["query"] = types.MappingProxyType(dict(ctx.query))
        if uses is None or not uses.isdisjoint(_RECEIVED):
            received = datetime.fromtimestamp(ctx.received_at, self.zone)
            variables["received_at"] = received
            variables["received_at_iso"] = received.isoformat()
        if uses is None or not uses.isdisjoint(_HAPPENED):
            happened = datetime.fromtimestamp(ctx.received_at, self.zone)
            if event.EventTime is not None:
                # An EventTime no calendar has: the time we received it will do.
                with contextlib.suppress(OverflowError, OSError, ValueError):
                    happened = datetime.fromtimestamp(event.EventTime / 1000, self.zone)
            fallback = happened.strftime("%Y-%m-%d %H:%M:%S %Z")
            date_token = (
                f"<!date^{int(happened.timestamp())}^{{date_short_pretty}} {{time_secs}}"
                f"|{slack_escape(fallback)}>"
            )
            variables["happened_at"] = happened
            variables["happened_at_text"] = fallback
            variables["slack_date"] = Verbatim(date_token)
        if uses is None or "room_url" in uses:
            room_url = None
            if self.settings.room_url and room is not None:
                room_url = Verbatim(self.settings.room_url.format(room_id=_path_segment(room)))
            variables["room_url"] = room_url
        return variables


def _path_segment(room: str) -> str:
    """The room ID as one segment of a URL's path: every character but letters, digits and
    `-._~` percent-encoded, and a whole `.` or `..` too, which a browser would take as "this
    folder" or "the folder above" (`/rooms/../moderate` opens `/moderate`)."""
    if room in (".", ".."):
        return room.replace(".", "%2E")
    return quote(room, safe="")


_RECEIVED = frozenset({"received_at", "received_at_iso"})
_HAPPENED = frozenset({"happened_at", "happened_at_text", "slack_date"})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# Python's json reads NaN and Infinity (and 1e400 as Infinity) and writes them back, which JSON
# has not: a receiver's parser would refuse every body (receive's decoder refuses them too).
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def _decode(name: str, text: str) -> Any:
    try:
        return _STRICT.decode(text)
    except json.JSONDecodeError as exc:
        raise RenderError(f"{name}: output is not JSON (line {exc.lineno}: {exc.msg})") from None
    except ValueError as exc:  # _no_constant's or _finite's
        raise RenderError(f"{name}: output is not JSON ({exc})") from None


def _encode(kind: str, name: str, payload: Any, whole: bool = False, strict: bool = False) -> str:
    """The payload as sent: for Slack, fitted to its limits (`fit` copies, `payload` stays)."""
    if kind == "slack":
        if whole and blockkit.overflows(payload):
            raise TooBig(f"{name}: over Slack's limits")
        if strict and (crowded := blockkit_problems.crowded(payload)):
            raise Crowded(f"{name}: " + "; ".join(crowded))
        try:
            payload = blockkit.fit(payload)
        except blockkit.LimitError as exc:
            raise RenderError(f"{name}: {exc}") from None
    return blockkit.COMPACT.encode(payload)


def _where(exc: Exception) -> str | None:
    """`file, line N` of the innermost template code `exc` went through: an included template's
    own line rather than the include's. Jinja rewrites a render error's traceback so that each
    template's frame has the template's file and line, and the error in its globals
    (jinja2.debug.fake_traceback); frames of Python code, Jinja's own among them, are not."""
    found = getattr(exc, "where", None)  # output.OutputTooLong: met in Jinja's own code
    tb = exc.__traceback__
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            found = f"{tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno}"
        tb = tb.tb_next
    return found
