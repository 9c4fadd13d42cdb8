"""Fixtures shared by the tests that run real pageserver processes (a pytest plugin).

A pageserver is set up as a user would: ``zenith init`` then ``zenith start`` on a free
loopback port in a temporary directory, and always stopped (killed if need be) when the
test ends, whatever happened: as ``zenith stop`` stops it (SIGTERM, then wait until it has
shut down), all of a test's pageservers at once and without a CLI process each.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from zenith.pageserver.config import RepoConfig
from zenith.pageserver.pidfile import process_alive, running_pid

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zenith(*args: str, input: str | None = None, env: dict[str, str] | None = None,
           timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the ``zenith`` CLI as a user would (same interpreter, fresh process)."""
    proc = subprocess.run(
        [sys.executable, "-m", "zenith.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"zenith {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class PageserverProc:
    path: Path
    port: int

    @property
    def config(self) -> RepoConfig:
        return RepoConfig.load(self.path)

    def cli(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return zenith("-D", str(self.path), *args, **kw)  # type: ignore[arg-type]

    def uri(self, user: str | None = None, password: str | None = None, db: str = "zenith",
            query: str = "?sslmode=disable", port: int | None = None) -> str:
        """A URI for this pageserver. Test pageservers have no TLS, and origins default to
        ``sslmode=verify-full``: the default ``query`` says ``sslmode=disable`` (loopback)."""
        if user is None:
            user, password = self.config.cli_credentials
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{db}{query}"

    def add_user(self, name: str, password: str, role: str) -> None:
        self.cli("user", "add", name, "--role", role, "--password-stdin", input=password + "\n",
                 check=True)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.cli("start", check=True, env=env)

    def kill(self) -> None:
        """SIGKILL the running pageserver (a crash), and wait until it is gone."""
        pid = running_pid(self.config.pid_path)
        assert pid is not None, "not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while running_pid(self.config.pid_path) is not None:
            assert time.monotonic() < deadline, "killed pageserver still holds its pid file"
            time.sleep(0.02)

    def query(self, sql: str) -> list[dict[str, str | None]]:
        """Rows of one command, through psycopg (a real client)."""
        import psycopg

        with psycopg.connect(self.uri(), autocommit=True) as conn:
            cur = conn.execute(sql)
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def digest(self, target: str) -> str:
        return str(self.query(f"digest {target}")[0]["digest"])

    def branch(self, name: str) -> dict[str, str | None]:
        rows = [r for r in self.query("branch_list") if r["name"] == name]
        assert rows, f"no branch {name}"
        return rows[0]

    def stop(self) -> None:
        pid = running_pid(self.config.pid_path)
        if pid is None:
            return
        if self.cli("stop", timeout=60).returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


def make_pageserver(base: Path, *init_args: str) -> PageserverProc:
    port = free_port()
    ps = PageserverProc(base, port)
    ps.cli("init", "--listen", f"127.0.0.1:{port}", *init_args, check=True)
    return ps


def start_together(*pageservers: PageserverProc) -> tuple[PageserverProc, ...]:
    """``zenith start`` on each of ``pageservers`` at the same time (each its own CLI
    process, as from several shells); they are returned once every one serves."""
    with ThreadPoolExecutor(len(pageservers)) as pool:
        for started in [pool.submit(ps.start) for ps in pageservers]:
            started.result()
    return pageservers


def started_pageservers(factory: Callable[..., PageserverProc], *names: str
                        ) -> tuple[PageserverProc, ...]:
    """``factory(name=n)`` for each of ``names`` (``pageserver_factory``), but with their
    ``zenith start``s at the same time."""
    return start_together(*(factory(name=n, start=False) for n in names))


def stop_all(pageservers: Iterable[PageserverProc], timeout: float = 30) -> None:
    """Stop every running one of ``pageservers`` as ``zenith stop`` does (SIGTERM, then
    wait until its pid file is gone and it has exited), all at once; one still running
    after ``timeout`` seconds is killed."""
    running = []
    for ps in pageservers:
        pid_path = ps.config.pid_path
        pid = running_pid(pid_path)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            running.append((pid_path, pid))
    deadline = time.monotonic() + timeout
    for pid_path, pid in running:
        while running_pid(pid_path) is not None or process_alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
                break
            time.sleep(0.02)


@pytest.fixture
def pageserver_factory(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    started: list[PageserverProc] = []

    def factory(*init_args: str, name: str = "ps", start: bool = True) -> PageserverProc:
        ps = make_pageserver(tmp_path / f"{name}{len(started)}", *init_args)
        started.append(ps)
        if start:
            ps.start()
        return ps

    yield factory
    stop_all(started)


@pytest.fixture
def pageserver(pageserver_factory: callable) -> PageserverProc:  # type: ignore[valid-type]
    return pageserver_factory()  # type: ignore[no-any-return]
