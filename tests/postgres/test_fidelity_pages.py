"""Page-exact fidelity per access method and fork against a real PostgreSQL 15 (issue 10).

The source builds one object of every kind a base backup and its WAL carry (heap with
TOAST, btree, hash with bucket splits and overflow pages, GIN with fastupdate and its
pending list cleaned, GiST grown by inserts after CREATE INDEX, SP-GiST on points and
text, BRIN summarized and desummarized, bloom through generic WAL, sequences, an unlogged
table's init forks, VM and FSM after VACUUM truncations to an odd length), changes them in
two phases and snapshots every page of every fork with ``get_raw_page`` after a
CHECKPOINT at the end of each. zenith's pages at the middle and the end LSN must equal
those snapshots after PostgreSQL's own consistency-check masking (:mod:`.pgmask`); fork
sizes must equal ``pg_relation_size``. What PostgreSQL itself does not WAL-log is handled
explicitly below, each case narrowly.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest

from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres.import_basebackup import import_base_backup
from zenith.postgres.keys import (
    DEFAULTTABLESPACE_OID,
    ForkNumber,
    RelTag,
    rel_block_key,
    rel_size_key,
)
from zenith.postgres.replication import connect_replication
from zenith.postgres.walingest import WalIngest
from zenith.storage import SqliteRepository, open_repository

from ..pgcluster import PGBIN, PgCluster
from .pgmask import F_FOLLOW_RIGHT, mask, mask_page_lsn_and_checksum, page_is_new, special
from .test_ingest_pg import SETTINGS, ZERO_PAGE, Follower, run_sql

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(300),
]

FORKS = {"main": ForkNumber.MAIN, "fsm": ForkNumber.FSM, "vm": ForkNumber.VISIBILITYMAP,
         "init": ForkNumber.INIT}
#: freespace.c: a leaf FSM page's slots follow fp_next_slot and the non-leaf nodes.
FSM_LEAF_SLOTS, FSM_FIRST_LEAF = 4069, 24 + 4 + 4095

# Before the base backup: the table truncated later must already have an FSM fork in the
# backup, because creating and filling the FSM is never WAL-logged (zenith learns of an
# FSM fork only from the backup); VACUUM records free space for every page and sets VM bits.
SETUP = """
CREATE EXTENSION pageinspect;
CREATE EXTENSION bloom;
CREATE TABLE trunc (id int, pad text);
INSERT INTO trunc SELECT g, repeat('t', 200) FROM generate_series(1, 2000) g;
DELETE FROM trunc WHERE id % 4 = 0;
VACUUM trunc;
"""

PHASE1 = """
SELECT setseed(0.1);
CREATE TABLE bt (id serial PRIMARY KEY, k text, big text);
CREATE INDEX bt_k ON bt (k);
INSERT INTO bt (k, big) SELECT md5(g::text), CASE WHEN g % 200 = 0 THEN
    (SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 300) i) END
  FROM generate_series(1, {bt}) g;

CREATE TABLE ht (k int);
CREATE INDEX ht_k ON ht USING hash (k);
INSERT INTO ht SELECT g % 4000 FROM generate_series(1, {ht}) g;
INSERT INTO ht SELECT 0 FROM generate_series(1, 1200);

CREATE TABLE gn (a int[]);
CREATE INDEX gn_a ON gn USING gin (a) WITH (fastupdate = on, gin_pending_list_limit = 64);
INSERT INTO gn SELECT ARRAY[1, g % 10, g] FROM generate_series(1, {gn}) g;
SELECT gin_clean_pending_list('gn_a') >= 0;
INSERT INTO gn SELECT ARRAY[2, g] FROM generate_series(1, 300) g;  -- pending at the middle

CREATE TABLE gs (p point);
INSERT INTO gs SELECT point(random() * 1000, random() * 1000) FROM generate_series(1, {gs0});
CREATE INDEX gs_p ON gs USING gist (p);
INSERT INTO gs SELECT point(g * 1000.0 / {gs}, random() * 1000) FROM generate_series(1, {gs}) g;

CREATE TABLE sp (p point, t text);
INSERT INTO sp SELECT point(random() * 100, random() * 100), md5(g::text)
  FROM generate_series(1, {sp}) g;
CREATE INDEX sp_p ON sp USING spgist (p);
CREATE INDEX sp_t ON sp USING spgist (t);
INSERT INTO sp SELECT point(random() * 100, random() * 100), 'x' || md5(g::text)
  FROM generate_series(1, {sp}) g;

