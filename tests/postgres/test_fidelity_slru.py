"""Fidelity of SLRU state and WAL-only state in exports, against real PostgreSQL 15 (issue 10).

Each test runs a source cluster (``wal_consistency_checking = all``), imports it into
zenith, follows its WAL and exports data directories at chosen LSNs on which the stock
``postgres`` must start and agree with the source as it was at that LSN:

* multixacts with updaters across a pg_multixact/offsets page boundary (15.16+ redo
  writes the *next* multixact's offset too): every row and every multixact readable,
  ``VACUUM FREEZE``, amcheck, and the offsets/members pages byte for byte;
* commit timestamps and replication origins (``track_commit_timestamp``,
  ``pg_replication_origin_advance``, a commit carrying an origin): both live in files
  PostgreSQL writes only at checkpoint, but an export must reflect the WAL at its LSN;
* a source prepared just below XID and multixact wraparound with ``pg_resetwal``: the
  export's next XID / multixact / offset never fall below the source's at that LSN (read
  from the source's own WAL with ``pg_waldump``), never go backwards, and no ID is reused;
* a record without a page image (``SET wal_consistency_checking = ''``) stops ingest
  with ``MissingPageImage`` before anything past it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from zenith.errors import ZenithError
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres import walingest
from zenith.postgres.import_basebackup import import_base_backup
from zenith.postgres.replication import connect_replication
from zenith.postgres.walingest import WalIngest
from zenith.storage import SqliteRepository, open_repository

from ..pgcluster import PGBIN, PgCluster, as_postgres
from .test_export_pg import Exported, Follower, amcheck

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(300),
]

SETTINGS = {
    "wal_level": "replica",
    # A follower that died leaves its walsender waiting for replies at shutdown.
    "wal_sender_timeout": "'10s'",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "autovacuum": "off",
    "fsync": "off",
    # pg_waldump reads the source's WAL after the run: keep it whatever the slot confirms.
    "wal_keep_size": "'1GB'",
}
BLCKSZ = 8192
MULTIXACT_OFFSETS_PER_PAGE = BLCKSZ // 4
TWO32 = 1 << 32


# -- helpers ---------------------------------------------------------------------------------


def q(pg: PgCluster, query: str, params: Iterable[Any] | None = None,
      db: str = "postgres") -> list[tuple[Any, ...]]:
    """One statement (or, without params, a script) in autocommit; its rows. psycopg's
    errors carry the server's message, so a failing export says why."""
    with psycopg.connect(pg.uri(db=db), autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def flush_lsn(pg: PgCluster) -> Lsn:
    return Lsn.parse(q(pg, "SELECT pg_current_wal_flush_lsn()::text")[0][0])


def settled_lsn(pg: PgCluster) -> Lsn:
    """The flush LSN once everything inserted so far is flushed. WAL written outside a
    transaction (origin advance) is flushed only by a later commit that itself wrote WAL
    (a commit that only assigned an XID is asynchronous) or by the WAL writer: a
    transactional logical message is such a commit."""
    q(pg, "SELECT pg_logical_emit_message(true, 'zenith-test', 'settle')")
    return flush_lsn(pg)


def insert_lsn(pg: PgCluster) -> Lsn:
    return Lsn.parse(q(pg, "SELECT pg_current_wal_insert_lsn()::text")[0][0])


def unwrap(v: int) -> int:
    """A 32-bit XID/multixact/offset near wraparound as a monotonic number: values in the
    lower half are taken to be past the wrap (every test value lies within 2^31 of it)."""
    return v if v >= 1 << 31 else v + TWO32


def next_after(v: int, n: int) -> int:
    """``v + n`` skipping the value 0 (mod 2^32), as PostgreSQL does for multixact IDs
    and member offsets."""
    w = v + n
    return w + 1 if w % TWO32 == 0 else w


@dataclass
class Followed:
    repo: SqliteRepository
    tid: TimelineId
    start: Lsn
    follower: Follower
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def finish(self, end: Lsn) -> None:
        await self.follower.catch_up(end, self.task)
        self.stop.set()
        await self.task


async def import_and_follow(
    pg: PgCluster, tmp_path: Path, *,
    concurrently: Callable[[threading.Event, threading.Event], object] | None = None,
) -> Followed:
    """Import ``pg`` into a new repository and follow its WAL in a task. ``concurrently``
    (if given) runs in a thread around the base backup: it gets a ``started`` event to set
    once it is under way and a ``stop`` event set when the import is done."""
    repo = open_repository(tmp_path / "zenith.db", durable=False)
    tid = repo.create_timeline().timeline_id
    conn = await connect_replication(pg.uri())
    await conn.create_physical_slot("zenith_fidelity")
    worker = None
    started, stop_worker = threading.Event(), threading.Event()
    if concurrently is not None:
        worker = asyncio.create_task(asyncio.to_thread(concurrently, started, stop_worker))
        while not started.is_set():
            assert not worker.done(), worker
            await asyncio.sleep(0.02)
    try:
        result = await import_base_backup(repo, tid, conn)
    finally:
        stop_worker.set()
        if worker is not None:
            await worker
    await conn.close()
    follower = Follower(WalIngest(repo, tid, result.rel_sizes), result.start_lsn)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(pg.uri(), "zenith_fidelity", result.timeline, stop))
    return Followed(repo, tid, result.start_lsn, follower, task, stop)


