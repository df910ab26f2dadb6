"""`pgslots metrics` read by Prometheus's own parser, and `pgslots ui` in a real browser (Debian's
Chromium, driven headless through its chromedriver): live updates without a reload, holders, and
admin actions that need the token."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from pgslots.client import Client
from pgslots.sync import concurrency
from pgslots_cli.main import cli
from uihelp import Served, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_total")]
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


def test_metrics_are_valid_prometheus_text_with_templates_summed(fresh_dsn: str) -> None:
    client = Client(fresh_dsn)
    try:
        client.create_limit("db", 3)
        client.create_limit("tenant:*", 2)
        client.create_limit('we"ird\\name', 1)
        with concurrency("db", client=client), concurrency("tenant:a", client=client), concurrency("tenant:b", occupy=2, client=client):
            text = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "metrics"]).output
            per_key = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "metrics", "--per-key"]).output
            client.pause("tenant:a", 60)
            busiest = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "metrics", "--per-key", "--keys", "1"]).output
    finally:
        client.close()
    families = _families(text)
    assert families["pgslots_grants"].type == "counter" and families["pgslots_active_slots"].type == "gauge"
    assert _value(families, "pgslots_limit_slots", limit="db") == 3
    assert _value(families, "pgslots_active_slots", limit="db") == 1
    assert _value(families, "pgslots_grants_total", limit="db") == 1
    assert _value(families, "pgslots_limit_slots", limit="tenant:*") == 2, "a template's limit is per key"
    assert _value(families, "pgslots_active_slots", limit="tenant:*") == 3, "its keys' slots, summed"
    assert _value(families, "pgslots_instances", limit="tenant:*") == 2
    assert _value(families, "pgslots_grants_total", limit="tenant:*") == 2
    assert _value(families, "pgslots_limit_slots", limit='we"ird\\name') == 1, "labels are escaped"
    assert not any(s.labels.get("limit") == "tenant:a" for f in families.values() for s in f.samples)
    keyed = _families(per_key)
    assert _value(keyed, "pgslots_active_slots", limit="tenant:b", template="tenant:*") == 2
    assert _value(keyed, "pgslots_grants_total", limit="tenant:a", template="tenant:*") == 1
    for name in ("refusals", "wait_seconds", "expired_leases", "shadow_refusals"):
        assert keyed[f"pgslots_{name}"].type == "counter"
    one_key = _families(busiest)
    assert _value(one_key, "pgslots_active_slots", limit="tenant:b", template="tenant:*") == 2, "the busiest key"
    assert not any(s.labels.get("limit") == "tenant:a" for f in one_key.values() for s in f.samples), "--keys 1: one key"
    assert _value(one_key, "pgslots_paused_keys", limit="tenant:*") == 1


def test_ui_refuses_to_listen_beyond_loopback_without_a_token(fresh_dsn: str) -> None:
    result = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "ui", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "Refusing to listen on 0.0.0.0 without a token" in result.output
    assert "Traceback" not in result.output
    short = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "ui", "--token", "short"])
    assert short.exit_code == 1 and "at least 16 characters" in short.output


@pytest.fixture
def admin_ui(fresh_dsn: str) -> Iterator[Served]:
    yield from serve(fresh_dsn, "--allow-admin")


@pytest.fixture
def read_only_ui(fresh_dsn: str) -> Iterator[Served]:
    yield from serve(fresh_dsn)


def test_read_only_ui_serves_json_and_metrics_and_refuses_changes(read_only_ui: Served, fresh_dsn: str) -> None:
    Client(fresh_dsn).create_limit("db", 2)
    status, body = read_only_ui.request("/api/limits")
    assert status == 200 and body["admin"] is False and [row["name"] for row in body["limits"]] == ["db"]
    status, text = read_only_ui.request("/metrics")
    assert status == 200 and _value(_families(text), "pgslots_limit_slots", limit="db") == 2
    status, body = read_only_ui.request("/api/limits/db/disable", "POST", token="anything", body={})
    assert status == 403 and "read-only" in body["error"]
    rebound = urllib.request.Request(read_only_ui.url + "api/limits", headers={"Host": "attacker.example:8787"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code == 403, "a page of another site, rebound to 127.0.0.1, reads nothing"
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT active FROM pgslots.limits WHERE name = 'db'").fetchone() == (True,)


def _holder(dsn: str, ready: Any, release: Any) -> None:
    client = Client(dsn)
    try:
        with concurrency("db", client=client, holder={"type": "job", "id": "browser-42"}):
            ready.set()
            release.wait(60)
    finally:
        client.close()


def _browser() -> Any:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,700"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _until(check: Any, seconds: float = 15.0) -> Any:
    """Polls ``check`` until it is truthy. The page re-renders its table on every refresh, so an
    element found a moment ago may be gone when read: that counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.1)


