"""Async API: ``concurrency()`` and ``rate_limit()``, with the signatures of
``prefect.concurrency.asyncio``.

::

    from pgslots.asyncio import concurrency, rate_limit

    async with concurrency("database", occupy=2, timeout_seconds=30):
        ...

    await rate_limit("external-api")

Waiting tasks hold no database connection: they sleep on a future that the process's single
listening connection resolves when a release frees slots for them. This module is the async
driver of the flows in ``_flow``: the same waiting logic as ``pgslots.sync``, run with awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from . import _flow as flows
from ._flow import Call, Connect, Drop, Flow, Grant, Hold, Later, Lease, Link, Listen, Sleep, Wait
from ._session import Session
from .client import Client, default_client
from .errors import InvalidArgumentError

P = ParamSpec("P")
T = TypeVar("T")


async def run(session: Session, flow: Flow[T]) -> T:
    """Runs a flow to its end: each command it yields is awaited here, and its result (or the
    exception it raised, cancellation included) goes back into the flow."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            command = flow.send(reply) if error is None else flow.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        reply, error = None, None
        try:
            reply = await _perform(session, command)
        except BaseException as exc:  # thrown into the flow, which cleans up and decides
            error = exc


async def _perform(session: Session, command: flows.Command) -> Any:
    # The commands of an uncontended acquire and release come first.
    if isinstance(command, Call):
        return await session.acall(command.query, command.params, timeout=command.timeout)
    if isinstance(command, Connect):
        await session.apool()
        engine = session.engine
        return Link(engine.client_id, engine.listening, engine.listen)
    if isinstance(command, Hold):
        session.engine.hold(command.lease, flows.on_lease_lost(command.raise_on_failure, _canceller()))
    elif isinstance(command, Drop):
        session.engine.drop(command.lease_id)
    elif isinstance(command, Wait):
        return await _wait(session, command.ticket, command.seconds)
    elif isinstance(command, Sleep):
        await asyncio.sleep(command.seconds)
    elif isinstance(command, Listen):
        return await asyncio.to_thread(session.engine.ensure_listening, command.timeout)
    elif isinstance(command, Later):
        session.engine.later(command.query, command.params)
    return None


def _canceller() -> Callable[[BaseException], None]:
    """A callback, for the engine's thread, that cancels the task running now."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def cancel_task(error: BaseException) -> None:
        if task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(task.cancel, f"pgslots lease lost: {error}")

    return cancel_task


async def _wait(session: Session, ticket: int, seconds: float) -> Grant | None:
    """Sleeps until the engine wakes the ticket or `seconds` pass; returns the lease if a release
    handed one over."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[Grant | None] = loop.create_future()

    def settle(grant: Grant | None) -> None:
        if not woken.done():
            woken.set_result(grant)

    def wake(grant: Grant | None) -> None:  # called from the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(settle, grant)

    session.engine.register(ticket, wake)
    try:
        return await asyncio.wait_for(woken, seconds)
    except TimeoutError:
        return None
    finally:
        session.engine.unregister(ticket)


class concurrency(flows.ConcurrencyArguments):  # noqa: N801 - named like the function it replaces
    """``async with concurrency(...)``: holds ``occupy`` slots on every named limit while the block
    runs; also a decorator for coroutine functions. Same arguments and errors as the sync one; a
    lease that cannot be renewed cancels the task holding it (``raise_on_lease_renewal_failure``)."""

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            async with concurrency(*self._args, client=self._client, priority=self._priority, fairness_key=self._fairness_key):
                return await func(*args, **kwargs)

        return wrapper

    async def __aenter__(self) -> Lease | None:
        if self._connection is not None:
            raise InvalidArgumentError("connection= is for pgslots.sync.concurrency; the async API acquires on its own pool.")
        if self._request is None:
            return None
        session = (self._client or default_client())._session
        self._lease = await run(session, flows.concurrency(self._request, self._raise_on_failure))
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await run((self._client or default_client())._session, flows.release(lease, in_transaction=False))


async def rate_limit(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
    priority: int = 0,
    fairness_key: str | None = None,
) -> None:
    """Occupies ``occupy`` decaying slots on every named limit; returns once they fit. Waiters are
    served by ``priority`` (-100..100, higher first), then round-robin across ``fairness_key``."""
    request = flows.make_request(names, occupy, timeout_seconds, None, 300, strict, None, True, priority, fairness_key)
    if request is not None:
        await run((client or default_client())._session, flows.acquire(request))


__all__ = ["concurrency", "rate_limit"]
