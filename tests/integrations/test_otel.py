"""pgslots.otel with the OpenTelemetry SDK's in-memory span exporter and metric reader: one span per
acquire (with its wait), hold, release, rate limit, reserve, settle and pause, with the documented
attributes, refusals marked as errors; the limits' gauges and counters as metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import pgslots
import pgslots.asyncio
import pgslots.otel
from pgslots.sync import concurrency, rate_limit, reserve


@pytest.fixture
def traced(client: pgslots.Client) -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    pgslots.otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, client=client, read_every=0)
    try:
        yield spans, reader
    finally:
        pgslots.otel.uninstrument()
        meter_provider.shutdown()


def by_name(spans: InMemorySpanExporter) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for span in spans.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def test_spans_for_every_operation_with_their_attributes(client: pgslots.Client, traced: tuple[InMemorySpanExporter, Any]) -> None:
    spans, _ = traced
    client.create_limit("db", 1)
    client.create_limit("api", 5, slot_decay_per_second=10)
    with concurrency("db", occupy=1) as lease:
        assert lease is not None
        token = lease.fencing_token
    rate_limit("api", 2)
    with reserve("api", 3) as r:
        r.settle(1)
    client.pause("api", 0.01, "upstream said 429")
    with concurrency("db"), pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError):  # noqa: SIM117
        with concurrency("db", timeout_seconds=0):
            pass
    seen = by_name(spans)
    operations = ("acquire", "hold", "release", "rate_limit", "reserve", "settle", "pause")
    assert set(seen) == {f"pgslots.{op}" for op in operations}
    first = seen["pgslots.acquire"][0]
    assert first.attributes["pgslots.limits"] == ("db",)
    assert first.attributes["pgslots.slots"] == 1
    assert first.attributes["pgslots.granted"] is True
    assert first.attributes["pgslots.fencing_token"] == token
    assert first.attributes["pgslots.waited_seconds"] >= 0
    hold = seen["pgslots.hold"][0]
    assert hold.attributes["pgslots.lease_id"] == first.attributes["pgslots.lease_id"]
    assert hold.start_time >= first.end_time - 1_000_000 and hold.end_time <= seen["pgslots.release"][0].end_time
    assert seen["pgslots.rate_limit"][0].attributes["pgslots.slots"] == 2
    assert seen["pgslots.reserve"][0].attributes["pgslots.slots"] == 3
    assert seen["pgslots.settle"][0].attributes["pgslots.actual"] == 1
    assert seen["pgslots.pause"][0].attributes["pgslots.reason"] == "upstream said 429"
    refused = [s for s in seen["pgslots.acquire"] if s.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1
    assert refused[0].attributes["pgslots.granted"] is False
    assert refused[0].attributes["pgslots.retry_after"] > 0
    assert refused[0].events[0].name == "exception"


def test_async_spans_and_nothing_once_uninstrumented(client: pgslots.Client, traced: tuple[InMemorySpanExporter, Any]) -> None:
    spans, _ = traced
    client.create_limit("db", 2)

    async def main() -> None:
        async with pgslots.asyncio.concurrency("db"):
            pass

    asyncio.run(main())
    assert sorted(s.name for s in spans.get_finished_spans()) == ["pgslots.acquire", "pgslots.hold", "pgslots.release"]
    pgslots.otel.uninstrument()
    spans.clear()
    with concurrency("db"):
        pass
    assert spans.get_finished_spans() == ()


def test_the_limits_figures_as_metrics(client: pgslots.Client, traced: tuple[Any, InMemoryMetricReader]) -> None:
    _, reader = traced
    client.create_limit("db", 3)
    client.create_limit("tenant:*", 2)
    with concurrency(["db", "tenant:acme"]):
        data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, str], float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    labels = dict(point.attributes or {})
                    points[(metric.name, str(labels["pgslots.limit"]))] = float(getattr(point, "value"))  # noqa: B009
    assert points[("pgslots.limit_slots", "db")] == 3
    assert points[("pgslots.leased_slots", "db")] == 1
    assert points[("pgslots.leased_slots", "tenant:*")] == 1  # a template: its keys' summed
    assert points[("pgslots.grants", "db")] == 1
    assert ("pgslots.refusals", "db") in points and ("pgslots.waiters", "db") in points
