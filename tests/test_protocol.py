"""Hostile clients at the HTTP level, against a real `live-bridge serve` on loopback: heads that
never end or never finish, bodies that never finish, idle connections by the hundred."""

from __future__ import annotations

import contextlib
import gzip
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from bridge.config_tables import ServerConfig
from bridge.protocol import protocol_for
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    SEED_BODY,
    Subprocess,
    db_rows,
    free_port,
    post_callback,
    samples,
    wait_until,
    write_config,
)

CALLBACK = f"/tencent/callback?SdkAppid={APP_ID}".encode()
MAX_HEAD = 65_536


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Subprocess]:
    port = free_port()
    with Subprocess(write_config(tmp_path, port), port, tmp_path / "bridge.log") as server:
        yield server


@contextlib.contextmanager
def connection(bridge: Subprocess) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", int(bridge.url.rsplit(":", 1)[1])), timeout=5)
    try:
        yield sock
    finally:
        sock.close()


def answer(sock: socket.socket, within_s: float) -> bytes | None:
    """Everything the server sends until it closes the connection (or resets it); None if it
    keeps the connection open longer than `within_s`."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return received


def one_response(sock: socket.socket, within_s: float = 5) -> bytes:
    """One whole response on a connection the server keeps open: its head, then as many bytes
    of body as its Content-Length says (a recv may return the head alone)."""
    sock.settimeout(within_s)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def packet_of(response: bytes | None) -> tuple[int, dict[str, object]]:
    assert response is not None, "the server kept the connection open"
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_until_refused(sock: socket.socket, first: bytes, more: bytes, upto: int) -> None:
    """Send `first`, then `more` again and again up to `upto` bytes, or until the server has
    answered and closed."""
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(first)
        while sent < upto:
            sock.sendall(more)
            sent += len(more)


@pytest.mark.parametrize(
    ("first", "more", "status"),
    [
        (
            b"POST " + CALLBACK + b" HTTP/1.1\r\nHost: x\r\n",
            b"X-Flood: " + b"a" * 1000 + b"\r\n",
            431,
        ),
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nX-Long: ", b"a" * 1024, 431),
        (b"POST " + CALLBACK + b"&pad=", b"a" * 1024, 414),
    ],
    ids=["many headers", "one endless header", "endless URL"],
)
def test_a_head_that_never_ends_is_refused_with_a_packet_and_memory_stays_bounded(
    bridge: Subprocess, first: bytes, more: bytes, status: int
) -> None:
    assert bridge.process is not None
    before = rss_bytes(bridge.process.pid)
    with connection(bridge) as sock:
        send_until_refused(sock, first, more, 32 * 1024 * 1024)
        response = answer(sock, 5)
    grown = rss_bytes(bridge.process.pid) - before
    info = "request head over 65536 bytes"
    assert packet_of(response) == (
        status,
        {"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": status},
    )
    assert grown < 8 * 1024 * 1024, f"the server grew by {grown} bytes"
    assert post_callback(bridge.url) == (200, OK_PACKET)


def callback_request(extra_headers: bytes = b"") -> bytes:
    return (
        b"POST " + CALLBACK + b" HTTP/1.1\r\nHost: x\r\n" + extra_headers
        + b"Content-Length: %d\r\n\r\n" % len(SEED_BODY) + SEED_BODY
    )  # fmt: skip


def test_a_head_under_the_limit_and_pipelined_callbacks_are_answered_in_order(
    bridge: Subprocess,
) -> None:
    big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 900) for i in range(60))  # ~55 KiB
    with connection(bridge) as sock:
        # One write: the head that starts in a chunk is not counted against the limit,
        # the next heads are.
        sock.sendall(callback_request(big) * 5 + callback_request(b"Connection: close\r\n"))
        response = answer(sock, 10)
    assert response is not None
    assert response.count(b"HTTP/1.1 200 OK\r\n") == 6
    assert response.count(OK_PACKET) == 6


def test_a_head_of_64_kib_without_spaces_after_its_colons_is_accepted(bridge: Subprocess) -> None:
    # Counted as `name: value`, 600 headers of `X-Pad-N:` and 100 bytes were refused at 65,000.
    pad = b"".join(b"X-Pad-%03d:%s\r\n" % (i, b"a" * 96) for i in range(600))
    request = callback_request(pad)
    assert len(request.partition(b"\r\n\r\n")[0]) < MAX_HEAD
    with connection(bridge) as sock:
        sock.sendall(request.replace(b"Host: x", b"Host: x\r\nConnection: close", 1))
        response = answer(sock, 5)
    assert response is not None and response.startswith(b"HTTP/1.1 200 ")


def counted(head: bytes) -> int:
    """A head's size as the limit counts it: the URL, and each header as `name:value` and a
    line end (bridge/protocol.py)."""
    request_line, *fields = head.split(b"\r\n")
    names_values = [field.partition(b":")[::2] for field in fields]
    return len(request_line.split()[1]) + sum(len(n) + len(v.strip()) + 3 for n, v in names_values)


@pytest.mark.parametrize(("over", "status"), [(0, 200), (1, 431)])
def test_a_head_of_exactly_64_kib_is_taken_and_one_byte_more_is_not(
    bridge: Subprocess, over: int, status: int
) -> None:
    plain = callback_request(b"Connection: close\r\n")
    pad = MAX_HEAD + over - counted(plain.partition(b"\r\n\r\n")[0]) - len(b"X-Pad") - 3
    request = callback_request(b"Connection: close\r\nX-Pad:" + b"a" * pad + b"\r\n")
    assert counted(request.partition(b"\r\n\r\n")[0]) == MAX_HEAD + over
    with connection(bridge) as sock:
        sock.sendall(request)
        response = answer(sock, 5)
    assert response is not None and response.startswith(b"HTTP/1.1 %d " % status)


@pytest.mark.parametrize(
    "pad", [67_000, 70_000, 120_000, 200_000], ids=["67 KB", "70 KB", "120 KB", "200 KB"]
)
def test_a_whole_head_over_the_limit_in_one_write_is_refused_too(
    bridge: Subprocess, pad: int
) -> None:
    """Counting chunk by chunk skips the chunk a head began in: a head that arrives whole in
    one read is measured when it ends."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 990) for i in range(pad // 1000))
    with connection(bridge) as sock:
        sock.sendall(callback_request(headers))
        response = answer(sock, 5)
    assert response is not None
    info = "request head over 65536 bytes"
    assert packet_of(response) == (
        431,
        {"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": 431},
    )
    assert db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events") == [(0,)]


