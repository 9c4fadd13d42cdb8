"""Delta types of the PostgreSQL layer: the few page changes WAL carries without an image.

With ``wal_consistency_checking = all`` nearly every page change arrives as a full-page
image, so these are the exceptions DESIGN §7 lists -- small read-modify-write changes whose
result depends on the page they apply to, and which therefore cannot be images:

* ``VM_CLEAR`` (2): AND masks on bytes of a visibility-map page (heap insert/update/delete/
  lock clear a heap block's bits; a truncation clears the bits beyond the new end). An
  absent VM page reads as zeros, so it stays absent.
* ``CLOG_SET`` (3): set 2-bit transaction statuses in a pg_xact page (other transactions'
  bits in the same byte must survive). An absent page starts as zeros.
* ``SLRU_PATCH`` (4): overwrite byte ranges of an 8 KiB SLRU page (multixact offsets and
  members). Unlike storage's generic patch, an absent page starts as a whole zero page,
  as ``SimpleLruZeroPage`` leaves it.

Importing this module registers them; :mod:`zenith.postgres.walingest` imports it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from zenith.errors import InvalidArgument
from zenith.postgres.pg_constants import BLCKSZ
from zenith.storage import redo

VM_CLEAR: Final = 2
CLOG_SET: Final = 3
SLRU_PATCH: Final = 4

_MASK: Final = struct.Struct(">HB")
_STATUS: Final = struct.Struct(">HBB")
_RANGE: Final = struct.Struct(">HH")


def make_vm_clear(masks: Iterable[tuple[int, int]]) -> bytes:
    """``[(byte offset in the page, AND mask)]`` as a VM_CLEAR delta payload."""
    return bytes([VM_CLEAR]) + b"".join(_MASK.pack(off, mask & 0xFF) for off, mask in masks)


def make_clog_set(sets: Iterable[tuple[int, int, int]]) -> bytes:
    """``[(byte offset, bit shift, status)]`` as a CLOG_SET delta payload."""
    return bytes([CLOG_SET]) + b"".join(_STATUS.pack(o, s, st) for o, s, st in sets)


def make_slru_patch(changes: Iterable[tuple[int, bytes]]) -> bytes:
    """``[(byte offset, data)]`` as an SLRU_PATCH delta payload."""
    parts = [bytes([SLRU_PATCH])]
    for off, data in changes:
        if off < 0 or off + len(data) > BLCKSZ:
            raise InvalidArgument(f"SLRU patch at {off} is beyond the page")
        parts.append(_RANGE.pack(off, len(data)) + data)
    return b"".join(parts)


def _page(base: bytes | None) -> bytearray:
    if base is None:
        return bytearray(BLCKSZ)
    if len(base) != BLCKSZ:
        raise InvalidArgument(f"a page is {BLCKSZ} bytes, the base has {len(base)}")
    return bytearray(base)


def _vm_clear(base: bytes | None, body: bytes) -> bytes | None:
    if base is None:
        return None
    page = _page(base)
    if len(body) % _MASK.size:
        raise InvalidArgument("truncated VM_CLEAR delta")
    for off, mask in _MASK.iter_unpack(body):
        if off >= BLCKSZ:
            raise InvalidArgument(f"VM_CLEAR offset {off} is beyond the page")
        page[off] &= mask
    return bytes(page)


def _clog_set(base: bytes | None, body: bytes) -> bytes:
    page = _page(base)
    if len(body) % _STATUS.size:
        raise InvalidArgument("truncated CLOG_SET delta")
    for off, shift, status in _STATUS.iter_unpack(body):
        if off >= BLCKSZ or shift > 6:
            raise InvalidArgument(f"CLOG_SET position {off}/{shift} is beyond the page")
        page[off] = (page[off] & ~(0x03 << shift) & 0xFF) | ((status & 0x03) << shift)
    return bytes(page)


def _slru_patch(base: bytes | None, body: bytes) -> bytes:
    page = _page(base)
    pos = 0
    while pos < len(body):
        if pos + _RANGE.size > len(body):
            raise InvalidArgument("truncated SLRU_PATCH delta")
        off, length = _RANGE.unpack_from(body, pos)
        pos += _RANGE.size
        if pos + length > len(body) or off + length > BLCKSZ:
            raise InvalidArgument("SLRU_PATCH range is truncated or beyond the page")
        page[off : off + length] = body[pos : pos + length]
        pos += length
    return bytes(page)


redo.register(VM_CLEAR, _vm_clear)
redo.register(CLOG_SET, _clog_set)
redo.register(SLRU_PATCH, _slru_patch)
