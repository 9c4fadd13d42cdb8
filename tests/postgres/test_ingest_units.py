"""Ingest pieces without a PostgreSQL server: key layout, the postgres delta types, the
position arithmetic copied from visibilitymap.c / clog.c / multixact.c / freespace.c,
base-backup cutting, and WalIngest on hand-built records."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from zenith.errors import InvalidArgument, InvalidState
from zenith.lsn import Lsn
from zenith.postgres import pg_constants as pgc
from zenith.postgres.basebackup import TarPiece
from zenith.postgres.import_basebackup import BackupRecords
from zenith.postgres.keys import (
    ControlItem,
    ForkNumber,
    KeyKind,
    RelTag,
    SlruId,
    control_key,
    db_key_range,
    db_version_key,
    file_key,
    key_kind,
    pack_file_value,
    parse_rel_key,
    rebase_db_key,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_page_key,
    unpack_file_value,
)
from zenith.postgres.redo import make_clog_set, make_slru_patch, make_vm_clear
from zenith.postgres.waldecoder import (
    BlockImage,
    BlockRef,
    DecodedRecord,
    RelFileNode,
    WalDecodeError,
)
from zenith.postgres.walingest import (
    HEAPBLOCKS_PER_PAGE,
    MULTIXACT_MEMBERS_PER_PAGE,
    WalIngest,
    fsm_blocks_after_truncate,
    image_at,
    set_page_lsn,
    vm_position,
)
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.redo import apply_delta

REL = RelTag(1663, 5, 16384)


def test_database_keys_are_one_contiguous_range() -> None:
    lo, hi = db_key_range(1663, 5)
    inside = [rel_block_key(REL, 0), rel_block_key(REL, 0xFFFFFFFE), rel_size_key(REL),
              rel_size_key(RelTag(1663, 5, 0xFFFFFFFF, 3)), relmap_key(1663, 5),
              db_version_key(1663, 5)]
    outside = [rel_block_key(RelTag(1663, 6, 1), 0), relmap_key(1663, 4),
               rel_block_key(RelTag(1664, 5, 1), 0), slru_page_key(SlruId.XACT, 0),
               file_key("PG_VERSION")]
    assert all(lo <= k < hi for k in inside)
    assert not any(lo <= k < hi for k in outside)
    assert parse_rel_key(rel_size_key(REL)) == (KeyKind.REL_SIZE, REL, 0)
    assert parse_rel_key(rel_block_key(REL, 7)) == (KeyKind.REL_BLOCK, REL, 7)
    assert key_kind(relmap_key(1663, 5)) is KeyKind.RELMAP
    assert key_kind(db_version_key(1663, 5)) is KeyKind.DB_VERSION
    moved = rebase_db_key(rel_block_key(REL, 3), 1663, 9)
    assert parse_rel_key(moved) == (KeyKind.REL_BLOCK, RelTag(1663, 9, 16384), 3)
    assert unpack_file_value(pack_file_value("pg_hba.conf", b"x")) == ("pg_hba.conf", b"x")
    with pytest.raises(InvalidArgument):
        rel_block_key(REL, 0xFFFFFFFF)


def test_postgres_delta_types() -> None:
    page = bytes(24) + b"\xff" * 8168
    cleared = apply_delta(page, make_vm_clear([(24, 0b11110011)]))
    assert cleared is not None and cleared[24] == 0b11110011 and cleared[25] == 0xFF
    assert apply_delta(None, make_vm_clear([(24, 0)])) is None
    clog = apply_delta(None, make_clog_set([(10, 2, 1), (10, 4, 2)]))
    assert clog is not None and len(clog) == 8192 and clog[10] == 0b100100
    again = apply_delta(clog, make_clog_set([(10, 2, 2)]))
    assert again is not None and again[10] == 0b101000
    slru = apply_delta(None, make_slru_patch([(8188, b"abcd")]))
    assert slru is not None and len(slru) == 8192 and slru[-4:] == b"abcd"
    with pytest.raises(InvalidArgument):
        make_slru_patch([(8190, b"abcd")])


def test_positions_follow_postgres() -> None:
    assert HEAPBLOCKS_PER_PAGE == 32672
    assert vm_position(0) == (0, 24, 0)
    assert vm_position(5) == (0, 25, 2)
    assert vm_position(32672 + 7) == (1, 25, 6)
    assert MULTIXACT_MEMBERS_PER_PAGE == 1636
    # freespace.c: heap of 0 blocks keeps no FSM page... 1 block keeps the 3 tree levels.
    assert fsm_blocks_after_truncate(0) == 2
    assert fsm_blocks_after_truncate(1) == 3
    assert fsm_blocks_after_truncate(4069) == 3
    assert fsm_blocks_after_truncate(4070) == 4
    page = bytearray(8192)
    struct.pack_into("<HHH", page, 12, 28, 8000, 8192)
    assert set_page_lsn(bytes(page), Lsn(0x1_00000002))[:8] == struct.pack("<II", 1, 2)
    assert set_page_lsn(bytes(8192), Lsn(5)) == bytes(8192)  # a new page keeps LSN 0


def test_backup_records_cut_files_in_pages() -> None:
    b = BackupRecords(Lsn(100))
    data = bytes(range(256)) * 32 * 3  # three pages
    pieces = [TarPiece("base/5/16384.1", len(data), 0o600, data[:5000], offset=0, last=False),
              TarPiece("base/5/16384.1", len(data), 0o600, data[5000:], offset=5000)]
    out = [r for p in pieces for r in b.feed(p)]
    assert [r.key for r in out] == [rel_block_key(REL, 131072 + n) for n in range(3)]
    assert all(r.payload == data[:8192] for r in out) and out[0].lsn == 100
    out = b.feed(TarPiece("pg_xact/0001", 8192, 0o600, bytes(8192)))
    assert [r.key for r in out] == [slru_page_key(SlruId.XACT, 32)]
    out = b.feed(TarPiece("base/5/pg_filenode.map", 512, 0o600, b"m" * 512))
    assert out[0].key == relmap_key(1663, 5)
    out = b.feed(TarPiece("postgresql.conf", 3, 0o600, b"a=1"))
    assert out[0].key == file_key("postgresql.conf")
    assert b.feed(TarPiece("postmaster.pid", 3, 0o600, b"123")) == []
    finished = b.finish()
    # No pg_control or replorigin_checkpoint was fed: no counters, no origins.
    assert [(r.key, r.payload) for r in finished[-1:]] == [
        (control_key(ControlItem.ORIGINS), b"")]
    sizes = finished[:-1]
    expected = [(rel_size_key(REL), (131075).to_bytes(4, "little"))]
    assert [(r.key, r.payload) for r in sizes] == expected


def imaged(node: RelFileNode, blkno: int, page: bytes | None = None, *, fork: int = 0,
           block_id: int = 0) -> BlockRef:
    """A block reference carrying ``page`` (default: an empty heap page) as its image."""
    if page is None:
        raw = bytearray(8192)
        struct.pack_into("<HHH", raw, 12, 24, 8192, 8192)
        page = bytes(raw)
    return BlockRef(block_id, node, fork, blkno, pgc.BKPBLOCK_HAS_IMAGE,
                    BlockImage(0, 0, 0, page))


def _rec(lsn: int, rmid: int, info: int, main: bytes = b"", blocks: list[BlockRef] | None = None,
         xid: int = 0) -> DecodedRecord:
    return DecodedRecord(Lsn(lsn), Lsn(lsn + 64), xid, rmid, info, Lsn(0), 64, main,
                         blocks or [])


@pytest.fixture
def repo(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "z.db", durable=False)
    yield r
    r.close()


def test_ingest_create_truncate_commit_multixact(repo: SqliteRepository) -> None:
    tid = repo.create_timeline().timeline_id
    vm = RelTag(1663, 5, 16384, ForkNumber.VISIBILITYMAP)
    vm_page = bytearray(8192)
    struct.pack_into("<HHH", vm_page, 12, 24, 8192, 8192)
    vm_page[24:] = b"\xff" * 8168
    repo.put_records(tid, [Record(rel_block_key(vm, 0), Lsn(10), RecordKind.IMAGE,
                                  bytes(vm_page))], Lsn(10))
    ing = WalIngest(repo, tid, {vm: 1})
    node = RelFileNode(1663, 5, 16384)
    ing.add(_rec(100, pgc.RmgrId.SMGR, pgc.XLOG_SMGR_CREATE,
                 struct.pack("<IIIi", 1663, 5, 16384, 0)))
    # Heap delete on block 9 with ALL_VISIBLE_CLEARED (the heap page's image, not the VM's).
    blk = imaged(node, 9)
    ing.add(_rec(200, pgc.RmgrId.HEAP, pgc.XLOG_HEAP_DELETE,
                 struct.pack("<IHBB", 0, 1, 0, pgc.XLH_DELETE_ALL_VISIBLE_CLEARED), [blk]))
    # Commit of xid 1000 with subxact 1001; abort of 40000.
    commit = struct.pack("<qI", 0, pgc.XACT_XINFO_HAS_SUBXACTS) + struct.pack("<iI", 1, 1001)
    ing.add(_rec(300, pgc.RmgrId.XACT, pgc.XLOG_XACT_COMMIT | pgc.XLOG_XACT_HAS_INFO, commit,
                 xid=1000))
    ing.add(_rec(400, pgc.RmgrId.XACT, pgc.XLOG_XACT_ABORT, struct.pack("<q", 0), xid=40000))
    ing.add(_rec(500, pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_CREATE_ID,
                 struct.pack("<IIi", 3, 1637, 2) + struct.pack("<IIII", 1000, 1, 1001, 2)))
    # Truncate the heap to 4 blocks, with the VM.
    ing.add(_rec(600, pgc.RmgrId.SMGR, pgc.XLOG_SMGR_TRUNCATE,
                 struct.pack("<IIIIi", 4, 1663, 5, 16384, pgc.SMGR_TRUNCATE_ALL)))
    ing.flush()
    main = RelTag(1663, 5, 16384)
    assert repo.get_value(tid, rel_size_key(main), Lsn(164)) == (0).to_bytes(4, "little")
    assert repo.get_value(tid, rel_size_key(main), Lsn(264)) == (10).to_bytes(4, "little")
    vm_after = repo.get_value(tid, rel_block_key(vm, 0), Lsn(264))
    assert vm_after is not None and vm_after[26] == 0xFF & ~(0b11 << 2)  # heap block 9
    clog = repo.get_value(tid, slru_page_key(SlruId.XACT, 0), Lsn(464))
    assert clog is not None
    assert (clog[250] >> 0) & 3 == 1 and (clog[250] >> 2) & 3 == 1  # 1000, 1001 committed
    clog1 = repo.get_value(tid, slru_page_key(SlruId.XACT, 1), Lsn(464))
    assert clog1 is not None and (clog1[(40000 - 32768) // 4] >> 0) & 3 == 2
    offsets = repo.get_value(tid, slru_page_key(SlruId.MULTIXACT_OFFSETS, 0), Lsn(564))
    assert offsets is not None and offsets[12:16] == struct.pack("<I", 1637)
    # member offsets 1637, 1638: page 1 starts at 1636, so slots 1 and 2 of group 0
    members = repo.get_value(tid, slru_page_key(SlruId.MULTIXACT_MEMBERS, 1), Lsn(564))
    assert members is not None
    assert members[0:4] == b"\x00\x01\x02\x00"
    assert members[8:16] == struct.pack("<II", 1000, 1001)
    assert repo.get_value(tid, rel_size_key(main), Lsn(664)) == (4).to_bytes(4, "little")
    vm_cut = repo.get_value(tid, rel_block_key(vm, 0), Lsn(664))
    assert vm_cut is not None and vm_cut[24] == 0xFF and vm_cut[25] == 0 and vm_cut[8191] == 0
    assert repo.get_value(tid, rel_block_key(main, 9), Lsn(664)) is None


def test_create_database_file_copy_and_drop(repo: SqliteRepository) -> None:
    tid = repo.create_timeline().timeline_id
    src = RelTag(1663, 1, 1259)
    repo.put_records(tid, [
        Record(rel_block_key(src, 0), Lsn(10), RecordKind.IMAGE, b"p" * 8192),
        Record(rel_size_key(src), Lsn(10), RecordKind.IMAGE, (1).to_bytes(4, "little")),
        Record(relmap_key(1663, 1), Lsn(10), RecordKind.IMAGE, b"m" * 512),
    ], Lsn(10))
    ing = WalIngest(repo, tid)  # sizes loaded from storage
    assert ing.sizes == {src: 1}
    ing.add(_rec(100, pgc.RmgrId.SMGR, pgc.XLOG_SMGR_CREATE,
                 struct.pack("<IIIi", 1663, 1, 5000, 0)))
    copy = _rec(200, pgc.RmgrId.DBASE, pgc.XLOG_DBASE_CREATE_FILE_COPY,
                struct.pack("<IIII", 7, 1663, 1, 1663))
    assert WalIngest.needs_flush(copy)
    ing.add(copy)  # flushes the SMGR_CREATE first, then reads database 1 at its end
    ing.flush()
    lo, hi = db_key_range(1663, 7)
    copied = dict(repo.materialize(tid, Lsn(264), lo=lo, hi=hi))
    assert copied == {
        rel_block_key(RelTag(1663, 7, 1259), 0): b"p" * 8192,
        rel_size_key(RelTag(1663, 7, 1259)): (1).to_bytes(4, "little"),
        rel_size_key(RelTag(1663, 7, 5000)): (0).to_bytes(4, "little"),
        relmap_key(1663, 7): b"m" * 512,
    }
    assert ing.sizes[RelTag(1663, 7, 1259)] == 1
    ing.add(_rec(300, pgc.RmgrId.DBASE, pgc.XLOG_DBASE_DROP, struct.pack("<IiI", 7, 1, 1663)))
    ing.flush()
    assert list(repo.materialize(tid, Lsn(364), lo=lo, hi=hi)) == []
    assert len(list(repo.materialize(tid, Lsn(364), lo=db_key_range(1663, 1)[0],
                                     hi=db_key_range(1663, 1)[1]))) == 4
    # Called without storing the records before it, FILE_COPY refuses rather than
    # copying a stale template.
    lone = WalIngest(repo, tid)
    lone.ingest(_rec(400, pgc.RmgrId.XLOG, pgc.XLOG_NOOP))
    with pytest.raises(InvalidState):
        lone.ingest(_rec(500, pgc.RmgrId.DBASE, pgc.XLOG_DBASE_CREATE_FILE_COPY,
                         struct.pack("<IIII", 8, 1663, 1, 1663)))


def test_sizes_load_before_the_backup_end(repo: SqliteRepository) -> None:
    """A pageserver restarted between a backup's start and end LSN resumes ingest: the
    sizes come from the timeline's records, since it cannot be read there yet."""
    tid = repo.create_timeline(min_readable_lsn=Lsn(1000)).timeline_id
    a, b = RelTag(1663, 5, 1), RelTag(1663, 5, 2)
    repo.put_records(tid, [
        Record(rel_size_key(a), Lsn(10), RecordKind.IMAGE, (3).to_bytes(4, "little")),
        Record(rel_size_key(b), Lsn(10), RecordKind.IMAGE, (1).to_bytes(4, "little")),
        Record(rel_block_key(a, 0), Lsn(10), RecordKind.IMAGE, bytes(8192)),
    ], Lsn(10))
    repo.put_records(tid, [
        Record(rel_size_key(a), Lsn(20), RecordKind.IMAGE, (5).to_bytes(4, "little")),
        Record(rel_size_key(b), Lsn(20), RecordKind.TOMBSTONE),
    ], Lsn(20))
    assert WalIngest(repo, tid).sizes == {a: 5}


