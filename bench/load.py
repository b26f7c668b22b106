"""Load for the benchmarks: wrk at saturation, and an open-loop generator at a fixed rate.

The fixed-rate generator sends on a schedule whatever the answers do (open loop), so a slow
server shows up as latency, not as a lower offered rate; it records each callback's ack time.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

HERE = Path(__file__).parent
QUERY = "SdkAppid=1400000000&CallbackCommand=Live.CallbackAfterChangeOwner&contenttype=json"


def owner_change(room: str, n: int) -> bytes:
    return json.dumps(
        {"CallbackCommand": "Live.CallbackAfterChangeOwner", "RoomId": room,
         "EventTime": 1703589922780 + n, "Operator_Account": "admin",
         "CurrentOwner_Account": f"user{n}", "OriginalOwner_Account": "user1"}
    ).encode()  # fmt: skip


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


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
    rooms = rooms or f"wrk{secrets.token_hex(4)}"
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-s", str(HERE / "post.lua"), f"{url}?{QUERY}", "--", rooms],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(
        int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|Socket errors:.*?):\s*(\d+)", out)
    )
    return WrkResult(rps, p50, p99, errors)


@dataclass(frozen=True)
class Sent:
    room: str
    started: float  # time.monotonic()
    acked: float  # when the reply arrived
    status: int


async def _post(session: aiohttp.ClientSession, url: str, room: str, n: int) -> Sent:
    started = time.monotonic()
    try:
        async with session.post(f"{url}?{QUERY}", data=owner_change(room, n)) as answer:
            await answer.read()
            status = answer.status
    except aiohttp.ClientError:
        status = 0
    return Sent(room, started, time.monotonic(), status)


async def fixed_rate(url: str, rate: float, seconds: float, prefix: str) -> list[Sent]:
    """Open loop: request i goes out at start + i / rate, whatever came back before."""
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic() + 0.2
        tasks = []
        for n in range(total):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(session, url, f"{prefix}-{n}", n)))
        return list(await asyncio.gather(*tasks))


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
