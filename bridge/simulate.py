"""`live-bridge simulate`: post a callback to a running bridge the way Tencent does.

    live-bridge simulate [--url URL] [--event FILE|-] [--command C] [--app-id N] [--config PATH]

POSTs the body of FILE (`-`: standard input) byte for byte, else the sample of `--command`
(default Live.CallbackAfterChangeOwner), to URL (default `http://{host}:{port}{callback_path}`
from the config; a wildcard host is reached on loopback) with Tencent's query keys: `SdkAppid`
(`--app-id`, default the first configured), `CallbackCommand` (the body's, else `--command`),
`contenttype=json`, `ClientIP=127.0.0.1`, `OptPlatform=RESTAPI`, and with a token for the app
configured `Sign` and `RequestTime` for now. Connects directly (no proxy), follows no redirect.
Prints the HTTP status and the reply packet. Exit status: 0 the bridge answered OK; 1 any other
answer, or the bridge cannot be reached; 2 a config that does not load, an event that cannot be
read, or a URL that is not http(s).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit

from pydantic import SecretStr

from bridge.config import CONFIG_HELP, Config
from bridge.config_values import check_http_url
from bridge.events import OWNER_CHANGED
from bridge.logs import each_line, one_line
from bridge.preview import Unusable, add_event_arguments, load, read_body
from bridge.samples import sample
from bridge.verify import sign

TIMEOUT_S = 10.0
REPLY_CHARS = 2000  # of an answer that is not a packet (an HTML error page, say)


def register(commands: Any) -> None:
    """Add `simulate` to the top-level parser's subparsers."""
    simulate = commands.add_parser("simulate", help="post a callback to a running bridge")
    simulate.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    simulate.add_argument("--url", help="the callback URL (default: from the config)")
    simulate.add_argument("--app-id", type=int, metavar="N", help="SdkAppid to send")
    add_event_arguments(simulate)


def main(args: argparse.Namespace) -> int:
    """Post once and print the answer; the return value is the exit status."""
    try:
        _, config = load(args.config)
        body = read_body(args.event) if args.event else None
    except Unusable as exc:
        print(f"live-bridge: {each_line(str(exc))}", file=sys.stderr)
        return 2
    if body is None:
        command = args.event_command or OWNER_CHANGED
        body = json.dumps(sample(command), ensure_ascii=False, separators=(",", ":")).encode()
    else:
        command = _command_in(body) or args.event_command or OWNER_CHANGED
        if args.event_command not in (None, command):
            said = one_line(command)
            print(f"live-bridge: note: --command ignored, the event says {said}", file=sys.stderr)
    app_id = config.tencent.sdk_app_id[0] if args.app_id is None else args.app_id
    url = args.url or default_url(config)
    try:
        check_http_url(url)
        if (parts := urlsplit(url)).username is not None or parts.password is not None:
            # urllib cannot send them ("Name or service not known"), and the message printed
            # the password, twice.
            raise ValueError("cannot carry a user or password: the bridge takes none")
    except ValueError as exc:
        print(f"live-bridge: --url {exc}", file=sys.stderr)
        return 2
    query = tencent_query(app_id, command, config.tencent.token_for(app_id), time.time())
    signed = ", signed" if "Sign" in query else ""
    print(f"POST {url} ({one_line(command)}, SdkAppid {app_id}{signed})", file=sys.stderr)
    try:
        status, reply = post(url, query, body)
    # UnicodeError: a host name outside ASCII, which urllib does not encode (a traceback).
    except (OSError, http.client.HTTPException, UnicodeError) as exc:
        print(f"live-bridge: cannot reach the bridge at {url}: {_reason(exc)}", file=sys.stderr)
        return 1
    print(f"HTTP {status}")
    print(each_line(reply.decode("utf-8", "replace")[:REPLY_CHARS]))
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "ActionStatus" not in answer:
        print("live-bridge: the answer is not a Tencent reply packet", file=sys.stderr)
        return 1
    return 0 if status == 200 and answer["ActionStatus"] == "OK" else 1


def default_url(config: Config) -> str:
    """The config's own listener; a wildcard address is reached on loopback."""
    server = config.server
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcards.get(server.host, server.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}{server.callback_path}"


def tencent_query(app_id: int, command: str, token: SecretStr | None, now: float) -> dict[str, str]:
    """The query keys Tencent appends to the callback URL, in its order."""
    query = {
        "SdkAppid": str(app_id),
        "CallbackCommand": command,
        "contenttype": "json",
        "ClientIP": "127.0.0.1",
        "OptPlatform": "RESTAPI",
    }
    if token is not None:
        request_time = str(int(now))
        query["Sign"] = sign(token.get_secret_value(), request_time)
        query["RequestTime"] = request_time
    return query


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # Tencent does not follow them either: the 3xx is the answer


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def post(url: str, query: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """One POST; the status and the raw reply, error statuses included. OSError or
    HTTPException: no answer."""
    separator = "&" if urlsplit(url).query else "?"
    request = urllib.request.Request(  # noqa: S310  # main() lets only http(s) URLs through
        url + separator + urlencode(query), data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _command_in(body: bytes) -> str | None:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # nested past the parser's depth: posted as it is
        return None
    command = fields.get("CallbackCommand") if isinstance(fields, dict) else None
    return command if isinstance(command, str) and command else None


def _reason(exc: Exception) -> str:
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {TIMEOUT_S:g}s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
