"""One place where tracing can watch the library: the observer (none by default; ``pgslots.otel``
installs one) is told when each acquire, hold, release, rate limit, reserve, settle and pause
starts and ends, with what it asked for and what it got. Without an observer, each call costs one
attribute read."""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any, Protocol


class Observer(Protocol):
    def started(self, operation: str, attributes: dict[str, Any]) -> Any:
        """A span (or any token) for an operation that starts now."""

    def ended(self, token: Any, attributes: dict[str, Any], error: BaseException | None) -> None:
        """The operation of ``token`` ended (with ``error`` when it raised)."""


observer: Observer | None = None


class _Observed:
    """A block observed as one operation; ``attributes`` may be added to before it ends."""

    __slots__ = ("attributes", "operation", "started_at", "token")

    def __init__(self, operation: str, attributes: dict[str, Any]) -> None:
        self.operation, self.attributes = operation, attributes

    def __enter__(self) -> _Observed:
        self.started_at = time.monotonic()
        self.token = observer.started(self.operation, self.attributes) if observer is not None else None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if observer is not None and self.token is not None:
            observer.ended(self.token, self.attributes, exc)

    def note(self, **values: Any) -> None:
        self.attributes.update({f"pgslots.{k}": v for k, v in values.items() if v is not None})

    def granted(self, lease: Any) -> None:
        """Adds what a grant says: granted, the seconds waited, the fencing token, a fail-open."""
        a = self.attributes
        a["pgslots.granted"] = lease is not None
        a["pgslots.waited_seconds"] = time.monotonic() - self.started_at
        if lease is not None:
            if lease.fencing_token is not None:
                a["pgslots.fencing_token"] = lease.fencing_token
            if lease.lease_id is not None:
                a["pgslots.lease_id"] = str(lease.lease_id)
            if lease.failed_open:
                a["pgslots.failed_open"] = True


class _Nothing:
    """What ``observe`` gives when nothing observes: does nothing, allocates nothing."""

    __slots__ = ()
    attributes: dict[str, Any] = {}

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def note(self, **values: Any) -> None:
        return None

    def granted(self, lease: Any) -> None:
        return None


_NOTHING = _Nothing()


def observe(operation: str, names: tuple[str, ...] | list[str] | None, slots: int | None = None, **extra: Any) -> _Observed | _Nothing:
    """``with observe("acquire", names, slots) as seen: ...; seen.granted(lease)``."""
    if observer is None:
        return _NOTHING
    attributes: dict[str, Any] = {"pgslots.limits": list(names or ())}
    if slots is not None:
        attributes["pgslots.slots"] = slots
    # Ids (UUIDs) are passed as they are and written as text only here, when something observes.
    attributes.update({f"pgslots.{k}": str(v) if isinstance(v, uuid.UUID) else v for k, v in extra.items() if v is not None})
    return _Observed(operation, attributes)


class Holding:
    """The span of a hold: from the grant to the release of a lease."""

    __slots__ = ("token",)

    def __init__(self, lease: Any) -> None:
        self.token = None
        if observer is not None and lease is not None and lease.lease_id is not None:
            attributes = {"pgslots.limits": list(lease.names), "pgslots.slots": lease.slots, "pgslots.lease_id": str(lease.lease_id)}
            if lease.fencing_token is not None:
                attributes["pgslots.fencing_token"] = lease.fencing_token
            self.token = observer.started("hold", attributes)

    def end(self, error: BaseException | None) -> None:
        if observer is not None and self.token is not None:
            observer.ended(self.token, {}, error)
        self.token = None
