"""``pgslots embedded``: a local PostgreSQL for trying pgslots on one machine."""

from __future__ import annotations

import click

from pgslots import embedded
from pgslots._cluster import LocalCluster

from .app import cli, fail


@cli.group("embedded", short_help="A local PostgreSQL for trying pgslots.")
def embedded_group() -> None:
    """A local PostgreSQL for trying pgslots on one machine.

    'pgslots embedded start' starts it and prints the PGSLOTS_DSN to export. While it runs, pgslots
    commands with no --dsn, PGSLOTS_DSN, DATABASE_URL or PG* variable use it; programs use it when
    they export that DSN, or opt in with configure(embedded=True) or PGSLOTS_EMBEDDED=1. It keeps
    its data in $PGSLOTS_HOME (default: ~/.local/share/pgslots, or /var/lib/pgslots for root) and
    listens on a unix socket only.
    """


def started_message(found: str, local: LocalCluster) -> None:
    verb = "Started" if embedded.started_here is not None else "Already running:"
    click.echo(f"{verb} the embedded PostgreSQL (data in {local.datadir}).")
    click.echo("Use it from other shells and programs:")
    click.echo(f"  export PGSLOTS_DSN='{found}'")
    click.echo("Stop it with 'pgslots embedded stop' (its data stays).")


@embedded_group.command()
def start() -> None:
    """Start the embedded server (creating it the first time) and print the DSN to export."""
    local = embedded.require_cluster()
    found = embedded.embedded_dsn(start=True)
    if found is None:
        fail("The embedded PostgreSQL could not be started.")
    started_message(found, local)


@embedded_group.command()
def status() -> None:
    """Say whether the embedded server exists and runs, and where."""
    local = embedded.require_cluster()
    if not local.initialized():
        click.echo(f"The embedded PostgreSQL is not created yet; 'pgslots embedded start' creates it in {local.root}.")
    elif local.running():
        click.echo(f"The embedded PostgreSQL is running: data in {local.datadir}, binaries from {local.bindir}.")
        click.echo(f"DSN: {local.dsn()}")
    else:
        click.echo(f"The embedded PostgreSQL is stopped (data in {local.datadir}); 'pgslots embedded start' starts it.")


@embedded_group.command()
def dsn() -> None:
    """Print the embedded server's connection string, starting it if needed."""
    found = embedded.embedded_dsn(start=True)
    if found is None:
        embedded.require_cluster()
        fail("The embedded PostgreSQL could not be started.")
    click.echo(found)


@embedded_group.command()
def stop() -> None:
    """Stop the embedded server (its data stays)."""
    if embedded.stop():
        click.echo("Stopped the embedded PostgreSQL.")
    else:
        click.echo("The embedded PostgreSQL is not running; nothing to stop.")
