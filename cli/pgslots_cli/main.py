"""The ``pgslots`` command: global concurrency and rate limits kept in PostgreSQL.

Commands mirror ``prefect gcl`` where it has the same command, with the same flags and messages.
This module holds the schema, limit and lease commands, and gathers the others.
"""

from __future__ import annotations

import shlex
from datetime import UTC
from pathlib import Path
from typing import Any

import click

import pgslots
from pgslots._validate import LARGEST, MAX_MARGIN_SECONDS
from pgslots.types import DEFAULT_MARGIN_SECONDS, LimitInfo

from . import apply_cmd, demo, embedded_cmd, ui, watch  # noqa: F401 - they add their commands to cli
from .app import State, check_output, cli, fail, output_options, pass_state

__all__ = ["cli", "main"]
from .output import dumps, held, limit_json, number, paused, seconds, table

# ---- schema ---------------------------------------------------------------------------------


@cli.command(short_help="Install or upgrade the schema.")
@click.option("--dry-run", is_flag=True, help="Print the SQL a migration would run, and change nothing.")
@click.option("--check", is_flag=True, help="Change nothing; exit 1 when the database is behind this pgslots.")
@pass_state
def migrate(state: State, dry_run: bool, check: bool) -> None:
    """Install or upgrade the pgslots schema (safe to run again, and from several places at once).

    Numbered migrations (tables, roles, data) run once each; the functions, views and privileges
    are re-created whenever they differ from this version's, all in one transaction.
    """
    if dry_run and check:
        fail("Use either --dry-run or --check, not both.")
    todo = state.client.migration_plan()
    if todo.up_to_date:
        click.echo(f"The schema is up to date (version {pgslots.LATEST_VERSION}); nothing changed.")
        return
    if dry_run:
        click.echo(todo.script(), nl=False)
        return
    if check:
        fail(f"The schema is behind this pgslots: {_describe(todo)}. Run 'pgslots migrate' to bring it up to date.")
    applied = state.client.migrate()
    if applied:
        click.echo(f"Applied migrations {', '.join(map(str, applied))}: schema is at version {applied[-1]}.")
    if todo.changed_code:
        click.echo(f"Re-created the functions, views and privileges ({len(todo.changed_code)} file(s) changed).")


def _describe(todo: pgslots.MigrationPlan) -> str:
    parts = []
    if todo.migrations:
        parts.append("migrations " + ", ".join(f"{m.version:04d}_{m.name}" for m in todo.migrations) + " pending")
    if todo.changed_code:
        parts.append("changed functions in " + ", ".join(todo.changed_code))
    return "; ".join(parts)


# ---- limits ---------------------------------------------------------------------------------


