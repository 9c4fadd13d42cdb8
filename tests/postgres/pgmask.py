"""PostgreSQL 15's consistency-check masking, ported from its C for page comparisons.

With ``wal_consistency_checking`` a standby compares each page it replays with the page
image the primary logged, after masking what may legitimately differ (hint bits, LSNs,
free space, unlogged flags). The tests compare zenith's pages with the source's the same
way. Each ``mask_*`` / ``*_mask`` function below masks a page in place exactly as the C
function of the same name (src/backend/access/common/bufmask.c and each access method's
redo file); :func:`mask` dispatches on the access method name and returns a copy.
MASK_MARKER is 0, so masked bytes read as zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

BLCKSZ = 8192
PAGE_HEADER = 24  # SizeOfPageHeaderData

# Page header flags (bufpage.h) and per-AM special-space flags.
PD_HAS_FREE_LINES, PD_PAGE_FULL, PD_ALL_VISIBLE = 0x1, 0x2, 0x4
HEAP_XACT_MASK, HEAP_XMIN_FROZEN = 0xFFF0, 0x0300
HEAP_XMAX_COMMITTED, HEAP_XMAX_INVALID = 0x0400, 0x0800
SPEC_TOKEN_OFFSET = 0xFFFE  # SpecTokenOffsetNumber
BTP_LEAF, BTP_SPLIT_END, BTP_HAS_GARBAGE = 1 << 0, 1 << 5, 1 << 6
LH_PAGE_TYPE, LH_OVERFLOW_PAGE, LH_BUCKET_PAGE = 0x0F, 1 << 0, 1 << 1
LH_UNUSED_PAGE, LH_PAGE_HAS_DEAD_TUPLES = 0, 1 << 7
GIN_DELETED = 1 << 2
F_LEAF, F_FOLLOW_RIGHT, F_HAS_GARBAGE = 1 << 0, 1 << 3, 1 << 4
BRIN_PAGETYPE_META, BRIN_PAGETYPE_REGULAR, BRIN_EVACUATE_PAGE = 0xF091, 0xF093, 1 << 0


def u16(page: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from("<H", page, off)[0])


def _and_u16(page: bytearray, off: int, keep: int) -> None:
    struct.pack_into("<H", page, off, u16(page, off) & keep)


def page_is_new(page: bytes | bytearray) -> bool:
    return u16(page, 14) == 0  # PageIsNew: pd_upper == 0


def special(page: bytes | bytearray, size: int) -> int | None:
    """pd_special when a special space of ``size`` bytes fits there, else None."""
    pos = u16(page, 16)
    return pos if PAGE_HEADER <= pos <= BLCKSZ - size else None


def max_offset(page: bytes | bytearray) -> int:
    lower = u16(page, 12)
    return 0 if lower <= PAGE_HEADER else (lower - PAGE_HEADER) // 4


def item_id(page: bytes | bytearray, off: int) -> tuple[int, int, int]:
    """(lp_off, lp_flags, lp_len) of line pointer ``off`` (1-based)."""
    lp = int(struct.unpack_from("<I", page, PAGE_HEADER + 4 * (off - 1))[0])
    return lp & 0x7FFF, (lp >> 15) & 3, lp >> 17


# -- bufmask.c ------------------------------------------------------------------------

def mask_page_lsn_and_checksum(page: bytearray) -> None:
    page[0:10] = bytes(10)  # pd_lsn, pd_checksum


def mask_page_hint_bits(page: bytearray) -> None:
    page[20:24] = bytes(4)  # pd_prune_xid
    _and_u16(page, 10, ~(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE))


def mask_unused_space(page: bytearray) -> None:
    lower, upper, spec = struct.unpack_from("<HHH", page, 12)
    # The C raises on an insane header; leaving the hole unmasked lets the comparison
    # report the page instead.
    if PAGE_HEADER <= lower <= upper <= spec <= BLCKSZ:
        page[lower:upper] = bytes(upper - lower)


def mask_lp_flags(page: bytearray) -> None:
    for off in range(1, max_offset(page) + 1):
        pos = PAGE_HEADER + 4 * (off - 1)
        struct.pack_into("<I", page, pos, struct.unpack_from("<I", page, pos)[0] & ~(3 << 15))


def mask_page_content(page: bytearray) -> None:
    page[PAGE_HEADER:] = bytes(BLCKSZ - PAGE_HEADER)
    page[12:16] = bytes(4)  # pd_lower, pd_upper


# -- the access methods' rm_mask functions -------------------------------------------

def heap_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    for off in range(1, max_offset(page) + 1):
        pos, flags, length = item_id(page, off)
        if flags == 1 and pos + 24 <= BLCKSZ:  # LP_NORMAL: a tuple header
            infomask = u16(page, pos + 20)
            if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN:
                infomask &= ~HEAP_XACT_MASK
            else:
                infomask &= ~(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED)
            struct.pack_into("<H", page, pos + 20, infomask)
            page[pos + 8 : pos + 12] = bytes(4)  # t_cid
            if u16(page, pos + 16) == SPEC_TOKEN_OFFSET:  # speculative: ctid = self
                struct.pack_into("<HHH", page, pos + 12, blkno >> 16, blkno & 0xFFFF, off)
        if length:  # MAXALIGN padding after the item
            pad = (-length) % 8
            page[pos + length : pos + length + pad] = bytes(pad)


def btree_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    if (opaque := special(page, 16)) is None:
        return
    if u16(page, opaque + 12) & BTP_LEAF:  # LP_DEAD set by scans without WAL
        mask_lp_flags(page)
    _and_u16(page, opaque + 12, ~(BTP_HAS_GARBAGE | BTP_SPLIT_END))
    page[opaque + 14 : opaque + 16] = bytes(2)  # btpo_cycleid


def hash_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    if (opaque := special(page, 16)) is None:
        return
    pagetype = u16(page, opaque + 12) & LH_PAGE_TYPE
    if pagetype == LH_UNUSED_PAGE:
        mask_page_content(page)
    elif pagetype in (LH_BUCKET_PAGE, LH_OVERFLOW_PAGE):
        mask_lp_flags(page)
    _and_u16(page, opaque + 12, ~LH_PAGE_HAS_DEAD_TUPLES)


def gin_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    opaque = special(page, 8)
    if opaque is not None and u16(page, opaque + 6) & GIN_DELETED:
        mask_page_content(page)
    elif u16(page, 12) > PAGE_HEADER:
        mask_unused_space(page)


def gist_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    if (opaque := special(page, 16)) is None:
        return
    page[opaque : opaque + 8] = bytes(8)  # NSN
    flags = u16(page, opaque + 12) | F_FOLLOW_RIGHT  # GistMarkFollowRight
    struct.pack_into("<H", page, opaque + 12, flags)
    if flags & F_LEAF:
        mask_lp_flags(page)
    _and_u16(page, opaque + 12, ~F_HAS_GARBAGE)


def spg_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    if u16(page, 12) >= PAGE_HEADER:
        mask_unused_space(page)


def brin_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    if (opaque := special(page, 8)) is None:
        return
    pagetype = u16(page, opaque + 6)  # BrinSpecialSpace.vector[3]; flags are vector[2]
    if pagetype == BRIN_PAGETYPE_REGULAR or (
            pagetype == BRIN_PAGETYPE_META and u16(page, 12) > PAGE_HEADER):
        mask_unused_space(page)
    _and_u16(page, opaque + 4, ~BRIN_EVACUATE_PAGE)


def generic_mask(page: bytearray, blkno: int) -> None:
    mask_page_lsn_and_checksum(page)
    mask_unused_space(page)


seq_mask = generic_mask  # sequence.c's seq_mask does the same two steps


MASKS: dict[str, Callable[[bytearray, int], None]] = {
    "heap": heap_mask, "btree": btree_mask, "hash": hash_mask, "gin": gin_mask,
    "gist": gist_mask, "spgist": spg_mask, "brin": brin_mask, "bloom": generic_mask,
    "sequence": seq_mask,
}


def mask(raw: bytes, am: str, blkno: int = 0) -> bytes:
    """``raw`` masked as access method ``am`` (a key of :data:`MASKS`) masks it in redo.

    A new (all-zero header) page is returned with only its LSN and checksum masked: redo
    never masks one, and the AM masks would read garbage from it.
    """
    page = bytearray(raw)
    if page_is_new(page):
        mask_page_lsn_and_checksum(page)
    else:
        MASKS[am](page, blkno)
    return bytes(page)