def test_the_page_updates_live_shows_holders_and_needs_the_token_to_disable(admin_ui: Served, fresh_dsn: str) -> None:
    from selenium.webdriver.common.by import By

    Client(fresh_dsn).create_limit("db", 2)
    browser = _browser()
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_holder, args=(fresh_dsn, ready, release))
    try:
        browser.get(admin_ui.url)

        def occupancy() -> str:
            found = browser.find_elements(By.CSS_SELECTOR, '[data-occupancy="db"]')
            return str(found[0].text) if found else ""

        _until(lambda: occupancy() == "0 / 2")
        browser.execute_script("window.__sameDocument = 'yes'")
        holder.start()
        assert ready.wait(30)
        _until(lambda: occupancy() == "1 / 2")
        rows = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-holder]"))
        assert "browser-42" in rows[0].text and f"pid {holder.pid}" in rows[0].text, rows[0].text
        assert browser.execute_script("return window.__sameDocument") == "yes", "updated without a reload"
        # Without the token, the same action is refused and changes nothing.
        for token in (None, "wrong-token-wrong-token"):
            status, body = admin_ui.request("/api/limits/db/disable", "POST", token=token, body={})
            assert status == 401 and "token" in body["error"]
        with psycopg.connect(fresh_dsn) as conn:
            assert conn.execute("SELECT active FROM pgslots.limits WHERE name = 'db'").fetchone() == (True,)
        # Through the page, with the token printed at start.
        assert admin_ui.token
        browser.find_element(By.ID, "token").send_keys(admin_ui.token)
        _until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-action="disable:db"]'))[0].click()
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            _until(lambda: conn.execute("SELECT active FROM pgslots.limits WHERE name = 'db'").fetchone() == (False,))
        _until(lambda: "disabled" in browser.find_element(By.CSS_SELECTOR, '[data-limit="db"]').text)
        # The other admin actions, through the same API the page uses.
        token = admin_ui.token
        assert admin_ui.request("/api/limits", "POST", token=token, body={"name": "made", "limit": 4})[0] == 200
        status, body = admin_ui.request("/api/limits", "POST", token=token, body={"name": "bad", "limit": -1})
        assert status == 400 and "limit must be" in body["error"]
        assert admin_ui.request("/api/limits/made/update", "POST", token=token, body={"limit": 6})[0] == 200
        lease_id = admin_ui.request("/api/limits")[1]["limits"][0]["holders"][0]["lease_id"]
        assert admin_ui.request(f"/api/leases/{lease_id}/release", "POST", token=token, body={})[1]["done"] == "Released."
        assert admin_ui.request("/api/limits/made/delete", "POST", token=token, body={})[0] == 200
        assert admin_ui.request("/api/limits/nothing/delete", "POST", token=token, body={})[0] == 400
        with psycopg.connect(fresh_dsn) as conn:
            assert conn.execute("SELECT name FROM pgslots.limits ORDER BY name").fetchall() == [("db",)]
            assert conn.execute("SELECT count(*) FROM pgslots.leases").fetchone() == (0,)
        shot = os.environ.get("PGSLOTS_UI_SCREENSHOT")
        if shot:
            browser.find_element(By.ID, "token").clear()
            time.sleep(2.5)  # a few samples for the chart
            Path(shot).write_bytes(browser.get_screenshot_as_png())
    finally:
        release.set()
        holder.join(30)
        browser.quit()


MARKUP = '<img src=x onerror="window.__pwned=1"> \'quoted\' & "double" </td>'


def test_a_pause_reason_with_markup_and_quotes_is_shown_as_text(read_only_ui: Served, fresh_dsn: str) -> None:
    """A reason is any printable text a caller chose: the page shows it literally, never as markup."""
    from selenium.webdriver.common.by import By

    client = Client(fresh_dsn)
    client.create_limit("upstream", 2)
    client.pause("upstream", 120, reason=MARKUP)
    assert read_only_ui.request("/api/limits")[1]["limits"][0]["pause_reason"] == MARKUP
    browser = _browser()
    try:
        browser.get(read_only_ui.url)
        shown = _until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-paused="upstream"]'))
        assert MARKUP in shown[0].text
        assert browser.find_elements(By.CSS_SELECTOR, '[data-paused="upstream"] img') == []
        assert browser.execute_script("return window.__pwned") is None
    finally:
        browser.quit()
        client.close()


