"""Append-only data files: where record payloads live, one file per timeline.

Why not in SQLite: in WAL mode SQLite writes every byte twice (WAL, then checkpoint), and
handing 8 KiB blobs out of its B-tree one row at a time costs several times a plain read.
So SQLite keeps the index and the metadata (see ``sqlite.py``) and the bytes go here.

A timeline's file is a sequence of *frames*, one per write batch::

    header     16 bytes: magic b"ZNF1", record count (u32), payload bytes (u64)
    payloads   the batch's payloads of 4 KiB or more in the order they were given, each
               starting on a 4 KiB boundary of the file (zeros before it), so GC can
               punch all its blocks out; then the smaller ones back to back
    directory  one 39-byte entry per record: key (18), lsn (u64), kind (u8),
               offset (u64, absolute in the file), length (u32); sorted by LSN (stable)

(integers little-endian). Every batch's LSNs are above the previous batch's, so walking
the frames in file order and each directory in order yields a timeline's records in LSN
order: :func:`walk` streams a range through a moving read-only mapping, with no system
call and no index lookup per record. The file describes itself; the index only says where
a GetPage read goes and where a batch starts.

Durability protocol (the index side lives in ``sqlite.py``): a batch is written at the
committed end ``data_end``, flushed with ``fdatasync``, and only then does one SQLite
transaction insert its index rows and advance both ``last_record_lsn`` and ``data_end``.
Bytes beyond ``data_end`` belong to a batch that crashed or was refused; they are cut off
when the repository opens and before every batch, so they are never read.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import suppress
from itertools import starmap
from pathlib import Path
from typing import Any, Final

from zenith.errors import HistoryMismatch, ZenithError
from zenith.lsn import Lsn
from zenith.storage.api import Record, RecordKind, _RecordSlots
from zenith.storage.redo import unpack_image

MAGIC: Final = b"ZNF1"
HEADER: Final = struct.Struct("<4sIQ")
ENTRY: Final = struct.Struct("<18sQBQI")
#: :func:`walk` maps the file this much at a time: slicing a payload out of a mapping
#: copies it once (``pread`` into a buffer and slicing copies twice), and a bounded window
#: bounds the resident set of a long stream.
WINDOW: Final = 16 << 20
#: Payloads are handed to the kernel in ``pwritev`` calls of about this size.
FLUSH_BYTES: Final = 1 << 20
_MAX_IOV: Final = 512
_CACHE_SIZE: Final = 128
_SUFFIX: Final = ".dat"

Entry = tuple[bytes, int, int, int, int]
"""A directory entry: ``(key, lsn, kind, offset, length)``."""

_KINDS: Final = tuple(sorted(RecordKind, key=int))
assert [int(k) for k in _KINDS] == list(range(len(_KINDS))), "kinds index a tuple"


class CorruptDataFile(ZenithError):
    """A data file is shorter than its committed length or does not parse."""

    sqlstate = "XX001"  # data_corrupted


class HistoryCollected(ZenithError):
    """A range of records reaches into history GC removed: it cannot be read whole."""

    sqlstate = "55000"  # object_not_in_prerequisite_state


#: Set in a directory entry's kind byte when GC removed the record (its payload bytes may
#: be punched out of the file): walks refuse it, nothing reads it by offset any more.
REMOVED: Final = 0x80
#: Set in a kind byte (directory entry and index row) when compaction moved an image's
#: payload into a *pack frame*, zstd-compressed (``redo.pack_image``'s format): the
#: record is still the same ``IMAGE`` with the same payload to every reader, the history
#: hash and transfers; only its bytes on disk are fewer (``compaction.py``).
PACKED: Final = 0x40
#: Bits of a kind byte that say how a record is stored, not what it is.
STORAGE_BITS: Final = REMOVED | PACKED
_KIND_AT: Final = 18 + 8  # the kind byte's offset in an entry
#: Holes are punched in whole blocks of this size.
BLOCK: Final = 4096


def file_name(timeline_id: bytes, internal: int) -> str:
    """The data file of a timeline. The internal id is never reused (AUTOINCREMENT), so a
    timeline deleted and created again under the same id gets a different file, and a late
    ``unlink`` of the old one cannot hit the new one."""
    return f"{timeline_id.hex()}-{internal}{_SUFFIX}"


class DataFile:
    """An open data file. All I/O is positional, so threads share one; the descriptor is
    closed when the last holder drops the object, so an iterator keeps reading a file that
    was deleted (unlinked) meanwhile."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def __del__(self, _close: Any = os.close) -> None:  # bound early: safe at shutdown
        with suppress(OSError):
            _close(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or :class:`CorruptDataFile`."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise CorruptDataFile(
                f"data file {self.name} ends before {offset + length} (read {len(data)} of "
                f"{length} bytes at {offset})"
            )
        return data