def slow_client(sock: socket.socket, trickle: bytes, within_s: float) -> tuple[bytes | None, float]:
    """Send `trickle` a byte at a time, one every 0.5 s, as long as the connection stays open
    (at most `within_s`); what the server answered (None: nothing, and it stayed open) and when
    it closed."""
    started = time.monotonic()
    received = b""
    sock.settimeout(0.5)
    for i in range(int(within_s / 0.5)):
        with contextlib.suppress(OSError):
            sock.sendall(trickle[i % len(trickle) : i % len(trickle) + 1] if trickle else b"")
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic() - started
        received += chunk
    return None, within_s


def test_slow_and_idle_connections_are_closed_after_request_timeout_s(bridge: Subprocess) -> None:
    """The default request_timeout_s (10 s): a byte every half second keeps none of them open."""
    starts = {
        "idle": (b"", b""),
        "head": (b"POST " + CALLBACK + b" HTTP/1.1\r\nX-Slow: ", b"abc"),
        "body": (
            b"POST " + CALLBACK + b"&CallbackCommand=Live.CallbackAfterChangeOwner HTTP/1.1\r\n"
            b"Content-Length: 999\r\n\r\n{",
            b" ",
        ),
    }
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(starts)) as pool:
        futures = {}
        for name, (first, trickle) in starts.items():
            sock = stack.enter_context(connection(bridge))
            sock.sendall(first)
            futures[name] = pool.submit(slow_client, sock, trickle, 16)
        # Meanwhile Tencent's callbacks are answered as usual.
        assert post_callback(bridge.url) == (200, OK_PACKET)
        results = {name: future.result() for name, future in futures.items()}
    assert results["idle"][0] == b""
    info = "request not received within 10 s"
    for name in ("head", "body"):
        assert packet_of(results[name][0]) == (
            408,
            {"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": 408},
        ), name
    for name, (_, closed_after) in results.items():
        assert 9 < closed_after < 13, (name, closed_after)
    assert db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events") == [(1,)]
    # The receiver, told the body's client is gone, logs it as such: no ERROR, no traceback.
    # Lines reach the file from the log's own thread: waited for, not read at once.
    assert wait_until(lambda: "client went away before its body arrived" in bridge.log.read_text())
    assert "ERROR" not in bridge.log.read_text()
    # Counted once each: the head by the protocol, which no application saw; the body by the
    # receiver, under the command its query names.
    counted = samples(bridge.url)
    assert counted[("live_bridge_requests_refused_total", (("status", "408"),))] == 1
    late_body = (("command", "Live.CallbackAfterChangeOwner"), ("result", "disconnected"))
    assert counted[("live_bridge_callbacks_total", late_body)] == 1


