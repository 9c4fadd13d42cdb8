"""The ``zenith`` command end to end against real pageserver processes."""

from __future__ import annotations

import re
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures import PageserverProc, free_port, make_pageserver, stop_all, zenith
from zenith.pageserver.pidfile import running_pid


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for a parent that never reaps is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _all_commands() -> list[list[str]]:
    from zenith.cli.main import main

    out: list[list[str]] = [[]]

    def walk(group: object, path: list[str]) -> None:
        for name, cmd in getattr(group, "commands", {}).items():
            out.append([*path, name])
            walk(cmd, [*path, name])

    walk(main, [])
    return out


COMMANDS = _all_commands()


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess[str]]:
    """``zenith ... --help`` of every command, each a fresh process, two at a time."""
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda words: zenith(*words, "--help"), COMMANDS)
        return {" ".join(words): res for words, res in zip(COMMANDS, done, strict=True)}


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "zenith")
def test_every_command_has_help(helps: dict[str, subprocess.CompletedProcess[str]],
                                words: list[str]) -> None:
    res = helps[" ".join(words)]
    assert res.returncode == 0 and "Usage:" in res.stdout, res.stderr


def test_start_stop_leave_nothing_behind(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    ps: PageserverProc = pageserver_factory()
    pid = running_pid(ps.config.pid_path)
    assert pid is not None and pid > 0
    again = ps.cli("start")
    assert again.returncode == 1 and "already running" in again.stderr
    foreground = ps.cli("pageserver", timeout=30)
    assert foreground.returncode == 1 and "already running" in foreground.stderr
    assert ps.cli("status").returncode == 0
    stopped = ps.cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(pid)
    assert not ps.config.pid_path.exists()
    assert running_pid(ps.config.pid_path) is None
    down = ps.cli("status")
    assert down.returncode == 1 and "cannot reach the pageserver" in down.stderr
    assert ps.cli("stop").returncode == 1
    # and it starts again on the same repository
    ps.start()
    assert ps.cli("status").returncode == 0


def test_init_files_and_secrets(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    res = zenith("-D", str(repo), "init", "--listen", f"127.0.0.1:{free_port()}")
    assert res.returncode == 0, res.stderr
    for name in ("config.toml", "users.json"):
        assert stat.S_IMODE((repo / name).stat().st_mode) == 0o600
    password = re.search(r'password = "([^"]+)"', (repo / "config.toml").read_text())
    assert password is not None
    assert password.group(1) not in (repo / "users.json").read_text()
    assert "SCRAM-SHA-256$4096:" in (repo / "users.json").read_text()
    again = zenith("-D", str(repo), "init")
    assert again.returncode == 1 and "already holds a zenith repository" in again.stderr
    bad = zenith("-D", str(tmp_path / "x"), "init", "--listen", "nowhere")
    assert bad.returncode == 1 and "invalid listen address" in bad.stderr
    assert not (tmp_path / "x" / "config.toml").exists()
    missing = zenith("-D", str(tmp_path / "none"), "status")
    assert missing.returncode == 1 and "no zenith repository" in missing.stderr


def test_branches_generate_and_digest(pageserver: PageserverProc) -> None:
    empty = pageserver.cli("branch", "list", check=True)
    assert "no branches yet" in empty.stdout
    gen = pageserver.cli("generate", "main", "--pages", "50", "--rounds", "3", "--seed", "1",
                         check=True)
    m = re.search(r"main: 150 records, 0/0\.\.(\S+)", gen.stdout)
    assert m, gen.stdout
    assert "round 3/3" in gen.stderr
    end = m.group(1)
    mid_digest = pageserver.cli("digest", f"main@{end}", check=True).stdout.split()[0]
    created = pageserver.cli("branch", "create", "dev", "--from", f"main@{end}", check=True)
    assert f"at {end}" in created.stdout
    pageserver.cli("generate", "dev", "--pages", "10", "--seed", "2", check=True)
    pageserver.cli("generate", "main", "--pages", "5", "--seed", "3", check=True)
    pageserver.cli("branch", "create", "feature", "--from", "dev", check=True)
    listing = pageserver.cli("branch", "list", check=True).stdout.splitlines()
    assert listing[0].split() == ["NAME", "TIMELINE", "ANCESTOR@LSN", "LAST_RECORD_LSN"]
    assert listing[1].startswith("main ")
    assert listing[2].startswith("└─ dev ") and f"main@{end}" in listing[2]
    assert listing[3].startswith("   └─ feature ") and "dev@" in listing[3]
    # dev at its branch point is main at that point
    dev_at = pageserver.cli("digest", f"dev@{end}", check=True).stdout.split()[0]
    assert dev_at == mid_digest
    dev_now = pageserver.cli("digest", "dev", check=True).stdout.split()[0]
    assert dev_now != mid_digest
    # regenerating the same seed elsewhere gives the same state: deterministic
    pageserver.cli("generate", "copy", "--pages", "50", "--rounds", "3", "--seed", "1", check=True)
    copy = pageserver.cli("digest", "copy", check=True).stdout.split()[0]
    assert copy == mid_digest


@pytest.fixture(scope="module")
def with_main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageserverProc]:
    """One pageserver with a branch ``main``, shared by the refusals (which change nothing)."""
    ps = make_pageserver(tmp_path_factory.mktemp("refusals") / "ps")
    try:
        ps.start()
        ps.cli("generate", "main", "--pages", "2", check=True)
        yield ps
    finally:
        stop_all([ps])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["digest", "nope"], 'branch "nope" does not exist'),
        (["digest", "main@zz"], "invalid LSN"),
        (["digest", "main@FF/0"], "beyond the last record LSN"),
        (["branch", "create", "x", "--from", "nope"], 'branch "nope" does not exist'),
        (["branch", "create", "bad name"], "invalid branch name"),
        (["branch", "create", "main"], 'branch "main" already exists'),
        (["branch", "create", "y", "--from", "main@FF/0"], "beyond the last record LSN"),
        (["branch", "delete", "nope"], 'branch "nope" does not exist'),
        (["user", "remove", "nobody"], 'user "nobody" does not exist'),
        (["user", "remove", "admin"], "last admin"),
    ],
)
def test_errors_are_one_clear_line(with_main: PageserverProc, args: list[str],
                                   message: str) -> None:
    res = with_main.cli(*args)
    assert res.returncode == 1, res.stdout
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr


def test_users(pageserver: PageserverProc) -> None:
    pageserver.add_user("alice", "pw-a", "push")
    dup = pageserver.cli("user", "add", "alice", "--password-stdin", input="x\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    listed = pageserver.cli("user", "list", check=True).stdout.split()
    assert listed == ["admin", "admin", "alice", "push"]
    stored = (pageserver.path / "users.json").read_text()
    assert "pw-a" not in stored
    assert '"md5_hash": null' in stored and '"md5_hash": "md5' not in stored  # SCRAM only
    pageserver.cli("user", "remove", "alice", check=True)
    assert "alice" not in pageserver.cli("user", "list", check=True).stdout
    invalid = pageserver.cli("user", "add", "bad name", "--password-stdin", input="x\n")
    assert invalid.returncode == 1 and "invalid user name" in invalid.stderr


def test_stop_waits_for_clean_shutdown(pageserver: PageserverProc) -> None:
    pageserver.cli("generate", "main", "--pages", "10", check=True)
    t = time.monotonic()
    pageserver.cli("stop", check=True)
    assert time.monotonic() - t < 30
    log = pageserver.config.log_path.read_text()
    assert "shutting down" in log and "stopped" in log
