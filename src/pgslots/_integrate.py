"""What the framework integrations share, with no framework imported: limit names made from a
function's arguments (checked against its signature when declared), keys of templates taken from
requests (checked before they reach the database), the slots a guarded function holds, and the
headers of a refusal (``Retry-After`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields)."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _validate as check
from . import sync as pg_sync
from .client import Client, default_client
from .errors import InvalidArgumentError, InvalidLimitNameError, PgSlotsError
from .types import LimitInfo

_FORBIDDEN = re.compile(r"[/%&><]")
MAX_KEY_CHARS = 200


class NameTemplate:
    """A limit name that may name a function's arguments: ``"tenant:{tenant_id}"`` (``str.format``
    fields, attributes and indexes allowed: ``"{order.customer_id}"``). Checked when declared:
    every field must be a parameter of the function."""

    def __init__(self, text: str, where: str) -> None:
        if not isinstance(text, str) or not text:
            raise InvalidArgumentError(f"{where}: a limit name must be a non-empty string, got {text!r}.")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as error:
            raise InvalidArgumentError(f"{where}: {text!r} is not a valid name template ({error}).") from None
        self.text, self.where = text, where
        self.fields: list[str] = []
        for _, field, _, _ in parsed:
            if field is None:
                continue
            root = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not root or root.isdigit():
                raise InvalidArgumentError(
                    f"{where}: {text!r} must name the function's parameters ({{tenant_id}}), not positions ({{{field}}})."
                )
            self.fields.append(root)
        if not self.fields:
            _check_name(text, where)

    def check_against(self, signature: inspect.Signature, function: str) -> None:
        has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        for field in self.fields:
            if field not in signature.parameters and not has_kwargs:
                raise InvalidArgumentError(
                    f"{self.where}: {self.text!r} names {{{field}}}, but {function}() has no parameter {field!r} "
                    f"(its parameters: {', '.join(signature.parameters) or 'none'})."
                )

    def render(self, arguments: dict[str, Any]) -> str:
        if not self.fields:
            return self.text
        try:
            name = self.text.format_map(arguments)
        except (KeyError, AttributeError, IndexError, TypeError) as error:
            raise InvalidArgumentError(f"{self.where}: cannot make a name from {self.text!r} of these arguments ({error}).") from None
        _check_name(name, self.where)
        return name


def _check_name(name: str, where: str) -> None:
    if _FORBIDDEN.search(name) or len(name) > 255:
        raise InvalidLimitNameError(f"{where}: {name[:80]!r} is not a valid limit name (at most 255 characters, none of / % & > <).")


def templates(value: str | Sequence[str] | None, where: str) -> list[NameTemplate]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [NameTemplate(item, where) for item in items]


class Guard:
    """The concurrency and rate limits one function runs under, their names made from its
    arguments. ``held(args, kwargs)`` takes the rate slots, then holds the concurrency slots for
    the block, each wait bounded by ``wait_seconds`` (None: as long as it takes)."""

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        concurrency: str | Sequence[str] | None,
        rate_limit: str | Sequence[str] | None,
        occupy: int,
        wait_seconds: float | None,
        lease_duration: float,
        client: Client | None,
        decorator: str,
    ) -> None:
        where = f"{decorator} on {getattr(function, '__qualname__', function)!r}"
        self.concurrency = templates(concurrency, where)
        self.rate = templates(rate_limit, where)
        if not self.concurrency and not self.rate:
            raise InvalidArgumentError(f"{where}: name at least one limit (concurrency= or rate_limit=).")
        check.number("occupy", occupy, minimum=1, integer=True)
        check.number("wait_seconds", wait_seconds, minimum=0, integer=False, allow_none=True)
        check.number("lease_duration", lease_duration, minimum=1, integer=False)
        self.signature = inspect.signature(function)
        for t in (*self.concurrency, *self.rate):
            t.check_against(self.signature, getattr(function, "__qualname__", "the function"))
        self.occupy, self.wait_seconds, self.lease_duration, self.client = occupy, wait_seconds, lease_duration, client

    def names(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[str], list[str]]:
        """The concurrency and rate limit names of one call."""
        bound = self.signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        for p in self.signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}))
        return [t.render(arguments) for t in self.concurrency], [t.render(arguments) for t in self.rate]

    @contextlib.contextmanager
    def held(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        held, rate = self.names(args, kwargs)
        if rate:
            pg_sync.rate_limit(rate, self.occupy, self.wait_seconds, client=self.client)
        if not held:
            yield
            return
        with pg_sync.concurrency(held, self.occupy, self.wait_seconds, lease_duration=self.lease_duration, client=self.client):
            yield


# ---- keys taken from requests ----------------------------------------------------------------


class Key:
    """A key taken from a request (by ``take``), named (``describe``) for the 400 answer when it is
    missing or unusable."""

    def __init__(self, describe: str, take: Callable[[Any], Any]) -> None:
        self.describe, self._take = describe, take

    def __call__(self, request: Any) -> Any:
        return self._take(request)


def header(name: str) -> Key:
    """The key is the value of request header ``name`` (``header("X-Tenant")``)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"header(): name the header the key is taken from, got {name!r}.")
    return Key(f"the {name} header", lambda request: request.headers.get(name))


