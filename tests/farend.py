"""Far ends that misbehave below HTTP, for the senders' tests: a raw asyncio socket server that
reads a request and then plays a script of bytes, pauses, closes and resets.

`async with far_end(ANSWERS["drip"], answer) as url:` plays that script to the first request and
`answer` to every later one; the scripts in ANSWERS are shared by the webhook and the Slack
tests, whose expectations differ.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

# A step: bytes to write, a float to sleep, "close" (FIN) or "reset" (RST), "answer" or "body"
# (see far_end), "unread" first to answer before the request is read.
Step = bytes | float | str
Script = Sequence[Step]

OK_JSON = b'{"ok":true,"channel":"C0123456789","ts":"1700000000.000100"}'


def fixed(status: bytes, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer with a Content-Length."""
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


ANSWERS: dict[str, Script] = {
    # headers, then a byte a second of a body that is never complete in time
    "drip": [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"] + [b"o", 1.0] * 100,
    "silent": [],  # accepts, reads the request, never answers
    "close mid-headers": [b"HTTP/1.1 200 OK\r\nContent-Ty", "close"],
    "close mid-body": [b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok":', "close"],
    "reset mid-body": [b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok":', 0.05, "reset"],
    # HTTP/1.0 style: no length, the body ends where the connection does
    "close-delimited": [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n",
        "body",
        "close",
    ],
    # a chunk that is not one, after the head, or in the head's own packet
    "broken chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        0.05,
        b"zz\r\nnot a chunk\r\n",
    ],
    "broken chunked at once": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n"
    ],
    # a Content-Length larger than the body, the connection then left open
    "length past the body": [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nok"],
    "100 continue first": [b"HTTP/1.1 100 Continue\r\n\r\n", "answer"],
    "103 early hints first": [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n", "answer"],
    "header over the limit": [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
        "body",
        "close",
    ],
    # a plain HTTP server that the test calls with https://: it answers the TLS hello with a 400
    "https to plain http": [
        "unread",
        0.05,
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        "close",
    ],
}


def with_status(script: Script, status: bytes) -> Script:
    """`script` with its 200 OK made `status` (b"503 Service Unavailable")."""
    return [s.replace(b"200 OK", status) if isinstance(s, bytes) else s for s in script]


@asynccontextmanager
async def far_end(
    script: Script, answer: bytes = b"", body: bytes = b"", tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve `script` to the first request on 127.0.0.1, and `answer` to every later one; yields
    the base URL. "answer" in a script writes `answer` (the whole answer that follows a 1xx),
    "body" writes `body` (after a head of a script's). A connection whose script ended with an
    "answer" serves further requests; any other is held until the server stops, so that a
    client that kept a broken connection for its next request would get nothing on it."""
    tasks: set[asyncio.Task[object]] = set()
    served = 0

    async def play(steps: Script, writer: asyncio.StreamWriter) -> bool:
        """Whether the connection is still usable after `steps`."""
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif step in ("answer", "body"):
                writer.write(answer if step == "answer" else body)
            elif step == "close":
                await writer.drain()
                writer.close()
                return False
            elif step == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
        return steps[-1:] == ["answer"]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while True:
                steps = script if served == 0 else ["answer"]
                served += 1
                if steps[:1] != ["unread"]:
                    await read_request(reader)
                if not await play(steps, writer):
                    break
            if not writer.is_closing():
                await asyncio.Event().wait()  # held until the server stops
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client gave up, or the server is stopping
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request, head and Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def self_signed(directory: Path) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 that nobody signed (openssl's CLI:
    trustme is not among the dependencies)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
