"""Django under global limits: the connection from settings, a decorator for views and one for
functions such as Django's tasks, and ``manage.py pgslots`` (migrate, apply, ls, ...).

::

    # settings.py
    INSTALLED_APPS = [..., "pgslots.django"]
    PGSLOTS = {"DSN": "postgresql://app@db/app"}        # or {"DATABASE": "default"}

    # views.py
    from pgslots.django import header, limit_view

    @limit_view("tenant:*", key=header("X-Tenant"))      # each tenant its own rate limit
    def search(request): ...

The ``PGSLOTS`` setting: ``DSN`` (a connection string), or ``DATABASE`` (the alias of a PostgreSQL
database in ``DATABASES``, ``"default"`` when neither is given), and optionally ``FAIL_OPEN``,
``FAIL_OPEN_AFTER_SECONDS``, ``MAX_CONNECTIONS``. A view the limit refuses answers 429 with
``Retry-After`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields; a missing or unusable key
answers 400; a database that cannot be reached answers 503 unless ``FAIL_OPEN`` lets requests
through. Needs ``pgslots[django]``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import _validate as check
from .. import asyncio as pg_async
from .. import sync as pg_sync
from .._integrate import Guard, Key, LimitCache, check_request_limit, header, key_name, refusal_headers
from ..client import Client, configure
from ..errors import AcquireConcurrencySlotTimeoutError, ConfigurationError

F = TypeVar("F", bound=Callable[..., Any])
KeyFunction = Callable[[Any], Any]

_SETTINGS = frozenset({"DSN", "DATABASE", "FAIL_OPEN", "FAIL_OPEN_AFTER_SECONDS", "MAX_CONNECTIONS"})


def _settings() -> dict[str, Any]:
    from django.conf import settings

    value = getattr(settings, "PGSLOTS", {})
    if not isinstance(value, dict):
        raise ConfigurationError(f"settings.PGSLOTS must be a dict such as {{'DSN': 'postgresql://...'}}, got {value!r}.")
    unknown = sorted(set(value) - _SETTINGS)
    if unknown:
        raise ConfigurationError(f"settings.PGSLOTS has unknown keys {unknown}: it knows {sorted(_SETTINGS)}.")
    if "DSN" in value and "DATABASE" in value:
        raise ConfigurationError("settings.PGSLOTS names both DSN and DATABASE: give one.")
    return value


def settings_dsn() -> str | None:
    """The connection string the ``PGSLOTS`` setting names: its ``DSN``, else the PostgreSQL database
    of its ``DATABASE`` alias (``"default"``); None when the default database is not PostgreSQL and
    nothing else is named (pgslots then reads ``PGSLOTS_DSN`` and the environment)."""
    from django.conf import settings
    from psycopg.conninfo import make_conninfo

    value = _settings()
    if "DSN" in value:
        dsn = value["DSN"]
        if not isinstance(dsn, str) or not dsn:
            raise ConfigurationError(f"settings.PGSLOTS['DSN'] must be a connection string, got {dsn!r}.")
        return dsn
    alias = value.get("DATABASE", "default")
    database = settings.DATABASES.get(alias)
    if database is None:
        raise ConfigurationError(f"settings.PGSLOTS['DATABASE'] is {alias!r}, which DATABASES does not have.")
    if "postgresql" not in str(database.get("ENGINE", "")):
        if "DATABASE" in value:
            raise ConfigurationError(f"settings.PGSLOTS['DATABASE'] names {alias!r}, which is not a PostgreSQL database.")
        return None
    parts = {"dbname": database.get("NAME"), "user": database.get("USER"), "password": database.get("PASSWORD")}
    parts |= {"host": database.get("HOST"), "port": database.get("PORT")}
    parts |= {k: v for k, v in (database.get("OPTIONS") or {}).items() if isinstance(v, (str, int))}
    return make_conninfo("", **{k: str(v) for k, v in parts.items() if v not in (None, "")})


def configure_from_settings() -> Client | None:
    """Configures pgslots' default client from the ``PGSLOTS`` setting (the app does this when Django
    starts); None when the settings name no database."""
    value = _settings()
    dsn = settings_dsn()
    if dsn is None:
        return None
    return configure(
        dsn,
        fail_open=bool(value.get("FAIL_OPEN", False)),
        fail_open_after_seconds=value.get("FAIL_OPEN_AFTER_SECONDS", 5.0),
        max_connections=value.get("MAX_CONNECTIONS", 10),
    )


# ---- keys ------------------------------------------------------------------------------------


def client_address() -> Key:
    """The key is ``REMOTE_ADDR`` (behind a proxy, make sure it is the real client's)."""
    return Key("the client's address", lambda request: request.META.get("REMOTE_ADDR"))


def user() -> Key:
    """The key is the signed-in user's primary key (an anonymous request has none: 400)."""

    def take(request: Any) -> Any:
        who = getattr(request, "user", None)
        return who.pk if who is not None and who.is_authenticated else None

    return Key("a signed-in user", take)


# ---- views -----------------------------------------------------------------------------------


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> Any:
    from django.http import HttpResponse

    response = HttpResponse(json.dumps({"detail": detail}), status=status, content_type="application/json")
    for k, v in (headers or {}).items():
        response[k] = v
    return response


def limit_view(
    limit: str,
    *,
    key: KeyFunction | None = None,
    concurrency: bool = False,
    occupy: int = 1,
    wait_seconds: float = 0.0,
    lease_duration: float = 300.0,
    client: Client | None = None,
) -> Callable[[F], F]:
    """A view (sync or async) that takes ``occupy`` rate slots of ``limit`` per request, or with
    ``concurrency=True`` holds them while it runs; with ``key=`` (``header(...)``,
    ``client_address()``, ``user()`` or a function of the request), ``limit`` is a template and
    each key has its own. Waits up to ``wait_seconds`` (default 0: answer at once)."""
    check_request_limit(limit, key, occupy, wait_seconds, "limit_view", "header(...), client_address(), user()")
    check.number("lease_duration", lease_duration, minimum=1, integer=False)
    limits = LimitCache()

    def name_for(request: Any) -> str | None:
        return limit if key is None else key_name(limit, key(request))

    def bad_key() -> Any:
        what = getattr(key, "describe", "the request's key")
        return _json(400, f"{what} is missing or is not a valid key (1 to 200 printable characters, none of / % & > <).")

    def refused(name: str, error: AcquireConcurrencySlotTimeoutError) -> Any:
        headers = refusal_headers(limit, limits.get(client, limit), error.retry_after)
        return _json(429, f"Too many requests for {name}: retry after {headers['Retry-After']} s.", headers)

    def unavailable() -> Any:
        return _json(503, "The rate limiter's database cannot be reached: try again shortly.", {"Retry-After": "1"})

    def decorate(view: F) -> F:
        if asyncio.iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request: Any, *args: Any, **kwargs: Any) -> Any:
                name = name_for(request)
                if name is None:
                    return bad_key()
                held: pg_async.concurrency | None = None
                try:
                    if not concurrency:
                        await pg_async.rate_limit(name, occupy, wait_seconds, client=client)
                    else:
                        held = pg_async.concurrency(name, occupy, wait_seconds, lease_duration=lease_duration, client=client)
                        await held.__aenter__()
                except AcquireConcurrencySlotTimeoutError as error:
                    return await asyncio.to_thread(refused, name, error)
                except ConfigurationError:
                    return unavailable()
                if held is None:
                    return await view(request, *args, **kwargs)
                try:
                    return await view(request, *args, **kwargs)
                finally:
                    await held.__aexit__(None, None, None)

            return async_view  # type: ignore[return-value]

        @functools.wraps(view)
        def sync_view(request: Any, *args: Any, **kwargs: Any) -> Any:
            name = name_for(request)
            if name is None:
                return bad_key()
            held: pg_sync.concurrency | None = None
            try:
                if not concurrency:
                    pg_sync.rate_limit(name, occupy, wait_seconds, client=client)
                else:
                    held = pg_sync.concurrency(name, occupy, wait_seconds, lease_duration=lease_duration, client=client)
                    held.__enter__()
            except AcquireConcurrencySlotTimeoutError as error:
                return refused(name, error)
            except ConfigurationError:
                return unavailable()
            if held is None:
                return view(request, *args, **kwargs)
            try:
                return view(request, *args, **kwargs)
            finally:
                held.__exit__(None, None, None)

        return sync_view  # type: ignore[return-value]

    return decorate