CREATE TABLE br (x int, pad text);
INSERT INTO br SELECT g, repeat('b', 100) FROM generate_series(1, 5000) g;
CREATE INDEX br_x ON br USING brin (x) WITH (pages_per_range = 4);
INSERT INTO br SELECT g, repeat('b', 100) FROM generate_series(5001, 7000) g;
SELECT brin_summarize_new_values('br_x') >= 0;
SELECT brin_desummarize_range('br_x', 8);
UPDATE br SET x = -x WHERE x % 700 = 0;

CREATE TABLE bl (a int, b int);
INSERT INTO bl SELECT g, g % 97 FROM generate_series(1, 2000) g;
CREATE INDEX bl_ab ON bl USING bloom (a, b);
INSERT INTO bl SELECT g, g % 97 FROM generate_series(2001, 2000 + {bl}) g;

CREATE SEQUENCE s1;
CREATE SEQUENCE s3 INCREMENT 3 CACHE 10;
SELECT count(nextval('s1')) FROM generate_series(1, 50);
SELECT count(nextval('s3')) FROM generate_series(1, 7);

CREATE UNLOGGED TABLE ul (id int PRIMARY KEY, k int);
CREATE INDEX ul_k ON ul USING hash (k);
INSERT INTO ul SELECT g, g FROM generate_series(1, 1000) g;

DELETE FROM trunc WHERE (ctid::text::point)[0] >= 37;
VACUUM trunc;
VACUUM bt;
CHECKPOINT;
"""

PHASE2 = """
SELECT setseed(0.2);
INSERT INTO bt (k) SELECT md5((g * 7)::text) FROM generate_series(1, {bt2}) g;
DELETE FROM bt WHERE id BETWEEN 100 AND {bt_del};
VACUUM bt;

INSERT INTO ht SELECT g % 9000 FROM generate_series(1, {ht2}) g;
DELETE FROM ht WHERE k = 0 OR k % 5 = 1;
VACUUM ht;

INSERT INTO gn SELECT ARRAY[1, g % 10, g] FROM generate_series({gn}, {gn} + {gn2}) g;
DELETE FROM gn WHERE a[3] % 3 = 0;
VACUUM gn;

INSERT INTO gs SELECT point(1000 + g * 300.0 / {gs2}, random() * 1000)
  FROM generate_series(1, {gs2}) g;
DELETE FROM gs WHERE p[0] < 150;
VACUUM gs;

DELETE FROM sp WHERE p[0] < 40;
VACUUM sp;
INSERT INTO sp SELECT point(random() * 100, random() * 100), 'y' || md5(g::text)
  FROM generate_series(1, {sp2}) g;

INSERT INTO br SELECT g, repeat('b', 100) FROM generate_series(7001, 8000) g;
SELECT brin_summarize_range('br_x', 100) >= 0;
SELECT brin_desummarize_range('br_x', 0);

DELETE FROM bl WHERE a % 3 = 0;
VACUUM bl;
INSERT INTO bl SELECT g, g % 89 FROM generate_series(5001, 5000 + {bl2}) g;

SELECT count(nextval('s1')) FROM generate_series(1, 45);
SELECT count(nextval('s3')) FROM generate_series(1, 20);

INSERT INTO ul SELECT g, g FROM generate_series(1001, 2000) g;

