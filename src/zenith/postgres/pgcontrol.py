"""What an export writes itself so that the stock ``postgres`` starts on it: data checksums,
``global/pg_control`` and a WAL segment holding one shutdown checkpoint.

An export is a copy of the database at an arbitrary LSN, not a copy of a cluster that was
shut down. PostgreSQL starts without recovery only from a control file saying
``DB_SHUTDOWNED`` whose checkpoint record it can read back from ``pg_wal``; that is what
``pg_resetwal`` makes. We write the same two things here (rather than run ``pg_resetwal``,
which would have to run as the ``postgres`` user on the machine holding the directory), so
that an export is a plain stream of files a pageserver can send anywhere:

* :func:`control_file`: the base backup's ``pg_control`` (so every compile-time and
  configuration field stays the source's), with the checkpoint, state and backup fields
  replaced, its CRC32C recomputed;
* :func:`wal_segment_head`: the first page of a fresh WAL segment: a long page header and
  an ``XLOG_CHECKPOINT_SHUTDOWN`` record (redo = its own LSN), CRC32C-protected as
  ``XLogRecordAssemble`` does; the rest of the segment is zeros;
* :func:`shutdown_checkpoint` puts them on the source's timeline + 1, and
  :func:`timeline_history` writes that timeline's ``pg_wal/<TLI>.history``.

The layouts are PostgreSQL 15's (``catalog/pg_control.h``, ``access/xlog_internal.h``,
``access/xlogrecord.h``) on a 64-bit little-endian machine: offsets checked against the
headers with ``offsetof``.

:func:`set_checksums` recomputes data checksums (``storage/checksum_impl.h``): ingest
rewrites pd_lsn in every page image, so stored checksums are stale. Python has no SIMD, so
the 32 parallel FNV-1a-like sums of many pages are packed into one big integer, 64 bits a
lane: XOR, multiply by the 24-bit prime and shift act on every lane at once, and masking
each lane to 32 bits after the multiply and the shift keeps lanes from bleeding.
"""

from __future__ import annotations

import struct
import time
from array import array
from dataclasses import dataclass, replace
from typing import Final

import google_crc32c

from zenith.errors import InvalidState
from zenith.postgres import pg_constants as pgc
from zenith.postgres.walrecord import CheckPoint, parse_checkpoint

BLCKSZ: Final = 8192
XLOG_BLCKSZ: Final = 8192
PG_CONTROL_FILE_SIZE: Final = 8192
DB_SHUTDOWNED: Final = 1
LONG_PAGE_HEADER_SIZE: Final = 40
_CRC_OFFSET: Final = 288
_STATE_OFFSET: Final = 16
_CHECKPOINT_OFFSET: Final = 32
_CHECKPOINT_COPY_OFFSET: Final = 40
_TRACK_COMMIT_TS_OFFSET: Final = 200
_UNLOGGED_LSN_OFFSET: Final = 128
_MIN_RECOVERY_OFFSET: Final = 136  # minRecoveryPoint u64, minRecoveryPointTLI u32 (+4 pad),
# backupStartPoint u64, backupEndPoint u64, backupEndRequired bool (+3 pad): up to 172
_MIN_RECOVERY_END: Final = 172
_CATALOG_VERSION_OFFSET: Final = 12
_XLOG_SEG_SIZE_OFFSET: Final = 228
_CHECKSUM_VERSION_OFFSET: Final = 252
_FIRST_NORMAL_UNLOGGED_LSN: Final = 1000
_CHECKPOINT: Final = struct.Struct("<QII?7xQIIIIIII4xqIII4x")
_LONG_PAGE_HEADER: Final = struct.Struct("<HHIQI4xQII")
_RECORD_HEADER: Final = struct.Struct("<IIQBB2xI")
_XLR_BLOCK_ID_DATA_SHORT: Final = 255
_RM_XLOG_ID: Final = 0
_XLOG_CHECKPOINT_SHUTDOWN: Final = 0x00


@dataclass(frozen=True, slots=True)
class ControlInfo:
    """The fields of the source's ``pg_control`` an export needs."""

    system_identifier: int
    catalog_version_no: int
    wal_segment_size: int
    data_checksum_version: int


def parse_control(data: bytes) -> ControlInfo:
    """Check the CRC of a ``pg_control`` and read what the export needs from it."""
    if len(data) < _CRC_OFFSET + 4:
        raise InvalidState(f"pg_control is {len(data)} bytes: too short")
    (crc,) = struct.unpack_from("<I", data, _CRC_OFFSET)
    if crc != google_crc32c.value(data[:_CRC_OFFSET]):
        raise InvalidState("the stored pg_control fails its CRC check")
    (sysid,) = struct.unpack_from("<Q", data, 0)
    (catver,) = struct.unpack_from("<I", data, _CATALOG_VERSION_OFFSET)
    (segsize,) = struct.unpack_from("<I", data, _XLOG_SEG_SIZE_OFFSET)
    (checksums,) = struct.unpack_from("<I", data, _CHECKSUM_VERSION_OFFSET)
    return ControlInfo(sysid, catver, segsize, checksums)


