"""PostgreSQL benchmarks: SQLite vs PostgreSQL for one replica, one replica vs two on PostgreSQL.

Each contender gets a database of its own on the server at `LIVE_BRIDGE_BENCH_POSTGRES_URL`
(default: the local server, user postgres), created for the run and dropped after it. Two
replicas share one database and each takes half of the connections, as behind a load balancer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from bench.load import WrkResult, wrk
from bench.procs import Proc, bridge, url_of

SERVER_URL = os.environ.get(
    "LIVE_BRIDGE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CONNECTIONS = 32


def server_problem() -> str | None:
    """Why the PostgreSQL benchmarks cannot run here, or None."""
    try:
        with psycopg.connect(SERVER_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL server at LIVE_BRIDGE_BENCH_POSTGRES_URL ({type(exc).__name__})"


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A new, empty database on the server; dropped afterwards."""
    name = f"live_bridge_bench_{secrets.token_hex(4)}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(SERVER_URL)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _combined(results: list[WrkResult]) -> WrkResult:
    """Two wrks at once: throughput adds up; latency is the worse of the two."""
    return WrkResult(
        rps=sum(r.rps for r in results),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
    )


def compare(work: Path, sink_url: str, rounds: int, seconds: int) -> dict[str, list[WrkResult]]:
    """Rounds alternating SQLite, PostgreSQL with one replica, and with two replicas."""
    hook = f'[channels.sink]\ntype = "webhook"\nurl = "{sink_url}"\nmax_in_flight = 16\n'
    route = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    results: dict[str, list[WrkResult]] = {"sqlite": [], "pg1": [], "pg2": []}
    with database() as one, database() as two:
        procs = {
            "sqlite": [bridge(work / "rep-sqlite", hook, route)],
            "pg1": [bridge(work / "rep-pg1", hook, route, store=f'url = "{one}"')],
            "pg2": [
                bridge(work / "rep-pg2", hook, route, store=f'url = "{two}"', name=name)
                for name in ("a.toml", "b.toml")
            ],
        }
        started: list[Proc] = []
        try:
            for group in procs.values():
                for proc in group:
                    proc.start()
                    started.append(proc)
            for _ in range(rounds):
                for name, group in procs.items():
                    results[name].append(_load(group, seconds))
                    for proc in group:
                        proc.drain()
        finally:
            for proc in started:
                proc.stop()
    return results


def _load(group: list[Proc], seconds: int) -> WrkResult:
    share = CONNECTIONS // len(group)
    with ThreadPoolExecutor(len(group)) as pool:
        futures = [pool.submit(wrk, url_of(proc), seconds, share) for proc in group]
        return _combined([future.result() for future in futures])