@cli.command(short_help="Create a limit, or a template (NAME ending in *).")
@click.argument("name")
@click.option(
    "-l", "--limit", type=click.IntRange(min=0, max=LARGEST), required=True, help="Number of slots (>= 0); per key for a template."
)
@click.option(
    "--slot-decay-per-second",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Slots freed per second; > 0 makes the limit usable as a rate limit.",
)
@click.option(
    "--window-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Instead of decay: grant at most LIMIT slots in any span of this many seconds (a sliding window).",
)
@click.option(
    "--margin-seconds",
    type=click.FloatRange(min=0, max=MAX_MARGIN_SECONDS),
    default=DEFAULT_MARGIN_SECONDS,
    show_default=True,
    help="For decay and window limits: the most a request takes from its grant to a downstream that enforces"
    " the same rate; grants are held back by that much (0: exact on the database's clock).",
)
@click.option("--active-slots", type=click.IntRange(min=0), default=0, help="Slots to mark occupied from the start.")
@click.option("--disable", is_flag=True, help="Create the limit inactive: it enforces nothing until enabled.")
@click.option("--shadow", is_flag=True, help="Grant everything, but count the requests it would refuse (see inspect).")
@click.option(
    "--max-keys",
    type=click.IntRange(min=1, max=LARGEST),
    help="For a template: how many keys it may have at once (default: the database's max_keys_per_template).",
)
@pass_state
def create(
    state: State,
    name: str,
    limit: int,
    slot_decay_per_second: float,
    window_seconds: float,
    margin_seconds: float,
    active_slots: int,
    disable: bool,
    shadow: bool,
    max_keys: int | None,
) -> None:
    """Create the limit NAME with LIMIT slots.

    A NAME ending in * creates a template: 'tenant:*' gives every name that starts with 'tenant:'
    (tenant:acme, tenant:beta, ...) a limit of its own with these values on first use. A plain
    limit named like a key ('tenant:acme') overrides the template for that key.

    \b
    Examples:
      pgslots create db -l 10                          at most 10 at once
      pgslots create api -l 5 --slot-decay-per-second 5   5 per second, bursts of 5
      pgslots create llm-tokens -l 90000 --window-seconds 60   90,000 tokens in any minute
      pgslots create api -l 5 --slot-decay-per-second 5 --shadow   measure before enforcing

    A decay or window limit holds its grants back by --margin-seconds (0.05 s unless set), so
    that an upstream enforcing the same rate on its own clock accepts every request it lets
    through: a window counts each grant that much longer, a bucket's burst is smaller by
    rate x margin. --margin-seconds 0 is exact on the database's clock.
    """
    _finite(slot_decay_per_second, "--slot-decay-per-second")
    _finite(window_seconds, "--window-seconds")
    if slot_decay_per_second > 0 and window_seconds > 0:
        fail("A limit has either --slot-decay-per-second or --window-seconds, not both: choose one.")
    key_of = next((i.template for i in state.client.read_limits([name]) if i.template), None)
    try:
        info = state.client.create_limit(
            name,
            limit,
            slot_decay_per_second=slot_decay_per_second,
            window_seconds=window_seconds,
            active=not disable,
            active_slots=active_slots,
            shadow=shadow,
            max_keys=max_keys,
            margin_seconds=margin_seconds,
        )
    except pgslots.LimitExistsError:
        fail(f"Global concurrency limit {name!r} already exists.")
    if info.is_template:
        click.echo(f"Created template {name!r} and ID '{info.id}': each key such as {name[:-1] + 'example'!r} gets {limit} slot(s).")
        click.echo(f"Run \"pgslots ls '{name}'\" to list its keys in use.")
        return
    if key_of is not None:
        click.echo(f"Key {name!r} of template {key_of!r} now has a limit of its own (an override) with ID '{info.id}'.")
    else:
        click.echo(f"Created global concurrency limit with name {name!r} and ID '{info.id}'.")
    if shadow:
        click.echo(
            "It is in shadow mode: it grants every request and counts those it would refuse. "
            f"Enforce it with {_command('update', name, '--enforce')}."
        )
    click.echo(f"Run {_command('inspect', name)} to view details.")


@cli.command("ls", short_help="List limits and templates, or a template's keys.")
@click.argument("template", required=False)
@click.option(
    "--keys", "most", type=click.IntRange(1, 1000), default=100, show_default=True, help="With TEMPLATE: how many keys, the busiest first."
)
@output_options
@pass_state
def ls(state: State, template: str | None, most: int, output: str | None) -> None:
    """List every limit and template: slots in use after decay (or in the window), the rate (decay
    per second or window), waiters; a template's figures are its keys' summed, with its number of
    keys in use. ACTIVE says 'shadow' for a limit in shadow mode. With TEMPLATE (e.g. 'tenant:*'),
    list that template's keys instead: the --keys busiest (100 unless given)."""
    as_json = check_output(output)
    info = None
    if template is not None:
        info = _check_template(state, template)
        limits = state.client.read_instances(template, busiest=most)
    else:
        limits = state.client.overview(busiest=0, holders=0).limits
    if as_json:
        click.echo(dumps([limit_json(i) for i in limits]))
        return
    if not limits:
        click.echo(f"Template {template!r} has no keys in use." if template else "No global concurrency limits found.")
        return
    overrides = {} if template else _overrides(limits)
    rows = [
        [
            i.name + (f" (override of {overrides[i.name]})" if i.name in overrides else ""),
            str(i.limit),
            held(i),
            _rate(i),
            paused(i) or (("shadow" if i.shadow else "yes") if i.active else "no"),
            str(i.waiters),
            str(i.instances) if i.is_template else "-",
            str(i.id),
        ]
        for i in limits
    ]
    click.echo(table(["NAME", "LIMIT", "ACTIVE SLOTS", "RATE", "ACTIVE", "WAITERS", "INSTANCES", "ID"], rows, shrink=0))
    if info is not None and (info.instances or 0) > len(limits):
        click.echo(f"The {len(limits)} busiest of {info.instances} keys; --keys N shows more (up to 1000).")


def _overrides(limits: list[LimitInfo]) -> dict[str, str]:
    """Plain limits named like a template's key (tenant:acme for tenant:*): the template each serves."""
    prefixes = sorted((t.name[:-1] for t in limits if t.is_template), key=len, reverse=True)
    found = {}
    for info in limits:
        if not info.is_template and info.template is None:
            match = next((p for p in prefixes if info.name.startswith(p)), None)
            if match is not None:
                found[info.name] = match + "*"
    return found


