"""The real bridge under uvicorn for tests: in a background thread, or as a subprocess to kill.

`write_config(dir, port, channels=..., routes=...)` writes a TOML config; `InThread(config)` runs
`create_app` under uvicorn in a thread; `Subprocess(path)` runs `python -m bridge serve`. Both
are context managers that stop what they started; `post_callback` talks to either like Tencent.
`db_rows` and `delivery_states` read a SQLite store beside the bridge, or after it was killed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import create_app
from bridge.config import Config, load_config

T = TypeVar("T")
ROOT = Path(__file__).parent.parent
APP_ID = 1400000000
OWNER = "Live.CallbackAfterChangeOwner"
SEED_BODY = (
    b'{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":"room_id",'
    b'"EventTime":1703589922780,"Operator_Account":"admin","CurrentOwner_Account":"user2",'
    b'"OriginalOwner_Account":"user1"}'
)
OK_PACKET = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'


def signing_secret() -> str:
    """A new Standard Webhooks signing secret."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SINK_ROUTE = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'


def signed_sink(url: str, secret: str, max_in_flight: int = 4) -> str:
    """The TOML of a webhook channel `sink` at `url` that signs with `secret`; SINK_ROUTE
    routes everything to it."""
    return (
        f'[channels.sink]\ntype = "webhook"\nurl = "{url}"\nmax_in_flight = {max_in_flight}\n'
        f'signing_secret = "{secret}"\n'
    )


def db_rows(db: Path, sql: str, params: Sequence[object] = ()) -> list[Any]:
    """The rows of one query on a SQLite store file."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def delivery_states(db: Path) -> Counter[str]:
    return Counter(row[0] for row in db_rows(db, "SELECT state FROM deliveries"))


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the process's name (which may hold spaces): state, ppid, …"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """The processes `pid` started (a delivery process), from Linux /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if stat_fields(entry.name)[1] == str(pid):
                    found.append(int(entry.name))
    return found


def cpu_seconds(*pids: int) -> float:
    """User plus system CPU time of these processes so far, from Linux /proc."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def gone(pid: int) -> bool:
    """No such process, or only its zombie left for a parent to reap."""
    try:
        return stat_fields(pid)[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, it was read
        return True


def free_port() -> int:
    """A port nothing is bound to, for a bridge subprocess to bind a second or so later. Not one
    of bind(0)'s: that port is free again meanwhile, and the kernel hands it to the next
    bind(0) or connect() on the machine (a stand-in, another xdist worker's bridge) as readily
    as any other. Below the ephemeral range, only another free_port() picks ports."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
            return port


# The [delivery] table's body in the tests' configs: quick retries, three attempts.
DELIVERY = "initial_backoff_s = 0.05\nmax_backoff_s = 0.2\nmax_attempts = 3\n"


def write_config(
    directory: Path, port: int = 0, *, channels: str = '[channels.console]\ntype = "console"\n',
    routes: str = '[[routes]]\nname = "all"\nchannels = ["console"]\n', extra: str = "",
    tencent: str = "", server: str = "",
    delivery: str = DELIVERY,
    store: str = 'path = "bridge.db"\n',
) -> Path:  # fmt: skip
    """A config in `directory`; `store` is the [store] table's body (`url = …` for PostgreSQL)."""
    path = directory / "config.toml"
    path.write_text(
        f"[server]\nport = {port}\n{server}\n[tencent]\nsdk_app_id = {APP_ID}\n{tencent}\n"
        f"[store]\n{store}\n[delivery]\ntimeout_s = 2.0\n{delivery}\n"
        f'[templates]\ndir = "{ROOT / "templates"}"\n\n{extra}\n{channels}\n{routes}'
    )
    return path


def post_callback(
    base_url: str, body: bytes = SEED_BODY, query: Mapping[str, str] | str | None = None,
    path: str = "/tencent/callback", headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:  # fmt: skip
    """POST like Tencent does; returns the status and the raw reply body."""
    if query is None:
        query = {"SdkAppid": str(APP_ID), "CallbackCommand": OWNER, "contenttype": "json"}
    qs = query if isinstance(query, str) else "&".join(f"{k}={v}" for k, v in query.items())
    request = urllib.request.Request(  # noqa: S310  # the tests' own http:// URLs
        f"{base_url}{path}?{qs}", data=body, method="POST", headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def http_request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body, whatever the status."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(url: str) -> Samples:
    """Every sample of the bridge at `url`'s /metrics: (name, sorted labels) -> value."""
    status, _, body = http_request(url + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """For a test that wants to see a redirect rather than follow it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class InThread:
    """`create_app(config)` served by uvicorn on a free port in a background thread."""

    def __init__(self, config: Config | Path) -> None:
        self.config = load_config(config) if isinstance(config, Path) else config
        self.app = create_app(self.config, config if isinstance(config, Path) else None)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])

        asyncio.run(main())

    def __enter__(self) -> InThread:
        self._thread.start()
        if not wait_until(lambda: self.server.started or not self._thread.is_alive()):
            raise RuntimeError("bridge did not start")
        if not self.server.started:
            raise RuntimeError("bridge failed to start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)
        self._sock.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (to reach the store from a test)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)


class Subprocess:
    """`python -m bridge serve --config PATH` as a child process, ready when /readyz says so;
    `env`: variables set for it on top of this process's; `ready`: the path that must answer 200
    (/healthz for a bridge that is up but not ready)."""

    def __init__(
        self, config_path: Path, port: int, log: Path, env: Mapping[str, str] | None = None,
        ready: str = "/readyz",
    ) -> None:  # fmt: skip
        self.ready_path = ready
        self.config_path = config_path
        self.env = {**os.environ, **env} if env is not None else None  # None: this process's
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.config_path.parent, env=self.env,
            )  # fmt: skip
        if not wait_until(self._ready, timeout=20):
            self.kill()
            raise RuntimeError("bridge subprocess did not become ready:\n" + self.log.read_text())

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            return True  # exited: start() reports it
        try:
            return get(self.url + self.ready_path)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> Subprocess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
