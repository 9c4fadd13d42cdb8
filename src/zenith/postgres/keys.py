"""How the PostgreSQL layer encodes what it stores into storage's opaque 18-byte keys.

The first byte says what the key names; the rest depends on it. Everything that belongs to
one database directory (``spcnode``, ``dbnode``) shares the prefix ``0x00 spc db``, so a
database is one contiguous key range (:func:`db_key_range`): DROP DATABASE and CREATE
DATABASE ... STRATEGY FILE_COPY list it with a single key-range read. Inside it, relation
blocks sort by relation, fork and block number; a fork's size sits right after its blocks
(block number ``0xFFFFFFFF``, which PostgreSQL never uses: it is InvalidBlockNumber); the
database's own files use relation number 0 (InvalidOid, never a relation)::

    0x00 spcnode u32 | dbnode u32 | relnode u32 | forknum u8 | blkno u32       rel block
    0x00 spcnode u32 | dbnode u32 | relnode u32 | forknum u8 | 0xFFFFFFFF      rel size
    0x00 spcnode u32 | dbnode u32 | 0 u32       | 0 u8       | 0               pg_filenode.map
    0x00 spcnode u32 | dbnode u32 | 0 u32       | 0 u8       | 1               PG_VERSION
    0x02 slru u8     | pageno u32 | 0 * 12                                     SLRU page
    0x03 sha256(path)[:17]                                                      other file
    0x04 item u8     | 0 * 16                                                   control info

The shared catalogs live in database directory (1664 "global", 0), so their relmap is
``relmap_key(1664, 0)``. A file stored under a path key carries its path in the value
(:func:`pack_file_value`) so an export can list and name it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from zenith.errors import InvalidArgument
from zenith.storage.api import KEY_SIZE

_REL: Final = struct.Struct(">BIIIBI")
assert _REL.size == KEY_SIZE
_SLRU: Final = struct.Struct(">BBI12x")
assert _SLRU.size == KEY_SIZE
_PATH_LEN: Final = struct.Struct(">H")

DEFAULTTABLESPACE_OID: Final = 1663
GLOBALTABLESPACE_OID: Final = 1664
#: The block number of a fork's size key (InvalidBlockNumber: never a real block).
SIZE_BLKNO: Final = 0xFFFFFFFF
#: Largest relation block number PostgreSQL uses (MaxBlockNumber).
MAX_BLKNO: Final = 0xFFFFFFFE
SLRU_PAGES_PER_SEGMENT: Final = 32

_PREFIX_DB: Final = 0x00
_PREFIX_SLRU: Final = 0x02
_PREFIX_FILE: Final = 0x03
_PREFIX_CONTROL: Final = 0x04
_RELMAP_BLK: Final = 0
_DB_VERSION_BLK: Final = 1


class KeyKind(IntEnum):
    """What a key names (see :func:`key_kind`); not the key's first byte."""

    REL_BLOCK = 0x00
    REL_SIZE = 0x01
    RELMAP = 0x10
    DB_VERSION = 0x11
    SLRU_PAGE = 0x20
    FILE = 0x30
    CONTROL = 0x40


class ForkNumber(IntEnum):
    MAIN = 0
    FSM = 1
    VISIBILITYMAP = 2
    INIT = 3


class SlruId(IntEnum):
    """The SLRUs whose pages are stored (their directory is :attr:`directory`)."""

    XACT = 0
    MULTIXACT_OFFSETS = 1
    MULTIXACT_MEMBERS = 2
    COMMIT_TS = 3

    @property
    def directory(self) -> str:
        return _SLRU_DIRS[self]


_SLRU_DIRS: Final = {
    SlruId.XACT: "pg_xact",
    SlruId.MULTIXACT_OFFSETS: "pg_multixact/offsets",
    SlruId.MULTIXACT_MEMBERS: "pg_multixact/members",
    SlruId.COMMIT_TS: "pg_commit_ts",
}


class ControlItem(IntEnum):
    """The small cluster-wide values an export needs to write ``pg_control``."""

    PG_CONTROL = 0  # global/pg_control as the base backup sent it
    CHECKPOINT = 1  # main data of the newest checkpoint record ingested (CheckPoint)
    COUNTERS = 2  # redo's ID counters after each record that changed them (redostate.py)
    ORIGINS = 3  # replication origin progress (redostate.Origins)


@dataclass(frozen=True, slots=True, order=True)
class RelTag:
    spcnode: int
    dbnode: int
    relnode: int
    forknum: int = ForkNumber.MAIN

    def __str__(self) -> str:
        fork = ""
        if self.forknum != ForkNumber.MAIN:
            fork = f"_{ForkNumber(self.forknum).name.lower()}"
        return f"{self.spcnode}/{self.dbnode}/{self.relnode}{fork}"


def rel_block_key(rel: RelTag, blkno: int) -> bytes:
    if not 0 <= blkno <= MAX_BLKNO:
        raise InvalidArgument(f"block number {blkno} is out of range")
    return _REL.pack(_PREFIX_DB, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, blkno)


def rel_size_key(rel: RelTag) -> bytes:
    return _REL.pack(_PREFIX_DB, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, SIZE_BLKNO)


