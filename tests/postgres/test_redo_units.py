"""The redo actions ingest performs besides storing images (issue 10), on hand-built
records: the counters PostgreSQL's redo keeps (with wraparound), the next multixact's
offset entry, commit timestamps, replication origins, SLRU truncation, GiST's
follow-right clearing, the FSM tail on truncation, and the refusal of a block reference
without an image. The real-PostgreSQL tests (test_fidelity_*.py) check the same against a
source; these pin the arithmetic at the edges a workload rarely reaches."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from zenith.lsn import Lsn
from zenith.postgres import pg_constants as pgc
from zenith.postgres.keys import (
    ControlItem,
    ForkNumber,
    RelTag,
    SlruId,
    control_key,
    db_key_range,
    rel_block_key,
    rel_size_key,
    slru_page_key,
)
from zenith.postgres.redo import FSM_LEAF_SLOTS, make_fsm_truncate
from zenith.postgres.redostate import Counters, Origins, multi_precedes, xid_precedes
from zenith.postgres.waldecoder import BlockRef, DecodedRecord, RelFileNode
from zenith.postgres.walingest import (
    COMMIT_TS_XACTS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    MissingPageImage,
    WalIngest,
)
from zenith.postgres.walrecord import CheckPoint, parse_checkpoint
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.redo import apply_delta

from .test_ingest_units import imaged

NODE = RelFileNode(1663, 5, 16384)
_CP = struct.Struct("<QII?7xQIIIIIII4xqIII4x")


def rec(lsn: int, rmid: int, info: int, main: bytes = b"",
        blocks: list[BlockRef] | None = None, xid: int = 0,
        origin: int | None = None) -> DecodedRecord:
    return DecodedRecord(Lsn(lsn), Lsn(lsn + 64), xid, rmid, info, Lsn(0), 64, main,
                         blocks or [], origin=origin)


def counters(**kw: int) -> Counters:
    base = dict(next_xid=1000, next_oid=20000, next_multi=1, next_multi_offset=0,
                oldest_xid=700, oldest_xid_db=1, oldest_multi=1, oldest_multi_db=1,
                oldest_commit_ts_xid=0, newest_commit_ts_xid=0, commit_ts_active=False,
                timeline=1)
    base.update(kw)
    return Counters(**base)  # type: ignore[arg-type]


def checkpoint(**kw: int) -> bytes:
    v = dict(redo=0, tli=1, prev=1, fpw=True, next_xid=1000, next_oid=20000, next_multi=1,
             next_off=0, oldest_xid=700, oldest_xid_db=1, oldest_multi=1, oldest_multi_db=1,
             time=0, oldest_ts=0, newest_ts=0, oldest_active=0)
    v.update(kw)
    return _CP.pack(*v.values())


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[SqliteRepository]:
    r = open_repository(tmp_path / "z.db", durable=False)
    yield r
    r.close()


def start(repo: SqliteRepository, state: Counters, *extra: Record) -> WalIngest:
    tid = repo.create_timeline().timeline_id
    repo.put_records(tid, [Record(control_key(ControlItem.COUNTERS), Lsn(10), RecordKind.IMAGE,
                                  state.pack()), *extra], Lsn(10))
    return WalIngest(repo, tid, {})


def stored_counters(ing: WalIngest, lsn: int) -> Counters:
    raw = ing.repo.get_value(ing.timeline_id, control_key(ControlItem.COUNTERS), Lsn(lsn))
    assert raw is not None
    return Counters.unpack(raw)


# -- counters ----------------------------------------------------------------------------

def test_wraparound_comparisons() -> None:
    assert xid_precedes(0xFFFFFF00, 5) and not xid_precedes(5, 0xFFFFFF00)
    assert xid_precedes(2, 3) and not xid_precedes(3, 2)  # special XIDs: plain order
    assert multi_precedes(0xFFFFFFF0, 2) and not multi_precedes(2, 0xFFFFFFF0)


def test_next_xid_follows_record_xids_across_wraparound() -> None:
    c = counters(next_xid=(7 << 32) | 0xFFFFFFFE)
    assert c.past_xid(0xFFFFFFF0) is c  # behind: nothing to do
    c = c.past_xid(0xFFFFFFFE)
    assert c.next_xid == (7 << 32) | 0xFFFFFFFF
    c = c.past_xid(0xFFFFFFFF)  # the 32-bit value wraps: next epoch, skipping 0..2
    assert c.next_xid == (8 << 32) | 3
    c = c.past_xid(10)
    assert c.next_xid == (8 << 32) | 11
    assert c.past_xid(0) is c and c.past_xid(0xFFFFFF00) is c  # invalid; an old XID


def test_next_multi_and_offset_advance_modulo_2_32() -> None:
    c = counters(next_multi=0xFFFFFFFE, next_multi_offset=0xFFFFFF00)
    c = c.past_multi(0xFFFFFFFF, 0xFFFFFFF0)
    assert (c.next_multi, c.next_multi_offset) == (0xFFFFFFFF, 0xFFFFFFF0)
    c = c.past_multi(0x1_00000000, 0x1_00000010)  # mid + 1 and moff + n wrap
    assert (c.next_multi, c.next_multi_offset) == (0, 0x10)
    assert c.past_multi(0xFFFFFFFF, 5) is c  # both behind


def test_checkpoints_online_advance_shutdown_sets() -> None:
    c = counters(next_xid=5000, next_oid=30000, next_multi=50, next_multi_offset=90)
    online = parse_checkpoint(checkpoint(next_xid=4000, next_oid=1, next_multi=60,
                                         next_off=80, oldest_xid=800, oldest_multi=7))
    after = c.after_checkpoint(online, shutdown=False)
    assert (after.next_xid, after.next_oid, after.next_multi, after.next_multi_offset) == (
        5000, 30000, 60, 90)  # online: max; the OID counter left alone
    assert (after.oldest_xid, after.oldest_multi) == (800, 7)
    shut = c.after_checkpoint(online, shutdown=True)
    assert (shut.next_xid, shut.next_oid, shut.next_multi, shut.next_multi_offset) == (
        4000, 1, 60, 80)


def test_counters_stored_when_records_change_them(repo: SqliteRepository) -> None:
    ing = start(repo, counters())
    ing.add(rec(100, pgc.RmgrId.HEAP2, pgc.XLOG_HEAP2_NEW_CID, b"", xid=1000))  # a record xid
    ing.add(rec(200, pgc.RmgrId.XLOG, pgc.XLOG_NEXTOID, struct.pack("<I", 40000)))
    ing.add(rec(300, pgc.RmgrId.XLOG, pgc.XLOG_NOOP))  # changes nothing: no record
    commit = struct.pack("<qI", 0, pgc.XACT_XINFO_HAS_SUBXACTS) + struct.pack("<iII", 2,
                                                                             1500, 1501)
    ing.add(rec(400, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT | pgc.XLOG_XACT_HAS_INFO, commit,
                xid=1200))
    ing.flush()
    assert stored_counters(ing, 164).next_xid == 1001
    assert stored_counters(ing, 264).next_oid == 40000
    assert stored_counters(ing, 464).next_xid == 1502  # past the newest subtransaction
    keys = [r.lsn for r in repo.iter_records(ing.timeline_id, Lsn(10), Lsn(464))
            if r.key == control_key(ControlItem.COUNTERS)]
    assert keys == [164, 264, 464]


# -- multixacts --------------------------------------------------------------------------

def multixact(mid: int, moff: int, *xids: int) -> bytes:
    members = b"".join(struct.pack("<II", x, 5) for x in xids)
    return struct.pack("<IIi", mid, moff, len(xids)) + members


def offsets_page(ing: WalIngest, page: int, lsn: int) -> bytes:
    value = ing.repo.get_value(ing.timeline_id, slru_page_key(SlruId.MULTIXACT_OFFSETS, page),
                               Lsn(lsn))
    assert value is not None
    return value


def test_multixact_writes_the_next_offset_across_a_page(repo: SqliteRepository) -> None:
    ing = start(repo, counters(next_multi=2046, next_multi_offset=100))
    ing.add(rec(100, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_CREATE_ID,
                multixact(2046, 100, 1000, 1001)))
    # The next page is zeroed before the multixact whose successor starts it (15.16+).
    ing.add(rec(200, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_ZERO_OFF_PAGE,
                struct.pack("<i", 1)))
    ing.add(rec(300, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_CREATE_ID,
                multixact(2047, 102, 1002)))
    ing.flush()
    page0 = offsets_page(ing, 0, 364)
    assert struct.unpack_from("<II", page0, 2046 * 4) == (100, 102)
    page1 = offsets_page(ing, 1, 364)
    assert struct.unpack_from("<I", page1, 0) == (103,)  # multixact 2048's offset
    c = stored_counters(ing, 364)
    assert (c.next_multi, c.next_multi_offset) == (2048, 103)
    assert c.next_xid == 1003  # past every member


def test_multixact_from_an_older_minor_keeps_the_preinitialised_entry(
        repo: SqliteRepository) -> None:
    """Before 15.16 the next offsets page was zeroed only when its first multixact was
    created, after the record that now writes its first entry."""
    ing = start(repo, counters(next_multi=2047, next_multi_offset=10))
    ing.add(rec(100, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_ZERO_OFF_PAGE,
                struct.pack("<i", 0)))
    ing.add(rec(200, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_CREATE_ID,
                multixact(2047, 10, 1000)))
    ing.add(rec(300, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_ZERO_OFF_PAGE,
                struct.pack("<i", 1)))
    ing.flush()
    assert struct.unpack_from("<I", offsets_page(ing, 1, 364), 0) == (11,)


def test_multixact_wraparound_skips_zero(repo: SqliteRepository) -> None:
    last_page = 0xFFFFFFFF // MULTIXACT_OFFSETS_PER_PAGE
    ing = start(repo, counters(next_multi=0xFFFFFFFF, next_multi_offset=0xFFFFFFFE))
    ing.add(rec(100, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_CREATE_ID,
                multixact(0xFFFFFFFF, 0xFFFFFFFE, 1000, 1001)))
    ing.flush()
    last = offsets_page(ing, last_page, 164)
    assert struct.unpack_from("<I", last, 8188) == (0xFFFFFFFE,)
    # The next multixact is 1 (0 is invalid), whose offset is 1 (offset 0 is skipped).
    assert struct.unpack_from("<I", offsets_page(ing, 0, 164), 4) == (1,)
    c = stored_counters(ing, 164)
    assert (c.next_multi, c.next_multi_offset) == (0, 0)  # as redo leaves them


def test_multixact_truncation_removes_whole_segments(repo: SqliteRepository) -> None:
    pages = [Record(slru_page_key(SlruId.MULTIXACT_OFFSETS, p), Lsn(10), RecordKind.IMAGE,
                    bytes(8192)) for p in (0, 31, 32, 64, 65)]
    pages += [Record(slru_page_key(SlruId.MULTIXACT_MEMBERS, p), Lsn(10), RecordKind.IMAGE,
                     bytes(8192)) for p in (0, 40, 70, 100)]
    ing = start(repo, counters(next_multi=140000), *pages)
    # New oldest multixact 2048 * 65 + 5 (page 65, segment 2); members from offset 0 to
    # the start of segment 2 (32 pages of 1636 members) are deleted.
    trunc = struct.pack("<IIIII", 1, 1, 2048 * 65 + 5, 0, 64 * 1636)
    ing.add(rec(100, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_TRUNCATE_ID, trunc))
    ing.flush()
    present = {p for p in (0, 31, 32, 64, 65) if ing.repo.get_value(
        ing.timeline_id, slru_page_key(SlruId.MULTIXACT_OFFSETS, p), Lsn(164)) is not None}
    assert present == {64, 65}
    members = {p for p in (0, 40, 70, 100) if ing.repo.get_value(
        ing.timeline_id, slru_page_key(SlruId.MULTIXACT_MEMBERS, p), Lsn(164)) is not None}
    assert members == {70, 100}
    assert stored_counters(ing, 164).oldest_multi == 2048 * 65 + 5


def test_clog_truncation(repo: SqliteRepository) -> None:
    pages = [Record(slru_page_key(SlruId.XACT, p), Lsn(10), RecordKind.IMAGE, bytes(8192))
             for p in (0, 31, 32, 40)]
    ing = start(repo, counters(next_xid=40 * 32768), *pages)
    ing.add(rec(100, pgc.RmgrId.CLOG, pgc.CLOG_TRUNCATE, struct.pack("<iII", 35, 35 * 32768,
                                                                       5)))
    ing.flush()
    present = {p for p in (0, 31, 32, 40) if ing.repo.get_value(
        ing.timeline_id, slru_page_key(SlruId.XACT, p), Lsn(164)) is not None}
    assert present == {32, 40}  # segment 1 holds page 35: kept whole
    c = stored_counters(ing, 164)
    assert (c.oldest_xid, c.oldest_xid_db) == (35 * 32768, 5)


# -- commit timestamps and replication origins -------------------------------------------

def test_commit_timestamps_with_subtransactions_and_origin(repo: SqliteRepository) -> None:
    ing = start(repo, counters(next_xid=800, commit_ts_active=True, oldest_commit_ts_xid=800,
                               newest_commit_ts_xid=800))
    first = COMMIT_TS_XACTS_PER_PAGE - 1  # its subtransaction is on the next page
    xinfo = pgc.XACT_XINFO_HAS_SUBXACTS | pgc.XACT_XINFO_HAS_ORIGIN
    commit = (struct.pack("<qI", 111, xinfo) + struct.pack("<iI", 1, first + 1)
              + struct.pack("<Qq", 0x5000, 222))
    ing.add(rec(100, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT | pgc.XLOG_XACT_HAS_INFO, commit,
                xid=first, origin=3))
    ing.add(rec(200, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT, struct.pack("<q", 333),
                xid=first + 5))
    ing.flush()

    def entry(xid: int) -> tuple[int, int]:
        page, slot = divmod(xid, COMMIT_TS_XACTS_PER_PAGE)
        value = repo.get_value(ing.timeline_id, slru_page_key(SlruId.COMMIT_TS, page),
                               Lsn(264))
        assert value is not None
        return struct.unpack_from("<qH", value, slot * 10)

    assert entry(first) == (222, 3) and entry(first + 1) == (222, 3)  # origin's time
    assert entry(first + 5) == (333, 0)
    c = stored_counters(ing, 264)
    assert (c.oldest_commit_ts_xid, c.newest_commit_ts_xid) == (800, first + 5)
    raw = repo.get_value(ing.timeline_id, control_key(ControlItem.ORIGINS), Lsn(264))
    assert raw is not None and Origins.unpack(raw).progress == ((3, 0x5000),)


def test_no_commit_timestamps_while_tracking_is_off(repo: SqliteRepository) -> None:
    ing = start(repo, counters())
    ing.add(rec(100, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT, struct.pack("<q", 5), xid=900))
    # track_commit_timestamp turned on (PARAMETER_CHANGE), then a commit is recorded.
    params = struct.pack("<6i??", 100, 8, 10, 0, 64, 1, False, True)
    ing.add(rec(200, pgc.RmgrId.XLOG, pgc.XLOG_PARAMETER_CHANGE, params))
    ing.add(rec(300, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT, struct.pack("<q", 6), xid=901))
    ing.flush()
    page = repo.get_value(ing.timeline_id, slru_page_key(SlruId.COMMIT_TS, 1), Lsn(364))
    assert page is not None
    assert struct.unpack_from("<q", page, (900 % COMMIT_TS_XACTS_PER_PAGE) * 10) == (0,)
    assert struct.unpack_from("<q", page, (901 % COMMIT_TS_XACTS_PER_PAGE) * 10) == (6,)


def test_replication_origin_set_force_and_drop() -> None:
    o = Origins().advance(2, 500, backward=False).advance(1, 100, backward=False)
    assert o.progress == ((1, 100), (2, 500))
    assert o.advance(2, 400, backward=False) is o  # never backwards from a commit
    assert o.advance(2, 400, backward=True).progress == ((1, 100), (2, 400))
    assert o.drop(1).progress == ((2, 500),)
    assert Origins.from_checkpoint_file(o.checkpoint_file()) == o
    assert len(o.checkpoint_file()) == 4 + 2 * 16 + 4


# -- pages -------------------------------------------------------------------------------

def gist_page(flags: int, nsn: int = 0) -> bytes:
    page = bytearray(8192)
    struct.pack_into("<HHH", page, 12, 40, 8176, 8176)
    struct.pack_into("<IIIHH", page, 8176, nsn >> 32, nsn & 0xFFFFFFFF, 0xFFFFFFFF, flags,
                     0xFF81)
    return bytes(page)


def test_gist_clears_follow_right_over_the_image(repo: SqliteRepository) -> None:
    ing = start(repo, counters())
    parent = imaged(NODE, 0, gist_page(0), block_id=0)
    child = imaged(NODE, 7, gist_page(pgc.F_FOLLOW_RIGHT | 1, nsn=0x10), block_id=1)
    out = ing.ingest(rec(100, pgc.RmgrId.GIST, pgc.XLOG_GIST_PAGE_UPDATE, b"",
                         [parent, child]))
    pages = {r.key: r.payload for r in out}
    cleared = pages[rel_block_key(NODE.tag(0), 7)]
    nsn_hi, nsn_lo, _right, flags, _id = struct.unpack_from("<IIIHH", cleared, 8176)
    assert (nsn_hi << 32 | nsn_lo, flags) == (164, 1)  # NSN = end LSN, leaf flag kept
    assert pages[rel_block_key(NODE.tag(0), 0)][8176:] == gist_page(0)[8176:]
    # PAGE_SPLIT: the left child is block 0.
    out = ing.ingest(rec(200, pgc.RmgrId.GIST, pgc.XLOG_GIST_PAGE_SPLIT, b"",
                         [imaged(NODE, 9, gist_page(pgc.F_FOLLOW_RIGHT), block_id=0)]))
    split = next(r.payload for r in out if r.key == rel_block_key(NODE.tag(0), 9))
    assert struct.unpack_from("<H", split, 8176 + 12) == (0,)


def test_fsm_truncate_clears_the_tail_and_rebuilds_the_tree() -> None:
    page = bytearray(8192)
    nodes = 28
    leaves = nodes + 8192 // 2 - 1
    page[leaves : leaves + FSM_LEAF_SLOTS] = bytes([7]) * FSM_LEAF_SLOTS
    page[leaves + 100] = 200
    page[nodes] = 200  # root: the maximum
    out = apply_delta(bytes(page), make_fsm_truncate(50))
    assert out is not None
    assert out[leaves : leaves + 50] == bytes([7]) * 50
    assert out[leaves + 50 : leaves + FSM_LEAF_SLOTS] == bytes(FSM_LEAF_SLOTS - 50)
    assert out[nodes] == 7  # the root is the new maximum
    assert apply_delta(None, make_fsm_truncate(3)) is None


def test_truncation_clears_the_last_fsm_page(repo: SqliteRepository) -> None:
    fsm = NODE.tag(ForkNumber.FSM)
    page = bytearray(8192)
    page[28 + 4095 : 28 + 4095 + FSM_LEAF_SLOTS] = b"\x09" * FSM_LEAF_SLOTS
    tid = repo.create_timeline().timeline_id
    repo.put_records(tid, [Record(rel_block_key(fsm, b), Lsn(10), RecordKind.IMAGE,
                                  bytes(page)) for b in range(4)], Lsn(10))
    ing = WalIngest(repo, tid, {fsm: 4, NODE.tag(0): 10})
    ing.add(rec(100, pgc.RmgrId.SMGR, pgc.XLOG_SMGR_TRUNCATE,
                struct.pack("<IIIIi", 7, 1663, 5, 16384, pgc.SMGR_TRUNCATE_ALL)))
    ing.flush()
    leaf = repo.get_value(tid, rel_block_key(fsm, 2), Lsn(164))  # blocks 0, 1: upper levels
    assert leaf is not None
    assert leaf[28 + 4095 : 28 + 4095 + 7] == b"\x09" * 7 and not any(leaf[28 + 4095 + 7:])
    assert repo.get_value(tid, rel_block_key(fsm, 3), Lsn(164)) is None


# -- refusal -----------------------------------------------------------------------------

def test_block_without_image_stops_ingest(repo: SqliteRepository) -> None:
    ing = start(repo, counters())
    ing.add(rec(100, pgc.RmgrId.HEAP, pgc.XLOG_HEAP_INSERT, struct.pack("<HB", 1, 0),
                [imaged(NODE, 0)]))
    bare = BlockRef(0, NODE, 0, 3, 0)
    with pytest.raises(MissingPageImage) as err:
        ing.add(rec(200, pgc.RmgrId.HEAP, pgc.XLOG_HEAP_INSERT, struct.pack("<HB", 2, 0),
                    [bare]))
    assert "Heap/INSERT at 0/C8" in err.value.message
    assert "1663/5/16384" in err.value.message and "block 3" in err.value.message
    assert "wal_consistency_checking" in (err.value.hint or "")
    ing.flush()
    assert repo.get_timeline(ing.timeline_id).last_record_lsn == 164  # up to the one before
    # A hint's FPI record may legitimately carry a block without its image.
    ing.add(rec(300, pgc.RmgrId.XLOG, pgc.XLOG_FPI_FOR_HINT, b"", [bare]))


def test_counters_value_round_trip() -> None:
    c = counters(next_xid=(3 << 32) | 77, commit_ts_active=True, newest_commit_ts_xid=9)
    assert Counters.unpack(c.pack()) == c
    cp = CheckPoint(Lsn(0), 1, 1, True, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    into = c.into_checkpoint(cp)
    assert (into.next_xid, into.newest_commit_ts_xid) == (c.next_xid, 9)
    assert counters(newest_commit_ts_xid=9).into_checkpoint(cp).newest_commit_ts_xid == 0


def test_file_copy_replaces_the_destination_directory(repo: SqliteRepository) -> None:
    """dbase_redo removes the destination before copying: a stale relation stored under
    the new database's OID does not survive into it."""
    src, stale = RelTag(1663, 1, 1259), RelTag(1663, 7, 99999)
    tid = repo.create_timeline().timeline_id
    repo.put_records(tid, [
        Record(rel_block_key(src, 0), Lsn(10), RecordKind.IMAGE, b"p" * 8192),
        Record(rel_size_key(src), Lsn(10), RecordKind.IMAGE, (1).to_bytes(4, "little")),
        Record(rel_block_key(stale, 0), Lsn(10), RecordKind.IMAGE, b"s" * 8192),
        Record(rel_size_key(stale), Lsn(10), RecordKind.IMAGE, (1).to_bytes(4, "little")),
    ], Lsn(10))
    ing = WalIngest(repo, tid)
    ing.add(rec(100, pgc.RmgrId.DBASE, pgc.XLOG_DBASE_CREATE_FILE_COPY,
                struct.pack("<IIII", 7, 1663, 1, 1663)))
    ing.flush()
    lo, hi = db_key_range(1663, 7)
    assert dict(repo.materialize(tid, Lsn(164), lo=lo, hi=hi)) == {
        rel_block_key(RelTag(1663, 7, 1259), 0): b"p" * 8192,
        rel_size_key(RelTag(1663, 7, 1259)): (1).to_bytes(4, "little"),
    }
    assert stale not in ing.sizes


