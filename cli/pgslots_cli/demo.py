"""``pgslots demo``: shows a limit holding across processes, then a rate limit's pace."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

import pgslots
from pgslots import embedded
from pgslots._config import configured_dsn
from pgslots.client import configure
from pgslots.sync import concurrency, rate_limit

from .app import State, cli, pass_state
from .embedded_cmd import started_message
from .output import bar

DEMO_LIMIT = "pgslots-demo"
DEMO_RATE = "pgslots-demo-rate"


def _worker(dsn: str, rounds: int, running: Any, peak: Any, done: Any) -> None:
    configure(dsn)
    rng = random.Random()
    for _ in range(rounds) if rounds else iter(int, 1):  # 0 rounds: until stopped
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


def _this_command() -> str:
    """How to run pgslots again from another terminal: 'pgslots' when that is on PATH, else the
    full path of the one running now."""
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("pgslots")
    if found and (here is None or Path(found).resolve() == here or not here.exists()):
        return "pgslots"
    if here is not None and here.exists() and os.access(here, os.X_OK) and here.suffix != ".py":
        return str(here)
    return f"{sys.executable} -m pgslots_cli"


@cli.command(short_help="Run the demo (about 20 s) on the embedded PostgreSQL.")
@click.option("--workers", type=click.IntRange(2, 32), default=8, show_default=True, help="Worker processes.")
@click.option("--limit", "slots", type=click.IntRange(1, 16), default=3, show_default=True, help="Slots of the demo limit.")
@click.option("--rate", type=click.FloatRange(0.5, 100), default=5.0, show_default=True, help="Rate limit of the second round, per second.")
@click.option("--keep", is_flag=True, help="Keep the demo limit and its workers running until Ctrl-C, to watch them.")
@pass_state
def demo(state: State, workers: int, slots: int, rate: float, keep: bool) -> None:
    """Run a two-round demo (about 20 s) and clean up after it.

    With no database configured, it starts the embedded PostgreSQL (and says where, and how to stop
    it). Round 1: WORKERS processes share a limit of LIMIT slots through concurrency(); the live
    line shows that no more than LIMIT bodies ever run at once. Round 2: processes saturate a rate
    limit and the configured and achieved rates are compared. Watch both in a browser with the
    'ui' command it prints; --keep leaves round 1 running until Ctrl-C.
    """
    if configured_dsn(state.dsn) is None:
        local = embedded.require_cluster()
        found = embedded.embedded_dsn(start=True)
        if found is None:
            raise pgslots.ConfigurationError("The embedded PostgreSQL could not be started; pass --dsn instead.")
        click.echo("No database configured: the demo uses the embedded PostgreSQL, which keeps running after it.")
        started_message(found, local)
        state.dsn = found
    client = state.client
    applied = client.migrate()
    click.echo(f"Schema ready (version {pgslots.LATEST_VERSION}{', just installed' if applied else ''}).")
    click.echo(f"Watch it live in a browser: run '{_this_command()} ui' in another terminal and open http://127.0.0.1:8787/")
    for name in (DEMO_LIMIT, DEMO_RATE):  # left over from an interrupted run
        with contextlib.suppress(pgslots.LimitNotFoundError):
            client.delete_limit(name)
    ctx = mp.get_context("spawn")
    try:
        client.create_limit(DEMO_LIMIT, slots)
        _concurrency_round(client, ctx, workers, slots, keep)
        if keep:
            return
        client.create_limit(DEMO_RATE, 2, slot_decay_per_second=rate)
        _rate_round(client, ctx, rate)
    finally:
        for name in (DEMO_LIMIT, DEMO_RATE):
            with contextlib.suppress(pgslots.PgSlotsError):
                client.delete_limit(name)
    click.echo("Demo limits deleted. Next: 'pgslots create NAME --limit N', then use concurrency(NAME) in Python.")


def _progress(client: Any, slots: int, running: Any, peak: Any, done: Any, total: int) -> str:
    # The database's figures first, then ours: a body counted as done has given its slot back.
    info = client.read_limit(DEMO_LIMIT)
    in_use = info.active_slots - info.reclaimable_slots
    finished, inside = done.value, running.value
    of = f"/{total}" if total else ""
    return (
        f"  slots in use {bar(in_use, slots, 10)} {int(in_use)}/{slots}  "
        f"bodies running {inside}  queued {info.waiters}  peak {peak.value}  done {finished}{of}"
    )


def _concurrency_round(client: Any, ctx: Any, workers: int, slots: int, keep: bool = False) -> None:
    rounds = 0 if keep else 6
    running, peak, done = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    jobs = "jobs until Ctrl-C" if keep else f"x {rounds} jobs"
    click.echo(f"\nRound 1: {workers} processes {jobs} share the limit '{DEMO_LIMIT}' of {slots} slots.")
    procs = [ctx.Process(target=_worker, args=(client.dsn, rounds, running, peak, done)) for _ in range(workers)]
    for p in procs:
        p.start()
    total = workers * rounds
    live = sys.stdout.isatty()
    last_print = 0.0
    try:
        while any(p.is_alive() for p in procs):
            line = _progress(client, slots, running, peak, done, total)
            now = time.monotonic()
            if live:
                click.echo("\r" + line.ljust(100), nl=False)
            elif now - last_print >= 1:
                click.echo(line)
                last_print = now
            time.sleep(0.1)
    except KeyboardInterrupt:
        if not keep:
            raise
        for p in procs:
            p.terminate()  # their sessions end: the database takes their slots back
    for p in procs:
        p.join()
    if live:
        click.echo("")
    if not keep:
        click.echo(_progress(client, slots, running, peak, done, total))  # the last word agrees with the totals
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
