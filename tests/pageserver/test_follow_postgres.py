"""A pageserver following a real PostgreSQL 15 through the CLI: import, wait, branch list,
reconnection after restarts of either side, refusals, detach (issue 5, daemon side)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures import PageserverProc
from tests.pgcluster import PgCluster

FOLLOWABLE = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
}


@pytest.fixture(scope="module")
def source() -> Iterator[PgCluster]:
    with PgCluster(settings=FOLLOWABLE) as pg:
        pg.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v"
                " FROM generate_series(1, 5000) g")
        yield pg


def _slots(pg: PgCluster, slot: str) -> str:
    return pg.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")


def _wait_for_source(ps: PageserverProc, pg: PgCluster, branch: str = "main") -> str:
    lsn = pg.psql("SELECT pg_current_wal_flush_lsn()")
    res = ps.cli("wait", branch, lsn, "--timeout", "60")
    assert res.returncode == 0, res.stderr
    return lsn


def test_import_follow_restart_detach(pageserver: PageserverProc, source: PgCluster) -> None:
    res = pageserver.cli("import", "main", source.uri())
    assert res.returncode == 0, res.stderr
    assert "following the source through slot zenith_" in res.stdout
    slot = res.stdout.rsplit("slot ", 1)[1].strip()
    assert _slots(source, slot) == "1"

    source.psql("UPDATE t SET v = 'changed' WHERE id <= 100")
    first = _wait_for_source(pageserver, source)
    listing = pageserver.cli("branch", "list", check=True).stdout
    assert "following PostgreSQL:" in listing and f"slot {slot}" in listing
    assert "streaming" in listing

    # the pageserver restarts: it resumes from last_record_lsn through the same slot
    pageserver.stop()
    source.psql("INSERT INTO t SELECT g, 'new' FROM generate_series(5001, 6000) g")
    pageserver.start()
    second = _wait_for_source(pageserver, source)
    assert second != first

    # the source restarts: the pageserver reconnects by itself
    source.stop()
    source.start()
    source.psql("DELETE FROM t WHERE id > 5500")
    _wait_for_source(pageserver, source)

    # one writer per timeline: a followed branch takes no pushes
    other = pageserver.cli("origin", "add", "self", pageserver.uri(), check=True)
    assert other.returncode == 0
    pageserver.cli("generate", "scratch", "--pages", "2", check=True)
    refused = pageserver.cli("push", "scratch", "self:main", "--force")
    assert refused.returncode == 1 and "follows a PostgreSQL source" in refused.stderr

    detached = pageserver.cli("detach", "main", check=True)
    assert "slot dropped" in detached.stdout
    assert _slots(source, slot) == "0"
    assert "following PostgreSQL" not in pageserver.cli("branch", "list", check=True).stdout
    assert pageserver.cli("digest", "main").returncode == 0  # the data stays


def test_refusals(pageserver: PageserverProc, source: PgCluster) -> None:
    source.psql("CREATE ROLE plain LOGIN")
    res = pageserver.cli("import", "x", source.uri(user="plain"))
    assert res.returncode == 1 and "REPLICATION" in res.stderr, res.stderr
    bad = pageserver.cli("import", "main", "postgresql://nobody@127.0.0.1:1/x")
    assert bad.returncode == 1 and "error:" in bad.stderr
    assert pageserver.query("timeline_list") == []  # nothing half-made
    missing = pageserver.cli("detach", "nope")
    assert missing.returncode == 1 and "does not follow" in missing.stderr


def test_source_without_consistency_checking_is_refused(pageserver: PageserverProc) -> None:
    settings = {**FOLLOWABLE, "wal_consistency_checking": "''"}
    with PgCluster(settings=settings) as pg:
        res = pageserver.cli("import", "main", pg.uri())
        assert res.returncode == 1
        assert "wal_consistency_checking" in res.stderr and "all" in res.stderr
        assert pg.psql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert pageserver.query("timeline_list") == []


def test_killed_pageserver_and_dropped_slot(pageserver: PageserverProc,
                                            source: PgCluster) -> None:
    res = pageserver.cli("import", "killme", source.uri())
    assert res.returncode == 0, res.stderr
    slot = res.stdout.rsplit("slot ", 1)[1].strip()
    source.psql("UPDATE t SET v = 'again' WHERE id <= 1000")
    _wait_for_source(pageserver, source, "killme")
    # SIGKILL mid-stream: on restart it resumes from a consistent last_record_lsn
    source.psql("UPDATE t SET v = 'more' WHERE id <= 3000")
    pageserver.kill()
    pageserver.start()
    _wait_for_source(pageserver, source, "killme")
    # the slot disappears behind the pageserver's back: a clear error, and the branch
    # stays readable at its last consistent LSN
    pageserver.stop()
    source.psql(f"SELECT pg_drop_replication_slot('{slot}')")
    source.psql("UPDATE t SET v = 'lost' WHERE id <= 10")
    pageserver.start()
    at = pageserver.branch("killme")["last_record_lsn"]
    digest = pageserver.digest(f"killme@{at}")
    target = source.psql("SELECT pg_current_wal_flush_lsn()")
    waited = pageserver.cli("wait", "killme", target, "--timeout", "3")
    assert waited.returncode == 1 and "timed out" in waited.stderr
    assert "does not exist" in waited.stderr, waited.stderr
    assert pageserver.branch("killme")["last_record_lsn"] == at  # it stays where it was
    assert pageserver.digest(f"killme@{at}") == digest
    listing = pageserver.cli("branch", "list", check=True).stdout
    assert "reconnecting" in listing
    pageserver.cli("detach", "killme", check=True)


def test_pages_through_get_page_equal_the_source(pageserver: PageserverProc) -> None:
    """DESIGN §7's oracle through the pageserver itself: after a CHECKPOINT, every block of
    the main and VM forks of every relation, read with ``get_page`` at the ingested LSN,
    equals ``get_raw_page`` on the source after PostgreSQL's consistency-check masking;
    with updates and deletes on pages VACUUM had marked all-visible."""
    import psycopg

    from tests.postgres.test_ingest_pg import mask_page, mask_vm_page, source_pages
    from zenith.postgres.keys import ForkNumber, rel_block_key

    with PgCluster(settings={**FOLLOWABLE, "autovacuum": "off"}) as pg:
        pg.psql("CREATE EXTENSION pageinspect")
        assert pageserver.cli("import", "main", pg.uri()).returncode == 0
        pg.run("pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres")
        pg.psql("VACUUM (FREEZE) pgbench_accounts")
        pg.psql("UPDATE pgbench_accounts SET abalance = 7 WHERE aid % 97 = 0")
        pg.psql("DELETE FROM pgbench_accounts WHERE aid % 89 = 0")
        pg.psql("INSERT INTO pgbench_history VALUES (1, 1, 1, 5, now())")
        pg.psql("VACUUM pgbench_history")
        # Prune every page now, so reading catalogs below does not prune them after our LSN.
        pg.psql("VACUUM (SKIP_LOCKED)")
        pg.psql("CHECKPOINT")
        lsn = _wait_for_source(pageserver, pg)
        pages = source_pages(pg, "postgres")
        checked = 0
        with psycopg.connect(pageserver.uri(), autocommit=True) as conn:
            for (tag, oid), (am, nblocks, raw) in pages.items():
                for blk in range(nblocks):
                    key = rel_block_key(tag, blk).hex()
                    got = conn.execute(f"get_page main {lsn} {key}").fetchone()[0]
                    ours = bytes(got) if got is not None else bytes(8192)
                    if tag.forknum == ForkNumber.MAIN:
                        assert mask_page(ours, am) == mask_page(raw[blk], am), (oid, tag, blk)
                    else:
                        assert mask_vm_page(ours) == mask_vm_page(raw[blk]), (oid, tag, blk)
                    checked += 1
        assert checked > 1000
        pageserver.cli("detach", "main", check=True)