def test_origin_progress_from_aborts_and_prepares(repo: SqliteRepository) -> None:
    """xact_redo_abort and PrepareRedoAdd apply an origin's progress too (a two-phase
    subscription); DoNotReplicateId is not tracked."""
    ing = start(repo, counters())
    abort = struct.pack("<qI", 0, pgc.XACT_XINFO_HAS_ORIGIN) + struct.pack("<Qq", 0x700, 1)
    ing.add(rec(100, pgc.RmgrId.XACT, pgc.XLOG_XACT_ABORT | pgc.XLOG_XACT_HAS_INFO, abort,
                xid=1000, origin=4))
    header = struct.pack("<IIIIqIiiiiii?xHQq", 0x57F94534, 80, 1001, 5, 0, 10, 0, 0, 0, 0, 0,
                         0, False, 1, 0x900, 0) + b"g\0".ljust(8, b"\0")
    ing.add(rec(200, pgc.RmgrId.XACT, pgc.XLOG_XACT_PREPARE, header, xid=1001, origin=4))
    ing.add(rec(300, pgc.RmgrId.XACT, pgc.XLOG_XACT_ABORT | pgc.XLOG_XACT_HAS_INFO,
                struct.pack("<qI", 0, pgc.XACT_XINFO_HAS_ORIGIN) + struct.pack("<Qq", 9, 1),
                xid=1002, origin=0xFFFF))
    ing.flush()

    def origins(lsn: int) -> tuple[tuple[int, int], ...]:
        raw = repo.get_value(ing.timeline_id, control_key(ControlItem.ORIGINS), Lsn(lsn))
        return () if raw is None else Origins.unpack(raw).progress

    assert origins(164) == ((4, 0x700),)
    assert origins(364) == ((4, 0x900),)