class DataFiles:
    """The directory of data files beside the database, and a small cache of open files.

    Opening under the cache lock and deleting (cache eviction + ``unlink``) under the same
    lock means no thread can cache a file after its timeline's deletion finished.
    """

    def __init__(self, directory: Path, *, durable: bool) -> None:
        self.directory = directory
        self.durable = durable
        self._lock = threading.Lock()
        self._cache: dict[str, DataFile] = {}
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if durable:
                _fsync_dir(directory.parent)

    def open(self, name: str, *, create: bool = False) -> tuple[DataFile, bool]:
        """The open file ``name`` and whether this call created it. Without ``create`` a
        missing file raises :class:`FileNotFoundError`."""
        cached = self._cache.get(name)  # the hot path of every read: no lock
        if cached is not None:
            return cached, False
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None:
                return cached, False
            path = self.directory / name
            created = False
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                if not create:
                    raise
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
                if self.durable:  # the new name must be durable before the index cites it
                    _fsync_dir(self.directory)
            f = DataFile(fd, name)
            if len(self._cache) >= _CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
            self._cache[name] = f
            return f, created

    def remove(self, name: str) -> None:
        """Forget and unlink a file. Holders of an open :class:`DataFile` keep reading it."""
        with self._lock:
            self._cache.pop(name, None)
            with suppress(FileNotFoundError):
                os.unlink(self.directory / name)

    def recover(self, committed: dict[str, int]) -> None:
        """Cut every file back to its committed length and remove files no timeline owns
        (left by a crash between a deletion's commit and its ``unlink``). The caller holds
        the database's write lock, so no batch is in flight."""
        for path in self.directory.glob(f"*{_SUFFIX}"):
            end = committed.get(path.name)
            if end is None:
                self.remove(path.name)
            elif path.stat().st_size > end:
                os.truncate(path, end)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


