"""Issue 4's benchmark: push and pull of a 1 GiB synthetic branch between two pageservers
on loopback, against ``pg_basebackup`` of a 1 GiB PostgreSQL cluster in the same run;
incremental push/pull of 1% rewritten pages; peak RSS of each pageserver."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from tests.fixtures import PageserverProc, make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import MiB, Section, timed
from zenith.pageserver.pidfile import running_pid

PAGE = 8192


def _timed_cli(ps: PageserverProc, *args: str) -> tuple[float, float]:
    """Seconds of the whole command, and of the transfer as the pageserver reports it
    (the summary's "in X s": without process start-up and connection set-up)."""
    proc, seconds = timed(lambda: ps.cli(*args, check=True, timeout=3600))
    m = re.search(r" in ([0-9.]+) s$", proc.stdout.strip())
    assert m, proc.stdout
    return seconds, float(m.group(1))


def _peak_rss(ps: PageserverProc) -> float:
    """Peak resident set (VmHWM) of the running pageserver, in MiB."""
    pid = running_pid(ps.config.pid_path)
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert m
    return int(m.group(1)) / 1024


def _restart(*servers: PageserverProc) -> None:
    """Restart so that each one's peak RSS measures only what follows."""
    for ps in servers:
        ps.stop()
        ps.start()


def _pg_basebackup(total_bytes: int) -> tuple[float, float]:
    """Seconds for pg_basebackup of a pgbench cluster of about ``total_bytes``; its size."""
    scale = max(1, round(total_bytes / (15.6 * MiB)))
    with PgCluster() as pg:
        pg.run("pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres", timeout=1800)
        pg.psql("CHECKPOINT")
        size = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        target = pg.base / "backup"
        _, seconds = timed(lambda: pg.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
            "-D", str(target), "-c", "fast", timeout=1800))
        shutil.rmtree(target, ignore_errors=True)
    return seconds, size / MiB


def run(total_bytes: int = 1 << 30) -> Section:
    pages = total_bytes // PAGE
    changed = max(1, pages // 100)
    section = Section(
        "Push and pull (issue 4)",
        f"A synthetic branch of {pages:,} pages of 8 KiB ({pages * PAGE / MiB:.0f} MiB, random "
        "contents, so compression cannot help) pushed between two pageserver processes on "
        "loopback with `zenith push`, then 1% of its pages rewritten and pushed again; the same "
        "for `zenith pull` into a third pageserver. Anchor: `pg_basebackup -c fast` (plain "
        "format, WAL streamed) of a pgbench cluster of the same size, on the same machine in "
        "the same run. Peak RSS is each pageserver's VmHWM, restarted just before the transfer. "
        "Times are of the whole CLI command (process start, connection and authentication "
        "included); the transfer-only lines use the duration the pageserver reports in the "
        "summary line.",
    )
    with tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        laptop = make_pageserver(Path(d) / "laptop")
        cloud = make_pageserver(Path(d) / "cloud")
        third = make_pageserver(Path(d) / "third")
        servers = (laptop, cloud, third)
        try:
            for ps in servers:
                ps.start()
            laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
            third.cli("origin", "add", "cloud", cloud.uri(), check=True)
            laptop.cli("generate", "main", "--pages", str(pages), check=True, timeout=3600)
            _restart(laptop, cloud)
            full_push, full_push_x = _timed_cli(laptop, "push", "main", "cloud")
            rss_src, rss_dst = _peak_rss(laptop), _peak_rss(cloud)
            laptop.cli("generate", "main", "--pages", str(changed), "--seed", "5", check=True)
            inc_push, inc_push_x = _timed_cli(laptop, "push", "main", "cloud")
            assert laptop.digest("main") == cloud.digest("main")

            _restart(cloud, third)
            full_pull, full_pull_x = _timed_cli(third, "pull", "main", "cloud")
            rss_pull_src, rss_pull_dst = _peak_rss(cloud), _peak_rss(third)
            laptop.cli("generate", "main", "--pages", str(changed), "--seed", "6", check=True)
            laptop.cli("push", "main", "cloud", check=True)
            inc_pull, inc_pull_x = _timed_cli(third, "pull", "main", "cloud")
            assert third.digest("main") == laptop.digest("main")
        finally:
            for ps in servers:
                ps.stop()
    base_seconds, base_mib = _pg_basebackup(total_bytes)
    mib = pages * PAGE / MiB
    section.add(f"pg_basebackup of {base_mib:.0f} MiB (anchor)", f"{base_seconds:.2f} s", "1.00")
    section.add(f"full push, {mib:.0f} MiB", f"{full_push:.2f} s ({mib / full_push:.0f} MiB/s)",
                f"{full_push / base_seconds:.2f}", "<= 1.5")
    section.add("incremental push, 1% of pages", f"{inc_push:.2f} s",
                f"{inc_push / full_push:.3f} of full push", "<= 0.05")
    section.add("  the same, transfer only (as the pageserver reports it)",
                f"{inc_push_x:.2f} s of {full_push_x:.2f} s",
                f"{inc_push_x / full_push_x:.3f} of full push", "")
    section.add("peak RSS during full push: source / destination",
                f"{rss_src:.0f} / {rss_dst:.0f} MiB", "", "< 200 MiB")
    section.add(f"full pull, {mib:.0f} MiB", f"{full_pull:.2f} s ({mib / full_pull:.0f} MiB/s)",
                f"{full_pull / base_seconds:.2f}", "<= 1.5")
    section.add("incremental pull, 1% of pages", f"{inc_pull:.2f} s",
                f"{inc_pull / full_pull:.3f} of full pull", "<= 0.05")
    section.add("  the same, transfer only (as the pageserver reports it)",
                f"{inc_pull_x:.2f} s of {full_pull_x:.2f} s",
                f"{inc_pull_x / full_pull_x:.3f} of full pull", "")
    section.add("peak RSS during full pull: source / destination",
                f"{rss_pull_src:.0f} / {rss_pull_dst:.0f} MiB", "", "< 200 MiB")
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30)
