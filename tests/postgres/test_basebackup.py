"""The base-backup tar reader and path classifier, without a server: Python's ``tarfile`` in
its three formats and headers built the way PostgreSQL's ``src/port/tar.c`` builds them are
the oracles; the real server's archives are read in ``test_replication.py``."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith.errors import InvalidArgument
from zenith.postgres.basebackup import (
    BLOCK_SIZE,
    EntryType,
    InvalidTar,
    RelationSegment,
    RelMapFile,
    Skipped,
    SlruKind,
    SlruSegment,
    SpecialFile,
    SpecialKind,
    TarPiece,
    TarReader,
    VersionFile,
    classify_path,
    data_dir_path,
)
from zenith.postgres.keys import ForkNumber, RelTag

LONG_DIR = "pg_tblspc/16385/PG_15_202209061/" + "d" * 90
LONG_NAME = f"{LONG_DIR}/{'f' * 120}"


@dataclass
class Member:
    type: EntryType
    size: int
    mode: int
    linkname: str | None
    data: bytearray = field(default_factory=bytearray)


def read_all(chunks: list[bytes], *, max_piece: int | None = None) -> dict[str, Member]:
    """Feed ``chunks`` and rebuild the members, checking how pieces follow each other."""
    reader = TarReader()
    members: dict[str, Member] = {}
    current: TarPiece | None = None
    for chunk in chunks:
        for piece in reader.feed(chunk):
            if max_piece is not None:
                assert len(piece.chunk) <= max_piece
            if piece.offset == 0:
                assert current is None or current.last, "a member began before the last ended"
                members[piece.path] = Member(piece.type, piece.size, piece.mode, piece.linkname)
            else:
                assert current is not None and current.path == piece.path
                assert piece.offset == current.offset + len(current.chunk)
            member = members[piece.path]
            member.data += piece.chunk
            assert piece.last == (piece.offset + len(piece.chunk) == piece.size)
            current = piece
    reader.close()
    assert current is None or current.last
    return members


def python_tar(fmt: int, files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for dirname in ("base", LONG_DIR):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pg_tblspc/16385")
        link.type, link.linkname = tarfile.SYMTYPE, "/srv/ts/" + "l" * (
            20 if fmt == tarfile.USTAR_FORMAT else 120)
        tar.addfile(link)
    return out.getvalue()


FILES = {
    "PG_VERSION": b"15\n",
    "base/1/1259": os.urandom(3 * 8192 + 17),
    "global/pg_filenode.map": bytes(512),
    "empty": b"",
    LONG_NAME: b"long name contents",
}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_python_tarfile_formats(fmt: int) -> None:
    files = dict(FILES)
    if fmt == tarfile.USTAR_FORMAT:  # the ustar prefix field holds 155 bytes, no more
        files.pop(LONG_NAME)
        files["pg_tblspc/16385/PG_15_202209061/" + "p" * 60 + "/" + "q" * 90] = b"prefixed"
    data = python_tar(fmt, files)
    members = read_all([data])
    for name, contents in files.items():
        assert members[name].type is EntryType.FILE
        assert bytes(members[name].data) == contents
        assert members[name].size == len(contents)
        assert members[name].mode == 0o600
    assert members["base"].type is EntryType.DIRECTORY
    link = members["pg_tblspc/16385"]
    assert link.type is EntryType.SYMLINK
    assert link.linkname == "/srv/ts/" + "l" * (20 if fmt == tarfile.USTAR_FORMAT else 120)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40),
       st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_any_split_of_the_stream_reads_the_same(cuts: list[int], fmt: int) -> None:
    data = python_tar(fmt, FILES)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(data[pos:pos + size])
        pos += size
    chunks.append(data[pos:])
    members = read_all(chunks, max_piece=max([*cuts, len(data) - pos]))
    assert {k: bytes(v.data) for k, v in members.items() if v.type is EntryType.FILE} == FILES


def pg_header(name: str, size: int, *, typeflag: bytes = b"0", mode: int = 0o600,
              link: str = "") -> bytes:
    """A header as PostgreSQL's tarCreateHeader() writes it."""
    h = bytearray(BLOCK_SIZE)
    if typeflag in (b"5", b"2"):
        name += "/"  # directories and symlinks (to directories) get a trailing slash
    h[0:len(name)] = name.encode()
    h[100:108] = f"{mode:07o} ".encode()[:7] + b"\0"
    h[108:116] = b"0000764\0"
    h[116:124] = b"0000764\0"
    if size >= 8 ** 11:  # print_tar_number: base-256 beyond the octal digits
        h[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    else:
        h[124:136] = f"{size:011o} ".encode()
    h[136:148] = f"{1700000000:011o} ".encode()
    h[156:157] = typeflag
    h[157:157 + len(link)] = link.encode()
    h[257:265] = b"ustar\x0000"
    h[265:273] = b"postgres"
    h[297:305] = b"postgres"
    h[148:156] = b"        "
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def pg_member(name: str, data: bytes) -> bytes:
    return pg_header(name, len(data)) + data + bytes(-len(data) % BLOCK_SIZE)


def test_postgresql_style_archive_in_odd_chunks() -> None:
    block = os.urandom(8192)
    archive = b"".join([
        pg_header("base", 0, typeflag=b"5", mode=0o700),
        pg_header("base/5", 0, typeflag=b"5", mode=0o700),
        pg_member("base/5/16384", block * 3),
        pg_member("base/5/PG_VERSION", b"15\n"),
        pg_header("pg_tblspc/16385", 0, typeflag=b"2", mode=0o777, link="/srv/ts"),
        pg_member("backup_label", b"START WAL LOCATION: 0/2000028\n"),
        bytes(2 * BLOCK_SIZE),
    ])
    chunks = [archive[i:i + 777] for i in range(0, len(archive), 777)]
    members = read_all(chunks, max_piece=777)
    assert bytes(members["base/5/16384"].data) == block * 3
    assert members["base"].type is EntryType.DIRECTORY and members["base"].mode == 0o700
    assert members["pg_tblspc/16385"].type is EntryType.SYMLINK
    assert members["pg_tblspc/16385"].linkname == "/srv/ts"
    assert members["base/5/PG_VERSION"].data == b"15\n"


def test_big_file_streams_in_fed_pieces_and_base256_size() -> None:
    reader = TarReader()
    size = 8 ** 11 + 5  # needs the base-256 form
    pieces = reader.feed(pg_header("base/5/16384.1", size))
    assert pieces == []
    seen, chunk = 0, bytes(1 << 20)
    while seen < size:
        part = chunk[:size - seen]
        out = reader.feed(part)
        assert len(out) == 1 and out[0].size == size and out[0].offset == seen
        seen += len(part)
    assert out[0].last
    reader.feed(bytes(-size % BLOCK_SIZE) + bytes(1024))
    assert reader.at_end
    reader.close()


def test_unterminated_archive_is_accepted_between_members() -> None:
    members = read_all([pg_member("a", b"x")])
    assert bytes(members["a"].data) == b"x"


@pytest.mark.parametrize("cut", [100, BLOCK_SIZE, BLOCK_SIZE + 1, BLOCK_SIZE + 700])
def test_truncated_archive_is_an_error(cut: int) -> None:
    reader = TarReader()
    reader.feed(pg_member("base/1/1259", bytes(1000))[:cut])
    with pytest.raises(InvalidTar, match="truncated"):
        reader.close()


def test_corrupt_header_is_an_error() -> None:
    header = bytearray(pg_header("base/1/1259", 10))
    header[5] ^= 1
    with pytest.raises(InvalidTar, match="checksum"):
        TarReader().feed(bytes(header))
    with pytest.raises(InvalidTar, match="checksum"):
        TarReader().feed(b"this is not a tar archive".ljust(BLOCK_SIZE, b"!"))


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "base/../../x"])
def test_names_escaping_the_target_are_refused(name: str) -> None:
    with pytest.raises(InvalidTar, match="unsafe"):
        TarReader().feed(pg_member(name, b"x"))


