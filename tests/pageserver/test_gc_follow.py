"""GC while following a busy real PostgreSQL 15 (issue 12): with a short history window the
repository stops growing with the WAL, and exports at LSNs inside the window are the
source's exact state there (stock postgres starts on them; tables, checksums, amcheck),
also on a new server the branch was pushed to (shallow: its early history is gone)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from tests.cli.realpg import (
    FOLLOWABLE,
    MiB,
    check_export,
    export_dir,
    flush_lsn,
    pgbench,
    table_contents,
)
from tests.fixtures import PageserverProc
from tests.pgcluster import PgCluster
from zenith.lsn import Lsn

pytestmark = pytest.mark.timeout(900)

WINDOW = 64 * MiB
PGBENCH_SECONDS = 20


def disk_bytes(ps: PageserverProc) -> int:
    """What the repository takes on disk (allocated blocks, so punched holes count as
    given back): the database, its WAL and the data files."""
    files = [p for p in ps.path.iterdir() if p.name.startswith("zenith.db") and p.is_file()]
    files += list((ps.path / "zenith.db.d").iterdir())
    return sum(p.stat().st_blocks * 512 for p in files)


def wait_for(ps: PageserverProc, lsn: str) -> None:
    res = ps.cli("wait", "main", lsn, "--timeout", "300", timeout=400)
    assert res.returncode == 0, res.stderr


def test_following_pgbench_with_a_short_window_stays_bounded(pageserver_factory) -> None:
    ps = pageserver_factory(start=False)
    with ps.config.updating() as doc:
        doc["pitr"] = f"{WINDOW // MiB}MiB"
        doc["gc_period"] = 2
    ps.start()
    with PgCluster(settings=FOLLOWABLE, initdb_args=("--data-checksums",)) as pg:
        pgbench(pg, "-i", "-q", "-s", "2")
        ps.cli("import", "main", pg.uri(), check=True, timeout=600)
        wait_for(ps, flush_lsn(pg))
        start_lsn = Lsn.parse(ps.branch("main")["last_record_lsn"] or "0/0")
        start_disk = disk_bytes(ps)
        peak = start_disk
        done = threading.Event()

        def load() -> None:
            try:
                pgbench(pg, "-c", "2", "-T", str(PGBENCH_SECONDS))
            finally:
                done.set()

        runner = threading.Thread(target=load)
        runner.start()
        try:
            while not done.wait(1.0):
                peak = max(peak, disk_bytes(ps))
        finally:
            runner.join()
        phase1 = flush_lsn(pg)
        wait_for(ps, phase1)
        expected1 = table_contents(pg)
        wal = int(Lsn.parse(phase1)) - int(start_lsn)
        # A little more history: phase 1's end stays inside the window.
        pgbench(pg, "-c", "1", "-t", "20")
        phase2 = flush_lsn(pg)
        wait_for(ps, phase2)
        expected2 = table_contents(pg)
        assert int(Lsn.parse(phase2)) - int(Lsn.parse(phase1)) < WINDOW // 2
        peak = max(peak, disk_bytes(ps))
        ps.cli("gc", check=True, timeout=600)  # waits for a background pass, then one more
        end_disk = disk_bytes(ps)
        growth, peak_growth = end_disk - start_disk, peak - start_disk
        print(f"\nWAL ingested {wal / MiB:.0f} MiB; repository {start_disk / MiB:.0f} -> "
              f"{end_disk / MiB:.0f} MiB (peak {peak / MiB:.0f} MiB while pgbench ran) with "
              f"a {WINDOW // MiB} MiB window")
        assert wal > 5 * WINDOW, f"pgbench wrote only {wal / MiB:.0f} MiB of WAL"
        # Without GC the repository grows by more than the WAL it ingests (full page
        # images). With it: while the load runs, by what GC has not reached yet (it shares
        # two cores with PostgreSQL, pgbench and the ingest); once it has, by about the
        # window's worth of page versions and the index.
        assert peak_growth < 0.8 * wal, (peak_growth, wal)
        assert growth < 2.5 * WINDOW + 32 * MiB, (growth, wal)
        readable = Lsn.parse(ps.query("branch_space")[0]["readable_from"] or "0/0")
        assert int(readable) > int(start_lsn)
        for spec, expected in ((f"main@{phase1}", expected1), ("main", expected2)):
            with export_dir() as target:
                check_export(ps, spec, Path(target) / "pgdata", expected)
        # Before the window: refused, clearly.
        with export_dir() as target:
            old = ps.cli("export", f"main@{start_lsn}", str(Path(target) / "pgdata"))
            assert old.returncode != 0 and "readable" in old.stderr
        # The followed branch pushed to a new server: its early history is collected, so
        # the push is shallow (the state where its history is whole, then the rest), and
        # that server's exports are the source's state, at phase 1 and at the head.
        fresh = pageserver_factory(name="fresh")
        ps.cli("origin", "add", "fresh", fresh.uri(), check=True)
        out = ps.cli("push", "main", "fresh", check=True, timeout=600).stdout
        assert "shallow: history from" in out and "collected on the sending side" in out
        # The copy holds its images as the transfer sent them (plain); compaction stores
        # them packed, as the same records, and gives the blocks back.
        received = disk_bytes(fresh)
        out = fresh.cli("gc", check=True, timeout=600).stdout
        m = re.search(r"packed (\d+) page images \((\d+) -> (\d+) bytes\)", out)
        assert m, out
        packed, before, after = (int(g) for g in m.groups())
        compacted = disk_bytes(fresh)
        print(f"shallow copy: {received / MiB:.1f} MiB; compaction packed {packed} images "
              f"({before / MiB:.1f} -> {after / MiB:.1f} MiB): {compacted / MiB:.1f} MiB")
        assert packed > 0 and after < before // 2
        assert compacted < received - (before - after) // 2
        for spec, expected in ((f"main@{phase1}", expected1), ("main", expected2)):
            with export_dir() as target:
                check_export(fresh, spec, Path(target) / "pgdata", expected)
