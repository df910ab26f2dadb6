"""OpenTelemetry for pgslots: spans for every acquire (with its wait), hold, release, rate limit,
reserve, settle and pause, and the limits' gauges and counters as OpenTelemetry metrics.

::

    import pgslots.otel
    pgslots.otel.instrument()          # the global tracer and meter providers, the default client

Spans are named ``pgslots.acquire``, ``pgslots.hold`` (from the grant to the release),
``pgslots.release``, ``pgslots.rate_limit``, ``pgslots.reserve``, ``pgslots.settle`` and
``pgslots.pause``, children of the span current when they start, with the attributes
``pgslots.limits`` (the names), ``pgslots.slots``, ``pgslots.granted``, ``pgslots.waited_seconds``,
``pgslots.fencing_token`` and ``pgslots.lease_id`` where they apply; a refusal or an error marks the
span as an error and records the exception (with ``pgslots.retry_after`` for a refusal).

Metrics (with ``metrics=True``): per limit and template (attribute ``pgslots.limit``), the gauges
``pgslots.limit_slots``, ``pgslots.active_slots``, ``pgslots.leased_slots``,
``pgslots.reclaimable_slots``, ``pgslots.waiters``, ``pgslots.oldest_waiter_seconds`` and the
counters ``pgslots.grants``, ``pgslots.refusals``, ``pgslots.wait_seconds``,
``pgslots.expired_leases``, ``pgslots.shadow_refusals``: the figures of ``pgslots metrics``, read
from the database at most once per ``read_every`` seconds (a template's are its keys' summed).
Needs ``pgslots[otel]`` (the OpenTelemetry API; bring the SDK and an exporter of your choice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Span, Status, StatusCode, TracerProvider

from . import _observe
from . import _validate as check
from .client import Client, default_client
from .errors import AcquireConcurrencySlotTimeoutError, PgSlotsError
from .metrics import _series
from .types import LimitInfo

_SCOPE = "pgslots"

_GAUGES = ("limit_slots", "active_slots", "leased_slots", "reclaimable_slots", "waiters", "oldest_waiter_seconds")
_COUNTERS = ("grants", "refusals", "wait_seconds", "expired_leases", "shadow_refusals")


class _Tracing:
    """The observer: one span per operation."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def started(self, operation: str, attributes: dict[str, Any]) -> Span:
        return self._tracer.start_span(f"pgslots.{operation}", attributes=attributes)

    def ended(self, token: Span, attributes: dict[str, Any], error: BaseException | None) -> None:
        if attributes:
            token.set_attributes(attributes)
        if error is not None:
            if isinstance(error, AcquireConcurrencySlotTimeoutError):
                token.set_attribute("pgslots.granted", False)
                if error.retry_after is not None:
                    token.set_attribute("pgslots.retry_after", error.retry_after)
            token.record_exception(error)
            token.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        token.end()


class _Readings:
    """The limits as last read, shared by every instrument's callback of one collection."""

    def __init__(self, client: Client | None, read_every: float) -> None:
        self._client, self._every = client, read_every
        self._at = -1e9
        self._rows: list[LimitInfo] = []
        self._lock = threading.Lock()

    def rows(self) -> list[LimitInfo]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self._every:
                self._at = now
                try:
                    self._rows = (self._client or default_client()).overview(busiest=0, holders=0).limits
                except PgSlotsError:
                    self._rows = []  # the database is away: report nothing rather than stale figures
            return self._rows

    def callback(self, figure: str) -> Any:
        prometheus = f"pgslots_{figure}" if figure in _GAUGES else f"pgslots_{figure}_total"

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for info in self.rows():
                value = _series(info).get(prometheus)
                if value is not None:
                    yield Observation(value, {"pgslots.limit": info.name})

        return observe


_installed: _Tracing | None = None


def instrument(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    client: Client | None = None,
    metrics: bool = True,
    read_every: float = 10.0,
) -> None:
    """Starts tracing pgslots' calls with ``tracer_provider`` (the global one by default) and, with
    ``metrics=True``, reports the limits of ``client``'s database (the default client's) through
    ``meter_provider``. Call it once at start-up; :func:`uninstrument` stops the spans."""
    global _installed
    check.number("read_every", read_every, minimum=0, integer=False)
    tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
    _installed = _Tracing(tracer)
    _observe.observer = _installed
    if metrics:
        meter = otel_metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        readings = _Readings(client, read_every)
        for figure in _GAUGES:
            unit = "s" if figure.endswith("seconds") else "{slot}" if figure.endswith("slots") else "1"
            meter.create_observable_gauge(f"pgslots.{figure}", callbacks=[readings.callback(figure)], unit=unit)
        for figure in _COUNTERS:
            unit = "s" if figure.endswith("seconds") else "1"
            meter.create_observable_counter(f"pgslots.{figure}", callbacks=[readings.callback(figure)], unit=unit)


def uninstrument() -> None:
    """Stops the spans (instruments already registered with a meter provider stay until it shuts down)."""
    global _installed
    _installed = None
    _observe.observer = None


__all__ = ["instrument", "uninstrument"]
