"""What the sync and async faces share: the real clock their flows read, the arguments of
``concurrency`` checked once, and what happens when a held lease is lost."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from ._flow import Request
from ._observe import Holding
from .types import Lease

logger = logging.getLogger("pgslots")


class SystemClock:
    """The clock of real programs: monotonic time, and random jitter."""

    def now(self) -> float:
        return time.monotonic()

    def jitter(self, low: float, high: float) -> float:
        return random.uniform(low, high)


CLOCK = SystemClock()


def on_lease_lost(raise_on_failure: bool, interrupt: Callable[[BaseException], None]) -> Callable[[BaseException], None]:
    """What the engine does when a lease cannot be renewed: interrupt the body, or warn."""

    def lost(error: BaseException) -> None:
        if raise_on_failure:
            logger.error("Lease renewal failed (%s): interrupting the body that holds the slots.", error)
            interrupt(error)
        else:
            logger.warning("Lease renewal failed (%s): the body keeps running, but its slots may be lost.", error)

    return lost


class ConcurrencyArguments:
    """What the sync and async ``concurrency`` share: their arguments (named as in Prefect's),
    checked once."""

    def __init__(
        self,
        names: str | list[str] | None,
        occupy: int = 1,
        timeout_seconds: float | None = None,
        max_retries: int | None = None,
        lease_duration: float = 300,
        strict: bool = False,
        holder: dict[str, Any] | None = None,
        raise_on_lease_renewal_failure: bool | None = None,
        *,
        client: Any = None,
        connection: Any = None,
        priority: int = 0,
        fairness_key: str | None = None,
        fail_open: bool | None = None,
    ) -> None:
        self._request = Request.for_concurrency(
            names,
            slots=occupy,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            lease_seconds=lease_duration,
            strict=strict,
            holder=holder,
            priority=priority,
            fairness_key=fairness_key,
            fail_open=fail_open,
        )
        self._priority, self._fairness_key, self._fail_open = priority, fairness_key, fail_open
        self._connection = connection
        self._raise_on_failure = strict if raise_on_lease_renewal_failure is None else raise_on_lease_renewal_failure
        self._client = client
        self._lease: Lease | None = None
        self._holding = Holding(None)
        self._args = (names, occupy, timeout_seconds, max_retries, lease_duration, strict, holder, raise_on_lease_renewal_failure)
