"""Printing: tables that fit the terminal, JSON that scripts can parse, durations people can read."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from datetime import UTC, datetime
from typing import Any

import click

# Characters that would break a message over several lines (str.splitlines splits on all of them),
# or move the cursor: shown escaped, so an error is always one line whatever a name contains.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, 0x85]} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


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
    return json.dumps(to_jsonable(value), indent=2, sort_keys=True, ensure_ascii=False)


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
    """A plain table; column `shrink` is cut to make the table fit the terminal's width."""
    rows = [[c.translate(_UNPRINTABLE) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    room = shutil.get_terminal_size((100, 24)).columns
    excess = sum(widths) + 2 * (len(widths) - 1) - room
    if excess > 0:
        widths[shrink] = max(8, widths[shrink] - excess)

    def fit(text: str, width: int) -> str:
        text = text.translate(_UNPRINTABLE)
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["  ".join(fit(h, w).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(fit(c, w).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def bar(used: float, limit: int, width: int = 20) -> str:
    if limit <= 0:
        return "[" + ("!" if used > 0 else " ") * width + "]"
    filled = min(width, round(width * used / limit))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def one_line(message: str) -> str:
    return message.strip().translate(_UNPRINTABLE)


def echo_error(message: str) -> None:
    click.echo(one_line(message), err=True)
