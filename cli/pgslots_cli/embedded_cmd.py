"""``pgslots embedded``: the local PostgreSQL used when no database is configured."""

from __future__ import annotations

import click

from pgslots import embedded

from .app import cli, fail


@cli.group("embedded", short_help="The embedded local PostgreSQL.")
def embedded_group() -> None:
    """The embedded local PostgreSQL, used when no --dsn, PGSLOTS_DSN, DATABASE_URL or PG* variable is set.

    It keeps its data in $PGSLOTS_HOME (default: ~/.local/share/pgslots, or /var/lib/pgslots for root)
    and listens on a unix socket only. It is started on first use and reused after.
    """


@embedded_group.command()
def status() -> None:
    """Say whether the embedded server exists and runs, and where."""
    local = embedded.require_cluster()
    if not local.initialized():
        click.echo(f"The embedded PostgreSQL is not created yet; it will be, in {local.root}, on first use.")
    elif local.running():
        click.echo(f"The embedded PostgreSQL is running: data in {local.datadir}, binaries from {local.bindir}.")
        click.echo(f"DSN: {local.dsn()}")
    else:
        click.echo(f"The embedded PostgreSQL is stopped (data in {local.datadir}); it starts on next use.")


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
