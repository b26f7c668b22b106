"""Load for the benchmarks: wrk at saturation, and an open-loop generator at a fixed rate.

The fixed-rate generator sends on a schedule whatever the answers do (open loop), so a slow
server shows up as latency, not as a lower offered rate; it records each callback's ack time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

HERE = Path(__file__).parent
# Every bridge the benchmarks start checks Sign (bench/procs.py sets this callback_token), as a
# production one does: Tencent's sha256(token + RequestTime), made for the moment of sending.
TOKEN = "bench-callback-token"  # noqa: S105 (a benchmark's own, not a secret)
_QUERY = "SdkAppid=1400000000&CallbackCommand=Live.CallbackAfterChangeOwner&contenttype=json"


def query() -> str:
    """The callback's query string, signed now: good for the minute the bridge allows either
    way, longer than any one run of wrk or of the fixed-rate generator here."""
    now = str(int(time.time()))
    sign = hashlib.sha256((TOKEN + now).encode()).hexdigest()
    return f"{_QUERY}&RequestTime={now}&Sign={sign}"


def owner_change(room: str, n: int) -> bytes:
    return json.dumps(
        {"CallbackCommand": "Live.CallbackAfterChangeOwner", "RoomId": room,
         "EventTime": 1703589922780 + n, "Operator_Account": "admin",
         "CurrentOwner_Account": f"user{n}", "OriginalOwner_Account": "user1"}
    ).encode()  # fmt: skip


@dataclass(frozen=True)
class WrkResult:
    rps: float  # answers with a 2xx status (for live-bridge: acknowledged callbacks) per second
    p50_ms: float
    p99_ms: float
    errors: int  # answers with another status, and requests that got no answer


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(
    url: str, seconds: int, connections: int = 32, threads: int = 2, rooms: str | None = None
) -> WrkResult:
    """wrk at saturation. Room IDs start with `rooms`, by default new for every run, so no run
    repeats a body another sent (deduplication would short-cut it)."""
    if seconds > 50:  # one signed query string for the whole run (see query())
        raise ValueError(f"wrk runs of {seconds} s: at most 50, or the bridge refuses its Sign")
    rooms = rooms or f"wrk{secrets.token_hex(4)}"
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-s", str(HERE / "post.lua"), f"{url}?{query()}", "--", rooms],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    """wrk's report. Its Requests/sec counts every answer, a FAIL packet's 503 or 413 as well:
    only the 2xx ones are counted here. "Socket errors: connect 0, read 3, write 0, timeout 1"
    (requests that got no answer) and "Non-2xx or 3xx responses: 9" are the errors."""
    answered_per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    answered = int(re.search(r"(\d+) requests in ", out).group(1))  # type: ignore[union-attr]
    non_2xx = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", out))
    sockets = re.search(r"Socket errors:([^\n]*)", out)
    unanswered = sum(int(n) for n in re.findall(r"\d+", sockets.group(1))) if sockets else 0
    rps = answered_per_s * (answered - non_2xx) / answered if answered else 0.0
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return WrkResult(rps, p50, p99, non_2xx + unanswered)


@dataclass(frozen=True)
class Sent:
    room: str
    started: float  # time.monotonic()
    acked: float  # when the reply arrived
    status: int


async def _post(session: aiohttp.ClientSession, url: str, room: str, n: int) -> Sent:
    started = time.monotonic()
    try:
        async with session.post(f"{url}?{query()}", data=owner_change(room, n)) as answer:
            await answer.read()
            status = answer.status
    except aiohttp.ClientError:
        status = 0
    return Sent(room, started, time.monotonic(), status)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the fixed-rate generator: one request at a time,
    answers read by Content-Length (what uvicorn always sends for these endpoints)."""

    def __init__(self, finished: Callable[[_Connection, int, int], None]) -> None:
        self._finished = finished
        self._buffer = b""
        self.job: int | None = None  # the request waiting for its answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, job: int) -> None:
        assert self.transport is not None
        self.job = job
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.job is None:
            return
        head = self._buffer[:head_end].decode("latin-1").lower()
        length = int(re.search(r"content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        if len(self._buffer) < head_end + 4 + length:
            return
        self._buffer = self._buffer[head_end + 4 + length :]
        job, self.job = self.job, None
        self._finished(self, job, int(head.split(" ", 2)[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.job is not None:
            job, self.job = self.job, None
            self._finished(self, job, 0)


async def fixed_rate(url: str, rate: float, seconds: float, prefix: str) -> list[Sent]:
    """Open loop: request i is due at start + i / rate, whatever came back before, and its
    latency counts from then (a late send is the server's delay, not hidden). Requests are
    built beforehand and go out on raw keep-alive connections, one request each at a time, a
    new connection only when all are busy: the generator costs a few tens of microseconds a
    request, where an HTTP client library cost half a core at 1,000 req/s and its own event
    loop's lag was part of every figure."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    total = int(rate * seconds)
    signed = query()
    requests = [
        (f"POST {parts.path}?{signed} HTTP/1.1\r\nHost: {host}:{port}\r\n"
         "Content-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in (owner_change(f"{prefix}-{n}", n) for n in range(total))
    ]  # fmt: skip
    due = [0.0] * total
    answers: list[tuple[float, int] | None] = [None] * total
    idle: list[_Connection] = []
    left = total
    all_in = loop.create_future()

    def finished(connection: _Connection, job: int, status: int) -> None:
        nonlocal left
        answers[job] = (time.monotonic(), status)
        if connection.transport is not None:
            idle.append(connection)
        left -= 1
        if left == 0 and not all_in.done():
            all_in.set_result(None)

    async def connect() -> _Connection:
        _, connection = await loop.create_connection(lambda: _Connection(finished), host, port)
        return connection

    async def send_later(request: bytes, job: int) -> None:
        try:
            connection = await connect()
        except OSError:
            finished(_Connection(finished), job, 0)
            return
        connection.send(request, job)

    idle.extend(await asyncio.gather(*(connect() for _ in range(32))))
    opening: set[asyncio.Task[None]] = set()
    start = time.monotonic() + 0.05
    for n in range(total):
        due[n] = start + n / rate
        if (delay := due[n] - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        while idle and idle[-1].transport is None:
            idle.pop()  # closed by the server while idle (uvicorn's keep-alive timeout is 5 s)
        if idle:
            idle.pop().send(requests[n], n)
        else:
            task = loop.create_task(send_later(requests[n], n))
            opening.add(task)
            task.add_done_callback(opening.discard)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in, 60)
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    return [
        Sent(f"{prefix}-{n}", due[n], *(answers[n] or (time.monotonic(), 0))) for n in range(total)
    ]


async def burst(url: str, count: int, concurrency: int, prefix: str) -> list[Sent]:
    """`count` callbacks, at most `concurrency` at a time, as Tencent does when a room is busy."""
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> Sent:
            async with slots:
                return await _post(session, url, f"{prefix}-{n}", n)

        return list(await asyncio.gather(*(one(n) for n in range(count))))


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
