from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import TextIO

import pytest

from bridge.channels import DELIVERED, Result
from bridge.channels.console import ConsoleSender

pytestmark = pytest.mark.anyio

PAYLOADS = [
    "[2024-12-26 11:25:22 UTC] room created: room r1 (by alice, SDKAppID 1400000000)",
    'room "Zoë\'s stream" \\n stays on one line',
    "",
]


@pytest.fixture
def broken_pipe() -> Iterator[TextIO]:
    """A line-buffered stream into a pipe whose reading end is gone."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = open(write_fd, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    yield stream
    with contextlib.suppress(BrokenPipeError):
        stream.close()


async def test_one_line_per_payload() -> None:
    stream = io.StringIO()
    sender = ConsoleSender(stream)
    for delivery_id, payload in enumerate(PAYLOADS):
        assert await sender.send(payload, delivery_id) == DELIVERED
    assert stream.getvalue().splitlines() == PAYLOADS
    assert stream.getvalue().count("\n") == len(PAYLOADS)


async def test_closed_stream_is_retried() -> None:
    stream = io.StringIO()
    stream.close()
    outcome = await ConsoleSender(stream).send(PAYLOADS[0], 1)
    assert (outcome.result, outcome.error) == (Result.RETRY, "cannot write: ValueError")


async def test_broken_pipe_is_retried(broken_pipe: TextIO) -> None:
    outcome = await ConsoleSender(broken_pipe).send(PAYLOADS[0], 1)
    assert (outcome.result, outcome.error) == (Result.RETRY, "cannot write: Broken pipe")


async def test_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert await ConsoleSender().send(PAYLOADS[0], 1) == DELIVERED
    assert capsys.readouterr().out == PAYLOADS[0] + "\n"
