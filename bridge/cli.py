"""The `live-bridge` command line; each command's module registers its own arguments."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType

from bridge import __version__, logs

# Each command's module, imported once the command line is read (see main).
COMMANDS = {
    "serve": "bridge.serve",
    "check": "bridge.checks",
    "render": "bridge.preview",
    "send-test": "bridge.send_test",
    "simulate": "bridge.simulate",
    "outbox": "bridge.outbox",
}


def _parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="live-bridge",
        description="Tencent Cloud Live callbacks in; Slack and webhook messages out.",
    )
    parser.add_argument("--version", action="version", version=f"live-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in modules.values():
        module.register(commands)
    return parser


def _stdio_open() -> None:
    """Standard input, output and error open, on /dev/null where they were closed (`serve
    >&- 2>&-`): else the next file or socket opened takes their number. The listening socket
    became standard output, and the delivery process, which inherits 0-2, aborted at every
    start (libuv's assertion that fd > 2): nothing was ever delivered."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115  # lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  # lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> None:
    _stdio_open()
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["serve"]:
        # A reload asked before the bridge is ready would end the process (SIGHUP's default):
        # ignored from the first moment, not once serve's module is loaded. Importing every
        # command's module takes half a second or more, and a SIGHUP meanwhile (a reload
        # right after a restart) ended the process with status 129.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    args = _parser(modules).parse_args(argv)
    if args.command != "serve":  # serve logs as its flags say
        logs.setup_command()
    try:
        code = modules[args.command].main(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback, and no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
