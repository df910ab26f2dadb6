"""``pgslots metrics`` and ``pgslots ui``: every limit in Prometheus's text format, and a live web
page of them (the app in ``app``, its files in ``static/``), served by uvicorn."""

from __future__ import annotations

import secrets
import socket

import click

from pgslots.metrics import read as read_metrics

from ..app import State, cli, fail, pass_state
from .guards import loopback as _loopback
from .sampler import Sampler


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
    """Serve a web page of every limit, updated live: slots held, holders, waiters, grants and
    refusals per second, templates with their busiest keys; a limit's name opens its charts (since
    the page started sampling, up to an hour). Also /metrics (Prometheus) and /api/limits (JSON). Read-only unless --allow-admin; admin
    actions need the token printed at start. Ctrl-C to stop.

    \b
    Example, while 'pgslots demo' runs in another terminal:
      pgslots ui            then open http://127.0.0.1:8787/
    """
    try:
        import uvicorn

        from .app import Board, build
    except ImportError:
        fail("pgslots ui needs Starlette and uvicorn: pip install 'pgslots[ui]'.")
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
    app = build(Board(client, sampler, token, allow_admin, loopback))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)  # connections wait from now on, while uvicorn starts
    except OSError as exc:
        listener.close()
        fail(f"Cannot listen on {host}:{port} ({exc.strerror}). Choose another --port.")
    sampler.start()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"pgslots ui: http://{shown}:{listener.getsockname()[1]}/  (metrics at /metrics; Ctrl-C to stop)")
    if allow_admin:
        click.echo(f"Admin actions are on; token: {token}")
    else:
        click.echo("Read-only (start with --allow-admin to change limits from the page).")
    if token and not allow_admin and not loopback:
        click.echo("Every request needs the token given.")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False))
    try:
        server.run(sockets=[listener])
    finally:
        sampler.stop()
        listener.close()
    click.echo("Stopped.")
