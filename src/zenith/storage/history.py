"""The history hash: what makes "same timeline id, same history" checkable.

Two repositories holding a timeline must hold the same records up to the lower of their
two ``last_record_lsn``. The hash below is a pure function of the SET of a timeline's own
records with lsn <= L, so both sides compute it independently, however their writes were
batched, and a transfer compares them before appending (DESIGN §6, docs/push-pull.md).

Definition (version 1)::

    d(r)    = SHA-256(key || lsn u64 BE || kind u8 || payload)
    s(L)    = sum of d(r) over the records at LSN L, as integers, mod 2**256
    h(none) = 32 zero bytes
    h(L)    = SHA-256(h(previous LSN with records) || L u64 BE || count(L) u64 BE || s(L))

The per-LSN sum makes the hash independent of the order of records within one LSN (a
base-backup import stores a whole cluster at one LSN, written in whatever order the tar
had), and lets a partly stored LSN carry its running sum across batches. LSNs without
records leave the hash as it is, so h at any LSN is h at the greatest record LSN <= it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

EMPTY: Final = bytes(32)
MODULUS: Final = 1 << 256
_RECORD_HEAD: Final = struct.Struct(">18sQB")
_LSN_STEP: Final = struct.Struct(">QQ")


def record_digest(key: bytes, lsn: int, kind: int, payload: bytes) -> int:
    """``d(r)`` as an integer."""
    h = hashlib.sha256(_RECORD_HEAD.pack(key, lsn, kind))
    h.update(payload)
    return int.from_bytes(h.digest(), "big")


def step(previous: bytes, lsn: int, count: int, total: int) -> bytes:
    """The hash after LSN ``lsn`` (``count`` records summing to ``total``)."""
    return hashlib.sha256(
        previous + _LSN_STEP.pack(lsn, count) + (total % MODULUS).to_bytes(32, "big")
    ).digest()


@dataclass
class OpenLsn:
    """The records of one LSN seen so far: how many and their digests' sum."""

    lsn: int
    count: int = 0
    total: int = 0

    def add(self, digest: int) -> None:
        self.count += 1
        self.total = (self.total + digest) % MODULUS

    def close(self, previous: bytes) -> bytes:
        return step(previous, self.lsn, self.count, self.total)


class Folder:
    """Folds records given in LSN order (within an LSN, any order) into the chain."""

    def __init__(self, start: bytes = EMPTY, open_lsn: OpenLsn | None = None) -> None:
        self.hash = start
        self.open = open_lsn

    def add(self, key: bytes, lsn: int, kind: int, payload: bytes) -> None:
        if self.open is None or lsn != self.open.lsn:
            self.close()
            self.open = OpenLsn(lsn)
        self.open.add(record_digest(key, lsn, kind, payload))

    def close(self) -> bytes:
        """Close the open LSN (if any): the hash through every LSN seen."""
        if self.open is not None:
            self.hash = self.open.close(self.hash)
            self.open = None
        return self.hash
