"""The base of the ``pgslots`` command: the group, its error handling, and the state commands share.

Command modules import this one and add their commands to :data:`cli`; ``main`` imports them all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

import pgslots
from pgslots import embedded
from pgslots._config import configured_dsn
from pgslots.client import Client

from .output import echo_error

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> NoReturn:
    echo_error(message)
    sys.exit(1)


def _take_dsn(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).dsn = value


DSN_HELP = (
    "PostgreSQL connection string. Default: $PGSLOTS_DSN, else $DATABASE_URL, else libpq's PG* "
    "variables, else the embedded local server if it is running (see 'pgslots embedded start')."
)
NOT_CONFIGURED = (
    "No database configured: pass --dsn or set PGSLOTS_DSN (or DATABASE_URL, or libpq's PG* variables). "
    "To try pgslots on this machine, run 'pgslots embedded start' (or 'pgslots demo'), which starts a local "
    "PostgreSQL that the commands then use."
)


class Command(click.Command):
    """A command that also takes --dsn after its name (pgslots migrate --dsn ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--dsn"], metavar="DSN", expose_value=False, callback=_take_dsn, help=DSN_HELP))


class Group(click.Group):
    """Turns every expected error into one line on stderr and exit status 1, never a traceback.
    Its commands (and those of its subgroups) take --dsn too."""

    command_class = Command
    group_class = type  # subgroups are Groups as well

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as asked
            click.echo(exc.ctx.get_help() if exc.ctx else self.get_help(click.Context(self)))
            sys.exit(0)
        except click.UsageError as exc:
            where = f"pgslots {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else "pgslots"
            fail(f"Error: {exc.format_message()} (see '{where} --help')")
        except click.ClickException as exc:
            fail(f"Error: {exc.format_message()}")
        except (click.Abort, KeyboardInterrupt):
            fail("Aborted.")
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except pgslots.PgSlotsError as exc:
            fail(str(exc))


class State:
    def __init__(self, dsn: str | None = None) -> None:
        self.dsn = dsn
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The client of the configured database; with nothing configured, of the embedded server
        when it is running (never started here)."""
        if self._client is None:
            dsn = configured_dsn(self.dsn)
            if dsn is None:
                dsn = embedded.running_dsn()
                if dsn is None:
                    raise pgslots.ConfigurationError(NOT_CONFIGURED)
            self._client = Client(dsn, listen=True)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_state = click.make_pass_decorator(State)


def output_options(func: F) -> F:
    return click.option("-o", "--output", metavar="FORMAT", help="Print machine-readable output; 'json' is the only format.")(func)


def check_output(output: str | None) -> bool:
    if output is None:
        return False
    if output.lower() != "json":
        fail("Only 'json' output format is supported.")
    return True


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--dsn", metavar="DSN", help=DSN_HELP)
@click.version_option(package_name="pgslots")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None) -> None:
    """Global concurrency limits and rate limits that live in PostgreSQL.

    A limit is a named pool of slots shared by every process on every machine that uses the same
    database. Start with 'pgslots migrate', then 'pgslots create NAME --limit N'.
    """
    state = State(dsn)
    ctx.obj = state
    ctx.call_on_close(state.close)
