"""A tiny WAL *writer* for the decoder's unit tests: records and pages laid out as
PostgreSQL 15's XLogRecordAssemble and CopyXLogRecordToWAL would, so that page and
segment boundaries, continuation headers and padding can be put exactly where a test
wants them. The real-PostgreSQL tests check the decoder against pg_waldump instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from zenith.postgres.pg_constants import (
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_HAS_IMAGE,
    BKPBLOCK_SAME_REL,
    BKPIMAGE_COMPRESS_MASK,
    BKPIMAGE_HAS_HOLE,
    WAL_SEGMENT_SIZE,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT,
    XLR_BLOCK_ID_ORIGIN,
    XLR_BLOCK_ID_TOPLEVEL_XID,
    maxalign,
)
from zenith.postgres.waldecoder import record_crc

SYSID = 7_300_000_000_000_000_001


@dataclass
class Block:
    block_id: int
    rel: tuple[int, int, int] = (1663, 5, 16384)
    fork: int = 0
    blkno: int = 0
    data: bytes = b""
    image: bytes | None = None  # as stored (hole removed / compressed)
    bimg_info: int = 0
    hole_offset: int = 0
    hole_length: int = 0
    extra_flags: int = 0


@dataclass
class Rec:
    rmid: int = 0
    info: int = 0
    xid: int = 0
    main_data: bytes = b""
    blocks: list[Block] = field(default_factory=list)
    origin: int | None = None
    toplevel_xid: int | None = None

    def encode(self, prev: int = 0) -> bytes:
        hdr = bytearray()
        payload = bytearray()
        last_rel = None
        for b in self.blocks:
            flags = b.fork | b.extra_flags
            if b.data:
                flags |= BKPBLOCK_HAS_DATA
            if b.image is not None:
                flags |= BKPBLOCK_HAS_IMAGE
            same = b.rel == last_rel
            if same:
                flags |= BKPBLOCK_SAME_REL
            hdr += struct.pack("<BBH", b.block_id, flags, len(b.data))
            if b.image is not None:
                hdr += struct.pack("<HHB", len(b.image), b.hole_offset, b.bimg_info)
                if b.bimg_info & BKPIMAGE_COMPRESS_MASK and b.bimg_info & BKPIMAGE_HAS_HOLE:
                    hdr += struct.pack("<H", b.hole_length)
                payload += b.image
            if not same:
                hdr += struct.pack("<III", *b.rel)
            last_rel = b.rel
            hdr += struct.pack("<I", b.blkno)
            payload += b.data
        if self.origin is not None:
            hdr += struct.pack("<BH", XLR_BLOCK_ID_ORIGIN, self.origin)
        if self.toplevel_xid is not None:
            hdr += struct.pack("<BI", XLR_BLOCK_ID_TOPLEVEL_XID, self.toplevel_xid)
        if self.main_data:
            if len(self.main_data) < 256:
                hdr += struct.pack("<BB", XLR_BLOCK_ID_DATA_SHORT, len(self.main_data))
            else:
                hdr += struct.pack("<BI", XLR_BLOCK_ID_DATA_LONG, len(self.main_data))
        body = bytes(hdr + payload + self.main_data)
        return finish(self.rmid, self.info, self.xid, prev, body)


def finish(rmid: int, info: int, xid: int, prev: int, body: bytes) -> bytes:
    """An XLogRecord header + body with a correct xl_crc."""
    raw = bytearray(struct.pack("<IIQBBxxI", 24 + len(body), xid, prev, info, rmid, 0) + body)
    struct.pack_into("<I", raw, 20, record_crc(raw))
    return bytes(raw)


def page_header(pageaddr: int, info: int, rem_len: int, *, tli: int = 1,
                seg_size: int = WAL_SEGMENT_SIZE) -> bytes:
    hdr = struct.pack("<HHIQI", XLOG_PAGE_MAGIC, info, tli, pageaddr, rem_len) + bytes(4)
    if pageaddr % seg_size == 0:
        hdr = struct.pack("<HHIQI", XLOG_PAGE_MAGIC, info | XLP_LONG_HEADER, tli, pageaddr,
                          rem_len) + bytes(4) + struct.pack("<QII", SYSID, seg_size, XLOG_BLCKSZ)
    return hdr


def layout(start: int, recs: list[Rec], *, first_lsn: int | None = None,
           seg_size: int = WAL_SEGMENT_SIZE, prev: int = 0,
           ) -> tuple[bytes, list[int], list[int]]:
    """Lay ``recs`` out as WAL from the page boundary ``start``: records begin at
    ``first_lsn`` (default: right after the first page header), are MAXALIGNed, and are
    split across pages with continuation headers. Returns the bytes up to the end of the
    last record's page, the records' start LSNs and their end LSNs (EndRecPtr)."""
    assert start % XLOG_BLCKSZ == 0
    out = bytearray()
    lsn = start

    def emit_page_header(rem_len: int) -> None:
        nonlocal lsn
        info = XLP_FIRST_IS_CONTRECORD if rem_len else 0
        h = page_header(lsn, info, rem_len, seg_size=seg_size)
        out.extend(h)
        lsn += len(h)

    emit_page_header(0)
    if first_lsn is not None:
        assert first_lsn >= lsn
        out.extend(bytes(first_lsn - lsn))
        lsn = first_lsn
    starts: list[int] = []
    ends: list[int] = []
    for rec in recs:
        raw = rec.encode(prev)
        starts.append(lsn)
        prev = lsn
        i = 0
        while i < len(raw):
            if lsn % XLOG_BLCKSZ == 0:
                emit_page_header(len(raw) - i)
            n = min(len(raw) - i, XLOG_BLCKSZ - lsn % XLOG_BLCKSZ)
            out.extend(raw[i : i + n])
            i += n
            lsn += n
        pad = maxalign(lsn) - lsn
        out.extend(bytes(pad))
        lsn += pad
        ends.append(lsn)
        if lsn % XLOG_BLCKSZ == 0 and rec is not recs[-1]:
            emit_page_header(0)
    # Fill the last page with zeros, as PostgreSQL's buffers are.
    out.extend(bytes(-lsn % XLOG_BLCKSZ))
    return bytes(out), starts, ends
