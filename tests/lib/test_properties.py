"""Hostile and malformed input, generated: every call gets a clear error or a correct result, and
the invariant checker passes after every example."""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal

import invariants
import psycopg
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgslots
from pgslots._flow import Request
from pgslots._text import UNPRINTABLE
from pgslots_cli.main import cli

Conn = psycopg.Connection[Any]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
# Text PostgreSQL can store (no NUL), with the forbidden characters, empties and long strings likely.
names = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=SURROGATES, blacklist_characters="\x00"), max_size=40),
    st.sampled_from(["", "a/b", "%", "&", ">", "<", "x" * 255, "x" * 256, "ünï cødé ✓", "'", '"', "\\", "<\r", "a\nb", "\u2028"]),
    st.just("y" * 1_000_000),
)
ints = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300]))
# What a call may fail with: our own codes, or PostgreSQL's data exceptions for values of the wrong shape.
ACCEPTABLE = ("PS", "22")


# Names made of these alone are blank.
BLANKS = frozenset(" \u00a0\u1680\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200E))))


def _valid_name(name: str) -> bool:
    """The naming rule: 1 to 255 characters, none of / % & > <, no control character, not blank."""
    return (
        0 < len(name) <= 255
        and not any(c in name for c in "/%&><")
        and not any(ord(c) in UNPRINTABLE for c in name)
        and any(c not in BLANKS for c in name)
    )


def _call(conn: Conn, query: str, params: list[Any]) -> bool:
    try:
        with conn.transaction():
            conn.execute(query, params)
        return True
    except psycopg.DataError as exc:
        # psycopg itself refuses values PostgreSQL cannot hold (a NUL byte), before sending them.
        assert exc.sqlstate is None or exc.sqlstate.startswith(ACCEPTABLE), (exc.sqlstate, str(exc)[:200])
        return False
    except psycopg.Error as exc:
        assert exc.sqlstate and exc.sqlstate.startswith(ACCEPTABLE), (exc.sqlstate, str(exc)[:200])
        return False


@SETTINGS
@given(name=names, limit=ints, decay=floats, slots=ints, lease=floats)
def test_sql_functions_survive_anything(sql: Conn, name: str, limit: int, decay: float, slots: int, lease: float) -> None:
    with sql.transaction(force_rollback=True):
        created = _call(sql, "SELECT pgslots.create_limit(%s, %s, %s)", [name, limit, decay])
        valid_name = _valid_name(name)
        valid = valid_name and limit >= 0 and math.isfinite(decay) and (decay == 0 or decay >= 1e-9)
        assert created == valid, (name[:50], limit, decay)
        _call(sql, "SELECT * FROM pgslots.acquire(%s, %s, %s)", [[name, name], slots, lease])
        _call(sql, "SELECT * FROM pgslots.rate_limit(%s, %s)", [[name], slots])
        _call(sql, "SELECT pgslots.update_limit(%s, %s, %s)", [name, limit, decay])
        _call(sql, "SELECT pgslots.renew(%s, %s)", [uuid.uuid4(), lease])
        _call(sql, "SELECT pgslots.release(%s)", [uuid.uuid4()])
        invariants.check(sql)


@SETTINGS
@given(name=names, slots=ints, ticket=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), wait=st.one_of(st.none(), floats))
def test_queue_sessions_and_waits_survive_anything(sql: Conn, name: str, slots: int, ticket: int | None, wait: float | None) -> None:
    """The arguments of part two (tickets, queue clients, sessions, wait bounds) at their worst."""
    with sql.transaction(force_rollback=True):
        _call(sql, "SELECT pgslots.create_limit('q', 1)", [])
        client, session, lease = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        _call(sql, "SELECT * FROM pgslots.acquire('{q}', 1, 300)", [])
        _call(
            sql,
            "SELECT * FROM pgslots.acquire(%s, %s, 300, ticket => %s, queue_client => %s, new_lease_id => %s,"
            " wait_seconds => %s, session => %s)",
            [[name, "q"], slots, ticket, client, lease, wait, session],
        )
        _call(
            sql,
            "SELECT * FROM pgslots.rate_limit(%s, %s, ticket => %s, queue_client => %s, wait_seconds => %s)",
            [[name], slots, ticket, client, wait],
        )
        _call(sql, "SELECT pgslots.leave_queue(%s, %s, %s)", [ticket, client, wait])
        _call(sql, "SELECT pgslots.heartbeat(%s, %s)", [client, [ticket] if ticket is not None else None])
        _call(sql, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [lease, uuid.uuid4()]])
        _call(sql, "SELECT pgslots.release(%s, true, %s)", [lease, wait])
        _call(sql, "SELECT pgslots.renew(%s, 300, %s)", [lease, wait])
        assert sql.execute("SELECT current_setting('lock_timeout')").fetchone() == ("0",)
        invariants.check(sql)


