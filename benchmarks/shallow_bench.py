"""Issue 12's shallow push benchmark: a branch that followed a busy PostgreSQL for a while
(its history many times the database's size) pushed to a new pageserver as a shallow copy
(``--since`` its head: the state there, as pg_basebackup copies it), against
``pg_basebackup`` of the same source in the same run; the full push of the same history
for contrast."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from tests.cli.realpg import FOLLOWABLE, cluster_bytes, flush_lsn, pgbench, sent
from tests.fixtures import make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import MiB, Section, timed
from benchmarks.transfer_bench import _timed_cli
from zenith.lsn import Lsn


def run(seconds: int = 60, scale: int = 10) -> Section:
    section = Section(
        "Shallow push of a followed branch",
        f"A pgbench scale-{scale} source (`wal_consistency_checking=all`) imported into "
        f"pageserver A, which follows it while `pgbench -c 2 -T {seconds}` runs (its "
        "history: every page version of that load). Then `zenith push main b --since "
        "<head>` to a fresh pageserver B (the state at the head: each page's newest image and "
        "the deltas after it, as stored; no history), "
        "timed as a whole command; and, for contrast, the full push of the same history "
        "to a fresh pageserver C. Anchor: `pg_basebackup -c fast` (plain format) of the "
        "source after the load, same machine, same run. Digests at the head compared.",
    )
    with PgCluster(settings=FOLLOWABLE) as pg, \
            tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        pgbench(pg, "-i", "-q", "-s", str(scale), timeout=3600)
        a, b, c = (make_pageserver(Path(d) / n) for n in "abc")
        try:
            for ps in (a, b, c):
                ps.start()
            a.cli("import", "main", pg.uri(), check=True, timeout=3600)
            start = Lsn.parse(a.branch("main")["last_record_lsn"] or "0/0")
            pgbench(pg, "-c", "2", "-T", str(seconds))
            head = flush_lsn(pg)
            a.cli("wait", "main", head, "--timeout", "900", check=True, timeout=1000)
            a.cli("detach", "main", check=True)
            pg.psql("CHECKPOINT")
            size = cluster_bytes(pg)
            wal = int(Lsn.parse(head)) - int(start)
            backup = pg.base / "backup"
            _, base_s = timed(lambda: pg.run(
                "pg_basebackup", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                "-D", str(backup), "-c", "fast", timeout=3600))
            shutil.rmtree(backup, ignore_errors=True)
            a.cli("origin", "add", "b", b.uri(), check=True)
            a.cli("origin", "add", "c", c.uri(), check=True)
            tip = a.branch("main")["last_record_lsn"] or "0/0"
            proc, shallow_s = timed(lambda: a.cli("push", "main", "b", "--since", tip,
                                                  check=True, timeout=3600))
            assert "shallow: history from" in proc.stdout, proc.stdout
            s_records, s_mib = sent(proc.stdout)
            m = re.search(r" in ([0-9.]+) s$", proc.stdout.strip())
            assert m, proc.stdout
            shallow_x = float(m.group(1))
            f_records, f_mib = sent(a.cli("push", "main", "c", "--dry-run", check=True).stdout)
            full_s, _ = _timed_cli(a, "push", "main", "c")
            assert b.digest("main") == a.digest("main") == c.digest("main")
        finally:
            for ps in (a, b, c):
                ps.stop()
    section.add(f"pg_basebackup of {size / MiB:.0f} MiB (anchor)", f"{base_s:.2f} s", "1.00")
    section.add(f"shallow push (--since the head) after {wal / MiB:.0f} MiB of WAL followed: "
                f"{s_mib:.0f} MiB in {s_records:,} records (each page's image and the deltas "
                "after it)",
                f"{shallow_s:.2f} s", f"{shallow_s / base_s:.2f}", "<= 1.5")
    section.add("  the same, transfer only (as the pageserver reports it)",
                f"{shallow_x:.2f} s", f"{shallow_x / base_s:.2f}", "")
    section.add(f"full push of the history, {f_mib:.0f} MiB in {f_records:,} records "
                "(contrast)", f"{full_s:.2f} s", f"{full_s / base_s:.2f}", "")
    return section


if __name__ == "__main__":
    import sys

    print(run(*(int(x) for x in sys.argv[1:])).markdown())