@contextlib.contextmanager
def started_export(repo: SqliteRepository, tid: TimelineId, lsn: Lsn) -> Iterator[Exported]:
    """An export at ``lsn`` with the stock postgres running on it (destroyed afterwards);
    its server log is printed when the body fails."""
    exp = Exported(repo, tid, lsn)
    ok = False
    try:
        try:
            exp.start()
        except subprocess.CalledProcessError:
            raise AssertionError(
                f"postgres did not start on the export at {lsn}:\n{_log_tail(exp)}") from None
        yield exp
        ok = True
    finally:
        if not ok:
            print(f"--- export at {lsn}: server log ---\n{_log_tail(exp)}")
        exp.destroy()


def _log_tail(pg: PgCluster, n: int = 4000) -> str:
    log = pg.base / "log"
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def multixact_members(pg: PgCluster, multis: Iterable[int]) -> dict[int, str]:
    """``pg_get_multixact_members`` of each multixact, as ``xid mode,...`` in stored order."""
    rows = q(pg, "SELECT m, string_agg(x.xid::text || ' ' || x.mode, ',' ORDER BY x.n) "
                 "FROM unnest(%s::bigint[]) m, "
                 "pg_get_multixact_members(m::text::xid) WITH ORDINALITY x(xid, mode, n) "
                 "GROUP BY m", (sorted(set(multis)),))
    return {int(m): s for m, s in rows}


def first_differences(expected: dict[int, str], got: dict[int, str], n: int = 5) -> str:
    keys = sorted(set(expected) | set(got))
    bad = [k for k in keys if expected.get(k) != got.get(k)]
    return f"{len(bad)} differ: " + "; ".join(
        f"{k}: source {expected.get(k)!r} export {got.get(k)!r}" for k in bad[:n])


