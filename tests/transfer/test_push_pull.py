"""Push and pull end to end: the CLI against two or three real pageserver processes, with
branch state and digests checked on both sides (DESIGN §6, issue 4)."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time

import pytest

from tests.fixtures import PageserverProc, free_port, started_pageservers


@pytest.fixture
def pair(pageserver_factory) -> tuple[PageserverProc, PageserverProc]:  # type: ignore[no-untyped-def]
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    return laptop, cloud


def records_sent(out: str) -> int:
    m = re.search(r"(\d+) records", out)
    assert m, out
    return int(m.group(1))


def test_new_incremental_and_up_to_date(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "200", "--rounds", "2", check=True)
    first = laptop.cli("push", "main", "cloud", check=True).stdout
    assert first.startswith("* [new branch] main -> cloud:main 0/0..")
    assert records_sent(first) == 400
    src, dst = laptop.branch("main"), cloud.branch("main")
    assert dst["timeline_id"] == src["timeline_id"]  # the same timeline id on both sides
    assert dst["last_record_lsn"] == src["last_record_lsn"]
    assert cloud.digest("main") == laptop.digest("main")

    again = laptop.cli("push", "main", "cloud", check=True).stdout
    assert again.strip() == "Everything up-to-date"

    laptop.cli("generate", "main", "--pages", "7", "--seed", "9", check=True)
    inc = laptop.cli("push", "main", "cloud", check=True).stdout
    assert inc.startswith(f"main -> cloud:main {src['last_record_lsn']}..")
    assert records_sent(inc) == 7  # only (dest_lsn, src_lsn]
    assert cloud.digest("main") == laptop.digest("main")
    # the old state is still readable on the remote at the old LSN
    old = f"main@{src['last_record_lsn']}"
    assert cloud.digest(old) == laptop.digest(old)


def test_child_branch_sends_only_its_records(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "100", check=True)
    laptop.cli("push", "main", "cloud", check=True)
    laptop.cli("branch", "create", "dev", "--from", "main", check=True)
    laptop.cli("generate", "dev", "--pages", "5", "--seed", "3", check=True)
    laptop.cli("generate", "main", "--pages", "100", "--seed", "4", check=True)  # not needed
    out = laptop.cli("push", "dev", "cloud", check=True).stdout
    assert out.startswith("* [new branch] dev -> cloud:dev")
    assert records_sent(out) == 5
    dev = cloud.branch("dev")
    assert dev["ancestor_timeline_id"] == laptop.branch("main")["timeline_id"]
    assert dev["ancestor_lsn"] == laptop.branch("dev")["ancestor_lsn"]
    assert cloud.digest("dev") == laptop.digest("dev")


def test_missing_ancestor_is_sent_up_to_the_branch_point(
    pair: tuple[PageserverProc, PageserverProc],
) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "30", check=True)
    laptop.cli("branch", "create", "dev", "--from", "main", check=True)
    laptop.cli("generate", "main", "--pages", "30", "--seed", "1", check=True)
    laptop.cli("generate", "dev", "--pages", "4", "--seed", "2", check=True)
    out = laptop.cli("push", "dev", "cloud", check=True).stdout
    assert records_sent(out) == 34  # main's 30 up to the branch point, then dev's 4
    timelines = {r["timeline_id"]: r for r in cloud.query("timeline_list")}
    main_tid = laptop.branch("main")["timeline_id"]
    assert timelines[main_tid]["last_record_lsn"] == laptop.branch("dev")["ancestor_lsn"]
    assert timelines[main_tid]["branches"] == ""  # kept as an unnamed ancestor
    assert cloud.digest("dev") == laptop.digest("dev")
    # pushing main later sends only what the remote's copy of its timeline lacks
    out = laptop.cli("push", "main", "cloud", check=True).stdout
    assert records_sent(out) == 30
    assert cloud.digest("main") == laptop.digest("main")


def test_remote_ahead_push_rejected_pull_brings_rest(
    pair: tuple[PageserverProc, PageserverProc],
) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "20", check=True)
    laptop.cli("push", "main", "cloud", check=True)
    cloud.cli("generate", "main", "--pages", "3", "--seed", "5", check=True)
    before = cloud.branch("main")
    res = laptop.cli("push", "main", "cloud")
    assert res.returncode == 1
    # The cloud wrote on a received branch, so on a timeline of its own descending from
    # the laptop's: the remote is ahead.
    assert "remote main is ahead" in res.stderr and "pull first" in res.stderr, res.stderr
    assert cloud.branch("main") == before
    pulled = laptop.cli("pull", "main", "cloud", check=True).stdout
    assert pulled.startswith("cloud:main -> main") and records_sent(pulled) == 3
    assert laptop.digest("main") == cloud.digest("main")
    again = laptop.cli("pull", "main", "cloud", check=True).stdout
    assert again.strip() == "Everything up-to-date"


def test_fast_forward_onto_descendant(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "20", check=True)
    laptop.cli("push", "main", "cloud", check=True)
    laptop.cli("branch", "create", "feature", "--from", "main", check=True)
    laptop.cli("generate", "feature", "--pages", "6", "--seed", "8", check=True)
    out = laptop.cli("push", "feature", "cloud:main", check=True).stdout
    assert out.startswith("feature -> cloud:main") and records_sent(out) == 6
    assert cloud.branch("main")["timeline_id"] == laptop.branch("feature")["timeline_id"]
    assert cloud.digest("main") == laptop.digest("feature")


def test_diverged_rejected_then_forced(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "20", check=True)
    laptop.cli("push", "main", "cloud", check=True)
    laptop.cli("branch", "create", "a", "--from", "main", check=True)
    laptop.cli("generate", "a", "--pages", "2", "--seed", "1", check=True)
    laptop.cli("push", "a", "cloud:main", check=True)  # fast-forward: cloud main -> a's timeline
    old = cloud.branch("main")
    old_digest = cloud.digest("main")
    laptop.cli("branch", "create", "b", "--from", "main", check=True)
    laptop.cli("generate", "b", "--pages", "3", "--seed", "2", check=True)
    res = laptop.cli("push", "b", "cloud:main")
    assert res.returncode == 1 and "histories diverged" in res.stderr
    assert str(old["timeline_id"]) in res.stderr
    assert str(laptop.branch("b")["timeline_id"]) in res.stderr
    assert cloud.branch("main") == old
    forced = laptop.cli("push", "b", "cloud:main", "--force", check=True).stdout
    assert forced.startswith("+ b -> cloud:main") and "(forced update)" in forced
    assert cloud.branch("main")["timeline_id"] == laptop.branch("b")["timeline_id"]
    assert cloud.digest("main") == laptop.digest("b")
    # the old timeline's data is kept, reachable by its id
    assert cloud.digest(f"{old['timeline_id']}@{old['last_record_lsn']}") == old_digest


def test_pull_into_a_third_repository(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a, b, c = started_pageservers(pageserver_factory, "a", "b", "c")
    a.cli("origin", "add", "b", b.uri(), check=True)
    c.cli("origin", "add", "b", b.uri(), check=True)
    a.cli("generate", "main", "--pages", "50", "--rounds", "2", check=True)
    a.cli("branch", "create", "dev", "--from", "main", check=True)
    a.cli("generate", "dev", "--pages", "5", check=True)
    a.cli("push", "dev", "b", check=True)
    out = c.cli("pull", "mine", "b:dev", check=True).stdout
    assert out.startswith("* [new branch] b:dev -> mine") and records_sent(out) == 105
    assert c.digest("mine") == a.digest("dev") == b.digest("dev")
    assert c.branch("mine")["timeline_id"] == a.branch("dev")["timeline_id"]


def test_dry_run_changes_nothing(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "40", check=True)
    out = laptop.cli("push", "main", "cloud", "--dry-run", check=True).stdout
    assert out.startswith("(dry run) * [new branch] main -> cloud:main")
    assert "would send 40 records, 0.3 MiB" in out
    assert cloud.query("timeline_list") == []
    pulled = cloud.cli("origin", "add", "laptop", laptop.uri(), check=True)
    assert pulled.returncode == 0
    out = cloud.cli("pull", "main", "laptop", "--dry-run", check=True).stdout
    assert "would send 40 records" in out
    assert cloud.query("timeline_list") == []


def test_distinct_error_messages(pair: tuple[PageserverProc, PageserverProc]) -> None:
    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "3", check=True)
    cloud.add_user("reader", "rpw", "read")

    def fails(*args: str) -> str:
        res = laptop.cli(*args)
        assert res.returncode == 1 and res.stderr.startswith("error: "), res
        assert "Traceback" not in res.stderr
        return res.stderr

    assert 'unknown origin "nowhere"' in fails("push", "main", "nowhere")
    laptop.cli("origin", "add", "dead", f"postgresql://u:p@127.0.0.1:{free_port()}", check=True)
    t = time.monotonic()
    assert "cannot reach remote 127.0.0.1:" in fails("push", "main", "dead")
    assert time.monotonic() - t < 30
    laptop.cli("origin", "add", "badpw", cloud.uri("admin", "wrong"), check=True)
    assert "password authentication failed" in fails("push", "main", "badpw")
    laptop.cli("origin", "add", "ro", cloud.uri("reader", "rpw"), check=True)
    assert "may not push" in fails("push", "main", "ro")
    assert 'remote 127.0.0.1' in fails("pull", "x", "cloud:nope")
    assert 'branch "nope" does not exist' in fails("pull", "x", "cloud:nope")
    assert 'branch "nope" does not exist' in fails("push", "nope", "cloud")
    # a read user may pull
    cloud.cli("generate", "other", "--pages", "2", check=True)
    assert laptop.cli("pull", "copy", "ro:other").returncode == 0
    assert laptop.digest("copy") == cloud.digest("other")
    # a second local name for a timeline another branch names is refused, with advice
    assert "already named copy" in fails("pull", "copy2", "ro:other")


def test_origins(pageserver: PageserverProc) -> None:
    ps = pageserver
    cfg = ps.path / "config.toml"
    cfg.write_text(cfg.read_text() + "\n# my own note, keep me\n")
    ps.cli("origin", "add", "cloud", "postgresql://bob:s%40cret@db.example:5433/x", check=True)
    listed = ps.cli("origin", "list", check=True).stdout
    assert listed.strip() == "cloud\tpostgresql://bob:***@db.example:5433/x"
    assert "s%40cret" not in listed and "s@cret" not in listed
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert "# my own note, keep me" in cfg.read_text()
    dup = ps.cli("origin", "add", "cloud", "postgresql://h:1")
    assert dup.returncode == 1 and 'origin "cloud" already exists' in dup.stderr
    bad = ps.cli("origin", "add", "x", "http://nope")
    assert bad.returncode == 1 and "error:" in bad.stderr
    badname = ps.cli("origin", "add", "-bad", "postgresql://h:1")
    assert badname.returncode != 0
    ps.cli("origin", "remove", "cloud", check=True)
    gone = ps.cli("origin", "remove", "cloud")
    assert gone.returncode == 1 and 'unknown origin "cloud"' in gone.stderr
    assert "# my own note, keep me" in cfg.read_text()


def test_concurrent_pushes_to_one_branch(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a, b, cloud = started_pageservers(pageserver_factory, "a", "b", "cloud")
    for ps, seed in ((a, "1"), (b, "2")):
        ps.cli("origin", "add", "cloud", cloud.uri(), check=True)
        ps.cli("generate", "main", "--pages", "1500", "--seed", seed, check=True)
    procs = [
        subprocess.Popen([sys.executable, "-m", "zenith.cli", "-D", str(ps.path), "push",
                          "main", "cloud"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for ps in (a, b)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs  # one wins, the other finds a diverged history
    loser = outs[[p.returncode for p in procs].index(1)]
    assert "histories diverged" in loser[1]
    winner = a if procs[0].returncode == 0 else b
    assert cloud.digest("main") == winner.digest("main")
    assert cloud.branch("main")["timeline_id"] == winner.branch("main")["timeline_id"]


def test_progress_bar_on_a_terminal(pair: tuple[PageserverProc, PageserverProc]) -> None:
    """On a terminal the progress is a bar (rich); the summary still ends the output."""
    import os
    import pty

    laptop, cloud = pair
    laptop.cli("generate", "main", "--pages", "3000", check=True)
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI with its stdout and stderr on the pty
        os.execv(sys.executable, [sys.executable, "-m", "zenith.cli", "-D", str(laptop.path),
                                  "push", "main", "cloud"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "* [new branch] main -> cloud:main" in text and "3000 records" in text
    assert "Traceback" not in text
    assert cloud.digest("main") == laptop.digest("main")
