"""How the PostgreSQL layer encodes what it stores into storage's opaque 18-byte keys.

The first byte says what the key names; the rest depends on it. Relation blocks sort by
relation, fork and block number, so a relation's blocks are adjacent in key order::

    0x00 rel block   spcnode u32 | dbnode u32 | relnode u32 | forknum u8 | blkno u32
    0x01 rel size    spcnode u32 | dbnode u32 | relnode u32 | forknum u8 | 0 u32
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from zenith.errors import InvalidArgument
from zenith.storage.api import KEY_SIZE

_REL: Final = struct.Struct(">BIIIBI")
assert _REL.size == KEY_SIZE

DEFAULTTABLESPACE_OID: Final = 1663


class KeyKind(IntEnum):
    REL_BLOCK = 0x00
    REL_SIZE = 0x01


class ForkNumber(IntEnum):
    MAIN = 0
    FSM = 1
    VISIBILITYMAP = 2
    INIT = 3


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
    return _REL.pack(KeyKind.REL_BLOCK, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, blkno)


def rel_size_key(rel: RelTag) -> bytes:
    return _REL.pack(KeyKind.REL_SIZE, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, 0)


def parse_rel_key(key: bytes) -> tuple[KeyKind, RelTag, int]:
    """``(kind, relation, block number)`` of a relation key."""
    if len(key) != KEY_SIZE or key[0] not in (KeyKind.REL_BLOCK, KeyKind.REL_SIZE):
        raise InvalidArgument(f"not a relation key: {key.hex()}")
    kind, spc, db, rel, fork, blk = _REL.unpack(key)
    return KeyKind(kind), RelTag(spc, db, rel, fork), blk
