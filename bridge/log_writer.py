"""Log lines written by a thread of their own, so that a slow reader of stderr never stops the
bridge.

A pipe holds 64 KiB. When whatever reads the bridge's stderr stalls (a container runtime's log
driver, a hung journald, `serve 2>&1 | less` scrolled back), a plain StreamHandler's write blocks
the thread that logs: the event loop, which then answers no callback, and Tencent, which waits
2 s and does not retry, loses every event sent meanwhile. Here the caller only formats the line
and queues it; a daemon thread writes it. While the queue is full, lines are dropped and counted
(`dropped_total`, and `live_bridge_log_lines_dropped_total` on /metrics), and a warning with the
count is written once the reader keeps up again.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TextIO

MAX_QUEUED = 10_000  # lines waiting for the reader
# and their characters: a line may quote a callback's commands (query and body, up to 300 KB),
# and 2,000 callbacks with commands of 30 KB grew a process with a stalled stderr by 210 MB.
# Ordinary lines stop at MAX_QUEUED first, at a few MB.
MAX_QUEUED_CHARS = 16 << 20
FLUSH_S = 2.0  # at exit, how long the lines still queued may take to go out

_dropped = 0  # in this process, since it started; read by the metrics


def dropped_total() -> int:
    return _dropped


class BackgroundHandler(logging.Handler):
    """Formats each record where it is logged, and writes it from a thread of its own."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        # Bounded by emit (MAX_QUEUED, and one more for a warning), which runs under the
        # handler's lock.
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._queued = 0  # lines put and not yet written
        self._queued_chars = 0  # their characters
        self._written = threading.Condition()
        self._unreported = 0  # lines dropped since the last warning was queued
        self._thread = threading.Thread(target=self._write_lines, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        global _dropped
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._written:
            full = self._queued_chars + len(line) > MAX_QUEUED_CHARS and self._queued > 0
            if self._queued >= MAX_QUEUED or full:
                _dropped += 1
                self._unreported += 1
                return
            if self._unreported:
                # Where the gap is: after the lines queued before it, before those after it.
                self._put(self._drop_warning(self._unreported))
                self._unreported = 0
            self._put(line)

    def flush_within(self, timeout_s: float = FLUSH_S) -> bool:
        """Wait until the queued lines are written, or `timeout_s` passed (a reader that stays
        stalled must not hold up an exit). Whether they were."""
        with self._written:
            return self._written.wait_for(lambda: self._queued == 0, timeout_s)

    def close(self) -> None:
        """Stop the writing thread once what is queued is written (within FLUSH_S)."""
        if self._thread.is_alive() and self.flush_within():
            self._lines.put(None)
            self._thread.join(FLUSH_S)
        # else still stalled: the thread is a daemon, and ends with the process
        super().close()

    def _put(self, line: str) -> None:
        self._queued += 1
        self._queued_chars += len(line)
        self._lines.put(line)

    def _write_lines(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stderr: nowhere left to say so
            with self._written:
                self._queued -= 1
                self._queued_chars -= len(line)
                self._written.notify_all()

    def _drop_warning(self, count: int) -> str:
        warning = logging.LogRecord(
            __name__, logging.WARNING, __file__, 0,
            "%d log lines dropped: stderr was not read fast enough", (count,), None,
        )  # fmt: skip
        return self.format(warning)