@SETTINGS
@given(
    name=names,
    priority=st.one_of(st.none(), ints, st.sampled_from([-101, -100, 100, 101])),
    key=st.one_of(st.none(), names),
    busiest=st.one_of(st.none(), ints),
)
def test_keys_and_queue_order_survive_anything(sql: Conn, name: str, priority: int | None, key: str | None, busiest: int | None) -> None:
    """Templates, keys, priorities and fairness keys at their worst: pgslots' or PostgreSQL's data
    errors only, and the invariants hold."""
    with sql.transaction(force_rollback=True):
        _call(sql, "SELECT pgslots.create_limit('k:*', 1)", [])
        created = _call(sql, "SELECT pgslots.create_limit(%s, 2)", [name + "*"])
        valid_prefix = name not in ("", "k:") and not name.endswith("*") and _valid_name(name + "*")
        assert created == valid_prefix, name[:50]
        for names_ in ([name], ["k:" + name], ["k:" + name, name + "*"]):
            _call(
                sql,
                "SELECT * FROM pgslots.acquire(%s, 1, 300, queue_client => %s, priority => %s, fairness_key => %s)",
                [names_, uuid.uuid4(), priority, key],
            )
            _call(sql, "SELECT * FROM pgslots.rate_limit(%s, 1, priority => %s, fairness_key => %s)", [names_, priority, key])
        _call(sql, "SELECT * FROM pgslots.get_instances(%s, %s)", [name + "*", busiest])
        _call(sql, "SELECT pgslots.update_limit(%s, 3)", [name + "*"])
        _call(sql, "SELECT pgslots.update_limit(%s, 3)", ["k:" + name])
        _call(sql, "SELECT pgslots.delete_limit(%s)", [name + "*"])
        _call(sql, "SELECT pgslots.sweep()", [])
        assert sql.execute("SELECT current_setting('lock_timeout')").fetchone() == ("0",)
        invariants.check(sql)


