"""The console channel: prints each rendered message as one line on stdout.

The line is written by a thread of its own, never by the event loop: a pipe holds 64 KiB, and
when its reader stalls (`serve | less` scrolled back, a log driver that hangs) a write blocks.
On the event loop that stopped every callback's answer; here the send times out after
`[delivery] timeout_s` and is retried, as for any channel that is down. A line whose send gave
up stays queued until the writer comes to it, so while stdout stalls, retries queue their lines
again and again: past MAX_WAITING_CHARS, a send is refused at once (a retry) instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
from typing import TextIO

from bridge.channels import DELIVERED, Outcome, Thread, retry

MAX_WAITING_CHARS = 16 << 20  # of the lines queued for the writer

_Line = tuple[TextIO, str, "concurrent.futures.Future[None]"]
_lines: queue.SimpleQueue[_Line] = queue.SimpleQueue()
_writer: threading.Thread | None = None
_starting = threading.Lock()
_waiting = threading.Lock()
_waiting_chars = 0  # of the lines queued and not yet written or skipped


class ConsoleSender:
    def __init__(self, stream: TextIO | None = None, timeout_s: float = 10.0) -> None:
        self._stream = stream
        self._timeout_s = timeout_s

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        written: concurrent.futures.Future[None] = concurrent.futures.Future()
        _start_writer()
        if not _queue((self._stream or sys.stdout, payload + "\n", written)):
            return retry("stdout is not being read")
        try:
            async with asyncio.timeout(self._timeout_s):
                await asyncio.wrap_future(written)
        except TimeoutError:
            # Cancelled with the wait: a line not yet begun is never written. One being written
            # may still appear, and its delivery is sent again (at least once).
            return retry("timed out")
        except (OSError, ValueError) as exc:  # a broken, full or closed stream: try again later
            return retry(f"cannot write: {getattr(exc, 'strerror', None) or type(exc).__name__}")
        return DELIVERED


def _start_writer() -> None:
    global _writer
    with _starting:
        if _writer is None or not _writer.is_alive():
            _writer = threading.Thread(target=_write_lines, name="console-writer", daemon=True)
            _writer.start()


def _queue(line: _Line) -> bool:
    """Queue `line` for the writer, unless the lines waiting already fill MAX_WAITING_CHARS."""
    global _waiting_chars
    with _waiting:
        if _waiting_chars and _waiting_chars + len(line[1]) > MAX_WAITING_CHARS:
            return False
        _waiting_chars += len(line[1])
        _lines.put(line)
        return True


def _write_lines() -> None:
    global _waiting_chars
    while True:
        stream, text, written = _lines.get()
        try:
            _write(stream, text, written)
        finally:
            with _waiting:
                _waiting_chars -= len(text)


def _write(stream: TextIO, text: str, written: concurrent.futures.Future[None]) -> None:
    if not written.set_running_or_notify_cancel():
        return  # its send gave up waiting
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as exc:
        written.set_exception(exc)
    else:
        written.set_result(None)
