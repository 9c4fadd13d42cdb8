"""``zenith export`` end to end with real processes only: a PostgreSQL source imported into
pageserver A, pgbench and DDL on the source, A's branch pushed to pageserver B, exports from
B at a middle LSN and at the end (straight from the origin), checksums verified, and stock
``postgres`` started on each: contents equal the source's at those moments (issue 6).

``test_export_right_after_import`` (issue 10): ``zenith import`` returns once the branch is
readable, printing progress meanwhile, so the export that follows it at once works on the
first try; it runs on timeline 2, with the source's archiving turned off and said so on
stderr (``--keep-config`` keeps it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.fixtures import PageserverProc, started_pageservers
from tests.pgcluster import PG_USER, PgCluster, as_postgres
from tests.postgres.test_export_pg import amcheck

FOLLOWABLE = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
}
TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "extra"]


def contents(pg: PgCluster) -> dict[str, str]:
    out = {}
    for t in TABLES:
        if pg.psql(f"SELECT to_regclass('{t}') IS NOT NULL") != "t":
            out[t] = "missing"
            continue
        out[t] = pg.psql(f"SELECT count(*) || ':' || md5(coalesce(string_agg(x::text, ',' "
                         f"ORDER BY x::text), '')) FROM {t} x")
    return out


class Started(PgCluster):
    """Stock postgres on an exported directory, on a port of its own."""

    def __init__(self, datadir: Path) -> None:
        super().__init__(settings={"fsync": "off", "wal_consistency_checking": "''"})
        self.datadir = datadir
        with open(datadir / "postgresql.auto.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{PG_USER}:{PG_USER}", str(self.base),
                            str(datadir)], check=True)


def test_export_through_push_and_origin(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = started_pageservers(pageserver_factory, "a", "b")
    a.cli("origin", "add", "b", b.uri(), check=True)
    out = Path(tempfile.mkdtemp(prefix="zenith-export-"))  # the postgres user must reach it
    os.chmod(out, 0o755)
    with PgCluster(settings=FOLLOWABLE, initdb_args=("--data-checksums",)) as src:
        src.run("pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(src.port),
                "-U", "postgres", "postgres")
        a.cli("import", "main", src.uri(), check=True)
        src.psql("CREATE TABLE extra AS SELECT g, repeat('x', g % 300) AS s"
                 " FROM generate_series(1, 3000) g")
        # one row in 70, some 1400 rows (each change carries its page in the WAL here: one
        # row in 7 was some 380 MiB of WAL to ingest, push and export)
        src.psql("UPDATE pgbench_accounts SET abalance = aid % 13 WHERE aid % 70 = 0")
        mid = src.psql("SELECT pg_current_wal_flush_lsn()")
        at_mid = contents(src)
        src.run("pgbench", "-t", "200", "-c", "2", "-h", "127.0.0.1", "-p", str(src.port),
                "-U", "postgres", "postgres")
        src.psql("DELETE FROM extra WHERE g % 2 = 0")
        src.psql("ALTER TABLE extra ADD COLUMN n int DEFAULT 7")
        end = src.psql("SELECT pg_current_wal_flush_lsn()")
        at_end = contents(src)
        a.cli("wait", "main", end, check=True)
        a.cli("detach", "main", check=True)
        a.cli("push", "main", "b", check=True)

        # errors first: nothing is written
        busy = out / "busy"
        busy.mkdir()
        (busy / "file").write_text("x")
        for args, message in [
            (["b:main", str(busy)], "is not empty"),
            (["b:main@FF/0", str(out / "e1")], "beyond"),
            (["b:nope", str(out / "e2")], 'branch "nope" does not exist'),
            (["nowhere:main", str(out / "e3")], 'unknown origin "nowhere"'),
        ]:
            res = a.cli("export", *args)
            assert res.returncode == 1 and message in res.stderr, (args, res.stderr)
        assert sorted(p.name for p in out.iterdir()) == ["busy"]

        exported = {
            "mid": (a.cli("export", f"b:main@{mid}", str(out / "mid"), "--owner", PG_USER),
                    at_mid),
            "end": (a.cli("export", "b:main", str(out / "end"), "--owner", PG_USER), at_end),
        }
    for name, (res, expected) in exported.items():
        assert res.returncode == 0, res.stderr
        started = Started(out / name)
        checked = started.run("pg_checksums", "--check", "-D", str(out / name), check=False)
        assert checked.returncode == 0 and "Bad checksums:  0" in checked.stdout, checked
        try:
            started.start()
            assert contents(started) == expected, name
            assert amcheck(started) == "", name
            started.psql("INSERT INTO extra (g, s) VALUES (-1, 'written after export')")
            started.stop()
            started.start()
            assert started.psql("SELECT s FROM extra WHERE g = -1") == "written after export"
        finally:
            started.stop()
            subprocess.run(as_postgres(["rm", "-rf", str(started.base)]), check=False)
    shutil.rmtree(out, ignore_errors=True)


def test_export_right_after_import(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a: PageserverProc = pageserver_factory(name="a")
    out = Path(tempfile.mkdtemp(prefix="zenith-export-"))
    os.chmod(out, 0o755)
    archiving = {**FOLLOWABLE, "archive_mode": "on", "archive_command": "'/bin/true'"}
    try:
        with PgCluster(settings=archiving) as src:
            src.run("pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(src.port),
                    "-U", "postgres", "postgres")
            expected = contents(src)
            imported = a.cli("import", "main", src.uri())
            assert imported.returncode == 0, imported.stderr
            m = re.search(r"readable from (\S+);", imported.stdout)
            assert m, imported.stdout
            assert f"waiting for WAL up to {m.group(1)}: at " in imported.stderr, imported.stderr
            # no `zenith wait`: the branch is readable once import returns
            now = a.cli("export", "main", str(out / "now"), "--owner", PG_USER)
            assert now.returncode == 0, now.stderr
            assert "disabled archive_mode, archive_command (use --keep-config to keep them)" \
                in now.stderr, now.stderr
            kept = a.cli("export", "main", str(out / "kept"), "--keep-config")
            assert kept.returncode == 0 and "disabled" not in kept.stderr, kept.stderr
            auto = (out / "kept" / "postgresql.auto.conf").read_text()
            assert "archive_mode = on" in auto and "archive_command = '/bin/true'" in auto
            # Out of time: the import fails, saying how to wait; the branch stays, following.
            late = a.cli("import", "late", src.uri(), "--timeout", "0.01")
            assert late.returncode == 1, late.stderr
            m = re.search(r"timed out after 0.01 s waiting for WAL up to (\S+): ", late.stderr)
            assert m and f"`zenith wait late {m.group(1)}`" in late.stderr, late.stderr
            assert a.cli("wait", "late", m.group(1)).returncode == 0
            assert a.cli("export", "late", str(out / "late")).returncode == 0
        started = Started(out / "now")
        try:
            started.start()
            assert started.psql("SELECT timeline_id FROM pg_control_checkpoint()") == "2"
            assert started.psql("SHOW archive_mode") == "off"
            assert contents(started) == expected
        finally:
            started.stop()
            subprocess.run(as_postgres(["rm", "-rf", str(started.base)]), check=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
