"""Unit tests of the WAL decoder on WAL laid out by hand (tests/postgres/walbuild.py):
page and segment boundaries, continuation pages, starting positions, chunking, errors,
block references and image decompression. test_waldecoder_pg.py checks real WAL."""

from __future__ import annotations

import importlib.util
import random
import struct

import pytest
import zstandard

from tests.postgres.walbuild import SYSID, Block, Rec, layout, page_header
from zenith.errors import FeatureNotSupported, InvalidArgument
from zenith.lsn import Lsn
from zenith.postgres.pg_constants import (
    BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY,
    BKPIMAGE_COMPRESS_LZ4,
    BKPIMAGE_COMPRESS_PGLZ,
    BKPIMAGE_COMPRESS_ZSTD,
    BKPIMAGE_HAS_HOLE,
    BLCKSZ,
    WAL_SEGMENT_SIZE,
    XLOG_BLCKSZ,
    XLOG_OVERWRITE_CONTRECORD,
    XLOG_SWITCH,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
    RmgrId,
)
from zenith.postgres.waldecoder import (
    BlockImage,
    DecodedRecord,
    ImageCompression,
    RelFileNode,
    WalCrcError,
    WalDecodeError,
    WalStreamDecoder,
    pglz_decompress,
    record_crc,
)

SEG = WAL_SEGMENT_SIZE
BASE = 3 * SEG  # the start of segment 000000010000000000000003


def decode(start: int, data: bytes, chunk_sizes: list[int] | None = None,
           ) -> tuple[list[DecodedRecord], WalStreamDecoder]:
    dec = WalStreamDecoder(Lsn(start))
    out: list[DecodedRecord] = []
    if chunk_sizes is None:
        dec.feed(data)
        out.extend(dec)
        return out, dec
    pos = 0
    i = 0
    while pos < len(data):
        n = chunk_sizes[i % len(chunk_sizes)]
        dec.feed(data[pos : pos + n])
        pos += n
        i += 1
        out.extend(dec)
    return out, dec


def heap_rec(i: int, size: int = 0) -> Rec:
    return Rec(rmid=RmgrId.HEAP, info=0x00, xid=700 + i,
               main_data=bytes([i % 251]) * (size or (i * 7 + 3)),
               blocks=[Block(0, blkno=i, data=b"tuple-%d" % i)])


def test_records_in_one_page_decode_alike_in_any_chunking() -> None:
    recs = [heap_rec(i) for i in range(25)]
    data, starts, ends = layout(BASE, recs)
    whole, dec = decode(BASE, data)
    assert [r.lsn for r in whole] == starts
    assert [r.end_lsn for r in whole] == ends
    assert [r.xid for r in whole] == [700 + i for i in range(25)]
    assert [r.main_data for r in whole] == [rec.main_data for rec in recs]
    assert [r.prev for r in whole[1:]] == starts[:-1]
    assert whole[3].blocks[0].data == b"tuple-3" and whole[3].blocks[0].blkno == 3
    assert whole[0].rmgr_name == "Heap"
    assert dec.system_identifier == SYSID and dec.timeline == 1
    assert dec.last_record_end == ends[-1]
    rng = random.Random(5)
    for _ in range(10):
        sizes = [rng.randint(1, 3000) for _ in range(50)]
        assert decode(BASE, data, sizes)[0] == whole
    assert decode(BASE, data, [1])[0] == whole


def test_record_split_across_pages() -> None:
    recs = [heap_rec(1), heap_rec(2, size=20000), heap_rec(3)]
    data, starts, ends = layout(BASE, recs)
    got, _ = decode(BASE, data)
    assert [r.lsn for r in got] == starts
    assert got[1].main_data == recs[1].main_data
    assert got[1].end_lsn // XLOG_BLCKSZ == starts[1] // XLOG_BLCKSZ + 2  # three pages
    assert [r.end_lsn for r in got] == ends
    for sizes in ([7], [8192], [8191, 2], [24, 16, 8]):
        assert decode(BASE, data, sizes)[0] == got


def test_record_header_split_across_page_boundary() -> None:
    # Only xl_tot_len and xl_xid fit on the first page; the rest continues.
    first = BASE + XLOG_BLCKSZ - 8
    data, starts, _ = layout(BASE, [heap_rec(1), heap_rec(2)], first_lsn=first)
    assert starts[0] == first
    got, _ = decode(first, data[first - BASE :])  # START_REPLICATION from a record
    assert [r.lsn for r in got] == starts
    assert got[0].main_data == heap_rec(1).main_data
    assert decode(first, data[first - BASE :], [3])[0] == got


