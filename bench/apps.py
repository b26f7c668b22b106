"""The apps live-bridge is measured against, run under the same uvicorn.

`bare`: reads the body and returns the OK packet, nothing else: the ceiling of the stack.
`journal`: the least a receiver can do to acknowledge durably: append the body to SQLite through
live-bridge's own group-commit writer and connection settings (WAL, synchronous=FULL), and answer
OK once it is on disk. No verifying, parsing, deduplicating, routing or delivering.
`handwritten`: what most teams write by hand: parse the callback and post it to Slack inside the
request, answering Tencent only after Slack has answered (and answering OK whatever Slack said).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.store.sqlite_connect import connect
from bridge.store.sqlite_params import insert_rows
from bridge.store.writer import GroupCommitWriter, Together

OK = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'
log = logging.getLogger("handwritten")


async def _bare(request: Request) -> Response:
    await request.body()
    return Response(OK, media_type="application/json")


bare = Starlette(routes=[Route("/tencent/callback", _bare, methods=["POST"])])


@dataclasses.dataclass(frozen=True)
class _Append(Together):
    """One body; the writer appends a batch's bodies in as few statements as SQLite allows."""

    body: bytes

    @classmethod
    def run_together(cls, conn: sqlite3.Connection, ops: Sequence[_Append]) -> list[None]:
        insert_rows(conn, "INSERT INTO bodies (body) VALUES", [(op.body,) for op in ops])
        return [None] * len(ops)


_journal: GroupCommitWriter | None = None


@contextlib.asynccontextmanager
async def _journal_open(app: Starlette) -> AsyncIterator[None]:
    global _journal
    conn = connect(Path(os.environ["JOURNAL_DB"]))  # WAL, synchronous=FULL: live-bridge's own
    conn.execute("CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, body BLOB)")
    _journal = GroupCommitWriter(conn)
    try:
        yield
    finally:
        await _journal.close()


async def _journaled(request: Request) -> Response:
    assert _journal is not None
    await _journal.submit(_Append(await request.body()))
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
