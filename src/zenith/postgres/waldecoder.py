"""Turn a stream of PostgreSQL 15 WAL bytes into decoded records, without doing any I/O.

The pageserver receives WAL from START_REPLICATION (or reads it from segment files in
tests) as arbitrary chunks of the byte stream. :class:`WalStreamDecoder` is fed those
chunks and hands back one :class:`DecodedRecord` at a time, the way PostgreSQL's
``xlogreader.c`` does: it strips the page headers that interrupt the stream every 8 KiB
(long ones at 16 MiB segment starts), reassembles records split across pages and
segments, checks each record's CRC32C and ``xl_prev`` link, and splits the record into
its block references (with their full-page images) and main data. Images can be turned
back into the 8 KiB page with :meth:`BlockRef.page_image`, which undoes pglz/zstd (and lz4
when the ``lz4`` package is present) compression and re-inserts the hole.

What the records *mean* is not decided here: :mod:`zenith.postgres.walrecord` parses the
main data of the kinds ingest needs. Layouts are PostgreSQL 15's (``access/xlogrecord.h``,
``access/xlog_internal.h``, ``access/xlogreader.c``'s DecodeXLogRecord).
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import google_crc32c
import zstandard

from zenith.errors import FeatureNotSupported, InvalidArgument, ZenithError
from zenith.lsn import Lsn
from zenith.postgres import pg_constants as pgc
from zenith.postgres.keys import RelTag
from zenith.postgres.pg_constants import BLCKSZ, XLOG_BLCKSZ, RmgrId, maxalign, rmgr_name

# PostgreSQL refuses records above about 1 GB (MaxAllocSize in xlogreader); a larger
# xl_tot_len is garbage, and must not make us wait for (or allocate) that much input.
MAX_RECORD_LEN: Final = 0x3FFFFFFF

_PAGE_HEADER = struct.Struct("<HHIQI")  # xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, rem_len
_LONG_PAGE_TAIL = struct.Struct("<QII")  # xlp_sysid, xlp_seg_size, xlp_xlog_blcksz
_RECORD_HEADER = struct.Struct("<IIQBBxxI")  # tot_len, xid, prev, info, rmid, pad, crc
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_IMAGE_HEADER = struct.Struct("<HHB")  # length, hole_offset, bimg_info
_RELFILENODE = struct.Struct("<III")
_BLOCK_HEAD = struct.Struct("<BH")  # fork_flags, data_length
_IMAGE_HOLE = struct.Struct("<HHBH")  # an image header followed by its hole length
_COMPRESSIONS: frozenset[int] = frozenset()  # set below, once ImageCompression exists


def _as_lsn(value: int) -> Lsn:
    """``value`` as an :class:`Lsn` without re-validating it (the decoder's positions are
    non-negative and far below 2^64): the hot path builds several per record."""
    return int.__new__(Lsn, value)


class WalDecodeError(ZenithError):
    """WAL that cannot be PostgreSQL 15's: bad page header, broken record, CRC mismatch."""

    sqlstate = "XX001"  # data_corrupted


class WalCrcError(WalDecodeError):
    """A record whose CRC32C does not match its contents."""


class ImageCompression(IntEnum):
    NONE = 0
    PGLZ = pgc.BKPIMAGE_COMPRESS_PGLZ
    LZ4 = pgc.BKPIMAGE_COMPRESS_LZ4
    ZSTD = pgc.BKPIMAGE_COMPRESS_ZSTD


_COMPRESSIONS = frozenset(m.value for m in ImageCompression)


@dataclass(frozen=True, slots=True, order=True)
class RelFileNode:
    """PostgreSQL 15's RelFileNode: tablespace, database and relation file number."""

    spcnode: int
    dbnode: int
    relnode: int

    def __str__(self) -> str:
        return f"{self.spcnode}/{self.dbnode}/{self.relnode}"

    def tag(self, forknum: int) -> RelTag:
        return RelTag(self.spcnode, self.dbnode, self.relnode, forknum)