def test_file_copy_before_the_backup_end(repo: SqliteRepository) -> None:
    """CREATE DATABASE FILE_COPY in WAL between a backup's start and end LSN: storage
    refuses reads there, so the template is rebuilt from the timeline's records."""
    tid = repo.create_timeline(min_readable_lsn=Lsn(10_000)).timeline_id
    src = RelTag(1663, 1, 1259)
    repo.put_records(tid, [
        Record(rel_block_key(src, 0), Lsn(10), RecordKind.IMAGE, b"p" * 8192),
        Record(rel_block_key(src, 1), Lsn(10), RecordKind.IMAGE, b"q" * 8192),
        Record(rel_size_key(src), Lsn(10), RecordKind.IMAGE, (2).to_bytes(4, "little")),
    ], Lsn(10))
    repo.put_records(tid, [
        Record(rel_block_key(src, 0), Lsn(20), RecordKind.DELTA,
               make_vm_clear([(0, 0)])),
        Record(rel_block_key(src, 1), Lsn(20), RecordKind.TOMBSTONE),
    ], Lsn(20))
    ing = WalIngest(repo, tid)
    ing.add(_rec(100, pgc.RmgrId.DBASE, pgc.XLOG_DBASE_CREATE_FILE_COPY,
                 struct.pack("<IIII", 7, 1663, 1, 1663)))
    ing.flush(Lsn(10_000))
    lo, hi = db_key_range(1663, 7)
    assert dict(repo.materialize(tid, Lsn(10_000), lo=lo, hi=hi)) == {
        rel_block_key(RelTag(1663, 7, 1259), 0): b"\0" + b"p" * 8191,
        rel_size_key(RelTag(1663, 7, 1259)): (2).to_bytes(4, "little"),
    }


