"""plpgsql_check, the PL/pgSQL linter, over every PL/pgSQL function pgslots installs: it compiles
each body against the real tables and finds what the server would only find at run time (a wrong
column, a type mismatch, a variable that shadows another and is never used).

Needs the extension (Debian's postgresql-NN-plpgsql-check, which .ci/run installs); under CI its
absence fails the test instead of skipping it.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest

from sqlhelp import rows

CHECK = """
SELECT p.oid::regprocedure::text AS function, c.lineno, c.level, c.message
FROM pg_catalog.pg_proc p,
     -- a trigger function is checked against the table of its trigger
     LATERAL plpgsql_check_function_tb(p.oid, coalesce((SELECT t.tgrelid FROM pg_catalog.pg_trigger t
                                                        WHERE t.tgfoid = p.oid LIMIT 1), 0)) c
WHERE p.pronamespace = 'pgslots'::regnamespace
  AND p.prolang = (SELECT l.oid FROM pg_catalog.pg_language l WHERE l.lanname = 'plpgsql')
ORDER BY 1, 2
"""


def _serious(finding: dict[str, Any]) -> bool:
    return finding["level"] == "error" or str(finding["message"]).startswith(("unused variable", "never read variable"))


def test_plpgsql_check_finds_no_error_and_no_unused_variable(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone() is None:
            message = "plpgsql_check is not installed for this server (apt-get install postgresql-NN-plpgsql-check)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        conn.execute("CREATE EXTENSION plpgsql_check")
        findings = rows(conn, CHECK)
    serious = [f for f in findings if _serious(f)]
    assert serious == [], "\n".join(f"{f['function']} line {f['lineno']}: {f['level']}: {f['message']}" for f in serious)


def test_plpgsql_check_sees_a_broken_function(fresh_dsn: str) -> None:
    """The linter is not silent: a function reading a column that does not exist is reported."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone() is None:
            pytest.skip("plpgsql_check is not installed (the test above fails under CI)")
        conn.execute("CREATE EXTENSION plpgsql_check")
        conn.execute(
            "CREATE FUNCTION pgslots._lint_probe() RETURNS integer LANGUAGE plpgsql AS "
            "$$ BEGIN RETURN (SELECT l.no_such_column FROM pgslots.limits l LIMIT 1); END $$"
        )
        findings = rows(conn, CHECK)
    assert [f["function"] for f in findings if _serious(f)] == ["pgslots._lint_probe()"]