def test_idle_connections_past_the_fd_limit_do_not_shut_tencent_out(tmp_path: Path) -> None:
    """A process allowed 200 descriptors, 300 connections that send nothing: after
    request_timeout_s they are closed, and a callback gets through again."""
    port = free_port()
    config = write_config(tmp_path, port, server="request_timeout_s = 1\n")
    with (
        Subprocess(config, port, tmp_path / "bridge.log") as bridge,
        contextlib.ExitStack() as stack,
    ):
        assert bridge.process is not None
        resource.prlimit(bridge.process.pid, resource.RLIMIT_NOFILE, (200, 200))
        for _ in range(300):
            stack.enter_context(connection(bridge))
        answered = None
        deadline = time.monotonic() + 8
        while answered is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                answered = post_callback(bridge.url)
        assert answered == (200, OK_PACKET)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400),
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nContent-Length: 10\r\n\r\n" + SEED_BODY, 400),
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nX Bad: 1\r\n\r\n", 400),
        (b"POST " + CALLBACK + b"&" + b"&".join(b"k%d=v" % i for i in range(10_000))
         + b" HTTP/1.1\r\n\r\n", 414),
        (b"POST " + CALLBACK + b"&pad=" + b"a" * 65_536 + b" HTTP/1.1\r\n\r\n", 414),
    ],
    ids=["transfer-encoding and content-length", "content-length too short", "negative length",
         "bad header name", "10,000 query parameters", "64 KiB query"],
)  # fmt: skip
def test_a_request_that_is_not_http_gets_a_packet_too(
    bridge: Subprocess, request_bytes: bytes, status: int
) -> None:
    """uvicorn answers these itself, before any application: text, where Tencent reads JSON."""
    with connection(bridge) as sock:
        sock.sendall(request_bytes)
        response = answer(sock, 5)
    assert response is not None
    # The last answer: a request cut short may have been answered before the rest is refused.
    code, reply = packet_of(response[response.rindex(b"HTTP/1.1 ") :])
    assert code == reply["ErrorCode"] == status and reply["ActionStatus"] == "FAIL"
    assert db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events") == [(0,)]
    # No application saw it, so /metrics counts it apart from the callbacks.
    refused = samples(bridge.url)[
        ("live_bridge_requests_refused_total", (("status", str(status)),))
    ]
    assert refused == 1


