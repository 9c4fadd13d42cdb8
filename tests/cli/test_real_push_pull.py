"""Push, pull and export of a real PostgreSQL 15 cluster of more than 300 MiB, through the
``zenith`` CLI only (DESIGN §6 and §7).

A base-backup import puts every page of the cluster at ONE LSN, so these transfers must
split frames inside that LSN, and an interrupted transfer must resume from the receiver's
durable cursor inside it, not start over:

- ``test_real_cluster_push_pull_export``: pgbench source imported into A and followed
  through pgbench and DDL; A -> B by push, B -> C by pull; C exported at a middle LSN and at
  the end; the stock ``postgres`` started on each shows every table as the source had it
  then; ``pg_amcheck --heapallindexed`` and ``pg_checksums --check`` clean; digests equal.
- ``test_real_push_killed_mid_import_lsn_resumes``: the sender or the receiver SIGKILLed
  once the receiver has written 30% of the push and holds a durable cursor inside the
  import LSN; restarted; the receiver has not completed that LSN, the push run again sends
  exactly the records past the cursor, and both sides end with the same digest.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cli.realpg import (
    FOLLOWABLE,
    MiB,
    check_export,
    cluster_bytes,
    export_dir,
    flush_lsn,
    pgbench,
    sent,
    table_contents,
)
from tests.fixtures import PageserverProc, make_pageserver, started_pageservers, stop_all
from tests.pgcluster import PGBIN, PgCluster
from zenith.lsn import Lsn

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(300),
]

SCALE = 20  # pgbench scale: about 320 MiB of cluster
MIN_BYTES = 300 * MiB
KILL_AT = 0.3  # fraction of the push the receiver has written when a side is killed


@pytest.fixture(scope="module")
def source() -> Iterator[PgCluster]:
    """A followable PostgreSQL 15 cluster (data checksums on) of at least 300 MiB."""
    with PgCluster(settings=FOLLOWABLE, initdb_args=("--data-checksums",)) as pg:
        pgbench(pg, "-i", "-q", "-s", str(SCALE))
        size = cluster_bytes(pg)
        assert size >= MIN_BYTES, f"source is only {size / MiB:.0f} MiB"
        yield pg


def _import(ps: PageserverProc, pg: PgCluster) -> int:
    """``zenith import main``; the base backup's start LSN, where every page of it lies."""
    res = ps.cli("import", "main", pg.uri(), timeout=600)
    assert res.returncode == 0, res.stderr
    m = re.match(r"imported main from \S+: base backup (\S+)\.\.\S+ \(\d+ records\), "
                 r"readable from \S+; following the source through slot zenith_", res.stdout)
    assert m, res.stdout
    return int(Lsn.parse(m.group(1)))