def _check_template(state: State, template: str) -> LimitInfo:
    """TEMPLATE must name a template; for a bare prefix ('tenant'), say which template it may mean."""
    try:
        info = state.client.read_limit(template)
    except pgslots.LimitNotFoundError:
        info = None
    if info is not None and info.is_template:
        return info
    near = sorted(t.name for t in state.client.read_limits(instances=False) if t.is_template and t.name.startswith(template))
    hint = f" Did you mean {_command('ls', near[0])}?" if near else " Run 'pgslots ls' to see the templates."
    if info is None:
        fail(f"Global concurrency limit {template!r} not found.{hint}")
    fail(f"{template!r} is not a template (a template's name ends in *).{hint}")


def _rate(info: LimitInfo) -> str:
    if info.window_seconds > 0:
        return f"window {number(info.window_seconds)}s"
    return f"{number(info.slot_decay_per_second)}/s" if info.slot_decay_per_second > 0 else "-"


@cli.command()
@click.argument("name")
@output_options
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False, path_type=Path), help="Write the output to PATH (needs --output).")
@pass_state
def inspect(state: State, name: str, output: str | None, path: Path | None) -> None:
    """Show everything about the limit NAME."""
    if path is not None and output is None:
        fail("The --file/-f option requires the --output option to be set.")
    as_json = check_output(output)
    info = _read(state, name)
    if as_json:
        text = dumps(limit_json(info))
        if path is not None:
            path.write_text(text + "\n", encoding="utf-8")
            click.echo(f"Global concurrency limit {name!r} written to {path}.")
        else:
            click.echo(text)
        return
    rows = [[key, _show(value)] for key, value in _inspected(info)]
    click.echo(table(["FIELD", "VALUE"], rows, shrink=1))


def _inspected(info: LimitInfo) -> list[tuple[str, Any]]:
    """The fields that say something about this limit, each once (-o json has them all)."""
    kind = "concurrency limit"
    if info.window_seconds > 0:
        kind = f"window limit: at most {info.limit} in any {number(info.window_seconds)} s"
    elif info.slot_decay_per_second > 0:
        kind = f"rate limit: bursts of {info.limit}, then {number(info.slot_decay_per_second)} per second"
    margin = None
    if info.window_seconds > 0 or info.slot_decay_per_second > 0:
        margin = f"{number(info.margin_seconds)} s" if info.margin_seconds > 0 else "0 (exact on the database's clock)"
    if info.is_template:
        kind = f"template: each key gets its own {kind}"
    state = (
        ("enforced" if not info.shadow else f"shadow (not enforced; {info.shadow_refusals} would-be refusals)")
        if info.active
        else "disabled"
    )
    if info.paused_until is not None:
        state = f"{paused(info)}, until {info.paused_until.isoformat(timespec='seconds')}; {state} after"
    fields: list[tuple[str, Any]] = [("name", info.name), ("id", info.id), ("kind", kind), ("limit", info.limit), ("state", state)]
    if margin is not None:
        fields.append(("margin", margin))
    if info.is_template:
        fields += [("keys", info.instances), ("max_keys", info.max_keys)]
    else:
        if info.template is not None:
            fields.append(("template", info.template))
        fields.append(("slots in use", held(info)))
        if info.leased_slots != info.active_slots:
            fields.append(("held by leases", info.leased_slots))
        fields.append(("leases", info.leases if not info.expired_leases else f"{info.leases} ({info.expired_leases} expired)"))
        waiting = f"{info.waiters} (oldest {seconds(info.oldest_waiter_seconds)})" if info.waiters else 0
        fields.append(("waiters", waiting))
        if info.waiter_priorities and info.waiter_priorities != [0]:
            fields.append(("waiting priorities", ", ".join(map(str, info.waiter_priorities))))
    fields += [
        ("grants", info.grants_total),
        ("refusals", f"{info.refusals_total} ({info.denied_slots} slots denied)"),
        ("seconds waited", info.wait_seconds_total),
        ("leases taken back", info.expired_leases_total),
        ("created", info.created),
        ("updated", info.updated),
    ]
    return fields


