"""The benchmark report's judgement of what moved between two runs (benchmarks/run.py)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench: Any = importlib.import_module("run")


def _report(**rows: float) -> dict[str, Any]:
    return {"date": "then", "uncontended": {"sync": dict(rows)}}


def test_a_row_moves_only_past_its_spread_and_never_below_the_floor() -> None:
    before = _report(cycles_per_s=1000.0, acquire_p50_ms=1.0, release_p50_ms=1.0, raw_semaphore_cycles_per_s=2000.0)
    now = _report(cycles_per_s=1015.0, acquire_p50_ms=1.05, release_p50_ms=1.3, raw_semaphore_cycles_per_s=2500.0)
    spread = {
        "uncontended.sync.cycles_per_s": 0.0,  # two runs that agreed by chance: judged against the floor
        "uncontended.sync.acquire_p50_ms": 0.001,
        "uncontended.sync.release_p50_ms": 0.5,
    }
    c = bench.compare(before, now, spread)
    moved = {m["row"]: m for m in c["moved"]}
    assert set(moved) == {"uncontended.sync.acquire_p50_ms"}  # +5% past the 2% floor
    assert moved["uncontended.sync.acquire_p50_ms"]["spread"] == bench.MIN_SPREAD
    assert c["within_spread"] == 2  # +1.5% (floor) and +30% (its spread is 50%)
    assert c["not_judged"] == 1  # the raw semaphore has no measured spread
    text = "\n".join(bench.comparison_lines(c))
    assert "1 row(s) moved more than their run-to-run spread (at least 2%)" in text


def test_spreads_merge_keeping_the_largest_seen(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report(cycles_per_s=1000.0, acquire_p50_ms=2.0)))
    b.write_text(json.dumps(_report(cycles_per_s=900.0, acquire_p50_ms=2.0)))
    measured = bench.measure_spread([a, b])
    assert measured == {"uncontended.sync.cycles_per_s": 0.1, "uncontended.sync.acquire_p50_ms": 0.0}
    known = {"uncontended.sync.cycles_per_s": 0.2, "uncontended.sync.acquire_p50_ms": 0.0, "handoff.p50_ms": 0.3}
    merged = bench.merge_spread(known, measured)
    assert merged == {"uncontended.sync.cycles_per_s": 0.2, "uncontended.sync.acquire_p50_ms": 0.0, "handoff.p50_ms": 0.3}
    assert bench.merge_spread({}, measured) == measured
    assert bench.merge_spread({"uncontended.sync.cycles_per_s": 0.05}, measured)["uncontended.sync.cycles_per_s"] == 0.1