class FrameWriter:
    """Writes one batch's frame at ``start`` (the committed end of the file). Nothing it
    writes is visible until the index commits the new end; on failure the caller truncates
    the file back to ``start``."""

    def __init__(self, f: DataFile, start: int) -> None:
        self.f = f
        self.start = start
        self.pos = start + HEADER.size
        self.entries: list[Entry] = []
        self._pending: list[bytes] = []
        self._pending_at = self.pos
        self._pending_bytes = 0
        self._in_order = True
        self._last_lsn = -1
        #: The payloads' own bytes (the frame's payload area also holds alignment).
        self.data_bytes = 0
        #: Small payloads wait for the end of the frame: (index in entries, payload).
        self._small: list[tuple[int, bytes]] = []

    def add(self, key: bytes, lsn: int, kind: int, payload: bytes) -> None:
        n = len(payload)
        self.data_bytes += n
        if 0 < n < BLOCK:
            # Small payloads go together after the large ones (finish()): scattered
            # between page images, each would hold a block of its own once they are
            # aligned.
            self._small.append((len(self.entries), payload))
            self.entries.append((key, lsn, kind, -1, n))
        else:
            if n and self.pos % BLOCK:
                # A page-sized payload starts on a block boundary, so GC can punch all
                # its blocks out (an unaligned 8 KiB payload frees one block of three).
                # The zeros fill the rest of a block the previous payload ends in.
                pad = BLOCK - self.pos % BLOCK
                self._pending.append(bytes(pad))
                self.pos += pad
                self._pending_bytes += pad
            self.entries.append((key, lsn, kind, self.pos, n))
            if n:
                self._pending.append(payload)
                self.pos += n
                self._pending_bytes += n
                if self._pending_bytes >= FLUSH_BYTES or len(self._pending) >= _MAX_IOV:
                    self._flush()
        if lsn < self._last_lsn:
            self._in_order = False
        self._last_lsn = lsn

    def _place_small(self) -> None:
        for index, payload in self._small:
            key, lsn, kind, _unplaced, n = self.entries[index]
            self.entries[index] = (key, lsn, kind, self.pos, n)
            self._pending.append(payload)
            self.pos += n
            self._pending_bytes += n
            if self._pending_bytes >= FLUSH_BYTES or len(self._pending) >= _MAX_IOV:
                self._flush()
        self._small = []

    def _flush(self) -> None:
        if self._pending:
            _pwrite_all(self.f.fd, self._pending, self._pending_at, self._pending_bytes)
        self._pending = []
        self._pending_at += self._pending_bytes
        self._pending_bytes = 0

    @property
    def in_order(self) -> bool:
        """Every record so far came in LSN order (the frame may end here and another start)."""
        return self._in_order

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    @property
    def payload_bytes(self) -> int:
        return self.pos - self.start - HEADER.size

    def finish(self) -> int:
        """Write the directory and the header; return the new end of the file.
        ``self.entries`` is then in directory (LSN) order."""
        if len(self.entries) >= 1 << 32:
            raise ValueError("a batch holds fewer than 2**32 records")
        self._place_small()
        if not self._in_order:
            self.entries.sort(key=lambda e: e[1])
        directory = b"".join(starmap(ENTRY.pack, self.entries))
        self._pending.append(directory)
        self._pending_bytes += len(directory)
        self._flush()
        header = HEADER.pack(MAGIC, len(self.entries), self.payload_bytes)
        _pwrite_all(self.f.fd, [header], self.start, HEADER.size)
        return self._pending_at

    def sync(self) -> None:
        """Make the frame durable: it must be before the index that cites it commits."""
        os.fdatasync(self.f.fd)


def read_directory(f: DataFile, start: int) -> list[Entry]:
    """The directory of the frame at ``start``."""
    magic, count, payload_bytes = HEADER.unpack(f.pread(start, HEADER.size))
    if magic != MAGIC:
        raise CorruptDataFile(f"no frame at offset {start} of data file {f.name}")
    at = start + HEADER.size + payload_bytes
    return list(ENTRY.iter_unpack(f.pread(at, count * ENTRY.size)))


def walk(
    f: DataFile, start: int, end: int, after: int, upto: int,
    *, skip: tuple[int, int, bytes] | None = None,
) -> Iterator[Record]:
    """Records with lsn in ``(after, upto]`` from the frames between ``start`` (a frame
    boundary) and ``end`` (the committed length when the caller took its snapshot), in LSN
    order; ``skip=(lsn, n, key)`` leaves out the first ``n`` records of that LSN unread,
    the last of which must have ``key`` (when given).

    This is the hot path of push and pull: the file is mapped :data:`WINDOW` bytes at a
    time and each payload is sliced out of the mapping; records are built without
    re-validating what was validated when written (:class:`_RecordSlots`, ``int.__new__``
    for the LSN). Only bytes below ``end`` are mapped, and nothing truncates a file below
    its committed length, so the mapping never loses its pages under the reader.
    """
    if f.size() < end:
        raise CorruptDataFile(f"data file {f.name} is shorter than its committed {end} bytes")
    window = _Window(f.fd, end)
    try:
        yield from _records(window, f, start, end, after, upto, skip)
    finally:
        window.close()