def test_requests_that_are_not_http_are_logged_once_a_minute(bridge: Subprocess) -> None:
    # uvicorn logged a warning for each: anyone could fill the log's queue with them, whose
    # overflow drops the lines that matter. /metrics counts every one.
    bad = b"POST " + CALLBACK + b" HTTP/1.1\r\nContent-Length: -1\r\n\r\n"
    for _ in range(50):
        with connection(bridge) as sock:
            sock.sendall(bad)
            assert answer(sock, 5) is not None
    refused = samples(bridge.url)[("live_bridge_requests_refused_total", (("status", "400"),))]
    assert refused == 50
    lines = bridge.log.read_text().splitlines()
    assert len([line for line in lines if "refused request: HTTP 400" in line]) == 1
    assert not [line for line in lines if "Invalid HTTP request" in line]


@pytest.mark.parametrize("tail", [b"X", b"GARBAGE\r\n\r\n"], ids=["a byte", "a line"])
def test_a_stored_callback_is_answered_ok_though_what_follows_it_is_not_http(
    bridge: Subprocess, tail: bytes
) -> None:
    # The refusal's packet was written at once, before the callback's answer, and read as its
    # answer: 400 for a callback that was stored and delivered.
    with connection(bridge) as sock:
        sock.sendall(callback_request() + tail)
        response = answer(sock, 5)
    assert response is not None and response.count(b"HTTP/1.1 ") == 1, response
    assert packet_of(response) == (200, json.loads(OK_PACKET))
    assert b"connection: close" in response.lower()
    assert db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events") == [(1,)]
    refused = samples(bridge.url)[("live_bridge_requests_refused_total", (("status", "400"),))]
    assert refused == 1


@pytest.mark.parametrize(
    ("sent", "answers", "stored"),
    [
        (callback_request(), 1, 1),
        (callback_request() * 3, 3, 1),  # the same event: stored once, answered thrice
        (callback_request()[:-5], 0, 0),  # its body cut short: nothing to answer
        (b"", 0, 0),
    ],
    ids=["one", "pipelined", "cut short", "idle"],
)
def test_a_client_that_half_closes_after_its_callbacks_still_gets_their_answers(
    bridge: Subprocess, sent: bytes, answers: int, stored: int
) -> None:
    # shutdown(SHUT_WR) once the callback is sent: the event was stored, and the connection
    # closed without its answer.
    with connection(bridge) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        response = answer(sock, 5)
    assert response is not None, "kept open after the client's end"
    assert response.count(b"HTTP/1.1 200 OK\r\n") == answers, response
    assert response.count(OK_PACKET) == answers
    assert db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events") == [(stored,)]


@pytest.mark.parametrize(
    "sent",
    [callback_request() + callback_request()[:-5], callback_request() * 70],
    ids=["the next one cut short", "pipelined too deep"],
)
def test_a_connection_lost_behind_a_callback_being_answered_logs_no_traceback(
    bridge: Subprocess, sent: bytes
) -> None:
    # uvicorn marked only the last request disconnected: the answer to the one before went to
    # the closed transport, and "Exception in ASGI application" logged a traceback.
    with connection(bridge) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        answer(sock, 5)
    assert wait_until(lambda: db_rows(bridge.log.parent / "bridge.db", "SELECT 1 FROM events"))
    time.sleep(0.5)  # its answer written, or not
    assert "Traceback" not in bridge.log.read_text()


