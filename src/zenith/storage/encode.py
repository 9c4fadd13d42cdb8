"""Compact page versions on the way in: a writer that knows the value a key had before a
new whole image (it wrote it) stores the image as an XOR delta against it when that is
less than half the size (``redo.make_xor_delta``), with a whole image at least every
:data:`IMAGE_EVERY` versions of a key so a read applies a bounded number of deltas.

:class:`VersionEncoder` remembers the last value of recently written keys (an LRU of at
most ``max_bytes``) and rewrites a batch of records in place of the writer. It must see
every record the writer stores, in order: a delta it cannot apply (a key it does not
hold) or a tombstone makes it forget the key, and the next image of it is stored whole.
A new encoder (a restarted writer) starts with nothing and stores images whole at first:
what is stored is always correct, only smaller when the encoder remembers. A whole image
of at least :data:`MIN_SIZE` bytes is stored zstd-compressed (``RecordKind.ZIMAGE``) when
that saves a quarter or more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from zenith.storage.api import Record, RecordKind
from zenith.storage.redo import apply_delta, make_xor_delta, pack_image

#: A key's versions between two whole images: a read applies at most IMAGE_EVERY - 1
#: deltas on top of an image (each about 20 µs for an 8 KiB page).
IMAGE_EVERY: Final = 16
#: Values shorter than this are stored as they come (a delta would not be smaller).
MIN_SIZE: Final = 1024
DEFAULT_MAX_BYTES: Final = 128 * 1024 * 1024

_IMAGE, _DELTA, _ZIMAGE = RecordKind.IMAGE, RecordKind.DELTA, RecordKind.ZIMAGE


class VersionEncoder:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        #: Images stored as deltas, images stored compressed, and the bytes that saved.
        self.encoded = 0
        self.packed = 0
        self.saved = 0

    def encode(self, records: Iterable[Record]) -> list[Record]:
        """``records`` (in the order they will be stored) with whole images of remembered
        keys replaced by XOR deltas where that is smaller."""
        return [self._one(rec) for rec in records]

    def _one(self, rec: Record) -> Record:
        key = rec.key
        known = self._values.get(key)
        if rec.kind is _IMAGE:
            value = rec.payload
            if known is not None and known[1] < IMAGE_EVERY - 1 and len(value) >= MIN_SIZE:
                delta = make_xor_delta(known[0], value)
                if delta is not None:
                    self._remember(key, value, known[1] + 1)
                    self.encoded += 1
                    self.saved += len(value) - len(delta)
                    return Record(key, rec.lsn, _DELTA, delta)
            if len(value) < MIN_SIZE:
                self._forget(key)
                return rec
            self._remember(key, value, 0)
            packed = pack_image(value)
            if packed is None:
                return rec
            self.packed += 1
            self.saved += len(value) - len(packed)
            return Record(key, rec.lsn, _ZIMAGE, packed)
        if rec.kind is _DELTA and known is not None:
            try:
                after = apply_delta(known[0], rec.payload)
            except Exception:
                after = None
            if after is not None and len(after) >= MIN_SIZE:
                self._remember(key, after, known[1] + 1)
                return rec
        self._forget(key)
        return rec

    def _remember(self, key: bytes, value: bytes, chain: int) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
        self._values[key] = (value, chain)
        self._bytes += len(value)
        while self._bytes > self.max_bytes and self._values:
            _key, (dropped, _chain) = self._values.popitem(last=False)
            self._bytes -= len(dropped)

    def _forget(self, key: bytes) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
