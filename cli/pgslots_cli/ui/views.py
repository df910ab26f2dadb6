"""What the page's JSON answers say, built from what the database said: pure functions of an
overview (and of the sampler's points), tested without a server or a browser. No figure is computed
here that the database gives; the history's rates are differences of the database's counters
between two samples."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pgslots.types import LeaseInfo, LimitInfo, Overview

from ..output import limit_json

# A holder's own fields that are shown in columns of their own, not again among its fields.
_SHOWN_APART = ("host", "pid", "application", "application_name")


class Point(NamedTuple):
    """One sample of one limit: the time, its counters, and its gauges then."""

    at: float
    grants_total: int
    refusals_total: int
    wait_seconds_total: float
    held: float
    waiters: int


def holder_view(lease: LeaseInfo, now: datetime) -> dict[str, Any]:
    """A holder as people read it: host, pid and application in columns, and the holder's own
    fields as name/value pairs (text as it is, other values as JSON), never the raw document."""
    fields = [
        [str(key), value if isinstance(value, str) else json.dumps(value, sort_keys=True)]
        for key, value in sorted((lease.holder or {}).items())
        if key not in _SHOWN_APART
    ]
    return {
        "lease_id": str(lease.lease_id),
        "slots": lease.slots,
        "host": lease.host,
        "pid": lease.pid,
        "application": lease.application_name,
        "fields": fields,
        "held_seconds": max(0.0, (now - lease.acquired_at).total_seconds()),
        "expired": lease.expired,
        "gone": lease.gone,
    }


def _row(info: LimitInfo, seen: Overview, now: datetime) -> dict[str, Any]:
    capacity = info.limit * (info.instances or 0) if info.is_template else info.limit
    return limit_json(info) | {
        "capacity": capacity,
        "holders": [holder_view(h, now) for h in seen.holders.get(info.name, [])],
    }


def limits_view(seen: Overview, now: datetime) -> dict[str, Any]:
    """/api/limits: every limit and template as the database gives its figures (a template's
    summed over its keys), each with its first holders; a template with its busiest keys and
    theirs. ``capacity`` is the scale of its chart: its limit, or a template's limit per key times
    its keys."""
    rows = []
    for info in seen.limits:
        row = _row(info, seen, now)
        if info.is_template:
            row["busiest"] = [_row(k, seen, now) for k in seen.busiest.get(info.name, [])]
        rows.append(row)
    return {"limits": rows, "holders_note": seen.holders_error, "time": now.isoformat()}


def history_view(points: Mapping[str, Sequence[Point]], started: float, interval: float) -> dict[str, Any]:
    """/api/history: per limit, one entry per pair of consecutive samples: the time, grants and
    refusals per second between them, and the slots held, waiters and seconds waited per second at
    the later one. ``since`` is when sampling began (the charts cover no more than that)."""
    series: dict[str, dict[str, list[float]]] = {}
    for name, samples in points.items():
        out: dict[str, list[float]] = {"t": [], "grants": [], "refusals": [], "waited": [], "held": [], "waiters": []}
        for before, after in zip(samples, samples[1:], strict=False):
            span = after.at - before.at
            if span <= 0:
                continue
            out["t"].append(after.at)
            out["grants"].append(max(0, after.grants_total - before.grants_total) / span)
            out["refusals"].append(max(0, after.refusals_total - before.refusals_total) / span)
            out["waited"].append(max(0.0, after.wait_seconds_total - before.wait_seconds_total) / span)
            out["held"].append(after.held)
            out["waiters"].append(after.waiters)
        series[name] = out
    return {"since": started, "interval": interval, "limits": series}