def test_oversized_extended_header_is_refused_before_reading_it() -> None:
    header = bytearray(pg_header("././@LongLink", 50 << 20, typeflag=b"L"))
    with pytest.raises(InvalidTar, match="too large"):
        TarReader().feed(bytes(header))


def test_data_after_the_end_marker_is_refused() -> None:
    reader = TarReader()
    reader.feed(bytes(2 * BLOCK_SIZE) + bytes(5000))  # zero padding is fine
    with pytest.raises(InvalidTar, match="after the end"):
        reader.feed(pg_member("late", b"x"))


# ---------------------------------------------------------------------------------------
# classify_path


@pytest.mark.parametrize(("path", "expected"), [
    ("base/5/16384", RelationSegment("base/5/16384", 1663, 5, 16384, ForkNumber.MAIN, 0)),
    ("base/5/16384.3", RelationSegment("base/5/16384.3", 1663, 5, 16384, ForkNumber.MAIN, 3)),
    ("base/5/16384_fsm",
     RelationSegment("base/5/16384_fsm", 1663, 5, 16384, ForkNumber.FSM, 0)),
    ("base/5/16384_vm.1",
     RelationSegment("base/5/16384_vm.1", 1663, 5, 16384, ForkNumber.VISIBILITYMAP, 1)),
    ("base/5/16384_init",
     RelationSegment("base/5/16384_init", 1663, 5, 16384, ForkNumber.INIT, 0)),
    ("global/1262", RelationSegment("global/1262", 1664, 0, 1262, ForkNumber.MAIN, 0)),
    ("pg_tblspc/16385/PG_15_202209061/5/16390",
     RelationSegment("pg_tblspc/16385/PG_15_202209061/5/16390", 16385, 5, 16390,
                     ForkNumber.MAIN, 0)),
    ("./base/5/16384", RelationSegment("base/5/16384", 1663, 5, 16384, ForkNumber.MAIN, 0)),
    ("pg_xact/0000", SlruSegment("pg_xact/0000", SlruKind.XACT, 0)),
    ("pg_multixact/offsets/000A",
     SlruSegment("pg_multixact/offsets/000A", SlruKind.MULTIXACT_OFFSETS, 10)),
    ("pg_multixact/members/1A2B3",
     SlruSegment("pg_multixact/members/1A2B3", SlruKind.MULTIXACT_MEMBERS, 0x1A2B3)),
    ("pg_commit_ts/0001", SlruSegment("pg_commit_ts/0001", SlruKind.COMMIT_TS, 1)),
    ("global/pg_filenode.map", RelMapFile("global/pg_filenode.map", 1664, 0)),
    ("base/5/pg_filenode.map", RelMapFile("base/5/pg_filenode.map", 1663, 5)),
    ("pg_tblspc/16385/PG_15_202209061/7/pg_filenode.map",
     RelMapFile("pg_tblspc/16385/PG_15_202209061/7/pg_filenode.map", 16385, 7)),
    ("PG_VERSION", VersionFile("PG_VERSION")),
    ("base/5/PG_VERSION", VersionFile("base/5/PG_VERSION", 1663, 5)),
    ("global/pg_control", SpecialFile("global/pg_control", SpecialKind.CONTROL)),
    ("postgresql.conf", SpecialFile("postgresql.conf", SpecialKind.CONFIG)),
    ("postgresql.auto.conf", SpecialFile("postgresql.auto.conf", SpecialKind.CONFIG)),
    ("pg_hba.conf", SpecialFile("pg_hba.conf", SpecialKind.CONFIG)),
    ("pg_ident.conf", SpecialFile("pg_ident.conf", SpecialKind.CONFIG)),
    ("backup_label", SpecialFile("backup_label", SpecialKind.BACKUP_LABEL)),
    ("tablespace_map", SpecialFile("tablespace_map", SpecialKind.TABLESPACE_MAP)),
    ("pg_tblspc/16385", SpecialFile("pg_tblspc/16385", SpecialKind.TABLESPACE_LINK)),
    ("pg_twophase/000002E4", SpecialFile("pg_twophase/000002E4", SpecialKind.TWOPHASE)),
    ("pg_logical/replorigin_checkpoint",
     SpecialFile("pg_logical/replorigin_checkpoint", SpecialKind.OTHER)),
    ("base/5/notarelation", SpecialFile("base/5/notarelation", SpecialKind.OTHER)),
])
def test_classify_path(path: str, expected: object) -> None:
    assert classify_path(path) == expected


