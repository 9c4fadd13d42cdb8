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
  members, commit timestamps). Unlike storage's generic patch, an absent page starts as a
  whole zero page, as ``SimpleLruZeroPage`` leaves it.
* ``FSM_TRUNCATE`` (5): ``fsm_truncate_avail`` -- zero the free-space map leaf slots from
  a given one on and rebuild the page's tree of maxima above them (a truncation's redo
  does this to the last FSM page kept). An absent page stays absent.

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
FSM_TRUNCATE: Final = 5

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


#: fsm_internals.h: the FSM page's contents are an int (fp_next_slot) and a binary tree of
#: one-byte maxima, NonLeafNodesPerPage inner nodes, then the leaves.
_FSM_NODES_AT: Final = 24 + 4
_FSM_NODES: Final = BLCKSZ - 24 - 4
_FSM_NON_LEAF: Final = BLCKSZ // 2 - 1
FSM_LEAF_SLOTS: Final = _FSM_NODES - _FSM_NON_LEAF


def make_fsm_truncate(first_removed_slot: int) -> bytes:
    """An FSM_TRUNCATE delta payload: clear leaf slots ``first_removed_slot`` and on."""
    if not 0 <= first_removed_slot < FSM_LEAF_SLOTS:
        raise InvalidArgument(f"FSM slot {first_removed_slot} is beyond the page")
    return bytes([FSM_TRUNCATE]) + struct.pack(">H", first_removed_slot)


def slru_patch_ranges(payload: bytes) -> list[tuple[int, bytes]]:
    """The ``[(byte offset, data)]`` of an SLRU_PATCH payload (its type byte included)."""
    out, pos, body = [], 0, payload[1:]
    while pos < len(body):
        if pos + _RANGE.size > len(body):
            raise InvalidArgument("truncated SLRU_PATCH delta")
        off, length = _RANGE.unpack_from(body, pos)
        pos += _RANGE.size
        if pos + length > len(body) or off + length > BLCKSZ:
            raise InvalidArgument("SLRU_PATCH range is truncated or beyond the page")
        out.append((off, body[pos : pos + length]))
        pos += length
    return out


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
    for off, data in slru_patch_ranges(bytes([SLRU_PATCH]) + body):
        page[off : off + len(data)] = data
    return bytes(page)


def _fsm_truncate(base: bytes | None, body: bytes) -> bytes | None:
    if base is None:
        return None
    if len(body) != 2:
        raise InvalidArgument("FSM_TRUNCATE takes one slot number")
    (slot,) = struct.unpack(">H", body)
    if slot >= FSM_LEAF_SLOTS:
        raise InvalidArgument(f"FSM slot {slot} is beyond the page")
    page = _page(base)
    nodes = memoryview(page)[_FSM_NODES_AT : _FSM_NODES_AT + _FSM_NODES]
    first = _FSM_NON_LEAF + slot
    if not any(nodes[first:]):
        return base  # fsm_truncate_avail changes nothing: no rebuild either
    nodes[first:] = bytes(_FSM_NODES - first)
    for node in range(_FSM_NON_LEAF - 1, -1, -1):  # fsm_rebuild_page
        left = 2 * node + 1
        value = nodes[left] if left < _FSM_NODES else 0
        if left + 1 < _FSM_NODES:
            value = max(value, nodes[left + 1])
        nodes[node] = value
    nodes.release()
    return bytes(page)


redo.register(VM_CLEAR, _vm_clear)
redo.register(CLOG_SET, _clog_set)
redo.register(SLRU_PATCH, _slru_patch)
redo.register(FSM_TRUNCATE, _fsm_truncate)