def vacuum_all(pg: PgCluster) -> None:
    r = pg.run("vacuumdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "--all",
               "--freeze", "-q", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# -- 1. multixacts with updaters across an offsets page --------------------------------------

MX_ROWS = 2200  # one multixact {A1, A2, updater} a row: past the first offsets page


def mx_contents(pg: PgCluster) -> tuple[Any, ...]:
    """Every row (``SELECT *``) with its xmax: a scan checks every tuple's visibility,
    reading the members of each updater multixact."""
    return q(pg, "SELECT count(*), md5(string_agg(x::text || ':' || x.xmax, ',' "
                 "ORDER BY x.id)) FROM mx x")[0]


def newest_multi(pg: PgCluster, table: str) -> int:
    """The highest multixact in any tuple's xmax (pageinspect; no wraparound here)."""
    return int(q(pg, f"SELECT max(t_xmax::text::bigint) FROM generate_series(0, "
                     f"pg_relation_size('{table}') / {BLCKSZ} - 1) b, "
                     f"heap_page_items(get_raw_page('{table}', b::int)) "
                     "WHERE t_infomask & 4096 <> 0")[0][0])  # HEAP_XMAX_IS_MULTI


def update_rows(pg: PgCluster, first: int, last: int) -> None:
    """Each row its own transaction: a new updater in a multixact with the lockers."""
    q(pg, f"DO $$ BEGIN FOR i IN {first}..{last} LOOP "
          "UPDATE mx SET v = v + 1 WHERE id = i; COMMIT; END LOOP; END $$")


def slru_page_differences(source: bytes, export: bytes) -> list[str]:
    """Pages present in both files that differ, with the first differing u32 word."""
    out = []
    for p in range(min(len(source), len(export)) // BLCKSZ):
        a, b = source[p * BLCKSZ:(p + 1) * BLCKSZ], export[p * BLCKSZ:(p + 1) * BLCKSZ]
        if a != b:
            words = [i for i in range(0, BLCKSZ, 4) if a[i:i + 4] != b[i:i + 4]]
            i = words[0]
            out.append(f"page {p}: {len(words)} words differ, first word {i // 4}: source "
                       f"{int.from_bytes(a[i:i + 4], 'little')} export "
                       f"{int.from_bytes(b[i:i + 4], 'little')}")
    return out


async def test_multixact_updaters_across_offsets_page(tmp_path: Path) -> None:
    with PgCluster(settings=SETTINGS) as pg:
        # fillfactor 10: room for HOT updates, and small page images in the WAL.
        q(pg, "CREATE EXTENSION pageinspect;"
              "CREATE TABLE mx (id int PRIMARY KEY, v int NOT NULL, pad text)"
              " WITH (fillfactor = 10);"
              f"INSERT INTO mx SELECT g, 0, repeat('x', 20) FROM generate_series(1, {MX_ROWS}) g")
        src = await import_and_follow(pg, tmp_path)
        lockers = [psycopg.connect(pg.uri()) for _ in range(2)]
        try:
            def first_half() -> tuple[int, int]:
                # A1 then A2 key-share every row: the lock-only multixact {A1, A2} (one
                # for all rows: a backend reuses a multixact of the same members).
                for c in lockers:
                    assert len(c.execute("SELECT id FROM mx FOR KEY SHARE").fetchall()) == MX_ROWS
                locked = newest_multi(pg, "mx")
                assert locked < 10
                # Updates (non-key column) while A1, A2 hold their locks: each makes a
                # multixact {A1, A2, updater}; stop just past the offsets page boundary.
                n = MULTIXACT_OFFSETS_PER_PAGE - locked + 2
                update_rows(pg, 1, n)
                return locked, n

            locked, n_first = await asyncio.to_thread(first_half)
            mid_newest = newest_multi(pg, "mx")
            assert MULTIXACT_OFFSETS_PER_PAGE <= mid_newest < MULTIXACT_OFFSETS_PER_PAGE + 10
            modes = multixact_members(pg, [mid_newest])[mid_newest]
            assert modes.count("keysh") == 2 and "nokeyupd" in modes, modes
            mid_expected = (mx_contents(pg), multixact_members(pg, range(1, mid_newest + 1)))
            mid = flush_lsn(pg)

            def second_half() -> None:
                update_rows(pg, n_first + 1, MX_ROWS)
                for c in lockers:
                    c.commit()
                q(pg, "CHECKPOINT")  # the source's SLRU files, for the byte comparison

            await asyncio.to_thread(second_half)
        finally:
            for c in lockers:
                c.close()
        end_newest = newest_multi(pg, "mx")
        assert end_newest == locked + MX_ROWS
        end_expected = (mx_contents(pg), multixact_members(pg, range(1, end_newest + 1)))
        end = flush_lsn(pg)
        source_slru = {d: (pg.datadir / "pg_multixact" / d / "0000").read_bytes()
                       for d in ("offsets", "members")}
        await src.finish(end)

        def check(lsn: Lsn, newest: int, expected: tuple[Any, ...]) -> dict[str, bytes]:
            contents, members = expected
            with started_export(src.repo, src.tid, lsn) as exp:
                files = {d: (exp.datadir / "pg_multixact" / d / "0000").read_bytes()
                         for d in ("offsets", "members")}
                # Every row (the scan reads each tuple's xmax multixact, updaters included).
                assert mx_contents(exp) == contents
                got = multixact_members(exp, [newest])
                assert got == {newest: members[newest]}
                got = multixact_members(exp, range(1, newest + 1))
                assert got == members, first_differences(members, got)
                assert amcheck(exp) == ""
                q(exp, "VACUUM FREEZE mx")
                assert q(exp, "SELECT count(*), sum(v) FROM mx")[0] == (
                    MX_ROWS, n_first if lsn == mid else MX_ROWS)
                assert amcheck(exp) == ""
            return files

        await asyncio.to_thread(check, mid, mid_newest, mid_expected)
        exported = await asyncio.to_thread(check, end, end_newest, end_expected)
        # The pages as PostgreSQL itself wrote them (next multixact's offset included).
        assert len(source_slru["offsets"]) >= 2 * BLCKSZ
        assert len(exported["offsets"]) >= 2 * BLCKSZ
        for d in ("offsets", "members"):
            assert slru_page_differences(source_slru[d], exported[d]) == [], d
        src.repo.close()


# -- 2. commit timestamps and replication origins ------------------------------------------


def ct_state(pg: PgCluster) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    rows = q(pg, "SELECT id, xmin::text, "
                 "extract(epoch FROM pg_xact_commit_timestamp(xmin))::text, "
                 "(pg_xact_commit_timestamp_origin(xmin)).roident::int FROM ct ORDER BY id")
    origins = q(pg, "SELECT external_id, remote_lsn::text FROM pg_replication_origin_status "
                    "ORDER BY external_id")
    return rows, origins


async def test_commit_timestamps_and_replication_origins(tmp_path: Path) -> None:
    settings = {**SETTINGS, "track_commit_timestamp": "on"}
    with PgCluster(settings=settings) as pg:
        q(pg, "CREATE TABLE ct (id int PRIMARY KEY, note text)")
        for i in (1, 2, 3):  # committed long before the base backup
            q(pg, "INSERT INTO ct VALUES (%s, 'before')", (i,))
        q(pg, "SELECT pg_replication_origin_create('fid_before')")
        q(pg, "SELECT pg_replication_origin_advance('fid_before', '0/1000000')")

        def committer(started: threading.Event, stop: threading.Event) -> None:
            """Commits around and during the base backup, one row a transaction."""
            with psycopg.connect(pg.uri(), autocommit=True) as c:
                i = 100
                while not stop.is_set() or i < 110:
                    c.execute("INSERT INTO ct VALUES (%s, 'during')", (i,))
                    i += 1
                    if i == 103:
                        started.set()
                    time.sleep(0.01)

        src = await import_and_follow(pg, tmp_path, concurrently=committer)

        def first_half() -> None:
            for i in (1001, 1002, 1003):
                q(pg, "INSERT INTO ct VALUES (%s, 'after')", (i,))
            q(pg, "SELECT pg_replication_origin_create('fid_adv')")
            q(pg, "SELECT pg_replication_origin_advance('fid_adv', '1/AB000000')")
            q(pg, "SELECT pg_replication_origin_advance('fid_before', '2/10')")
            q(pg, "SELECT pg_replication_origin_create('fid_gone')")
            q(pg, "SELECT pg_replication_origin_advance('fid_gone', '0/5000')")
            q(pg, "SELECT pg_replication_origin_drop('fid_gone')")

        await asyncio.to_thread(first_half)
        mid_expected = ct_state(pg)
        mid = settled_lsn(pg)

        def second_half() -> None:
            q(pg, "SELECT pg_replication_origin_create('fid_session')")
            with psycopg.connect(pg.uri(), autocommit=True) as c:
                c.execute("SELECT pg_replication_origin_session_setup('fid_session')")
                c.execute("BEGIN")
                c.execute("SELECT pg_replication_origin_xact_setup('3/ABCDEF00', "
                          "'2024-01-02 03:04:05.123456+00')")
                c.execute("INSERT INTO ct VALUES (2001, 'origin')")
                c.execute("COMMIT")
                c.execute("SELECT pg_replication_origin_session_reset()")
            q(pg, "INSERT INTO ct VALUES (2002, 'after origin')")
            q(pg, "SELECT pg_replication_origin_advance('fid_adv', '1/AC000000')")

        await asyncio.to_thread(second_half)
        end_expected = ct_state(pg)
        end = settled_lsn(pg)
        await src.finish(end)

        # What the source shows: every row has a commit timestamp, the origin commit
        # carries fid_session's id and its own timestamp, no checkpoint persisted it.
        rows, origins = end_expected
        assert all(r[2] is not None for r in rows), rows
        assert sum(1 for r in rows if 100 <= r[0] < 1000) >= 10
        session_id = q(pg, "SELECT roident::int FROM pg_replication_origin "
                           "WHERE roname = 'fid_session'")[0][0]
        assert [r[3] for r in rows if r[0] == 2001] == [session_id]
        assert [r[2] for r in rows if r[0] == 2001] == ["1704164645.123456"]
        assert all(r[3] == 0 for r in rows if r[0] != 2001)
        assert origins == [("fid_adv", "1/AC000000"), ("fid_before", "2/10"),
                           ("fid_session", "3/ABCDEF00")]
        assert mid_expected[1] == [("fid_adv", "1/AB000000"), ("fid_before", "2/10")]

        def check(lsn: Lsn, expected: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]
                  ) -> None:
            with started_export(src.repo, src.tid, lsn) as exp:
                got_rows, got_origins = ct_state(exp)
                exp_rows, exp_origins = expected
                assert [r[:2] for r in got_rows] == [r[:2] for r in exp_rows]
                bad = [(e, g) for e, g in zip(exp_rows, got_rows, strict=True) if e != g]
                assert bad == [], (f"{len(bad)} of {len(exp_rows)} rows differ "
                                   f"(source, export): {bad[:4]}")
                assert got_origins == exp_origins
                assert amcheck(exp) == ""

        await asyncio.to_thread(check, mid, mid_expected)
        await asyncio.to_thread(check, end, end_expected)
        src.repo.close()


# -- 3. XID and multixact wraparound ----------------------------------------------------------

XID0 = TWO32 - 512  # next XID after pg_resetwal
MULTI0 = TWO32 - 512  # next (and oldest) multixact
OFFSET0 = TWO32 - 1024  # next member offset: 2 members a multixact, wraps with the IDs
WRAP_ROWS = 700


@dataclass
class WalRec:
    rmgr: str
    tx: int
    lsn: Lsn
    tot: int
    desc: str


_WALDUMP_LINE = re.compile(
    r"rmgr: (\S+)\s+len \(rec/tot\):\s*\d+/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+),"
    r" prev [0-9A-F]+/[0-9A-F]+, desc: (.*)$")


def waldump(pg: PgCluster, start: Lsn, end: Lsn) -> list[WalRec]:
    r = pg.run("pg_waldump", "-p", str(pg.datadir / "pg_wal"), "-s", str(start), "-e",
               str(end), check=False)
    recs = []
    for line in r.stdout.splitlines():
        m = _WALDUMP_LINE.match(line)
        if m:
            recs.append(WalRec(m[1], int(m[3]), Lsn.parse(m[4]), int(m[2]), m[5]))
    assert recs, r.stderr
    return recs


@dataclass
class NextIds:
    xid: int  # full (epoch << 32 | xid)
    multi: int  # unwrapped
    offset: int  # unwrapped
    max_assigned_xid: int = 0  # full


def source_next_ids(recs: list[WalRec], upto: Lsn) -> NextIds:
    """The source's next XID / multixact / offset once the WAL up to ``upto`` was written:
    its checkpoints' values and past every XID and multixact its records carry."""
    ids = NextIds(0, 0, 0)
    for r in recs:
        if r.lsn + r.tot > upto:
            break
        if r.tx:
            full = unwrap(r.tx)
            ids.max_assigned_xid = max(ids.max_assigned_xid, full)
            ids.xid = max(ids.xid, full + 1)
        if r.rmgr == "XLOG" and r.desc.startswith(("CHECKPOINT_ONLINE", "CHECKPOINT_SHUTDOWN")):
            m = re.search(r"; xid (\d+):(\d+); oid \d+; multi (\d+); offset (\d+);", r.desc)
            assert m, r.desc
            ids.xid = max(ids.xid, int(m[1]) << 32 | int(m[2]))
            ids.multi = max(ids.multi, unwrap(int(m[3])))
            ids.offset = max(ids.offset, unwrap(int(m[4])))
        if r.rmgr == "MultiXact" and r.desc.startswith("CREATE_ID "):
            m = re.match(r"CREATE_ID (\d+) offset (\d+) nmembers (\d+)", r.desc)
            assert m, r.desc
            ids.multi = max(ids.multi, next_after(unwrap(int(m[1])), 1))
            ids.offset = max(ids.offset, next_after(unwrap(int(m[2])), int(m[3])))
    return ids


def prepare_near_wraparound(pg: PgCluster) -> None:
    """initdb, freeze everything initdb wrote (its XIDs would otherwise be in the future),
    then pg_resetwal to just below XID and multixact wraparound, with the zero-filled SLRU
    segments its documentation asks for, and freeze again."""
    pg.init()
    pg.start()
    # template0 too: VACUUM of every database after the wrap lets CLOG truncation happen.
    q(pg, "ALTER DATABASE template0 ALLOW_CONNECTIONS true")
    vacuum_all(pg)
    q(pg, "CHECKPOINT")
    pg.stop()
    for directory, per_segment, value in (("pg_xact", 32768 * 32, XID0),
                                          ("pg_multixact/offsets", 2048 * 32, MULTI0),
                                          ("pg_multixact/members", 1636 * 32, OFFSET0)):
        path = pg.datadir / directory / f"{value // per_segment:04X}"
        subprocess.run(as_postgres(["dd", "if=/dev/zero", f"of={path}", f"bs={BLCKSZ}",
                                    "count=32", "status=none"]), check=True, timeout=60)
    pg.run("pg_resetwal", "-x", hex(XID0), "-m", f"{hex(MULTI0)},{hex(MULTI0)}",
           "-O", hex(OFFSET0), "-D", str(pg.datadir))
    pg.start()
    # The relfrozenxid/relminmxid (and database horizons) the first VACUUM left now lie
    # in the future: VACUUM again before any new tuple exists, so it overwrites them.
    vacuum_all(pg)


def burn_xids(pg: PgCluster, n: int) -> None:
    q(pg, f"DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM txid_current(); COMMIT; END LOOP; END $$")


def share_lock_pair(pg: PgCluster, lo: int, hi: int) -> list[int]:
    """Transaction A share-locks rows ``lo..hi``, then B share-locks each of them in its own
    subtransaction (a backend reuses a multixact of the same members, so one locker XID
    for all rows would make one multixact): one multixact a row. Their IDs."""
    a, b = psycopg.connect(pg.uri()), psycopg.connect(pg.uri())
    try:
        a.execute("SELECT id FROM w WHERE id BETWEEN %s AND %s FOR SHARE", (lo, hi))
        b.execute(f"DO $$ BEGIN FOR i IN {lo}..{hi} LOOP BEGIN "
                  "PERFORM 1 FROM w WHERE id = i FOR SHARE; "
                  "EXCEPTION WHEN OTHERS THEN RAISE; END; END LOOP; END $$")
        multis = [int(x) for (x,) in b.execute(
            "SELECT xmax::text FROM w WHERE id BETWEEN %s AND %s", (lo, hi)).fetchall()]
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()
    assert len(set(multis)) == hi - lo + 1, multis[:5]
    return multis


def w_contents(pg: PgCluster) -> tuple[Any, ...]:
    return q(pg, "SELECT count(*), md5(string_agg(concat_ws(':', id, v), ',' ORDER BY id)) "
                 "FROM w")[0]


@dataclass
class Point:
    name: str
    lsn: Lsn
    contents: tuple[Any, ...]
    members: dict[int, str]


async def test_xid_and_multixact_wraparound(tmp_path: Path) -> None:
    pg = PgCluster(settings=SETTINGS)
    try:
        await asyncio.to_thread(prepare_near_wraparound, pg)
        assert XID0 <= int(q(pg, "SELECT txid_current()")[0][0]) < XID0 + 10
        q(pg, "CREATE TABLE w (id int PRIMARY KEY, v int NOT NULL) WITH (fillfactor = 10);"
              f"INSERT INTO w SELECT g, 0 FROM generate_series(1, {WRAP_ROWS}) g")
        src = await import_and_follow(pg, tmp_path)
        points: list[Point] = []

        def point(name: str, multis: list[int]) -> None:
            points.append(Point(name, settled_lsn(pg), w_contents(pg),
                                multixact_members(pg, multis)))

        def workload() -> None:
            burn_xids(pg, 100)
            q(pg, "UPDATE w SET v = v + 1 WHERE id % 7 = 0")
            point("before wraparound", share_lock_pair(pg, 1, 200))
            burn_xids(pg, 450)  # XIDs wrap
            q(pg, "UPDATE w SET v = v + 1 WHERE id % 5 = 0")
            point("XIDs wrapped", share_lock_pair(pg, 1, 3))
            multis = share_lock_pair(pg, 201, 600)  # multixacts and offsets wrap
            q(pg, "UPDATE w SET v = v + 1 WHERE id % 3 = 0 AND id <= 200")
            point("multixacts wrapped", multis)
            vacuum_all(pg)  # CLOG and multixact truncation
            q(pg, "CHECKPOINT")
            burn_xids(pg, 50)
            point("after VACUUM FREEZE", share_lock_pair(pg, 601, WRAP_ROWS))

        await asyncio.to_thread(workload)
        end = flush_lsn(pg)
        await src.finish(end)
        recs = await asyncio.to_thread(waldump, pg, src.start, end)
        source = {p.name: source_next_ids(recs, p.lsn) for p in points}
        # The scenario happened as intended.
        assert source["before wraparound"].xid < TWO32 < source["XIDs wrapped"].xid
        assert source["XIDs wrapped"].multi < TWO32 < source["multixacts wrapped"].multi
        assert source["XIDs wrapped"].offset < TWO32 < source["multixacts wrapped"].offset
        after = [r for r in recs if r.lsn > points[2].lsn]
        assert any(r.rmgr == "CLOG" and r.desc.startswith("TRUNCATE") for r in after)
        assert any(r.rmgr == "MultiXact" and r.desc.startswith("TRUNCATE_ID") for r in after)

        def check(p: Point, src_ids: NextIds) -> NextIds:
            with started_export(src.repo, src.tid, p.lsn) as exp:
                nx, nm, no = q(exp, "SELECT next_xid, next_multixact_id::text, "
                                    "next_multi_offset::text FROM pg_control_checkpoint()")[0]
                epoch, _, xid = nx.partition(":")
                got = NextIds(int(epoch) << 32 | int(xid), unwrap(int(nm)), unwrap(int(no)))
                assert got.xid >= src_ids.xid, (p.name, nx, src_ids)
                assert got.multi >= src_ids.multi, (p.name, nm, src_ids)
                assert got.offset >= src_ids.offset, (p.name, no, src_ids)
                assert w_contents(exp) == p.contents, p.name
                got_members = multixact_members(exp, p.members)
                assert got_members == p.members, (p.name,
                                                  first_differences(p.members, got_members))
                # No XID or multixact the source handed out is handed out again.
                new_xid = int(q(exp, "SELECT txid_current()")[0][0])
                assert new_xid > src_ids.max_assigned_xid, (p.name, new_xid, src_ids)
                new_multi = share_lock_pair(exp, WRAP_ROWS, WRAP_ROWS)[0]
                assert unwrap(new_multi) >= src_ids.multi, (p.name, new_multi, src_ids)
                assert amcheck(exp) == "", p.name
                q(exp, "VACUUM FREEZE w")
                assert w_contents(exp) == p.contents, p.name
            return got

        previous: NextIds | None = None
        for p in points:
            got = await asyncio.to_thread(check, p, source[p.name])
            if previous is not None:  # successive exports never go backwards
                assert got.xid >= previous.xid, (p.name, got, previous)
                assert got.multi >= previous.multi, (p.name, got, previous)
                assert got.offset >= previous.offset, (p.name, got, previous)
            previous = got
        src.repo.close()
    finally:
        pg.destroy()


# -- 4. a block reference without a page image stops ingest ---------------------------------


async def test_missing_page_image_stops_ingest(tmp_path: Path) -> None:
    with PgCluster(settings=SETTINGS) as pg:
        q(pg, "CREATE TABLE nf (id int, v text)")
        relnode = int(q(pg, "SELECT pg_relation_filenode('nf')")[0][0])
        src = await import_and_follow(pg, tmp_path)

        def workload() -> tuple[Lsn, Lsn, Lsn]:
            with psycopg.connect(pg.uri(), autocommit=True) as c:
                c.execute("INSERT INTO nf VALUES (1, 'checked')")
                before = insert_lsn(pg)
                # The page was changed since the last checkpoint: no full-page write
                # either, so this record carries no image at all.
                c.execute("SET wal_consistency_checking = ''")
                c.execute("INSERT INTO nf VALUES (2, 'not checked')")
                after = insert_lsn(pg)
                c.execute("RESET wal_consistency_checking")
                c.execute("INSERT INTO nf VALUES (3, 'checked again')")
            return before, after, flush_lsn(pg)

        before, after, end = await asyncio.to_thread(workload)
        deadline = time.monotonic() + 60
        while not src.task.done() and src.follower.ingest.last_lsn < end:
            assert time.monotonic() < deadline, "ingest neither failed nor caught up"
            await asyncio.sleep(0.05)
        src.stop.set()
        with contextlib.suppress(Exception):
            await src.task
        exc = src.task.exception()

        # The record without an image, as pg_waldump shows it.
        recs = await asyncio.to_thread(waldump, pg, before, after)
        no_image = [r for r in recs if "blkref" in r.desc and "FPW" not in r.desc]
        assert no_image, [r.desc for r in recs]
        bad = no_image[0]
        assert (bad.rmgr, bad.desc.split()[0]) == ("Heap", "INSERT"), bad
        assert f"/{relnode} blk 0" in bad.desc, bad

        missing = getattr(walingest, "MissingPageImage", None)
        assert missing is not None, (
            "zenith.postgres.walingest.MissingPageImage does not exist; ingest "
            + (f"raised {exc!r}" if exc is not None else
               f"accepted the record (missing_images={src.follower.ingest.missing_images}, "
               f"last_record_lsn={src.repo.get_timeline(src.tid).last_record_lsn}, "
               f"record at {bad.lsn})"))
        assert issubclass(missing, ZenithError)
        assert isinstance(exc, missing), repr(exc)
        msg = str(exc)
        hi, lo = int(bad.lsn) >> 32, int(bad.lsn) & 0xFFFFFFFF
        assert "Heap/INSERT" in msg, msg
        assert f"{hi:X}/{lo:X}" in msg or f"{hi:X}/{lo:08X}" in msg, msg
        assert str(relnode) in msg, msg
        # What a user sees: the message with its detail and hint (the ErrorResponse).
        told = " ".join(x for x in (msg, exc.detail, exc.hint) if x)
        assert "wal_consistency_checking" in told, told
        # Nothing at or after the record is stored.
        assert src.repo.get_timeline(src.tid).last_record_lsn <= bad.lsn
        src.repo.close()
