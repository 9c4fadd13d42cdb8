"""A real PostgreSQL 15 cluster through a bucket: imported and followed on A, pushed to the
bucket, pulled into B, exported there, started by the stock ``postgres`` and compared with
the source (issue 13)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.bucket.s3server import S3Server
from tests.cli.realpg import (
    FOLLOWABLE,
    check_export,
    export_dir,
    flush_lsn,
    pgbench,
    sent,
    table_contents,
)
from tests.fixtures import started_pageservers
from tests.pgcluster import PGBIN, PgCluster

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def source() -> Iterator[PgCluster]:
    with PgCluster(settings=FOLLOWABLE, initdb_args=("--data-checksums",)) as pg:
        pgbench(pg, "-i", "-q", "-s", "3")
        yield pg


def test_real_cluster_through_a_bucket(source: PgCluster, pageserver_factory,  # type: ignore[no-untyped-def]
                                       s3server: S3Server, aws_env: None) -> None:
    a, b = started_pageservers(pageserver_factory, "a", "b")
    uri = s3server.uri(s3server.new_bucket())
    for ps in (a, b):
        ps.cli("origin", "add", "backup", uri, check=True)
    imported = a.cli("import", "main", source.uri(), timeout=600)
    assert imported.returncode == 0, imported.stderr
    pgbench(source, "-t", "200", "-c", "2")
    middle = flush_lsn(source)
    at_middle = table_contents(source)
    source.psql("CREATE TABLE extra AS SELECT g, repeat('x', g % 300) AS s"
                " FROM generate_series(1, 5000) g")
    source.psql("DELETE FROM pgbench_accounts WHERE aid % 100 = 0")
    end = flush_lsn(source)
    expected = table_contents(source)
    assert a.cli("wait", "main", end, "--timeout", "120").returncode == 0
    a.cli("detach", "main", check=True)
    last = str(a.branch("main")["last_record_lsn"])

    pushed = a.cli("push", "main", "backup", timeout=600)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith(f"* [new branch] main -> backup:main 0/0..{last}, "), \
        pushed.stdout
    pulled = b.cli("pull", "main", "backup", timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"* [new branch] backup:main -> main 0/0..{last}, "), \
        pulled.stdout
    assert sent(pulled.stdout)[0] == sent(pushed.stdout)[0]
    assert b.digest("main") == a.digest("main")
    listed = a.cli("branch", "list", "--origin", "backup", check=True).stdout
    assert re.search(rf"^main\s+{a.branch('main')['timeline_id']}\s+-\s+{last}$", listed, re.M)
    with export_dir() as out:
        check_export(b, "main", out / "end", expected)
        # straight from the bucket, at an LSN in the middle too (the branch is read into a
        # scratch repository of A's pageserver, then exported)
        check_export(a, f"backup:main@{middle}", out / "middle", at_middle)
    for ps in (a, b):  # nothing left in the scratch directories
        assert not [*(ps.path / "scratch").iterdir()]
