"""The console channel: prints each rendered message as one line on stdout."""

from __future__ import annotations

import sys
from typing import TextIO

from bridge.channels import DELIVERED, Outcome, Thread, retry


class ConsoleSender:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def send(self, payload: str, delivery_id: int, thread: Thread | None = None) -> Outcome:
        stream = self._stream or sys.stdout
        try:
            stream.write(payload + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # a broken, full or closed stream: try again later
            return retry(f"cannot write: {getattr(exc, 'strerror', None) or type(exc).__name__}")
        return DELIVERED
