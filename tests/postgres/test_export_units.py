"""Export without PostgreSQL: file layout, segmenting, holes, truncation leftovers, unlogged
relations, SLRU segments, next-ID bounds, excluded files, refusals (the real-process
oracles are in test_export_pg.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest

from zenith.errors import InvalidArgument, InvalidState
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres.export import RELSEG_SIZE, ExportEntry, export_entries, write_directory
from zenith.postgres.keys import (
    ControlItem,
    ForkNumber,
    RelTag,
    SlruId,
    control_key,
    db_version_key,
    file_key,
    pack_file_value,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_page_key,
)
from zenith.postgres.pgcontrol import pack_checkpoint, parse_control
from zenith.postgres.walrecord import CheckPoint, parse_checkpoint
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository

SEG = 16 << 20


def fake_control(checksums: int = 0) -> bytes:
    buf = bytearray(8192)
    struct.pack_into("<QII", buf, 0, 7777, 1300, 202209061)
    struct.pack_into("<I", buf, 228, SEG)
    struct.pack_into("<I", buf, 252, checksums)
    struct.pack_into("<I", buf, 288, google_crc32c.value(bytes(buf[:288])))
    return bytes(buf)


def checkpoint(next_xid: int = 700, next_multi: int = 1, next_offset: int = 0) -> CheckPoint:
    return CheckPoint(Lsn(0x100), 1, 1, True, next_xid, 16384, next_multi, next_offset, 3, 1,
                      1, 1, 0, 0, 0, 0)


def page(lsn: int, fill: int) -> bytes:
    """A page with pd_lsn = ``lsn``, pd_upper set (initialized) and a recognizable body."""
    head = struct.pack("<IIHHHHHH", lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, 24, 8192, 8192, 0x2004)
    return head + bytes([fill]) * (8192 - len(head))


def img(key: bytes, value: bytes, lsn: int = 0x1000) -> Record:
    return Record(key, Lsn(lsn), RecordKind.IMAGE, value)


@pytest.fixture
def repo(tmp_path: Path) -> SqliteRepository:
    return open_repository(tmp_path / "r.db", durable=False)


def build(repo: SqliteRepository, records: list[Record], cp: CheckPoint | None = None,
          checksums: int = 0) -> TimelineId:
    tid = repo.create_timeline().timeline_id
    base = [img(control_key(ControlItem.PG_CONTROL), fake_control(checksums)),
            img(relmap_key(1664, 0), b"m" * 512), img(relmap_key(1663, 5), b"n" * 512),
            img(db_version_key(1663, 5), b"15\n")]
    if cp is not None:
        base.append(img(control_key(ControlItem.CHECKPOINT), pack_checkpoint(cp)))
    repo.put_records(tid, base + records, Lsn(0x2000))
    return tid


def collect(entries: Iterator[ExportEntry]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for e in entries:
        assert e.path not in out, e.path
        out[e.path] = None if e.chunks is None else b"".join(e.chunks)
        assert out[e.path] is None or len(out[e.path] or b"") == e.size, e.path
    return out


def exported_checkpoint(files: dict[str, bytes | None]) -> CheckPoint:
    ctl = files["global/pg_control"]
    assert ctl is not None
    parse_control(ctl)  # the CRC holds
    assert struct.unpack_from("<I", ctl, 16)[0] == 1  # DB_SHUTDOWNED
    return parse_checkpoint(ctl[40:128])


def test_layout_holes_truncation_and_wal(repo: SqliteRepository) -> None:
    rel = RelTag(1663, 5, 16400)
    fsm = RelTag(1663, 5, 16400, ForkNumber.FSM)
    tid = build(repo, [
        img(rel_block_key(rel, 0), page(0x1500, 1)),
        img(rel_block_key(rel, 2), page(0x1600, 2)),
        img(rel_block_key(rel, 5), page(0x1700, 3)),  # beyond the size: truncated away
        img(rel_size_key(rel), (3).to_bytes(4, "little")),
        img(rel_size_key(fsm), (0).to_bytes(4, "little")),
        img(file_key("postgresql.conf"), pack_file_value("postgresql.conf", b"x = 1\n")),
        img(file_key("backup_label"), pack_file_value("backup_label", b"START WAL")),
        img(file_key("conf.d/a.conf"), pack_file_value("conf.d/a.conf", b"y = 2\n")),
    ], checkpoint())
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    data = files["base/5/16400"]
    assert data is not None and len(data) == 3 * 8192
    assert data[8192:16384] == bytes(8192) and data[:8192] == page(0x1500, 1)
    assert files["base/5/16400_fsm"] == b""
    assert files["base/5/PG_VERSION"] == b"15\n"
    assert files["base/5/pg_filenode.map"] == b"n" * 512
    assert files["global/pg_filenode.map"] == b"m" * 512
    assert files["postgresql.conf"] == b"x = 1\n" and files["conf.d"] is None
    assert files["conf.d/a.conf"] == b"y = 2\n"
    assert "backup_label" not in files and files["PG_VERSION"] == b"15\n"
    assert files["pg_wal/archive_status"] is None and files["pg_logical/mappings"] is None
    cp = exported_checkpoint(files)
    assert cp.redo == SEG + 40  # the first segment after LSN 0x2000
    # On the source's timeline + 1: the segment's name, its page header, the checkpoint.
    assert (cp.this_timeline_id, cp.prev_timeline_id) == (2, 1)
    wal = files["pg_wal/000000020000000000000001"]
    assert wal is not None and len(wal) == SEG
    assert struct.unpack_from("<HHIQ", wal, 0) == (0xD110, 2, 2, SEG)
    assert files["pg_wal/00000002.history"] == b"1\t0/2000\tzenith export at 0/2000\n"
    assert sorted(p for p in files if p.startswith("pg_wal/")) == [
        "pg_wal/00000002.history", "pg_wal/000000020000000000000001", "pg_wal/archive_status"]


def test_segments_of_one_gib(repo: SqliteRepository) -> None:
    rel = RelTag(1663, 5, 16401)
    tid = build(repo, [img(rel_block_key(rel, RELSEG_SIZE), page(0x1800, 9)),
                       img(rel_size_key(rel), (RELSEG_SIZE + 1).to_bytes(4, "little"))])
    sizes = {e.path: e.size for e in export_entries(repo, tid, Lsn(0x2000))}
    assert sizes["base/5/16401"] == 1 << 30
    assert sizes["base/5/16401.1"] == 8192


def test_page_lsn_beyond_export_lsn_moves_wal(repo: SqliteRepository) -> None:
    rel = RelTag(1663, 5, 16402)
    tid = build(repo, [img(rel_block_key(rel, 0), page(3 * SEG + 5, 1))], checkpoint())
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    assert files["base/5/16402"] == page(3 * SEG + 5, 1)  # no size key: highest block + 1
    assert exported_checkpoint(files).redo == 4 * SEG + 40


def test_unlogged_main_fork_from_init_fork(repo: SqliteRepository) -> None:
    init = RelTag(1663, 5, 16403, ForkNumber.INIT)
    tid = build(repo, [img(rel_block_key(init, 0), page(0x1000, 4)),
                       img(rel_size_key(init), (1).to_bytes(4, "little"))])
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    assert files["base/5/16403"] == files["base/5/16403_init"] == page(0x1000, 4)


def test_slru_segments_and_next_ids(repo: SqliteRepository) -> None:
    xact = [img(slru_page_key(SlruId.XACT, p), bytes([p + 1]) * 8192) for p in (0, 1, 33)]
    multi = [img(slru_page_key(SlruId.MULTIXACT_OFFSETS, 0), b"\1" * 8192),
             img(slru_page_key(SlruId.MULTIXACT_MEMBERS, 0), b"\2" * 8192)]
    # Checkpoint on XACT page 0 (epoch 2): pages 0 and 1 exist, page 2 does not.
    tid = build(repo, xact + multi, checkpoint(next_xid=2 << 32 | 700, next_multi=5,
                                               next_offset=9))
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    assert files["pg_xact/0000"] == b"\1" * 8192 + b"\2" * 8192
    assert files["pg_xact/0001"] == bytes(8192) + b"\x22" * 8192
    assert files["pg_multixact/offsets/0000"] == b"\1" * 8192
    cp = exported_checkpoint(files)
    assert cp.next_xid == 2 << 32 | 2 * 32768
    assert (cp.next_multi, cp.next_multi_offset) == (2048, 1636)
    assert cp.oldest_active_xid == 2 * 32768


def test_checksums_written_when_on(repo: SqliteRepository) -> None:
    rel = RelTag(1663, 5, 16404)
    tid = build(repo, [img(rel_block_key(rel, 1), page(0x1000, 7)),
                       img(rel_size_key(rel), (2).to_bytes(4, "little"))], checksums=1)
    data = collect(export_entries(repo, tid, Lsn(0x2000)))["base/5/16404"]
    assert data is not None
    assert data[:8192] == bytes(8192)  # a new page gets no checksum
    assert data[8192 + 8 : 8192 + 10] != b"\0\0"


def test_refusals(repo: SqliteRepository, tmp_path: Path) -> None:
    tid = build(repo, [])
    with pytest.raises(InvalidArgument, match="beyond"):
        export_entries(repo, tid, Lsn(0x2001))
    empty = repo.create_timeline().timeline_id
    repo.put_records(empty, [img(file_key("x"), pack_file_value("x", b""))], Lsn(0x2000))
    with pytest.raises(InvalidState, match="pg_control"):
        export_entries(repo, empty, Lsn(0x2000))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(InvalidArgument, match="not empty"):
        write_directory(export_entries(repo, tid, Lsn(0x2000)),
                        tmp_path / "full")
    n = write_directory(export_entries(repo, tid, Lsn(0x2000)),
                        tmp_path / "out")
    assert n > SEG and (tmp_path / "out" / "global" / "pg_control").stat().st_size == 8192


def test_next_timeline_after_the_sources(repo: SqliteRepository) -> None:
    """A source on timeline 3: the export is on 4, its history says it left 3 at the LSN."""
    source_cp = CheckPoint(Lsn(0x100), 3, 2, True, 700, 16384, 1, 0, 3, 1, 1, 1, 0, 0, 0, 0)
    tid = build(repo, [], source_cp)
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    cp = exported_checkpoint(files)
    assert (cp.this_timeline_id, cp.prev_timeline_id) == (4, 3)
    assert "pg_wal/000000040000000000000001" in files
    assert files["pg_wal/00000004.history"] == b"3\t0/2000\tzenith export at 0/2000\n"


SOURCE_CONF = b"""\
# a comment mentioning archive_command = 'x'
#archive_command = ''\t\t# initdb's commented default
archive_mode = on
  archive_command='cp %p /archive/%f'   # where the source archives
