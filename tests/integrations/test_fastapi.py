"""pgslots.fastapi in a real FastAPI app served by uvicorn in a subprocess, answering real HTTP
requests: keys from a header, a path parameter and the client's address; 429 with Retry-After and
the IETF RateLimit fields; 400 for a key that cannot name a limit; waiting up to a bound; a
concurrency limit on an expensive endpoint; bad declarations refused at import time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

import pgslots
from pgslots.fastapi import Concurrency, LimitMiddleware, RateLimit, header
from servers import uvicorn_app


@pytest.fixture
def app_url(client: pgslots.Client, fresh_dsn: str) -> Iterator[str]:
    client.create_limit("tenant:*", 3, slot_decay_per_second=1, margin_seconds=0)
    client.create_limit("user:*", 2, window_seconds=60, margin_seconds=0)
    client.create_limit("address:*", 2, slot_decay_per_second=0.5, margin_seconds=0)
    client.create_limit("patient", 1, slot_decay_per_second=2, margin_seconds=0)
    client.create_limit("reports", 2)
    with uvicorn_app("web_app:app", {"PGSLOTS_DSN": fresh_dsn}) as url:
        yield url


def test_a_tenant_over_its_rate_gets_429_with_retry_after_and_ratelimit_fields(app_url: str) -> None:
    with httpx.Client(base_url=app_url) as http:
        codes = [http.get("/search", headers={"X-Tenant": "acme"}).status_code for _ in range(3)]
        refused = http.get("/search", headers={"X-Tenant": "acme"})
        other = http.get("/search", headers={"X-Tenant": "beta"})
    assert codes == [200, 200, 200]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert refused.headers["RateLimit-Policy"] == '"tenant:*";q=3;w=3'
    assert refused.headers["RateLimit"] == f'"tenant:*";r=0;t={refused.headers["Retry-After"]}'
    assert "tenant:acme" in refused.json()["detail"]
    assert other.status_code == 200  # each tenant its own bucket


def test_keys_that_cannot_name_a_limit_get_400_and_never_reach_the_database(app_url: str, fresh_dsn: str) -> None:
    with httpx.Client(base_url=app_url) as http:
        missing = http.get("/search")
        slash = http.get("/search", headers={"X-Tenant": "a/b"})
        long = http.get("/search", headers={"X-Tenant": "x" * 201})
        escape = http.get("/search", headers={"X-Tenant": "\x1b[31mred"})
    for answer in (missing, slash, long, escape):
        assert answer.status_code == 400, answer.text
        assert "X-Tenant header is missing or is not a valid key" in answer.json()["detail"]
    with psycopg.connect(fresh_dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM pgslots.limits WHERE name LIKE 'tenant:%'")]
    assert names == ["tenant:*"]


def test_a_path_parameter_and_the_client_address_are_keys(app_url: str, client: pgslots.Client) -> None:
    with httpx.Client(base_url=app_url) as http:
        alice = [http.get("/users/alice/items").status_code for _ in range(3)]
        bob = http.get("/users/bob/items").status_code
        window = http.get("/users/alice/items")
        ping = [http.get("/mw/ping").status_code for _ in range(3)]
        free = [http.get("/free").status_code for _ in range(5)]
    assert alice == [200, 200, 429] and bob == 200
    assert window.headers["RateLimit-Policy"] == '"user:*";q=2;w=60'
    assert ping == [200, 200, 429]  # the middleware, keyed by 127.0.0.1, on /mw/ only
    assert free == [200] * 5
    assert {k.name for k in client.read_instances("address:*")} == {"address:127.0.0.1"}


def test_a_request_may_wait_for_its_slot_up_to_a_bound(app_url: str) -> None:
    with httpx.Client(base_url=app_url, timeout=10) as http:
        started = time.monotonic()
        codes = [http.get("/patient").status_code for _ in range(4)]
        elapsed = time.monotonic() - started
    assert codes == [200] * 4  # 2 per second, each waits up to 3 s
    assert elapsed >= 1.4


def test_a_concurrency_limit_on_an_expensive_endpoint(app_url: str, client: pgslots.Client) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=app_url, timeout=10) as http:
            answers = await asyncio.gather(*(http.get("/report") for _ in range(4)))
        return sorted(a.status_code for a in answers)

    assert asyncio.run(burst()) == [200, 200, 429, 429]
    # Released when each request ended: FastAPI runs a dependency's clean-up once the response has
    # been sent, so the releases may still be on their way as the answers arrive.
    deadline = time.monotonic() + 5
    while (info := client.read_limit("reports")).leased_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert info.leased_slots == 0 and info.grants_total == 2


def test_a_database_that_cannot_be_reached_answers_503_unless_failing_open(app_url: str) -> None:
    with httpx.Client(base_url=app_url, timeout=10) as http:
        shut = http.get("/dead/closed")
        through = http.get("/dead/open")
    assert shut.status_code == 503 and shut.headers["Retry-After"] == "1"
    assert "cannot be reached" in shut.json()["detail"]
    assert through.status_code == 200


def test_bad_declarations_are_refused_when_the_app_is_built() -> None:
    with pytest.raises(pgslots.InvalidArgumentError, match="must be a template"):
        RateLimit("tenant", key=header("X-Tenant"))
    with pytest.raises(pgslots.InvalidArgumentError, match="is a template"):
        RateLimit("tenant:*")
    with pytest.raises(pgslots.InvalidArgumentError, match="header"):
        header("")
    with pytest.raises(pgslots.InvalidArgumentError):
        Concurrency("reports", wait_seconds=-1)
    with pytest.raises(pgslots.InvalidArgumentError, match="paths"):
        LimitMiddleware(lambda *a: None, "api", paths=["nope"])  # type: ignore[arg-type]
