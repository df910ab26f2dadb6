"""``manage.py pgslots ...``: the pgslots command line on the database of the ``PGSLOTS`` setting
(``manage.py pgslots migrate``, ``manage.py pgslots apply limits.toml``, ``manage.py pgslots ls``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pgslots.django import settings_dsn


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Runs a pgslots command on the database named by the PGSLOTS setting: migrate, apply FILE, ls, "
        "inspect NAME, pause NAME SECONDS, ... (manage.py pgslots --help lists them)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        # Everything after the command's name is the command line's own (its options included).
        parser.add_argument(
            "args", nargs=argparse.REMAINDER, metavar="ARG", help="the pgslots command and its arguments (--help for the list)"
        )

    def run_from_argv(self, argv: list[str]) -> None:
        # From the shell, every argument after `manage.py pgslots` is the command line's (--help
        # included), and it exits as pgslots does: its message on stderr, status 1, no traceback.
        self._cli(argv[2:], f"{os.path.basename(argv[0])} {argv[1]}")

    def handle(self, *args: str, **options: Any) -> None:
        # From call_command(): a failure is a CommandError (the command line printed the reason).
        try:
            self._cli(list(args), "manage.py pgslots")
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if code:
                what = args[0] if args else "pgslots"
                raise CommandError(f"pgslots {what} failed (exit status {code}): see the message above.", returncode=code) from None

    @staticmethod
    def _cli(args: list[str], prog_name: str) -> None:
        from pgslots_cli.main import cli

        dsn = settings_dsn()
        cli.main(args=args if dsn is None else ["--dsn", dsn, *args], prog_name=prog_name)
