"""The `live-bridge` command line: `live-bridge serve [--config PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from bridge import __version__
from bridge.config import ConfigError, config_path, load_config


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
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,  # Tencent can call 1000 times a second; state changes are logged
            lifespan="on",
            server_header=False,
        )
    )
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        raise SystemExit(serve(args.config, args.log_level))


if __name__ == "__main__":
    main()
