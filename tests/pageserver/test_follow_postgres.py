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


def test_page_change_without_image_stops_following(pageserver: PageserverProc) -> None:
    """A superuser session on the source turns wal_consistency_checking off and inserts
    into a page it already changed since the last checkpoint: that Heap/INSERT record
    carries no page image at all. The follower keeps what came before, stops for good
    (no retry) and says why in ``source_list``, ``branch list``, ``wait`` and its log;
    the pageserver keeps serving and the branch can still be detached."""
    import time

    import psycopg

    from tests.postgres.test_fidelity_slru import waldump
    from zenith.lsn import Lsn

    with PgCluster(settings={**FOLLOWABLE, "autovacuum": "off"}) as pg:
        pg.psql("CREATE TABLE nf (id int, v text)")
        pg.psql("INSERT INTO nf VALUES (0, 'before the import')")
        relnode = pg.psql("SELECT pg_relation_filenode('nf')")
        res = pageserver.cli("import", "main", pg.uri())
        assert res.returncode == 0, res.stderr
        slot = res.stdout.rsplit("slot ", 1)[1].strip()
        # Rows after the base backup's checkpoint: block 0 now needs no full-page write
        # until the next checkpoint, so only wal_consistency_checking gives it an image.
        pg.psql("INSERT INTO nf SELECT g, 'checked' FROM generate_series(1, 3) g")
        ingested = Lsn.parse(_wait_for_source(pageserver, pg))
        [row] = pageserver.query("source_list")
        assert row["name"] == "main" and row["state"] == "streaming", row

        with psycopg.connect(pg.uri(), autocommit=True) as c:
            def insert_lsn() -> Lsn:
                return Lsn.parse(c.execute("SELECT pg_current_wal_insert_lsn()::text")
                                 .fetchone()[0])

            before = insert_lsn()
            c.execute("SET wal_consistency_checking = ''")
            c.execute("INSERT INTO nf VALUES (100, 'not checked')")
            after = insert_lsn()

        # The record without an image, as pg_waldump shows it: a plain Heap INSERT (not
        # INSERT+INIT) into block 0 of nf, with no FPW.
        recs = waldump(pg, before, after)
        no_image = [r for r in recs if "blkref" in r.desc and "FPW" not in r.desc]
        assert no_image, [(r.rmgr, r.desc) for r in recs]
        bad = no_image[0]
        assert (bad.rmgr, bad.desc.split()[0]) == ("Heap", "INSERT"), bad
        assert f"/{relnode} blk 0" in bad.desc, bad

        # The follower stops, and says why (bounded wait: the suite may load the machine).
        deadline = time.monotonic() + 60
        while True:
            [row] = pageserver.query("source_list")
            state = str(row["state"])
            if state.startswith("stopped: "):
                break
            assert time.monotonic() < deadline, f"follower did not stop: {row}"
            time.sleep(0.1)
        assert "Heap/INSERT" in state and str(bad.lsn) in state, state
        assert relnode in state, state
        at = Lsn.parse(str(row["last_record_lsn"]))
        assert ingested <= at <= bad.lsn, (ingested, at, bad.lsn)
        assert pageserver.branch("main")["last_record_lsn"] == str(at)
        listing = pageserver.cli("branch", "list", check=True).stdout
        assert f"slot {slot}): at {at}" in listing and "stopped: " in listing, listing
        assert "Heap/INSERT" in listing, listing
        log = pageserver.config.log_path.read_text(errors="replace")
        assert "branch main: ingest stopped: " in log and "Heap/INSERT" in log
        assert "retrying" not in log.split("ingest stopped: ", 1)[1]

        # More WAL from ordinary sessions (with images): nothing more is ingested.
        pg.psql("INSERT INTO nf SELECT g, 'checked again' FROM generate_series(200, 300) g")
        pg.psql("UPDATE nf SET v = 'later' WHERE id < 3")
        pg.psql("SELECT pg_switch_wal()")
        pg.psql("INSERT INTO nf VALUES (400, 'after the switch')")
        target = pg.psql("SELECT pg_current_wal_flush_lsn()")
        assert Lsn.parse(target) > bad.lsn
        waited = pageserver.cli("wait", "main", target, "--timeout", "5")
        assert waited.returncode == 1, waited.stdout
        # It fails at once (no point waiting out the timeout) and says where and why.
        assert "timed out" not in waited.stderr and f"stopped at {at}" in waited.stderr, \
            waited.stderr
        assert "Heap/INSERT" in waited.stderr, waited.stderr
        time.sleep(1)
        [row] = pageserver.query("source_list")
        assert row["last_record_lsn"] == str(at) and str(row["state"]) == state, row
        assert pageserver.branch("main")["last_record_lsn"] == str(at)

        # The pageserver still serves: the branch reads and branches at its last LSN.
        digest = pageserver.digest(f"main@{at}")
        assert pageserver.digest("main") == digest
        pageserver.cli("branch", "create", "dev", "--from", f"main@{at}", check=True)
        assert pageserver.digest("dev") == digest
        assert {t["name"] for t in pageserver.query("branch_list")} >= {"main", "dev"}

        # Detach still works: the slot goes, the data stays.
        detached = pageserver.cli("detach", "main", check=True)
        assert "slot dropped" in detached.stdout, detached.stdout
        assert _slots(pg, slot) == "0"
        assert pageserver.query("source_list") == []
        assert pageserver.digest(f"main@{at}") == digest