# ---- tasks and other functions ---------------------------------------------------------------


def limited(
    *,
    concurrency: str | Sequence[str] | None = None,
    rate_limit: str | Sequence[str] | None = None,
    occupy: int = 1,
    wait_seconds: float | None = None,
    lease_duration: float = 300.0,
    client: Client | None = None,
) -> Callable[[F], F]:
    """Runs the decorated function (a Django task's, under ``@task``) with ``occupy`` slots of every
    ``concurrency`` limit held and ``occupy`` rate slots of every ``rate_limit`` taken. Names may
    use the function's arguments (``"tenant:{tenant_id}"``), checked against its signature when
    declared. Waits for the slots as long as it takes, or ``wait_seconds`` (then raises
    ``AcquireConcurrencySlotTimeoutError``, whose ``retry_after`` says when to try again)."""

    def decorate(function: F) -> F:
        guard = Guard(
            function,
            concurrency=concurrency,
            rate_limit=rate_limit,
            occupy=occupy,
            wait_seconds=wait_seconds,
            lease_duration=lease_duration,
            client=client,
            decorator="pgslots.django.limited",
        )

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with guard.held(args, kwargs):
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


__all__ = ["client_address", "configure_from_settings", "header", "limit_view", "limited", "settings_dsn", "user"]