@SETTINGS
@given(
    window=floats,
    decay=floats,
    slots=ints,
    actual=floats,
    shadow=st.one_of(st.none(), st.booleans()),
    steps=st.floats(min_value=0, max_value=1e7),  # moves the clock (settings are the owner's only)
)
def test_windows_reservations_and_shadow_survive_anything(
    sql: Conn, window: float, decay: float, slots: int, actual: float, shadow: bool | None, steps: float
) -> None:
    """Window limits, reservations and shadow mode at their worst: a clear error or a correct result,
    the invariants (a window's count equals its grant log) hold, and settling is exact."""
    with sql.transaction(force_rollback=True):
        created = _call(sql, "SELECT pgslots.create_limit('p', 5, %s, window_seconds => %s, shadow => %s)", [decay, window, shadow])
        valid_decay = math.isfinite(decay) and (decay == 0 or decay >= 1e-9)
        valid_window = 0 <= window <= 1e8
        assert created == (valid_decay and valid_window and not (decay > 0 and window > 0)), (decay, window)
        _call(sql, "SELECT pgslots.create_limit('w', 3, window_seconds => 5)", [])
        got = None
        with sql.transaction():
            got = sql.execute("SELECT reservation_id FROM pgslots.reserve(ARRAY['w'], %s)", [slots]).fetchone() if 1 <= slots <= 3 else None
        if slots < 1 or slots > 3:
            assert not _call(sql, "SELECT * FROM pgslots.reserve(ARRAY['w', 'p'], %s)", [slots])
        _call(sql, "SELECT * FROM pgslots.rate_limit(ARRAY['w', 'p'], %s)", [slots])
        if got is not None:
            used = sql.execute(
                "SELECT coalesce(sum(g.slots), 0) FROM pgslots.window_grants g"
                " JOIN pgslots.limits l ON l.id = g.limit_id WHERE l.name = 'w'"
            ).fetchone()
            assert used is not None
            ok = _call(sql, "SELECT pgslots.settle(%s, %s)", [got[0], actual])
            assert ok == (not math.isnan(actual) and 0 <= actual <= 1e9), actual
            if ok:
                logged = sql.execute("SELECT slots FROM pgslots.window_grants WHERE reservation_id = %s", [got[0]]).fetchone()
                # Settled to nothing, the grant leaves the log; a debt stops at twice the limit (6).
                highest = slots + max(0.0, 6 - used[0])
                assert logged == (None if actual == 0 else (min(actual, highest),)), (actual, slots, used)
        _call(sql, "SELECT pgslots.update_limit('w', window_seconds => %s, shadow => %s)", [window, shadow])
        _call(sql, "SELECT pgslots.update_limit('w', slot_decay_per_second => %s, window_seconds => 0)", [decay])
        _call(sql, "UPDATE pgslots.settings SET clock_offset = clock_offset + make_interval(secs => %s)", [steps])
        _call(sql, "SELECT * FROM pgslots.rate_limit(ARRAY['w', 'p'])", [])
        _call(sql, "SELECT pgslots.sweep()", [])
        assert sql.execute("SELECT current_setting('lock_timeout')").fetchone() == ("0",)
        invariants.check(sql, owing=("w", "p"))


@SETTINGS
@given(lease_id=st.one_of(st.text(max_size=50), st.just(None)))
def test_malformed_lease_ids(sql: Conn, lease_id: str | None) -> None:
    with sql.transaction(force_rollback=True):
        _call(sql, "SELECT pgslots.release(%s::text::uuid)", [lease_id])
        _call(sql, "SELECT pgslots.renew(%s::text::uuid, 300)", [lease_id])
        invariants.check(sql)


@settings(max_examples=300, deadline=None)
@given(
    names_=st.one_of(st.none(), names, st.lists(names, max_size=4)),
    occupy=st.one_of(ints, floats, st.none(), st.booleans()),
    timeout=st.one_of(st.none(), floats, ints),
    retries=st.one_of(st.none(), ints),
    lease=st.one_of(floats, ints),
)
def test_python_arguments_are_checked_before_any_round_trip(names_: Any, occupy: Any, timeout: Any, retries: Any, lease: Any) -> None:
    try:
        request = Request.for_concurrency(names_, slots=occupy, timeout_seconds=timeout, max_retries=retries, lease_seconds=lease)
    except pgslots.InvalidArgumentError as exc:
        assert str(exc)
        return
    assert request is None or (request.slots >= 1 and math.isfinite(request.lease_seconds))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names.filter(lambda n: len(n) < 5000 and not n.startswith("-")), limit=st.integers(-5, 2**40))
def test_cli_never_shows_a_traceback(fresh_dsn: str, name: str, limit: int) -> None:
    result = CliRunner().invoke(cli, ["--dsn", fresh_dsn, "create", name, "--limit", str(limit)])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert len(result.output.strip().splitlines()) == 1, result.output
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        invariants.check(conn)
        conn.execute("DELETE FROM pgslots.limits")
