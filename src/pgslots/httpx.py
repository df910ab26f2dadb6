"""Outgoing HTTP under global limits: httpx transports that take a rate limit (and, if asked, a
concurrency limit) before each request, and pause the limit when the upstream answers 429 or 503
with ``Retry-After``.

::

    import httpx
    from pgslots.httpx import RateLimitedTransport

    client = httpx.Client(transport=RateLimitedTransport(limit="github-api"))
    client.get("https://api.github.com/zen")   # waits for a slot of github-api first

The limit of a request is a fixed name, a mapping of hosts to names (hosts it does not name are not
limited), or a function of the request returning a name (or None: not limited). On a 429 or 503
whose ``Retry-After`` is at most ``longest_pause`` seconds, the limit is paused that long for every
process that shares it (:meth:`pgslots.Client.pause`) and the request is sent again once it opens,
at most ``max_retries`` times; then the last answer is returned as it is. Needs ``pgslots[httpx]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC

import httpx

from . import _validate as check
from . import asyncio as pg_async
from . import sync as pg_sync
from .client import Client, default_client
from .errors import InvalidArgumentError, PgSlotsError

logger = logging.getLogger("pgslots.httpx")

#: What chooses a request's limit: a name, hosts to names, or a function of the request.
Chooser = str | Mapping[str, str] | Callable[[httpx.Request], str | None] | None

RETRY_STATUSES = frozenset({429, 503})


def _chooser(argument: str, value: Chooser) -> Callable[[httpx.Request], str | None]:
    """Checks a limit chooser when the transport is made, and returns it as a function."""
    if value is None:
        return lambda request: None
    if isinstance(value, str):
        if not value:
            raise InvalidArgumentError(f"{argument} must be a limit name, a mapping of hosts to names or a function; got ''.")
        return lambda request: value
    if isinstance(value, Mapping):
        hosts = {str(host).lower(): name for host, name in value.items()}
        for host, name in hosts.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"{argument}[{host!r}] must be a limit name, got {name!r}.")
        return lambda request: hosts.get(request.url.host.lower())
    if callable(value):
        return value
    raise InvalidArgumentError(f"{argument} must be a limit name, a mapping of hosts to names or a function; got {value!r}.")


def retry_after_seconds(response: httpx.Response, now: float | None = None) -> float | None:
    """The seconds a response's ``Retry-After`` asks for (a number of seconds or an HTTP date), or
    None when it has none or it cannot be read."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _Settings:
    """The arguments both transports share, checked once."""

    def __init__(
        self,
        limit: Chooser,
        concurrency: Chooser,
        occupy: int,
        timeout_seconds: float | None,
        max_retries: int,
        longest_pause: float,
        client: Client | None,
    ) -> None:
        self.rate_of = _chooser("limit", limit)
        self.concurrency_of = _chooser("concurrency", concurrency)
        check.number("occupy", occupy, minimum=1, integer=True)
        check.number("timeout_seconds", timeout_seconds, minimum=0, integer=False, allow_none=True)
        check.number("max_retries", max_retries, minimum=0, integer=True)
        check.number("longest_pause", longest_pause, minimum=0, integer=False)
        self.occupy, self.timeout_seconds = occupy, timeout_seconds
        self.max_retries, self.longest_pause = max_retries, float(longest_pause)
        self.client = client

    def after(self, response: httpx.Response, names: list[str], retries: int, replayable: bool) -> tuple[float | None, bool]:
        """After an answer: the seconds to pause ``names`` for (None: no pause), and whether to send
        the request again (a 429/503 with a ``Retry-After`` within ``longest_pause``, retries left,
        a body that can be sent twice)."""
        if response.status_code not in RETRY_STATUSES or not names:
            return None, False
        seconds = retry_after_seconds(response)
        if seconds is None or seconds > self.longest_pause:
            return None, False
        return seconds, retries < self.max_retries and replayable

    def pause(self, names: list[str], seconds: float, request: httpx.Request, status: int) -> bool:
        """Pauses the limits for every process that shares them (the next acquire then waits until
        they open). False when the database refused a pause (a limit that does not exist, a pause
        beyond its max_pause_seconds): logged, and this process must wait out ``Retry-After`` itself."""
        reason = f"HTTP {status} from {request.url.host}, Retry-After {seconds:g} s"
        paused = True
        for name in names:
            try:
                (self.client or default_client()).pause(name, seconds, reason)
            except PgSlotsError as error:
                paused = False
                logger.warning("pgslots: could not pause %r for %.3g s after %s: %s", name, seconds, reason, error)
        return paused


class _Holding(httpx.SyncByteStream):
    """A response body that gives the concurrency slots back when it is closed."""

    def __init__(self, stream: httpx.SyncByteStream, held: contextlib.ExitStack) -> None:
        self._stream, self._held = stream, held

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._held.close()


