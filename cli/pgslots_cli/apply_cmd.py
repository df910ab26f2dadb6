"""``pgslots apply FILE``: make the database's limits match a TOML file."""

from __future__ import annotations

from pathlib import Path

import click

from pgslots import apply as declarative
from pgslots.types import DEFAULT_MARGIN_SECONDS

from .app import State, cli, pass_state
from .output import number


@cli.command("apply", short_help="Make the limits match a TOML file.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prune", is_flag=True, help="Also delete the limits the file does not list.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@pass_state
def apply_command(state: State, file: Path, prune: bool, dry_run: bool) -> None:
    """Make the database's limits match FILE, in one transaction.

    FILE is TOML with one table per limit:

    \b
        [api]
        limit = 10
        ["nightly export"]
        limit = 2
        slot_decay_per_second = 0.5
        active = false
        ["tenant:*"]
        limit = 5
        ["tenant:acme"]
        limit = 20
        ["llm-tokens"]
        limit = 90000
        window_seconds = 60
        margin_seconds = 0.1
        shadow = true

    A table whose name ends in * is a template (every key tenant:... gets its own 5 slots); a plain
    limit named like a key is an override. Keys in use are never pruned. margin_seconds (decay
    and window limits; 0.05 unless given) holds grants back so that an upstream enforcing the same
    rate accepts them; 0 is exact on the database's clock.
    """
    desired = declarative.load(file)
    plan = declarative.apply(state.client, desired, prune=prune, dry_run=dry_run)
    prefix = "would " if dry_run else ""
    for want in plan.create:
        extra = f", slot_decay_per_second {number(want.slot_decay_per_second)}" if want.slot_decay_per_second else ""
        extra += f", window_seconds {number(want.window_seconds)}" if want.window_seconds else ""
        if (want.slot_decay_per_second or want.window_seconds) and want.margin_seconds != DEFAULT_MARGIN_SECONDS:
            extra += f", margin_seconds {number(want.margin_seconds)}"
        extra += "" if want.active else ", inactive"
        extra += ", shadow" if want.shadow else ""
        extra += f", max_keys {want.max_keys}" if want.max_keys is not None else ""
        click.echo(f"{prefix}create {want.name!r}: limit {want.limit}{extra}")
    for want, changes in plan.change:
        described = ", ".join(f"{field} {_show(old)} -> {_show(new)}" for field, (old, new) in changes.items())
        click.echo(f"{prefix}change {want.name!r}: {described}")
    for name in plan.delete:
        click.echo(f"{prefix}delete {name!r}")
    summary = f"{len(plan.create)} to create, {len(plan.change)} to change, {len(plan.delete)} to delete, {len(plan.unchanged)} unchanged"
    if dry_run:
        click.echo(f"Dry run: {summary}. Nothing was changed.")
    elif plan.empty:
        click.echo(f"Nothing to do: the database matches {file} ({len(plan.unchanged)} limits).")
    else:
        click.echo(
            f"Applied {file}: {summary.replace('to create', 'created').replace('to change', 'changed').replace('to delete', 'deleted')}."
        )


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number(value)
    return str(value)
