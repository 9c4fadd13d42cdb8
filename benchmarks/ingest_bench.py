"""Issue 5's benchmark: pgbench on the source while a pageserver follows it. WAL ingest
rate as a ratio to the source's WAL generation rate in the same run, and the lag at the end.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from tests.fixtures import make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import MiB, Section
from zenith.lsn import Lsn

FOLLOWABLE = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "max_wal_size": "'4GB'",
}


def run(seconds: int = 60, scale: int = 10) -> Section:
    section = Section(
        "WAL ingest under pgbench (issue 5)",
        f"`pgbench -c 4 -T {seconds}` (scale {scale}) on a PostgreSQL 15 source with "
        "`wal_consistency_checking=all`, while a pageserver that imported it follows its WAL. "
        "Anchor: the source's WAL generation rate over the run (`pg_current_wal_flush_lsn()` "
        "before and after). Ingest rate: WAL the pageserver ingested over the same wall time. "
        "Lag: source flush LSN minus the branch's `last_record_lsn` when pgbench ends, and "
        "the time it then takes to catch up.",
    )
    with PgCluster(settings=FOLLOWABLE) as pg, \
            tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        pg.run("pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres", timeout=1800)
        ps = make_pageserver(Path(d) / "ps")
        ps.start()
        try:
            ps.cli("import", "main", pg.uri(), check=True, timeout=1800)
            ps.cli("wait", "main", pg.psql("SELECT pg_current_wal_flush_lsn()"),
                   "--timeout", "600", check=True, timeout=700)

            def ingested() -> int:
                return int(Lsn.parse(str(ps.branch("main")["last_record_lsn"])))

            start_src = int(Lsn.parse(pg.psql("SELECT pg_current_wal_flush_lsn()")))
            start_ps = ingested()
            runner = threading.Thread(target=lambda: pg.run(
                "pgbench", "-c", "4", "-T", str(seconds), "-h", "127.0.0.1", "-p",
                str(pg.port), "-U", "postgres", "postgres", timeout=seconds + 600))
            t0 = time.monotonic()
            runner.start()
            runner.join()
            wall = time.monotonic() - t0
            end_src = int(Lsn.parse(pg.psql("SELECT pg_current_wal_flush_lsn()")))
            end_ps = ingested()
            lag = max(0, end_src - end_ps)
            t1 = time.monotonic()
            ps.cli("wait", "main", str(Lsn(end_src)), "--timeout", "600", check=True,
                   timeout=700)
            catch_up = time.monotonic() - t1
        finally:
            ps.stop()
    generated = (end_src - start_src) / MiB / wall
    ingest = (end_ps - start_ps) / MiB / wall
    section.add("source WAL generation (anchor)", f"{generated:.1f} MiB/s", "1.00")
    section.add("pageserver WAL ingest", f"{ingest:.1f} MiB/s", f"{ingest / generated:.2f}",
                ">= 1.0 (lag does not grow)")
    section.add("lag when pgbench ends", f"{lag / MiB:.1f} MiB, caught up in {catch_up:.1f} s")
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
