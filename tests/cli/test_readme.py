"""The README's and the documentation's code blocks run as written, in order, one fresh database
per page: Python blocks in a subprocess, SQL blocks on a connection, TOML blocks applied with
`pgslots apply`, and in shell blocks every `pgslots` command line (but `demo`, `ui` and `watch`,
which run until stopped: the demo has a test of its own). Installing and the test command itself
are what CI runs. `diff`, `yaml` and `text` blocks are configuration to copy or output to expect, not code to run; a
pg_cron schedule runs the command it schedules."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import psycopg
import pytest

from clihelp import run

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
RUNNABLE = {"python", "sql", "toml", "bash"}
LONG_RUNNING = {"demo", "ui", "watch"}


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(page.read_text(encoding="utf-8"))]


def test_every_code_block_is_of_a_kind_this_test_runs_or_configuration() -> None:
    kinds = {lang for page in PAGES for lang, _ in blocks(page)}
    assert kinds <= RUNNABLE | {"diff", "yaml", "text"}, kinds - RUNNABLE
    assert sum(lang == "python" for lang, _ in blocks(README)) == 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_blocks_of_a_page_run_as_written(page: Path, fresh_dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "PGSLOTS_DSN": fresh_dsn}
    ran = 0
    for lang, body in blocks(page):
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, f"{page.name}:\n{body}\n{done.stderr}"
        elif lang == "sql":
            scheduled = re.search(r"cron\.schedule\('[^']*', '[^']*', '(.*)'\)", body)
            with psycopg.connect(fresh_dsn, autocommit=True) as conn:
                conn.execute(scheduled.group(1) if scheduled else body)
        elif lang == "toml":
            tomllib.loads(body)
            (tmp_path / "limits.toml").write_text(body, encoding="utf-8")
            result = run(fresh_dsn, "apply", str(tmp_path / "limits.toml"))
            assert result.exit_code == 0, f"{page.name}:\n{body}\n{result.output}"
        elif lang == "bash":
            for line in body.splitlines():
                words = shlex.split(line, comments=True)
                if not words or Path(words[0]).name != "pgslots" or words[1] in LONG_RUNNING:
                    continue
                args = [str(tmp_path / w) if w == "limits.toml" else w for w in words[1:]]
                result = run(fresh_dsn, *args)
                assert result.exit_code == 0, f"{page.name}: {line}\n{result.output}"
        else:
            continue
        ran += 1
    assert ran or not any(lang in RUNNABLE for lang, _ in blocks(page))


def test_the_license_file_is_the_one_the_package_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert declared["license"] == "Apache-2.0" and declared["license-files"] == ["LICENSE"]
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
