"""Helpers for the CLI tests (and the benchmark) that move a real, sizeable PostgreSQL
cluster between pageservers: a pgbench source, the contents of every user table, the
size of what a push would send, and the check of an exported directory with the stock
``postgres``, ``pg_checksums`` and ``pg_amcheck``. Built on the helpers of
``test_export_cli`` and ``test_export_pg`` (imported, not copied)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.cli.test_export_cli import FOLLOWABLE, Started
from tests.fixtures import PageserverProc
from tests.pgcluster import PgCluster, as_postgres
from tests.postgres.test_export_pg import amcheck

__all__ = ["FOLLOWABLE", "MiB", "check_export", "cluster_bytes", "export_dir", "flush_lsn",
           "pgbench", "sent", "table_contents"]

MiB = 1024 * 1024

# The summary line of `zenith push`/`zenith pull` (DESIGN §6), real or dry run:
#   "* [new branch] main -> b:main 0/0..0/42000000, 42082 records, 321.2 MiB in 3.1 s"
#   "(dry run) * [new branch] main -> b:main 0/0..0/42000000: would send 42082 records, 321.2 MiB"
_SENT = re.compile(r"(\d+) records, ([0-9.]+) MiB")


def sent(summary: str) -> tuple[int, float]:
    """Records and MiB of a push/pull summary line."""
    m = _SENT.search(summary)
    assert m, summary
    return int(m.group(1)), float(m.group(2))


def pgbench(pg: PgCluster, *args: str, timeout: float = 1800) -> None:
    pg.run("pgbench", *args, "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
           "postgres", timeout=timeout)


def cluster_bytes(pg: PgCluster) -> int:
    """Sum of ``pg_database_size`` over every database of the cluster."""
    return int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))


def flush_lsn(pg: PgCluster) -> str:
    return pg.psql("SELECT pg_current_wal_flush_lsn()")


def table_contents(pg: PgCluster) -> dict[str, str]:
    """Row count and md5 of the rows of every user table (schema public), as
    ``test_export_cli.contents`` computes them for its fixed list."""
    tables = pg.psql("SELECT string_agg(relname, ' ' ORDER BY relname) FROM pg_class c "
                     "JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')").split()
    return {t: pg.psql(f"SELECT count(*) || ':' || md5(coalesce(string_agg(x::text, ',' "
                       f"ORDER BY x::text), '')) FROM {t} x") for t in tables}


@contextmanager
def export_dir() -> Iterator[Path]:
    """An empty directory the ``postgres`` user can reach (a pytest ``tmp_path`` is not);
    removed afterwards, whoever owns the files by then."""
    out = Path(tempfile.mkdtemp(prefix="zenith-export-"))
    os.chmod(out, 0o755)
    try:
        yield out
    finally:
        subprocess.run(["rm", "-rf", str(out)], check=False)


def check_export(ps: PageserverProc, spec: str, target: Path,
                 expected: dict[str, str]) -> None:
    """``zenith export SPEC TARGET`` on ``ps``, then: checksums verified, the stock
    ``postgres`` starts on it, every user table equals ``expected``, ``pg_amcheck
    --heapallindexed`` is clean, and it accepts a write."""
    res = ps.cli("export", spec, str(target), "--owner", "postgres", timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"exported {spec} to {target} ("), res.stdout
    started = Started(target)
    try:
        checked = started.run("pg_checksums", "--check", "-D", str(target), check=False)
        assert checked.returncode == 0 and "Bad checksums:  0" in checked.stdout, checked
        started.start()
        assert table_contents(started) == expected, spec
        assert amcheck(started) == "", spec
        started.psql("CREATE TABLE written_after_export AS SELECT 1 AS one")
    finally:
        started.stop()
        subprocess.run(as_postgres(["rm", "-rf", str(started.base)]), check=False)
