"""Untrusted callers, round two: what a plain role names reaches terminals, metrics and the page
only as text, and the CLI takes odd input without a traceback.

A plain role chooses its holder (host, pid), its connection's application_name and its fairness
keys; an older schema may hold limit names with control characters. None of them may retitle the
operator's window, write their clipboard (OSC 52), clear the screen or hide text, nor split a metrics
line for any reader.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql as pgsql

from clihelp import one_line_error, run
from pgslots._text import UNPRINTABLE
from sqlhelp import acquire, create, login_role, one
from uihelp import Served, serve

Conn = psycopg.Connection[Any]

# What the attack sent: a window title (OSC 0), the clipboard (OSC 52), a cleared screen, hidden
# text, CSI in its 8-bit form, a carriage return, and the separators only some readers split on.
TOKEN = "a-token-for-the-test-0123456789"
HOSTILE = "\x1b]0;pwned\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b[8mhidden\x9b31m\rX\x0bY\x0cZ\x85\u2028\u2029\u202e"


@pytest.fixture
def plain(fresh_dsn: str) -> Iterator[str]:
    roles = login_role(fresh_dsn, "pgslots_user")
    try:
        yield next(roles)
    finally:
        next(roles, None)


def _assert_inert(text: str) -> None:
    bad = sorted({f"U+{ord(c):04X}" for c in text if ord(c) in UNPRINTABLE and c != "\n"})
    assert not bad, f"raw control characters reached the output: {bad}"


def test_names_with_control_characters_or_blank_are_refused(fresh_dsn: str, plain: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        for name in (" ", "\n", "\x1b", "a\x1b[2Jb", "tab\there", "\u2028", "x\x9by"):
            with pytest.raises(psycopg.Error) as caught:
                owner.execute("SELECT pgslots.create_limit(%s, 1)", [name])
            assert caught.value.sqlstate == "PS001", (name, str(caught.value))
            assert "\x1b" not in str(caught.value)
        create(owner, "tenant:*", 2)
    with psycopg.connect(plain, autocommit=True) as conn:
        for name in ("tenant:\x1b]0;x\x07", "tenant:\n"):
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT * FROM pgslots.acquire(%s)", [[name]])
            assert caught.value.sqlstate == "PS001"
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT * FROM pgslots.acquire('{tenant:a}', fairness_key => %s)", [HOSTILE])
        assert caught.value.sqlstate == "PS015"
    result = run(fresh_dsn, "create", "\x1b[2J", "-l", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    _assert_inert(result.output)


def _hostile_state(owner_dsn: str, plain: str) -> Conn:
    """A template key and a plain limit held by the plain role with a hostile holder and application
    name, and a legacy limit and a legacy key whose names hold every hostile character (written as an
    older schema could have); returns the plain role's connection, which must stay open."""
    with psycopg.connect(owner_dsn, autocommit=True) as owner:
        create(owner, "tenant:*", 3)
        create(owner, "api", 3)
    conn = psycopg.connect(plain, autocommit=True)
    conn.execute(pgsql.SQL("SET application_name = {}").format(pgsql.Literal("app" + HOSTILE)))
    holder = {"host": "host" + HOSTILE, "pid": 4242}
    assert acquire(conn, ["api"], holder=json.dumps(holder))["granted"]
    assert acquire(conn, ["tenant:a"], holder=json.dumps(holder))["granted"]
    with psycopg.connect(owner_dsn, autocommit=True) as owner:
        tenant = one(owner, "SELECT id FROM pgslots.limits WHERE name = 'tenant:*'")["id"]
        owner.execute(
            'INSERT INTO pgslots.limits (name, "limit", decayed_at, created, updated, template_id)'
            " VALUES (%s, 2, now(), now(), now(), NULL), (%s, 3, now(), now(), now(), %s)",
            ["legacy" + HOSTILE, "tenant:" + HOSTILE, tenant],
        )
    return conn


def test_terminal_output_shows_callers_words_escaped(fresh_dsn: str, plain: str) -> None:
    conn = _hostile_state(fresh_dsn, plain)
    try:
        for args in (
            ["watch", "--once"],
            ["ls"],
            ["ls", "tenant:*"],
            ["ls", "-o", "json"],
            ["leases"],
            ["leases", "-o", "json"],
            ["metrics"],
            ["metrics", "--per-key"],
        ):
            result = run(fresh_dsn, *args)
            assert result.exit_code == 0, (args, result.output)
            _assert_inert(result.output)
        shown = run(fresh_dsn, "leases").output
        assert "host\\x1b]0;pwned" in shown, "the holder is shown, escaped"
        listed = json.loads(run(fresh_dsn, "ls", "tenant:*", "-o", "json").output)
        assert "tenant:" + HOSTILE in [limit["name"] for limit in listed], "JSON reads back as it was"
    finally:
        conn.close()


def test_metrics_lines_split_the_same_for_every_reader(fresh_dsn: str, plain: str) -> None:
    """Label values held CR, VT, FF, U+0085 and U+2028 raw: 154 lines split by \\n, 213 by
    splitlines(). Now both readings agree, and Prometheus's parser reads every name back."""
    conn = _hostile_state(fresh_dsn, plain)
    try:
        for per_key in (False, True):
            text = run(fresh_dsn, "metrics", *(["--per-key"] if per_key else [])).output
            assert len(text.split("\n")) == len(text.splitlines()) + (1 if text.endswith("\n") else 0)
            labels = {
                sample.labels["limit"]
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if "limit" in sample.labels
            }
            legacy = next(label for label in labels if label.startswith("legacy"))
            assert legacy == "legacy" + HOSTILE.translate({c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in UNPRINTABLE}), legacy
            if per_key:
                assert any(label.startswith("tenant:\\x1b") for label in labels)
    finally:
        conn.close()


