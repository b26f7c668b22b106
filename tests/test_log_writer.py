from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator

import pytest

from bridge import log_writer
from bridge.log_writer import MAX_QUEUED, MAX_QUEUED_CHARS, BackgroundHandler

DROPPED = re.compile(r"WARNING (\d+) log lines dropped: stderr was not read fast enough")
FILLER = b"filler\n"


@contextlib.contextmanager
def stalled_pipe() -> Iterator[tuple[int, BackgroundHandler]]:
    """A handler writing into a pipe nobody reads yet, already full as a stalled reader leaves
    it (so that the writer cannot make room while a test logs, however the threads take turns);
    yields the reading end. What filled it reads as lines of FILLER."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, FILLER)
    os.set_blocking(write_fd, True)
    stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115
    handler = BackgroundHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        yield read_fd, handler
    finally:
        # Read to the end, so that the writer can finish what it has queued.
        draining = threading.Thread(target=lambda: _read_to_end(read_fd), daemon=True)
        draining.start()
        handler.close()
        stream.close()
        draining.join(10)
        os.close(read_fd)


def _read_to_end(fd: int, into: bytearray | None = None) -> None:
    with contextlib.suppress(OSError):  # closed under it
        while chunk := os.read(fd, 1 << 16):
            if into is not None:
                into += chunk


def record(n: int) -> logging.LogRecord:
    return logging.LogRecord("bridge.worker", logging.INFO, __file__, 1, "line %05d", (n,), None)


def test_a_stalled_reader_never_blocks_the_logging_thread() -> None:
    lines = 3 * MAX_QUEUED
    with stalled_pipe() as (read_fd, handler):
        before = log_writer.dropped_total()
        done = threading.Event()

        def log_all() -> None:
            for n in range(lines):
                handler.handle(record(n))
            done.set()

        threading.Thread(target=log_all, daemon=True).start()
        # A plain StreamHandler blocks on the full pipe, and never gets here.
        assert done.wait(30), "logging blocked on a stalled reader"
        dropped = log_writer.dropped_total() - before
        # The writer holds the first line, stuck in its write; MAX_QUEUED wait, it among them
        # (10,000, as the README says).
        assert MAX_QUEUED == 10_000 and dropped == lines - MAX_QUEUED
        # Read again. The last lines logged found the queue full: the next line to find room
        # is preceded by the count of that gap.
        out = bytearray()
        reading = threading.Thread(target=lambda: _read_to_end(read_fd, out), daemon=True)
        reading.start()
        assert handler.flush_within(30)
        handler.handle(record(lines))
        assert handler.flush_within(30)
        handler.close()
        handler.stream.close()  # the reader sees the end
        reading.join(10)
    got = out.decode().splitlines()
    # One warning, where the gap is, with its count.
    assert [int(m[1]) for line in got if (m := DROPPED.fullmatch(line))] == [dropped]
    assert DROPPED.fullmatch(got[-2]) and got[-1] == f"INFO line {lines:05d}"
    written = [int(line.split()[-1]) for line in got if line.startswith("INFO line")]
    assert written == sorted(set(written))  # in order, none twice
    assert len(written) - 1 + dropped == lines


def test_long_lines_waiting_for_a_stalled_reader_are_bounded_in_size_too() -> None:
    # A line may quote a callback's command, as long as its body: 10,000 of them waiting held
    # gigabytes. Here 40 MB in fewer lines than MAX_QUEUED; at most 16 MiB of them wait.
    long = "x" * 100_000
    lines = 400
    with stalled_pipe() as (read_fd, handler):
        before = log_writer.dropped_total()
        for n in range(lines):
            handler.handle(logging.LogRecord("bridge.receive", logging.INFO, __file__, 1,
                                             "%05d %s", (n, long), None))  # fmt: skip
        dropped = log_writer.dropped_total() - before
        out = bytearray()
        reading = threading.Thread(target=lambda: _read_to_end(read_fd, out), daemon=True)
        reading.start()
        handler.handle(record(lines))
        assert handler.flush_within(30)
        handler.close()
        handler.stream.close()
        reading.join(10)
    got = out.decode().splitlines()
    written = [line for line in got if line.startswith("INFO 0")]
    # What waited fitted the bound.
    assert dropped >= lines // 3 and len(written) + dropped == lines
    assert sum(map(len, written)) <= MAX_QUEUED_CHARS
    assert [int(m[1]) for line in got if (m := DROPPED.fullmatch(line))] == [dropped]


def test_lines_are_written_whole_in_order_and_flushed_at_close(tmp_path: object) -> None:
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w", encoding="utf-8") as stream:
        handler = BackgroundHandler(stream)
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
        for n in range(500):
            handler.handle(record(n))
        handler.close()  # waits for what is queued
    with os.fdopen(read_fd, encoding="utf-8") as reading:
        assert reading.read().splitlines() == [f"bridge.worker line {n:05d}" for n in range(500)]


def test_close_does_not_wait_for_ever_on_a_stalled_reader() -> None:
    with stalled_pipe() as (_, handler):
        for n in range(MAX_QUEUED):
            handler.handle(record(n))
        started = time.monotonic()
        assert not handler.flush_within(0.2)
        handler.close()  # gives up after FLUSH_S; its thread is a daemon
        assert time.monotonic() - started < log_writer.FLUSH_S + 2
        assert handler._thread.is_alive()  # still blocked: the fixture reads the pipe


def test_a_closed_stream_loses_lines_silently() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115
    handler = BackgroundHandler(stream)
    handler.handle(record(1))
    assert handler.flush_within(5)
    handler.close()
    with contextlib.suppress(BrokenPipeError):
        stream.close()


@pytest.mark.parametrize("level", [logging.INFO, logging.ERROR])
def test_the_formatter_runs_where_the_record_is_logged(level: int) -> None:
    # An argument changed after logging must not change the line: formatted at once.
    read_fd, write_fd = os.pipe()
    with open(write_fd, "w", encoding="utf-8") as stream:
        handler = BackgroundHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        state = ["before"]
        handler.handle(logging.LogRecord("x", level, __file__, 1, "%s", (state,), None))
        state[0] = "after"
        handler.close()
    with os.fdopen(read_fd, encoding="utf-8") as reading:
        assert reading.read() == "['before']\n"
