"""Real servers on loopback for the integrations' tests: an ASGI app of this directory served by
uvicorn in a subprocess, and a Redis server (Debian's) for Celery's broker. Each stops when its
block ends; a missing component fails under CI and skips elsewhere."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from strict_downstream import free_port, running

HERE = Path(__file__).resolve().parent


def need(component: str, found: bool, install: str) -> None:
    if not found:
        message = f"{component} is not installed ({install}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI never passes by skipping
        pytest.skip(message)


@contextmanager
def uvicorn_app(app: str, env: dict[str, str]) -> Iterator[str]:
    """Serves ``app`` ("module:attribute", a module of tests/) with uvicorn on a free loopback port;
    yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    with running(command, port, f"uvicorn {app}", env={**os.environ, **env}):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A Redis server on a free loopback port, keeping nothing on disk; yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    need("redis-server", os.path.exists(binary), "apt-get install redis-server")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    with running(command, port, "redis-server"):
        yield f"redis://127.0.0.1:{port}"
