"""Fixtures shared by several test files; each cleans up what it starts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.slack_standin import SlackStandIn


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
    async with aiohttp.ClientSession() as client:
        yield client