class RateLimitedTransport(httpx.BaseTransport):
    """An httpx transport (wrapping ``transport``, by default ``httpx.HTTPTransport()``) that takes
    ``occupy`` slots of the request's rate limit (``limit=``) before sending it and, with
    ``concurrency=``, holds a concurrency limit's slots until the response is closed.

    ``timeout_seconds`` bounds each wait for slots (None: wait as long as it takes; past it,
    ``AcquireConcurrencySlotTimeoutError``). A 429 or 503 with ``Retry-After`` of at most
    ``longest_pause`` seconds (default 300) pauses the limits and sends the request again, at most
    ``max_retries`` times (default 3); a streamed request body is never sent twice."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        limit: Chooser = None,
        concurrency: Chooser = None,
        occupy: int = 1,
        timeout_seconds: float | None = None,
        max_retries: int = 3,
        longest_pause: float = 300.0,
        client: Client | None = None,
    ) -> None:
        self._inner = transport or httpx.HTTPTransport()
        self._settings = _Settings(limit, concurrency, occupy, timeout_seconds, max_retries, longest_pause, client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        s = self._settings
        rate, held = s.rate_of(request), s.concurrency_of(request)
        if rate is None and held is None:
            return self._inner.handle_request(request)
        replayable = isinstance(request.stream, httpx.ByteStream)
        retries = 0
        while True:
            stack = contextlib.ExitStack()
            try:
                if rate is not None:
                    pg_sync.rate_limit(rate, s.occupy, s.timeout_seconds, client=s.client)
                if held is not None:
                    stack.enter_context(pg_sync.concurrency(held, s.occupy, s.timeout_seconds, client=s.client))
                response = self._inner.handle_request(request)
            except BaseException:
                stack.close()
                raise
            names = [n for n in (rate, held) if n is not None]
            seconds, again = s.after(response, names, retries, replayable)
            if not again or seconds is None:
                if seconds is not None:
                    s.pause(names, seconds, request, response.status_code)
                if isinstance(response.stream, httpx.SyncByteStream):
                    response.stream = _Holding(response.stream, stack)
                else:
                    stack.close()
                return response
            response.close()
            stack.close()
            retries += 1
            if not s.pause(names, seconds, request, response.status_code):
                time.sleep(seconds)  # not paused in the database: wait out Retry-After here

    def close(self) -> None:
        self._inner.close()


class _AsyncHolding(httpx.AsyncByteStream):
    """An async response body that gives the concurrency slots back when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, held: contextlib.AsyncExitStack) -> None:
        self._stream, self._held = stream, held

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            await self._held.aclose()


class AsyncRateLimitedTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`RateLimitedTransport` (same arguments), for ``httpx.AsyncClient``;
    it waits with ``pgslots.asyncio`` and never blocks the event loop."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        limit: Chooser = None,
        concurrency: Chooser = None,
        occupy: int = 1,
        timeout_seconds: float | None = None,
        max_retries: int = 3,
        longest_pause: float = 300.0,
        client: Client | None = None,
    ) -> None:
        self._inner = transport or httpx.AsyncHTTPTransport()
        self._settings = _Settings(limit, concurrency, occupy, timeout_seconds, max_retries, longest_pause, client)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        s = self._settings
        rate, held = s.rate_of(request), s.concurrency_of(request)
        if rate is None and held is None:
            return await self._inner.handle_async_request(request)
        replayable = isinstance(request.stream, httpx.ByteStream)
        retries = 0
        while True:
            stack = contextlib.AsyncExitStack()
            try:
                if rate is not None:
                    await pg_async.rate_limit(rate, s.occupy, s.timeout_seconds, client=s.client)
                if held is not None:
                    await stack.enter_async_context(pg_async.concurrency(held, s.occupy, s.timeout_seconds, client=s.client))
                response = await self._inner.handle_async_request(request)
            except BaseException:
                await stack.aclose()
                raise
            names = [n for n in (rate, held) if n is not None]
            seconds, again = s.after(response, names, retries, replayable)
            if not again or seconds is None:
                if seconds is not None:
                    await asyncio.to_thread(s.pause, names, seconds, request, response.status_code)
                if isinstance(response.stream, httpx.AsyncByteStream):
                    response.stream = _AsyncHolding(response.stream, stack)
                else:
                    await stack.aclose()
                return response
            await response.aclose()
            await stack.aclose()
            retries += 1
            if not await asyncio.to_thread(s.pause, names, seconds, request, response.status_code):
                await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = ["AsyncRateLimitedTransport", "Chooser", "RateLimitedTransport", "retry_after_seconds"]
