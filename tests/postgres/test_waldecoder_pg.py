"""The WAL decoder against real PostgreSQL 15 WAL, with pg_waldump as the oracle.

One cluster (wal_consistency_checking = all, full-page writes, pglz/zstd/lz4 image
compression) runs pgbench, DDL, CREATE DATABASE with both strategies, subtransactions,
multixacts, two-phase commit, a WAL switch and checkpoints. Its pg_wal segments are then
decoded from the first segment's start, from a record in the middle of a segment, from
a segment start that continues a record, and in random chunk sizes, and every record is
compared with ``pg_waldump --bkp-details``: LSN, xl_prev, resource manager, lengths, xid,
block references with their image details; main data parsed by walrecord.py is compared
with pg_waldump's description. Page images are checked against the relation files.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.pgcluster import PGBIN, PgCluster
from zenith.errors import FeatureNotSupported
from zenith.lsn import Lsn
from zenith.postgres import walrecord as wr
from zenith.postgres.pg_constants import (
    BLCKSZ,
    FORK_NAMES,
    WAL_SEGMENT_SIZE,
    XLOG_BLCKSZ,
    RmgrId,
    record_name,
)
from zenith.postgres.waldecoder import (
    DecodedRecord,
    ImageCompression,
    RelFileNode,
    WalStreamDecoder,
)

pytestmark = pytest.mark.skipif(not (PGBIN / "postgres").exists(),
                                reason="PostgreSQL 15 server binaries are not installed")

SEG = WAL_SEGMENT_SIZE
SETTINGS = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "full_page_writes": "on",
    "wal_compression": "pglz",
    "max_prepared_transactions": "5",
    "wal_keep_size": "'1GB'",  # keep every segment: the test decodes them all
    "autovacuum": "off",  # nothing may touch the oracle tables behind our back
}


@dataclass
class DumpBlock:
    block_id: int
    rel: RelFileNode
    fork: str
    blkno: int
    image: tuple[bool, int, int, int | None, str | None] | None  # apply, hole, saved, method


@dataclass
class DumpRecord:
    rmgr: str
    rec_len: int
    tot_len: int
    xid: int
    lsn: Lsn
    prev: Lsn
    desc: str
    blocks: list[DumpBlock] = field(default_factory=list)


_REC = re.compile(r"rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), "
                  r"lsn: ([0-9A-F]+/[0-9A-F]+), prev ([0-9A-F]+/[0-9A-F]+), desc: (.*)$")
_BLK = re.compile(r"\tblkref #(\d+): rel (\d+)/(\d+)/(\d+) fork (\w+) blk (\d+)"
                  r"(?: \(FPW( for WAL verification)?\); hole: offset: (\d+), length: (\d+)"
                  r"(?:, compression saved: (\d+), method: (\w+))?)?$")


def parse_waldump(text: str) -> list[DumpRecord]:
    out: list[DumpRecord] = []
    for line in text.splitlines():
        if line.startswith("rmgr:"):
            m = _REC.match(line)
            assert m, line
            out.append(DumpRecord(m[1], int(m[2]), int(m[3]), int(m[4]), Lsn.parse(m[5]),
                                  Lsn.parse(m[6]), m[7]))
        elif line.startswith("\tblkref"):
            m = _BLK.match(line)
            assert m, line
            image = None
            if m[8] is not None:
                image = (m[7] is None, int(m[8]), int(m[9]),
                         int(m[10]) if m[10] else None, m[11])
            out[-1].blocks.append(DumpBlock(int(m[1]), RelFileNode(int(m[2]), int(m[3]),
                                            int(m[4])), m[5], int(m[6]), image))
        elif line.strip():
            raise AssertionError(f"unexpected pg_waldump line: {line!r}")
    return out


def as_dump(rec: DecodedRecord) -> DumpRecord:
    """Our record as pg_waldump would print it."""
    blocks = []
    for b in rec.blocks:
        image = None
        if b.image is not None:
            method = None
            saved = None
            if b.image.compression != ImageCompression.NONE:
                method = b.image.compression.name.lower()
                saved = BLCKSZ - b.image.hole_length - len(b.image.data)
            image = (b.image.apply, b.image.hole_offset, b.image.hole_length, saved, method)
        blocks.append(DumpBlock(b.block_id, b.rlocator, FORK_NAMES[b.forknum], b.blkno, image))
    return DumpRecord(rec.rmgr_name, rec.total_len - rec.fpi_len, rec.total_len, rec.xid,
                      rec.lsn, rec.prev, "", blocks)


def assert_same(ours: list[DecodedRecord], dump: list[DumpRecord]) -> None:
    assert len(ours) == len(dump), (len(ours), len(dump))
    for rec, exp in zip(ours, dump, strict=True):
        got = as_dump(rec)
        got.desc = exp.desc
        assert got == exp, f"record at {rec.lsn} differs"
        name = record_name(rec.rmid, rec.info)
        if name is not None:
            assert exp.desc.split(" ", 1)[0] == name, (rec.lsn, exp.desc)


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}"


@dataclass
class Capture:
    pg: PgCluster
    wal: Path
    segments: list[Path]
    dump: list[DumpRecord]
    records: list[DecodedRecord]
    oracle_tables: dict[str, tuple[RelFileNode, Path]]

    def stream(self, start: int) -> Iterator[bytes]:
        """The WAL bytes from ``start`` on, segment by segment."""
        for seg in self.segments:
            base = int(seg.name[8:16], 16) * (1 << 32) + int(seg.name[16:], 16) * SEG
            if base + SEG <= start:
                continue
            data = seg.read_bytes()
            yield data[max(0, int(start) - base) :]

    def waldump(self, *args: str) -> list[DumpRecord]:
        res = self.pg.run("pg_waldump", "--path", str(self.wal), "--bkp-details", *args,
                          check=False)
        assert "invalid record length" in res.stderr or res.returncode == 0, res.stderr
        return parse_waldump(res.stdout)


def decode_from(cap: Capture, start: int, rng: random.Random | None = None,
                ) -> list[DecodedRecord]:
    dec = WalStreamDecoder(start)
    out: list[DecodedRecord] = []
    for data in cap.stream(start):
        if rng is None:
            dec.feed(data)
            out.extend(dec)
            continue
        pos = 0
        while pos < len(data):
            n = rng.choice((1, 7, 100, 4096, 8192, 20000, 65536, 300000))
            dec.feed(data[pos : pos + n])
            pos += n
            out.extend(dec)
        if dec.end_of_wal:
            break
    assert dec.end_of_wal
    return out


def _workload(pg: PgCluster) -> None:
    def pgbench(*args: str) -> None:
        pg.run("pgbench", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", *args,
               "postgres")

    pgbench("-i", "-s", "1", "-q")
    pgbench("-t", "150", "-c", "2")
    sql = pg.psql
    # DDL: rewrites, truncation (new relfilenodes; old ones dropped at commit), drops.
    sql("create table ddl(a int primary key, b text)")
    sql("insert into ddl select g, md5(g::text) from generate_series(1, 3000) g")
    sql("create index ddl_b on ddl(b)")
    sql("alter table ddl alter column b type varchar(64)")
    sql("alter table ddl add column c int default 5")
    sql("truncate ddl")
    sql("insert into ddl select g, 'x' from generate_series(1, 2000) g")
    sql("delete from ddl where a > 100")
    sql("vacuum ddl")  # cuts the empty tail: XLOG_SMGR_TRUNCATE
    sql("drop index ddl_b")
    sql("drop table ddl")
    sql("vacuum full pg_class")  # a mapped catalog: XLOG_RELMAP_UPDATE
    # Databases, both strategies.
    sql("create database dwal strategy = wal_log")
    sql("create database dcopy strategy = file_copy")
    sql("drop database dwal")
    # Subtransactions, an abort, two-phase commit.
    sql("create table sub(a int)")
    sql("begin; insert into sub values (1); savepoint s1; insert into sub values (2); "
        "savepoint s2; insert into sub values (3); rollback to s2; "
        "insert into sub values (4); release s1; commit")
    sql("begin; insert into sub values (99); rollback")
    sql("begin; insert into sub values (10); prepare transaction 'g1'")
    sql("commit prepared 'g1'")
    sql("begin; insert into sub values (11); savepoint s; insert into sub values (12); "
        "prepare transaction 'g2'")
    sql("rollback prepared 'g2'")
    # Multixacts: two lockers of one row.
    sql("create table mx(a int primary key); insert into mx values (1), (2)")
    with psycopg.connect(pg.uri()) as c1, psycopg.connect(pg.uri()) as c2:
        c1.execute("select * from mx where a = 1 for share")
        c2.execute("select * from mx where a = 1 for share")
        c1.commit()
        c2.commit()
    # Visibility-map bits cleared by heap records (flags in the main data).
    sql("create table vm(a int, b text); "
        "insert into vm select g, repeat('v', 50) from generate_series(1, 2000) g")
    sql("vacuum (freeze) vm")
    sql("update vm set b = 'u' where a in (1, 1000)")
    sql("delete from vm where a = 1500")
    sql("begin; select * from vm where a = 1800 for update; commit")
    sql("insert into vm values (0, 'new')")
    # Oracle tables: written once, never read, so their pages on disk are the images.
    sql("set wal_compression = pglz; create table opglz(a int, b text); "
        "insert into opglz select g, repeat(md5(g::text), 3) from generate_series(1, 600) g")
    sql("set wal_compression = zstd; create table ozstd(a int, b text); "
        "insert into ozstd select g, repeat(md5(g::text), 3) from generate_series(1, 600) g")
    sql("set wal_compression = off; create table onone(a int, b text); "
        "insert into onone select g, repeat(md5(g::text), 3) from generate_series(1, 300) g")
    sql("set wal_compression = lz4; create table olz4(a int); "
        "insert into olz4 select generate_series(1, 300)")
    sql("select pg_switch_wal()")
    sql("insert into sub values (20)")
    sql("checkpoint")


@pytest.fixture(scope="module")
def cap() -> Iterator[Capture]:
    with PgCluster(settings=SETTINGS) as pg:
        _workload(pg)
        tables = {}
        for name in ("opglz", "ozstd", "onone", "olz4"):
            path = pg.psql(f"select pg_relation_filepath('{name}')")
            rel = pg.psql(f"select d.oid, c.relfilenode from pg_class c, pg_database d "
                          f"where c.relname = '{name}' and d.datname = current_database()")
            db, node = (int(x) for x in rel.split("|"))
            spc = 1663  # pg_default: the test creates no tablespace
            tables[name] = (RelFileNode(spc, db, node), pg.datadir / path)
        pg.stop()  # a shutdown checkpoint; nothing changes the WAL from here on
        # A copy pg_waldump (run as the postgres user) can read, beside the cluster.
        wal = pg.base / "walcopy"
        wal.mkdir()
        os.chmod(wal, 0o755)
        segments = []
        for src in sorted((pg.datadir / "pg_wal").iterdir()):
            if re.fullmatch(r"[0-9A-F]{24}", src.name):
                segments.append(Path(shutil.copy(src, wal / src.name)))
                os.chmod(segments[-1], 0o644)
        capture = Capture(pg, wal, segments, [], [], tables)
        capture.dump = capture.waldump(segments[0].name, segments[-1].name)
        first = int(segments[0].name[16:], 16) * SEG
        capture.records = decode_from(capture, first)
        yield capture


def test_whole_wal_matches_pg_waldump(cap: Capture) -> None:
    assert_same(cap.records, cap.dump)
    recs = cap.records
    # The workload covered what the decoder must handle.
    assert len(cap.segments) >= 2
    assert any(r.lsn // XLOG_BLCKSZ != (r.lsn + r.total_len - 1) // XLOG_BLCKSZ for r in recs)
    assert any(r.lsn // SEG != (r.lsn + r.total_len - 1) // SEG for r in recs)
    images = [b.image for r in recs for b in r.blocks if b.image is not None]
    assert {i.compression for i in images} == set(ImageCompression)
    assert any(i.apply for i in images) and any(not i.apply for i in images)
    assert any(i.has_hole for i in images) and any(not i.has_hole for i in images)
    # EndRecPtr: the next record starts there, or after the page header there.
    for r, nxt in itertools.pairwise(recs):
        header = 40 if r.end_lsn % SEG == 0 else 24
        assert nxt.lsn == r.end_lsn or (r.end_lsn % XLOG_BLCKSZ == 0
                                        and nxt.lsn == r.end_lsn + header), r.lsn


def test_random_chunks_decode_alike(cap: Capture) -> None:
    first = cap.records[0].lsn - cap.records[0].lsn % SEG
    assert decode_from(cap, first, random.Random(7)) == cap.records


def test_start_at_a_record_in_the_middle_of_a_segment(cap: Capture) -> None:
    i = len(cap.records) // 2
    while cap.records[i].lsn % XLOG_BLCKSZ < 1000:
        i += 1
    start = cap.records[i].lsn
    assert start % SEG and start % XLOG_BLCKSZ
    dump = cap.waldump("-s", lsn_text(start), "-n", "200")
    assert dump[0].lsn == start
    ours = decode_from(cap, start)
    assert_same(ours[:200], dump)
    assert ours == cap.records[i:]


def test_start_at_a_segment_that_continues_a_record(cap: Capture) -> None:
    split = next(r for r in cap.records
                 if r.lsn // SEG != (r.lsn + r.total_len - 1) // SEG)
    seg_start = (split.lsn // SEG + 1) * SEG
    dump = cap.waldump("-s", lsn_text(seg_start), "-n", "100")
    ours = decode_from(cap, seg_start)
    assert ours[0].prev == split.lsn and ours[0].lsn > seg_start + 40
    assert_same(ours[:100], dump)
    assert ours == [r for r in cap.records if r.lsn > seg_start]


def _all(cap: Capture, rmid: int, kind: int, mask: int = 0xF0) -> list[DecodedRecord]:
    return [r for r in cap.records if r.rmid == rmid and r.info & mask == kind]


def _desc(cap: Capture) -> dict[Lsn, str]:
    return {d.lsn: d.desc for d in cap.dump}


def relpath(rel: RelFileNode, fork: int = 0) -> str:
    suffix = "" if fork == 0 else "_" + FORK_NAMES[fork]
    if rel.spcnode == 1664:
        return f"global/{rel.relnode}{suffix}"
    assert rel.spcnode == 1663
    return f"base/{rel.dbnode}/{rel.relnode}{suffix}"


def test_xlog_records_parse(cap: Capture) -> None:
    desc = _desc(cap)
    kinds = {0x00: "shutdown", 0x10: "online"}
    for kind, word in kinds.items():
        recs = _all(cap, RmgrId.XLOG, kind)
        assert recs, word
        for r in recs:
            c = wr.parse_checkpoint(r.main_data)
            text = (f"redo {c.redo}; tli {c.this_timeline_id}; prev tli {c.prev_timeline_id}; "
                    f"fpw {'true' if c.full_page_writes else 'false'}; "
                    f"xid {c.next_xid_epoch}:{c.next_xid_value}; oid {c.next_oid}; "
                    f"multi {c.next_multi}; offset {c.next_multi_offset}; "
                    f"oldest xid {c.oldest_xid} in DB {c.oldest_xid_db}; "
                    f"oldest multi {c.oldest_multi} in DB {c.oldest_multi_db}; "
                    f"oldest/newest commit timestamp xid: "
                    f"{c.oldest_commit_ts_xid}/{c.newest_commit_ts_xid}; "
                    f"oldest running xid {c.oldest_active_xid}; {word}")
            assert desc[r.lsn].split(" ", 1)[1] == text
    last = _all(cap, RmgrId.XLOG, 0x00)[-1]
    assert wr.parse_checkpoint(last.main_data).redo == last.lsn  # a shutdown checkpoint
    for r in _all(cap, RmgrId.XLOG, 0x30):
        assert desc[r.lsn] == f"NEXTOID {wr.parse_nextoid(r.main_data)}"
    switches = _all(cap, RmgrId.XLOG, 0x40)
    assert switches and all(r.end_lsn % SEG == 0 and not r.main_data for r in switches)
    fpis = _all(cap, RmgrId.XLOG, 0xB0)
    assert fpis and all(r.blocks and r.blocks[0].has_image for r in fpis)


def test_xact_records_parse(cap: Capture) -> None:
    desc = _desc(cap)
    seen: dict[str, int] = {}
    for r in cap.records:
        if r.rmid != RmgrId.XACT:
            continue
        op = r.info & 0x70
        text = desc[r.lsn]
        if op in (0x00, 0x30, 0x20, 0x40):  # commit, commit prepared, abort, abort prepared
            parse = wr.parse_xact_commit if op in (0x00, 0x30) else wr.parse_xact_abort
            x = parse(r.info, r.main_data)
            if op in (0x30, 0x40):
                assert r.xid == 0 and x.twophase_xid is not None
                assert text.split(" ")[1] == f"{x.twophase_xid}:"
                seen["prepared"] = seen.get("prepared", 0) + 1
            subs = re.search(r"; subxacts:((?: \d+)+)", text)
            assert x.subxacts == (tuple(int(s) for s in subs[1].split()) if subs else ())
            rels = re.search(r"; rels:((?: [^; ]+)+)", text)
            assert [relpath(n) for n in x.dropped_rels] == (rels[1].split() if rels else [])
            assert ("; dropped stats:" in text) == (x.n_dropped_stats > 0)
            assert ("; inval msgs:" in text) == (x.n_inval_msgs > 0)
            for key, present in (("subxacts", x.subxacts), ("rels", x.dropped_rels),
                                 ("abort", op == 0x20)):
                if present:
                    seen[key] = seen.get(key, 0) + 1
        elif op == 0x10:
            p = wr.parse_xact_prepare(r.main_data)
            assert p.xid == r.xid and text.startswith(f"PREPARE gid {p.gid}: ")
            seen.setdefault("gids", 0)
            seen["gids"] += p.gid in ("g1", "g2")
            if p.gid == "g2":
                assert len(p.subxacts) == 1
    assert seen.get("subxacts") and seen.get("rels") and seen.get("abort")
    assert seen.get("prepared") == 2 and seen.get("gids") == 2


def test_storage_database_relmap_records_parse(cap: Capture) -> None:
    desc = _desc(cap)
    creates = _all(cap, RmgrId.SMGR, 0x10)
    truncates = _all(cap, RmgrId.SMGR, 0x20)
    assert creates and truncates
    for r in creates:
        c = wr.parse_smgr_create(r.main_data)
        assert desc[r.lsn] == f"CREATE {relpath(c.rnode, c.forknum)}"
    for r in truncates:
        t = wr.parse_smgr_truncate(r.main_data)
        assert desc[r.lsn] == f"TRUNCATE {relpath(t.rnode)} to {t.blkno} blocks flags {t.flags}"
        assert t.truncates_heap or t.truncates_vm or t.truncates_fsm
    found = set()
    for r in cap.records:
        if r.rmid == RmgrId.DBASE:
            kind = r.info & 0xF0
            if kind == 0x00:
                fc = wr.parse_dbase_create_file_copy(r.main_data)
                exp = (f"CREATE_FILE_COPY copy dir {fc.src_tablespace_id}/{fc.src_db_id} to "
                       f"{fc.tablespace_id}/{fc.db_id}")
            elif kind == 0x10:
                wl = wr.parse_dbase_create_wal_log(r.main_data)
                exp = f"CREATE_WAL_LOG create dir {wl.tablespace_id}/{wl.db_id}"
            else:
                d = wr.parse_dbase_drop(r.main_data)
                exp = "DROP dir" + "".join(f" {t}/{d.db_id}" for t in d.tablespace_ids)
            assert desc[r.lsn] == exp
            found.add(kind)
        elif r.rmid == RmgrId.RELMAP:
            m = wr.parse_relmap_update(r.main_data)
            assert desc[r.lsn] == (f"UPDATE database {m.dbid} tablespace {m.tsid} "
                                   f"size {len(m.data)}")
            assert len(m.data) == 512 and struct.unpack_from("<I", m.data)[0] == 0x592717
            found.add(-1)
    assert found == {0x00, 0x10, 0x20, -1}


_MX_STATUS = {0: "keysh", 1: "sh", 2: "fornokeyupd", 3: "forupd", 4: "nokeyupd", 5: "upd"}


def test_multixact_and_clog_records_parse(cap: Capture) -> None:
    desc = _desc(cap)
    creates = _all(cap, RmgrId.MULTIXACT, 0x20)
    assert creates
    for r in creates:
        m = wr.parse_multixact_create(r.main_data)
        members = "".join(f"{x.xid} ({_MX_STATUS[x.status]}) " for x in m.members)
        assert desc[r.lsn] == f"CREATE_ID {m.mid} offset {m.moff} nmembers " \
                              f"{len(m.members)}: {members}"
    assert any(len(wr.parse_multixact_create(r.main_data).members) == 2 for r in creates)
    for r in _all(cap, RmgrId.MULTIXACT, 0x00, 0xE0):  # zero offset/member pages
        assert desc[r.lsn].endswith(f" {wr.parse_zero_page(r.main_data)}")
    for r in _all(cap, RmgrId.CLOG, 0x00):
        assert desc[r.lsn] == f"ZEROPAGE page {wr.parse_zero_page(r.main_data)}"
    for r in _all(cap, RmgrId.CLOG, 0x10):
        t = wr.parse_clog_truncate(r.main_data)
        assert desc[r.lsn] == f"TRUNCATE page {t.pageno}; oldestXact {t.oldest_xact}"


def test_heap_records_parse(cap: Capture) -> None:
    desc = _desc(cap)
    flags_seen: dict[str, int] = {}

    def flags_in(text: str) -> int:
        m = re.search(r"flags 0x([0-9A-F]{2})", text)
        assert m, text
        return int(m[1], 16)

    for r in cap.records:
        text = desc[r.lsn]
        if r.rmid == RmgrId.HEAP:
            op = r.info & 0x70
            if op == 0x00:
                i = wr.parse_heap_insert(r.main_data)
                assert re.search(rf"\boff {i.offnum} flags 0x{i.flags:02X}$", text), text
                if i.all_visible_cleared:
                    flags_seen["insert"] = 1
            elif op in (0x20, 0x40):
                u = wr.parse_heap_update(r.main_data)
                assert text.split(" ", 1)[1].startswith(
                    f"off {u.old_offnum} xmax {u.old_xmax} flags 0x{u.flags:02X} "), text
                assert text.endswith(f"; new off {u.new_offnum} xmax {u.new_xmax}"), text
                if u.old_all_visible_cleared or u.new_all_visible_cleared:
                    flags_seen["update"] = 1
            elif op == 0x10:
                d = wr.parse_heap_delete(r.main_data)
                assert f"off {d.offnum} flags 0x{d.flags:02X}" in text and \
                    flags_in(text) == d.flags
                if d.all_visible_cleared:
                    flags_seen["delete"] = 1
            elif op == 0x60:
                lk = wr.parse_heap_lock(r.main_data)
                assert f"off {lk.offnum}: xid {lk.xmax}: flags 0x{lk.flags:02X}" in text, text
                if lk.all_frozen_cleared:
                    flags_seen["lock"] = 1
        elif r.rmid == RmgrId.HEAP2:
            op = r.info & 0x70
            if op == 0x50:
                mi = wr.parse_heap_multi_insert(r.main_data)
                assert f"{mi.ntuples} tuples flags 0x{mi.flags:02X}" in text, text
                assert len(mi.offsets) in (0, mi.ntuples)
                assert bool(mi.offsets) != bool(r.info & 0x80)  # offsets unless +INIT
                flags_seen["multi_insert"] = 1
            elif op == 0x60:
                lu = wr.parse_heap_lock_updated(r.main_data)
                assert f"off {lu.offnum}: xmax {lu.xmax}: flags 0x{lu.flags:02X}" in text
    assert flags_seen.keys() >= {"insert", "update", "delete", "lock", "multi_insert"}


def _page_header_ok(page: bytes) -> bool:
    lower: int
    upper: int
    special: int
    size_version: int
    lower, upper, special, size_version = struct.unpack_from("<HHHH", page, 12)
    if page == bytes(BLCKSZ):
        return True  # a new (all-zero) page, logged as it is
    return (24 <= lower <= upper <= special <= BLCKSZ
            and size_version == BLCKSZ | 4)


def test_page_images_restore_to_the_pages_on_disk(cap: Capture) -> None:
    rng = random.Random(3)
    images = [b for r in cap.records for b in r.blocks if b.image is not None]
    sample = rng.sample(images, min(400, len(images)))
    lz4_seen = False
    for b in sample + [b for b in images if b.image and b.image.compression.name == "LZ4"]:
        try:
            page = b.page_image()
        except FeatureNotSupported:
            lz4_seen = True
            assert b.image is not None and b.image.compression == ImageCompression.LZ4
            continue
        assert len(page) == BLCKSZ and _page_header_ok(page), (b.rlocator, b.blkno)
    assert lz4_seen or importlib.util.find_spec("lz4") is not None

    # The last image of each block of the oracle tables is the page on disk, except for
    # pd_lsn: the image has the LSN from before the record, the disk the record's end.
    for name in ("opglz", "ozstd", "onone"):
        rel, path = cap.oracle_tables[name]
        last: dict[int, tuple[DecodedRecord, bytes]] = {}
        for r in cap.records:
            for b in r.blocks:
                if b.rlocator == rel and b.forknum == 0 and b.image is not None:
                    last[b.blkno] = (r, b.page_image())
        disk = path.read_bytes()
        assert len(disk) == len(last) * BLCKSZ and len(last) >= 3, name
        for blkno, (r, page) in last.items():
            on_disk = disk[blkno * BLCKSZ : (blkno + 1) * BLCKSZ]
            assert page[8:] == on_disk[8:], (name, blkno)
            xlogid, xrecoff = struct.unpack_from("<II", on_disk)
            assert (xlogid << 32) | xrecoff == r.end_lsn, (name, blkno)
            assert struct.unpack_from("<II", page) != (xlogid, xrecoff)
