"""Running the `pgslots` command line in-process (Click's CliRunner) in tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from pgslots_cli.main import cli


def run(dsn: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--dsn", dsn, *args], input=input, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]
