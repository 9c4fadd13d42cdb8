"""Push of a real imported cluster: ``zenith push`` of a branch holding a pgbench database
imported from PostgreSQL 15 (every page at the base backup's one LSN, so frames split
inside it), against ``pg_basebackup`` of the same source in the same run; peak RSS of both
pageservers during the push."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.cli.realpg import FOLLOWABLE, cluster_bytes, pgbench, sent
from tests.fixtures import make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import MiB, Section, timed
from benchmarks.transfer_bench import _peak_rss, _restart, _timed_cli


def run(scale: int = 25) -> Section:
    section = Section(
        "Push of an imported PostgreSQL cluster",
        f"A pgbench scale-{scale} database imported into pageserver A (base backup: every "
        "page at one LSN), then `zenith push main b` to a fresh pageserver B on loopback, "
        "timed as a whole command (process start, connection and authentication included); "
        "the transfer-only line uses the duration the pageserver reports in the summary line. "
        "Anchor: `pg_basebackup -c fast` (plain format, as in the export benchmark) of the "
        "source, same machine, same run. Peak RSS is each pageserver's VmHWM, restarted just "
        "before the push. The import is timed too, for scale (not a target).",
    )
    with PgCluster(settings=FOLLOWABLE) as pg, \
            tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        pgbench(pg, "-i", "-q", "-s", str(scale), timeout=3600)
        pg.psql("CHECKPOINT")
        size = cluster_bytes(pg)
        backup = pg.base / "backup"
        _, base_s = timed(lambda: pg.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
            "-D", str(backup), "-c", "fast", timeout=3600))
        shutil.rmtree(backup, ignore_errors=True)

        a = make_pageserver(Path(d) / "a")
        b = make_pageserver(Path(d) / "b")
        try:
            a.start()
            b.start()
            _, import_s = timed(lambda: a.cli("import", "main", pg.uri(), check=True,
                                              timeout=3600))
            a.cli("detach", "main", check=True)
            a.cli("origin", "add", "b", b.uri(), check=True)
            records, mib = sent(a.cli("push", "main", "b", "--dry-run", check=True).stdout)
            _restart(a, b)
            push_s, push_x = _timed_cli(a, "push", "main", "b")
            rss_src, rss_dst = _peak_rss(a), _peak_rss(b)
            assert a.digest("main") == b.digest("main")
        finally:
            a.stop()
            b.stop()
    section.add(f"pg_basebackup of {size / MiB:.0f} MiB (anchor)", f"{base_s:.2f} s", "1.00")
    section.add("zenith import (base backup into A), for scale", f"{import_s:.2f} s",
                f"{import_s / base_s:.2f}")
    section.add(f"push of the imported branch, {mib:.0f} MiB in {records:,} records",
                f"{push_s:.2f} s ({mib / push_s:.0f} MiB/s)", f"{push_s / base_s:.2f}", "<= 1.5")
    section.add("  the same, transfer only (as the pageserver reports it)", f"{push_x:.2f} s",
                f"{push_x / base_s:.2f}", "")
    section.add("peak RSS during the push: sender / receiver",
                f"{rss_src:.0f} / {rss_dst:.0f} MiB", "", "< 200 MiB")
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 25)
