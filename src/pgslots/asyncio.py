"""Async API: ``concurrency()`` and ``rate_limit()``, with the signatures of
``prefect.concurrency.asyncio``.

::

    from pgslots.asyncio import concurrency, rate_limit

    async with concurrency("database", occupy=2, timeout_seconds=30):
        ...

    await rate_limit("external-api")

Waiting tasks hold no database connection: they sleep on a future that the process's single
listening connection resolves when a release frees slots for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from . import _queries as q
from ._core import Attempts, ConcurrencyBase, Lease, Request, make_request, on_lease_lost
from ._engine import Engine, Grant
from .client import Client, default_client
from .errors import InvalidArgumentError, PgSlotsError

P = ParamSpec("P")
T = TypeVar("T")


async def _wait(engine: Engine, ticket: int | None, seconds: float) -> Grant | None:
    """Sleeps until woken or `seconds` pass; returns the lease if a release handed one over."""
    if ticket is None:
        await asyncio.sleep(seconds)
        return None
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[Grant | None] = loop.create_future()

    def settle(grant: Grant | None) -> None:
        if not woken.done():
            woken.set_result(grant)

    def wake(grant: Grant | None) -> None:  # called from the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(settle, grant)

    engine.register(ticket, wake)
    try:
        return await asyncio.wait_for(woken, seconds)
    except TimeoutError:
        return None
    finally:
        engine.unregister(ticket)


async def _acquire(client: Client, request: Request) -> tuple[Lease, float | None]:
    """The lease, and its first term when shorter than lease_seconds (handed over by a release)."""
    await client.apool()  # connection and schema problems surface here, before anything is in flight
    engine = client.engine
    state = Attempts(request, engine.client_id, listening=engine.listening)
    try:
        while True:
            query, params = state.query()
            timeout = state.remaining()  # past the deadline: raises here, with nothing in flight
            try:
                row = (await client.acall(query, params, timeout=timeout))[0]
            except PgSlotsError as exc:
                retry = state.failed(exc, engine)
                if isinstance(retry, BaseException):
                    raise retry from exc.__cause__
                await asyncio.sleep(retry)
                continue
            state.reconnected()
            outcome = state.record(row)
            if isinstance(outcome, Lease):
                return outcome, None
            if not state.listening and engine.listen:
                state.listening = await asyncio.to_thread(engine.ensure_listening, min(10.0, state.remaining() or 10.0))
                if state.listening:
                    continue  # wake-ups can reach us now: look once more before sleeping
            grant = await _wait(engine, state.ticket, outcome)
            if grant is not None:
                return state.handed(grant), grant.term_seconds
    except BaseException as exc:
        await _clean_up(client, state.abandon(), now=isinstance(exc, Exception))
        raise


async def _clean_up(client: Client, steps: list[tuple[Any, dict[str, Any]]], now: bool) -> None:
    """Undoes an abandoned acquire: right away after a timeout or an error; in the background after
    a cancellation (a cancelled task must not wait for the database)."""
    for query, params in steps:
        if now:
            try:
                await client.acall(query, params, timeout=1)  # never long: the caller is waiting for its error
                continue
            except PgSlotsError:
                now = False
        client.engine.later(query, params)


class concurrency(ConcurrencyBase):  # noqa: N801 - named like the function it replaces
    """``async with concurrency(...)``: holds ``occupy`` slots on every named limit while the block
    runs; also a decorator for coroutine functions. Same arguments and errors as the sync one; a
    lease that cannot be renewed cancels the task holding it (``raise_on_lease_renewal_failure``)."""

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            async with concurrency(*self._args, client=self._client):
                return await func(*args, **kwargs)

        return wrapper

    async def __aenter__(self) -> Lease | None:
        if self._connection is not None:
            raise InvalidArgumentError("connection= is for pgslots.sync.concurrency; the async API acquires on its own pool.")
        if self._request is None:
            return None
        client = self._client or default_client()
        self._lease, first_term = await _acquire(client, self._request)
        if self._lease.lease_id is not None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()

            def cancel_task(error: BaseException) -> None:  # called from the engine's thread
                if task is not None:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(task.cancel, f"pgslots lease lost: {error}")

            lost = on_lease_lost(self._raise_on_failure, cancel_task)
            client.engine.hold(self._lease.lease_id, self._lease.lease_seconds, lost, first_term)
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lease, self._lease = self._lease, None
        if lease is None or lease.lease_id is None:
            return
        client = self._client or default_client()
        client.engine.drop(lease.lease_id)
        try:
            await client.acall(q.RELEASE_FAST, {"lease_id": lease.lease_id})
        except BaseException as error:  # cancelled, or the database is away
            self.release_failed(client.engine, lease.lease_id, error)


async def rate_limit(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
) -> None:
    """Occupies ``occupy`` decaying slots on every named limit; returns once they fit."""
    request = make_request(names, occupy, timeout_seconds, None, 300, strict, None, rate_limit=True)
    if request is None:
        return
    await _acquire(client or default_client(), request)


__all__ = ["concurrency", "rate_limit"]