def test_a_client_that_reads_slowly_but_steadily_is_not_cut_off() -> None:
    # The cut-off for clients that read no answers ran from when writing first paused, however
    # much was read since: a large page read steadily over a slow link was cut off.
    body = b"x" * (16 << 20)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = str(len(body)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", length)]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})

    cut: list[int] = []
    port = free_port()
    protocol = protocol_for(ServerConfig(request_timeout_s=1), cut.append)
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, http=protocol, log_level="warning", lifespan="off",
    ))  # fmt: skip
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        assert wait_until(lambda: server.started)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received = 0
            while chunk := sock.recv(65536):
                received += len(chunk)
                if received > len(body):
                    break
                time.sleep(len(chunk) / (4 << 20))  # 4 MiB/s: the page takes about 4 s
        assert received > len(body) and cut == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_callback_whose_chunked_body_goes_bad_is_answered_400_at_once(tmp_path: Path) -> None:
    # Refused as a request behind an answer owed (its own), it waited for request_timeout_s and
    # was answered 408, "request not received".
    port = free_port()
    config = write_config(tmp_path, port, server="request_timeout_s = 30")
    with Subprocess(config, port, tmp_path / "bridge.log") as bridge, connection(bridge) as sock:
        sock.sendall(
            b"POST " + CALLBACK + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"Cal\r\nZZZ-not-a-chunk-size\r\n'
        )
        assert packet_of(answer(sock, 10)) == (
            400, {"ActionStatus": "FAIL", "ErrorInfo": "invalid HTTP request", "ErrorCode": 400}
        )  # fmt: skip
        assert db_rows(tmp_path / "bridge.db", "SELECT count(*) FROM events") == [(0,)]


