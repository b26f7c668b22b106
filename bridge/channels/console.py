"""The console channel: prints each rendered message as one line on stdout.

The line is written by a thread of its own, never by the event loop: a pipe holds 64 KiB, and
when its reader stalls (`serve | less` scrolled back, a log driver that hangs) a write blocks.
On the event loop that stopped every callback's answer; here the send times out after
`[delivery] timeout_s` and is retried, as for any channel that is down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
from typing import TextIO

from bridge.channels import DELIVERED, Outcome, Thread, retry

_Line = tuple[TextIO, str, "concurrent.futures.Future[None]"]
_lines: queue.SimpleQueue[_Line] = queue.SimpleQueue()
_writer: threading.Thread | None = None
_starting = threading.Lock()


class ConsoleSender:
    def __init__(self, stream: TextIO | None = None, timeout_s: float = 10.0) -> None:
        self._stream = stream
        self._timeout_s = timeout_s

    async def send(self, payload: str, delivery_id: int, thread: Thread | None = None) -> Outcome:
        written: concurrent.futures.Future[None] = concurrent.futures.Future()
        _start_writer()
        _lines.put((self._stream or sys.stdout, payload + "\n", written))
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


def _write_lines() -> None:
    while True:
        stream, text, written = _lines.get()
        if not written.set_running_or_notify_cancel():
            continue  # its send gave up waiting
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as exc:
            written.set_exception(exc)
        else:
            written.set_result(None)