synchronous_standby_names = ''
primary_conninfo 'host=primary port=5432'
Restore_Command = 'cp /archive/%f %p'
archive_library = ''
shared_buffers = 128MB
"""
AUTO_CONF = b"""\
# Do not edit this file manually!
port = 5433
synchronous_standby_names = 'standby_b'
primary_slot_name = 'slot_b'
"""


def test_settings_acting_for_the_source_are_turned_off(repo: SqliteRepository) -> None:
    from zenith.postgres.export import DISABLED_MARKER, disabled_settings

    conf = [img(file_key("postgresql.conf"), pack_file_value("postgresql.conf", SOURCE_CONF)),
            img(file_key("postgresql.auto.conf"),
                pack_file_value("postgresql.auto.conf", AUTO_CONF)),
            img(file_key("conf.d/x.conf"),
                pack_file_value("conf.d/x.conf",
                                b"ARCHIVE_MODE=false\nprimary_conninfo = 'host=b'")),
            img(file_key("pg_hba.conf"),
                pack_file_value("pg_hba.conf", b"host archive_command all 0.0.0.0/0 trust\n")),
            # a slot's state: never carried over
            img(file_key("pg_replslot/s/state"), pack_file_value("pg_replslot/s/state", b"s"))]
    tid = build(repo, conf, checkpoint())
    assert disabled_settings(repo, tid, Lsn(0x2000)) == [
        "archive_mode", "archive_command", "primary_conninfo", "primary_slot_name",
        "restore_command", "synchronous_standby_names"]
    files = collect(export_entries(repo, tid, Lsn(0x2000)))
    marker = DISABLED_MARKER.encode()
    assert files["postgresql.conf"] == SOURCE_CONF.replace(
        b"archive_mode = on\n", marker + b"\n#archive_mode = on\n").replace(
        b"  archive_command=", marker + b"\n#  archive_command=").replace(
        b"primary_conninfo ", marker + b"\n#primary_conninfo ").replace(
        b"Restore_Command", marker + b"\n#Restore_Command")
    # auto.conf (rewritten by ALTER SYSTEM, which would drop comments): the lines go
    assert files["postgresql.auto.conf"] == b"# Do not edit this file manually!\nport = 5433\n"
    assert files["conf.d/x.conf"] == (b"ARCHIVE_MODE=false\n" + marker
                                      + b"\n#primary_conninfo = 'host=b'\n")
    assert files["pg_hba.conf"] == b"host archive_command all 0.0.0.0/0 trust\n"
    assert not any(p.startswith("pg_replslot/") for p in files) and files["pg_replslot"] is None

    kept = collect(export_entries(repo, tid, Lsn(0x2000), keep_config=True))
    assert kept["postgresql.conf"] == SOURCE_CONF
    assert kept["postgresql.auto.conf"] == AUTO_CONF
    assert not any(p.startswith("pg_replslot/") for p in kept)