def test_a_client_that_reads_no_answers_is_cut_off_after_request_timeout_s(tmp_path: Path) -> None:
    # Each request arrived whole, so no deadline ran while its answer could not be written: the
    # connection stayed for good, and held up a shutdown until the client closed it.
    port = free_port()
    config = write_config(tmp_path, port, server="request_timeout_s = 1")
    with Subprocess(config, port, tmp_path / "bridge.log") as bridge:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        with contextlib.closing(sock):
            # Answers of some KiB (a loopback Host, or /metrics answers a short 403): 5,000 of
            # them are more than any send buffer the kernel lets the socket grow to.
            request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            sock.settimeout(30)
            # One at a time, never 64 waiting: once its answers fill the buffers the server
            # reads no more, and a send blocks until the server cuts the connection off.
            with contextlib.suppress(OSError):
                for _ in range(5000):
                    sock.sendall(request)
                    time.sleep(0.0005)
            cut = ("live_bridge_requests_refused_total", (("status", "0"),))
            assert wait_until(lambda: samples(bridge.url).get(cut, 0) == 1, timeout=15)
        assert post_callback(bridge.url) == (200, OK_PACKET)
    log = (tmp_path / "bridge.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log


H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize(
    "segments",
    [
        [callback_request(H2C)],
        [callback_request(H2C)[: -len(SEED_BODY)], SEED_BODY],
        [callback_request(H2C).replace(b"Content-Length: %d\r\n\r\n" % len(SEED_BODY),
                                       b"Transfer-Encoding: chunked\r\n\r\n")
         .replace(SEED_BODY, b"%x\r\n%s\r\n0\r\n\r\n" % (len(SEED_BODY), SEED_BODY))],
    ],
    ids=["one segment", "body in a second segment", "chunked"],
)  # fmt: skip
def test_an_upgrade_offer_is_ignored_and_the_body_read(
    bridge: Subprocess, segments: list[bytes]
) -> None:
    """curl --http2, Java's RestClient and Ktor offer `Upgrade: h2c` on a plain POST; a server
    may ignore it (RFC 9110 7.8). httptools skips the body of such a request: the callback was
    refused as not JSON, or its body parsed as a request of its own."""
    with connection(bridge) as sock:
        for segment in segments:
            sock.sendall(segment)
            time.sleep(0.1)
        sock.sendall(callback_request(b"Connection: close\r\n"))  # the next request still parses
        response = answer(sock, 5)
    assert response is not None
    assert response.count(b"HTTP/1.1 200 OK\r\n") == 2 and response.count(OK_PACKET) == 2
    body = db_rows(bridge.log.parent / "bridge.db", "SELECT body FROM events")
    assert body == [(SEED_BODY.decode(),)]  # the second one is the first's duplicate


def test_a_websocket_request_gets_a_packet(bridge: Subprocess) -> None:
    with connection(bridge) as sock:
        sock.sendall(
            b"GET " + CALLBACK + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        response = one_response(sock)
    assert packet_of(response)[0] == 405


@pytest.mark.parametrize(
    ("request_bytes", "status", "stored"),
    [
        (callback_request().replace(b"HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.0\r\n"), 200, 1),
        # Not decompressed (Tencent compresses nothing): no zip bomb unfolds here. Refused as
        # such, not as "body is not UTF-8".
        (b"POST " + CALLBACK + b" HTTP/1.1\r\nConnection: close\r\nContent-Encoding: gzip\r\n"
         b"Content-Length: %d\r\n\r\n" % len(gzip.compress(SEED_BODY)) + gzip.compress(SEED_BODY),
         415, 0),
    ],
    ids=["HTTP/1.0", "gzip"],
)  # fmt: skip
def test_odd_but_honest_requests_get_their_packet(
    bridge: Subprocess, request_bytes: bytes, status: int, stored: int
) -> None:
    with connection(bridge) as sock:
        sock.sendall(request_bytes)
        assert packet_of(answer(sock, 5))[0] == status
    rows = db_rows(bridge.log.parent / "bridge.db", "SELECT count(*) FROM events")
    assert rows == [(stored,)]


def test_expect_100_continue(bridge: Subprocess) -> None:
    head, body = callback_request(b"Expect: 100-continue\r\nConnection: close\r\n").split(
        b"\r\n\r\n"
    )
    with connection(bridge) as sock:
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert packet_of(answer(sock, 5)) == (200, json.loads(OK_PACKET))


def server_side_open(server_port: int, client_port: int) -> bool:
    """Whether the server's end of the connection from `client_port` is still open (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        ours = int(local.split(":")[1], 16) == server_port
        if ours and int(remote.split(":")[1], 16) == client_port:
            # ESTABLISHED or CLOSE_WAIT: the process holds it. (Closed with answers unsent, the
            # kernel keeps it a while in FIN_WAIT1, without a descriptor.)
            return state in ("01", "08")
    return False


@pytest.mark.parametrize(("waiting", "answered"), [(64, 65), (65, 0)])
def test_64_requests_may_wait_behind_the_one_being_answered_and_no_more(
    bridge: Subprocess, waiting: int, answered: int
) -> None:
    # One write, parsed at once: the first is being answered while the rest wait behind it.
    requests = callback_request() * waiting + callback_request(b"Connection: close\r\n")
    with connection(bridge) as sock:
        sock.sendall(requests)
        response = answer(sock, 10)
    assert response is not None  # closed: after the last answer, or cut off owing them all
    assert response.count(b"HTTP/1.1 200 OK\r\n") == answered


def test_a_client_that_pipelines_without_reading_answers_is_cut_off(tmp_path: Path) -> None:
    """Requests pipelined without end, answers never read: uvicorn parsed a whole chunk of them
    after each answer (thousands of waiting requests a second, the server grown by 300 MB in
    6 s) and the connection stayed for as long as the client kept sending."""
    port = free_port()
    with Subprocess(write_config(tmp_path, port), port, tmp_path / "bridge.log") as bridge:
        assert bridge.process is not None
        before = rss_bytes(bridge.process.pid)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            refused = b"POST /tencent/callback?SdkAppid=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
            pending = b""
            deadline = time.monotonic() + 3
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                while time.monotonic() < deadline:
                    pending = pending or refused * 1000
                    try:
                        pending = pending[sock.send(pending) :]
                    except BlockingIOError:
                        time.sleep(0.05)
            client_port = sock.getsockname()[1]
            assert wait_until(lambda: not server_side_open(port, client_port), 5)
        grown = rss_bytes(bridge.process.pid) - before
        assert grown < 20 * 1024 * 1024, f"the server grew by {grown} bytes"
