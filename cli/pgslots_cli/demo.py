"""``pgslots demo``: shows a limit holding across processes, then a rate limit's pace."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import random
import sys
import time
from typing import Any

import click

import pgslots
from pgslots.client import configure
from pgslots.sync import concurrency, rate_limit

from .app import State, cli, pass_state
from .output import bar

DEMO_LIMIT = "pgslots-demo"
DEMO_RATE = "pgslots-demo-rate"


def _worker(dsn: str, rounds: int, running: Any, peak: Any, done: Any) -> None:
    configure(dsn)
    rng = random.Random()
    for _ in range(rounds):
        with concurrency(DEMO_LIMIT, timeout_seconds=60):
            with running.get_lock():
                running.value += 1
                peak.value = max(peak.value, running.value)
            time.sleep(rng.uniform(0.15, 0.45))
            with running.get_lock():
                running.value -= 1
                done.value += 1


def _rater(dsn: str, stop_at: float, stamps: Any) -> None:
    configure(dsn)
    while True:
        rate_limit(DEMO_RATE, timeout_seconds=max(0.0, stop_at - time.time()) + 2)
        now = time.time()
        if now > stop_at:
            return
        stamps.put(now)


@cli.command(short_help="Run the demo (about 15 s).")
@click.option("--workers", type=click.IntRange(2, 32), default=8, show_default=True, help="Worker processes.")
@click.option("--limit", "slots", type=click.IntRange(1, 16), default=3, show_default=True, help="Slots of the demo limit.")
@click.option("--rate", type=click.FloatRange(0.5, 100), default=5.0, show_default=True, help="Rate limit of the second round, per second.")
@pass_state
def demo(state: State, workers: int, slots: int, rate: float) -> None:
    """Run a two-round demo (about 20 seconds) and clean up after it.

    Round 1: WORKERS processes share a limit of LIMIT slots through concurrency(); the live line
    shows that no more than LIMIT bodies ever run at once. Round 2: processes saturate a rate limit
    and the configured and achieved rates are compared. Run 'pgslots ui' in another terminal to
    watch both rounds in a browser.
    """
    client = state.client
    applied = client.migrate()
    click.echo(f"Schema ready (version {pgslots.LATEST_VERSION}{', just installed' if applied else ''}).")
    click.echo("Watch it live in a browser: run 'pgslots ui' in another terminal and open http://127.0.0.1:8787/")
    for name in (DEMO_LIMIT, DEMO_RATE):  # left over from an interrupted run
        with contextlib.suppress(pgslots.LimitNotFoundError):
            client.delete_limit(name)
    ctx = mp.get_context("spawn")
    try:
        client.create_limit(DEMO_LIMIT, slots)
        _concurrency_round(client, ctx, workers, slots)
        client.create_limit(DEMO_RATE, 2, slot_decay_per_second=rate)
        _rate_round(client, ctx, rate)
    finally:
        for name in (DEMO_LIMIT, DEMO_RATE):
            with contextlib.suppress(pgslots.PgSlotsError):
                client.delete_limit(name)
    click.echo("Demo limits deleted. Next: 'pgslots create NAME --limit N', then use concurrency(NAME) in Python.")


def _concurrency_round(client: Any, ctx: Any, workers: int, slots: int) -> None:
    rounds = 6
    running, peak, done = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    click.echo(f"\nRound 1: {workers} processes x {rounds} jobs share the limit '{DEMO_LIMIT}' of {slots} slots.")
    procs = [ctx.Process(target=_worker, args=(client.dsn, rounds, running, peak, done)) for _ in range(workers)]
    for p in procs:
        p.start()
    total = workers * rounds
    live = sys.stdout.isatty()
    last_print = 0.0
    over = 0
    while any(p.is_alive() for p in procs):
        info = client.read_limit(DEMO_LIMIT)
        inside = running.value
        over += inside > slots
        line = (
            f"  slots {bar(info.active_slots, slots, 10)} {int(info.active_slots)}/{slots}  "
            f"bodies running {inside}  queued {info.waiters}  peak {peak.value}  done {done.value}/{total}"
        )
        now = time.monotonic()
        if live:
            click.echo("\r" + line.ljust(100), nl=False)
        elif now - last_print >= 1:
            click.echo(line)
            last_print = now
        time.sleep(0.1)
    for p in procs:
        p.join()
    if live:
        click.echo("")
    failed = sum(p.exitcode != 0 for p in procs)
    verdict = "never more than the limit" if peak.value <= slots else "MORE THAN THE LIMIT"
    click.echo(
        f"  {done.value} jobs done; at most {peak.value} ran at once on a limit of {slots}: {verdict}."
        + (f" {failed} worker(s) failed." if failed else "")
    )


def _rate_round(client: Any, ctx: Any, rate: float) -> None:
    seconds = 5.0
    click.echo(f"\nRound 2: 4 processes call rate_limit('{DEMO_RATE}') as fast as they can for {seconds:.0f} s.")
    stamps_q = ctx.Queue()
    stop_at = time.time() + seconds
    procs = [ctx.Process(target=_rater, args=(client.dsn, stop_at, stamps_q)) for _ in range(4)]
    for p in procs:
        p.start()
    stamps: list[float] = []
    while any(p.is_alive() for p in procs) or not stamps_q.empty():
        with contextlib.suppress(queue.Empty):
            stamps.append(stamps_q.get(timeout=0.2))
    for p in procs:
        p.join()
    stamps.sort()
    steady = stamps[4:]  # past the burst of 2 and the processes' start
    if len(steady) >= 2:
        achieved = (len(steady) - 1) / (steady[-1] - steady[0])
        click.echo(f"  configured {rate:g}/s, achieved {achieved:.2f}/s ({achieved / rate:.1%} of configured).")
    else:
        click.echo("  too few calls went through to measure a rate.")