@cli.command()
@click.argument("name")
@click.option("-l", "--limit", type=click.IntRange(min=0, max=LARGEST), help="New number of slots.")
@click.option("--active-slots", type=click.IntRange(min=0), help="Set the occupied slots (not below those leased).")
@click.option("--slot-decay-per-second", type=click.FloatRange(min=0), help="New decay; 0 turns decay off.")
@click.option("--window-seconds", type=click.FloatRange(min=0), help="New window; 0 turns the window off.")
@click.option(
    "--margin-seconds",
    type=click.FloatRange(min=0, max=MAX_MARGIN_SECONDS),
    help="New margin for a decay or window limit (see create); 0 makes it exact on the database's clock.",
)
@click.option("--enable", is_flag=True, help="Enforce the limit again.")
@click.option("--disable", is_flag=True, help="Stop enforcing the limit (acquires pass freely).")
@click.option("--shadow/--enforce", default=None, help="Shadow mode (grant everything, count would-be refusals), or enforce.")
@click.option(
    "--max-keys",
    type=click.IntRange(min=0, max=LARGEST),
    help="For a template: how many keys it may have at once (0: the database's max_keys_per_template).",
)
@pass_state
def update(
    state: State,
    name: str,
    limit: int | None,
    active_slots: int | None,
    slot_decay_per_second: float | None,
    window_seconds: float | None,
    margin_seconds: float | None,
    enable: bool,
    disable: bool,
    shadow: bool | None,
    max_keys: int | None,
) -> None:
    """Change the limit NAME. Lowering the limit pre-empts no holder.

    A limit counts by decay or by window: to switch, set the other to 0 in the same command, e.g.
    'pgslots update api --window-seconds 60 --slot-decay-per-second 0'. What it holds carries over.
    """
    if enable and disable:
        fail("Cannot enable and disable a global concurrency limit at the same time.")
    given = (limit, active_slots, slot_decay_per_second, window_seconds, margin_seconds, shadow, max_keys)
    if all(v is None for v in given) and not (enable or disable):
        fail("No update arguments provided.")
    if slot_decay_per_second is not None:
        _finite(slot_decay_per_second, "--slot-decay-per-second")
    if window_seconds is not None:
        _finite(window_seconds, "--window-seconds")
    active = True if enable else False if disable else None
    try:
        state.client.update_limit(
            name,
            limit=limit,
            active_slots=active_slots,
            slot_decay_per_second=slot_decay_per_second,
            window_seconds=window_seconds,
            active=active,
            shadow=shadow,
            max_keys=max_keys,
            margin_seconds=margin_seconds,
        )
    except pgslots.LimitNotFoundError:
        fail(f"Global concurrency limit {name!r} not found.")
    click.echo(f"Updated global concurrency limit with name {name!r}.")
    if shadow is True:
        click.echo(
            "It is in shadow mode now: every request is granted, and 'shadow_refusals' in 'pgslots inspect' counts those it would refuse."
        )
    elif shadow is False:
        click.echo("It is enforced now.")


@cli.command(short_help="Delete a limit.")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def delete(state: State, name: str, yes: bool) -> None:
    """Delete the limit NAME with its leases and queue. Deleting a template makes its keys' names
    missing again; each key is removed once nobody holds it."""
    info = _read(state, name)
    if not yes and not click.confirm(f"Are you sure you want to delete global concurrency limit with name {name!r}?"):
        fail("Deletion aborted.")
    try:
        state.client.delete_limit(name)
    except pgslots.LimitNotFoundError:
        fail(f"Global concurrency limit {name!r} not found.")
    if info.is_template:
        click.echo(f"Deleted template {name!r}; its {info.instances} key(s) are removed once nobody holds them.")
        return
    click.echo(f"Deleted global concurrency limit with name {name!r}.")


@cli.command("clear-debt", short_help="Empty a limit's rate slots, debts included.")
@click.argument("name")
@pass_state
def clear_debt(state: State, name: str) -> None:
    """Empty the rate slots of the limit NAME (its token bucket, or the grants in its window), debts
    included, so that it admits again at once; for a template, of every key. Slots held by leases
    stay. For when a caller settled a reservation far above its estimate."""
    try:
        cleared = state.client.clear_debt(name)
    except pgslots.LimitNotFoundError:
        fail(f"Global concurrency limit {name!r} not found.")
    click.echo(f"Cleared {number(round(cleared, 2))} rate slot(s) of {name!r}: it admits again at once.")


def _toggle(state: State, name: str, active: bool) -> None:
    word = "enabled" if active else "disabled"
    if _read(state, name).active == active:
        fail(f"Global concurrency limit with name {name!r} is already {word}.")
    state.client.update_limit(name, active=active)
    click.echo(f"{word.capitalize()} global concurrency limit with name {name!r}.")


@cli.command(short_help="Enforce a limit again.")
@click.argument("name")
@pass_state
def enable(state: State, name: str) -> None:
    """Enforce the limit NAME again; waiters that now fit are woken at once."""
    _toggle(state, name, True)


