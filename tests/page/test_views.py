"""The page's JSON builders and guards: pure functions, tested without a server or a browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import pytest

from pgslots.types import LeaseInfo, LimitInfo, Overview
from pgslots_cli.ui import guards
from pgslots_cli.ui.views import Point, history_view, holder_view, limits_view

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _limit(name: str, **fields: object) -> LimitInfo:
    base: dict[str, object] = {
        "id": uuid.uuid4(),
        "name": name,
        "limit": 4,
        "active": True,
        "slot_decay_per_second": 0.0,
        "active_slots": 0.0,
        "leased_slots": 0,
        "unleased_slots": 0.0,
        "denied_slots": 0,
        "avg_slot_occupancy_seconds": 1.0,
        "leases": 0,
        "expired_leases": 0,
        "waiters": 0,
        "oldest_waiter_seconds": None,
        "created": NOW,
        "updated": NOW,
    }
    return LimitInfo(**(base | fields))  # type: ignore[arg-type]


def _lease(holder: dict[str, object] | None, gone: bool = False) -> LeaseInfo:
    return LeaseInfo(
        lease_id=uuid.uuid4(),
        limit_names=["db"],
        slots=1,
        fencing_token=7,
        acquired_at=NOW - timedelta(seconds=90),
        expires_at=NOW + timedelta(seconds=210),
        expired=False,
        host="vm",
        pid=394,
        application_name="pgslots:load.py",
        holder=holder,
        gone=gone,
    )


def test_a_holder_is_host_pid_application_and_its_own_fields_never_raw_json() -> None:
    shown = holder_view(_lease({"host": "vm", "pid": 394, "type": "job", "id": "3", "tags": ["a", "b"]}, gone=True), NOW)
    assert (shown["host"], shown["pid"], shown["application"]) == ("vm", 394, "pgslots:load.py")
    assert shown["fields"] == [["id", "3"], ["tags", '["a", "b"]'], ["type", "job"]], "host and pid once, in their columns"
    assert shown["held_seconds"] == 90 and shown["gone"] is True
    assert holder_view(_lease(None), NOW)["fields"] == []


def test_the_limits_view_gives_the_databases_figures_with_holders_and_busiest_keys() -> None:
    template = _limit("tenant:*", is_template=True, instances=3, held_slots=5.0, active_slots=6.0, reclaimable_slots=1)
    key = _limit("tenant:a", template="tenant:*", held_slots=3.0)
    plain = _limit("db", held_slots=1.0, leases=1)
    lease = _lease({"type": "job"})
    seen = Overview([plain, template], {"tenant:*": [key]}, {"db": [lease]}, None)
    view = limits_view(seen, NOW)
    db, tenants = view["limits"]
    assert (db["name"], db["held_slots"], db["capacity"], len(db["holders"])) == ("db", 1.0, 4, 1)
    assert (tenants["held_slots"], tenants["capacity"], tenants["reclaimable_slots"]) == (5.0, 12, 1), "a template's sums, as given"
    assert [k["name"] for k in tenants["busiest"]] == ["tenant:a"] and tenants["busiest"][0]["capacity"] == 4
    assert view["holders_note"] is None and view["time"] == NOW.isoformat()
    refused = limits_view(Overview([plain], {}, {}, "Holders are not shown: permission denied"), NOW)
    assert refused["holders_note"].startswith("Holders are not shown") and refused["limits"][0]["holders"] == []


def test_the_history_is_the_counters_differences_per_second() -> None:
    points = {
        "db": [
            Point(100.0, 10, 2, 1.0, 1.0, 0),
            Point(102.0, 16, 3, 2.0, 2.0, 1),
            Point(102.0, 16, 3, 2.0, 2.0, 1),
            Point(104.0, 16, 3, 2.0, 0.0, 0),
        ],
        "new": [Point(103.0, 0, 0, 0.0, 0.0, 0)],
    }
    view = history_view(points, 99.0, 2.0)
    db = view["limits"]["db"]
    assert db["t"] == [102.0, 104.0], "a pair with no time between is skipped"
    assert (db["grants"], db["refusals"], db["waited"]) == ([3.0, 0.0], [0.5, 0.0], [0.5, 0.0])
    assert (db["held"], db["waiters"]) == ([2.0, 0.0], [1, 0])
    assert view["limits"]["new"]["t"] == [] and (view["since"], view["interval"]) == (99.0, 2.0)


@pytest.mark.parametrize(
    ("header", "local"),
    [
        ("127.0.0.1:8787", True),
        ("localhost", True),
        ("[::1]:8787", True),
        ("127.0.0.2", True),
        ("127.0.0.1.nip.io.attacker.example:8787", False),
        ("127.attacker.example", False),
        ("[::1].attacker.example", False),
        ("127.0.0.1:8787@attacker.example", False),
        ("", False),
        (None, False),
    ],
)
def test_only_exact_loopback_names_are_local(header: str | None, local: bool) -> None:
    assert guards.local_host(header) is local


def test_tokens_and_body_lengths() -> None:
    token = "a-token-of-sixteen-or-more"
    assert guards.authorized(token, f"Bearer {token}")
    assert not guards.authorized(token, f"Bearer {token}x") and not guards.authorized(token, None)
    assert not guards.authorized(None, "Bearer anything"), "no token set: no admin"
    assert [guards.body_length(v) for v in (None, "0", "12", str(guards.MAX_BODY))] == [0, 0, 12, guards.MAX_BODY]
    for bad in ("abc", "-1", "1e3", "+5", "\u0663", str(guards.MAX_BODY + 1), "99999999999"):
        assert guards.body_length(bad) is None, bad


def test_the_pages_files_ship_in_the_package_and_its_javascript_parses(tmp_path: Path) -> None:
    """The page is three files in the wheel; `node --check` parses its JavaScript (CI installs Node)."""
    static = resources.files("pgslots_cli.ui").joinpath("static")
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.css", "app.js"}
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        message = "Node.js is not installed (apt-get install nodejs)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    script = Path(str(static.joinpath("app.js")))
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "broken.js"
    broken.write_text(script.read_text().replace("function render()", "function render("))
    assert subprocess.run([node, "--check", str(broken)], capture_output=True, timeout=60).returncode != 0, "the check can fail"