class _Window:
    """A read-only mapping of part of a data file, moved forward as the walk goes."""

    __slots__ = ("base", "end", "fd", "map", "top")

    def __init__(self, fd: int, end: int) -> None:
        self.fd, self.end = fd, end
        self.map: mmap.mmap | None = None
        self.base = self.top = 0

    def move(self, offset: int, need: int) -> mmap.mmap:
        """Map at least ``[offset, offset + need)`` (and up to :data:`WINDOW` bytes)."""
        self.close()
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        length = min(max(WINDOW, offset + need - base), self.end - base)
        self.map = mmap.mmap(self.fd, length, prot=mmap.PROT_READ, offset=base)
        self.base, self.top = base, base + length
        return self.map

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def _records(
    w: _Window, f: DataFile, start: int, end: int, after: int, upto: int,
    skip: tuple[int, int, bytes] | None,
) -> Iterator[Record]:
    unpack_header, iter_entries = HEADER.unpack_from, ENTRY.iter_unpack
    make, record, new_lsn, lsn_type, kinds = _RecordSlots, Record, int.__new__, Lsn, _KINDS
    rec: Any
    if start >= end:
        return
    m = w.move(start, HEADER.size)
    base, top = w.base, w.top
    pos = start
    while pos < end:
        if pos < base or pos + HEADER.size > top:
            m = w.move(pos, HEADER.size)
            base, top = w.base, w.top
        magic, count, payload_bytes = unpack_header(m, pos - base)
        if magic != MAGIC:
            raise CorruptDataFile(f"no frame at offset {pos} of data file {f.name}")
        frame, at = pos, pos + HEADER.size + payload_bytes
        pos = at + count * ENTRY.size
        if pos > end:
            raise CorruptDataFile(f"frame at {frame} of data file {f.name} runs past its end")
        # The window stays on the payloads; a directory outside it is read apart.
        directory = m[at - base : pos - base] if pos <= top else f.pread(at, pos - at)
        entries = list(iter_entries(directory))
        if not entries:
            continue
        if entries[0][1] > upto:
            return
        if entries[0][1] <= after or entries[-1][1] > upto:
            entries = [e for e in entries if after < e[1] <= upto]
        if skip is not None and skip[1] > 0:
            skip_lsn, left, last_key = skip
            kept = []
            for e in entries:
                if e[1] == skip_lsn and left > 0:
                    left -= 1
                    if left == 0 and last_key and e[0] != last_key:
                        raise HistoryMismatch(
                            f"the records held at {Lsn(skip_lsn)} are not this timeline's: "
                            "its record there has another key"
                        )
                else:
                    kept.append(e)
            entries, skip = kept, (skip_lsn, left, last_key)
        for key, lsn, kind, offset, length in entries:
            if kind >= PACKED:
                if kind & REMOVED:
                    raise HistoryCollected(
                        f"the records at {Lsn(lsn)} of data file {f.name} were removed by GC",
                        hint="read from the timeline's readable start (its GC horizon) on")
                # Packed by a compaction that may have committed after this walk took its
                # end: its pack frame can lie past the mapped end (committed, synced).
                rec = make(key, new_lsn(lsn_type, lsn), kinds[kind & ~PACKED],
                           unpack_image(f.pread(offset, length)))
            else:
                stop = offset + length
                if offset < base or stop > top:
                    m = w.move(offset, length)
                    base, top = w.base, w.top
                rec = make(
                    key, new_lsn(lsn_type, lsn), kinds[kind], m[offset - base : stop - base]
                )
            rec.__class__ = record
            yield rec


def mark_removed(f: DataFile, start: int, records: set[tuple[bytes, int]]) -> list[
        tuple[int, int]]:
    """Flag the entries of the frame at ``start`` whose (key, lsn) is in ``records`` as
    removed, in place; return their payload ranges (also those flagged before: the step
    is repeated whole after a crash)."""
    magic, count, payload_bytes = HEADER.unpack(f.pread(start, HEADER.size))
    if magic != MAGIC:
        raise CorruptDataFile(f"no frame at offset {start} of data file {f.name}")
    at = start + HEADER.size + payload_bytes
    raw = bytearray(f.pread(at, count * ENTRY.size))
    ranges: list[tuple[int, int]] = []
    changed = False
    for i in range(count):
        key, lsn, kind, offset, length = ENTRY.unpack_from(raw, i * ENTRY.size)
        if (key, lsn) in records:
            ranges.append((offset, length))
            if not kind & REMOVED:
                raw[i * ENTRY.size + _KIND_AT] = kind | REMOVED
                changed = True
    if changed:
        _pwrite_all(f.fd, [bytes(raw)], at, len(raw))
    return ranges