@cli.command(short_help="Stop enforcing a limit.")
@click.argument("name")
@pass_state
def disable(state: State, name: str) -> None:
    """Stop enforcing the limit NAME: acquires pass without taking slots."""
    _toggle(state, name, False)


# ---- leases ---------------------------------------------------------------------------------


@cli.command(short_help="Who holds what.")
@click.argument("name", required=False)
@output_options
@pass_state
def leases(state: State, name: str | None, output: str | None) -> None:
    """Who holds what (all limits, or just NAME), since when, expiring when."""
    as_json = check_output(output)
    if name is not None:
        _read(state, name)
    found = state.client.list_leases(name)
    if as_json:
        click.echo(dumps(found))
        return
    if not found:
        click.echo(f"No leases held on {name!r}." if name else "No leases held.")
        return
    from datetime import datetime

    now = datetime.now(UTC)
    rows = []
    for lease in found:
        holder = f"{lease.host or '?'}:{lease.pid or '?'}"
        if lease.application_name:
            holder += f" ({lease.application_name})"
        expires = "expired" if lease.expired else "in " + seconds((lease.expires_at - now).total_seconds())
        if lease.gone and not lease.expired:
            expires += " (holder gone: reclaimable)"
        rows.append(
            [
                str(lease.lease_id),
                ",".join(lease.limit_names),
                str(lease.slots),
                holder,
                seconds((now - lease.acquired_at).total_seconds()),
                expires,
                str(lease.fencing_token),
            ]
        )
    click.echo(table(["LEASE ID", "LIMITS", "SLOTS", "HOLDER", "HELD FOR", "EXPIRES", "TOKEN"], rows, shrink=3))


@cli.command(short_help="Force-release a lease.")
@click.argument("lease_id")
@pass_state
def release(state: State, lease_id: str) -> None:
    """Force-release the lease LEASE_ID (see 'pgslots leases'); its holder is not interrupted."""
    if state.client.release(lease_id):
        click.echo(f"Released lease '{lease_id}'.")
    else:
        click.echo(f"Lease '{lease_id}' is not held (released already, or reclaimed after expiry); nothing changed.")


@cli.command(short_help="Close a limit for a while (an upstream's 429).")
@click.argument("name")
@click.argument("seconds", type=click.FloatRange(min=0, min_open=True))
@click.option("--reason", help="Why, shown with the limit (up to 200 characters), e.g. '429 from the API'.")
@pass_state
def pause(state: State, name: str, seconds: float, reason: str | None) -> None:
    """Close the limit NAME (or one key of a template) for SECONDS: nothing is granted on it until
    then; callers wait, queued ones keeping their places. A later pause extends, never shortens.
    At most max_pause_seconds (300 by default)."""
    _finite(seconds, "SECONDS")
    until = state.client.pause(name, seconds, reason)
    click.echo(f"Paused {name!r} until {until.isoformat(timespec='seconds')}" + (f" ({reason})." if reason else "."))


@cli.command(short_help="Open a paused limit now.")
@click.argument("name")
@pass_state
def resume(state: State, name: str) -> None:
    """Open the paused limit NAME now (admin); its queued waiters ask again."""
    if state.client.resume(name):
        click.echo(f"Resumed {name!r}: it grants again.")
    else:
        click.echo(f"{name!r} was not paused; nothing to do.")


@cli.command(short_help="Reclaim expired and dead leases now.")
@pass_state
def sweep(state: State) -> None:
    """Reclaim the slots of every expired lease, and of every lease whose holder's session died, now
    (full limits also do this by themselves); forget dead waiters and sessions."""
    count = state.client.sweep()
    click.echo(f"Reclaimed {count} expired or dead lease{'s' if count != 1 else ''}.")


# ---- helpers --------------------------------------------------------------------------------


def _read(state: State, name: str) -> LimitInfo:
    try:
        return state.client.read_limit(name)
    except pgslots.LimitNotFoundError:
        fail(f"Global concurrency limit {name!r} not found.")


def _finite(value: float, flag: str) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        fail(f"{flag} must be a finite number >= 0, got {value}.")


def _command(*args: str) -> str:
    """A pgslots command line to suggest, quoted for a shell and then as a whole: 'pgslots inspect
    api', or "pgslots inspect 'my limit'" when a name needs the shell's quotes."""
    line = " ".join(["pgslots", *(shlex.quote(a) for a in args)])
    return f'"{line}"' if "'" in line else f"'{line}'"


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return number(round(value, 3))
    return str(value)


def main() -> None:
    cli(prog_name="pgslots")