@pytest.mark.parametrize("path", [
    "pg_wal/000000010000000000000001", "pg_wal/archive_status/x.done",
    "postmaster.pid", "postmaster.opts", "base/5/pg_internal.init", "global/pg_internal.init",
    "base/5/t3_16384", "base/5/t3_16384_fsm", "base/pgsql_tmp/pgsql_tmp123.0",
    "pg_tblspc/16385/PG_15_202209061/pgsql_tmp/pgsql_tmp1.1", "pg_replslot/s/state",
    "pg_stat_tmp/global.stat", "pg_subtrans/0000", "pg_notify/0000", "pg_serial/0000",
    "pg_snapshots/00000003-00000002-1", "pg_dynshmem/mmap.1", "postgresql.auto.conf.tmp",
    "backup_manifest", "standby.signal", "recovery.signal", "current_logfiles",
    "pg_stat/pgstat.stat",
])
def test_classify_skipped(path: str) -> None:
    kind = classify_path(path)
    assert isinstance(kind, Skipped) and kind.reason


def test_relation_segment_tag_and_bad_paths() -> None:
    seg = classify_path("base/5/16384_vm")
    assert isinstance(seg, RelationSegment)
    assert seg.rel == RelTag(1663, 5, 16384, ForkNumber.VISIBILITYMAP)
    assert isinstance(classify_path("base/5/99999999999"), SpecialFile)  # beyond 32 bits
    assert isinstance(classify_path("base/5/0"), SpecialFile)  # InvalidOid
    for bad in ("", "/", "../x", "/etc/passwd"):
        with pytest.raises(InvalidArgument):
            classify_path(bad)


def test_data_dir_path() -> None:
    assert data_dir_path(None, "./base/1/1259") == "base/1/1259"
    assert data_dir_path(16385, "PG_15_202209061/5/16390") == \
        "pg_tblspc/16385/PG_15_202209061/5/16390"
    with pytest.raises(InvalidArgument):
        data_dir_path(None, "../x")