def test_record_split_across_segment_boundary() -> None:
    start = BASE + SEG - 2 * XLOG_BLCKSZ
    recs = [heap_rec(1), heap_rec(2, size=3 * XLOG_BLCKSZ), heap_rec(3)]
    data, starts, ends = layout(start, recs)
    got, dec = decode(start, data)
    assert [r.lsn for r in got] == starts
    assert got[1].lsn < BASE + SEG < got[1].end_lsn
    assert got[1].main_data == recs[1].main_data
    assert [r.end_lsn for r in got] == ends
    assert dec.system_identifier == SYSID  # from the long header of the new segment
    assert decode(start, data, [5000])[0] == got


def test_start_at_a_page_that_continues_a_record_skips_it() -> None:
    recs = [heap_rec(1), heap_rec(2, size=20000), heap_rec(3), heap_rec(4)]
    data, starts, _ = layout(BASE, recs)
    for page in (1, 2):  # the continuation fills page 1 entirely, and part of page 2
        at = BASE + page * XLOG_BLCKSZ
        got, _ = decode(at, data[at - BASE :])
        assert [r.lsn for r in got] == starts[2:]
        assert got[0].prev == starts[1]


def test_crc_mismatch_is_detected() -> None:
    data, starts, _ = layout(BASE, [heap_rec(1), heap_rec(2)])
    bad = bytearray(data)
    bad[starts[1] - BASE + 30] ^= 0x01
    dec = WalStreamDecoder(BASE)
    dec.feed(bad)
    assert dec.poll() is not None
    with pytest.raises(WalCrcError, match=str(Lsn(starts[1]))):
        dec.poll()


def test_bad_page_headers_are_errors() -> None:
    data, _, _ = layout(BASE, [heap_rec(1), heap_rec(2, size=9000)])
    bad = bytearray(data)
    bad[XLOG_BLCKSZ] = 0x11  # magic of the second page
    with pytest.raises(WalDecodeError, match="magic"):
        decode(BASE, bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, XLOG_BLCKSZ + 8, BASE + 5 * XLOG_BLCKSZ)  # recycled page
    with pytest.raises(WalDecodeError, match="unexpected pageaddr"):
        decode(BASE, bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, XLOG_BLCKSZ + 2, 0)  # continuation flag lost
    with pytest.raises(WalDecodeError, match="no contrecord flag"):
        decode(BASE, bytes(bad))
    with pytest.raises(WalDecodeError, match="unexpected pageaddr"):
        decode(BASE + SEG, data)  # bytes fed at the wrong position


def test_broken_prev_link_is_an_error() -> None:
    data, starts, _ = layout(BASE, [heap_rec(1), heap_rec(2)])
    bad = bytearray(data)
    at = starts[1] - BASE
    (tot_len,) = struct.unpack_from("<I", bad, at)
    struct.pack_into("<Q", bad, at + 8, starts[0] + 8)
    struct.pack_into("<I", bad, at + 20, record_crc(bad[at : at + tot_len]))
    with pytest.raises(WalDecodeError, match="xl_prev"):
        decode(BASE, bytes(bad))


def test_end_of_wal_is_where_zeros_begin() -> None:
    data, starts, ends = layout(BASE, [heap_rec(1), heap_rec(2)])
    data += bytes(3 * XLOG_BLCKSZ)  # the unwritten rest of a segment file
    got, dec = decode(BASE, data)
    assert [r.lsn for r in got] == starts
    assert dec.end_of_wal and dec.poll() is None
    assert dec.last_record_end == ends[-1]
    # A record begun on the last written page whose continuation page was never written.
    data, starts, _ = layout(BASE, [heap_rec(1), heap_rec(2, size=9000)])
    got, dec = decode(BASE, data[:XLOG_BLCKSZ] + bytes(XLOG_BLCKSZ))
    assert [r.lsn for r in got] == starts[:1] and dec.end_of_wal