def checkpoint_copy(control: bytes) -> CheckPoint:
    """``checkPointCopy``: the checkpoint a ``pg_control`` last recorded."""
    return parse_checkpoint(control[_CHECKPOINT_COPY_OFFSET:_CHECKPOINT_COPY_OFFSET + 88])


def tracks_commit_timestamps(control: bytes) -> bool:
    """``track_commit_timestamp`` as a ``pg_control`` records it."""
    return len(control) > _TRACK_COMMIT_TS_OFFSET and control[_TRACK_COMMIT_TS_OFFSET] != 0


def pack_checkpoint(cp: CheckPoint) -> bytes:
    return _CHECKPOINT.pack(
        cp.redo, cp.this_timeline_id, cp.prev_timeline_id, cp.full_page_writes, cp.next_xid,
        cp.next_oid, cp.next_multi, cp.next_multi_offset, cp.oldest_xid, cp.oldest_xid_db,
        cp.oldest_multi, cp.oldest_multi_db, cp.time, cp.oldest_commit_ts_xid,
        cp.newest_commit_ts_xid, cp.oldest_active_xid,
    )


def shutdown_checkpoint(cp: CheckPoint, redo: int) -> CheckPoint:
    """``cp`` (a checkpoint of the source) as the shutdown checkpoint of a fresh WAL at
    ``redo`` on the next timeline: ``ThisTimeLineID`` the source's + 1, ``PrevTimeLineID``
    the source's, as after a standby's promotion. The copy's WAL then never has the name
    of a segment of the source, even when both archive to the same place."""
    return replace(
        cp, redo=type(cp.redo)(redo), this_timeline_id=cp.this_timeline_id + 1,
        prev_timeline_id=cp.this_timeline_id, time=int(time.time()),
        oldest_active_xid=cp.next_xid & 0xFFFFFFFF,
    )


def history_file_name(timeline: int) -> str:
    """``TLHistoryFileName``: ``pg_wal/<TLI as 8 hex digits>.history``."""
    return f"{timeline:08X}.history"


def timeline_history(parent: int, switchpoint: int, reason: str) -> bytes:
    """The history file of timeline ``parent + 1`` as ``writeTimeLineHistory`` writes it,
    without the parent's own history (not stored): ``parent<TAB>switchpoint<TAB>reason``.
    ``switchpoint`` is where the parent's WAL stops being part of the new timeline's
    history: a promoted standby writes the end of the last record it replayed."""
    return f"{parent}\t{switchpoint >> 32:X}/{switchpoint & 0xFFFFFFFF:X}\t{reason}\n".encode()


def control_file(source: bytes, cp: CheckPoint) -> bytes:
    """The source's ``pg_control`` turned into that of a cluster shut down cleanly at
    checkpoint ``cp`` (whose record is at ``cp.redo``): no recovery, no backup to finish."""
    parse_control(source)
    buf = bytearray(source[:PG_CONTROL_FILE_SIZE].ljust(PG_CONTROL_FILE_SIZE, b"\0"))
    struct.pack_into("<I", buf, _STATE_OFFSET, DB_SHUTDOWNED)
    struct.pack_into("<qQ", buf, 24, int(time.time()), cp.redo)
    buf[_CHECKPOINT_COPY_OFFSET : _CHECKPOINT_COPY_OFFSET + _CHECKPOINT.size] = pack_checkpoint(
        cp
    )
    (unlogged,) = struct.unpack_from("<Q", buf, _UNLOGGED_LSN_OFFSET)
    struct.pack_into("<Q", buf, _UNLOGGED_LSN_OFFSET, max(unlogged, _FIRST_NORMAL_UNLOGGED_LSN))
    buf[_MIN_RECOVERY_OFFSET:_MIN_RECOVERY_END] = bytes(_MIN_RECOVERY_END - _MIN_RECOVERY_OFFSET)
    struct.pack_into("<I", buf, _CRC_OFFSET, google_crc32c.value(bytes(buf[:_CRC_OFFSET])))
    return bytes(buf)


