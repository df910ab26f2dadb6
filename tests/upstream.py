"""An upstream API with limits of its own, for the httpx transport's tests (served by uvicorn):

- ``/api``: the first request is answered 429 with ``Retry-After: 1`` (closing the API for 1 s);
  any request that arrives while it is closed is answered 429 again and counted as early; then 200.
- ``/busy``: always 503 with ``Retry-After: 0`` (for the bound on retries).
- ``/dated``: the first request 429 with ``Retry-After`` as an HTTP date 2 s ahead; then 200.
- ``/slow``: 200 after 0.3 s (for concurrency limits held until the body is read).
- ``/stats``: what happened, as JSON.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

state: dict[str, float | int] = {"closed_until": 0.0, "first": 1, "early": 0, "served": 0, "dated_until": 0.0, "dated_early": 0}


async def api(request: Request) -> Response:
    now = time.time()
    if state["first"]:
        state["first"] = 0
        state["closed_until"] = now + 1.0
        return PlainTextResponse("slow down", status_code=429, headers={"Retry-After": "1"})
    if now < state["closed_until"]:
        state["early"] += 1
        return PlainTextResponse("slow down", status_code=429, headers={"Retry-After": "1"})
    state["served"] += 1
    return PlainTextResponse("ok")


async def busy(request: Request) -> Response:
    return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "0"})


async def dated(request: Request) -> Response:
    now = time.time()
    if not state["dated_until"]:
        state["dated_until"] = now + 2.0
        return PlainTextResponse("later", status_code=429, headers={"Retry-After": email.utils.formatdate(now + 2.0, usegmt=True)})
    if now < state["dated_until"] - 1.0:  # HTTP dates have whole seconds: allow the rounding
        state["dated_early"] += 1
        return PlainTextResponse("later", status_code=429, headers={"Retry-After": "1"})
    return PlainTextResponse("ok")


async def slow(request: Request) -> Response:
    await asyncio.sleep(0.3)
    return PlainTextResponse("ok")


async def stats(request: Request) -> Response:
    return JSONResponse(state)


app = Starlette(routes=[Route(p, f) for p, f in (("/api", api), ("/busy", busy), ("/dated", dated), ("/slow", slow), ("/stats", stats))])
