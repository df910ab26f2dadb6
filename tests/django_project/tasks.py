from __future__ import annotations

import os
import time

from django_tasks import task

from pgslots.django import limited


@task()
@limited(concurrency="tenant:{tenant_id}")
def build_report(tenant_id: str, n: int) -> int:
    started = time.time()
    time.sleep(0.05)
    with open(os.environ["INTERVALS"], "a", encoding="utf-8") as log:
        log.write(f"{tenant_id} {n} {started:.6f} {time.time():.6f}\n")
    return n
