"""The repository's write path: batches into data-file frames, the index rows, and the
history hash (``history.py``) kept at every commit point.

Functions of a :class:`~zenith.storage.sqlite.SqliteRepository`, whose methods call them
(split from ``sqlite.py`` by concept: that module reads and names, this one writes).
``docs/storage.md`` describes the durability protocol they follow.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from zenith.errors import (
    HistoryImmutable,
    HistoryMismatch,
    InvalidArgument,
    LsnOutOfRange,
)
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import redo
from zenith.storage.api import MAX_STORED_LSN, Cursor, Record, RecordKind, WriteResult
from zenith.storage.datafile import (
    CorruptDataFile,
    FrameWriter,
    HistoryCollected,
    file_name,
    walk,
)
from zenith.storage.history import EMPTY, Folder, OpenLsn, record_digest
from zenith.storage.schema import Transaction

if TYPE_CHECKING:
    from zenith.storage.sqlite import SqliteRepository

TL_COLUMNS: Final = (
    "id, timeline_id, ancestor, ancestor_lsn, last_record_lsn, min_readable_lsn, data_end,"
    " received, hash, pending_lsn, pending_count, pending_key, pending_sum,"
    " collected_lsn, base_lsn, foreign_ancestor, base_done, base_from"
)
#: A timelines row, in ``TL_COLUMNS`` order.
Row = tuple[
    int, bytes, int | None, int | None, int, int, int,
    int, bytes, int | None, int, bytes | None, bytes | None,
    int, int | None, bytes | None, int, str | None,
]
#: Records in one data-file frame: a larger batch given in LSN order is split.
FRAME_RECORDS: Final = 65536


def check_lsn(lsn: Lsn | int) -> Lsn:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_STORED_LSN:
        raise InvalidArgument(f"LSN {lsn!r} is out of range")
    return Lsn(lsn)


def hash_all(repo: SqliteRepository, conn: sqlite3.Connection) -> None:
    """Compute every timeline's history hash from its records (schema 2 had none), with
    a history row at each batch's end (schema 2 batches never split an LSN), so a hash
    at any LSN stays a lookup and a fold over at most one batch."""
    for row in conn.execute(f"SELECT {TL_COLUMNS} FROM timelines").fetchall():
        folder = Folder()
        starts = [r[0] for r in conn.execute(
            "SELECT start, last_lsn FROM batches WHERE tl = ? ORDER BY last_lsn, start",
            (row[0],))]
        ends = conn.execute(
            "SELECT last_lsn FROM batches WHERE tl = ? ORDER BY last_lsn, start", (row[0],)
        ).fetchall()
        f = repo._file(row) if starts else None
        for i, start in enumerate(starts):
            assert f is not None
            stop = starts[i + 1] if i + 1 < len(starts) else row[6]
            for rec in walk(f, start, stop, 0, row[4]):
                folder.add(rec.key, rec.lsn, rec.kind, rec.payload)
            conn.execute("INSERT OR REPLACE INTO history (tl, lsn, hash) VALUES (?, ?, ?)",
                         (row[0], min(ends[i][0], row[4]), folder.close()))
        digest = folder.close()
        conn.execute("UPDATE timelines SET hash = ? WHERE id = ?", (digest, row[0]))
        conn.execute("INSERT OR REPLACE INTO history (tl, lsn, hash) VALUES (?, ?, ?)",
                     (row[0], row[4], digest))


def put_records(
    repo: SqliteRepository,
    timeline_id: TimelineId,
    records: Iterable[Record],
    last_record_lsn: Lsn | None = None,
    *,
    partial: bool = False,
    expect_hash: bytes | None = None,
    digests: Iterable[int] | None = None,
) -> WriteResult:
    """Append records above ``last_record_lsn`` (or, continuing the pending LSN, after its
    stored records) and publish the new ``last_record_lsn``, its history hash and the
    pending cursor in the same transaction. ``partial``: the batch's greatest LSN may go
    on in a later batch, so it is stored and not published. ``digests``: each record's
    ``history.record_digest``, when the caller computed them already (in parallel).
    All or nothing: a refused or failed batch leaves neither index rows nor bytes in
    the data file."""
    if last_record_lsn is not None:
        check_lsn(last_record_lsn)
        if partial:
            raise InvalidArgument("a partial batch publishes only the LSNs it completes")
    txn = repo._transaction()
    with txn as conn:
        row = repo._row_by_tid(conn, timeline_id)
        internal, current, data_end = row[0], Lsn(row[4]), row[6]
        if not row[16]:
            raise InvalidArgument(f"timeline {timeline_id} is still receiving its base")
        pending = (
            OpenLsn(row[9], row[10], int.from_bytes(row[12] or b"", "big"))
            if row[9] is not None else None
        )
        floor = pending.lsn - 1 if pending is not None else int(current)
        if last_record_lsn is not None and last_record_lsn < current:
            raise HistoryImmutable(
                f"last record LSN {last_record_lsn} is behind the timeline's {current}"
            )
        # Publishing below a pending LSN is fine: its records stay pending (no record
        # can lie between the published LSN and it: they arrived in LSN order).
        limit = last_record_lsn
        writer: FrameWriter | None = None
        count = 0
        split_at = -1  # greatest LSN of the frames this batch already finished
        top, top_key = -1, b""
        opened: dict[int, OpenLsn] = {}
        given = iter(digests) if digests is not None else None
        for rec in records:
            rec.validate()
            lsn = rec.lsn
            if lsn <= floor:
                raise HistoryImmutable(
                    f"record at {lsn} is at or below the timeline's last record "
                    f"LSN {current}: recorded history never changes"
                )
            if limit is not None and lsn > limit:
                raise InvalidArgument(
                    f"record at {lsn} is beyond the batch's last record LSN {limit}"
                )
            _check_payload(rec)
            if writer is None:
                writer = _start_frame(repo, row, txn)
            elif len(writer.entries) >= FRAME_RECORDS and writer.in_order \
                    and lsn >= writer.last_lsn:
                # A large batch (a base-backup import) goes into several frames, so
                # that neither this writer nor a reader ever holds one huge directory.
                data_end = _finish_frame(repo, conn, internal, writer)
                count += len(writer.entries)
                split_at = writer.last_lsn
                writer = FrameWriter(writer.f, data_end)
            elif lsn < split_at:
                raise InvalidArgument(
                    f"record at {lsn} is below {Lsn(split_at)}: a batch of more than "
                    f"{FRAME_RECORDS} records must come in LSN order"
                )
            writer.add(rec.key, int(lsn), int(rec.kind), rec.payload)
            group = opened.get(lsn)
            if group is None:
                group = opened[lsn] = OpenLsn(lsn)
            group.add(next(given) if given is not None
                      else record_digest(rec.key, lsn, rec.kind, rec.payload))
            if lsn >= top:
                top, top_key = int(lsn), rec.key
        if writer is not None:
            data_end = _finish_frame(repo, conn, internal, writer)
            count += len(writer.entries)
        # The pending LSN's earlier records join this batch's ones.
        pending_key = row[11]
        if pending is not None:
            group = opened.get(pending.lsn)
            if group is None:
                opened[pending.lsn] = pending
            else:
                group.count += pending.count
                group.total = (group.total + pending.total) % (1 << 256)
        lsns = sorted(opened)
        still_open: OpenLsn | None = None
        if lsns and (partial or (last_record_lsn is not None
                                 and lsns[-1] > last_record_lsn)):
            # Partial, or publishing below the pending LSN: that LSN stays open.
            still_open = opened.pop(lsns.pop())
            if still_open.lsn == top:
                pending_key = top_key
        digest = row[8]
        for complete in lsns:
            digest = opened[complete].close(digest)
        new_last: int = max([int(current), *lsns])
        if last_record_lsn is not None:
            new_last = max(new_last, int(last_record_lsn))
        if expect_hash is not None and digest != expect_hash:
            raise HistoryMismatch(
                f"the records up to {Lsn(new_last)} do not have the history hash the "
                "sender announced for them; nothing of this batch was kept"
            )
        conn.execute(
            "UPDATE timelines SET last_record_lsn = ?, data_end = ?, hash = ?,"
            " pending_lsn = ?, pending_count = ?, pending_key = ?, pending_sum = ?"
            " WHERE id = ?",
            (
                new_last, data_end, digest,
                still_open.lsn if still_open else None,
                still_open.count if still_open else 0,
                pending_key if still_open else None,
                still_open.total.to_bytes(32, "big") if still_open else None,
                internal,
            ),
        )
        if digest != row[8]:
            # With the commit's time: GC turns a time window ("7d") into an LSN from these.
            conn.execute(
                "INSERT OR REPLACE INTO history (tl, lsn, hash, at) VALUES (?, ?, ?, ?)",
                (internal, new_last, digest, time.time()),
            )
        pending_cursor = (Cursor(Lsn(still_open.lsn), still_open.count, pending_key or b"")
                          if still_open else None)
        return WriteResult(count, Lsn(new_last), pending_cursor)

def history_hash(repo: SqliteRepository, timeline_id: TimelineId, lsn: Lsn) -> bytes:
    """The chained hash of the timeline's own records up to ``lsn`` (``history.py``):
    the nearest commit point at or below it, then the records after it folded in."""
    conn = repo._conn()
    row = repo._row_by_tid(conn, timeline_id)
    lsn = check_lsn(lsn)
    start = Lsn(row[3] or 0)
    if not start <= lsn <= row[4]:
        raise LsnOutOfRange(
            f"LSN {lsn} is outside timeline {timeline_id}'s history ({start}, "
            f"{Lsn(row[4])}]"
        )
    if row[14] is not None and (lsn < row[14] or not row[16]):
        raise HistoryCollected(
            f"timeline {timeline_id} is held here from {Lsn(row[14])} on (received "
            f"shallow): its history hash at {lsn} is not known here")
    found = conn.execute(
        "SELECT lsn, hash FROM history WHERE tl = ? AND lsn <= ? ORDER BY lsn DESC LIMIT 1",
        (row[0], lsn),
    ).fetchone()
    base, digest = (found[0], found[1]) if found is not None else (int(start), EMPTY)
    if base == lsn:
        return bytes(digest)
    folder = Folder(bytes(digest))
    for rec in repo.iter_records(timeline_id, Lsn(base), lsn):
        folder.add(rec.key, rec.lsn, rec.kind, rec.payload)
    return folder.close()


def put_base(repo: SqliteRepository, timeline_id: TimelineId,
             records: Iterable[Record]) -> int:
    """Append base images to a shallow timeline whose base is incomplete (one
    transaction; no history hash: the base stands in for history not held here)."""
    txn = repo._transaction()
    with txn as conn:
        row = repo._row_by_tid(conn, timeline_id)
        base = row[14]
        if base is None or row[16]:
            raise InvalidArgument(f"timeline {timeline_id} is not receiving a base")
        internal, data_end = row[0], row[6]
        writer: FrameWriter | None = None
        count = 0
        for rec in records:
            rec.validate()
            if rec.lsn > base or rec.kind is RecordKind.TOMBSTONE:
                raise InvalidArgument(
                    f"a base holds images and deltas at or below {Lsn(base)}; got a "
                    f"{rec.kind.name.lower()} at {rec.lsn}")
            _check_payload(rec)
            if writer is None:
                writer = _start_frame(repo, row, txn)
            elif len(writer.entries) >= FRAME_RECORDS:
                data_end = _finish_frame(repo, conn, internal, writer)
                count += len(writer.entries)
                writer = FrameWriter(writer.f, data_end)
            writer.add(rec.key, int(rec.lsn), int(rec.kind), rec.payload)
        if writer is not None:
            data_end = _finish_frame(repo, conn, internal, writer)
            count += len(writer.entries)
        conn.execute("UPDATE timelines SET data_end = ? WHERE id = ?", (data_end, internal))
        return count


def _check_payload(rec: Record) -> None:
    """What storage checks of a payload before it keeps it: a delta's redo type is known,
    a compressed image declares a bounded size (never a bomb for later readers)."""
    if rec.kind is RecordKind.DELTA and not redo.is_known(rec.payload):
        raise InvalidArgument(
            f"delta record at {rec.lsn} has unknown redo type {rec.payload[0]}")
    if rec.kind is RecordKind.ZIMAGE:
        redo.check_image(rec.payload)


def _start_frame(repo: SqliteRepository, row: Row, txn: Transaction) -> FrameWriter:
    """Open (or create) the timeline's data file for a new frame at ``data_end``, first
    cutting off what a crashed or refused batch left; on abort, cut it off again."""
    name, data_end = file_name(row[1], row[0]), row[6]
    f, created = repo._files.open(name, create=True)
    size = f.size()
    if size < data_end:
        raise CorruptDataFile(
            f"data file {name} has {size} bytes, fewer than the {data_end} committed"
        )
    if size > data_end:
        os.ftruncate(f.fd, data_end)

    def undo() -> None:
        if created:
            repo._files.remove(name)
        else:
            os.ftruncate(f.fd, data_end)

    txn.on_abort.append(undo)
    return FrameWriter(f, data_end)

def _finish_frame(
    repo: SqliteRepository, conn: sqlite3.Connection, internal: int, w: FrameWriter
) -> int:
    """Write the frame's directory, index its records, make it durable; the new end."""
    end = w.finish()
    try:
        # ``internal`` is an int from the database: safe to inline, and it keeps each
        # row tuple the directory entry itself.
        conn.executemany(
            f"INSERT INTO records (tl, key, lsn, kind, off, len)"
            f" VALUES ({internal:d}, ?, ?, ?, ?, ?)",
            w.entries,
        )
    except sqlite3.IntegrityError as exc:
        raise InvalidArgument(f"two records for one key at one LSN: {exc}") from exc
    conn.execute(
        "INSERT INTO batches (tl, last_lsn, first_lsn, start, records, bytes)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (internal, w.entries[-1][1], w.entries[0][1], w.start, len(w.entries), w.data_bytes),
    )
    if repo._durable:
        w.sync()
    return end