def test_end_of_recovery_moves_the_timeline(repo: SqliteRepository) -> None:
    ing = start(repo, counters(timeline=1))
    ing.add(rec(100, pgc.RmgrId.XLOG, pgc.XLOG_END_OF_RECOVERY, struct.pack("<qII", 0, 2, 1)))
    ing.flush()
    assert stored_counters(ing, 164).timeline == 2
    cp = CheckPoint(Lsn(0), 1, 1, True, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert stored_counters(ing, 164).into_checkpoint(cp).this_timeline_id == 2


def test_old_timeline_counters_round_past_stored_pages(repo: SqliteRepository) -> None:
    """A timeline ingested before the counters were kept resumes from its checkpoint moved
    past the XIDs and multixacts its stored SLRU pages can hold, never behind."""
    tid = repo.create_timeline().timeline_id
    repo.put_records(tid, [
        Record(control_key(ControlItem.CHECKPOINT), Lsn(10), RecordKind.IMAGE,
               checkpoint(next_xid=(2 << 32) | 40000, next_multi=100, next_off=300)),
        *[Record(slru_page_key(SlruId.XACT, p), Lsn(10), RecordKind.IMAGE, bytes(8192))
          for p in (1, 2)],
        Record(slru_page_key(SlruId.MULTIXACT_OFFSETS, 0), Lsn(10), RecordKind.IMAGE,
               bytes(8192)),
    ], Lsn(10))
    c = WalIngest(repo, tid, {}).counters
    assert c.next_xid == (2 << 32) | (3 * 32768)  # past page 2 of pg_xact
    assert (c.next_multi, c.next_multi_offset) == (2048, 300)  # no members page stored
