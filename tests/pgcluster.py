"""A throwaway PostgreSQL 15 cluster for tests and benchmarks (as asyncpg's TempCluster).

PostgreSQL refuses to run as root, so when we are root the cluster belongs to the
``postgres`` user and every server binary runs through ``runuser``. The cluster listens on
127.0.0.1 on a free port and is always stopped by ``stop()`` / the context manager.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *args]
    return args


class PgCluster:
    def __init__(
        self, *, initdb_args: tuple[str, ...] = (), settings: dict[str, str] | None = None
    ):
        self.base = Path(tempfile.mkdtemp(prefix="zenith-pg-"))
        os.chmod(self.base, 0o755)
        self.datadir = self.base / "data"
        self.port = _free_port()
        self.initdb_args = initdb_args
        self.settings = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                         "unix_socket_directories": f"'{self.base}'", "fsync": "on",
                         **(settings or {})}
        self.running = False

    def run(self, binary: str, *args: str, check: bool = True, timeout: float = 600,
            **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(as_postgres([str(PGBIN / binary), *args]), check=check,
                              capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]

    def init(self) -> PgCluster:
        if os.geteuid() == 0:
            shutil.chown(self.base, PG_USER, PG_USER)
        self.run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres",
                 "--no-sync", *self.initdb_args)
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        return self

    def start(self) -> PgCluster:
        self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.base / "log"), "-w",
                 "-t", "60", "start")
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False)
            self.running = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def uri(self, user: str = "postgres", db: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.uri(db=db),
                              "-c", sql], check=True, capture_output=True, text=True, timeout=600)
        return out.stdout.strip()

    def __enter__(self) -> PgCluster:
        try:
            return self.init().start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                       check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("PostgreSQL did not become ready")
            time.sleep(0.1)
