from __future__ import annotations

import asyncio
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
        assert await sender.send(payload, str(delivery_id)) == DELIVERED
    assert stream.getvalue().splitlines() == PAYLOADS
    assert stream.getvalue().count("\n") == len(PAYLOADS)


async def test_closed_stream_is_retried() -> None:
    stream = io.StringIO()
    stream.close()
    outcome = await ConsoleSender(stream).send(PAYLOADS[0], "1")
    assert (outcome.result, outcome.error) == (Result.RETRY, "cannot write: ValueError")


async def test_broken_pipe_is_retried(broken_pipe: TextIO) -> None:
    outcome = await ConsoleSender(broken_pipe).send(PAYLOADS[0], "1")
    assert (outcome.result, outcome.error) == (Result.RETRY, "cannot write: Broken pipe")


async def test_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert await ConsoleSender().send(PAYLOADS[0], "1") == DELIVERED
    assert capsys.readouterr().out == PAYLOADS[0] + "\n"


@pytest.fixture
def stalled_pipe() -> Iterator[tuple[int, TextIO]]:
    """A stream into a pipe nobody reads until the test does; its reading end."""
    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115
    yield read_fd, stream
    stream.close()
    os.close(read_fd)


async def test_a_stalled_reader_times_the_send_out_without_blocking_the_loop(
    stalled_pipe: tuple[int, TextIO],
) -> None:
    read_fd, stream = stalled_pipe
    sender = ConsoleSender(stream, timeout_s=0.3)
    line = "x" * 1000
    try:
        # Until the pipe's 64 KiB are full every line is written; then one waits, and the ones
        # after it too, each send timing out. Meanwhile the loop runs on.
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(tick())
        outcomes = [await sender.send(line, str(n)) for n in range(70)]
        stuck = [o for o in outcomes if o != DELIVERED]
        assert stuck and all(o.result is Result.RETRY and o.error == "timed out" for o in stuck)
        assert ticks > 10 * len(stuck)  # the loop was never blocked
        ticking.cancel()
        # Read again: the line being written when the reader stalled goes out, the ones whose
        # sends gave up before they began do not; new sends are delivered. One line written
        # is every line queued before it written or passed over (one writer, in turn): what
        # came out then is all that ever will, however late the writer ran.
        os.set_blocking(read_fd, False)
        drained = 0
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 1 << 20):
                drained += chunk.count(b"\n")
        patient = ConsoleSender(stream, timeout_s=10.0)  # the same stream and writer
        assert await patient.send(line, "99") == DELIVERED
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 1 << 20):
                drained += chunk.count(b"\n")
        assert drained == len(outcomes) - len(stuck) + 1 + 1  # and the new one
    finally:
        os.set_blocking(read_fd, False)  # a writer still waiting finishes
        with contextlib.suppress(BlockingIOError):
            while os.read(read_fd, 1 << 20):
                pass


async def test_lines_waiting_for_a_stalled_reader_are_bounded(
    stalled_pipe: tuple[int, TextIO],
) -> None:
    # A send that gave up leaves its line queued until the writer comes to it: while stdout
    # stalled, every retry queued its message again, and the process grew without end (40 MB
    # here). Past 16 MiB waiting, a send is a retry at once.
    read_fd, stream = stalled_pipe
    sender = ConsoleSender(stream, timeout_s=0.05)
    line = "x" * (1 << 20)
    try:
        outcomes = [await sender.send(line, str(n)) for n in range(40)]
        errors = [o.error for o in outcomes if o != DELIVERED]
        assert set(errors) == {"timed out", "stdout is not being read"}
        assert errors.count("timed out") <= 17
    finally:
        os.set_blocking(read_fd, False)  # the writer finishes what it began, skips the rest
        for _ in range(100):
            with contextlib.suppress(BlockingIOError):
                while os.read(read_fd, 1 << 20):
                    pass
            await asyncio.sleep(0.02)
    assert await sender.send("again", "99") == DELIVERED
