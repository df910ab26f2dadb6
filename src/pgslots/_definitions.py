"""Limits declared as data: checking a mapping of names to fields, planning the changes that
make the database match it, and carrying them out in one transaction. ``pgslots.apply`` reads the
mapping from a TOML file; ``Client.apply`` takes it from Python."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _queries as q
from . import _validate as check
from ._connections import Connections
from .errors import InvalidArgumentError
from .types import DEFAULT_MARGIN_SECONDS, LimitInfo

FIELDS = ("limit", "slot_decay_per_second", "window_seconds", "active", "shadow", "max_keys", "margin_seconds")


@dataclass(frozen=True)
class Desired:
    name: str
    limit: int
    slot_decay_per_second: float = 0.0
    window_seconds: float = 0.0
    active: bool = True
    shadow: bool = False
    #: For a template: how many live keys it may have (None: not declared, the database's default).
    max_keys: int | None = None
    margin_seconds: float = DEFAULT_MARGIN_SECONDS


@dataclass
class Plan:
    create: list[Desired] = field(default_factory=list)
    change: list[tuple[Desired, dict[str, tuple[Any, Any]]]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.change or self.delete)


def parse(data: Mapping[str, Any], source: str) -> list[Desired]:
    """Checks a mapping of limit names to their fields (a limits file's tables, or what
    Client.apply is given); every problem is reported, naming ``source``, before anything changes."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"{source} must map limit names to tables such as {{'api': {{'limit': 10}}}}, got {type(data).__name__}."
        )
    desired = []
    for name, table in data.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(f"{source}: limit names must be strings, got {name!r}.")
        where = f"{source}: [{name}]"
        if not isinstance(table, Mapping):
            raise InvalidArgumentError(f"{where} must be a table such as [{name}] with limit = N.")
        unknown = sorted(set(table) - set(FIELDS))
        if unknown:
            raise InvalidArgumentError(f"{where} has unknown keys {unknown}; allowed: {', '.join(FIELDS)}.")
        limit: Any = table.get("limit")
        check.number(f"{where}: limit", limit, minimum=0, integer=True)
        decay = _seconds(table, "slot_decay_per_second", where)
        window = _seconds(table, "window_seconds", where)
        if decay > 0 and window > 0:
            raise InvalidArgumentError(f"{where}: a limit has slot_decay_per_second or window_seconds, not both.")
        active = check.flag(f"{where}: active", table.get("active", True))
        shadow = check.flag(f"{where}: shadow", table.get("shadow", False))
        max_keys = table.get("max_keys")
        check.number(f"{where}: max_keys", max_keys, minimum=1, integer=True, allow_none=True)
        if max_keys is not None and not name.endswith("*"):
            raise InvalidArgumentError(f"{where}: max_keys is for templates (names ending in *), and {name!r} is a plain limit.")
        margin = table.get("margin_seconds", DEFAULT_MARGIN_SECONDS)
        desired.append(Desired(name, limit, decay, window, active, shadow, max_keys, _margin(margin, where)))
    return desired


def _margin(value: Any, where: str) -> float:
    check.number(f"{where}: margin_seconds", value, minimum=0, integer=False)
    if value > check.MAX_MARGIN_SECONDS:
        raise InvalidArgumentError(f"{where}: margin_seconds must be at most {check.MAX_MARGIN_SECONDS:g} seconds, got {value!r}.")
    return float(value)


def _seconds(table: Mapping[str, Any], key: str, where: str) -> float:
    value = table.get(key, 0.0)
    check.number(f"{where}: {key}", value, minimum=0, integer=False)
    return float(value)


def plan(current: list[LimitInfo], desired: list[Desired], prune: bool) -> Plan:
    result = Plan()
    by_name = {info.name: info for info in current}
    for want in desired:
        have = by_name.get(want.name)
        if have is None:
            result.create.append(want)
            continue
        # An undeclared max_keys leaves the template's as it is.
        declared = [f for f in FIELDS if f != "max_keys" or want.max_keys is not None]
        changes = {f: (getattr(have, f), getattr(want, f)) for f in declared if getattr(have, f) != getattr(want, f)}
        if changes:
            result.change.append((want, changes))
        else:
            result.unchanged.append(want.name)
    if prune:
        wanted = {d.name for d in desired}
        result.delete = sorted(name for name in by_name if name not in wanted)
    return result


def apply_desired(db: Connections, desired: list[Desired], *, prune: bool = False, dry_run: bool = False) -> Plan:
    """Computes the plan and carries it out in one transaction. With dry_run, the plan is carried out
    all the same and then rolled back: the database refuses exactly what it would refuse for real,
    and nothing changes."""
    with db.transaction() as conn:
        db.call_on(conn, q.LOCK_FOR_APPLY)
        # Keys of templates are not declared: they come and go with use.
        current = [LimitInfo(**row) for row in db.call_on(conn, q.GET_LIMITS, {"names": None, "with_instances": False})]
        todo = plan(current, desired, prune)
        try:
            with conn.transaction():
                _carry_out(db, conn, todo)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
    return todo


class _DryRun(Exception):
    """Rolls a dry run's changes back."""


def _carry_out(db: Any, conn: Any, todo: Plan) -> None:
    for want in todo.create:
        db.call_on(
            conn,
            q.CREATE_LIMIT,
            {
                "name": want.name,
                "limit": want.limit,
                "slot_decay_per_second": want.slot_decay_per_second,
                "active": want.active,
                "active_slots": 0,
                "window_seconds": want.window_seconds,
                "shadow": want.shadow,
                "max_keys": want.max_keys,
                "margin_seconds": want.margin_seconds,
            },
        )
    for want, changes in todo.change:
        db.call_on(
            conn,
            q.UPDATE_LIMIT,
            {
                "name": want.name,
                **{f: changes[f][1] if f in changes else None for f in FIELDS},
                "active_slots": None,
                "new_name": None,
            },
        )
    for name in todo.delete:
        db.call_on(conn, q.DELETE_LIMIT, {"name": name})
