"""The async face's batches with a real database: many tasks of one process, and several
processes, on one limit: never more bodies at once than the limit (counted outside the database),
every task its own lease and fencing token, and an error in one request reaching only its task."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import invariants
import psycopg
import pytest

import pgslots
import pgslots.client
from pgslots.asyncio import concurrency


async def _cycle_tasks(name: str, tasks: int, seconds: float, log: Path | None = None) -> dict[str, Any]:
    inside, most, tokens, done = 0, 0, [], 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal inside, most, done
        while time.perf_counter() < stop:
            async with concurrency(name, timeout_seconds=30) as lease:
                assert lease is not None
                tokens.append(lease.fencing_token)
                inside += 1
                most = max(most, inside)
                started = time.time()
                await asyncio.sleep(0.002)
                inside -= 1
                if log is not None:
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(f"{started:.6f} {time.time():.6f}\n")
            done += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return {"most": most, "tokens": tokens, "done": done}


def test_many_tasks_share_a_limit_through_batches(client: pgslots.Client) -> None:
    client.create_limit("api", 20)
    seen = asyncio.run(_cycle_tasks("api", 100, 2.0))
    assert seen["most"] == 20  # the limit was full, never more
    assert len(set(seen["tokens"])) == len(seen["tokens"]) == seen["done"] > 100
    info = client.read_limit("api")
    assert info.leased_slots == 0 and info.grants_total == seen["done"]


def _process(dsn: str, log: str) -> None:
    pgslots.configure(dsn)
    asyncio.run(_cycle_tasks("shared", 40, 2.0, Path(log)))


def test_several_processes_of_many_tasks_never_exceed_the_limit(fresh_dsn: str, client: pgslots.Client, tmp_path: Path) -> None:
    client.create_limit("shared", 10)
    bodies, most = invariants.bodies_of_processes(_process, fresh_dsn, tmp_path / "bodies")
    assert bodies > 100 and most <= 10, most
    assert client.read_limit("shared").leased_slots == 0


def test_an_error_in_one_request_of_a_batch_reaches_only_its_task(client: pgslots.Client) -> None:
    client.create_limit("api", 50)

    async def main() -> list[Any]:
        async def one(name: str, strict: bool) -> Any:
            async with concurrency(name, strict=strict):
                await asyncio.sleep(0.01)
                return name

        calls = [one("api", False) for _ in range(10)] + [one("not-there", True)] + [one("api", False) for _ in range(10)]
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    assert [g for g in got if isinstance(g, BaseException)] == [got[10]]
    assert isinstance(got[10], pgslots.MissingLimitsError)
    assert got[:10] + got[11:] == ["api"] * 20
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")


@pytest.mark.parametrize("cancel_after", [0.0, 0.002, 0.005, 0.01])
def test_a_task_cancelled_while_its_batch_is_on_its_way_holds_nothing(client: pgslots.Client, cancel_after: float) -> None:
    client.create_limit("api", 5)

    async def main() -> None:
        async def hold() -> None:
            async with concurrency("api"):
                await asyncio.sleep(10)

        tasks = [asyncio.create_task(hold()) for _ in range(20)]
        await asyncio.sleep(cancel_after)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and client.read_limit("api").leased_slots:
        time.sleep(0.1)
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")


def test_a_task_behind_a_blocked_call_keeps_its_own_timeout(client: pgslots.Client) -> None:
    """One task's acquire is blocked on the limit's row (another session holds it); a second task's
    acquire, waiting behind it for the next batch, still times out at its own timeout_seconds."""
    client.create_limit("api", 5)

    async def main(blocker: psycopg.AsyncConnection[Any]) -> None:
        await blocker.execute("SET LOCAL idle_in_transaction_session_timeout = '5s'")  # a bound, should the test fail
        await blocker.execute("SELECT 1 FROM pgslots.limits WHERE name = 'api' FOR UPDATE")

        async def patient() -> Any:
            async with concurrency("api") as lease:
                return lease

        first = asyncio.create_task(patient())
        await asyncio.sleep(0.3)  # its acquire waits for the row lock now
        started = time.monotonic()
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError):
            async with concurrency("api", timeout_seconds=0.5):
                pass
        assert time.monotonic() - started < 2.0 and not first.done()
        await blocker.rollback()  # the blocked acquire goes on
        assert await asyncio.wait_for(first, 10) is not None

    async def with_blocker() -> None:
        async with await psycopg.AsyncConnection.connect(client.dsn) as blocker:
            await main(blocker)

    asyncio.run(with_blocker())
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")