def test_switch_record_skips_the_rest_of_the_segment() -> None:
    switch = Rec(rmid=RmgrId.XLOG, info=XLOG_SWITCH)
    data, starts, _ = layout(BASE, [heap_rec(1), switch])
    filler = bytes([0xAB]) * (SEG - len(data))  # whatever follows is never looked at
    nxt, nstarts, _ = layout(BASE + SEG, [heap_rec(2)], prev=starts[1])
    stream = data + filler + nxt
    got, _ = decode(BASE, stream)
    assert [r.lsn for r in got] == starts + nstarts
    assert got[1].end_lsn == BASE + SEG
    assert nstarts[0] == BASE + SEG + 40  # after the long page header
    assert decode(BASE, stream, [1 << 20])[0] == got


def test_overwrite_contrecord_voids_the_partial_record() -> None:
    # The writer crashed while writing record 2; after restart, the next page begins
    # with XLP_FIRST_IS_OVERWRITE_CONTRECORD and an OVERWRITE_CONTRECORD record.
    data, starts, _ = layout(BASE, [heap_rec(1), heap_rec(2, size=9000)])
    overwrite = Rec(rmid=RmgrId.XLOG, info=XLOG_OVERWRITE_CONTRECORD,
                    main_data=struct.pack("<Qq", starts[1], 0))
    raw = overwrite.encode(prev=starts[0])
    page2 = page_header(BASE + XLOG_BLCKSZ, XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0) + raw
    page2 += bytes(XLOG_BLCKSZ - len(page2))
    got, _ = decode(BASE, data[:XLOG_BLCKSZ] + page2)
    assert [r.lsn for r in got] == [starts[0], BASE + XLOG_BLCKSZ + 24]
    assert got[1].rmgr_info == XLOG_OVERWRITE_CONTRECORD


def _page(hole: tuple[int, int] | None = None) -> bytes:
    rng = random.Random(1)
    page = bytearray(rng.randbytes(BLCKSZ))
    struct.pack_into("<QHHHHHHI", page, 0, 0x1_0000_0028, 0, 0, 100, 8000, 8192, 8196, 0)
    if hole:
        page[hole[0] : hole[0] + hole[1]] = bytes(hole[1])
    return bytes(page)


def _pglz_literals(raw: bytes) -> bytes:
    # A valid (if useless) pglz stream: every item a literal, so every control byte 0.
    out = bytearray()
    for i in range(0, len(raw), 8):
        out.append(0)
        out += raw[i : i + 8]
    return bytes(out)


def test_block_references_and_images() -> None:
    page = _page(hole=(100, 7900))
    stored = page[:100] + page[8000:]
    rec = Rec(
        rmid=RmgrId.HEAP2, info=0x50, xid=900, main_data=b"m" * 300,
        blocks=[
            Block(0, rel=(1663, 5, 16384), blkno=7, data=b"abc"),
            Block(1, rel=(1663, 5, 16384), blkno=8, image=stored, hole_offset=100,
                  bimg_info=BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY),
            Block(3, rel=(1664, 0, 1262), fork=2, blkno=0, extra_flags=BKPBLOCK_WILL_INIT,
                  image=page, bimg_info=0),
        ],
        origin=7, toplevel_xid=1234,
    )
    data, _, _ = layout(BASE, [rec])
    (got,), _ = decode(BASE, data)
    assert got.origin == 7 and got.toplevel_xid == 1234
    assert got.main_data == b"m" * 300  # XLR_BLOCK_ID_DATA_LONG
    b0, b1, b3 = got.blocks
    assert (b0.block_id, b0.rlocator, b0.forknum, b0.blkno) == (0, RelFileNode(1663, 5, 16384),
                                                                  0, 7)
    assert b0.has_data and not b0.has_image and b0.data == b"abc" and b0.image is None
    assert b1.rlocator == b0.rlocator and b1.has_image and not b1.has_data
    assert b1.image is not None and b1.image.apply and b1.image.has_hole
    assert (b1.image.hole_offset, b1.image.hole_length) == (100, 7900)
    assert b1.page_image() == page
    assert b3.block_id == 3 and b3.will_init and b3.forknum == 2 and b3.rel_tag.forknum == 2
    assert b3.image is not None and not b3.image.apply and b3.page_image() == page
    assert got.fpi_len == len(stored) + BLCKSZ
    assert got.block(3) is b3 and got.block(2) is None
    with pytest.raises(InvalidArgument):
        b0.page_image()


