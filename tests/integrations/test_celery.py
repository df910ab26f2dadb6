"""pgslots.celery with real Celery worker processes (prefork, 4 of them) and a real Redis broker,
both started here on loopback: an independent record of each task body's start and end shows no more
bodies at once than the limit, every task finishes, tasks that found their limit full were retried
rather than holding a worker, a task that raised gave its slot back, and a worker process killed
while it held a slot does not keep it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgslots
import pgslots.sync
from servers import HERE, redis_server


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


@pytest.fixture
def celery_env(fresh_dsn: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.settings SET liveness_seconds = 2")
    with redis_server(tmp_path) as broker:
        env = {**os.environ, "PGSLOTS_DSN": fresh_dsn, "BROKER_URL": broker, "INTERVALS": str(tmp_path / "intervals")}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork", "--concurrency", "4"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
        worker = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        saved = {k: os.environ.get(k) for k in ("BROKER_URL", "INTERVALS")}
        os.environ.update(BROKER_URL=broker, INTERVALS=env["INTERVALS"])
        sys.path.insert(0, str(HERE))
        sys.modules.pop("celery_app", None)  # a new app for this test's broker
        try:
            import celery_app

            yield {"app": celery_app, "intervals": tmp_path / "intervals", "worker": worker}
        finally:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sys.path.remove(str(HERE))


def records(path: Path, kind: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.startswith(kind + " ")]


def test_workers_never_run_more_bodies_than_the_limit_and_every_task_finishes(client: pgslots.Client, celery_env: dict[str, Any]) -> None:
    client.create_limit("tenant:*", 2)
    tasks = celery_env["app"]
    results = [tasks.work.delay("acme", n) for n in range(12)] + [tasks.work.delay("beta", n) for n in range(4)]
    failed = tasks.fail.delay("acme")
    assert sorted(r.get(timeout=90) for r in results) == sorted([*range(12), *range(4)])
    with pytest.raises(RuntimeError, match="failed on purpose"):
        failed.get(timeout=60)
    done = records(celery_env["intervals"], "work")
    for tenant, count in (("acme", 12), ("beta", 4)):
        spans = [(float(r[3]), float(r[4])) for r in done if r[1] == tenant]
        assert len(spans) == count
        assert most_at_once(spans) <= 2, spans
    assert most_at_once([(float(r[3]), float(r[4])) for r in done if r[1] == "acme"]) == 2  # the limit was used
    assert len({r[5] for r in done}) >= 2  # bodies ran in several worker processes

    acme = client.read_limit("tenant:acme")
    assert acme.refusals_total > 0  # tasks found it full and were retried instead of holding a worker
    assert acme.held_slots == 0  # returned, raised: every slot given back

    # A worker process killed while it holds a slot: the other tasks still finish, and the slot is
    # held by nobody once liveness_seconds (2 s here) have passed.
    killed = tasks.work.delay("acme", 99, die=True)
    killed.get(timeout=60, propagate=False)
    assert killed.state == "FAILURE"  # WorkerLostError
    after = [tasks.work.delay("acme", n) for n in range(100, 104)]
    assert sorted(r.get(timeout=60) for r in after) == list(range(100, 104))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        acme = client.read_limit("tenant:acme")
        if acme.held_slots == 0:
            break
        time.sleep(0.2)
    assert acme.held_slots == 0, acme


def test_a_revoked_task_that_is_terminated_gives_its_slot_back(client: pgslots.Client, celery_env: dict[str, Any]) -> None:
    client.create_limit("tenant:*", 1)
    tasks = celery_env["app"]
    held = tasks.hold.delay("gamma")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not client.read_limits(["tenant:gamma"]):
        time.sleep(0.1)
    while time.monotonic() < deadline and client.read_limit("tenant:gamma").held_slots < 1:
        time.sleep(0.1)
    assert client.read_limit("tenant:gamma").held_slots == 1
    tasks.app.control.revoke(held.id, terminate=True)
    after = tasks.work.delay("gamma", 7)  # needs the revoked task's slot
    assert after.get(timeout=30) == 7
    assert held.state == "REVOKED"


def test_a_rate_limited_task_is_retried_after_the_database_hint(client: pgslots.Client, celery_env: dict[str, Any]) -> None:
    client.create_limit("partner-api", 2, slot_decay_per_second=5, margin_seconds=0)
    tasks = celery_env["app"]
    started = time.time()
    results = [tasks.call_partner.delay(n) for n in range(10)]
    assert sorted(r.get(timeout=60) for r in results) == list(range(10))
    times = sorted(float(r[3]) for r in records(celery_env["intervals"], "call"))
    assert len(times) == 10
    # 2 at once, then 5 per second: the tenth call no sooner than 1.6 s after the first.
    assert times[-1] - times[0] >= 1.5
    # No more than the bucket allows in any second: at most 2 + 5 per 1 s window.
    assert all(sum(1 for t in times if a <= t < a + 1.0) <= 7 for a in times)
    assert times[0] >= started - 1


def test_a_name_that_does_not_match_the_task_arguments_is_an_error_at_declaration(client: pgslots.Client) -> None:
    from pgslots.celery import limited

    def task(tenant_id: str) -> None: ...

    with pytest.raises(pgslots.InvalidArgumentError, match=r"names \{tenant\}, but .*task\(\) has no parameter 'tenant'"):
        limited(concurrency="tenant:{tenant}")(task)
    with pytest.raises(pgslots.InvalidArgumentError, match="not positions"):
        limited(concurrency="tenant:{0}")(task)
    with pytest.raises(pgslots.InvalidArgumentError, match="at least one limit"):
        limited()(task)
    with pytest.raises(pgslots.InvalidArgumentError):
        limited(concurrency="a/b")(task)
    # Called outside a worker, the function runs under its limits; a full limit raises the timeout.
    client.create_limit("one", 1)

    def five() -> int:
        return 5

    guarded = limited(concurrency="one", wait_seconds=0)(five)
    assert guarded() == 5
    with pgslots.sync.concurrency("one"), pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError) as refused:
        guarded()
    assert refused.value.retry_after is not None
