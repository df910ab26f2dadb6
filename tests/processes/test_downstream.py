"""A strict downstream accepts what pgslots admits: several processes saturate a pgslots limit and
send each admitted request to a service on loopback that enforces the same rate on its own clock
(nginx's limit_req for a token bucket, a sliding-window server for a window limit). With the default
margin_seconds, the downstream refuses none of them, and pgslots still admits at least 90% of the
configured rate."""

from __future__ import annotations

import http.client
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pgslots
from pgslots.client import Client
from pgslots.types import DEFAULT_MARGIN_SECONDS
from strict_downstream import nginx_bucket, sliding_window

PROCESSES = 4
SECONDS = 4.0


def _caller(dsn: str, name: str, url: str, deadline: float, out: Any) -> None:
    """Takes a slot of `name` (waiting as long as it must), then sends one request; until the deadline."""
    from pgslots.sync import rate_limit

    pgslots.configure(dsn)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    sent: list[tuple[float, int]] = []
    while True:
        rate_limit(name, timeout_seconds=30)
        now = time.time()
        if now >= deadline:
            break
        conn.request("GET", parts.path)
        response = conn.getresponse()
        response.read()
        sent.append((now, response.status))
    conn.close()
    out.put(sent)


def _saturate(dsn: str, name: str, url: str) -> list[tuple[float, int]]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=_caller, args=(dsn, name, url, deadline, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return sorted(s for r in results for s in r)


def _steady_rate(sent: list[tuple[float, int]], burst: int) -> float:
    """A bucket's requests per second after its first burst, on the callers' clock."""
    times = [t for t, _ in sent[burst:]]
    return (len(times) - 1) / (times[-1] - times[0])


def _window_rate(sent: list[tuple[float, int]], limit: int) -> float:
    """A saturated window limit grants in bursts of `limit`: requests per second from the first
    burst's start to the last whole burst's start."""
    times = [t for t, _ in sent]
    last = (len(times) // limit - 1) * limit
    return last / (times[last] - times[0])


def test_nginx_limit_req_refuses_nothing_a_bucket_admitted(fresh_dsn: str, tmp_path: Path) -> None:
    rate, limit = 20, 10
    client = Client(fresh_dsn)
    info = client.create_limit("upstream", limit, slot_decay_per_second=rate)
    client.close()
    assert info.margin_seconds == DEFAULT_MARGIN_SECONDS
    with nginx_bucket(tmp_path, rate, burst=limit - 1) as url:
        sent = _saturate(fresh_dsn, "upstream", url)
    refused = [t for t, status in sent if status != 200]
    assert refused == [], f"nginx refused {len(refused)} of {len(sent)} requests pgslots admitted"
    achieved = _steady_rate(sent, limit)
    assert achieved >= 0.9 * rate, f"{achieved:.2f}/s admitted, configured {rate}/s"


def test_a_sliding_window_server_refuses_nothing_a_window_limit_admitted(fresh_dsn: str) -> None:
    limit, window = 20, 1.0
    client = Client(fresh_dsn)
    client.create_limit("per-second", limit, window_seconds=window)
    client.close()
    with sliding_window(limit, window) as url:
        sent = _saturate(fresh_dsn, "per-second", url)
    refused = [t for t, status in sent if status != 200]
    assert refused == [], f"the window server refused {len(refused)} of {len(sent)} requests pgslots admitted"
    achieved = _window_rate(sent, limit)
    assert achieved >= 0.9 * limit / window, f"{achieved:.2f}/s admitted, configured {limit / window:g}/s"
