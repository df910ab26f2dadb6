"""``pgslots ui``: a live web page of the limits, and ``/metrics`` for Prometheus.

Python's own ``http.server`` serves one page (``ui_page.PAGE``: HTML, CSS and JavaScript in one
file, charts drawn as SVG, no build step) and a small JSON API under ``/api/``. A thread samples
the counters every few seconds and keeps an hour of them for the charts. Admin actions exist only
with ``--allow-admin`` and need the token printed at start, sent as ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import json
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import click

import pgslots
from pgslots.client import Client
from pgslots.metrics import read as read_metrics
from pgslots.types import LeaseInfo, LimitInfo, Overview

from .app import State, cli, fail, pass_state
from .output import dumps, limit_json
from .ui_page import PAGE

HISTORY_SECONDS = 3600.0
BUSIEST_SHOWN = 5


HOLDERS_SHOWN = 10  # per limit and key


def page_json(seen: Overview, now: datetime) -> dict[str, Any]:
    """What /api/limits answers, from one overview: every limit and template as the database gives
    its figures (a template's summed over its keys), each with its holders, a template with its
    busiest keys and theirs."""

    def holder(lease: LeaseInfo) -> dict[str, Any]:
        return {
            "lease_id": str(lease.lease_id),
            "slots": lease.slots,
            "host": lease.host,
            "pid": lease.pid,
            "application": lease.application_name,
            "holder": lease.holder,
            "held_seconds": max(0.0, (now - lease.acquired_at).total_seconds()),
            "expired": lease.expired,
            "gone": lease.gone,
        }

    def row(info: LimitInfo) -> dict[str, Any]:
        return limit_json(info) | {"holders": [holder(h) for h in seen.holders.get(info.name, [])]}

    rows = []
    for info in seen.limits:
        shown = row(info)
        if info.is_template:
            shown["busiest"] = [row(k) for k in seen.busiest.get(info.name, [])]
        rows.append(shown)
    return {"limits": rows, "holders_note": seen.holders_error, "time": now.isoformat()}


MAX_BODY = 65536  # bytes of an admin action's JSON


def _loopback(host: str) -> bool:
    """True for exactly "localhost" and loopback addresses (127.0.0.0/8, ::1): no other name, so a
    page whose name merely starts like one (127.0.0.1.attacker.example) is not served."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str | None:
    """The name in a Host header without its port ("[::1]:8787" -> "::1"); None when malformed."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else "?"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return header[1:end]
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name


class Sampler:
    """Reads every limit every `interval` seconds and keeps an hour of (time, grants, refusals,
    occupancy) per limit, from which the page draws its charts."""

    def __init__(self, client: Client, interval: float) -> None:
        self.client, self.interval = client, interval
        size = int(HISTORY_SECONDS / interval) + 1
        self.points: dict[str, collections.deque[tuple[float, int, int, float]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=size)
        )
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgslots-ui-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self.error = None
            except pgslots.PgSlotsError as exc:
                self.error = str(exc)
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        limits = self.client.overview(busiest=0, holders=0).limits
        with self._lock:
            for info in limits:
                capacity = info.limit * (info.instances or 0) if info.is_template else info.limit
                used = info.held_slots
                self.points[info.name].append((now, info.grants_total, info.refusals_total, used / capacity if capacity else 0.0))
            for gone in set(self.points) - {i.name for i in limits}:
                del self.points[gone]

    def history(self) -> dict[str, list[list[float]]]:
        """Per limit: [time, grants/s, refusals/s, utilisation] between consecutive samples."""
        out: dict[str, list[list[float]]] = {}
        with self._lock:
            for name, points in self.points.items():
                series, previous = [], None
                for point in points:
                    if previous is not None and point[0] > previous[0]:
                        span = point[0] - previous[0]
                        series.append(
                            [
                                point[0],
                                max(0, point[1] - previous[1]) / span,
                                max(0, point[2] - previous[2]) / span,
                                point[3],
                            ]
                        )
                    previous = point
                out[name] = series
        return out


class Dashboard:
    """What the request handlers share: the client, the sampler, the token and the admin switch."""

    def __init__(self, client: Client, sampler: Sampler, token: str | None, allow_admin: bool, loopback: bool) -> None:
        self.client, self.sampler = client, sampler
        self.token, self.allow_admin, self.loopback = token, allow_admin, loopback

    def authorized(self, header: str | None) -> bool:
        if self.token is None or header is None or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].encode(), self.token.encode())

    def limits(self) -> dict[str, Any]:
        seen = self.client.overview(busiest=BUSIEST_SHOWN, holders=HOLDERS_SHOWN)
        return page_json(seen, datetime.now(UTC)) | {"admin": self.allow_admin, "sample_error": self.sampler.error}

    def act(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One admin action; raises PgSlotsError (shown to the page) on a bad request."""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        client = self.client
        if parts == ["api", "limits"]:
            name = body.get("name")
            if not isinstance(name, str):
                raise pgslots.InvalidArgumentError("Give the new limit a name.")
            info = client.create_limit(
                name,
                body.get("limit"),  # type: ignore[arg-type]
                slot_decay_per_second=body.get("slot_decay_per_second", 0.0),
                window_seconds=body.get("window_seconds", 0.0),
                shadow=body.get("shadow", False),
                margin_seconds=body.get("margin_seconds"),
            )
            return {"done": f"Created {info.name!r}."}
        if len(parts) == 4 and parts[:2] == ["api", "limits"]:
            name, action = parts[2], parts[3]
            if action in ("enable", "disable"):
                client.update_limit(name, active=action == "enable")
                return {"done": f"{action.capitalize()}d {name!r}."}
            if action == "update":
                fields = {k: body[k] for k in ("limit", "slot_decay_per_second", "window_seconds", "shadow", "margin_seconds") if k in body}
                client.update_limit(name, **fields)
                return {"done": f"Updated {name!r}."}
            if action == "delete":
                client.delete_limit(name)
                return {"done": f"Deleted {name!r}."}
        if len(parts) == 4 and parts[:2] == ["api", "leases"] and parts[3] == "release":
            released = client.release(parts[2])
            return {"done": "Released." if released else "That lease was already gone."}
        raise LookupError(path)


def handler_for(board: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pgslots-ui"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            return  # quiet: one line per request would drown the token line

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: Any) -> None:
            self._send(status, dumps(value).encode(), "application/json")

        def _local_host(self) -> bool:
            # On loopback, a page of another site that rebinds its name to 127.0.0.1 sends its own
            # name as Host: only loopback names are served.
            if not board.loopback:
                return True
            host = _host_name(self.headers.get("Host") or "")
            if host is not None and _loopback(host):
                return True
            self._json(403, {"error": f"Host {self.headers.get('Host')!r} is not a loopback name: open http://127.0.0.1:PORT/."})
            return False

        def _readable(self) -> bool:
            # Beyond loopback, reading needs the token too.
            if board.loopback or board.authorized(self.headers.get("Authorization")):
                return True
            self._json(401, {"error": "This page needs the token printed when pgslots ui started: send Authorization: Bearer TOKEN."})
            return False

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            path = urlsplit(self.path).path
            if not self._local_host():
                return
            if path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                return
            if not self._readable():
                return
            try:
                if path == "/metrics":
                    self._send(200, read_metrics(board.client).encode(), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/api/limits":
                    self._json(200, board.limits())
                elif path == "/api/history":
                    self._json(200, board.sampler.history())
                else:
                    self._json(404, {"error": f"Nothing at {path}."})
            except pgslots.PgSlotsError as exc:
                self._json(503, {"error": str(exc)})

        def do_POST(self) -> None:  # noqa: N802
            if not self._local_host():
                return
            if not board.allow_admin:
                self._json(403, {"error": "This page is read-only: start it with 'pgslots ui --allow-admin' to change limits."})
                return
            if not board.authorized(self.headers.get("Authorization")):
                self._json(401, {"error": "Admin actions need the token printed when pgslots ui started (Authorization: Bearer TOKEN)."})
                return
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not declared.isascii() or not declared.isdigit() or int(declared) > MAX_BODY:
                self._json(400, {"error": f"Content-Length must be a number of bytes from 0 to {MAX_BODY}."})
                return
            try:
                body = json.loads(self.rfile.read(int(declared)) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if not isinstance(body, dict):
                self._json(400, {"error": "Send a JSON object (at most 64 KiB)."})
                return
            try:
                self._json(200, board.act(urlsplit(self.path).path, body))
            except LookupError:
                self._json(404, {"error": f"No action at {self.path}."})
            except (pgslots.PgSlotsError, TypeError) as exc:
                self._json(400, {"error": str(exc)})

    return Handler


@cli.command(short_help="Print every limit in Prometheus's text format.")
@click.option("--per-key", is_flag=True, help="Also list each template's busiest keys as series of their own (see --keys).")
@click.option(
    "--keys",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="With --per-key: how many keys of each template, the busiest first.",
)
@pass_state
def metrics(state: State, per_key: bool, keys: int) -> None:
    """Print every limit's gauges and counters in Prometheus's text exposition format:
    pgslots_limit_slots, pgslots_active_slots, pgslots_leased_slots, pgslots_waiters,
    pgslots_oldest_waiter_seconds, pgslots_instances (templates), pgslots_grants_total,
    pgslots_refusals_total, pgslots_wait_seconds_total, pgslots_expired_leases_total and
    pgslots_shadow_refusals_total, each labelled limit="NAME". A template is one series (its
    per-key limit, its keys' sums, summed by the database); --per-key adds its --keys busiest keys,
    each labelled with its template. 'pgslots ui' serves the same (without keys) at /metrics.
    """
    click.echo(read_metrics(state.client, per_key=keys if per_key else 0), nl=False)


@cli.command(short_help="Serve a live web page of the limits, and /metrics.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; beyond loopback a token is required.")
@click.option("--port", type=click.IntRange(0, 65535), default=8787, show_default=True, help="Port (0: any free port).")
@click.option("--allow-admin", is_flag=True, help="Offer create, update, enable, disable, delete and force-release (token required).")
@click.option(
    "--token",
    envvar="PGSLOTS_UI_TOKEN",
    help="The token admin actions (and, beyond loopback, every request) need; default: a new random one, printed at start.",
)
@click.option("--interval", type=click.FloatRange(min=0.5), default=2.0, show_default=True, help="Seconds between samples for the charts.")
@pass_state
def ui(state: State, host: str, port: int, allow_admin: bool, token: str | None, interval: float) -> None:
    """Serve a web page of every limit, updated live: occupancy, holders, waiters, grants and
    refusals per second and utilisation over the last hour, templates with their busiest keys.
    Also /metrics (Prometheus) and /api/limits (JSON). Read-only unless --allow-admin; admin
    actions need the token printed at start. Ctrl-C to stop.

    \b
    Example, while 'pgslots demo' runs in another terminal:
      pgslots ui            then open http://127.0.0.1:8787/
    """
    loopback = _loopback(host)
    if not loopback and not token:
        fail(f"Refusing to listen on {host} without a token: pass --token (or PGSLOTS_UI_TOKEN), or listen on 127.0.0.1.")
    if token is not None and len(token) < 16:
        fail("The token must be at least 16 characters long.")
    if allow_admin and token is None:
        token = secrets.token_urlsafe(24)
    client = state.client
    client.read_limits([])  # fail now, with the usual message, if the database cannot be reached
    sampler = Sampler(client, interval)
    board = Dashboard(client, sampler, token, allow_admin, loopback)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    try:
        server = server_class((host, port), handler_for(board))
    except OSError as exc:
        fail(f"Cannot listen on {host}:{port} ({exc.strerror}). Choose another --port.")
    sampler.start()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"pgslots ui: http://{shown}:{server.server_address[1]}/  (metrics at /metrics; Ctrl-C to stop)", err=False)
    if allow_admin:
        click.echo(f"Admin actions are on; token: {token}")
    else:
        click.echo("Read-only (start with --allow-admin to change limits from the page).")
    if token and not allow_admin and not loopback:
        click.echo("Every request needs the token given.")
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        click.echo("Stopped.")
    finally:
        sampler.stop()
        server.server_close()
