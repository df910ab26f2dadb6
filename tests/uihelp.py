"""`pgslots ui` as a real server process in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str, token: str | None) -> None:
        self.proc, self.url, self.token = proc, url, token

    def request(self, path: str, method: str = "GET", token: str | None = None, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read().decode()
                return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")


def serve(dsn: str, *args: str) -> Iterator[Served]:
    """`pgslots ui` as a real server on a free loopback port, for the length of a test."""
    env = {**os.environ, "PGSLOTS_DSN": dsn}
    env.pop("PGSLOTS_UI_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgslots_cli", "ui", "--port", "0", "--interval", "0.5", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("pgslots ui: http://127.0.0.1:"), first
        url = first.split()[2]
        second = proc.stdout.readline()
        token = second.split("token: ")[1].strip() if "token: " in second else None
        yield Served(proc, url, token)
    finally:
        proc.terminate()
        proc.wait(10)
