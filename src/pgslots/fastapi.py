"""Incoming HTTP under global limits, for FastAPI and Starlette: a dependency and a middleware
that rate-limit (or concurrency-limit) requests by a key taken from the request, through a template.

::

    from fastapi import Depends, FastAPI
    from pgslots.fastapi import RateLimit, header

    app = FastAPI()
    per_tenant = RateLimit("tenant:*", key=header("X-Tenant"))     # each tenant its own bucket

    @app.get("/search", dependencies=[Depends(per_tenant)])
    async def search(q: str) -> dict[str, str]: ...

A request the limit refuses is answered 429 with ``Retry-After`` (the database's estimate, in whole
seconds) and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields; ``wait_seconds`` lets a request
wait that long for its slots first. A key that is missing or cannot name a limit (empty, longer than
200 characters, one of ``/ % & > <``, a character that does not print) is answered 400 and never
reaches the database. When the database cannot be reached the client's ``fail_open`` setting
decides: let requests through, or answer 503. Needs ``pgslots[fastapi]`` (Starlette underneath).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _validate as check
from . import asyncio as pg_async
from ._integrate import Key, LimitCache, check_request_limit, header, key_name, refusal_headers
from .client import Client
from .errors import AcquireConcurrencySlotTimeoutError, ConfigurationError, InvalidArgumentError

KeyFunction = Callable[[HTTPConnection], Any]


def path_param(name: str) -> Key:
    """The key is path parameter ``name`` of the matched route (``/tenants/{tenant}/...``); in a
    dependency only (a middleware runs before routing)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"path_param(): name the path parameter the key is taken from, got {name!r}.")
    return Key(f"the path parameter {name}", lambda request: request.path_params.get(name))


def query_param(name: str) -> Key:
    """The key is query parameter ``name`` (``?api_key=...``)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"query_param(): name the query parameter the key is taken from, got {name!r}.")
    return Key(f"the query parameter {name}", lambda request: request.query_params.get(name))


def client_address() -> Key:
    """The key is the client's address as the server saw it (behind a proxy, run uvicorn with
    ``--proxy-headers`` and ``--forwarded-allow-ips`` so that it is the real client's)."""
    return Key("the client's address", lambda request: request.client.host if request.client else None)


class _Limiter:
    """What the dependencies and the middleware share: the limit (or template and key), checked when
    declared, and the answers to a refusal."""

    def __init__(self, limit: str, key: KeyFunction | None, occupy: int, wait_seconds: float, client: Client | None, where: str) -> None:
        check_request_limit(limit, key, occupy, wait_seconds, where, "header(...), path_param(...), query_param(...), client_address()")
        self.limit, self.key, self.occupy, self.wait_seconds, self.client = limit, key, occupy, float(wait_seconds), client
        self._limits = LimitCache()

    def name_for(self, request: HTTPConnection) -> str:
        """The limit of this request; raises a 400 HTTPException for a key that cannot name one."""
        if self.key is None:
            return self.limit
        name = key_name(self.limit, self.key(request))
        if name is None:
            what = getattr(self.key, "describe", "the request's key")
            raise HTTPException(400, f"{what} is missing or is not a valid key (1 to 200 printable characters, none of / % & > <).")
        return name

    async def refused(self, name: str, error: AcquireConcurrencySlotTimeoutError) -> HTTPException:
        info = await asyncio.to_thread(self._limits.get, self.client, self.limit)
        headers = refusal_headers(self.limit, info, error.retry_after)
        return HTTPException(429, f"Too many requests for {name}: retry after {headers['Retry-After']} s.", headers=headers)

    @staticmethod
    def unavailable(error: ConfigurationError) -> HTTPException:
        return HTTPException(503, "The rate limiter's database cannot be reached: try again shortly.", headers={"Retry-After": "1"})