DELETE FROM trunc WHERE (ctid::text::point)[0] >= 21;
VACUUM trunc;
CHECKPOINT;
"""

SIZES = {"bt": 3000, "ht": 5000, "gn": 5000, "gs0": 2000, "gs": 20000, "sp": 1500,
         "bl": 1000, "bt2": 2000, "bt_del": 1500, "ht2": 4000, "gn2": 1500, "gs2": 5000,
         "sp2": 1000, "bl2": 500}


@dataclass
class Fork:
    """One fork of one user relation as the source had it at a snapshot."""

    oid: int
    name: str
    am: str  # pg_am.amname, or "sequence"
    persistence: str
    increment: int  # of a sequence
    fork: str
    tag: RelTag
    pages: list[bytes]


Snapshot = dict[tuple[int, str], Fork]


def snapshot(pg: PgCluster) -> Snapshot:
    """Every page of every fork of every user relation, read with ``get_raw_page``."""
    out: Snapshot = {}
    with psycopg.connect(pg.uri(), autocommit=True) as conn:
        rows = conn.execute("""
            SELECT c.oid, c.relname, d.oid, pg_relation_filenode(c.oid), c.relpersistence,
                   coalesce(am.amname, 'sequence'), coalesce(s.seqincrement, 0), f.fork,
                   pg_relation_size(c.oid, f.fork) / 8192
            FROM pg_class c JOIN pg_database d ON d.datname = current_database()
                 LEFT JOIN pg_am am ON am.oid = c.relam
                 LEFT JOIN pg_sequence s ON s.seqrelid = c.oid,
                 (VALUES ('main'), ('fsm'), ('vm'), ('init')) f(fork)
            WHERE c.oid >= 16384 AND c.relkind IN ('r', 'i', 't', 'm', 'S')
              AND c.reltablespace = 0
            ORDER BY 1, 8""").fetchall()
        for oid, name, dboid, node, persistence, am, inc, fork, nblocks in rows:
            pages = [bytes(r[0]) for r in conn.execute(
                "SELECT get_raw_page(%s::oid::regclass::text, %s, g::int)"
                " FROM generate_series(0, %s - 1) g", (oid, fork, nblocks))]
            tag = RelTag(DEFAULTTABLESPACE_OID, dboid, node, FORKS[fork])
            out[(oid, fork)] = Fork(oid, name, am, persistence, inc, fork, tag, pages)
    return out


Problem = tuple[str, str]  # (kind, detail)


def first_difference(a: bytes, b: bytes) -> str:
    at = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at {at}: ours {a[at:at + 8].hex()} source {b[at:at + 8].hex()}"


def seq_values(page: bytes) -> tuple[int, int, int]:
    """(offset of last_value, last_value, log_cnt) of a sequence page's one tuple."""
    pos = struct.unpack_from("<I", page, 24)[0] & 0x7FFF  # lp 1's lp_off
    data = pos + page[pos + 22]  # + t_hoff
    last, log_cnt = struct.unpack_from("<qq", page, data)
    return data, last, log_cnt


def sequence_problem(f: Fork, ours: bytes, source: bytes) -> Problem | None:
    # nextval WAL-logs the state as it will be after log_cnt more fetches (sequence.c:
    # last_value = next = last + log_cnt * increment, log_cnt = 0; no CYCLE wrap here)
    # and keeps the true state only in shared buffers, so a standby's (and zenith's) page
    # is ahead by exactly that; the rest must match.
    at, ours_last, ours_log = seq_values(ours)
    _, last, log_cnt = seq_values(source)
    if (ours_last, ours_log) != (last + log_cnt * f.increment, 0):
        return "last_value", (f"last_value/log_cnt ours {ours_last}/{ours_log}, source "
                            f"{last}/{log_cnt} (expected {last + log_cnt * f.increment}/0)")
    fixed = bytearray(ours)
    fixed[at : at + 16] = source[at : at + 16]
    a, b = mask(bytes(fixed), "sequence"), mask(source, "sequence")
    return None if a == b else ("masked page", first_difference(a, b))


def gist_problem(ours: bytes, source: bytes) -> Problem | None:
    """gist_mask masks the NSN and F_FOLLOW_RIGHT, because the left page of a split
    gets them only after XLogInsert (gistplacetopage: NSN = the returned end of the
    record, flag cleared). Redo re-applies exactly that on top of the page image
    (gistRedoClearFollowRight: NSN = EndRecPtr), so after replay both equal the
    source's; a stale flag makes every scan of the page follow its right-link."""
    if page_is_new(ours) or page_is_new(source):
        return None
    o, s = special(ours, 16), special(source, 16)
    if o is None or s is None:
        return None
    ours_nsn, ours_flags = _nsn_flags(ours, o)
    nsn, flags = _nsn_flags(source, s)
    if (ours_flags ^ flags) & F_FOLLOW_RIGHT or ours_nsn != nsn:
        return "NSN/F_FOLLOW_RIGHT (unmasked)", (f"ours NSN {ours_nsn} flags {ours_flags:#x}, "
                                                 f"source NSN {nsn} flags {flags:#x}")
    return None


def _nsn_flags(page: bytes, opaque: int) -> tuple[Lsn, int]:
    """GISTPageOpaqueData's NSN (a PageXLogRecPtr: xlogid, xrecoff) and flags."""
    hi, lo, flags = struct.unpack_from("<II4xH", page, opaque)
    return Lsn(hi << 32 | lo), flags


