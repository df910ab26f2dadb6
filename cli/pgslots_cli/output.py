"""Printing: tables that fit the terminal, JSON that scripts can parse, durations people can read."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from pgslots._text import ESCAPES, shown
from pgslots.types import LimitInfo

# In JSON, the same characters as JSON escapes (the output stays valid JSON, and reads back as it was).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in ESCAPES if c >= 0x7F}  # json escapes C0 itself


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def dumps(value: Any) -> str:
    """JSON for scripts; a caller-named control character appears only as a JSON escape."""
    return json.dumps(to_jsonable(value), indent=2, sort_keys=True, ensure_ascii=False).translate(_JSON_ESCAPES)


def number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = abs(value)
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def table(headers: list[str], rows: list[list[str]], shrink: int = 0) -> str:
    """A plain table; on a terminal, column `shrink` is cut to make the table fit its width."""
    rows = [[shown(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    room = shutil.get_terminal_size((100, 24)).columns
    excess = sum(widths) + 2 * (len(widths) - 1) - room
    if excess > 0 and sys.stdout.isatty():  # piped or redirected: whole values, whatever the width
        widths[shrink] = max(8, widths[shrink] - excess)

    def fit(text: str, width: int) -> str:
        text = shown(text)
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["  ".join(fit(h, w).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(fit(c, w).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def held(info: LimitInfo) -> str:
    """Slots in use, the reclaimable ones (whose holders are gone) apart: '2', or '1 +1 reclaimable'."""
    used = number(round(info.held_slots, 2))
    return f"{used} +{info.reclaimable_slots} reclaimable" if info.reclaimable_slots else used


def paused(info: LimitInfo) -> str:
    """'' when open; else 'paused 12 s' and the reason (a template: how many keys are paused)."""
    if info.paused_keys:
        return f"{info.paused_keys} key(s) paused"
    if info.paused_until is None:
        return ""
    left = max(0.0, (info.paused_until - datetime.now(UTC)).total_seconds())
    return f"paused {seconds(left)}" + (f" ({info.pause_reason})" if info.pause_reason else "")


def bar(used: float, limit: int, width: int = 20) -> str:
    if limit <= 0:
        return "[" + ("!" if used > 0 else " ") * width + "]"
    filled = min(width, round(width * used / limit))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def one_line(message: str) -> str:
    return shown(message.strip())


def echo_error(message: str) -> None:
    click.echo(one_line(message), err=True)


def limit_json(info: LimitInfo) -> dict[str, Any]:
    """A limit as `inspect -o json`, `ls -o json` and the web page show it."""
    return {
        "id": info.id,
        "name": info.name,
        "limit": info.limit,
        "active": info.active,
        "active_slots": info.active_slots,
        "leased_slots": info.leased_slots,
        "reclaimable_slots": info.reclaimable_slots,
        "held_slots": info.held_slots,
        "paused_keys": info.paused_keys,
        "paused_until": info.paused_until,
        "pause_reason": info.pause_reason,
        "slot_decay_per_second": info.slot_decay_per_second,
        "window_seconds": info.window_seconds,
        "margin_seconds": info.margin_seconds,
        "shadow": info.shadow,
        "shadow_refusals": info.shadow_refusals,
        "grants_total": info.grants_total,
        "refusals_total": info.refusals_total,
        "wait_seconds_total": info.wait_seconds_total,
        "expired_leases_total": info.expired_leases_total,
        "waiter_priorities": info.waiter_priorities or [],
        "denied_slots": info.denied_slots,
        "avg_slot_occupancy_seconds": info.avg_slot_occupancy_seconds,
        "leases": info.leases,
        "expired_leases": info.expired_leases,
        "waiters": info.waiters,
        "oldest_waiter_seconds": info.oldest_waiter_seconds,
        "created": info.created,
        "updated": info.updated,
        "template": info.template,
        "is_template": info.is_template,
        "instances": info.instances,
        "max_keys": info.max_keys,
    }