class RateLimit(_Limiter):
    """A dependency (``Depends(RateLimit(...))``) that takes ``occupy`` rate slots of ``limit`` (a
    decay or window limit) for each request; with ``key=``, ``limit`` is a template and each key
    (tenant, user, address) has its own. Waits up to ``wait_seconds`` (default 0: answer at once)."""

    def __init__(
        self, limit: str, *, key: KeyFunction | None = None, occupy: int = 1, wait_seconds: float = 0.0, client: Client | None = None
    ) -> None:
        super().__init__(limit, key, occupy, wait_seconds, client, "RateLimit")

    async def __call__(self, request: Request) -> None:
        name = self.name_for(request)
        try:
            await pg_async.rate_limit(name, self.occupy, self.wait_seconds, client=self.client)
        except AcquireConcurrencySlotTimeoutError as error:
            raise await self.refused(name, error) from None
        except ConfigurationError as error:
            raise self.unavailable(error) from None


class Concurrency(_Limiter):
    """A dependency that holds ``occupy`` slots of ``limit`` while the endpoint runs (for expensive
    endpoints: reports, exports), released however it ends; with ``key=``, per key of a template."""

    def __init__(
        self,
        limit: str,
        *,
        key: KeyFunction | None = None,
        occupy: int = 1,
        wait_seconds: float = 0.0,
        lease_duration: float = 300.0,
        client: Client | None = None,
    ) -> None:
        super().__init__(limit, key, occupy, wait_seconds, client, "Concurrency")
        check.number("lease_duration", lease_duration, minimum=1, integer=False)
        self.lease_duration = float(lease_duration)

    async def __call__(self, request: Request) -> AsyncIterator[None]:
        name = self.name_for(request)
        held = pg_async.concurrency(name, self.occupy, self.wait_seconds, lease_duration=self.lease_duration, client=self.client)
        try:
            await held.__aenter__()
        except AcquireConcurrencySlotTimeoutError as error:
            raise await self.refused(name, error) from None
        except ConfigurationError as error:
            raise self.unavailable(error) from None
        try:
            yield
        finally:
            await held.__aexit__(None, None, None)


class LimitMiddleware(_Limiter):
    """ASGI middleware for every HTTP request of an app (or those whose path starts with one of
    ``paths``): ``app.add_middleware(LimitMiddleware, limit="tenant:*", key=header("X-Tenant"))``.
    ``concurrency=True`` holds the slots until the response has been sent instead of taking rate
    slots. Refusals are answered as by the dependencies (a JSON body ``{"detail": ...}``)."""

    def __init__(
        self,
        app: ASGIApp,
        limit: str,
        *,
        key: KeyFunction | None = None,
        occupy: int = 1,
        wait_seconds: float = 0.0,
        concurrency: bool = False,
        lease_duration: float = 300.0,
        paths: list[str] | None = None,
        client: Client | None = None,
    ) -> None:
        super().__init__(limit, key, occupy, wait_seconds, client, "LimitMiddleware")
        if paths is not None and (not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths)):
            raise InvalidArgumentError(f"LimitMiddleware: paths= must be a list of path prefixes starting with '/', got {paths!r}.")
        check.number("lease_duration", lease_duration, minimum=1, integer=False)
        self.app, self.concurrency, self.paths, self.lease_duration = app, bool(concurrency), paths, float(lease_duration)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.paths is not None and not any(scope["path"].startswith(p) for p in self.paths)):
            await self.app(scope, receive, send)
            return
        name = self.limit
        held: pg_async.concurrency | None = None
        try:
            name = self.name_for(HTTPConnection(scope))
            if self.concurrency:
                held = pg_async.concurrency(name, self.occupy, self.wait_seconds, lease_duration=self.lease_duration, client=self.client)
                await held.__aenter__()
            else:
                await pg_async.rate_limit(name, self.occupy, self.wait_seconds, client=self.client)
        except HTTPException as answer:
            await _answer(answer, send)
            return
        except AcquireConcurrencySlotTimeoutError as error:
            await _answer(await self.refused(name, error), send)
            return
        except ConfigurationError as error:
            await _answer(self.unavailable(error), send)
            return
        if held is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await held.__aexit__(None, None, None)


async def _answer(answer: HTTPException, send: Send) -> None:
    body = json.dumps({"detail": answer.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (answer.headers or {}).items()]
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["Concurrency", "LimitMiddleware", "RateLimit", "client_address", "header", "path_param", "query_param"]