def page_problem(f: Fork, blk: int, ours: bytes, source: bytes) -> Problem | None:
    if f.fork == "vm":  # VM pages are logged whole: only pd_lsn and checksum may differ
        a, b = bytearray(ours), bytearray(source)
        mask_page_lsn_and_checksum(a)
        mask_page_lsn_and_checksum(b)
        return None if a == b else ("vm page", first_difference(bytes(a), bytes(b)))
    if f.am == "sequence":
        return sequence_problem(f, ours, source)
    a, b = mask(ours, f.am, blk), mask(source, f.am, blk)
    if f.am == "spgist" and blk == 0 and not page_is_new(source):
        # SpGistUpdateMetaPage copies the backend's last-used-pages cache into the
        # metapage without WAL ("don't WAL-log metabuffer changes"), and no SP-GiST
        # record carries the metapage: mask that cache (SpGistMetaPageData.lastUsedPages,
        # 8 x (blkno, freeSpace) after the magic number).
        a, b = (p[:28] + bytes(64) + p[92:] for p in (a, b))
    if a != b:
        return "masked page", first_difference(a, b)
    return gist_problem(ours, source) if f.am == "gist" else None


class Checker:
    """Compares zenith's forks at one LSN with one snapshot; counts and collects."""

    def __init__(self, repo: SqliteRepository, tid: TimelineId, label: str) -> None:
        self.repo, self.tid, self.label = repo, tid, label
        self.compared: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.problems: list[str] = []
        self.differing: list[tuple[Fork, int]] = []

    def size(self, tag: RelTag, lsn: Lsn) -> int | None:
        val = self.repo.get_value(self.tid, rel_size_key(tag), lsn)
        return None if val is None else int.from_bytes(val, "little")

    def page(self, tag: RelTag, blk: int, lsn: Lsn) -> bytes:
        return self.repo.get_value(self.tid, rel_block_key(tag, blk), lsn) or ZERO_PAGE

    def problem(self, f: Fork, blk: int | None, kind: str, detail: str) -> None:
        self.kinds[f"{f.am} {kind}"] += 1
        where = f"fork {f.fork}" + ("" if blk is None else f" blk {blk}")
        self.problems.append(f"[{self.label}] db postgres, {f.name} ({f.am}) {where}: "
                             f"{kind}: {detail}")

    def check(self, snap: Snapshot, lsn: Lsn) -> None:
        """Sizes and FSM now; pages that differ go to :attr:`differing` (:meth:`report`)."""
        for f in snap.values():
            if f.persistence == "u" and f.fork != "init":
                continue  # an unlogged relation's other forks are never WAL-logged
            ours = self.size(f.tag, lsn)
            if f.fork == "fsm":
                self.check_fsm(f, ours, lsn)
                continue
            n = len(f.pages)
            if (ours or 0) != n:
                if (ours or 0) < n and all(p == ZERO_PAGE for p in f.pages[ours or 0:]):
                    # Extended with zero pages that PostgreSQL never WAL-logs (bulk
                    # extension, vm_extend): they read as zero pages from zenith too.
                    self.notes["zero-tail forks"] += 1
                else:
                    self.problem(f, None, "size", f"ours {ours} blocks, source {n}")
            for blk, source in enumerate(f.pages):
                self.compared[f.fork if f.fork in ("vm", "init") else f.am] += 1
                if f.am == "gist" and not page_is_new(source) and source[-16:-8] != bytes(8):
                    self.notes["gist pages with an NSN"] += 1
                if page_problem(f, blk, self.page(f.tag, blk, lsn), source) is not None:
                    self.differing.append((f, blk))

    def check_fsm(self, f: Fork, ours: int | None, lsn: Lsn) -> None:
        # The FSM is not WAL-logged (a standby's differs too): its contents are not
        # compared, and a fork created after the backup is unknown to zenith. Its size
        # must match, and in the last page the leaf slots of heap blocks cut by a
        # truncation must be zero (FreeSpaceMapPrepareTruncateRel: fsm_truncate_avail),
        # or PostgreSQL would look for free space in blocks that no longer exist.
        if ours is None:
            self.notes["FSM forks unknown to zenith"] += 1
            return
        self.compared["fsm"] += 1
        if ours != len(f.pages):
            self.problem(f, None, "fsm size", f"ours {ours} blocks, source {len(f.pages)}")
            return
        heap_blocks = self.size(replace(f.tag, forknum=ForkNumber.MAIN), lsn)
        if ours != 3 or heap_blocks is None or heap_blocks >= FSM_LEAF_SLOTS:
            return  # only a one-leaf FSM (root, level 1, leaf 0) is checked
        self.notes["FSM tails checked"] += 1
        for side, page in (("ours", self.page(f.tag, 2, lsn)), ("source", f.pages[2])):
            if any(tail := page[FSM_FIRST_LEAF + heap_blocks :]):
                used = [i + heap_blocks for i, v in enumerate(tail) if v]
                self.problem(f, 2, "fsm tail", f"{side}: leaf slots past the heap's "
                             f"{heap_blocks} blocks not cleared (heap blocks {used[:6]}...)")

    def report(self, lsn: Lsn, fresh: Snapshot | None = None) -> None:
        """Turns the pages that differed into problems, comparing them again at ``lsn``
        (with the source's pages from ``fresh`` when given)."""
        for f, blk in self.differing:
            source = fresh[(f.oid, f.fork)].pages[blk] if fresh else f.pages[blk]
            if found := page_problem(f, blk, self.page(f.tag, blk, lsn), source):
                self.problem(f, blk, *found)
        self.differing = []


