"""Fixtures shared by several test files; each cleans up what it starts."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest
from psycopg import sql

from bridge.channels.http import sender_session
from tests.slack_standin import SlackStandIn

POSTGRES_VAR = "LIVE_BRIDGE_TEST_POSTGRES_URL"

PostgresSQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    """A running Slack stand-in, stopped after the test."""
    with SlackStandIn() as stand_in:
        yield stand_in


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The senders' session, as the worker makes it."""
    async with sender_session() as client:
        yield client


def with_database(url: str, name: str) -> str:
    """`url` (a postgresql:// URL) naming database `name` instead."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a database of this test run's own, on the server LIVE_BRIDGE_TEST_POSTGRES_URL
    names; dropped at the end of the run. Tests take `postgres_url`, which empties it first."""
    server = os.environ.get(POSTGRES_VAR)
    if not server:
        pytest.skip(f"{POSTGRES_VAR} is not set: PostgreSQL tests need a server (CI sets it)")
    name = f"live_bridge_test_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The run's database, empty: no tables, no connection left by an earlier test. Open with
    `PostgresStore(postgres_url)`, or write it into a config's `[store] url`."""
    server = os.environ[POSTGRES_VAR]
    name = urlsplit(postgres_database).path.lstrip("/")
    with psycopg.connect(server, autocommit=True) as conn:
        # An earlier test may have stopped midway through an outage it staged.
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_database


@pytest.fixture
def postgres_sql(postgres_url: str) -> PostgresSQL:
    """Runs one statement on the test's database, outside any store: `postgres_sql(query,
    *params)` returns its rows (none for a statement that returns none)."""

    def run(query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            cursor = conn.execute(query, params or None)
            return cursor.fetchall() if cursor.description else []

    return run