def wal_file_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def wal_segment_head(cp: CheckPoint, system_identifier: int, segment_size: int) -> bytes:
    """The first WAL page of the segment starting at ``cp.redo - long page header``:
    the long page header and the shutdown checkpoint record (``pg_resetwal``'s
    ``WriteEmptyXLOG``). ``xl_prev`` is 0: nothing precedes it."""
    seg_start = cp.redo - _LONG_PAGE_HEADER.size
    if seg_start % segment_size:
        raise InvalidState("the checkpoint must be the first record of its segment")
    page = bytearray(XLOG_BLCKSZ)
    _LONG_PAGE_HEADER.pack_into(
        page, 0, pgc.XLOG_PAGE_MAGIC, pgc.XLP_LONG_HEADER, cp.this_timeline_id, seg_start, 0,
        system_identifier, segment_size, len(page),
    )
    body = pack_checkpoint(cp)
    payload = bytes([_XLR_BLOCK_ID_DATA_SHORT, len(body)]) + body
    total = _RECORD_HEADER.size + len(payload)
    head = _RECORD_HEADER.pack(total, 0, 0, _XLOG_CHECKPOINT_SHUTDOWN, _RM_XLOG_ID, 0)
    crc = google_crc32c.value(payload + head[: _RECORD_HEADER.size - 4])
    record = _RECORD_HEADER.pack(total, 0, 0, _XLOG_CHECKPOINT_SHUTDOWN, _RM_XLOG_ID, crc)
    start = _LONG_PAGE_HEADER.size
    page[start : start + total] = record + payload
    return bytes(page)


# -- data checksums (storage/checksum_impl.h) --------------------------------------------

_N_SUMS: Final = 32
_FNV_PRIME: Final = 16777619
_BASE_OFFSETS: Final = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
    0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
    0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
    0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)
_ROW: Final = _N_SUMS * 4  # bytes of one round: 32 uint32
_ROUNDS: Final = BLCKSZ // _ROW
_BASE_EVEN: Final = array("Q", _BASE_OFFSETS[0::2]).tobytes()
_BASE_ODD: Final = array("Q", _BASE_OFFSETS[1::2]).tobytes()
_PD_CHECKSUM: Final = 8


def _mix(sums: int, mask: int) -> int:
    """CHECKSUM_COMP on every lane (``sums`` already XORed with the round's values)."""
    return ((sums * _FNV_PRIME) & mask) ^ (sums >> 17 & mask)


def page_checksums(pages: list[bytes], blknos: list[int]) -> list[int]:
    """``pg_checksum_page`` of each page (its pd_checksum field is ignored), computed for
    all pages at once. A round's 32 words of every page, read as one integer, hold the
    even-numbered lanes in the low half of each 64-bit slot and the odd ones in the high
    half: two masks split them into two sets of 64-bit lanes without copying bytes."""
    n = len(pages)
    if n == 0:
        return []
    slots = n * _N_SUMS // 2
    mask = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * slots, "little")
    even = int.from_bytes(_BASE_EVEN * n, "little")
    odd = int.from_bytes(_BASE_ODD * n, "little")
    # Round 0 reads the page header, with pd_checksum taken as zero.
    first = b"".join([p[:_PD_CHECKSUM] + b"\0\0" + p[_PD_CHECKSUM + 2 : _ROW] for p in pages])
    for i in range(_ROUNDS):
        rows = first if i == 0 else b"".join([p[i * _ROW : (i + 1) * _ROW] for p in pages])
        x = int.from_bytes(rows, "little")
        even = _mix(even ^ (x & mask), mask)
        odd = _mix(odd ^ (x >> 32 & mask), mask)
    for _ in range(2):  # two rounds of zeros
        even, odd = _mix(even, mask), _mix(odd, mask)
    # XOR the 32 lanes of each page together: pair them, then fold halves onto each other.
    sums = even ^ odd
    shift = _N_SUMS * 64 // 4
    while shift >= 64:
        sums ^= sums >> shift
        shift //= 2
    words = array("Q", (sums & mask).to_bytes(slots * 8, "little"))[:: _N_SUMS // 2]
    return [((w ^ blk) & 0xFFFFFFFF) % 65535 + 1 for w, blk in zip(words, blknos, strict=True)]


def set_checksums(chunk: bytearray, first_blkno: int) -> None:
    """Write the data checksum into every initialized page of ``chunk`` (whole pages of one
    relation fork starting at block ``first_blkno``); new (all-zero-header) pages have
    none, as PostgreSQL leaves them."""
    idx = [i for i in range(len(chunk) // BLCKSZ)
           if chunk[i * BLCKSZ + 14 : i * BLCKSZ + 16] != b"\0\0"]  # pd_upper != 0
    pages = [bytes(chunk[i * BLCKSZ : (i + 1) * BLCKSZ]) for i in idx]
    for i, csum in zip(idx, page_checksums(pages, [first_blkno + i for i in idx]), strict=True):
        struct.pack_into("<H", chunk, i * BLCKSZ + _PD_CHECKSUM, csum)