LAYOUT_NAMES = ("db", "payments-api-with-a-rather-long-name-to-wrap", "tenant:*", "llm-tokens")


def _layout(browser: Any) -> tuple[int, int]:
    """(the page's width, the window's): a page wider than its window scrolls sideways."""
    width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    return int(width), int(inner)


# Read at one moment (the page re-renders every second): for each name, whether its row is shown
# within the window's width.
ROWS_SHOWN = """
return arguments[0].map((name) => {
  const row = [...document.querySelectorAll("[data-limit]")].find((r) => r.dataset.limit === name);
  if (!row || !row.getClientRects().length) return false;
  const box = row.getBoundingClientRect();
  return box.width > 0 && box.left >= 0 && box.right <= window.innerWidth + 1;
});
"""
CHARTS = """
return [...document.querySelectorAll("#charts figure")].map((f) =>
  [f.dataset.chart, [...f.querySelectorAll("svg text")].map((t) => t.textContent)]);
"""


def test_the_page_reads_at_1400_and_800_pixels(read_only_ui: Served, fresh_dsn: str, tmp_path: Path) -> None:
    """Screenshots at 1400 and 800 px: no sideways scrolling, every limit's row shown; a limit's own
    view has four charts with values on their axes, and holders as host, pid, application and
    their own fields."""
    from selenium.webdriver.common.by import By

    client = Client(fresh_dsn)
    client.create_limit("db", 3)
    client.create_limit(LAYOUT_NAMES[1], 5, slot_decay_per_second=2)
    client.create_limit("tenant:*", 2)
    client.create_limit("llm-tokens", 90000, window_seconds=60)
    client.pause(LAYOUT_NAMES[1], 120, reason="429 from payments")
    shots = Path(os.environ.get("PGSLOTS_UI_SCREENSHOTS", str(tmp_path)))
    browser = _browser()
    try:
        with (
            concurrency("db", client=client, holder={"type": "job", "id": "browser-7", "queue": "reports"}),
            concurrency("tenant:acme", client=client),
        ):
            browser.get(read_only_ui.url)
            for name in LAYOUT_NAMES:
                _until(lambda n=name: browser.find_elements(By.CSS_SELECTOR, f'[data-limit="{n}"]'))
            _until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-limit="tenant:acme"]'))
            for width in (1400, 800):
                browser.set_window_size(width, 1000)
                time.sleep(1.2)  # a refresh at the new width
                page, window = _layout(browser)
                assert page <= window, f"at {width} px the page is {page} px wide in a {window} px window"
                shown = browser.execute_script(ROWS_SHOWN, list(LAYOUT_NAMES))
                assert shown == [True] * len(LAYOUT_NAMES), (width, dict(zip(LAYOUT_NAMES, shown, strict=True)))
                browser.save_screenshot(str(shots / f"pgslots-ui-{width}.png"))
            time.sleep(1.5)  # a few samples for the charts
            browser.get(read_only_ui.url + "#limit=db")
            charts = _until(lambda: browser.execute_script(CHARTS))
            assert [title for title, _ in charts] == ["Slots held", "Grants and refusals", "Waiters queued", "Time spent waiting"]
            held_axis = charts[0][1]
            assert held_axis[:3] == ["0", "1.5", "3"], held_axis  # one scale, from 0 to the limit, then the times
            assert len(held_axis) == 7 and all(":" in t for t in held_axis[3:]), held_axis
            text = _until(lambda: browser.execute_script("return document.querySelector('#detail-holders [data-holder]')?.innerText"))
            assert "job" in text and "browser-7" in text and "reports" in text and "{" not in text, text
            assert "pgslots" in text or "python" in text or "-" in text  # the application column
            page, window = _layout(browser)
            assert page <= window, f"a limit's view at 800 px is {page} px wide in a {window} px window"
            browser.save_screenshot(str(shots / "pgslots-ui-limit-800.png"))
            browser.set_window_size(1400, 1000)
            time.sleep(1.2)
            browser.save_screenshot(str(shots / "pgslots-ui-limit-1400.png"))
    finally:
        browser.quit()
        client.close()
