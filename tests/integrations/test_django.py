"""pgslots.django with Django itself: the connection from settings, views under limit_view answered
through Django's test client, a task of Django's tasks framework under limited (run from several
threads, with an independent record of the bodies), and manage.py pgslots, in-process and as the
real manage.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pgslots
import pgslots.client
from servers import HERE

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

import django  # noqa: E402

django.setup()

from django.core.management import CommandError, call_command  # noqa: E402
from django.test import Client as DjangoClient  # noqa: E402
from django.test import override_settings  # noqa: E402

from pgslots.django import configure_from_settings, limited, settings_dsn  # noqa: E402


@pytest.fixture
def django_db(fresh_dsn: str) -> Iterator[pgslots.Client]:
    with override_settings(PGSLOTS={"DSN": fresh_dsn}):
        client = configure_from_settings()
        assert client is not None
        try:
            yield client
        finally:
            client.close()
            pgslots.client._default = None


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_the_connection_comes_from_settings(fresh_dsn: str) -> None:
    with override_settings(PGSLOTS={"DSN": fresh_dsn}):
        assert settings_dsn() == fresh_dsn
    info = psycopg.conninfo.conninfo_to_dict(fresh_dsn)
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": info["dbname"], "USER": info.get("user"), "HOST": info.get("host")}
    database["PORT"] = info.get("port")
    with override_settings(DATABASES={"default": database}, PGSLOTS={}):
        dsn = settings_dsn()
        assert dsn is not None
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (info["dbname"],)
    for bad, message in (
        ({"DSN": fresh_dsn, "DATABASE": "default"}, "both DSN and DATABASE"),
        ({"DNS": fresh_dsn}, "unknown keys"),
        ({"DATABASE": "other"}, "DATABASES does not have"),
        ({"DATABASE": "default"}, "not a PostgreSQL database"),
        ({"DSN": ""}, "must be a connection string"),
    ):
        with override_settings(PGSLOTS=bad), pytest.raises(pgslots.ConfigurationError, match=message):
            settings_dsn()
    with override_settings(PGSLOTS={}):
        assert settings_dsn() is None  # sqlite by default: pgslots reads PGSLOTS_DSN and the environment


def test_views_answer_429_with_retry_after_and_400_for_a_bad_key(django_db: pgslots.Client) -> None:
    django_db.create_limit("tenant:*", 2, slot_decay_per_second=1, margin_seconds=0)
    http = DjangoClient()
    codes = [http.get("/search", headers={"X-Tenant": "acme"}).status_code for _ in range(2)]
    refused = http.get("/search", headers={"X-Tenant": "acme"})
    assert codes == [200, 200]
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"
    assert refused["RateLimit-Policy"] == '"tenant:*";q=2;w=2'
    assert refused["RateLimit"] == '"tenant:*";r=0;t=1'
    assert http.get("/async-search", headers={"X-Tenant": "beta"}).status_code == 200
    assert http.get("/async-search", headers={"X-Tenant": "acme"}).status_code == 429
    for bad in ({}, {"X-Tenant": "a/b"}, {"X-Tenant": "x" * 300}):
        answer = http.get("/search", headers=bad)
        assert answer.status_code == 400
        assert "X-Tenant header is missing or is not a valid key" in answer.json()["detail"]


def test_a_concurrency_view_holds_its_slot_while_it_runs(django_db: pgslots.Client) -> None:
    django_db.create_limit("reports", 1)
    codes: list[int] = []

    def get() -> None:
        codes.append(DjangoClient().get("/report").status_code)

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(codes) == [200, 429, 429]
    assert django_db.read_limit("reports").leased_slots == 0


def test_a_django_task_runs_under_its_limits(django_db: pgslots.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from django_project.tasks import build_report

    django_db.create_limit("tenant:*", 1)
    monkeypatch.setenv("INTERVALS", str(tmp_path / "intervals"))
    results: list[int] = []

    def enqueue(n: int) -> None:
        value = build_report.enqueue("acme", n).return_value
        assert isinstance(value, int)
        results.append(value)

    threads = [threading.Thread(target=enqueue, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(6))
    spans = sorted((float(r.split()[2]), float(r.split()[3])) for r in (tmp_path / "intervals").read_text().splitlines())
    assert len(spans) == 6
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))  # one at a time
    assert django_db.read_limit("tenant:acme").grants_total == 6
    with pytest.raises(pgslots.InvalidArgumentError, match="has no parameter 'tenant'"):
        limited(concurrency="tenant:{tenant}")(lambda tenant_id: None)


def test_manage_py_pgslots_runs_the_command_line_on_the_settings_database(
    django_db: pgslots.Client, fresh_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = tmp_path / "limits.toml"
    limits.write_text('[api]\nlimit = 7\n\n["tenant:*"]\nlimit = 3\n', encoding="utf-8")
    with override_settings(PGSLOTS={"DSN": fresh_dsn}):
        call_command("pgslots", "migrate")
        call_command("pgslots", "apply", str(limits))
        assert django_db.read_limit("api").limit == 7
        call_command("pgslots", "ls")
        assert "tenant:*" in capsys.readouterr().out
        with pytest.raises(CommandError, match="pgslots inspect failed"):
            call_command("pgslots", "inspect", "nothing-here")
    assert "nothing-here" in capsys.readouterr().err
    env = {**os.environ, "PGSLOTS_DSN": fresh_dsn, "PYTHONPATH": str(HERE)}

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HERE / "manage.py"), "pgslots", *args], env=env, capture_output=True, text=True)

    done = manage("inspect", "api")
    assert done.returncode == 0, done.stderr
    assert "api" in done.stdout
    helped = manage("--help")
    assert helped.returncode == 0 and "apply" in helped.stdout and "manage.py pgslots" in helped.stdout
    failed = manage("inspect", "nope")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
