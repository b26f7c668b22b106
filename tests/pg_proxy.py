"""A TCP proxy in front of PostgreSQL, for tests that take the database away from a bridge.

`PgProxy(host, port)` listens on a free port of 127.0.0.1 and forwards each connection to the
server at `host:port`. `cut()` closes the listening socket (new connections are refused, as by a
server that is down) and aborts every open connection (as by a server that crashed); `restore()`
listens again on the same port. `freeze()` stops forwarding on the connections open now, for
good, while TCP still acknowledges what they send (a server, or a proxy before it, that hangs);
new connections flow as before. A context manager: the proxy stops with everything it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536


class PgProxy:
    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every forwarded connection
        self._flowing: set[asyncio.Event] = set()  # one a forwarded connection; cleared: frozen
        self._cut = False
        self.port = 0  # chosen by the first listen, kept by restore()

    def __enter__(self) -> PgProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def cut(self) -> None:
        """Refuse new connections and abort the open ones; returns once both are done."""
        self._call(self._close())

    def freeze(self) -> None:
        """Forward nothing more on the connections open now; new ones flow."""
        self._call(self._freeze())

    async def _freeze(self) -> None:
        for flowing in self._flowing:
            flowing.clear()
        self._flowing.clear()

    def restore(self) -> None:
        """Accept and forward connections again, on the same port."""
        self._call(self._listen())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        sock = socket.socket()
        # The port was ours a moment ago: SO_REUSEADDR lets it be bound again at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._cut = False
        self._server = await asyncio.start_server(self._forward, sock=sock)

    async def _close(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()  # the listening socket only: Python leaves accepted ones open
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # a reset, not a goodbye: what a crashed server looks like
        self._open.clear()

    async def _stop(self) -> None:
        await self._close()
        # Each connection's task ends here, not pending on a closed loop: its coroutine, closed
        # by the garbage collector, would fail ("Event loop is closed") in the test that runs
        # then, an unraisable exception pytest turns into that test's error.
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        if self._cut:  # cut while this one was connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        ends = {writer, up_writer}
        self._open |= ends
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.add(flowing)
        pumps = [
            asyncio.create_task(_pump(reader, up_writer, flowing)),
            asyncio.create_task(_pump(up_reader, writer, flowing)),
        ]
        try:
            # Either side closing ends the connection for both, as a direct one would.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for end in ends:
                end.transport.abort()
            self._open -= ends
            self._flowing.discard(flowing)


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK):
            await flowing.wait()
            sink.write(data)
            await sink.drain()