@pytest.mark.parametrize("method", list(ImageCompression)[1:])
def test_compressed_images(method: ImageCompression) -> None:
    page = _page(hole=(100, 7900))
    raw = page[:100] + page[8000:]
    info = BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY | method.value
    if method == ImageCompression.ZSTD:
        image = BlockImage(info, 100, 7900, zstandard.ZstdCompressor().compress(raw))
    elif method == ImageCompression.PGLZ:
        image = BlockImage(info, 100, 7900, _pglz_literals(raw))
    elif importlib.util.find_spec("lz4") is not None:  # pragma: no cover - optional
        lz4_block = importlib.import_module("lz4.block")
        image = BlockImage(info, 100, 7900, lz4_block.compress(raw, store_size=False))
    else:
        image = BlockImage(info, 100, 7900, b"\x00" * 40)
        with pytest.raises(FeatureNotSupported, match="lz4"):
            image.page()
        return
    assert image.compression == method
    assert image.page() == page
    # Compressed, no hole: the hole length field is absent.
    whole = BlockImage(BKPIMAGE_COMPRESS_ZSTD, 0, 0, zstandard.ZstdCompressor().compress(page))
    assert whole.page() == page
    short = BlockImage(BKPIMAGE_COMPRESS_ZSTD, 0, 0, zstandard.ZstdCompressor().compress(raw))
    with pytest.raises(WalDecodeError):
        short.page()


def test_pglz_back_references() -> None:
    # ctrl 0b1000: three literals, then a tag: length 10 (7 + 3), offset 3 (overlapping).
    assert pglz_decompress(b"\x08abc\x07\x03", 13) == b"abcabcabcabca"
    # A length of 18 takes an extension byte: 18 + 100 copies of the previous byte.
    assert pglz_decompress(b"\x02x\x0f\x01\x64", 119) == b"x" * 119
    # A 12-bit offset, 300 back (after 38 full groups of literals).
    raw = bytes(range(256)) + bytes(range(48))
    comp = _pglz_literals(raw) + b"\x01" + bytes([0x10, 300 & 0xFF])  # length 3
    assert pglz_decompress(comp, 307) == raw + raw[4:7]
    # Output stops at rawsize even inside a match, as pg_lzcompress does.
    assert pglz_decompress(b"\x08abc\x07\x03", 13) == b"abcabcabcabca"
    for bad, size in [
        (b"\x01\x00\x00", 3),  # offset 0
        (b"\x02a\x00\x05", 4),  # offset beyond the output
        (b"\x08abc\x07\x03junk", 13),  # input left over
        (b"\x00abc", 4),  # output too short
        (b"\x08abc\x07", 13),  # truncated tag
    ]:
        with pytest.raises(WalDecodeError):
            pglz_decompress(bad, size)


def test_pglz_image_with_bimg_flags() -> None:
    page = _page()
    image = BlockImage(BKPIMAGE_COMPRESS_PGLZ, 0, 0, _pglz_literals(page))
    assert image.page() == page
    assert BlockImage(BKPIMAGE_COMPRESS_LZ4, 0, 0, b"").compression == ImageCompression.LZ4


def test_start_lsn_must_be_a_boundary() -> None:
    for bad in (BASE + 4, BASE + 8, BASE + XLOG_BLCKSZ + 16):
        with pytest.raises(InvalidArgument):
            WalStreamDecoder(bad)
    WalStreamDecoder(BASE + 40)
    WalStreamDecoder(BASE + XLOG_BLCKSZ + 24)


def test_corrupted_wal_yields_good_records_then_a_clean_error() -> None:
    # Whatever bytes are damaged, the decoder returns only records that were written
    # (the CRC sees to that), then raises WalDecodeError, reports the end of WAL or waits
    # for more input; never an IndexError, struct.error or a bogus record.
    recs = [heap_rec(i, size=(0 if i % 3 else 5000)) for i in range(12)]
    data, _, _ = layout(BASE, recs)
    good, _ = decode(BASE, data)
    rng = random.Random(11)
    outcomes = set()
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        dec = WalStreamDecoder(BASE)
        got: list[DecodedRecord] = []
        try:
            pos = 0
            while pos < len(bad):
                n = rng.randint(1, 9000)
                dec.feed(bad[pos : pos + n])
                pos += n
                got.extend(dec)
            outcomes.add("end" if dec.end_of_wal else "waiting")
        except WalDecodeError:
            outcomes.add("error")
        assert got == good[: len(got)]
    assert "error" in outcomes
