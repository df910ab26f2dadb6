"""The Prometheus text exposition of every limit (format 0.0.4), for ``pgslots metrics`` and the
``/metrics`` page of ``pgslots ui``.

A template is one series labelled with its own name (``limit="tenant:*"``): ``pgslots_limit_slots``
is its per-key limit, the other figures are sums over its keys, summed by the database (counters
include keys removed as idle), ``pgslots_instances`` counts its keys and ``pgslots_paused_keys`` those
paused. Keys are opt-in: ``per_key=N`` adds each template's N busiest keys as series of their own,
labelled ``limit`` (the key) and ``template``: a bounded output however many keys there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime

from ._text import ESCAPES
from .client import Client
from .types import LimitInfo

_GAUGES = (
    ("pgslots_limit_slots", "The limit's number of slots (for a template: per key)."),
    ("pgslots_active_slots", "Slots occupied now: leased, plus rate slots after decay or in the window."),
    ("pgslots_leased_slots", "Slots held by leases now."),
    ("pgslots_reclaimable_slots", "Leased slots whose holders are gone (expired, or their session dead): held by nobody."),
    ("pgslots_waiters", "Waiters queued now."),
    ("pgslots_oldest_waiter_seconds", "How long the oldest queued waiter has waited (0 without waiters)."),
    ("pgslots_instances", "Keys a template has now (templates only)."),
    ("pgslots_paused_seconds", "Seconds until a paused limit or key opens (0 when open; not for templates)."),
    ("pgslots_paused_keys", "Keys of a template paused now (templates only)."),
)
_COUNTERS = (
    ("pgslots_grants_total", "Requests granted."),
    ("pgslots_refusals_total", "Calls that ended without their slots (a queued waiter counts when it gives up, never when granted)."),
    ("pgslots_wait_seconds_total", "Seconds queued waiters waited before their grant."),
    ("pgslots_expired_leases_total", "Leases taken back because they expired or their holder died."),
    ("pgslots_shadow_refusals_total", "Requests a shadow limit granted that enforcement would have refused."),
)


# A label value escapes backslash, quote and newline as the format says. Every other character that
# a line-based reader (or a terminal) takes for a line break or a control, which the format has no
# escape for, is written as visible text: an escaped backslash then "x0d", read back as "\x0d".
_LABEL_ESCAPES = {c: "\\" + escape for c, escape in ESCAPES.items()} | {
    ord("\\"): "\\\\",
    ord('"'): '\\"',
    ord("\n"): "\\n",
}


def _escape(value: str) -> str:
    return value.translate(_LABEL_ESCAPES)


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _left(until: datetime | None) -> float:
    return 0.0 if until is None else max(0.0, (until - datetime.now(UTC)).total_seconds())


def _series(info: LimitInfo) -> dict[str, float | None]:
    """The figures of one series, as the database gives them (a template's: its keys' summed)."""
    return {
        "pgslots_limit_slots": info.limit,
        "pgslots_active_slots": info.active_slots,
        "pgslots_leased_slots": info.leased_slots,
        "pgslots_reclaimable_slots": info.reclaimable_slots,
        "pgslots_waiters": info.waiters,
        "pgslots_oldest_waiter_seconds": info.oldest_waiter_seconds or 0.0,
        "pgslots_instances": info.instances if info.is_template else None,
        "pgslots_paused_seconds": None if info.is_template else _left(info.paused_until),
        "pgslots_paused_keys": info.paused_keys if info.is_template else None,
        # Counters: a template's row already holds the totals over its keys (removed ones included).
        "pgslots_grants_total": info.grants_total,
        "pgslots_refusals_total": info.refusals_total,
        "pgslots_wait_seconds_total": info.wait_seconds_total,
        "pgslots_expired_leases_total": info.expired_leases_total,
        "pgslots_shadow_refusals_total": info.shadow_refusals,
    }


def exposition(limits: Iterable[LimitInfo], keys: Iterable[LimitInfo] = ()) -> str:
    """The exposition of these limits and templates, and of these keys (each labelled with its
    template)."""
    rows: list[tuple[dict[str, str], dict[str, float | None]]] = []
    for info in [*limits, *keys]:
        labels = {"limit": info.name}
        if info.template is not None:
            labels["template"] = info.template
        rows.append((labels, _series(info)))
    lines: list[str] = []
    for kind, metrics in (("gauge", _GAUGES), ("counter", _COUNTERS)):
        for name, text in metrics:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, values in rows:
                value = values[name]
                if value is None:
                    continue
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{rendered}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def read(client: Client, per_key: int = 0) -> str:
    """The exposition of every limit and template of the client's database, and of each template's
    ``per_key`` busiest keys (0: none; at most 1000)."""
    seen = client.overview(busiest=per_key, holders=0)
    return exposition(seen.limits, [k for keys in seen.busiest.values() for k in keys])


__all__ = ["exposition", "read"]
