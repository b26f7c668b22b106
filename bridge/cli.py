"""The `live-bridge` command line; each command's module registers its own arguments."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bridge import __version__, checks, logs, outbox, preview, send_test, serve, simulate

COMMANDS = {
    "serve": serve,
    "check": checks,
    "render": preview,
    "send-test": send_test,
    "simulate": simulate,
    "outbox": outbox,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="live-bridge",
        description="Tencent Cloud Live callbacks in; Slack and webhook messages out.",
    )
    parser.add_argument("--version", action="version", version=f"live-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command != "serve":  # serve logs as its flags say
        logs.setup_command()
    try:
        code = COMMANDS[args.command].main(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback, and no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