def test_real_cluster_push_pull_export(source: PgCluster, pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a, b, c = started_pageservers(pageserver_factory, "a", "b", "c")
    a.cli("origin", "add", "b", b.uri(), check=True)
    c.cli("origin", "add", "b", b.uri(), check=True)
    _import(a, source)

    # while A follows: a pgbench run (the middle), then DDL and deletes (the end). A count of
    # transactions, not a duration: 5 s of pgbench wrote some 300 MiB of WAL (every record
    # carries its pages) that A had to ingest and every transfer and export to carry.
    pgbench(source, "-t", "500", "-c", "2")
    at_mid = table_contents(source)
    mid = flush_lsn(source)
    source.psql("CREATE TABLE extra AS SELECT g, repeat('x', g % 300) AS s"
                " FROM generate_series(1, 20000) g")
    source.psql("CREATE INDEX extra_g ON extra (g)")
    source.psql("CREATE INDEX pgbench_history_tid ON pgbench_history (tid)")
    source.psql("ALTER TABLE extra ADD COLUMN n int DEFAULT 7")
    source.psql("ALTER TABLE pgbench_tellers ADD COLUMN note text")
    source.psql("UPDATE pgbench_tellers SET note = 'teller ' || tid WHERE tid % 3 = 0")
    source.psql("DELETE FROM extra WHERE g % 3 = 0")
    source.psql("DELETE FROM pgbench_accounts WHERE aid % 1000 = 0")
    end = flush_lsn(source)

    # The source is written no more: its contents at the end are read (by PostgreSQL) while
    # A catches up and the branch travels (by the pageservers), on the other core.
    with ThreadPoolExecutor(1) as pool:
        ending = pool.submit(table_contents, source)
        waited = a.cli("wait", "main", end, "--timeout", "120")
        assert waited.returncode == 0, waited.stderr
        a.cli("detach", "main", check=True)
        digest = a.digest("main")
        last = str(a.branch("main")["last_record_lsn"])

        pushed = a.cli("push", "main", "b", timeout=600)
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.startswith(f"* [new branch] main -> b:main 0/0..{last}, "), \
            pushed.stdout
        pulled = c.cli("pull", "main", "b", timeout=600)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.startswith(f"* [new branch] b:main -> main 0/0..{last}, "), \
            pulled.stdout
        assert sent(pulled.stdout)[0] == sent(pushed.stdout)[0]
        assert b.digest("main") == digest
        assert c.digest("main") == digest
        assert c.branch("main")["timeline_id"] == a.branch("main")["timeline_id"]
        at_end = ending.result()
    assert at_end != at_mid and "extra" in at_end and "extra" not in at_mid

    # C's copy, two generations away from the source, exported at both moments (the two
    # exports and their checks at the same time: each its own directory and postgres)
    with export_dir() as out, ThreadPoolExecutor(2) as pool:
        checks = [pool.submit(check_export, c, f"main@{mid}", out / "mid", at_mid),
                  pool.submit(check_export, c, "main", out / "end", at_end)]
        for check in checks:
            check.result()


# -- an interrupted push of the import LSN -----------------------------------------------------


@pytest.fixture(scope="module")
def imported(source: PgCluster, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[PageserverProc, int]]:
    """Pageserver A holding the source's import as ``main``, detached (so it stays put), and
    the import LSN; shared by the kill tests (each kills and restarts A or its receiver)."""
    a = make_pageserver(tmp_path_factory.mktemp("real-push") / "a")
    a.start()
    try:
        import_lsn = _import(a, source)
        # readable only from the base backup's end LSN: catch up before detaching
        a.cli("wait", "main", flush_lsn(source), "--timeout", "120", check=True)
        a.cli("detach", "main", check=True)
        yield a, import_lsn
    finally:
        stop_all([a])


def _repo_bytes(ps: PageserverProc) -> int:
    """Bytes of every file of a pageserver's repository directory (whatever its layout)."""
    total = 0
    for root, _, files in os.walk(ps.path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _timeline(ps: PageserverProc, tid: str) -> dict[str, str | None] | None:
    return next((r for r in ps.query("timeline_list") if r["timeline_id"] == tid), None)


def _consistent(src: PageserverProc, dst: PageserverProc, tid: str) -> Lsn:
    """The receiver's timeline is at an LSN where its state equals the sender's (as
    test_faults checks it, but compared only from the LSN an imported timeline is readable
    from); that LSN (0/0: none yet, or no timeline)."""
    row = _timeline(dst, tid)
    at = Lsn.parse(str(row["last_record_lsn"])) if row else Lsn(0)
    readable = Lsn.parse(str(_timeline(src, tid)["min_readable_lsn"]))  # type: ignore[index]
    if at >= readable:
        assert dst.digest(f"{tid}@{at}") == src.digest(f"main@{at}"), at
    return at


def _settle(ps: PageserverProc, quiet: float = 1.0, timeout: float = 60) -> None:
    """Wait until ``ps`` stops writing (its repository's size holds still for ``quiet``
    seconds): a receiver whose sender died may still be applying what it had read."""
    deadline = time.monotonic() + timeout
    size, since = _repo_bytes(ps), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the pageserver kept writing"
        time.sleep(0.1)
        now = _repo_bytes(ps)
        if now != size:
            size, since = now, time.monotonic()


class _BackgroundPush:
    """``zenith push`` in a process of its own; stderr read as it comes (its progress
    lines every 2 s), so that a full pipe never stalls it."""

    def __init__(self, ps: PageserverProc, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zenith.cli", "-D", str(ps.path), "push", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout)
        self.reader.join(timeout)
        return rc, out, "\n".join(self.lines)


@pytest.mark.parametrize("killed", ["sender", "receiver"])
def test_real_push_killed_mid_import_lsn_resumes(imported: tuple[PageserverProc, int],  # type: ignore[no-untyped-def]
                                                 pageserver_factory, killed: str) -> None:
    a, import_lsn = imported
    b: PageserverProc = pageserver_factory(name="b")
    a.cli("origin", "remove", "b")  # the previous parameter's receiver
    a.cli("origin", "add", "b", b.uri(), check=True)
    src = a.branch("main")
    tid, last = str(src["timeline_id"]), str(src["last_record_lsn"])
    final = Lsn.parse(last)
    digest = a.digest("main")

    # what a full push sends: the resumed push must send that minus what the receiver kept
    dry = a.cli("push", "main", "b", "--dry-run", check=True).stdout
    assert dry.startswith(f"(dry run) * [new branch] main -> b:main 0/0..{last}: would send "), dry
    full_records, full_mib = sent(dry)
    assert full_mib * MiB >= MIN_BYTES * 0.9, dry

    # Kill once the receiver has written KILL_AT of the bytes and made part of them durable
    # (a cursor inside the import LSN). Its repository's growth is what it has written; the
    # progress lines of the push run ahead of that by whatever is in flight or buffered.
    before = _repo_bytes(b)
    push = _BackgroundPush(a, "main", "b")
    deadline = time.monotonic() + 240
    while True:
        assert push.proc.poll() is None, ("the push ended before it could be interrupted",
                                          push.finish())
        assert time.monotonic() < deadline, ("no progress", push.lines)
        if _repo_bytes(b) - before >= KILL_AT * full_mib * MiB:
            row = _timeline(b, tid)
            if row is not None and int(str(row["pending_records"])) > 0:
                break
        time.sleep(0.02)
    (a if killed == "sender" else b).kill()
    rc, out, err = push.finish()
    assert rc == 1, (out, err)
    assert "Traceback" not in err, err
    assert any(line.startswith("error: ") for line in err.splitlines()), err
    if killed == "receiver":
        assert re.search(r"error: push interrupted: .*server at 127\.0\.0\.1:\d+", err), err
        assert err.splitlines()[-1].startswith("hint: the destination kept"), err
    (a if killed == "sender" else b).start()
    _settle(b)

    # the receiver is consistent: no branch name yet, and its timeline (equal to the
    # sender's up to where it is) has not completed the import LSN: the kill fell inside it
    assert [r for r in b.query("branch_list") if r["name"] == "main"] == []
    assert _consistent(a, b, tid) < import_lsn < final, (
        f"the receiver completed the import LSN although the {killed} was killed when it had "
        "written 30% of it: it had read (buffered) far more than it had written")
    # ... but part of the import LSN is durable there: the cursor inside it
    row = _timeline(b, tid)
    assert row is not None and row["pending_lsn"] == str(Lsn(import_lsn)), row
    pending = int(str(row["pending_records"]))
    assert 0 < pending < full_records, row
    assert a.digest("main") == digest  # the sender lost nothing

    # run again: it continues from the cursor and sends only the rest
    resumed = a.cli("push", "main", "b", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("* [new branch] main -> b:main "), resumed.stdout
    records, mib = sent(resumed.stdout)
    assert records == full_records - pending and mib < full_mib, (resumed.stdout, dry, row)
    assert b.digest("main") == a.digest("main") == digest
    assert b.branch("main")["last_record_lsn"] == last
    again = a.cli("push", "main", "b", check=True).stdout
    assert again.strip() == "Everything up-to-date"
