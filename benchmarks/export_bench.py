"""Issue 6's benchmark: ``zenith export`` of a branch holding a pgbench database, against
``pg_basebackup`` of the source in the same run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.fixtures import make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import MiB, Section, timed

FOLLOWABLE = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
}


def run(scale: int = 50) -> Section:
    section = Section(
        "Export (issue 6)",
        f"A pgbench scale-{scale} database imported into a pageserver (base backup), then "
        "`zenith export main DIR` (the tar over CopyOut from the local pageserver, unpacked "
        "into DIR, pg_control and WAL written, no checksums) timed as a whole command. "
        "Anchor: `pg_basebackup -c fast` (plain format) of the source, same machine, same run.",
    )
    with PgCluster(settings=FOLLOWABLE) as pg, \
            tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        pg.run("pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres", timeout=3600)
        pg.psql("CHECKPOINT")
        size = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        ps = make_pageserver(Path(d) / "ps")
        ps.start()
        try:
            # Returns once the branch is readable (WAL up to the backup's end ingested).
            ps.cli("import", "main", pg.uri(), check=True, timeout=3600)
            ps.cli("detach", "main", check=True)
            target = Path(d) / "export"
            _, export_s = timed(lambda: ps.cli("export", "main", str(target), check=True,
                                               timeout=3600))
            exported = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        finally:
            ps.stop()
        backup = pg.base / "backup"
        _, base_s = timed(lambda: pg.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
            "-D", str(backup), "-c", "fast", timeout=3600))
        shutil.rmtree(backup, ignore_errors=True)
    section.add(f"pg_basebackup of {size / MiB:.0f} MiB (anchor)", f"{base_s:.2f} s", "1.00")
    section.add(f"zenith export, {exported / MiB:.0f} MiB written", f"{export_s:.2f} s",
                f"{export_s / base_s:.2f}", "<= 2")
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
