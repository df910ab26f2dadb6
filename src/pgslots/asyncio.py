"""Async API: ``concurrency()`` and ``rate_limit()``, with the signatures of
``prefect.concurrency.asyncio``, and ``reserve()`` for costs known only afterwards.

::

    from pgslots.asyncio import concurrency, rate_limit, reserve

    async with concurrency("database", occupy=2, timeout_seconds=30):
        ...

    await rate_limit("external-api")

    async with reserve("llm-tokens", occupy=2000) as r:
        await r.settle(actual_tokens)

Waiting tasks hold no database connection: they sleep on a future that the process's single
listening connection resolves when a release frees slots for them. This module is the async
driver of the flows in ``_flow``: the same waiting logic as ``pgslots.sync``, run with awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from . import _flow as flows
from ._batching import batchable, batcher
from ._connections import Connections
from ._faces import CLOCK, ConcurrencyArguments, on_lease_lost
from ._flow import Call, Connect, Drop, Flow, Grant, Hold, Later, Listen, Request, Sleep, Wait
from ._observe import Holding, observe
from .client import Client, connections_of, default_client
from .errors import InvalidArgumentError
from .types import Lease, ReservationBase

P = ParamSpec("P")
T = TypeVar("T")


async def run(db: Connections, flow: Flow[T]) -> T:
    """Runs a flow to its end: each command it yields is performed here, and its result (or the
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
            # The commands of an uncontended acquire and release first, performed here: a coroutine
            # for each would cost every cycle four more.
            if isinstance(command, Call):
                if batchable(command.query):
                    reply = await batcher(db).call(command.query, command.params or {}, command.timeout)
                else:
                    reply = await db.acall(command.query, command.params, timeout=command.timeout)
            elif isinstance(command, Hold):
                db.engine.hold(command.lease, on_lease_lost(command.raise_on_failure, _canceller()))
            elif isinstance(command, Drop):
                db.engine.drop(command.lease_id)
            else:
                reply = await _perform(db, command)
        except BaseException as exc:  # thrown into the flow, which cleans up and decides
            error = exc


async def _perform(db: Connections, command: flows.Command) -> Any:
    if isinstance(command, Connect):
        await db.apool()
        return db.engine.link()
    if isinstance(command, Wait):
        return await _wait(db, command.ticket, command.seconds)
    if isinstance(command, Sleep):
        await asyncio.sleep(command.seconds)
    elif isinstance(command, Listen):
        return await asyncio.to_thread(db.engine.ensure_listening, command.timeout)
    elif isinstance(command, Later):
        db.engine.later(command.query, command.params)
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


async def _wait(db: Connections, ticket: int, seconds: float) -> Grant | None:
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

    db.engine.register(ticket, wake)
    try:
        return await asyncio.wait_for(woken, seconds)
    except TimeoutError:
        return None
    finally:
        db.engine.unregister(ticket)


class concurrency(ConcurrencyArguments):  # noqa: N801 - named like the function it replaces
    """``async with concurrency(...)``: holds ``occupy`` slots on every named limit while the block
    runs; also a decorator for coroutine functions. Same arguments and errors as the sync one; a
    lease that cannot be renewed cancels the task holding it (``raise_on_lease_renewal_failure``)."""

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            async with concurrency(
                *self._args, client=self._client, priority=self._priority, fairness_key=self._fairness_key, fail_open=self._fail_open
            ):
                return await func(*args, **kwargs)

        return wrapper

    async def __aenter__(self) -> Lease | None:
        if self._connection is not None:
            raise InvalidArgumentError("connection= is for pgslots.sync.concurrency; the async API acquires on its own pool.")
        if self._request is None:
            return None
        fail_open_after = (self._client or default_client())._fail_open_after(self._request.fail_open)
        db = connections_of(self._client)
        flow = flows.concurrency(self._request, self._raise_on_failure, CLOCK, fail_open_after, db.ready_link(asynchronous=True))
        with observe("acquire", self._request.names, self._request.slots) as seen:
            self._lease = await run(db, flow)
            seen.granted(self._lease)
        self._holding = Holding(self._lease)
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._holding.end(exc)
            with observe("release", lease.names, lease.slots, lease_id=lease.lease_id):
                await run(connections_of(self._client), flows.release(lease, in_transaction=False))


async def _rate_slots(request: Request | None, client: Client | None) -> Lease | None:
    if request is None:
        return None
    fail_open_after = (client or default_client())._fail_open_after(request.fail_open)
    with observe("reserve" if request.reserve else "rate_limit", request.names, request.slots) as seen:
        lease = await run(connections_of(client), flows.acquire(request, CLOCK, fail_open_after))
        seen.granted(lease)
    return lease


async def rate_limit(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
    priority: int = 0,
    fairness_key: str | None = None,
    fail_open: bool | None = None,
) -> None:
    """Occupies ``occupy`` slots on every named limit, which decay or leave the window; returns once
    they fit. Waiters are served by ``priority`` (-100..100, higher first), then round-robin across
    ``fairness_key``. Same arguments as ``pgslots.sync.rate_limit`` but ``connection=``."""
    request = Request.for_rate_limit(
        names,
        slots=occupy,
        timeout_seconds=timeout_seconds,
        strict=strict,
        priority=priority,
        fairness_key=fairness_key,
        fail_open=fail_open,
    )
    await _rate_slots(request, client)


class Reservation(ReservationBase):
    """A granted :func:`reserve`: ``await r.settle(actual)``. Also an async context manager; leaving
    the block without settling keeps the estimate as the cost."""

    def __init__(self, lease: Lease | None, names: tuple[str, ...], slots: int, client: Client | None) -> None:
        super().__init__(lease, names, slots)
        self._client = client

    async def settle(self, actual: float) -> bool:
        """As ``pgslots.sync.Reservation.settle``."""
        with observe("settle", self.names, self.slots, actual=actual, reservation_id=self.reservation_id):
            changed = await run(connections_of(self._client), flows.settle(self.reservation_id, actual, False))
        self.actual = float(actual)
        return changed

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


class reserve:  # noqa: N801 - used like a function: await reserve(...) or async with reserve(...)
    """Like :func:`rate_limit`, for a cost known only afterwards: occupies the estimate ``occupy``
    and gives a :class:`Reservation` to settle. ``r = await reserve(...)``, or::

        async with reserve("openai-tokens", occupy=estimate) as r:
            reply = await client.chat(...)
            await r.settle(reply.usage.total_tokens)
    """

    def __init__(
        self,
        names: str | list[str] | None,
        occupy: int = 1,
        timeout_seconds: float | None = None,
        strict: bool = False,
        *,
        client: Client | None = None,
        priority: int = 0,
        fairness_key: str | None = None,
        fail_open: bool | None = None,
    ) -> None:
        self._request = Request.for_rate_limit(
            names,
            slots=occupy,
            timeout_seconds=timeout_seconds,
            strict=strict,
            priority=priority,
            fairness_key=fairness_key,
            fail_open=fail_open,
            reserve=True,
        )
        self._client = client
        self._occupy = occupy

    async def _reserve(self) -> Reservation:
        lease = await _rate_slots(self._request, self._client)
        names = () if self._request is None else self._request.names
        return Reservation(lease, names, self._occupy, self._client)

    def __await__(self) -> Generator[Any, None, Reservation]:
        return self._reserve().__await__()

    async def __aenter__(self) -> Reservation:
        return await self._reserve()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


__all__ = ["Reservation", "concurrency", "rate_limit", "reserve"]
