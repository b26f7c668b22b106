"""uvicorn's HTTP protocol (httptools) with the limits an endpoint facing the internet needs.

httptools keeps a request's URL and headers in memory however long they grow, and uvicorn sets
no bound on them (h11, its other protocol, stops at 16 KiB): one client sending headers without
end could fill the machine's memory. Here a request head over MAX_HEAD_BYTES is refused with a
Tencent packet and the connection closed.

uvicorn's only timeout is keep-alive, after an answer, and any byte the client sends ends it: a
connection that sends nothing, half a head or half a body, or a byte now and then, stays open
for good, and a few thousand of them use up the process's file descriptors (new connections,
Tencent's included, are then reset). Here each request must arrive whole within
`[server] request_timeout_s`; else a packet says so (408) and the connection closes.

A connection with more than MAX_PIPELINED requests waiting for their answers is cut off, and so
is one that reads none of an answer for `request_timeout_s`: it held its descriptor, and held up
a shutdown, for as long as it liked.

A request refused here while earlier ones on its connection are still owed their answers gets no
packet: it would be read as the answer to an earlier callback, stored meanwhile. Those answers
are written, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from bridge.config_tables import ServerConfig
from bridge.receive import Quiet, packet

MAX_HEAD_BYTES = 65_536  # request line and headers; Tencent's are well under 2 KiB
MAX_PIPELINED = 64  # requests waiting behind the one being answered; Tencent pipelines none

log = logging.getLogger(__name__)


class TooDeep(Exception):
    """More requests pipelined than MAX_PIPELINED: stops httptools mid-chunk."""


class HeadTooLong(Exception):
    """A request head over MAX_HEAD_BYTES that arrived whole: stops httptools mid-chunk."""


def raw_packet(protocol: HttpToolsProtocol, status: int, info: str) -> bytes:
    """A whole HTTP response carrying a Tencent FAIL packet, for the protocol to write itself
    (no application answers it); the connection closes after it."""
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


def _uncounted(status: int) -> None:
    pass


class LimitedProtocol(HttpToolsProtocol):
    request_timeout_s = 10.0  # protocol_for sets it from the config
    # Counts what this layer refuses, which no application sees (protocol_for sets it).
    refused: Callable[[int], None] = staticmethod(_uncounted)
    # Requests that are not HTTP are logged once a minute, as refused callbacks are (uvicorn
    # logged a warning each: anyone could fill the log's queue with them). Every connection's.
    quiet = Quiet()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # of the request head being read
        self._in_head = False  # between a request's first byte and the end of its headers
        self._heads_begun = 0
        self._arrived = True  # the last request has arrived whole (or none has begun)
        self._deadline: asyncio.TimerHandle | None = None
        self._replaying_head = False  # see _ignore_upgrade
        self._pipeline_overflow = False
        self._head_over = 0  # the status refusing a head that arrived whole but too long
        self._refused_behind = False  # a request refused behind answers owed: read no more
        self._unread: asyncio.TimerHandle | None = None  # an answer the client is not reading
        self._unread_bytes = 0  # what waited to be written when that deadline was set
        self._half_closed = False  # the client sent its end (shutdown(SHUT_WR)); answers owed
        self._cycles: list[RequestResponseCycle] = []  # the requests begun, not yet answered
        self._wait_for_request()

    def eof_received(self) -> bool:  # type: ignore[override]
        # A client that has sent whole requests and its end may still read their answers: the
        # transport closed at once, and a callback stored was answered nothing. One cut short
        # (its head or body unfinished) gets nothing, as before.
        cycle = self.cycle
        owed = self._arrived and (
            bool(self.pipeline) or (cycle is not None and not cycle.response_complete)
        )
        self._half_closed = owed
        return owed  # False: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._unread is not None:
            self._unread.cancel()
        # uvicorn marks the last request's cycle alone: an earlier one still being answered
        # (its callback stored, the next request's head parsed behind it) wrote its answer to
        # the closed transport, and "Exception in ASGI application" logged a traceback.
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client reads its answers slower than they are written, or not at all.
        super().pause_writing()
        if self._unread is None:
            self._await_reading()

    def _await_reading(self) -> None:
        self._unread_bytes = self.transport.get_write_buffer_size()
        self._unread = self.loop.call_later(self.request_timeout_s, self._not_read)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _not_read(self) -> None:
        self._unread = None
        if self.transport.get_write_buffer_size() < self._unread_bytes:
            self._await_reading()  # it reads, however slowly (a large page on a slow link)
            return
        self.refused(0)
        self.transport.abort()  # its application's sends end: the client is gone

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but for an upgrade offer (below) and a head that grows too long.
        if self._refused_behind:
            return  # the connection closes once the answers owed are written
        self._unset_keepalive_if_required()
        begun = self._heads_begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._pipeline_overflow:
                self.refused(0)
                self.transport.abort()  # answers still owed cannot all be given: cut off
                return
            if self._head_over:
                self._refuse_request(self._head_over, f"request head over {MAX_HEAD_BYTES} bytes")
                return
            if (unsaid := self.quiet.unsaid("not HTTP")) is not None:
                log.info("refused request: HTTP 400 invalid HTTP request%s", unsaid)
            self.send_400_response("invalid HTTP request")
            return
        except httptools.HttpParserUpgrade as upgrade:
            self._ignore_upgrade(data[upgrade.args[0] :])
            return
        # A head still arriving is counted chunk by chunk, but for the chunk it began in,
        # which may also hold the end of an earlier request: memory stays bounded by
        # MAX_HEAD_BYTES plus one chunk (uvloop reads at most 256 KiB). A head that ends is
        # measured whole when it does (on_headers_complete).
        if not self._in_head or begun != self._heads_begun or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            status = 414 if len(self.url) > MAX_HEAD_BYTES else 431
            self._refuse_request(status, f"request head over {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        # What httptools cannot parse, uvicorn answers in text; Tencent reads packets. A URL
        # over 64 KiB that arrived in one chunk is one: httptools' URL offsets are 16 bits.
        if len(self.url) > MAX_HEAD_BYTES:
            self._refuse_request(414, f"request head over {MAX_HEAD_BYTES} bytes")
        else:
            self._refuse_request(400, "invalid HTTP request")

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Serve a request that offers an upgrade (`Upgrade: h2c` from curl --http2, Java's
        RestClient, Ktor; a WebSocket) as plain HTTP/1.1, as RFC 9110 7.8 allows. httptools
        ends such a request at its head, its body unread: a fresh parser reads the body from a
        head that gives only its framing, then the requests after it."""
        log.debug("upgrade offer ignored")
        framing = self._body_framing()
        self.parser = httptools.HttpRequestParser(self)
        cycle = self.cycle
        if framing and cycle is not None and not cycle.response_complete:
            cycle.more_body = True  # its application task has not run yet
            self._arrived = False
            self._wait_for_request()
            self._replaying_head = True
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
        if rest:
            self.data_received(rest)

    def _body_framing(self) -> bytes:
        """The header that frames the current request's body; b"" if it has none."""
        # Names in lower case; llhttp refused a second Content-Length, and a Transfer-Encoding
        # that does not end in chunked.
        headers = dict(self.headers)
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return b"Transfer-Encoding: chunked\r\n"
        length = headers.get(b"content-length", b"0").strip()
        return b"" if length == b"0" else b"Content-Length: " + length + b"\r\n"

    def on_url(self, url: bytes) -> None:
        if not self._replaying_head:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._replaying_head:
            super().on_header(name, value)

    def on_message_begin(self) -> None:
        if self._replaying_head:
            return
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._heads_begun += 1
        self._arrived = False
        self._wait_for_request()

    def on_headers_complete(self) -> None:
        if self._replaying_head:
            self._replaying_head = False  # the body follows, for the request being answered
            return
        self._in_head = False
        # The URL and headers with the least framing a header can have (`name:value` and a line
        # end): never more than was sent, so no head within the limit is refused.
        size = len(self.url) + sum(len(name) + len(value) + 3 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._head_over = 414 if len(self.url) > MAX_HEAD_BYTES else 431
            raise HeadTooLong
        if len(self.pipeline) >= MAX_PIPELINED:
            # uvicorn stops reading while requests wait, but parses the rest of the chunk in
            # hand, and reads the next after each answer: a client pipelining faster than it
            # is answered (one that reads no answers) queued thousands a second, unbounded.
            self._pipeline_overflow = True
            raise TooDeep
        super().on_headers_complete()
        self._cycles = [c for c in self._cycles if not c.response_complete] + [self.cycle]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._arrived = True
        if self.cycle.response_complete and not self.pipeline:
            self._wait_for_request()  # answered before its body was read: idle again
        else:
            self._stop_waiting()  # the application's turn

    def on_response_complete(self) -> None:
        idle = self._arrived and not self.pipeline
        super().on_response_complete()
        if idle and self._half_closed:
            self.transport.close()  # every answer owed is written: no request can follow
        elif idle:
            self._wait_for_request()
        # else a request is still arriving, on its first deadline

    def _wait_for_request(self) -> None:
        self._stop_waiting()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._timed_out)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        reading_body = (
            not self._arrived and not self._in_head and cycle is not None
            and not cycle.response_started and not self.pipeline
        )  # fmt: skip
        if reading_body:
            # The application is waiting for the body: it is told the client is gone, and
            # whatever it answers is not written (the packet below is).
            cycle.disconnected = True
            cycle.message_event.set()
        # A head still arriving behind an answer not yet written gets no packet: it would
        # land inside that answer.
        head_alone = self._in_head and (cycle is None or cycle.response_complete)
        if head_alone or reading_body:
            # A body the application was reading is its callback, counted there (disconnected).
            self._refuse(
                408, f"request not received within {self.request_timeout_s:g} s", head_alone
            )
        else:
            self.transport.close()  # idle, or answered and the rest of its body still coming

    def _refuse_request(self, status: int, info: str) -> None:
        """Refuse the request being read: with a packet, unless earlier requests on this
        connection are still owed their answers (see the module's docstring)."""
        cycle = self.cycle
        if not self.pipeline and (cycle is None or cycle.response_complete):
            self._refuse(status, info)
            return
        if (
            not self.pipeline and not self._arrived and not self._in_head
            and cycle is not None and not cycle.response_started
        ):  # fmt: skip
            # Its own body is what went wrong (bad chunking): the application, waiting for the
            # body, is told the client is gone, and the packet is this request's answer. (It
            # waited for request_timeout_s and answered 408.) Counted as the application's
            # callback (disconnected), as a body that does not arrive in time is.
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(status, info, counted=False)
            return
        self.refused(status)
        self._refused_behind = True
        last = self.pipeline[0][0] if self.pipeline else cycle  # uvicorn queues at the left
        if last is not None:
            last.keep_alive = False  # uvicorn closes the connection after its answer

    def _refuse(self, status: int, info: str, counted: bool = True) -> None:
        if counted:
            self.refused(status)
        self.transport.write(raw_packet(self, status, info))
        self.transport.close()


def protocol_for(
    server: ServerConfig, count: Callable[[int], None] = _uncounted
) -> type[LimitedProtocol]:
    """The protocol class for uvicorn's `http` setting, with the config's timeout; `count`
    counts each request it refuses by status (0: cut off unanswered)."""

    class Configured(LimitedProtocol):
        request_timeout_s = server.request_timeout_s
        refused = staticmethod(count)

    return Configured
