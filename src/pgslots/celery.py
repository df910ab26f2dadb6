"""Celery tasks under global limits: declare, per task, the concurrency and rate limits it runs
under, across every worker and machine.

::

    from celery import Celery
    from pgslots.celery import limited

    app = Celery("jobs", broker="redis://127.0.0.1:6379/0")

    @app.task(max_retries=None)
    @limited(concurrency="tenant:{tenant_id}", rate_limit="crm-api", wait_seconds=1)
    def sync_account(tenant_id: str, account: int) -> None: ...

Names may use the task's arguments (``{tenant_id}``), so each key of a template (``tenant:*``) is a
limit of its own; a field that is not a parameter of the task is an error when the module is
imported, not when the task runs. A task that cannot get its slots within ``wait_seconds`` does not
hold on to its worker: it is retried (``Task.retry``) after the database's estimate of when the
slots free up, at least ``min_retry_seconds`` later. Its slots are released however it ends:
returned, raised, retried; a worker process that dies (killed, lost, a revoke that terminates it)
holds nothing once the database has not heard from it for ``liveness_seconds`` (10 by default).
Needs ``pgslots[celery]``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import _validate as check
from ._integrate import Guard
from .client import Client
from .errors import AcquireConcurrencySlotTimeoutError

logger = logging.getLogger("pgslots.celery")

F = TypeVar("F", bound=Callable[..., Any])


def limited(
    *,
    concurrency: str | Sequence[str] | None = None,
    rate_limit: str | Sequence[str] | None = None,
    occupy: int = 1,
    wait_seconds: float = 1.0,
    min_retry_seconds: float = 0.5,
    max_retries: int | None = None,
    lease_duration: float = 300.0,
    client: Client | None = None,
) -> Callable[[F], F]:
    """Runs the decorated task function with ``occupy`` slots of every ``concurrency`` limit held
    and ``occupy`` rate slots of every ``rate_limit`` taken. Put it under ``@app.task``.

    ``wait_seconds``: how long a worker waits for the slots before the task is retried instead
    (None: wait as long as it takes, holding the worker). ``max_retries``: passed to
    ``Task.retry`` (None: the task's own setting; give the task ``max_retries=None`` to retry for
    as long as the limit is full)."""
    check.number("min_retry_seconds", min_retry_seconds, minimum=0, integer=False)
    check.number("max_retries", max_retries, minimum=0, integer=True, allow_none=True)

    def decorate(function: F) -> F:
        guard = Guard(
            function,
            concurrency=concurrency,
            rate_limit=rate_limit,
            occupy=occupy,
            wait_seconds=wait_seconds,
            lease_duration=lease_duration,
            client=client,
            decorator="pgslots.celery.limited",
        )

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            slots = contextlib.ExitStack()
            try:
                slots.enter_context(guard.held(args, kwargs))
            except AcquireConcurrencySlotTimeoutError as error:
                task = _current_task()
                if task is None:
                    raise  # called outside a worker: nothing to retry
                countdown = max(min_retry_seconds, error.retry_after or 0.0)
                logger.info("pgslots: %s found its limits full; retrying in %.2f s.", task.name, countdown)
                options: dict[str, Any] = {"countdown": countdown, "exc": error}
                if max_retries is not None:
                    options["max_retries"] = max_retries
                raise task.retry(**options) from None
            with slots:  # released however the body ends
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def _current_task() -> Any:
    """The task this worker process is running now (None outside a worker, or when called eagerly
    as a plain function)."""
    from celery import current_task

    task = current_task._get_current_object() if current_task else None
    if task is None or getattr(task.request, "called_directly", True):
        return None
    return task


__all__ = ["limited"]
