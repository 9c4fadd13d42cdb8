"""Compaction: old page images stored again in fewer bytes, as the very same records.

WAL ingest stores most page versions compactly when it writes them (XOR deltas, ``ZIMAGE``).
What it cannot: the pages of an imported base backup, history written by an older zenith,
images a transfer brought (stored as the sender sent them) and the first version of a key
after a restart. Those are ``IMAGE`` records of 8 KiB that often compress 3-10x.

Their payloads are covered by the history hash (docs/push-pull.md), so compaction may not
turn them into other records. It changes how they are *stored*: an image's payload moves
into a *pack frame* appended to the timeline's data file (a frame with no records, walks
step over it), zstd-compressed in ``redo.pack_image``'s format, and its kind byte gets the
``PACKED`` bit in the index and in its frame's directory. Every reader (page reads,
materialize, walks, base records) unpacks it: to them, and to the history hash and every
transfer, it is the same ``IMAGE`` with the same payload.

One pass over a timeline, chunk by chunk (each chunk one write transaction, like a batch):

1. read the next frames' directories after ``timelines.compacted`` and, for each image of
   at least a block whose index row still says so, its payload; pack it; keep it when
   that saves at least a quarter;
2. write the packed payloads as one pack frame at the committed end, ``fdatasync``, then in
   one transaction point their index rows there (kind | ``PACKED``), record each move in
   ``repacked`` (with the frame that lists the record, ``done = 0``) and the pack in
   ``packs`` (with the count of its records kept), and advance
   ``data_end``, ``compacted`` and ``packed_saving``. A crash before the commit leaves
   bytes beyond ``data_end``: cut at the next open, as any batch's;
3. *finish* (``finish``): start a new generation of read holds and wait until every read
   of an older one ended (it may have looked up an old place). Then, with no walk of the
   file running (``Pins.reclaiming``, as GC's reclaim), point the directory entries to the
   new places (``mark_packed``), ``fdatasync``, punch the old payloads' blocks out of the
   file and mark the moves done. While reads hold an old generation (a long export), the
   finish waits for a later pass; the repository works meanwhile (the index and the old
   directory entries each lead to the same payload). Repeated whole after a crash.

Old payloads start on block boundaries (``datafile.FrameWriter``), so punching frees all
their blocks; the packed ones go back to back. Compaction never changes what any read
returns; ``tests/storage/test_compaction.py`` checks that on every path.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from zenith.errors import Cancelled, UnknownTimeline
from zenith.ids import TimelineId
from zenith.storage import redo
from zenith.storage.api import RecordKind
from zenith.storage.datafile import (
    BLOCK,
    PACKED,
    DataFile,
    mark_packed,
    punch,
    read_directory,
    write_pack,
)
from zenith.storage.writes import _start_frame

if TYPE_CHECKING:
    from zenith.storage.sqlite import SqliteRepository

_IMAGE: Final = int(RecordKind.IMAGE)
#: Input bytes packed per transaction (the writer lock is held while it is written).
CHUNK_BYTES: Final = 8 << 20


@dataclass(frozen=True, slots=True)
class CompactResult:
    """What one compaction pass of one timeline did."""

    timeline_id: TimelineId
    #: Images stored packed by this pass, their payload bytes before and after.
    records: int
    bytes_before: int
    bytes_after: int
    #: Bytes given back to the file system (old payloads punched out) by this pass, also
    #: for moves an earlier pass left to finish.
    bytes_reclaimed: int
    #: Every frame was looked at (False: stopped at the pass's bound, or finishing waits
    #: for reads of an older generation).
    done: bool


@dataclass(slots=True)
class _Move:
    frame: int
    key: bytes
    lsn: int
    off: int
    length: int
    packed: bytes


def compact(repo: SqliteRepository, timeline_id: TimelineId, *, lock: threading.Lock,
            max_bytes: int | None = None, cancel: threading.Event | None = None,
            pause: float = 0.0, wait: float = 5.0) -> CompactResult:
    """One compaction pass of the timeline's frames not looked at yet (see the module).
    ``lock``: held while a chunk's moves commit (GC, which reads the index to count what
    it removes, holds it for its whole run). ``max_bytes``: stop after reading that many
    payload bytes (a later pass goes on). ``pause``: sleep this fraction of each chunk's
    time after it (a bounded rate in the background). ``wait``: how long finishing may
    wait for reads of an older generation at the end of the pass (after each chunk it
    does not wait: what it cannot finish yet, a later call does)."""
    conn = repo._conn()
    row = repo._row_by_tid(conn, timeline_id)
    tl = row[0]
    reclaimed = finish(repo, tl, wait=0.0)
    if not row[16]:  # a shallow base still arriving
        return CompactResult(timeline_id, 0, 0, 0, reclaimed, False)
    compacted = conn.execute("SELECT compacted FROM timelines WHERE id = ?", (tl,)).fetchone()
    frames = [(int(s), int(last)) for s, last in conn.execute(
        "SELECT start, last_lsn FROM batches WHERE tl = ? AND start >= ? ORDER BY start",
        (tl, int(compacted[0]) if compacted else 0))]
    records = before = after = read = 0
    complete = True
    chunk: list[_Move] = []
    chunk_read = 0  # payload bytes read for this chunk, packed or not
    looked = committed = frames[0][0] if frames else 0  # frames before it: looked at
    began = time.monotonic()
    f: DataFile | None = None

    def commit(upto: int) -> None:
        nonlocal chunk, chunk_read, committed, records, before, after, reclaimed, began
        with lock:
            n, b, a = _commit(repo, tl, chunk, upto)
        records, before, after = records + n, before + b, after + a
        chunk, chunk_read, committed = [], 0, upto
        reclaimed += finish(repo, tl, wait=0.0)  # give the old bytes back as it goes
        if pause:
            time.sleep((time.monotonic() - began) * pause)
        began = time.monotonic()

    for i, (start, last_lsn) in enumerate(frames):
        if last_lsn > row[4]:
            complete = False  # pending records above the published end: a later pass
            break
        if max_bytes is not None and read >= max_bytes:
            complete = False
            break
        if cancel is not None and cancel.is_set():
            raise Cancelled("compaction cancelled; what it packed stays packed")
        if f is None:
            f = repo._file(row)
        cut = False
        for length, move in _candidates(repo, f, tl, start):
            read += length
            chunk_read += length
            if move is not None:
                chunk.append(move)
            if chunk_read >= CHUNK_BYTES:
                commit(looked)  # this frame is not looked at whole yet
            if max_bytes is not None and read >= max_bytes:
                cut = True
                break
        if cut:
            complete = False
            break
        looked = frames[i + 1][0] if i + 1 < len(frames) else start + 1
    if chunk or looked > committed:
        commit(looked)
    reclaimed += finish(repo, tl, wait=wait)
    pending = conn.execute("SELECT 1 FROM repacked WHERE tl = ? AND done = 0 LIMIT 1",
                           (tl,)).fetchone()
    return CompactResult(timeline_id, records, before, after, reclaimed,
                         complete and pending is None)


def _candidates(repo: SqliteRepository, f: DataFile, tl: int, start: int
                ) -> Iterator[tuple[int, _Move | None]]:
    """The images of the frame at ``start`` that may be packed: (their length, the move
    when packing saves a quarter, else None). The index row must still be the plain image
    at that place (GC may have removed it; the directory flags that only later)."""
    conn = repo._conn()
    for key, lsn, kind, off, length in read_directory(f, start):
        if kind != _IMAGE or length < BLOCK:
            continue
        if conn.execute("SELECT 1 FROM records WHERE tl = ? AND key = ? AND lsn = ?"
                        " AND kind = ? AND off = ?", (tl, key, lsn, _IMAGE, off)).fetchone() \
                is None:
            continue
        packed = redo.pack_image(f.pread(off, length))
        yield length, (None if packed is None else _Move(start, key, lsn, off, length, packed))


def _commit(repo: SqliteRepository, tl: int, moves: list[_Move], upto: int
            ) -> tuple[int, int, int]:
    """Store ``moves`` as one pack frame and point the index at it; ``compacted`` moves to
    ``upto`` (the frames that start before it were looked at). Returns (records, bytes
    before, bytes after)."""
    txn = repo._transaction()
    with txn as w:
        row = repo._row_by_id(w, tl)
        if row is None:
            raise UnknownTimeline("the timeline was deleted while it was compacted")
        live = [m for m in moves if w.execute(
            "SELECT 1 FROM records WHERE tl = ? AND key = ? AND lsn = ? AND kind = ?"
            " AND off = ?", (tl, m.key, m.lsn, _IMAGE, m.off)).fetchone() is not None]
        if not live:
            w.execute("UPDATE timelines SET compacted = max(compacted, ?) WHERE id = ?",
                      (upto, tl))
            return 0, 0, 0
        writer = _start_frame(repo, row, txn)
        end, offsets = write_pack(writer.f, writer.start, [m.packed for m in live])
        if repo._durable:
            os.fdatasync(writer.f.fd)  # the packed bytes before the index cites them
        w.executemany(
            "UPDATE records SET kind = ?, off = ?, len = ? WHERE tl = ? AND key = ? AND lsn = ?",
            [(_IMAGE | PACKED, off, len(m.packed), tl, m.key, m.lsn)
             for m, off in zip(live, offsets, strict=True)])
        w.executemany(
            "INSERT OR REPLACE INTO repacked (tl, key, lsn, frame, old_off, old_len, off, len,"
            " done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
            [(tl, m.key, m.lsn, m.frame, m.off, m.length, off, len(m.packed))
             for m, off in zip(live, offsets, strict=True)])
        w.execute("INSERT INTO packs (tl, start, end, live) VALUES (?, ?, ?, ?)",
                  (tl, writer.start, end, len(live)))
        before = sum(m.length for m in live)
        after = sum(len(m.packed) for m in live)
        w.execute("UPDATE timelines SET data_end = ?, compacted = max(compacted, ?),"
                  " packed_saving = packed_saving + ? WHERE id = ?",
                  (end, upto, before - after, tl))
    return len(live), before, after


def finish(repo: SqliteRepository, tl: int, *, wait: float) -> int:
    """Point the directory entries of the moves not done yet to their new places and
    punch the old payloads out, once no read of an older generation of holds is left
    and no walk holds the file (else a later pass does it). Returns the bytes punched."""
    conn = repo._conn()
    if conn.execute("SELECT 1 FROM repacked WHERE tl = ? AND done = 0 LIMIT 1",
                    (tl,)).fetchone() is None:
        return 0
    generation = repo._pins.next_generation()
    if not repo._pins.wait_generation(generation, wait):
        return 0
    with repo._pins.reclaiming(tl) as free:
        if not free:
            return 0
        row = repo._row_by_id(conn, tl)
        if row is None:
            return 0
        pending = conn.execute(
            "SELECT key, lsn, frame, old_off, old_len, off, len FROM repacked"
            " WHERE tl = ? AND done = 0", (tl,)).fetchall()
        f = repo._file(row)
        by_frame: dict[int, dict[tuple[bytes, int], tuple[int, int]]] = {}
        for key, lsn, frame, _old_off, _old_len, off, length in pending:
            by_frame.setdefault(int(frame), {})[(bytes(key), int(lsn))] = (int(off),
                                                                           int(length))
        for frame, moved in by_frame.items():
            mark_packed(f, frame, moved)
        if repo._durable:
            os.fdatasync(f.fd)  # the entries point to the new places before a byte goes
        punched = punch(f, [(int(p[3]), int(p[4])) for p in pending])
        with repo._transaction() as w:
            w.executemany("UPDATE repacked SET done = 1 WHERE tl = ? AND key = ? AND lsn = ?",
                          [(tl, p[0], p[1]) for p in pending])
        return punched