def write_pack(f: DataFile, start: int, payloads: list[bytes]) -> tuple[int, list[int]]:
    """Write a *pack frame* at ``start`` (the committed end): a frame of no records whose
    payload area holds ``payloads`` back to back. Walks step over it (an empty directory);
    only the index and the directory entries compaction rewrites point into it. Returns
    the new end and each payload's offset. Nothing is visible until the index commits the
    new end; on failure the caller truncates back to ``start``."""
    at = start + HEADER.size
    offsets = []
    for p in payloads:
        offsets.append(at)
        at += len(p)
    total = at - start - HEADER.size
    buffers = [HEADER.pack(MAGIC, 0, total), *payloads]
    for i in range(0, len(buffers), _MAX_IOV):
        chunk = buffers[i : i + _MAX_IOV]
        first = start if i == 0 else offsets[i - 1]
        _pwrite_all(f.fd, chunk, first, sum(map(len, chunk)))
    return at, offsets


def mark_packed(f: DataFile, start: int, moved: dict[tuple[bytes, int], tuple[int, int]]
                ) -> set[tuple[bytes, int]]:
    """Point the entries of the frame at ``start`` whose (key, lsn) is in ``moved`` to
    their payload's new place ``(offset, length)`` in a pack frame, flagged
    :data:`PACKED` (a ``REMOVED`` flag stays). Idempotent: after a crash the step is
    repeated whole. Returns the (key, lsn) found here."""
    magic, count, payload_bytes = HEADER.unpack(f.pread(start, HEADER.size))
    if magic != MAGIC:
        raise CorruptDataFile(f"no frame at offset {start} of data file {f.name}")
    at = start + HEADER.size + payload_bytes
    raw = bytearray(f.pread(at, count * ENTRY.size))
    found: set[tuple[bytes, int]] = set()
    for i in range(count):
        key, lsn, kind, _offset, _length = ENTRY.unpack_from(raw, i * ENTRY.size)
        place = moved.get((key, lsn))
        if place is None:
            continue
        found.add((key, lsn))
        ENTRY.pack_into(raw, i * ENTRY.size, key, lsn, kind | PACKED, *place)
    if found:
        _pwrite_all(f.fd, [bytes(raw)], at, len(raw))
    return found


_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_fallocate: Any = None


def punch(f: DataFile, ranges: list[tuple[int, int]]) -> int:
    """Give the whole blocks inside ``ranges`` (merged where adjacent) back to the file
    system (``fallocate(PUNCH_HOLE | KEEP_SIZE)``: offsets stay, the bytes read as zeros).
    Returns the bytes punched; 0 where the file system cannot punch holes."""
    global _fallocate
    if _fallocate is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _fallocate = getattr(libc, "fallocate", False)
        if _fallocate:
            _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                   ctypes.c_longlong]
    if not _fallocate:
        return 0
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length)
        else:
            merged.append([offset, offset + length])
    punched = 0
    for lo, hi in merged:
        first, last = -(-lo // BLOCK) * BLOCK, hi // BLOCK * BLOCK
        if last <= first:
            continue
        if _fallocate(f.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, first,
                      last - first) != 0:
            return punched  # not supported here (EOPNOTSUPP): the bytes stay
        punched += last - first
    return punched


def _pwrite_all(fd: int, buffers: list[bytes], offset: int, total: int) -> None:
    written = os.pwritev(fd, buffers, offset)
    if written < total:  # a short write (signal, disk nearly full): finish it plainly
        rest = memoryview(b"".join(buffers))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            if n <= 0:
                raise OSError(f"pwrite wrote nothing at {offset + written}")
            rest, written = rest[n:], written + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
