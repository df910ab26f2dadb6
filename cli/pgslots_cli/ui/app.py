"""The page's web app: a Starlette route table, one middleware that guards every request, and
handlers that read through the library and answer what ``views`` builds. Served by uvicorn (see
``command``); Starlette and uvicorn are the ``ui`` extra."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import pgslots
from pgslots.client import Client
from pgslots.metrics import read as read_metrics

from ..output import to_jsonable
from . import guards
from .sampler import Sampler
from .views import limits_view

BUSIEST_SHOWN = 5
HOLDERS_SHOWN = 10  # per limit and key
# The page's own files, shipped in the wheel beside this module.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
# Paths anyone who may reach the page loads (the page itself); everything else is data.
PAGE_PATHS = ("/", "/index.html", "/static/")


@dataclass
class Board:
    """What the handlers share: the client, the sampler, the token and the two switches."""

    client: Client
    sampler: Sampler
    token: str | None
    allow_admin: bool
    loopback: bool


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(to_jsonable(value), status_code=status)


def _static_file(name: str) -> Response:
    if name not in STATIC:
        return _json({"error": f"Nothing at /static/{name}."}, 404)
    body = resources.files("pgslots_cli.ui").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name])


class Guard(BaseHTTPMiddleware):
    """Every request: a loopback Host when listening on loopback (no rebinding), the token beyond
    loopback for data and always for changes, a bounded body; security headers on every answer."""

    def __init__(self, app: Any, board: Board) -> None:
        super().__init__(app)
        self.board = board

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = self._refusal(request) or await call_next(request)
        response.headers.update(guards.SECURITY_HEADERS)
        return response

    def _refusal(self, request: Request) -> Response | None:
        board, path = self.board, request.url.path
        if board.loopback and not guards.local_host(request.headers.get("host")):
            host = request.headers.get("host")
            return _json({"error": f"Host {host!r} is not a loopback name: open http://127.0.0.1:PORT/."}, 403)
        token_given = guards.authorized(board.token, request.headers.get("authorization"))
        if request.method == "POST":
            if not board.allow_admin:
                return _json({"error": "This page is read-only: start it with 'pgslots ui --allow-admin' to change limits."}, 403)
            if not token_given:
                return _json({"error": "Admin actions need the token printed when pgslots ui started (Authorization: Bearer TOKEN)."}, 401)
            if guards.body_length(request.headers.get("content-length")) is None:
                return _json({"error": f"Content-Length must be a number of bytes from 0 to {guards.MAX_BODY}."}, 400)
            return None
        if path in PAGE_PATHS[:2] or path.startswith(PAGE_PATHS[2]) or board.loopback or token_given:
            return None
        return _json({"error": "This page needs the token printed when pgslots ui started: send Authorization: Bearer TOKEN."}, 401)


def build(board: Board) -> Starlette:
    """The app: its route table, its guard."""
    client = board.client

    def page(request: Request) -> Response:
        return _static_file("index.html")

    def static(request: Request) -> Response:
        return _static_file(request.path_params["file"])

    def limits(request: Request) -> Response:
        seen = client.overview(busiest=BUSIEST_SHOWN, holders=HOLDERS_SHOWN)
        extra = {"admin": board.allow_admin, "sample_error": board.sampler.error}
        return _json(limits_view(seen, datetime.now(UTC)) | extra)

    def history(request: Request) -> Response:
        return _json(board.sampler.history())

    def metrics(request: Request) -> Response:
        return Response(read_metrics(client), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def create(request: Request) -> Response:
        body = await _body(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise pgslots.InvalidArgumentError("Give the new limit a name.")
        info = await run_in_threadpool(
            client.create_limit,
            name,
            body.get("limit"),  # type: ignore[arg-type]
            slot_decay_per_second=body.get("slot_decay_per_second", 0.0),
            window_seconds=body.get("window_seconds", 0.0),
            shadow=body.get("shadow", False),
            margin_seconds=body.get("margin_seconds"),
        )
        return _json({"done": f"Created {info.name!r}."})

    async def change(request: Request) -> Response:
        body = await _body(request)
        name, action = unquote(request.path_params["name"]), request.path_params["action"]
        if action in ("enable", "disable"):
            await run_in_threadpool(client.update_limit, name, active=action == "enable")
            return _json({"done": f"{action.capitalize()}d {name!r}."})
        if action == "update":
            fields = {k: body[k] for k in ("limit", "slot_decay_per_second", "window_seconds", "shadow", "margin_seconds") if k in body}
            await run_in_threadpool(client.update_limit, name, **fields)
            return _json({"done": f"Updated {name!r}."})
        if action == "delete":
            await run_in_threadpool(client.delete_limit, name)
            return _json({"done": f"Deleted {name!r}."})
        return _json({"error": f"No action {action!r}: enable, disable, update or delete."}, 404)

    async def release(request: Request) -> Response:
        await _body(request)
        released = await run_in_threadpool(client.release, request.path_params["lease_id"])
        return _json({"done": "Released." if released else "That lease was already gone."})

    routes = [
        Route("/", page),
        Route("/index.html", page),
        Route("/static/{file}", static),
        Route("/metrics", metrics),
        Route("/api/limits", limits, methods=["GET"]),
        Route("/api/history", history),
        Route("/api/limits", _answering(create), methods=["POST"]),
        Route("/api/limits/{name}/{action}", _answering(change), methods=["POST"]),
        Route("/api/leases/{lease_id}/release", _answering(release), methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, board=board)], exception_handlers={404: _not_found})
    app.add_exception_handler(pgslots.PgSlotsError, _unavailable)
    return app


async def _body(request: Request) -> dict[str, Any]:
    """An admin action's JSON object (its length checked by the guard)."""
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _BadRequest("Send a JSON object (at most 64 KiB).")
    return body


class _BadRequest(Exception):
    pass


def _answering(action: Any) -> Any:
    """An admin action whose refusals (bad input, a refusal from the database) answer 400 with the
    reason, shown on the page."""

    async def handler(request: Request) -> Response:
        try:
            response: Response = await action(request)
            return response
        except (_BadRequest, pgslots.PgSlotsError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)

    return handler


async def _not_found(request: Request, exc: Exception) -> Response:
    return _json({"error": f"Nothing at {request.url.path}."}, 404)


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _json({"error": str(exc)}, 503)