def key_name(template: str, key: Any) -> str | None:
    """The name of ``key``'s limit under ``template`` (``"tenant:*"`` and ``"acme"``:
    ``"tenant:acme"``), or None when the key cannot name a limit: missing, empty, too long, with a
    character a name may not have or one that does not print. Keys come from callers: nothing they
    send reaches the database unchecked."""
    if key is None:
        return None
    text = str(key)
    if not text or len(text) > MAX_KEY_CHARS or _FORBIDDEN.search(text) or not text.isprintable():
        return None
    return template[:-1] + text


def check_request_limit(limit: Any, key: Any, occupy: Any, wait_seconds: Any, where: str, keys: str) -> None:
    """Checks what a web limit is declared with: a limit name, or a template with a ``key``
    (``keys`` lists the key functions the framework offers, for the error)."""
    if not isinstance(limit, str) or not limit:
        raise InvalidArgumentError(f"{where}: name the limit (or template, with key=), got {limit!r}.")
    if key is not None:
        if not callable(key):
            raise InvalidArgumentError(f"{where}: key= must be {keys} or a function of the request.")
        if not limit.endswith("*") or limit == "*" or limit.endswith("**"):
            raise InvalidArgumentError(f"{where}: with key=, the limit must be a template such as 'tenant:*', got {limit!r}.")
        _check_name(limit, where)
    elif limit.endswith("*"):
        raise InvalidArgumentError(f"{where}: {limit!r} is a template: say which key of it a request uses with key=.")
    check.number("occupy", occupy, minimum=1, integer=True)
    check.number("wait_seconds", wait_seconds, minimum=0, integer=False)


# ---- the answer to a refusal -----------------------------------------------------------------


def _sf_string(text: str) -> str:
    """A structured-field string (RFC 8941): printable ASCII, with quote and backslash escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_window(info: LimitInfo) -> int | None:
    """The seconds a limit's quota is counted over: a window limit's window, a bucket's time to
    refill from empty; None for a limit of held slots."""
    if info.window_seconds > 0:
        return max(1, math.ceil(info.window_seconds))
    if info.slot_decay_per_second > 0:
        return max(1, math.ceil(info.limit / info.slot_decay_per_second))
    return None


def refusal_headers(policy: str, info: LimitInfo | None, retry_after: float | None) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and, when the limit is known, the IETF
    ``RateLimit-Policy`` (its quota ``q`` over ``w`` seconds) and ``RateLimit`` (``r``=0 remaining,
    ``t`` seconds until it resets) fields."""
    wait = 1 if retry_after is None or not math.isfinite(retry_after) else max(1, math.ceil(retry_after))
    headers = {"Retry-After": str(wait)}
    if info is not None:
        name = _sf_string(policy)
        window = policy_window(info)
        headers["RateLimit-Policy"] = f"{name};q={info.limit}" + ("" if window is None else f";w={window}")
        headers["RateLimit"] = f"{name};r=0;t={wait}"
    return headers


class LimitCache:
    """The limits a refusal describes, read at most once per ``seconds`` per name (a refusal under
    load must not cost a read each); a limit that cannot be read is described as unknown."""

    def __init__(self, seconds: float = 30.0) -> None:
        self._seconds = seconds
        self._known: dict[str, tuple[float, LimitInfo | None]] = {}
        self._lock = threading.Lock()

    def get(self, client: Client | None, name: str) -> LimitInfo | None:
        now = time.monotonic()
        with self._lock:
            hit = self._known.get(name)
        if hit is not None and now - hit[0] < self._seconds:
            return hit[1]
        try:
            info: LimitInfo | None = (client or default_client()).read_limit(name)
        except PgSlotsError:
            info = None
        with self._lock:
            if len(self._known) > 1000:
                self._known.clear()
            self._known[name] = (now, info)
        return info
