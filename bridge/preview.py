"""`live-bridge render`: a channel's payload for an event, as the bridge would queue it.

    live-bridge render --channel NAME [--event FILE|-] [--command C] [--config PATH]

The event is the JSON callback body in FILE (`-`: standard input), else the sample of `--command`
(default Live.CallbackAfterChangeOwner); a body's own CallbackCommand wins over `--command`. It is
rendered with the channel's template as a callback received now for the first configured SDKAppID
would be. Slack and webhook payloads are printed as indented JSON (the Slack sender adds only
`unfurl_links`/`unfurl_media` false and, with a bot token, `channel` and a thread's `thread_ts`
and `reply_broadcast`), console messages as they are. Exit status: 0 printed; 1 the template
fails (the error names template and line); 2 a config that does not load, an unknown channel
(the configured ones are listed), or an event that cannot be read or is not a callback.

The helpers here (`load`, `channel_named`, `read_body`, `event_from`, `context_now`,
`render_for`) are shared with `send-test` and `simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bridge.config import CONFIG_HELP, Config, ConfigError, config_path, load_config
from bridge.config_channels import Channel
from bridge.events import OWNER_CHANGED
from bridge.events_body import BadEvent, decode_body
from bridge.events_parse import parse_event
from bridge.logs import each_line, one_line
from bridge.render import Context, Renderer, RenderError
from bridge.samples import sample


class Unusable(Exception):
    """Bad input from the operator (exit status 2); the message is safe to print."""


def register(commands: Any) -> None:
    """Add `render` to the top-level parser's subparsers."""
    render = commands.add_parser("render", help="print a channel's payload for an event")
    render.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    render.add_argument("--channel", metavar="NAME", required=True, help="a configured channel")
    add_event_arguments(render)


def add_event_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--event", metavar="FILE", help="a JSON callback body; - reads standard input"
    )
    # Not dest="command": the top-level parser keeps the subcommand's name there.
    parser.add_argument(
        "--command", dest="event_command", metavar="C",
        help=f"the sample to use without --event (default {OWNER_CHANGED})",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Print the payload; the return value is the exit status."""
    try:
        path, config = load(args.config)
        name, channel = channel_named(config, path, args.channel)
        fields = event_from(read_body(args.event) if args.event else None, args.event_command)
    except Unusable as exc:
        print(f"live-bridge: {each_line(str(exc))}", file=sys.stderr)
        return 2
    payload = render_for(config, name, channel, fields)
    if payload is None:
        return 1
    print(payload if channel.type == "console" else pretty(payload))
    return 0


def pretty(payload: str) -> str:
    """A rendered JSON payload indented; integers keep every digit. Characters that would move
    a terminal's cursor or reorder its text (C1 controls, line and bidi separators, which JSON
    leaves as they are) are written as their escapes: still the same JSON."""
    return each_line(json.dumps(json.loads(payload), indent=2, ensure_ascii=False))


def load(explicit: str | None) -> tuple[Path, Config]:
    path = config_path(explicit)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        raise Unusable(str(exc)) from None


def render_for(config: Config, name: str, channel: Channel, fields: dict[str, Any]) -> str | None:
    """Channel `name`'s payload for the event `fields`, received now; None when its template
    fails, which is said on stderr with the template and line."""
    try:
        return Renderer(config.templates).render(
            channel.type, parse_event(fields), fields, context_now(config), channel.template
        )
    except RenderError as exc:
        said = one_line(str(fields["CallbackCommand"]))
        print(f"live-bridge: channel {name!r}, {said}: {exc}", file=sys.stderr)
        return None


def channel_named(config: Config, path: Path, name: str) -> tuple[str, Channel]:
    channel = config.channels.get(name)
    if channel is None:
        known = ", ".join(sorted(config.channels))
        raise Unusable(f"{path}: no channel {name!r}; configured: {known}")
    return name, channel


def read_body(source: str) -> bytes:
    """The bytes of FILE, or of standard input for `-`."""
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        return Path(source).read_bytes()
    except OSError as exc:
        raise Unusable(f"{source}: cannot read: {exc.strerror or type(exc).__name__}") from None


def event_from(body: bytes | None, command: str | None) -> dict[str, Any]:
    """The decoded callback in `body`, else the sample of `command` (default: owner change)."""
    if body is None:
        return sample(command or OWNER_CHANGED)
    try:
        fields = decode_body(body)
        event = parse_event(fields)
    except BadEvent as exc:
        raise Unusable(f"the event is not a callback: {exc}") from None
    if command is not None and command != event.CallbackCommand:
        said = one_line(event.CallbackCommand)
        print(f"live-bridge: note: --command ignored, the event says {said}", file=sys.stderr)
    return fields


def context_now(config: Config) -> Context:
    """A callback received now for the first configured SDKAppID."""
    return Context(sdk_app_id=config.tencent.sdk_app_id[0], received_at=time.time(), query={})
