"""A webhook sink for the delivery benchmark: records when each event arrived.

POST /hook records (RoomId, time.monotonic()) and answers 200; GET /log returns them as JSON.
CLOCK_MONOTONIC is system-wide on Linux, so times compare with the load generator's.
"""

from __future__ import annotations

import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_seen: list[tuple[str, float]] = []


async def _hook(request: Request) -> Response:
    body = json.loads(await request.body())
    _seen.append((str(body["event"]["RoomId"]), time.monotonic()))
    return Response(b"ok")


async def _log(request: Request) -> Response:
    return JSONResponse(_seen)


async def _reset(request: Request) -> Response:
    _seen.clear()
    return Response(b"ok")


app = Starlette(
    routes=[
        Route("/hook", _hook, methods=["POST"]),
        Route("/log", _log, methods=["GET"]),
        Route("/reset", _reset, methods=["POST"]),
    ]
)