# ---- the page: exact loopback names, sane request bodies ------------------------------------------


@pytest.fixture
def ui(fresh_dsn: str) -> Iterator[Served]:
    yield from serve(fresh_dsn, "--allow-admin", "--token", TOKEN)


def _port(served: Served) -> int:
    return int(served.url.split("http://127.0.0.1:")[1].split("/")[0])


def _get(port: int, host: str, path: str = "/api/limits") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_page_serves_only_exact_loopback_names(ui: Served) -> None:
    port = _port(ui)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "[::1]", "127.0.0.2"):
        assert _get(port, host) == 200, host
    for host in (
        f"127.0.0.1.nip.io.attacker.example:{port}",
        "127.attacker.example",
        "localhost.attacker.example",
        "[::1].attacker.example",
        f"127.0.0.1:{port}@attacker.example",
        "",
    ):
        assert _get(port, host) == 403, host


def _post(port: int, length: str, token: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"POST /api/limits/create HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        size = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        while len(body) < size and (chunk := s.recv(4096)):
            body += chunk
        return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_a_bad_content_length_is_a_clear_400(ui: Served) -> None:
    """A Content-Length of "abc" printed a traceback, "-1" blocked a thread. A length that is not a
    number is refused by the HTTP server itself, whatever the token; one beyond the body cap by the
    page, after the token."""
    port = _port(ui)
    for length in ("abc", "-1", "1e3", "+5", "٣"):
        started = time.monotonic()
        for token in ("wrong", TOKEN):
            reply = _post(port, length, token)
            assert reply.split()[1] == "400", (length, reply)
        assert time.monotonic() - started < 5
    started = time.monotonic()
    assert _post(port, "99999999999", "wrong").split()[1] == "401"  # the token is checked first
    reply = _post(port, "99999999999", TOKEN)
    assert reply.split()[1] == "400" and "Content-Length" in reply, reply
    assert time.monotonic() - started < 5
    ui.proc.terminate()
    output, _ = ui.proc.communicate(timeout=10)
    assert "Traceback" not in output


# ---- the CLI on odd input -------------------------------------------------------------------------


def _apply(dsn: str, tmp_path: Path, text: str, *extra: str) -> Result:
    spec = tmp_path / "limits.toml"
    spec.write_text(text)
    return run(dsn, "apply", str(spec), *extra)


def test_apply_on_deeply_nested_toml_is_a_clear_error(fresh_dsn: str, tmp_path: Path) -> None:
    nested = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    assert "nested too deeply" in one_line_error(_apply(fresh_dsn, tmp_path, nested))


def test_a_limit_beyond_an_integer_is_named_as_such(fresh_dsn: str, tmp_path: Path) -> None:
    message = one_line_error(_apply(fresh_dsn, tmp_path, "[big]\nlimit = 2147483648\n"))
    assert "at most 2147483647" in message and "schema" not in message
    for args in (["create", "big", "-l", "2147483648"], ["update", "big", "-l", "99999999999"]):
        result = run(fresh_dsn, *args)
        assert result.exit_code != 0 and "2147483647" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[" "]\nlimit = 1\n', "blank"),
        ('["a\\u001bb"]\nlimit = 1\n', "control character"),
        ('["a\\nb"]\nlimit = 1\n', "control character"),
        ('["*"]\nlimit = 1\n', "prefix"),
        ('["x**"]\nlimit = 1\n', "more than one *"),
        ('["api"]\nlimit = 1\nmax_keys = 3\n', "max_keys is for templates"),
    ],
)
def test_apply_dry_run_refuses_what_the_real_run_refuses(fresh_dsn: str, tmp_path: Path, text: str, expected: str) -> None:
    dry = one_line_error(_apply(fresh_dsn, tmp_path, text, "--dry-run"))
    real = one_line_error(_apply(fresh_dsn, tmp_path, text))
    assert expected in dry and dry == real
    _assert_inert(dry)
    assert json.loads(run(fresh_dsn, "ls", "-o", "json").output) == []


def test_apply_dry_run_changes_nothing_and_applies_max_keys(fresh_dsn: str, tmp_path: Path) -> None:
    text = '["tenant:*"]\nlimit = 2\nmax_keys = 7\n[api]\nlimit = 3\n'
    assert "would create 'tenant:*': limit 2, max_keys 7" in _apply(fresh_dsn, tmp_path, text, "--dry-run").output
    assert json.loads(run(fresh_dsn, "ls", "-o", "json").output) == []
    assert _apply(fresh_dsn, tmp_path, text).exit_code == 0
    shown = json.loads(run(fresh_dsn, "inspect", "tenant:*", "-o", "json").output)
    assert shown["max_keys"] == 7
    assert "Nothing to do" in _apply(fresh_dsn, tmp_path, text).output


def test_clear_debt_from_the_command_line(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        create(owner, "calls", 5, decay=0.01)
        reservation = one(owner, "SELECT * FROM pgslots.reserve('{calls}', 1)")["reservation_id"]
        one(owner, "SELECT pgslots.settle(%s, 1000) AS c", [reservation])
    result = run(fresh_dsn, "clear-debt", "calls")
    assert result.exit_code == 0 and result.output.startswith("Cleared 10 rate slot(s) of 'calls'"), result.output
    assert "not found" in one_line_error(run(fresh_dsn, "clear-debt", "nope"))
