"""uvicorn's HTTP protocol (httptools) with the limits an endpoint facing the internet needs.

httptools keeps a request's URL and headers in memory however long they grow, and uvicorn sets
no bound on them (h11, its other protocol, stops at 16 KiB): one client sending headers without
end could fill the machine's memory. Here a request head over MAX_HEAD_BYTES is refused with a
Tencent packet and the connection closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from bridge.receive import packet

MAX_HEAD_BYTES = 65_536  # request line and headers; Tencent's are well under 2 KiB


def raw_packet(protocol: HttpToolsProtocol, status: int, info: str) -> bytes:
    """A whole HTTP response carrying a Tencent FAIL packet, for the protocol to write itself
    (no application sees such a request); the connection closes after it."""
    body = packet(status, info).body
    head = [STATUS_LINE[status]]
    for name, value in protocol.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + bytes(body)


class LimitedProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # of the request head being read
        self._in_head = False  # between a request's first byte and the end of its headers
        self._heads_begun = 0

    def data_received(self, data: bytes) -> None:
        begun = self._heads_begun
        super().data_received(data)
        # A chunk in which a head began or ended is not counted: it may hold a body, or a
        # pipelined request's start. So a head is refused past MAX_HEAD_BYTES plus one chunk
        # (uvloop reads at most 256 KiB), still a bounded amount.
        if not self._in_head or begun != self._heads_begun or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            status = 414 if len(self.url) > MAX_HEAD_BYTES else 431
            self.transport.write(
                raw_packet(self, status, f"request head over {MAX_HEAD_BYTES} bytes")
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._heads_begun += 1

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
