"""The Prometheus text exposition of every limit (format 0.0.4), for ``pgslots metrics`` and the
``/metrics`` page of ``pgslots ui``.

A template is one series labelled with its own name (``limit="tenant:*"``): ``pgslots_limit_slots``
is its per-key limit, the other figures are sums over its keys (counters include keys removed as
idle), and ``pgslots_instances`` counts its keys. With ``per_key``, each key is a series of its own,
labelled ``limit`` (the key) and ``template``.
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
    ("pgslots_paused_seconds", "Seconds until a paused limit opens (0 when open; a template: its longest paused key)."),
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


def _series(info: LimitInfo, per_key_of: dict[str, list[LimitInfo]] | None) -> dict[str, float | None]:
    """The figures of one series: a limit, a key, or a template with its keys summed."""
    keys = per_key_of.get(info.name, []) if (per_key_of is not None and info.is_template) else []
    parts = keys if info.is_template else [info]
    oldest = [k.oldest_waiter_seconds for k in parts if k.oldest_waiter_seconds is not None]
    return {
        "pgslots_limit_slots": info.limit,
        "pgslots_active_slots": sum(k.active_slots for k in parts),
        "pgslots_leased_slots": sum(k.leased_slots for k in parts),
        "pgslots_reclaimable_slots": sum(k.reclaimable_slots for k in parts),
        "pgslots_waiters": sum(k.waiters for k in parts),
        "pgslots_oldest_waiter_seconds": max(oldest, default=0.0),
        "pgslots_instances": info.instances if info.is_template else None,
        "pgslots_paused_seconds": max((_left(k.paused_until) for k in parts), default=0.0),
        # Counters: a template's row already holds the totals over its keys (removed ones included).
        "pgslots_grants_total": info.grants_total,
        "pgslots_refusals_total": info.refusals_total,
        "pgslots_wait_seconds_total": info.wait_seconds_total,
        "pgslots_expired_leases_total": info.expired_leases_total,
        "pgslots_shadow_refusals_total": info.shadow_refusals,
    }


def exposition(limits: Iterable[LimitInfo], per_key: bool = False) -> str:
    """The exposition of these limits (keys of templates included in `limits`)."""
    everything = list(limits)
    keys_of: dict[str, list[LimitInfo]] = {}
    for info in everything:
        if info.template is not None:
            keys_of.setdefault(info.template, []).append(info)
    rows: list[tuple[dict[str, str], dict[str, float | None]]] = []
    for info in everything:
        if info.template is not None and not per_key:
            continue  # counted in its template's series
        labels = {"limit": info.name}
        if info.template is not None:
            labels["template"] = info.template
        rows.append((labels, _series(info, keys_of)))
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


def read(client: Client, per_key: bool = False) -> str:
    """The exposition of every limit of the client's database."""
    return exposition(client.read_limits(), per_key=per_key)


__all__ = ["exposition", "read"]
