"""``manage.py pgslots ...``: the pgslots command line on the database of the ``PGSLOTS`` setting
(``manage.py pgslots migrate``, ``manage.py pgslots apply limits.toml``, ``manage.py pgslots ls``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pgslots.django import settings_dsn


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Runs a pgslots command on the database named by the PGSLOTS setting: migrate, apply FILE, ls, "
        "inspect NAME, pause NAME SECONDS, ... (manage.py pgslots --help lists them)."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        self._prog = f"{prog_name} {subcommand}"
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("args", nargs="*", metavar="ARG", help="the pgslots command and its arguments (--help for the list)")

    def run_from_argv(self, argv: list[str]) -> None:
        # Every argument after `manage.py pgslots` is the pgslots command line's, --help included.
        self._prog = f"{argv[0]} {argv[1]}"
        self.execute(*argv[2:], no_color=False, force_color=False, skip_checks=True, stdout=None, stderr=None)

    def handle(self, *args: str, **options: Any) -> None:
        from pgslots_cli.app import cli

        dsn = settings_dsn()
        command = list(args)
        if dsn is not None:
            command = ["--dsn", dsn, *command]
        try:
            cli.main(args=command, prog_name=getattr(self, "_prog", "manage.py pgslots"))
        except SystemExit as done:  # the command line always ends this way; errors are printed already
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if code:
                what = args[0] if args else "pgslots"
                raise CommandError(f"pgslots {what} failed (exit status {code}): see the message above.", returncode=code) from None
