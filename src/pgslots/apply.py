"""Declarative limits: make the database's limits match a TOML file, in one transaction.

The file has one table per limit::

    [api]
    limit = 10

    ["nightly export"]
    limit = 2
    slot_decay_per_second = 0.5
    active = false

    ["tenant:*"]          # a template: every key tenant:... gets 5 slots of its own
    limit = 5

    ["tenant:acme"]       # an override: this key gets 20
    limit = 20

    ["llm-tokens"]        # at most 90,000 in any minute, measured before it is enforced
    limit = 90000
    window_seconds = 60
    shadow = true

Keys of templates are never listed, created or pruned by a file: they come and go with use.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from ._definitions import FIELDS, Desired, Plan, apply_desired, parse, plan
from .client import Client, connections_of
from .errors import InvalidArgumentError


def load(path: str | Path) -> list[Desired]:
    """Reads and checks a limits file; every problem is reported before anything changes."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise InvalidArgumentError(f"No such file: {path}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"{path} is not valid TOML: {exc}.") from None
    except RecursionError:
        raise InvalidArgumentError(f"{path} is nested too deeply to be a limits file: it has one table per limit.") from None
    return parse(data, str(path))


def apply(client: Client, desired: list[Desired], *, prune: bool = False, dry_run: bool = False) -> Plan:
    """Computes the plan and carries it out in one transaction. With dry_run, the plan is carried out
    all the same and then rolled back: the database refuses exactly what it would refuse for real,
    and nothing changes."""
    return apply_desired(connections_of(client), desired, prune=prune, dry_run=dry_run)


__all__ = ["FIELDS", "Desired", "Plan", "apply", "load", "plan"]
