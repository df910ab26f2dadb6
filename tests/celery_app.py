"""A Celery app whose tasks run under pgslots.celery.limited, for the integration's tests: real
worker processes (prefork) and a real Redis broker, both started by the test. Each task body appends
its start and end times to the file INTERVALS, an independent record of how many ran at once."""

from __future__ import annotations

import os
import signal
import time

from celery import Celery

from pgslots.celery import limited

app = Celery("pgslots_test", broker=os.environ["BROKER_URL"], backend=os.environ["BROKER_URL"])
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
INTERVALS = os.environ["INTERVALS"]


def _record(kind: str, key: str, n: int, started: float) -> None:
    with open(INTERVALS, "a", encoding="utf-8") as log:
        log.write(f"{kind} {key} {n} {started:.6f} {time.time():.6f} {os.getpid()}\n")


@app.task(max_retries=None)  # type: ignore[untyped-decorator]
@limited(concurrency="tenant:{tenant}", wait_seconds=0.2)
def work(tenant: str, n: int, die: bool = False) -> int:
    started = time.time()
    if die:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process is lost while it holds a slot
    time.sleep(0.4)  # longer than a task waits for its slot (0.2 s): tasks behind it are retried
    _record("work", tenant, n, started)
    return n


@app.task(max_retries=None)  # type: ignore[untyped-decorator]
@limited(rate_limit="partner-api", wait_seconds=0.05)
def call_partner(n: int) -> int:
    _record("call", "partner", n, time.time())
    return n


@app.task(max_retries=None)  # type: ignore[untyped-decorator]
@limited(concurrency="tenant:{tenant}", wait_seconds=0.2)
def fail(tenant: str) -> None:
    raise RuntimeError(f"task for {tenant} failed on purpose")


@app.task(max_retries=None)  # type: ignore[untyped-decorator]
@limited(concurrency="tenant:{tenant}", wait_seconds=0.2)
def hold(tenant: str) -> None:
    time.sleep(30)  # until revoked
