"""A real, throw-away PostgreSQL server for the storage tests: initdb + pg_ctl in a temp directory.

The server binaries come from the machine (Debian's postgresql package; .ci/run installs it where it
is missing). PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REQUIRE_ENV = "WATCHER_REQUIRE_POSTGRES"  # set by .ci/run: a missing server is then a failure, not a skip


def find_pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server in its own directory under the system temp dir (pytest's are private to root, and the
    server may run as another user)."""

    def __init__(self, pg_bin: Path):
        self.root = Path(tempfile.mkdtemp(prefix="watcher-pg-"))
        self.pg_bin = pg_bin
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        if self._as_user:
            shutil.chown(self.root, "postgres", "postgres")
        if not self.data.exists():
            self._run(str(self.pg_bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8")
        self._run(str(self.pg_bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -h 127.0.0.1", "start")
        return self

    def stop(self) -> None:
        subprocess.run([*self._as_user, str(self.pg_bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
