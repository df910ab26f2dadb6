"""The `pgslots` command line, through Click's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clihelp import one_line_error, run
from pgslots.client import Client
from pgslots.sync import concurrency
from pgslots_cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def test_create_ls_inspect(fresh_dsn: str) -> None:
    result = run(fresh_dsn, "create", "api", "-l", "3", "--slot-decay-per-second", "0.5")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Created global concurrency limit with name 'api' and ID '")
    listed = run(fresh_dsn, "ls")
    assert "api" in listed.output and "NAME" in listed.output
    data = json.loads(run(fresh_dsn, "ls", "-o", "json").output)
    assert data[0]["name"] == "api" and data[0]["limit"] == 3 and data[0]["slot_decay_per_second"] == 0.5
    assert data[0]["created"].endswith("+00:00")
    shown = json.loads(run(fresh_dsn, "inspect", "api", "--output", "json").output)
    assert shown["id"] == data[0]["id"]
    human = run(fresh_dsn, "inspect", "api").output
    assert "rate limit: bursts of 3, then 0.5 per second" in human
    # Each field once, and only those that say something about this limit (-o json has them all).
    fields = [line.split("  ")[0] for line in human.splitlines()[2:]]
    assert len(fields) == len(set(fields)) <= 15, fields
    assert "margin" in fields  # a rate limit's margin (a concurrency limit has none to show)
    assert not {"window_seconds", "instances", "max_keys", "shadow_refusals", "waiter_priorities"} & set(fields)


def test_ls_names_overrides_keeps_ids_whole_and_suggests_a_template(fresh_dsn: str) -> None:
    for args in (["tenant:*", "-l", "2"], ["tenant:acme", "-l", "9"], ["x" * 120, "-l", "1"]):
        assert run(fresh_dsn, "create", *args).exit_code == 0
    listed = run(fresh_dsn, "ls").output  # not a terminal: nothing is cut
    assert "tenant:acme (override of tenant:*)" in listed
    ids = {str(i.id) for i in Client(fresh_dsn).read_limits()}
    assert all(i in listed for i in ids) and "…" not in listed
    assert one_line_error(run(fresh_dsn, "ls", "tenant")) == (
        "Global concurrency limit 'tenant' not found. Did you mean \"pgslots ls 'tenant:*'\"?"
    )
    assert one_line_error(run(fresh_dsn, "ls", "tenant:acme")).endswith("Run 'pgslots ls' to see the templates.")


def test_suggested_commands_quote_names_for_the_shell(fresh_dsn: str) -> None:
    out = run(fresh_dsn, "create", "my limit", "-l", "1").output
    assert out.splitlines()[-1] == "Run \"pgslots inspect 'my limit'\" to view details."
    assert run(fresh_dsn, "create", "plain", "-l", "1").output.splitlines()[-1] == "Run 'pgslots inspect plain' to view details."


def test_empty_ls(fresh_dsn: str) -> None:
    assert run(fresh_dsn, "ls").output.strip() == "No global concurrency limits found."
    assert json.loads(run(fresh_dsn, "ls", "-o", "json").output) == []


def test_inspect_to_file(fresh_dsn: str, tmp_path: Path) -> None:
    run(fresh_dsn, "create", "f", "-l", "1")
    target = tmp_path / "f.json"
    result = run(fresh_dsn, "inspect", "f", "-o", "json", "-f", str(target))
    assert result.exit_code == 0 and json.loads(target.read_text())["name"] == "f"
    assert one_line_error(run(fresh_dsn, "inspect", "f", "-f", str(target))) == (
        "The --file/-f option requires the --output option to be set."
    )
    assert one_line_error(run(fresh_dsn, "inspect", "f", "-o", "yaml")) == "Only 'json' output format is supported."


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["create", "a/b", "-l", "1"], "forbidden character"),
        (["create", "neg", "-l", "-1"], "not in the range"),
        (["create", "nan", "-l", "1", "--slot-decay-per-second", "nan"], "finite number"),
        (["create", "inf", "-l", "1", "--slot-decay-per-second", "inf"], "finite number"),
        (["create", "noflag"], "Missing option '-l' / '--limit'"),
        (["inspect", "ghost"], "Global concurrency limit 'ghost' not found."),
        (["update", "ghost", "-l", "2"], "Global concurrency limit 'ghost' not found."),
        (["delete", "ghost", "--yes"], "Global concurrency limit 'ghost' not found."),
        (["enable", "ghost"], "Global concurrency limit 'ghost' not found."),
        (["leases", "ghost"], "Global concurrency limit 'ghost' not found."),
        (["release", "not-a-uuid"], "is not a lease id"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(fresh_dsn: str, args: list[str], expected: str) -> None:
    before = run(fresh_dsn, "ls", "-o", "json").output
    assert expected in one_line_error(run(fresh_dsn, *args))
    assert run(fresh_dsn, "ls", "-o", "json").output == before


def test_duplicate(fresh_dsn: str) -> None:
    run(fresh_dsn, "create", "dup", "-l", "1")
    assert one_line_error(run(fresh_dsn, "create", "dup", "-l", "5")) == "Global concurrency limit 'dup' already exists."


def test_update(fresh_dsn: str) -> None:
    run(fresh_dsn, "create", "u", "-l", "1")
    assert one_line_error(run(fresh_dsn, "update", "u")) == "No update arguments provided."
    assert one_line_error(run(fresh_dsn, "update", "u", "--enable", "--disable")) == (
        "Cannot enable and disable a global concurrency limit at the same time."
    )
    result = run(fresh_dsn, "update", "u", "-l", "4", "--slot-decay-per-second", "2", "--disable")
    assert result.output.strip() == "Updated global concurrency limit with name 'u'."
    data = json.loads(run(fresh_dsn, "inspect", "u", "-o", "json").output)
    assert (data["limit"], data["slot_decay_per_second"], data["active"]) == (4, 2.0, False)
    run(fresh_dsn, "update", "u", "--active-slots", "3")
    assert json.loads(run(fresh_dsn, "inspect", "u", "-o", "json").output)["active_slots"] <= 3


def test_enable_disable(fresh_dsn: str) -> None:
    run(fresh_dsn, "create", "t", "-l", "1")
    assert one_line_error(run(fresh_dsn, "enable", "t")) == "Global concurrency limit with name 't' is already enabled."
    assert run(fresh_dsn, "disable", "t").output.strip() == "Disabled global concurrency limit with name 't'."
    assert one_line_error(run(fresh_dsn, "disable", "t")) == "Global concurrency limit with name 't' is already disabled."
    assert run(fresh_dsn, "enable", "t").output.strip() == "Enabled global concurrency limit with name 't'."
    run(fresh_dsn, "create", "off", "-l", "1", "--disable")
    assert json.loads(run(fresh_dsn, "inspect", "off", "-o", "json").output)["active"] is False


def test_delete_confirms(fresh_dsn: str) -> None:
    run(fresh_dsn, "create", "d", "-l", "1")
    declined = run(fresh_dsn, "delete", "d", input="n\n")
    assert declined.exit_code == 1 and declined.output.strip().endswith("Deletion aborted.")
    assert run(fresh_dsn, "inspect", "d").exit_code == 0
    accepted = run(fresh_dsn, "delete", "d", input="y\n")
    assert accepted.exit_code == 0 and "Deleted global concurrency limit with name 'd'." in accepted.output
    run(fresh_dsn, "create", "d2", "-l", "1")
    assert run(fresh_dsn, "delete", "d2", "--yes").exit_code == 0


def test_leases_release_sweep_watch(fresh_dsn: str) -> None:
    client = Client(fresh_dsn)
    client.create_limit("held", 2)
    try:
        with concurrency("held", client=client, holder={"type": "job", "id": "9"}) as lease:
            assert lease is not None
            table = run(fresh_dsn, "leases")
            assert str(lease.lease_id) in table.output and "held" in table.output
            listed = json.loads(run(fresh_dsn, "leases", "held", "-o", "json").output)
            assert listed[0]["lease_id"] == str(lease.lease_id) and listed[0]["holder"]["id"] == "9"
            frame = run(fresh_dsn, "watch", "--once")
            assert "held" in frame.output and "1/2" in frame.output and f"pid {os.getpid()}" in frame.output
            released = run(fresh_dsn, "release", str(lease.lease_id))
            assert released.output.strip() == f"Released lease '{lease.lease_id}'."
            again = run(fresh_dsn, "release", str(lease.lease_id))
            assert again.exit_code == 0 and "nothing changed" in again.output
        assert run(fresh_dsn, "leases").output.strip() == "No leases held."
        assert run(fresh_dsn, "sweep").output.strip() == "Reclaimed 0 expired or dead leases."
    finally:
        client.close()


def test_migrate_reports_up_to_date(fresh_dsn: str, empty_dsn: str) -> None:
    assert "up to date" in run(fresh_dsn, "migrate").output
    message = one_line_error(run(empty_dsn, "ls"))
    assert "pgslots migrate" in message
    assert "Applied migrations" in run(empty_dsn, "migrate").output
    assert run(empty_dsn, "ls").exit_code == 0


def test_migrate_check_and_dry_run_change_nothing(empty_dsn: str) -> None:
    """--check exits 1 naming what is pending, --dry-run prints the SQL; neither installs anything.
    --dsn is taken after the command name as well as before it."""
    cli_after = CliRunner().invoke(cli, ["migrate", "--check", "--dsn", empty_dsn], catch_exceptions=False)
    message = one_line_error(cli_after)
    assert "behind" in message and "0001_initial" in message and "pgslots migrate" in message
    script = CliRunner().invoke(cli, ["migrate", "--dry-run", "--dsn", empty_dsn], catch_exceptions=False)
    assert script.exit_code == 0
    assert "CREATE TABLE pgslots.limits" in script.output and "CREATE FUNCTION pgslots.acquire" in script.output
    assert "pgslots migrate" in one_line_error(run(empty_dsn, "ls"))  # still not installed
    assert "Applied migrations" in CliRunner().invoke(cli, ["migrate", "--dsn", empty_dsn]).output
    checked = CliRunner().invoke(cli, ["migrate", "--check", "--dsn", empty_dsn])
    assert checked.exit_code == 0 and "up to date" in checked.output


def test_dsn_after_any_command(fresh_dsn: str) -> None:
    assert CliRunner().invoke(cli, ["create", "late", "-l", "2", "--dsn", fresh_dsn]).exit_code == 0
    listed = CliRunner().invoke(cli, ["ls", "--dsn", fresh_dsn, "-o", "json"])
    assert listed.exit_code == 0 and "late" in listed.output


def test_unreachable_database() -> None:
    message = one_line_error(run("host=127.0.0.1 port=1 connect_timeout=2", "ls"))
    assert message.startswith("Cannot reach the database")


@pytest.mark.parametrize("dsn", ["host=x dbname", "postgresql://a b/db", "bogus words here"])
def test_a_malformed_dsn_is_named_as_such_not_blamed_on_the_database(dsn: str) -> None:
    message = one_line_error(run(dsn, "ls"))
    assert message.startswith("The connection string is malformed") and "postgresql://" in message, message
    assert "reach" not in message


def test_no_database_and_no_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGSLOTS_DSN", "DATABASE_URL", "PGHOST", "PGDATABASE", "PGPORT", "PGUSER", "PGSERVICE", "PGHOSTADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("pgslots.embedded.find_bindir", lambda: None)
    monkeypatch.setattr("pgslots.embedded._cached_dsn", None)
    result = CliRunner().invoke(cli, ["ls"], catch_exceptions=False)
    message = one_line_error(result)
    assert "No database configured" in message and "PGSLOTS_DSN" in message


APPLY = """
[api]
limit = 10