async def catch_up(pg: PgCluster, ingest: WalIngest, task: asyncio.Task[None]) -> Lsn:
    target = Lsn.parse(run_sql(pg, "SELECT pg_current_wal_flush_lsn()")[0])
    while ingest.last_lsn < target and not task.done():
        await asyncio.sleep(0.05)
    ingest.flush()
    assert ingest.last_lsn >= target, (ingest.last_lsn, target)
    return ingest.last_lsn


async def test_pages_match_source_per_access_method(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with PgCluster(settings=SETTINGS) as pg:
        run_sql(pg, SETUP)
        repo = open_repository(tmp_path / "zenith.db", durable=False)
        tid = repo.create_timeline().timeline_id
        conn = await connect_replication(pg.uri())
        await conn.create_physical_slot("zenith_fidelity")
        result = await import_base_backup(repo, tid, conn)
        await conn.close()
        ingest = WalIngest(repo, tid, result.rel_sizes)
        follower = Follower(repo, ingest, result.start_lsn)
        stop = asyncio.Event()
        task = asyncio.create_task(follower.run(pg.uri(), "zenith_fidelity", result.timeline,
                                                stop))
        try:
            t1 = time.monotonic()
            await asyncio.to_thread(run_sql, pg, PHASE1.format(**SIZES))
            t2 = time.monotonic()
            middle_snap = await asyncio.to_thread(snapshot, pg)
            middle = await catch_up(pg, ingest, task)
            t3 = time.monotonic()
            await asyncio.to_thread(run_sql, pg, PHASE2.format(**SIZES))
            t4 = time.monotonic()
            end_snap = await asyncio.to_thread(snapshot, pg)
            end = await catch_up(pg, ingest, task)
            t5 = time.monotonic()

            at_end = Checker(repo, tid, "end")
            at_end.check(end_snap, end)
            if at_end.differing:
                # A page read from the source may have changed since (pruning is
                # WAL-logged): read the source again and compare at a later LSN.
                fresh = await asyncio.to_thread(snapshot, pg)
                at_end.report(await catch_up(pg, ingest, task), fresh)
            at_middle = Checker(repo, tid, "middle")
            at_middle.check(middle_snap, middle)
            at_middle.report(middle)
        finally:
            stop.set()
            await task
        for c in (at_middle, at_end):
            print(f"{c.label} ({middle if c is at_middle else end}): pages compared "
                  f"{dict(sorted(c.compared.items()))}; {dict(c.notes)}; "
                  f"mismatches {len(c.problems)} {dict(c.kinds)}")
        print(f"phase 1 {t2 - t1:.1f}s, snapshot+catch-up {t3 - t2:.1f}s, phase 2 "
              f"{t4 - t3:.1f}s, snapshot+catch-up {t5 - t4:.1f}s, total "
              f"{time.monotonic() - t0:.1f}s; {follower.wal_bytes / 2**20:.1f} MiB WAL, "
              f"{ingest.records_seen} records")
        repo.close()
        problems = at_middle.problems + at_end.problems
        if problems:
            kinds = at_middle.kinds + at_end.kinds
            pytest.fail(f"{len(problems)} mismatches {dict(kinds)}; the first 20 of each "
                        "LSN:\n" + "\n".join(at_middle.problems[:20] + at_end.problems[:20]),
                        pytrace=False)
        for am in ("heap", "btree", "hash", "gin", "gist", "spgist", "brin", "bloom",
                   "sequence", "vm", "fsm", "init"):
            assert at_end.compared[am] and at_middle.compared[am], am
        # The workload did what the checks need: GiST pages split, an FSM tail was cut.
        assert at_middle.notes["gist pages with an NSN"] > 100
        assert at_end.notes["FSM tails checked"] and at_middle.notes["FSM tails checked"]
