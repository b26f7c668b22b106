"""The `live-bridge` command line: `live-bridge serve [--config PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from bridge import __version__, outbox
from bridge.config import ConfigError, config_path, load_config

if TYPE_CHECKING:
    from bridge.app import Bridge


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="live-bridge",
        description="Tencent Cloud Live callbacks in; Slack and webhook messages out.",
    )
    parser.add_argument("--version", action="version", version=f"live-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive callbacks and deliver them")
    serve.add_argument(
        "--config", help="TOML config (default: $LIVE_BRIDGE_CONFIG, else config.toml)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    outbox.register(commands)
    return parser


def serve(config_file: str | None, log_level: str) -> int:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from bridge.app import create_app  # after logging is set up

    path = config_path(config_file)
    try:
        config = load_config(path)
        app = create_app(config)
    except ConfigError as exc:
        print(f"live-bridge: {exc}", file=sys.stderr)
        return 2
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,  # Tencent can call 1000 times a second; state changes are logged
            lifespan="on",
            server_header=False,
        ),
        app.state.bridge,
        config.server.drain_s,
    )
    server.run()
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT, /readyz turns 503 at once and the listener closes
    `drain_s` later; callbacks meanwhile are acknowledged as usual. A second signal stops now."""

    def __init__(self, config: uvicorn.Config, bridge: Bridge, drain_s: float) -> None:
        super().__init__(config)
        self._bridge = bridge
        self._drain_s = drain_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._bridge.draining = True
        if self._drain_s > 0 and self._timer is None and not self.should_exit:
            logging.getLogger(__name__).info("draining for %.1fs before closing", self._drain_s)
            self._timer = threading.Timer(self._drain_s, super().handle_exit, (sig, frame))
            self._timer.daemon = True
            self._timer.start()
            return
        super().handle_exit(sig, frame)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        raise SystemExit(serve(args.config, args.log_level))
    if args.command == "outbox":
        raise SystemExit(outbox.main(args))


if __name__ == "__main__":
    main()
