"""Argument checks, written once for every door: the sync and async faces, :class:`~pgslots.Client`,
``apply`` and the CLI. Each rejects, before any round trip and in Python's terms, what the SQL
would reject too (the SQL checks again: it trusts no caller)."""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidArgumentError, InvalidLimitNameError

LARGEST = 2**31 - 1  # limits, slots and key counts are PostgreSQL integers
MAX_MARGIN_SECONDS = 60.0  # the most a limit's margin_seconds may be (migration 0014)
MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_FAIRNESS_KEY = 255


def number(label: str, value: Any, *, minimum: float, integer: bool, allow_none: bool = False) -> None:
    """A finite number (a whole one when ``integer``, then at most LARGEST) of at least ``minimum``."""
    if value is None:
        if allow_none:
            return
        raise InvalidArgumentError(f"{label} is required.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise InvalidArgumentError(f"{label} must be {kind}, got {value!r}.")
    if integer and not minimum <= value <= LARGEST:
        raise InvalidArgumentError(f"{label} must be a whole number >= {minimum:g} and at most {LARGEST}, got {value!r}.")
    if not math.isfinite(value) or value < minimum:
        raise InvalidArgumentError(f"{label} must be a finite number >= {minimum:g}, got {value!r}.")


def flag(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{label} must be true or false, got {value!r}.")
    return value


def optional_flag(label: str, value: Any) -> bool | None:
    """True, False, or None (as configured)."""
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(f"{label} must be True, False or None (as configured), got {value!r}.")
    return value


def limit_values(**values: Any) -> None:
    """The numbers of a limit, as create_limit, update_limit and a limits file give them (None:
    not given)."""
    for label, value in values.items():
        number(label, value, minimum=0, integer=label in ("limit", "active_slots", "max_keys"), allow_none=True)
        if label == "margin_seconds" and value is not None and value > MAX_MARGIN_SECONDS:
            raise InvalidArgumentError(
                f"margin_seconds must be from 0 to {MAX_MARGIN_SECONDS:g} seconds (the most a request may take from"
                f" its grant to the downstream; 0 for exact), got {value!r}."
            )


def names(given: Any) -> tuple[str, ...]:
    """The limit names of a request: one string or a list of strings, repeats dropped."""
    if given is None:
        return ()
    if isinstance(given, str):
        return (given,)
    if not isinstance(given, (list, tuple)) or not all(isinstance(n, str) for n in given):
        raise InvalidArgumentError(f"names must be a string or a list of strings, got {given!r}.")
    return tuple(dict.fromkeys(given))


def no_nul(names: tuple[str, ...]) -> None:
    """A NUL cannot reach PostgreSQL in text: said here, as the database says of other control characters."""
    for name in names:
        if "\x00" in name:
            shown = name[:80].replace("\x00", "?")
            raise InvalidLimitNameError(
                f"Limit name {shown!r} contains a control character (a NUL byte): names must be printable."
                " Choose a name of printable characters, e.g. 'tenant:acme'."
            )


def queue_args(priority: Any, fairness_key: Any) -> None:
    """A priority from -100 to 100, and a fairness key of 1 to 255 characters or None."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgumentError(
            f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} (higher is served first), got {priority!r}."
        )
    if fairness_key is None:
        return
    if not isinstance(fairness_key, str):
        raise InvalidArgumentError(
            f"fairness_key must be a string such as a tenant id (or None), got {type(fairness_key).__name__} {fairness_key!r:.80}."
        )
    if not 1 <= len(fairness_key) <= MAX_FAIRNESS_KEY:
        raise InvalidArgumentError(
            f"fairness_key must be 1 to {MAX_FAIRNESS_KEY} characters long (or None for no key), got {len(fairness_key)}."
        )


def holder(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise InvalidArgumentError(f"holder must be a dict such as {{'type': 'worker', 'id': '7'}}, got {value!r}.")
    return value
