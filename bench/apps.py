"""The two apps live-bridge is measured against, run under the same uvicorn.

`bare`: reads the body and returns the OK packet, nothing else: the ceiling of the stack.
`handwritten`: what most teams write by hand: parse the callback and post it to Slack inside the
request, answering Tencent only after Slack has answered (and answering OK whatever Slack said).
"""

from __future__ import annotations

import json
import logging
import os

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