def rel_fork_range(rel: RelTag) -> tuple[bytes, bytes]:
    """``[lo, hi)`` of a fork's blocks and its size key."""
    lo = _REL.pack(_PREFIX_DB, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, 0)
    return lo, _after(rel_size_key(rel))


def relmap_key(spcnode: int, dbnode: int) -> bytes:
    """``pg_filenode.map`` of a database directory (``(1664, 0)``: the shared one)."""
    return _REL.pack(_PREFIX_DB, spcnode, dbnode, 0, 0, _RELMAP_BLK)


def db_version_key(spcnode: int, dbnode: int) -> bytes:
    """``PG_VERSION`` of a database directory."""
    return _REL.pack(_PREFIX_DB, spcnode, dbnode, 0, 0, _DB_VERSION_BLK)


def db_key_range(spcnode: int, dbnode: int) -> tuple[bytes, bytes]:
    """``[lo, hi)``: every key of database directory ``(spcnode, dbnode)``."""
    lo = _REL.pack(_PREFIX_DB, spcnode, dbnode, 0, 0, 0)
    hi = _REL.pack(_PREFIX_DB, spcnode, dbnode, 0xFFFFFFFF, 0xFF, 0xFFFFFFFF)
    return lo, _after(hi)


def rebase_db_key(key: bytes, spcnode: int, dbnode: int) -> bytes:
    """``key`` (of some database directory) moved to database directory ``(spc, db)``."""
    if len(key) != KEY_SIZE or key[0] != _PREFIX_DB:
        raise InvalidArgument(f"not a database key: {key.hex()}")
    return struct.pack(">BII", _PREFIX_DB, spcnode, dbnode) + key[9:]


def slru_page_key(slru: SlruId, pageno: int) -> bytes:
    """One 8 KiB page of an SLRU; segment file ``pageno // 32`` holds it."""
    return _SLRU.pack(_PREFIX_SLRU, slru, pageno)


def slru_range(slru: SlruId) -> tuple[bytes, bytes]:
    return _SLRU.pack(_PREFIX_SLRU, slru, 0), _SLRU.pack(_PREFIX_SLRU, slru + 1, 0)


def file_key(path: str) -> bytes:
    """A cluster file kept whole (configuration, top-level PG_VERSION, two-phase state):
    keyed by a hash of its data-directory path; the value carries the path."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return bytes([_PREFIX_FILE]) + digest[: KEY_SIZE - 1]


def file_range() -> tuple[bytes, bytes]:
    return bytes([_PREFIX_FILE]) + bytes(KEY_SIZE - 1), bytes([_PREFIX_FILE + 1]) + bytes(
        KEY_SIZE - 1
    )


def pack_file_value(path: str, content: bytes) -> bytes:
    """The value of :func:`file_key`: ``path length u16 | path | content``."""
    raw = path.encode("utf-8", "surrogateescape")
    return _PATH_LEN.pack(len(raw)) + raw + content


def unpack_file_value(value: bytes) -> tuple[str, bytes]:
    (n,) = _PATH_LEN.unpack_from(value)
    return value[2 : 2 + n].decode("utf-8", "surrogateescape"), value[2 + n :]


def control_key(item: ControlItem) -> bytes:
    return bytes([_PREFIX_CONTROL, item]) + bytes(KEY_SIZE - 2)


def key_kind(key: bytes) -> KeyKind:
    """What ``key`` names."""
    if len(key) != KEY_SIZE:
        raise InvalidArgument(f"a key is {KEY_SIZE} bytes: {key.hex()}")
    prefix = key[0]
    if prefix == _PREFIX_DB:
        _, _, _, rel, _, blk = _REL.unpack(key)
        if rel == 0:
            return KeyKind.RELMAP if blk == _RELMAP_BLK else KeyKind.DB_VERSION
        return KeyKind.REL_SIZE if blk == SIZE_BLKNO else KeyKind.REL_BLOCK
    kinds = {_PREFIX_SLRU: KeyKind.SLRU_PAGE, _PREFIX_FILE: KeyKind.FILE,
             _PREFIX_CONTROL: KeyKind.CONTROL}
    if prefix not in kinds:
        raise InvalidArgument(f"unknown key kind {prefix:#x}: {key.hex()}")
    return kinds[prefix]


def parse_rel_key(key: bytes) -> tuple[KeyKind, RelTag, int]:
    """``(kind, relation, block number)`` of a relation key (block 0 for a size key)."""
    kind = key_kind(key)
    if kind not in (KeyKind.REL_BLOCK, KeyKind.REL_SIZE):
        raise InvalidArgument(f"not a relation key: {key.hex()}")
    _, spc, db, rel, fork, blk = _REL.unpack(key)
    return kind, RelTag(spc, db, rel, fork), 0 if kind is KeyKind.REL_SIZE else blk


def parse_slru_key(key: bytes) -> tuple[SlruId, int]:
    if key_kind(key) is not KeyKind.SLRU_PAGE:
        raise InvalidArgument(f"not an SLRU key: {key.hex()}")
    _, slru, pageno = _SLRU.unpack(key)
    return SlruId(slru), pageno


def _after(key: bytes) -> bytes:
    """The key right after ``key`` in byte order (an exclusive upper bound)."""
    n = int.from_bytes(key, "big") + 1
    return n.to_bytes(KEY_SIZE + 1, "big")[-KEY_SIZE:] if n < 1 << (8 * KEY_SIZE) else key
