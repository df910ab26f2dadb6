"""pgslots.httpx against a real upstream (uvicorn on loopback) that answers 429 and 503 with
Retry-After: the limit is paused for every caller, requests are sent again once it opens, a bounded
number of times, and concurrency slots are held until a response is closed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import pgslots
from pgslots.httpx import AsyncRateLimitedTransport, RateLimitedTransport, retry_after_seconds
from servers import uvicorn_app


@pytest.fixture
def upstream(fresh_dsn: str) -> Iterator[str]:
    with uvicorn_app("upstream:app", {}) as url:
        yield url


def stats(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/stats").json()
    return answer


def test_a_429_pauses_the_limit_for_every_caller_and_each_request_is_sent_again(client: pgslots.Client, upstream: str) -> None:
    client.create_limit("upstream", 50, slot_decay_per_second=100)
    results: list[int] = []
    errors: list[BaseException] = []
    started = time.monotonic()

    def caller() -> None:
        try:
            with httpx.Client(transport=RateLimitedTransport(limit={"127.0.0.1": "upstream"}, client=client)) as http:
                for _ in range(5):
                    results.append(http.get(f"{upstream}/api").status_code)
                    time.sleep(0.05)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - started
    assert not errors
    assert results == [200] * 20  # the 429 was retried after the pause
    seen = stats(upstream)
    # Only requests already on their way when the first 429 came back can arrive early (3 other callers).
    assert seen["early"] <= 3, seen
    assert seen["served"] == 20
    assert elapsed >= 1.0
    # Every try went through the limit: 20 answered 200, the 429s sent again.
    assert client.read_limit("upstream").grants_total == 20 + 1 + seen["early"]


def test_retries_are_bounded_and_the_last_answer_is_returned(client: pgslots.Client, upstream: str) -> None:
    client.create_limit("busy", 10, slot_decay_per_second=100)
    with httpx.Client(transport=RateLimitedTransport(limit="busy", max_retries=2, client=client)) as http:
        started = time.monotonic()
        answer = http.get(f"{upstream}/busy")
    assert answer.status_code == 503
    assert time.monotonic() - started < 5
    assert client.read_limit("busy").grants_total == 3  # the first try and two retries, each through the limit


def test_a_retry_after_date_is_read_and_a_pause_past_the_bound_is_not_waited(client: pgslots.Client, upstream: str) -> None:
    client.create_limit("dated", 10, slot_decay_per_second=100)
    with httpx.Client(transport=RateLimitedTransport(limit="dated", client=client)) as http:
        assert http.get(f"{upstream}/dated").status_code == 200
    assert stats(upstream)["dated_early"] == 0
    response = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after_seconds(response) == 0.0  # a date in the past: now
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "nan"})) is None
    # Longer than longest_pause: the 429 is returned at once (and nothing is paused).
    client.create_limit("long", 10, slot_decay_per_second=100)
    inner = httpx.MockTransport(lambda request: httpx.Response(429, headers={"Retry-After": "3600"}))
    with httpx.Client(transport=RateLimitedTransport(inner, limit="long", client=client)) as http:
        assert http.get("http://upstream.test/").status_code == 429
    assert client.read_limit("long").paused_until is None


def test_concurrency_slots_are_held_until_the_response_is_closed(client: pgslots.Client, upstream: str) -> None:
    client.create_limit("calls", 2)
    transport = RateLimitedTransport(concurrency=lambda request: "calls" if request.url.path == "/slow" else None, client=client)
    with httpx.Client(transport=transport) as http:
        with http.stream("GET", f"{upstream}/slow") as response:
            assert response.status_code == 200
            assert client.read_limit("calls").leased_slots == 1
            response.read()
        assert client.read_limit("calls").leased_slots == 0
        assert http.get(f"{upstream}/stats").status_code == 200  # not limited: the function said None
        assert client.read_limit("calls").grants_total == 1


def test_the_async_transport_pauses_and_retries_without_blocking_the_loop(client: pgslots.Client, upstream: str) -> None:
    client.create_limit("upstream", 50, slot_decay_per_second=100)

    async def main() -> list[int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        tick = asyncio.create_task(ticker())
        async with httpx.AsyncClient(transport=AsyncRateLimitedTransport(limit="upstream", client=client)) as http:
            answers = await asyncio.gather(*(http.get(f"{upstream}/api") for _ in range(6)))
        tick.cancel()
        assert ticks >= 10  # the loop kept running through the 1 s pause
        return [a.status_code for a in answers]

    assert asyncio.run(main()) == [200] * 6
    assert stats(upstream)["served"] == 6


def test_bad_arguments_are_refused_when_the_transport_is_made() -> None:
    bad = ({"limit": ""}, {"limit": {"api.test": ""}}, {"limit": 3}, {"limit": "a", "max_retries": -1}, {"limit": "a", "occupy": 0})
    for kwargs in bad:
        with pytest.raises(pgslots.InvalidArgumentError):
            RateLimitedTransport(**kwargs)
