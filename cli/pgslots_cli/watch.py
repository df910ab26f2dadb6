"""``pgslots watch``: a live view of limits, holders and waiters."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import click

from pgslots._text import shown
from pgslots.client import Client
from pgslots.types import LimitInfo

from .app import State, cli, pass_state
from .output import bar, number, paused, seconds

HOLDERS_SHOWN = 5
KEYS_SHOWN = 3  # a template's busiest keys


def frame(client: Client, names: tuple[str, ...] = ()) -> str:
    """One screenful: per limit a bar of occupied/limit, its holders and its queue; per template its
    busiest keys."""
    seen = client.overview(list(names) if names else None, busiest=KEYS_SHOWN, holders=HOLDERS_SHOWN)
    limits = seen.limits
    now = datetime.now(UTC)
    lines = [f"pgslots watch - {now.astimezone().strftime('%Y-%m-%d %H:%M:%S')} - {len(limits)} limit(s)", ""]
    if not limits:
        lines.append("No global concurrency limits found.")
    busiest = {i.name: seen.busiest.get(i.name, []) for i in limits if i.is_template}
    width = max([len(i.name) for i in limits] + [len(k.name) + 2 for keys in busiest.values() for k in keys] + [4])
    for info in limits:
        if info.is_template:
            keys = busiest[info.name]
            lines.append(
                f"{info.name.ljust(width)}  template: {info.limit} per key, {info.instances} key(s) in use, "
                f"{number(round(info.held_slots, 2))} slot(s) held, waiters {info.waiters}{_state(info)}"
            )
            for key in keys:
                lines.append(_limit_line(key, width, indent="  "))
            if (info.instances or 0) > len(keys):
                lines.append(f"{'':{width}}    ... and {(info.instances or 0) - len(keys)} more key(s): pgslots ls {info.name!r}")
            continue
        lines.append(_limit_line(info, width))
        for lease in seen.holders.get(info.name, []):
            age = seconds((now - lease.acquired_at).total_seconds())
            who = f"{lease.host or '?'} pid {lease.pid or '?'}"
            expired = "  EXPIRED" if lease.expired else ""
            lines.append(f"{'':{width}}    {lease.slots} slot(s)  {who}  held {age}{expired}")
        if info.leases > len(seen.holders.get(info.name, [])) and seen.holders_error is None:
            lines.append(f"{'':{width}}    ... and {info.leases - len(seen.holders.get(info.name, []))} more lease(s)")
    if seen.holders_error is not None:
        lines += ["", seen.holders_error]
    # Names, hosts and keys are the callers' words: no character of theirs acts on the terminal.
    return "\n".join(shown(line) for line in lines)


def _state(info: LimitInfo) -> str:
    if info.paused_until is not None:
        return f"  ({paused(info)})"
    if not info.active:
        return "  (disabled: not enforced)"
    if info.shadow:
        return f"  (shadow: not enforced, {info.shadow_refusals} would-be refusal(s))"
    return ""


def _limit_line(info: LimitInfo, width: int, indent: str = "") -> str:
    decay = f"  decay {number(info.slot_decay_per_second)}/s" if info.slot_decay_per_second else ""
    if info.window_seconds:
        decay = f"  per {number(info.window_seconds)}s window"
    waiting = f"  waiters {info.waiters}"
    if info.waiters and info.oldest_waiter_seconds is not None:
        waiting += f" (oldest {seconds(info.oldest_waiter_seconds)})"
    gone = f"  reclaimable {info.reclaimable_slots} (holders gone)" if info.reclaimable_slots else ""
    return (
        f"{(indent + info.name).ljust(width)}  {bar(info.held_slots, info.limit)} "
        f"{number(round(info.held_slots, 2))}/{info.limit}{gone}{decay}{waiting}{_state(info)}"
    )


@cli.command(short_help="Live view of limits, holders, waiters.")
@click.argument("names", nargs=-1)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("-n", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between refreshes.")
@pass_state
def watch(state: State, names: tuple[str, ...], once: bool, interval: float) -> None:
    """Live view of limits (all, or NAMES): occupied slots, holders, waiters; for each template its
    busiest keys. Ctrl-C to stop."""
    if once:
        click.echo(frame(state.client, names))
        return
    try:
        while True:
            text = frame(state.client, names)
            click.clear()
            click.echo(text)
            click.echo("\n(Ctrl-C to stop)")
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo("")