["nightly export"]
limit = 2
slot_decay_per_second = 0.5
active = false
"""


def test_apply_is_idempotent_and_prunes(fresh_dsn: str, tmp_path: Path) -> None:
    spec = tmp_path / "limits.toml"
    spec.write_text(APPLY)
    run(fresh_dsn, "create", "old", "-l", "1")
    dry = run(fresh_dsn, "apply", str(spec), "--prune", "--dry-run")
    assert "would create 'api'" in dry.output and "would delete 'old'" in dry.output and "Nothing was changed" in dry.output
    assert [x["name"] for x in json.loads(run(fresh_dsn, "ls", "-o", "json").output)] == ["old"]
    first = run(fresh_dsn, "apply", str(spec))
    assert first.exit_code == 0 and "create 'api'" in first.output and "2 created" in first.output
    second = run(fresh_dsn, "apply", str(spec))
    assert second.output.strip().startswith("Nothing to do")
    spec.write_text(APPLY.replace("limit = 10", "limit = 12"))
    third = run(fresh_dsn, "apply", str(spec), "--prune")
    assert "change 'api': limit 10 -> 12" in third.output and "delete 'old'" in third.output
    names = sorted(x["name"] for x in json.loads(run(fresh_dsn, "ls", "-o", "json").output))
    assert names == ["api", "nightly export"]
    export = json.loads(run(fresh_dsn, "inspect", "nightly export", "-o", "json").output)
    assert export["active"] is False and export["slot_decay_per_second"] == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[a]\nlimit = -1\n", "limit must be a whole number >= 0"),
        ("[a]\nlimit = 1\ncolor = 'red'\n", "unknown keys ['color']"),
        ("[a]\nlimit = 1\nslot_decay_per_second = nan\n", "finite number"),
        ("[a]\nlimit = 1\nactive = 'yes'\n", "active must be true or false"),
        ("[a\nlimit = 1\n", "is not valid TOML"),
        ("[ok]\nlimit = 1\n['b/ad']\nlimit = 1\n", "forbidden character"),
    ],
)
def test_apply_rejects_bad_files_and_changes_nothing(fresh_dsn: str, tmp_path: Path, text: str, expected: str) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert expected in one_line_error(run(fresh_dsn, "apply", str(spec)))
    assert json.loads(run(fresh_dsn, "ls", "-o", "json").output) == []


def test_help_explains_every_flag() -> None:
    runner = CliRunner()
    for command, flags in {
        "create": ["--limit", "--slot-decay-per-second", "--window-seconds", "--active-slots", "--disable", "--shadow"],
        "update": ["--limit", "--active-slots", "--slot-decay-per-second", "--window-seconds", "--enable", "--disable", "--enforce"],
        "inspect": ["--output", "--file"],
        "apply": ["--prune", "--dry-run"],
        "watch": ["--once", "--interval"],
        "delete": ["--yes"],
    }.items():
        text = runner.invoke(cli, [command, "--help"]).output
        for flag in flags:
            assert flag in text, (command, flag)


def _installed_pgslots() -> str:
    script = Path(sys.executable).parent / "pgslots"
    assert script.exists(), "the pgslots command is not installed next to this Python"
    return str(script)


def test_real_subprocess(fresh_dsn: str) -> None:
    env = {**os.environ, "PGSLOTS_DSN": fresh_dsn}
    created = subprocess.run([_installed_pgslots(), "create", "sub", "-l", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    listed = subprocess.run([_installed_pgslots(), "ls", "-o", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(listed.stdout)[0]["name"] == "sub"
    bad = subprocess.run([_installed_pgslots(), "create", "sub", "-l", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "Global concurrency limit 'sub' already exists."
    assert "Traceback" not in bad.stderr


def test_the_embedded_server_runs_only_when_asked_from_a_clean_directory(pg_server: dict[str, Any]) -> None:
    """With nothing configured, commands fail with what to do, and start nothing; 'pgslots
    embedded start' starts the local server and prints the DSN to export; while it runs, commands
    use it; once stopped, they fail again, and its data is kept for the next start."""
    home = Path(tempfile.mkdtemp(prefix="pgslots-home-"))
    home.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in ("DATABASE_URL",)}
    env["PGSLOTS_HOME"] = str(home)
    if pg_server["cluster"] is not None:
        env["PG_BINDIR"] = str(pg_server["cluster"].bindir)

    def pgslots(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_installed_pgslots(), *args], env=env, capture_output=True, text=True, timeout=120)

    def refused(result: subprocess.CompletedProcess[str]) -> bool:
        message = result.stderr.strip()
        return (
            result.returncode == 1 and "No database configured" in message and "pgslots embedded start" in message and "\n" not in message
        )

    try:
        assert refused(pgslots("ls"))
        assert "not created yet" in pgslots("embedded", "status").stdout  # the failed command started nothing
        started = pgslots("embedded", "start")
        assert started.returncode == 0 and "Started the embedded PostgreSQL" in started.stdout
        assert f"export PGSLOTS_DSN='host={home}" in started.stdout and "pgslots embedded stop" in started.stdout
        assert "Already running" in pgslots("embedded", "start").stdout
        assert "Applied migrations" in pgslots("migrate").stdout
        assert pgslots("create", "local", "-l", "1").returncode == 0
        status = pgslots("embedded", "status").stdout
        assert "running" in status and str(home) in status
        assert pgslots("embedded", "dsn").stdout.startswith(f"host={home}")
        assert "Stopped" in pgslots("embedded", "stop").stdout
        assert refused(pgslots("ls"))  # not started again behind the user's back
        assert pgslots("embedded", "start").returncode == 0
        assert json.loads(pgslots("ls", "-o", "json").stdout)[0]["name"] == "local"  # its data kept
    finally:
        pgslots("embedded", "stop")
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def test_watch_ends_cleanly_on_ctrl_c(fresh_dsn: str) -> None:
    import signal
    import time

    env = {**os.environ, "PGSLOTS_DSN": fresh_dsn}
    proc = subprocess.Popen(
        [_installed_pgslots(), "watch", "-n", "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "pgslots watch" in out


def test_templates_in_create_ls_inspect_watch_and_apply(fresh_dsn: str, tmp_path: Path) -> None:
    created = run(fresh_dsn, "create", "tenant:*", "-l", "2")
    assert created.exit_code == 0 and created.output.startswith("Created template 'tenant:*'"), created.output
    assert "'tenant:example' gets 2 slot(s)" in created.output
    assert """Run "pgslots ls 'tenant:*'" to list its keys in use.""" in created.output
    assert "needs a prefix" in one_line_error(run(fresh_dsn, "create", "*", "-l", "1"))
    client = Client(fresh_dsn)
    try:
        with concurrency("tenant:acme", client=client), concurrency("tenant:beta", occupy=2, client=client):
            listed = run(fresh_dsn, "ls").output
            header, row = listed.splitlines()[0], next(line for line in listed.splitlines() if line.startswith("tenant:*"))
            assert "INSTANCES" in header and row.split()[-2] == "2", listed
            assert row.split()[2] == "3", "a template's slots in use: its keys', summed"
            assert "tenant:acme" not in listed, "ls lists templates, not every key"
            keys = run(fresh_dsn, "ls", "tenant:*").output
            assert "tenant:acme" in keys and "tenant:beta" in keys and "tenant:*" not in keys
            as_json = json.loads(run(fresh_dsn, "ls", "tenant:*", "-o", "json").output)
            assert [(k["name"], k["template"], k["active_slots"]) for k in as_json] == [
                ("tenant:beta", "tenant:*", 2),  # the busiest first
                ("tenant:acme", "tenant:*", 1),
            ]
            one = run(fresh_dsn, "ls", "tenant:*", "--keys", "1").output
            assert "tenant:beta" in one and "tenant:acme" not in one and "The 1 busiest of 2 keys" in one
            shown = json.loads(run(fresh_dsn, "inspect", "tenant:*", "-o", "json").output)
            assert shown["is_template"] is True and shown["instances"] == 2
            frame = run(fresh_dsn, "watch", "--once").output
            assert "template: 2 per key, 2 key(s) in use" in frame
            assert frame.index("tenant:beta") < frame.index("tenant:acme"), "busiest key first"
            assert "is not a template" in one_line_error(run(fresh_dsn, "ls", "tenant:acme"))
            key_update = one_line_error(run(fresh_dsn, "update", "tenant:acme", "-l", "5"))
            assert "follows the template" in key_update
            override = run(fresh_dsn, "create", "tenant:acme", "-l", "5")
            assert "now has a limit of its own (an override)" in override.output, override.output
    finally:
        client.close()
    spec = tmp_path / "limits.toml"
    spec.write_text('["tenant:*"]\nlimit = 3\n\n["tenant:acme"]\nlimit = 5\n\n["user:*"]\nlimit = 1\n')
    applied = run(fresh_dsn, "apply", str(spec), "--prune")
    assert applied.exit_code == 0, applied.output
    assert "change 'tenant:*': limit 2 -> 3" in applied.output and "create 'user:*'" in applied.output
    assert "0 deleted" in applied.output and "delete '" not in applied.output, "keys are never pruned"
    again = run(fresh_dsn, "apply", str(spec), "--prune")
    assert "Nothing to do" in again.output, again.output
    check = Client(fresh_dsn)
    try:
        assert check.read_limit("tenant:beta").limit == 3, "the key followed the template's change"
        assert check.read_limit("tenant:acme").template is None
    finally:
        check.close()
    deleted = run(fresh_dsn, "delete", "tenant:*", "--yes")
    assert "Deleted template 'tenant:*'; its 1 key(s) are removed once nobody holds them." in deleted.output, deleted.output


def test_windows_and_shadow_mode_in_create_update_ls_inspect_and_apply(fresh_dsn: str, tmp_path: Path) -> None:
    created = run(fresh_dsn, "create", "sms", "-l", "3", "--window-seconds", "60")
    assert created.exit_code == 0, created.output
    both = one_line_error(run(fresh_dsn, "create", "both", "-l", "3", "--window-seconds", "60", "--slot-decay-per-second", "1"))
    assert "not both" in both
    assert "must be a finite number" in one_line_error(run(fresh_dsn, "create", "w", "-l", "1", "--window-seconds", "inf"))
    shadow = run(fresh_dsn, "create", "trial", "-l", "1", "--shadow")
    assert "shadow mode" in shadow.output and "pgslots update trial --enforce" in shadow.output, shadow.output
    client = Client(fresh_dsn)
    try:
        with concurrency("trial", client=client), concurrency("trial", client=client):
            pass
    finally:
        client.close()
    listed = run(fresh_dsn, "ls").output
    sms = next(line for line in listed.splitlines() if line.startswith("sms"))
    trial = next(line for line in listed.splitlines() if line.startswith("trial"))
    assert "RATE" in listed.splitlines()[0] and "window 60s" in sms, listed
    assert " shadow " in trial, listed
    shown = json.loads(run(fresh_dsn, "inspect", "trial", "-o", "json").output)
    assert (shown["shadow"], shown["shadow_refusals"], shown["window_seconds"]) == (True, 1, 0)
    frame = run(fresh_dsn, "watch", "--once").output
    assert "(shadow: not enforced, 1 would-be refusal(s))" in frame and "per 60s window" in frame, frame
    enforced = run(fresh_dsn, "update", "trial", "--enforce")
    assert "enforced now" in enforced.output
    assert json.loads(run(fresh_dsn, "inspect", "trial", "-o", "json").output)["shadow"] is False
    mixed = one_line_error(run(fresh_dsn, "update", "sms", "--slot-decay-per-second", "2"))
    assert "not both" in mixed and "in the same call" in mixed, mixed
    switched = run(fresh_dsn, "update", "sms", "--slot-decay-per-second", "2", "--window-seconds", "0")
    assert switched.exit_code == 0, switched.output
    spec = tmp_path / "limits.toml"
    spec.write_text('[sms]\nlimit = 3\nwindow_seconds = 60\n\n["new"]\nlimit = 5\nwindow_seconds = 1\nshadow = true\n')
    applied = run(fresh_dsn, "apply", str(spec))
    assert applied.exit_code == 0, applied.output
    assert "create 'new': limit 5, window_seconds 1, shadow" in applied.output, applied.output
    assert "change 'sms': slot_decay_per_second 2 -> 0, window_seconds 0 -> 60" in applied.output, applied.output
    assert "Nothing to do" in run(fresh_dsn, "apply", str(spec)).output
    spec.write_text("[bad]\nlimit = 3\nwindow_seconds = 60\nslot_decay_per_second = 1\n")
    assert "not both" in one_line_error(run(fresh_dsn, "apply", str(spec)))
    help_text = run(fresh_dsn, "create", "--help").output
    assert "--window-seconds" in help_text and "--shadow" in help_text
    assert "--shadow / --enforce" in run(fresh_dsn, "update", "--help").output


@pytest.mark.parametrize("args", [[], ["embedded"]])
def test_a_bare_group_prints_its_help(args: list[str]) -> None:
    result = subprocess.run([_installed_pgslots(), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"Usage: pgslots {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in result.stdout and "\\x0a" not in result.stdout


def test_the_demo_starts_its_own_server_says_where_and_its_lines_agree(pg_server: dict[str, Any]) -> None:
    """README's first command, with nothing configured: the demo starts the embedded server and
    prints its data directory, the DSN to export and how to stop it; the 'ui' command it prints
    runs as printed; the last progress line agrees with the totals."""
    home = Path(tempfile.mkdtemp(prefix="pgslots-demo-"))
    home.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in ("DATABASE_URL",)}
    env["PGSLOTS_HOME"] = str(home)
    env["PATH"] = "/usr/bin:/bin"  # pgslots itself is not on PATH, as after a plain venv install
    if pg_server["cluster"] is not None:
        env["PG_BINDIR"] = str(pg_server["cluster"].bindir)
    exe = _installed_pgslots()
    try:
        done = subprocess.run([exe, "demo", "--workers", "4", "--rate", "20"], env=env, capture_output=True, text=True, timeout=180)
        out = done.stdout
        assert done.returncode == 0, done.stderr
        assert "No database configured: the demo uses the embedded PostgreSQL" in out
        assert f"data in {home}" in out and f"export PGSLOTS_DSN='host={home}" in out and "pgslots embedded stop" in out
        ui = re.search(r"run '(.+) ui' in another terminal", out)
        assert ui, out
        shown = subprocess.run([*shlex.split(ui.group(1)), "ui", "--help"], env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "Usage:" in shown.stdout, (ui.group(1), shown.stderr)
        assert "never more than the limit" in out
        last = [line for line in out.splitlines() if "bodies running" in line][-1]
        assert "0/3" in last and "bodies running 0" in last and "queued 0" in last and "done 24/24" in last, last
        assert "configured 20/s, achieved" in out and "Demo limits deleted." in out
        assert "Traceback" not in done.stderr
    finally:
        subprocess.run([exe, "embedded", "stop"], env=env, capture_output=True, text=True, timeout=60)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