@dataclass(frozen=True, slots=True)
class BlockImage:
    """A full-page image as stored in the record: hole removed, possibly compressed."""

    bimg_info: int
    hole_offset: int
    hole_length: int
    data: bytes

    @property
    def has_hole(self) -> bool:
        return bool(self.bimg_info & pgc.BKPIMAGE_HAS_HOLE)

    @property
    def apply(self) -> bool:
        """Whether redo restores the image; unset for images logged only so that
        ``wal_consistency_checking`` can verify the page (they are just as complete)."""
        return bool(self.bimg_info & pgc.BKPIMAGE_APPLY)

    @property
    def compression(self) -> ImageCompression:
        return ImageCompression(self.bimg_info & pgc.BKPIMAGE_COMPRESS_MASK)

    def page(self) -> bytes:
        """The whole BLCKSZ page: decompressed, hole re-inserted as zeros."""
        expected = BLCKSZ - self.hole_length
        method = self.compression
        if method == ImageCompression.NONE:
            raw = self.data
        elif method == ImageCompression.PGLZ:
            raw = pglz_decompress(self.data, expected)
        elif method == ImageCompression.ZSTD:
            try:
                raw = zstandard.ZstdDecompressor().decompress(
                    self.data, max_output_size=expected
                )
            except zstandard.ZstdError as exc:
                raise WalDecodeError(f"zstd-compressed page image is corrupt: {exc}") from exc
        else:
            raw = _lz4_decompress(self.data, expected)
        if len(raw) != expected:
            raise WalDecodeError(
                f"page image decompresses to {len(raw)} bytes, expected {expected} "
                f"(hole of {self.hole_length} bytes)"
            )
        if not self.hole_length:
            return bytes(raw)
        return b"".join(
            (raw[: self.hole_offset], bytes(self.hole_length), raw[self.hole_offset :])
        )


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block reference of a record (``blkref #N`` in pg_waldump)."""

    block_id: int
    rlocator: RelFileNode
    forknum: int
    blkno: int
    flags: int  # BKPBLOCK_* bits of the fork_flags byte
    image: BlockImage | None = None
    data: bytes = b""

    @property
    def has_image(self) -> bool:
        return bool(self.flags & pgc.BKPBLOCK_HAS_IMAGE)

    @property
    def has_data(self) -> bool:
        return bool(self.flags & pgc.BKPBLOCK_HAS_DATA)

    @property
    def will_init(self) -> bool:
        return bool(self.flags & pgc.BKPBLOCK_WILL_INIT)

    @property
    def rel_tag(self) -> RelTag:
        return self.rlocator.tag(self.forknum)

    def page_image(self) -> bytes:
        """The full 8 KiB page the image carries (see :meth:`BlockImage.page`).

        Its pd_lsn is the page's LSN from *before* the record: whoever stores it as the
        page at this record sets pd_lsn to the record's ``end_lsn``."""
        if self.image is None:
            raise InvalidArgument(f"block reference #{self.block_id} carries no page image")
        return self.image.page()


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """One WAL record, as pg_waldump shows it."""

    lsn: Lsn  # where the record starts (ReadRecPtr)
    end_lsn: Lsn  # EndRecPtr: MAXALIGNed end; a page changed by the record gets this LSN
    xid: int
    rmid: int
    info: int  # the whole xl_info byte
    prev: Lsn
    total_len: int
    main_data: bytes
    blocks: list[BlockRef] = field(default_factory=list)
    origin: int | None = None
    toplevel_xid: int | None = None

    @property
    def rmgr_name(self) -> str:
        return rmgr_name(self.rmid)

    @property
    def rmgr_info(self) -> int:
        """The resource manager's part of xl_info (the record kind)."""
        return self.info & pgc.XLR_RMGR_INFO_MASK

    @property
    def fpi_len(self) -> int:
        """Bytes of page images; pg_waldump's "rec" length is ``total_len - fpi_len``."""
        return sum(len(b.image.data) for b in self.blocks if b.image is not None)

    def block(self, block_id: int) -> BlockRef | None:
        for b in self.blocks:
            if b.block_id == block_id:
                return b
        return None


# -- page images -----------------------------------------------------------------------


def pglz_decompress(source: bytes, rawsize: int) -> bytes:
    """Decompress PostgreSQL's pglz format (common/pg_lzcompress.c), requiring exactly
    ``rawsize`` output bytes and all input consumed, as xlogreader does for images.

    Each control byte governs the next 8 items, least significant bit first: a clear bit
    is one literal byte, a set bit a 2-byte tag (length-3 in the low nibble of the first
    byte, 12-bit back offset from its high nibble and the second byte; a length of 18
    takes one more byte to add). A match may overlap its own output, repeating it.
    """
    out = bytearray()
    sp = 0
    srcend = len(source)
    while sp < srcend and len(out) < rawsize:
        ctrl = source[sp]
        sp += 1
        if not ctrl and sp + 8 <= srcend and len(out) + 8 <= rawsize:
            # Eight literals in a row (incompressible data): one slice.
            out += source[sp : sp + 8]
            sp += 8
            continue
        for _ in range(8):
            if sp >= srcend or len(out) >= rawsize:
                break
            if ctrl & 1:
                if sp + 2 > srcend:
                    raise WalDecodeError("pglz data is truncated inside a match tag")
                first = source[sp]
                off = ((first & 0xF0) << 4) | source[sp + 1]
                length = (first & 0x0F) + 3
                sp += 2
                if length == 18:
                    if sp >= srcend:
                        raise WalDecodeError("pglz data is truncated inside a match tag")
                    length += source[sp]
                    sp += 1
                if off == 0 or off > len(out):
                    raise WalDecodeError(f"pglz match offset {off} is outside the output")
                length = min(length, rawsize - len(out))
                start = len(out) - off
                if off >= length:
                    out += out[start : start + length]
                else:
                    # Overlapping copy: the last `off` bytes repeat.
                    pattern = bytes(out[start:])
                    out += (pattern * (length // off + 1))[:length]
            else:
                out.append(source[sp])
                sp += 1
            ctrl >>= 1
    if len(out) != rawsize or sp != srcend:
        raise WalDecodeError(
            f"pglz data decompresses to {len(out)} of {rawsize} bytes "
            f"using {sp} of {srcend} input bytes"
        )
    return bytes(out)


def _lz4_decompress(data: bytes, rawsize: int) -> bytes:
    # PostgreSQL stores LZ4_compress_default() output: an lz4 *block*, not a frame.
    try:
        lz4_block: Any = importlib.import_module("lz4.block")
    except ImportError as exc:
        raise FeatureNotSupported(
            "page image is lz4-compressed, but the 'lz4' Python package is not installed",
            hint="install lz4, or set wal_compression to pglz or zstd on the source",
        ) from exc
    try:
        return bytes(lz4_block.decompress(data, uncompressed_size=rawsize))
    except Exception as exc:  # lz4 raises LZ4BlockError (a RuntimeError) on bad input
        raise WalDecodeError(f"lz4-compressed page image is corrupt: {exc}") from exc


# -- one record ------------------------------------------------------------------------


def record_crc(raw: bytes | bytearray | memoryview) -> int:
    """CRC32C of a record as PostgreSQL computes xl_crc: the bytes after the header
    first, then the header up to (not including) xl_crc."""
    crc = google_crc32c.value(bytes(raw[pgc.SIZE_OF_XLOG_RECORD:]))
    return int(google_crc32c.extend(crc, bytes(raw[:pgc.XL_CRC_OFFSET])))


def decode_record(
    raw: bytes,
    lsn: Lsn | int,
    end_lsn: Lsn | int | None = None,
    *,
    segment_size: int = pgc.WAL_SEGMENT_SIZE,
) -> DecodedRecord:
    """Decode one complete record (``xl_tot_len`` bytes) that starts at ``lsn``.

    ``end_lsn`` defaults to the MAXALIGNed end, which is right unless the record was
    split across pages (the stream decoder passes it). Raises :class:`WalCrcError` on a
    CRC mismatch and :class:`WalDecodeError` on a malformed record."""
    lsn = Lsn(lsn)
    if len(raw) < pgc.SIZE_OF_XLOG_RECORD:
        raise WalDecodeError(f"record at {lsn} is shorter than its header ({len(raw)} bytes)")
    if end_lsn is None:
        end_lsn = lsn + maxalign(len(raw))
    return _decode(bytes(raw), int(lsn), int(Lsn(end_lsn)), segment_size)


def _decode(raw: bytes, lsn: int, end_lsn: int, segment_size: int) -> DecodedRecord:
    """:func:`decode_record` for positions the caller already checked."""
    tot_len, xid, prev, info, rmid, crc = _RECORD_HEADER.unpack_from(raw, 0)
    if tot_len != len(raw):
        raise WalDecodeError(f"record at {Lsn(lsn)} says {tot_len} bytes but has {len(raw)}")
    actual = google_crc32c.extend(google_crc32c.value(raw[_HDR:]), raw[:_CRC_AT])
    if actual != crc:
        raise WalCrcError(
            f"incorrect resource manager data checksum in record at {Lsn(lsn)}: "
            f"xl_crc is {crc:08X}, the record's CRC32C is {actual:08X}"
        )
    if rmid == RmgrId.XLOG and info & pgc.XLR_RMGR_INFO_MASK == pgc.XLOG_SWITCH:
        # As xlogreader: a switch record "extends" to the end of its segment.
        end_lsn = -(-end_lsn // segment_size) * segment_size
    return _decode_body(raw, _as_lsn(lsn), _as_lsn(end_lsn), xid, _as_lsn(prev), info, rmid)


_HDR: Final = pgc.SIZE_OF_XLOG_RECORD
_CRC_AT: Final = pgc.XL_CRC_OFFSET
_MAX_BLOCK_ID: Final = pgc.XLR_MAX_BLOCK_ID
_HAS_DATA: Final = pgc.BKPBLOCK_HAS_DATA
_HAS_IMAGE: Final = pgc.BKPBLOCK_HAS_IMAGE
_SAME_REL: Final = pgc.BKPBLOCK_SAME_REL
_COMPRESS_MASK: Final = pgc.BKPIMAGE_COMPRESS_MASK
_IMAGE_HAS_HOLE: Final = pgc.BKPIMAGE_HAS_HOLE
#: RelFileNodes seen lately: a stream names the same few relations over and over, and a
#: frozen dataclass costs more to build than to look up.
_RELS: dict[bytes, RelFileNode] = {}
_RELS_MAX: Final = 4096


def _relfilenode(raw: bytes, at: int) -> RelFileNode:
    packed = raw[at : at + 12]
    rel = _RELS.get(packed)
    if rel is None:
        if len(packed) != 12:
            raise IndexError("relfilenode past the end of the record")
        if len(_RELS) >= _RELS_MAX:
            _RELS.clear()
        rel = _RELS[packed] = RelFileNode(*_RELFILENODE.unpack(packed))
    return rel


def _bad(lsn: Lsn, why: str) -> WalDecodeError:
    return WalDecodeError(f"invalid record at {lsn}: {why}")


def _decode_body(
    raw: bytes, lsn: Lsn, end_lsn: Lsn, xid: int, prev: Lsn, info: int, rmid: int
) -> DecodedRecord:
    total = len(raw)
    ptr = _HDR
    datatotal = 0  # bytes of block data, images and main data announced by the headers
    main_len = 0
    origin: int | None = None
    toplevel_xid: int | None = None
    # (block_id, fork_flags, data_len, image header or None, rlocator, blkno)
    headers: list[tuple[int, int, int, tuple[int, int, int, int] | None, RelFileNode, int]] = []
    last_rel: RelFileNode | None = None
    last_id = -1
    try:
        while total - ptr > datatotal:
            block_id = raw[ptr]
            ptr += 1
            if block_id > _MAX_BLOCK_ID:
                if block_id == pgc.XLR_BLOCK_ID_DATA_SHORT:
                    main_len = raw[ptr]
                    ptr += 1
                    datatotal += main_len
                    break
                if block_id == pgc.XLR_BLOCK_ID_DATA_LONG:
                    (main_len,) = _U32.unpack_from(raw, ptr)
                    ptr += 4
                    datatotal += main_len
                    break
                if block_id == pgc.XLR_BLOCK_ID_ORIGIN:
                    (origin,) = _U16.unpack_from(raw, ptr)
                    ptr += 2
                    continue
                if block_id == pgc.XLR_BLOCK_ID_TOPLEVEL_XID:
                    (toplevel_xid,) = _U32.unpack_from(raw, ptr)
                    ptr += 4
                    continue
                raise _bad(lsn, f"invalid block_id {block_id}")
            if block_id <= last_id:
                raise _bad(lsn, f"out-of-order block_id {block_id}")
            last_id = block_id
            fork_flags, data_len = _BLOCK_HEAD.unpack_from(raw, ptr)
            ptr += 3
            if bool(fork_flags & _HAS_DATA) != (data_len > 0):
                raise _bad(lsn, f"block {block_id}: BKPBLOCK_HAS_DATA="
                                f"{bool(fork_flags & _HAS_DATA)}, length {data_len}")
            datatotal += data_len
            image_hdr: tuple[int, int, int, int] | None = None
            if fork_flags & _HAS_IMAGE:
                bimg_len, hole_offset, bimg_info = _IMAGE_HEADER.unpack_from(raw, ptr)
                ptr += 5
                if bimg_info & _COMPRESS_MASK:
                    hole_length = 0
                    if bimg_info & _IMAGE_HAS_HOLE:
                        (hole_length,) = _U16.unpack_from(raw, ptr)
                        ptr += 2
                else:
                    hole_length = BLCKSZ - bimg_len
                if not (bimg_info & _IMAGE_HAS_HOLE and hole_offset > 0 and hole_length > 0
                        and bimg_len != BLCKSZ and not bimg_info & _COMPRESS_MASK):
                    # Not the usual image (uncompressed, with a hole, which passes): check.
                    _check_image(lsn, block_id, bimg_len, hole_offset, hole_length, bimg_info)
                datatotal += bimg_len
                image_hdr = (bimg_len, hole_offset, hole_length, bimg_info)
            if fork_flags & _SAME_REL:
                if last_rel is None:
                    raise _bad(lsn, f"block {block_id}: BKPBLOCK_SAME_REL without a "
                                    "previous rel")
                rel = last_rel
            else:
                rel = last_rel = _relfilenode(raw, ptr)
                ptr += 12
            (blkno,) = _U32.unpack_from(raw, ptr)
            ptr += 4
            headers.append((block_id, fork_flags, data_len, image_hdr, rel, blkno))
    except (struct.error, IndexError) as exc:
        raise _bad(lsn, "block headers run past the end of the record") from exc
    if total - ptr != datatotal:
        raise _bad(lsn, f"headers announce {datatotal} payload bytes but {total - ptr} remain")

    blocks: list[BlockRef] = []
    for block_id, fork_flags, data_len, image_hdr, rel, blkno in headers:
        image = None
        if image_hdr is not None:
            bimg_len, hole_offset, hole_length, bimg_info = image_hdr
            image = BlockImage(bimg_info, hole_offset, hole_length, raw[ptr : ptr + bimg_len])
            ptr += bimg_len
        if data_len:
            data = raw[ptr : ptr + data_len]
            ptr += data_len
        else:
            data = b""
        blocks.append(BlockRef(block_id, rel, fork_flags & 0x0F, blkno, fork_flags & 0xF0,
                               image, data))
    return DecodedRecord(lsn, end_lsn, xid, rmid, info, prev, total,
                         raw[ptr : ptr + main_len], blocks, origin, toplevel_xid)


def _check_image(
    lsn: Lsn, block_id: int, bimg_len: int, hole_offset: int, hole_length: int, bimg_info: int
) -> None:
    # The same cross-checks as DecodeXLogRecord: they catch garbage that the CRC cannot
    # (a record written by a different PostgreSQL version, say).
    has_hole = bool(bimg_info & pgc.BKPIMAGE_HAS_HOLE)
    compressed = bool(bimg_info & pgc.BKPIMAGE_COMPRESS_MASK)
    why = None
    if has_hole and (hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ):
        why = (f"BKPIMAGE_HAS_HOLE with offset {hole_offset}, length {hole_length}, "
               f"image length {bimg_len}")
    elif not has_hole and (hole_offset != 0 or hole_length != 0):
        why = f"hole offset {hole_offset} length {hole_length} without BKPIMAGE_HAS_HOLE"
    elif compressed and bimg_len == BLCKSZ:
        why = "compressed image of a whole block"
    elif not has_hole and not compressed and bimg_len != BLCKSZ:
        why = f"uncompressed image without hole of {bimg_len} bytes"
    elif bimg_info & pgc.BKPIMAGE_COMPRESS_MASK not in _COMPRESSIONS:
        why = f"several compression methods in bimg_info {bimg_info:#x}"
    if why is not None:
        raise _bad(lsn, f"block {block_id}: {why}")


# -- the stream ------------------------------------------------------------------------


class WalStreamDecoder:
    """Sans-I/O decoder of a WAL byte stream: :meth:`feed` bytes, :meth:`poll` records.

    ``start_lsn`` is the LSN of the first byte fed. It is either a record boundary (as
    START_REPLICATION delivers: possibly in the middle of a page) or the start of a page
    or segment; in the latter case a record continued from the previous page is skipped,
    and decoding begins with the first record that starts on the page.

    The end of the WAL written so far shows as zeros where the next record's length or
    page header should be (the rest of a segment file): :attr:`end_of_wal` becomes true
    and :meth:`poll` returns ``None`` from then on. Anything else that cannot be WAL raises
    :class:`WalDecodeError`; after an error the decoder must not be used further.
    """

    def __init__(self, start_lsn: Lsn | int, *, segment_size: int = pgc.WAL_SEGMENT_SIZE):
        start = Lsn(start_lsn)
        offset = start % XLOG_BLCKSZ
        if start % 8 or 0 < offset < pgc.SIZE_OF_XLOG_SHORT_PHD:
            raise InvalidArgument(
                f"WAL decoding cannot start at {start}: not a record or page boundary"
            )
        if segment_size % XLOG_BLCKSZ or segment_size & (segment_size - 1):
            raise InvalidArgument(f"invalid WAL segment size {segment_size}")
        self._segment_size = segment_size
        self._lsn = int(start)  # LSN of self._buf[self._pos] (a plain int: hot path)
        self._buf = bytearray()
        self._pos = 0
        # At a page start we may be in the middle of a record: skip its continuation.
        self._skip_contrecord = offset == 0
        self._skip_to: int | None = None  # discard input up to here (padding, after SWITCH)
        self._rec_start: int | None = None  # record being assembled
        self._rec_len = 0
        self._rec_parts: list[bytes] = []
        self._rec_have = 0
        self._rec_checked = False
        self._last_lsn: int | None = None  # start of the last record returned
        self._last_end = start
        self._end_of_wal = False
        self.system_identifier: int | None = None
        self.timeline: int | None = None

    @property
    def end_of_wal(self) -> bool:
        return self._end_of_wal

    @property
    def last_record_end(self) -> Lsn:
        """``end_lsn`` of the last record returned (``start_lsn`` before the first): where
        decoding of the next record resumes."""
        return self._last_end

    @property
    def fed_lsn(self) -> Lsn:
        """The LSN just after the last byte fed."""
        return Lsn(self._lsn + (len(self._buf) - self._pos))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def __iter__(self) -> Iterator[DecodedRecord]:
        """The records decodable from what was fed so far."""
        while (record := self.poll()) is not None:
            yield record

    def poll(self) -> DecodedRecord | None:
        """The next complete record, or ``None`` if more input is needed (or the WAL
        ended)."""
        while not self._end_of_wal and self._pos < len(self._buf):
            if self._skip_to is not None:
                n = min(self._skip_to - self._lsn, len(self._buf) - self._pos)
                self._consume(n)
                if self._lsn == self._skip_to:
                    self._skip_to = None
                continue
            if self._lsn % XLOG_BLCKSZ == 0:
                if not self._read_page_header():
                    return None
                continue
            if self._rec_start is None and not self._begin_record():
                return None
            record = self._continue_record()
            if record is not None:
                return record
        return None

    # -- internals ---------------------------------------------------------------------

    def _consume(self, n: int) -> None:
        self._pos += n
        self._lsn += n

    def _read_page_header(self) -> bool:
        page = self._lsn
        at = _as_lsn(page)  # for messages
        avail = len(self._buf) - self._pos
        if avail < pgc.SIZE_OF_XLOG_SHORT_PHD:
            return False
        magic, info, tli, pageaddr, rem_len = _PAGE_HEADER.unpack_from(self._buf, self._pos)
        if magic == 0 and info == 0 and pageaddr == 0:
            # A page never written: the WAL ends here (a record begun on the previous
            # page was never completed, and is dropped as PostgreSQL's recovery does).
            self._end_of_wal = True
            return False
        if magic != pgc.XLOG_PAGE_MAGIC:
            raise WalDecodeError(
                f"invalid magic number {magic:04X} in WAL page at {at} "
                f"(PostgreSQL 15 writes {pgc.XLOG_PAGE_MAGIC:04X})"
            )
        if info & ~pgc.XLP_ALL_FLAGS:
            raise WalDecodeError(f"invalid info bits {info:04X} in WAL page at {at}")
        if pageaddr != page:
            raise WalDecodeError(
                f"unexpected pageaddr {Lsn(pageaddr)} in WAL page at {at} "
                "(a recycled segment, or input fed at the wrong position)"
            )
        seg_start = page % self._segment_size == 0
        if bool(info & pgc.XLP_LONG_HEADER) != seg_start:
            raise WalDecodeError(
                f"WAL page at {at} has {'a long' if not seg_start else 'no long'} header"
            )
        header_size = pgc.SIZE_OF_XLOG_SHORT_PHD
        if seg_start:
            header_size = pgc.SIZE_OF_XLOG_LONG_PHD
            if avail < header_size:
                return False
            sysid, seg_size, blcksz = _LONG_PAGE_TAIL.unpack_from(
                self._buf, self._pos + pgc.SIZE_OF_XLOG_SHORT_PHD
            )
            if seg_size != self._segment_size or blcksz != XLOG_BLCKSZ:
                raise WalDecodeError(
                    f"WAL segment at {at} has segment size {seg_size} and page size "
                    f"{blcksz}; expected {self._segment_size} and {XLOG_BLCKSZ}"
                )
            if self.system_identifier is not None and sysid != self.system_identifier:
                raise WalDecodeError(
                    f"WAL segment at {at} is from system {sysid}, "
                    f"not {self.system_identifier}"
                )
            self.system_identifier = sysid
        data_start = page + header_size

        if self._rec_start is not None:
            if info & pgc.XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                # The writer crashed mid-record and, on restart, wrote an
                # OVERWRITE_CONTRECORD record here instead: the partial record is void.
                self._drop_partial_record()
            elif not info & pgc.XLP_FIRST_IS_CONTRECORD:
                raise WalDecodeError(
                    f"record at {Lsn(self._rec_start)} continues, but WAL page at {at} "
                    "has no contrecord flag"
                )
            elif rem_len != self._rec_len - self._rec_have:
                raise WalDecodeError(
                    f"invalid contrecord length {rem_len} (expected "
                    f"{self._rec_len - self._rec_have}) in WAL page at {at}"
                )
        elif self._skip_contrecord:
            if info & pgc.XLP_FIRST_IS_CONTRECORD and rem_len:
                if rem_len > XLOG_BLCKSZ - header_size:
                    self._skip_to = page + XLOG_BLCKSZ  # and again on the next page
                else:
                    self._skip_to = maxalign(data_start + rem_len)
                    self._skip_contrecord = False
            else:
                self._skip_contrecord = False
        elif info & pgc.XLP_FIRST_IS_CONTRECORD:
            raise WalDecodeError(
                f"WAL page at {at} continues a record, but the previous record ended at "
                f"{self._last_end}"
            )
        self.timeline = tli
        self._consume(header_size)
        if self._skip_to is not None and self._skip_to <= self._lsn:
            self._skip_to = None
        return True

    def _check_header(self, start: int, head: bytes) -> None:
        _tot_len, _xid, prev, _info, rmid, _crc = _RECORD_HEADER.unpack_from(head)
        if self._last_lsn is not None and prev != self._last_lsn:
            raise WalDecodeError(
                f"record at {Lsn(start)} has xl_prev {Lsn(prev)}, expected "
                f"{Lsn(self._last_lsn)}"
            )
        if rmid not in pgc.RMGR_NAMES and rmid < pgc.RM_MIN_CUSTOM_ID:
            raise WalDecodeError(f"invalid resource manager ID {rmid} at {Lsn(start)}")

    def _drop_partial_record(self) -> None:
        self._rec_start = None
        self._rec_parts = []
        self._rec_have = self._rec_len = 0

    def _begin_record(self) -> bool:
        if len(self._buf) - self._pos < 4:
            return False
        # The length comes first and records are 8-aligned, so it never straddles pages.
        (tot_len,) = _U32.unpack_from(self._buf, self._pos)
        if tot_len == 0:
            self._end_of_wal = True
            return False
        if tot_len < pgc.SIZE_OF_XLOG_RECORD or tot_len > MAX_RECORD_LEN:
            raise WalDecodeError(f"invalid record length at {Lsn(self._lsn)}: {tot_len}")
        self._rec_start = self._lsn
        self._rec_len = tot_len
        self._rec_have = 0
        self._rec_parts = []
        self._rec_checked = False
        return True

    def _continue_record(self) -> DecodedRecord | None:
        pos, lsn = self._pos, self._lsn
        page_left = XLOG_BLCKSZ - lsn % XLOG_BLCKSZ
        n = min(self._rec_len - self._rec_have, page_left, len(self._buf) - pos)
        with memoryview(self._buf) as view:  # one copy (a bytearray slice makes two)
            part = bytes(view[pos : pos + n])
        self._rec_parts.append(part)
        self._rec_have += n
        self._pos = pos + n
        self._lsn = lsn = lsn + n
        start = self._rec_start
        assert start is not None
        if not self._rec_checked and self._rec_have >= pgc.SIZE_OF_XLOG_RECORD:
            # Validate the header as soon as it is complete, as xlogreader does: garbage
            # must not make us wait for (or gather) a bogus xl_tot_len of input.
            self._check_header(start, b"".join(self._rec_parts))
            self._rec_checked = True
        if self._rec_have < self._rec_len:
            return None
        raw = self._rec_parts[0] if len(self._rec_parts) == 1 else b"".join(self._rec_parts)
        self._drop_partial_record()
        record = _decode(raw, start, maxalign(lsn), self._segment_size)
        self._last_lsn = start
        self._last_end = end = record.end_lsn
        if end > lsn:
            self._skip_to = int(end)  # alignment padding, or the rest of the segment
        return record