def test_image_at_equals_the_page_with_its_lsn_set() -> None:
    """The one-copy path builds exactly set_page_lsn(image.page(), lsn), for every shape of
    image: hole after the header, no hole, a hole inside the header, a new (pd_upper 0)
    page, and the compressed images it leaves to the general path."""
    import zstandard

    body = bytes(range(256)) * 32  # 8 KiB, pd_upper (bytes 14..15) not zero
    new_page = body[:14] + b"\0\0" + body[16:]
    lsn = Lsn(0x1_2345_6788)
    images = [
        BlockImage(pgc.BKPIMAGE_HAS_HOLE, 300, 1000, body[:300] + body[1300:]),
        BlockImage(pgc.BKPIMAGE_HAS_HOLE, 300, 1000, new_page[:300] + new_page[1300:]),
        BlockImage(0, 0, 0, body),
        BlockImage(0, 0, 0, new_page),
        BlockImage(pgc.BKPIMAGE_HAS_HOLE, 10, 100, body[:10] + body[110:]),
        BlockImage(pgc.BKPIMAGE_HAS_HOLE | pgc.BKPIMAGE_COMPRESS_ZSTD, 300, 1000,
                   zstandard.ZstdCompressor().compress(body[:300] + body[1300:])),
    ]
    for image in images:
        assert image_at(image, lsn) == set_page_lsn(image.page(), lsn)
    with pytest.raises(WalDecodeError):  # a length that does not add up: as page() says
        image_at(BlockImage(pgc.BKPIMAGE_HAS_HOLE, 300, 1000, body[:300]), lsn)
