"""The apps live-bridge is measured against, run under the same uvicorn.

`bare`: reads the body and returns the OK packet, nothing else: the ceiling of the stack.
`journal`: the least a receiver can do to acknowledge durably: append the body to SQLite in WAL
mode with synchronous=FULL, the requests that wait together in one commit, as live-bridge's
writer does, and answer OK once it is on disk. No verifying, parsing, routing or delivering.
`handwritten`: what most teams write by hand: parse the callback and post it to Slack inside the
request, answering Tencent only after Slack has answered (and answering OK whatever Slack said).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

OK = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'
log = logging.getLogger("handwritten")


async def _bare(request: Request) -> Response:
    await request.body()
    return Response(OK, media_type="application/json")


bare = Starlette(routes=[Route("/tencent/callback", _bare, methods=["POST"])])

_Waiting = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class Journal:
    """Bodies appended to a SQLite table by one thread, one commit for all that wait."""

    def __init__(self, path: str) -> None:
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, body BLOB)")
        self._thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
        self._thread.start()

    async def append(self, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((body, loop, future))
        await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self, conn: sqlite3.Connection) -> None:
        stop = False
        while not stop and (first := self._queue.get()) is not None:
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 500:
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
            conn.execute("BEGIN IMMEDIATE")
            marks = ",".join(["(?)"] * len(batch))  # only marks go in; the bodies are parameters
            sql = "INSERT INTO bodies (body) VALUES " + marks  # noqa: S608
            conn.execute(sql, [body for body, _, _ in batch])
            conn.execute("COMMIT")
            batch[0][1].call_soon_threadsafe(_settle, [future for _, _, future in batch])
        conn.close()


def _settle(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


_journal: Journal | None = None


@contextlib.asynccontextmanager
async def _journal_open(app: Starlette) -> AsyncIterator[None]:
    global _journal
    _journal = Journal(os.environ["JOURNAL_DB"])
    try:
        yield
    finally:
        _journal.close()


async def _journaled(request: Request) -> Response:
    assert _journal is not None
    await _journal.append(await request.body())
    return Response(OK, media_type="application/json")


journal = Starlette(
    routes=[Route("/tencent/callback", _journaled, methods=["POST"])], lifespan=_journal_open
)

_session: aiohttp.ClientSession | None = None


async def _handwritten(request: Request) -> Response:
    global _session
    event = json.loads(await request.body())
    text = (
        f"Room owner changed in {event.get('RoomId')}: {event.get('OriginalOwner_Account')}"
        f" -> {event.get('CurrentOwner_Account')}"
    )
    if _session is None:
        _session = aiohttp.ClientSession()
    try:
        async with _session.post(os.environ["SLACK_WEBHOOK_URL"], json={"text": text}) as answer:
            if answer.status != 200:
                log.warning("slack said %d", answer.status)  # and the event is gone
    except aiohttp.ClientError as exc:
        log.warning("slack failed: %s", exc)
    return Response(OK, media_type="application/json")


handwritten = Starlette(routes=[Route("/tencent/callback", _handwritten, methods=["POST"])])
