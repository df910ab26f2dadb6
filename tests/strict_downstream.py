"""Strict downstream services on loopback, for tests of margin_seconds: nginx's limit_req (a token
bucket, Debian's nginx) and a sliding-window server (this file, run as a script). Each counts
requests as they reach it, on its own clock, and answers 429 beyond its limit.

    python tests/strict_downstream.py PORT LIMIT WINDOW_SECONDS

serves GET on 127.0.0.1:PORT (HTTP/1.1, keep-alive): 200 while fewer than LIMIT requests were
accepted in the last WINDOW_SECONDS (half-open, as pgslots counts), else 429. It prints "ready" when
it listens and stops by itself after 120 s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on 127.0.0.1:{port} within 20 s")


@contextmanager
def running(command: list[str], port: int, what: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _wait_for_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def nginx_bucket(workdir: Path, rate_per_second: int, burst: int) -> Iterator[str]:
    """nginx with one limit_req zone (one key for every request) of ``rate_per_second`` and
    ``burst`` (nodelay: excess within the burst is served at once, beyond it refused with 429).
    nginx's bucket admits burst + 1 at once: the same as a pgslots limit of burst + 1. Yields the
    URL of a static file behind it (limit_req runs before the content phase; `return` would not)."""
    if not os.path.exists(NGINX):
        message = "nginx is not installed (apt-get install nginx-light; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI never passes by skipping
        pytest.skip(message)
    port = free_port()
    (workdir / "www").mkdir(parents=True, exist_ok=True)
    (workdir / "www" / "ok").write_text("ok\n")
    temp = {k: workdir / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the file in workdir
    (workdir / "nginx.conf").write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    limit_req_zone $server_name zone=strict:1m rate={rate_per_second}r/s;
    limit_req_status 429;
    server {{
        listen 127.0.0.1:{port};
        server_name strict;
        keepalive_requests 100000;
        location / {{
            limit_req zone=strict burst={burst} nodelay;
            root {workdir}/www;
        }}
    }}
}}
"""
    )
    command = [NGINX, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]
    with running(command, port, "nginx"):
        yield f"http://127.0.0.1:{port}/ok"


@contextmanager
def sliding_window(limit: int, window_seconds: float) -> Iterator[str]:
    """The sliding-window server of this file, in a subprocess. Yields its URL."""
    port = free_port()
    with running([sys.executable, __file__, str(port), str(limit), str(window_seconds)], port, "the sliding-window server"):
        yield f"http://127.0.0.1:{port}/ok"


async def _serve(port: int, limit: int, window: float) -> None:
    accepted: collections.deque[float] = collections.deque()

    def admit() -> bool:
        now = time.time()
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        if len(accepted) >= limit:
            return False
        accepted.append(now)
        return True

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                status = b"200 OK" if admit() else b"429 Too Many Requests"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await asyncio.sleep(120)


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
