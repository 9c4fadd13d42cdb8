"""The embedded repository engine: a SQLite index beside append-only data files.

SQLite (WAL mode, ``synchronous=FULL`` when durable) holds the metadata and the index:
timelines, branches, and per record ``(tl, key, lsn) -> (kind, offset, length)``. The
payloads live in one append-only data file per timeline (``datafile.py``), because SQLite
in WAL mode writes each byte twice and serves 8 KiB blobs several times slower than a
plain read. The index answers every question without scanning unrelated data:

* ``records`` (a WITHOUT ROWID table on ``(tl, key, lsn)``) — GetPage@LSN: the newest
  record of a key at or below an LSN, then one ``pread`` per payload needed;
* ``batches`` (``(tl, last_lsn)`` -> where the batch's frame starts) — the records of a
  timeline in an LSN range: find the first frame, then walk the data file, whose frames
  are in LSN order and carry their own sorted directories.

A write batch appends one frame at the timeline's committed end ``data_end``, flushes it
(``fdatasync``), and only then commits, in ONE transaction, its index rows and the
timeline's new ``last_record_lsn`` and ``data_end``. So a batch is visible entirely or not
at all, and bytes past ``data_end`` (a crashed or refused batch) are never cited; they are
cut off when the repository opens and before each batch. Deleting a timeline deletes its
rows, then (after the commit) its file; readers already holding the file keep reading.

One writer at a time (a lock per repository object, and SQLite's write lock across
processes). Each thread gets its own connection for reads; an iterator takes its snapshot
(the committed end and the first frame) when it is created and then needs only the file.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import heapq
import itertools
import mmap
import os
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Final

from zenith.errors import (
    AlreadyExists,
    Cancelled,
    InvalidArgument,
    LimitExceeded,
    LsnOutOfRange,
    ObjectInUse,
    UnknownBranch,
    UnknownTimeline,
)
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import compaction, redo, schema, writes
from zenith.storage.api import (
    KEY_SIZE,
    MAX_STORED_LSN,
    BranchInfo,
    Cursor,
    Record,
    RecordKind,
    TimelineInfo,
    WriteResult,
    checked_record,
    validate_branch_name,
)
from zenith.storage.compaction import CompactResult
from zenith.storage.datafile import (
    HEADER,
    PACKED,
    CorruptDataFile,
    DataFile,
    DataFiles,
    HistoryCollected,
    file_name,
    mark_removed,
    punch,
    read_directory,
    walk,
)
from zenith.storage.gc import GcResult, Pins, needed
from zenith.storage.schema import Transaction
from zenith.storage.writes import TL_COLUMNS, Row, check_lsn

_DIGEST_LEN: Final = struct.Struct(">I")
#: Every this many GC passes of a timeline look at every key, not only those written
#: since the last horizon (garbage left when kept points went away).
FULL_SWEEP_EVERY: Final = 16
#: Keys between two looks at a cancellation event (a few milliseconds of work).
CANCEL_CHECK_EVERY: Final = 256
_IMAGE: Final = int(RecordKind.IMAGE)
_ZIMAGE: Final = int(RecordKind.ZIMAGE)
#: An image compaction stored packed (index kinds carry datafile.PACKED): the same
#: record, its payload compressed like a ZIMAGE's.
_PACKED_IMAGE: Final = _IMAGE | PACKED
#: The index kinds that hold a whole value (a read needs nothing before them).
_IMAGES: Final = (_IMAGE, _ZIMAGE, _PACKED_IMAGE)
#: ... and those whose payload is compressed.
_ZIPPED: Final = (_ZIMAGE, _PACKED_IMAGE)
_DELTA: Final = int(RecordKind.DELTA)

#: A pack frame's header: its payload blocks after it are punched once no record is kept.
PACK_HEADER: Final = HEADER.size
#: Where a payload is: the timeline's row, offset, length.
_Loc = tuple[Row, int, int]


class SqliteRepository:
    """A repository in one SQLite file. Implements :class:`zenith.storage.api.Repository`."""

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = Path(path)
        #: The timelines' data files live in ``<database>.d/`` beside the database.
        self.data_dir = self.path.with_name(self.path.name + ".d")
        self._durable = durable
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        #: LSNs reads in progress hold (GC keeps what they read); one GC at a time.
        self._pins = Pins()
        self._gc_lock = threading.Lock()
        self._gc_passes: dict[int, int] = {}
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrated = schema.prepare(conn, self.path)
                self._files = self._recover(conn)
                if migrated:
                    writes.hash_all(self, conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        # Moves a compaction committed and a crash left unfinished (no read runs yet).
        for (tl,) in conn.execute("SELECT DISTINCT tl FROM repacked WHERE done = 0").fetchall():
            compaction.finish(self, tl, wait=0.0)

    def _recover(self, conn: sqlite3.Connection) -> DataFiles:
        """Bring the data files back to what the index committed: a crash may have left a
        partial batch or an undeleted file."""
        files = DataFiles(self.data_dir, durable=self._durable)
        rows = conn.execute("SELECT id, timeline_id, data_end FROM timelines")
        files.recover({file_name(tid, internal): end for internal, tid, end in rows})
        return files

    # connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        return schema.connect(self.path, durable=self._durable)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    def close(self) -> None:
        """Close the connections. Data files are closed as their last reader drops them."""
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()
        self._local = threading.local()
        self._files.clear()

    @property
    def repository_id(self) -> str:
        row = self._conn().execute("SELECT value FROM meta WHERE name='repository_id'").fetchone()
        return str(row[0])

    # timelines -----------------------------------------------------------------------------

    def _row_by_tid(self, conn: sqlite3.Connection, timeline_id: TimelineId) -> Row:
        row = conn.execute(
            f"SELECT {TL_COLUMNS} FROM timelines WHERE timeline_id = ?", (bytes(timeline_id),)
        ).fetchone()
        if row is None:
            raise UnknownTimeline(f'timeline "{timeline_id}" does not exist')
        return row  # type: ignore[no-any-return]

    def _row_by_id(self, conn: sqlite3.Connection, internal: int) -> Row:
        row = conn.execute(f"SELECT {TL_COLUMNS} FROM timelines WHERE id = ?", (internal,))
        return row.fetchone()  # type: ignore[no-any-return]

    def _info(self, conn: sqlite3.Connection, row: Row) -> TimelineInfo:
        ancestor_tid = None
        if row[2] is not None:
            ancestor_tid = TimelineId(self._row_by_id(conn, row[2])[1])
        elif row[15] is not None:  # a shallow timeline's ancestor, not held here
            ancestor_tid = TimelineId(row[15])
        return TimelineInfo(
            timeline_id=TimelineId(row[1]),
            ancestor_id=ancestor_tid,
            ancestor_lsn=Lsn(row[3]) if row[3] is not None else None,
            last_record_lsn=Lsn(row[4]),
            min_readable_lsn=Lsn(row[5]),
            received=bool(row[7]),
            pending=(
                Cursor(Lsn(row[9]), row[10], row[11] or b"") if row[9] is not None else None
            ),
            collected_lsn=Lsn(row[13]),
            base_lsn=Lsn(row[14]) if row[14] is not None else None,
            base_complete=bool(row[16]),
            base_from=row[17],
        )

    def create_timeline(
        self,
        timeline_id: TimelineId | None = None,
        ancestor: tuple[TimelineId, Lsn] | None = None,
        *,
        min_readable_lsn: Lsn | None = None,
        received: bool = False,
    ) -> TimelineInfo:
        tid = TimelineId.generate() if timeline_id is None else TimelineId(timeline_id)
        with self._transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM timelines WHERE timeline_id = ?", (bytes(tid),)
            ).fetchone():
                raise AlreadyExists(f'timeline "{tid}" already exists')
            ancestor_id: int | None = None
            start = Lsn(0)
            if ancestor is not None:
                parent = self._row_by_tid(conn, ancestor[0])
                start = check_lsn(ancestor[1])
                self._check_readable(parent, start, what="branch point")
                ancestor_id = parent[0]
            readable = start if min_readable_lsn is None else check_lsn(min_readable_lsn)
            if readable < start:
                raise InvalidArgument(
                    f"min readable LSN {readable} is before the timeline's start {start}"
                )
            conn.execute(
                "INSERT INTO timelines (timeline_id, ancestor, ancestor_lsn, last_record_lsn,"
                " min_readable_lsn, received) VALUES (?, ?, ?, ?, ?, ?)",
                (bytes(tid), ancestor_id, start if ancestor else None, start, readable,
                 int(received)),
            )
            return self._info(conn, self._row_by_tid(conn, tid))

    def create_shallow_timeline(
        self, timeline_id: TimelineId, ancestor: tuple[TimelineId, Lsn] | None, base_lsn: Lsn,
        *, source: str | None = None,
    ) -> TimelineInfo:
        """See :meth:`Repository.create_shallow_timeline`."""
        tid = TimelineId(timeline_id)
        base = check_lsn(base_lsn)
        if ancestor is not None and ancestor[0] == tid:
            raise InvalidArgument(f"timeline {tid} cannot descend from itself")
        if ancestor is not None and not check_lsn(ancestor[1]) <= base:
            raise InvalidArgument(f"base LSN {base} is before the timeline's start {ancestor[1]}")
        with self._transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM timelines WHERE timeline_id = ?", (bytes(tid),)
            ).fetchone():
                raise AlreadyExists(f'timeline "{tid}" already exists')
            conn.execute(
                "INSERT INTO timelines (timeline_id, ancestor, ancestor_lsn, last_record_lsn,"
                " min_readable_lsn, received, collected_lsn, base_lsn, foreign_ancestor,"
                " base_done, base_from) VALUES (?, NULL, ?, ?, ?, 1, ?, ?, ?, 0, ?)",
                (bytes(tid), ancestor[1] if ancestor else None, base, base, base, base,
                 bytes(ancestor[0]) if ancestor else None, source),
            )
            return self._info(conn, self._row_by_tid(conn, tid))

    def put_base(self, timeline_id: TimelineId, records: Iterable[Record]) -> int:
        """See :meth:`Repository.put_base` and :func:`writes.put_base`."""
        return writes.put_base(self, timeline_id, records)

    def finish_base(self, timeline_id: TimelineId, history_hash: bytes) -> TimelineInfo:
        """See :meth:`Repository.finish_base`."""
        if not isinstance(history_hash, bytes) or len(history_hash) != 32:
            raise InvalidArgument("a history hash is 32 bytes")
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            if row[14] is None or row[16]:
                raise InvalidArgument(f"timeline {timeline_id} is not receiving a base")
            conn.execute("UPDATE timelines SET hash = ?, base_done = 1 WHERE id = ?",
                         (history_hash, row[0]))
            conn.execute("INSERT OR REPLACE INTO history (tl, lsn, hash, at) VALUES (?, ?, ?, ?)",
                         (row[0], row[14], history_hash, time.time()))
            return self._info(conn, self._row_by_tid(conn, timeline_id))

    def get_timeline(self, timeline_id: TimelineId) -> TimelineInfo:
        conn = self._conn()
        return self._info(conn, self._row_by_tid(conn, timeline_id))

    def list_timelines(self) -> list[TimelineInfo]:
        conn = self._conn()
        rows = conn.execute(f"SELECT {TL_COLUMNS} FROM timelines ORDER BY id").fetchall()
        return [self._info(conn, row) for row in rows]

    def set_min_readable_lsn(self, timeline_id: TimelineId, lsn: Lsn) -> None:
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            start = Lsn(row[3] or 0)
            if check_lsn(lsn) < start:
                raise InvalidArgument(f"min readable LSN {lsn} is before the start {start}")
            conn.execute("UPDATE timelines SET min_readable_lsn = ? WHERE id = ?", (lsn, row[0]))

    def _check_readable(self, row: Row, lsn: Lsn, *, what: str = "LSN",
                        before_readable: bool = False) -> None:
        tid = TimelineId(row[1])
        if not row[16]:
            raise LsnOutOfRange(f"timeline {tid} is still being received (its base at "
                                f"{Lsn(row[14] or 0)} is incomplete)")
        if lsn > row[4]:
            raise LsnOutOfRange(
                f"{what} {lsn} is beyond the last record LSN {Lsn(row[4])} of timeline {tid}"
            )
        if row[14] is not None and lsn < row[14]:  # a shallow timeline's base: no further
            raise LsnOutOfRange(
                f"{what} {lsn} is before timeline {tid} is readable (a shallow copy, held "
                f"here from {Lsn(row[14])} on)")
        if lsn < row[5] and not before_readable:
            raise LsnOutOfRange(
                f"{what} {lsn} is before timeline {tid} is readable (from {Lsn(row[5])} on)"
            )

    # branches ------------------------------------------------------------------------------

    def create_branch(
        self, name: str, source: str | TimelineId | None = None, lsn: Lsn | None = None
    ) -> BranchInfo:
        validate_branch_name(name)
        if source is None:
            if lsn is not None:
                raise InvalidArgument("a branch point LSN needs a source branch or timeline")
            ancestor = None
        else:
            parent = self.resolve(source) if isinstance(source, str) else self.get_timeline(source)
            ancestor = (parent.timeline_id, parent.last_record_lsn if lsn is None else lsn)
        with self._write_lock:
            # The name check and the insert must not interleave with another create.
            conn = self._conn()
            if conn.execute("SELECT 1 FROM branches WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f'branch "{name}" already exists')
        timeline = self.create_timeline(ancestor=ancestor)
        try:
            return self._point(name, timeline.timeline_id, create_only=True)
        except AlreadyExists:
            self._drop_unreferenced(timeline.timeline_id)
            raise

    def set_branch(self, name: str, timeline_id: TimelineId) -> BranchInfo:
        validate_branch_name(name)
        return self._point(name, timeline_id, create_only=False)

    def move_branch(
        self, name: str, timeline_id: TimelineId, expected: TimelineId | None
    ) -> BranchInfo:
        validate_branch_name(name)
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            current = conn.execute(
                "SELECT t.timeline_id FROM branches b JOIN timelines t ON t.id = b.timeline"
                " WHERE b.name = ?", (name,)).fetchone()
            if (current[0] if current else None) != (bytes(expected) if expected else None):
                raise ObjectInUse(
                    f'branch "{name}" changed while it was being updated (it now points at '
                    f"{TimelineId(current[0]) if current else 'nothing'})",
                    hint="run the command again",
                )
            conn.execute(
                "INSERT INTO branches (name, timeline) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET timeline = excluded.timeline",
                (name, row[0]),
            )
            return BranchInfo(name, self._info(conn, row))

    def _point(self, name: str, timeline_id: TimelineId, *, create_only: bool) -> BranchInfo:
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            exists = conn.execute("SELECT 1 FROM branches WHERE name = ?", (name,)).fetchone()
            if exists and create_only:
                raise AlreadyExists(f'branch "{name}" already exists')
            conn.execute(
                "INSERT INTO branches (name, timeline) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET timeline = excluded.timeline",
                (name, row[0]),
            )
            return BranchInfo(name, self._info(conn, row))

    def get_branch(self, name: str) -> BranchInfo:
        conn = self._conn()
        return BranchInfo(name, self._info(conn, self._row_by_name(conn, name)))

    def _row_by_name(self, conn: sqlite3.Connection, name: str) -> Row:
        row = conn.execute(
            f"SELECT {TL_COLUMNS} FROM timelines WHERE id ="
            " (SELECT timeline FROM branches WHERE name = ?)",
            (name,),
        ).fetchone()
        if row is None:
            raise UnknownBranch(f'branch "{name}" does not exist')
        return row  # type: ignore[no-any-return]

    def list_branches(self) -> list[BranchInfo]:
        conn = self._conn()
        rows = conn.execute(
            f"SELECT b.name, {', '.join('t.' + c.strip() for c in TL_COLUMNS.split(','))}"
            " FROM branches b JOIN timelines t ON t.id = b.timeline ORDER BY b.name"
        ).fetchall()
        return [BranchInfo(r[0], self._info(conn, r[1:])) for r in rows]

    def delete_branch(self, name: str) -> None:
        """Remove the name. A timeline left without names and descendants is dropped with its
        records, and so in turn are ancestors left in that state; any timeline that another
        timeline descends from keeps its data."""
        info = self.get_branch(name)
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM branches WHERE name = ?", (name,)).rowcount
            if not deleted:
                raise UnknownBranch(f'branch "{name}" does not exist')
        self._drop_unreferenced(info.timeline.timeline_id)

    def _drop_unreferenced(self, timeline_id: TimelineId) -> None:
        dropped: list[str] = []
        with self._transaction() as conn:
            row: Row | None = self._row_by_tid(conn, timeline_id)
            while row is not None:
                if self._in_use(conn, row[0]):
                    break
                dropped.append(self._drop(conn, row))
                row = self._row_by_id(conn, row[2]) if row[2] is not None else None
        for name in dropped:  # only once the deletion is committed
            self._files.remove(name)

    def delete_timeline(self, timeline_id: TimelineId) -> None:
        """Drop a timeline that has no names and no descendants, with its records and its
        data file. Iterators already reading it keep going."""
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            if self._in_use(conn, row[0]):
                raise ObjectInUse(f"timeline {timeline_id} has a branch name or descendants")
            name = self._drop(conn, row)
        self._files.remove(name)

    @staticmethod
    def _in_use(conn: sqlite3.Connection, internal: int) -> bool:
        return bool(
            conn.execute(
                "SELECT EXISTS (SELECT 1 FROM branches WHERE timeline = ?)"
                " OR EXISTS (SELECT 1 FROM timelines WHERE ancestor = ?)",
                (internal, internal),
            ).fetchone()[0]
        )

    @staticmethod
    def _drop(conn: sqlite3.Connection, row: Row) -> str:
        """Delete a timeline's rows; return its data file's name, to remove after commit."""
        for table, column in (
            ("records", "tl"), ("batches", "tl"), ("history", "tl"), ("unpunched", "tl"),
            ("repacked", "tl"), ("packs", "tl"), ("timelines", "id")
        ):
            conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (row[0],))
        return file_name(row[1], row[0])

    def resolve(self, name_or_id: str) -> TimelineInfo:
        """A branch name, or a timeline id (32 hex characters), to its timeline."""
        if not isinstance(name_or_id, str):
            raise InvalidArgument(f"a branch name or timeline id, not {name_or_id!r}")
        if TimelineId.looks_like(name_or_id):
            return self.get_timeline(TimelineId.parse(name_or_id))
        return self.get_branch(name_or_id).timeline

    # records -------------------------------------------------------------------------------

    def put_records(
        self,
        timeline_id: TimelineId,
        records: Iterable[Record],
        last_record_lsn: Lsn | None = None,
        *,
        partial: bool = False,
        expect_hash: bytes | None = None,
        digests: Iterable[int] | None = None,
    ) -> WriteResult:
        """See :meth:`Repository.put_records` and :func:`writes.put_records`."""
        return writes.put_records(self, timeline_id, records, last_record_lsn,
                                  partial=partial, expect_hash=expect_hash, digests=digests)

    def history_hash(self, timeline_id: TimelineId, lsn: Lsn) -> bytes:
        """See :meth:`Repository.history_hash` and :func:`writes.history_hash`."""
        return writes.history_hash(self, timeline_id, lsn)

    def branch_for_writing(self, name: str) -> TimelineInfo:
        """The branch's timeline if this repository writes it; for a received timeline a new
        child at its ``last_record_lsn``, which the name then points to (one transaction)."""
        with self._transaction() as conn:
            row = self._row_by_name(conn, name)
            if not row[7]:
                return self._info(conn, row)
            self._check_readable(row, Lsn(row[4]), what="branch point")
            tid = TimelineId.generate()
            conn.execute(
                "INSERT INTO timelines (timeline_id, ancestor, ancestor_lsn, last_record_lsn,"
                " min_readable_lsn, received) VALUES (?, ?, ?, ?, ?, 0)",
                (bytes(tid), row[0], row[4], row[4], row[4]),
            )
            child = self._row_by_tid(conn, tid)
            conn.execute("UPDATE branches SET timeline = ? WHERE name = ?", (child[0], name))
            return self._info(conn, child)

    def get_value(self, timeline_id: TimelineId, key: bytes, lsn: Lsn, *,
                  before_readable: bool = False) -> bytes | None:
        """The value of ``key`` at ``lsn``: the newest image at or below it plus the deltas
        after it, falling back to the ancestor at the branch point. ``None``: no value.
        ``before_readable`` allows an LSN below ``min_readable_lsn``."""
        _check_key(key)
        conn = self._conn()
        epoch = self._pins.epoch  # before the row: see _pinned_value
        return self._pinned_value(conn, self._row_by_tid(conn, timeline_id), epoch, key, lsn,
                                  before_readable=before_readable)

    def get_value_of(self, name_or_id: str, key: bytes, lsn: Lsn, *,
                     max_deltas: int | None = None) -> bytes | None:
        """:meth:`get_value` for a branch name or timeline id, with one lookup for the
        timeline instead of resolving it first (GetPage's hot path). More than
        ``max_deltas`` deltas to apply is :class:`LimitExceeded`, found from the index
        before any payload is read."""
        _check_key(key)
        conn = self._conn()
        if not isinstance(name_or_id, str):
            raise InvalidArgument(f"a branch name or timeline id, not {name_or_id!r}")
        epoch = self._pins.epoch
        if TimelineId.looks_like(name_or_id):
            row = self._row_by_tid(conn, TimelineId.parse(name_or_id))
        else:
            row = self._row_by_name(conn, name_or_id)
        return self._pinned_value(conn, row, epoch, key, lsn, max_deltas=max_deltas)

    def _pinned_value(self, conn: sqlite3.Connection, row: Row, epoch: int, key: bytes,
                      lsn: Lsn, *, before_readable: bool = False,
                      max_deltas: int | None = None) -> bytes | None:
        """:meth:`_get_value` holding ``lsn`` on the timeline against GC. ``row`` was read
        after ``epoch``: if a GC moved some timeline's readable start since, it is read
        again, so the readable check sees the GC's horizon or the GC saw the pin."""
        with self._pins.hold(row[0], int(lsn), index=True):
            if self._pins.epoch != epoch:
                row = self._row_by_id(conn, row[0])
            return self._get_value(conn, row, key, lsn, before_readable=before_readable,
                                   max_deltas=max_deltas)

    def _get_value(
        self, conn: sqlite3.Connection, first: Row, key: bytes, lsn: Lsn, *,
        before_readable: bool = False, max_deltas: int | None = None,
    ) -> bytes | None:
        self._check_readable(first, check_lsn(lsn), before_readable=before_readable)
        row: Row | None = first
        deltas: list[_Loc] = []
        base: _Loc | None = None
        zipped = False
        bound = int(lsn)
        while row is not None:
            found = False
            for kind, off, length in conn.execute(
                "SELECT kind, off, len FROM records WHERE tl = ? AND key = ? AND lsn <= ?"
                " ORDER BY lsn DESC",
                (row[0], key, bound),
            ):
                if kind == _DELTA:
                    deltas.append((row, off, length))
                    if max_deltas is not None and len(deltas) > max_deltas:
                        raise LimitExceeded(
                            f"key {key.hex()} at {lsn} needs more than {max_deltas} deltas "
                            "applied: refused")
                    continue
                base = (row, off, length) if kind in _IMAGES else None
                zipped = kind in _ZIPPED
                found = True
                break
            if found or row[2] is None:
                break
            bound = int(row[3] or 0)
            row = self._row_by_id(conn, row[2])
        value = None if base is None else self._image(base, zipped)
        for loc in reversed(deltas):
            value = redo.apply_delta(value, self._payload(loc))
        return value

    def _payload(self, loc: _Loc) -> bytes:
        row, offset, length = loc
        return self._file(row).pread(offset, length) if length else b""

    def _image(self, loc: _Loc, zipped: bool) -> bytes:
        """The value an image record holds (a ``ZIMAGE`` decompressed)."""
        payload = self._payload(loc)
        return redo.unpack_image(payload) if zipped else payload

    def _file(self, row: Row) -> DataFile:
        """The timeline's open data file. A file missing because the timeline was deleted
        since ``row`` was read is :class:`UnknownTimeline`; otherwise it is corruption."""
        name = file_name(row[1], row[0])
        try:
            return self._files.open(name)[0]
        except FileNotFoundError:
            if self._conn().execute("SELECT 1 FROM timelines WHERE id = ?", (row[0],)).fetchone():
                raise CorruptDataFile(f"data file {name} is missing") from None
            raise UnknownTimeline(f'timeline "{TimelineId(row[1])}" was deleted') from None

    def iter_records(
        self, timeline_id: TimelineId, after: Lsn, upto: Lsn, *, skip: Cursor | None = None
    ) -> Iterator[Record]:
        """Records of this timeline only (not its ancestors) with lsn in ``(after, upto]``,
        in stored order (LSN order; within an LSN, the order they were written in, which
        every copy of the timeline keeps); ``skip`` leaves out the first ``skip.count`` of
        LSN ``skip.lsn`` without reading them. The snapshot is taken now: the iterator then
        reads only the data file (in large windows), holds no database transaction, and
        survives the timeline's deletion."""
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        lo, hi = _clamp(after), _clamp(upto)
        _check_history(row, lo, hi)
        # One statement, so the committed end and the first frame are one snapshot.
        snap = conn.execute(
            "SELECT t.data_end, (SELECT b.start FROM batches b WHERE b.tl = t.id"
            " AND b.last_lsn > ? ORDER BY b.last_lsn, b.start LIMIT 1)"
            " FROM timelines t WHERE t.id = ?",
            (lo, row[0]),
        ).fetchone()
        if snap is None:
            raise UnknownTimeline(f'timeline "{timeline_id}" was deleted')
        end, start = snap
        if start is None or lo >= hi:
            return iter(())
        skipping = (int(skip.lsn), skip.count, skip.key) \
            if skip is not None and skip.count else None
        return self._walking(row[0], lo, walk(self._file(row), start, end, lo, hi,
                                          skip=skipping))

    def _walking(self, tl: int, after: int, records: Iterator[Record]) -> Iterator[Record]:
        """``records`` (a walk of ``tl``'s data file after ``after``) while no GC reclaims
        space in the file, and no GC removes records after ``after`` (it holds ``after``
        as a read does): a record an earlier GC removed is refused by the walk
        (HistoryCollected), never read as zeros."""
        with self._pins.walking(tl), self._pins.hold(tl, after):
            yield from records

    @contextmanager
    def hold_history(self, timeline_id: TimelineId, after: Lsn) -> Iterator[None]:
        """Keep every record of the timeline after ``after`` (no GC horizon passes it)
        for the duration: a transfer holds the history it offered until it ends."""
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        with self._pins.hold(row[0], int(after)):
            yield

    def count_records(self, timeline_id: TimelineId, after: Lsn, upto: Lsn) -> tuple[int, int]:
        """Whole batches are counted from the index; the (at most two) batches cut by the
        range's ends from their directories in the data file."""
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        lo, hi = _clamp(after), _clamp(upto)
        if lo >= hi:
            return 0, 0
        _check_history(row, lo, hi)
        conn.execute("BEGIN")
        try:
            count, size = conn.execute(
                "SELECT total(records), total(bytes) FROM batches"
                " WHERE tl = ? AND last_lsn > ? AND last_lsn <= ? AND first_lsn > ?",
                (row[0], lo, hi, lo),
            ).fetchone()
            edges = set()
            for bound in (lo, hi):
                edge = conn.execute(
                    "SELECT start, first_lsn, last_lsn FROM batches WHERE tl = ? AND last_lsn > ?"
                    " ORDER BY last_lsn, start LIMIT 1",
                    (row[0], bound),
                ).fetchone()
                if edge and edge[1] <= hi and (edge[1] <= lo or edge[2] > hi):
                    edges.add(edge[0])
        finally:
            conn.execute("COMMIT")
        count, size = int(count), int(size)
        for start in edges:
            for key, lsn, kind, _off, length in read_directory(self._file(row), start):
                if lo < lsn <= hi:
                    if kind & PACKED:  # the record's own size, as whole batches count it
                        old = conn.execute("SELECT old_len FROM repacked WHERE tl = ?"
                                           " AND key = ? AND lsn = ?",
                                           (row[0], key, lsn)).fetchone()
                        length = int(old[0]) if old is not None else length
                    count, size = count + 1, size + length
        return count, size

    def ancestry(self, timeline_id: TimelineId) -> list[TimelineInfo]:
        """The timeline and its ancestors, nearest first."""
        chain = [self.get_timeline(timeline_id)]
        while chain[-1].ancestor_id is not None and chain[-1].base_lsn is None:
            chain.append(self.get_timeline(chain[-1].ancestor_id))
        return chain

    def materialize(
        self,
        timeline_id: TimelineId,
        lsn: Lsn,
        *,
        lo: bytes | None = None,
        hi: bytes | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every key with a value at ``lsn``, in key order; with ``lo``/``hi`` only the keys
        in ``[lo, hi)``, read through the (timeline, key, lsn) index without a scan.
        ``cancel``: once set, the iteration raises :class:`Cancelled` within
        CANCEL_CHECK_EVERY keys (a cancelled command frees its worker thread)."""
        if lo is not None:
            _check_key(lo)
        if hi is not None:
            _check_key(hi)
        chain = self._read_chain(timeline_id, lsn)
        return self._materialize(chain, lo or bytes(KEY_SIZE), hi, cancel)

    def base_records(self, timeline_id: TimelineId, lsn: Lsn) -> Iterator[Record]:
        """The records a read at ``lsn`` needs, key by key in key order (each key's newest
        image at or below it and the deltas after that, across the ancestry; nothing for
        a key without a value there): a shallow copy's base, sent as stored, no redo."""
        chain = self._read_chain(timeline_id, lsn)
        # Each timeline's file mapped once, read by slicing (a pread per record cost more
        # than the rest of the record); a payload past the mapping (written after it) is
        # read apart.
        maps: dict[int, tuple[DataFile, mmap.mmap | None]] = {}
        make = checked_record
        try:
            for _key, items in self._needed_at(chain, bytes(KEY_SIZE), None, None):
                for key, lsn_, kind, (row, off, length) in items:
                    found = maps.get(row[0])
                    if found is None:
                        f = self._file(row)
                        size = f.size()
                        found = maps[row[0]] = (f, mmap.mmap(f.fd, size, prot=mmap.PROT_READ)
                                                if size else None)
                    f, m = found
                    stop = off + length
                    if m is not None and stop <= len(m):
                        payload = m[off:stop]
                    else:
                        payload = f.pread(off, length) if length else b""
                    if kind == _PACKED_IMAGE:  # the record as it is, not as it is stored
                        kind, payload = _IMAGE, redo.unpack_image(payload)
                    yield make(key, lsn_, kind, payload)
        finally:
            for _f, m in maps.values():
                if m is not None:
                    m.close()

    def _read_chain(self, timeline_id: TimelineId, lsn: Lsn) -> list[tuple[Row, int]]:
        """(row, bound) of the timeline and its ancestors, root first, for a read at
        ``lsn`` (which must be readable)."""
        conn = self._conn()
        first = self._row_by_tid(conn, timeline_id)
        self._check_readable(first, check_lsn(lsn))
        row: Row | None = first
        chain: list[tuple[Row, int]] = []
        bound = int(lsn)
        while row is not None:
            chain.append((row, bound))
            bound = int(row[3] or 0)
            row = self._row_by_id(conn, row[2]) if row[2] is not None else None
        chain.reverse()
        return chain

    def _materialize(
        self, chain: list[tuple[Row, int]], lo: bytes, hi: bytes | None,
        cancel: threading.Event | None,
    ) -> Iterator[tuple[bytes, bytes]]:
        for key, items in self._needed_at(chain, lo, hi, cancel):
            head = items[0][2]
            value = self._image(items[0][3], head in _ZIPPED) if head in _IMAGES else None
            for item in items[1 if head in _IMAGES else 0:]:
                value = redo.apply_delta(value, self._payload(item[3]))
            if value is not None:
                yield key, value

    def _needed_at(
        self, chain: list[tuple[Row, int]], lo: bytes, hi: bytes | None,
        cancel: threading.Event | None,
    ) -> Iterator[tuple[bytes, list[tuple[bytes, int, int, _Loc]]]]:
        """For each key with records in ``[lo, hi)``, in key order, what a read at the
        chain's bound needs: (key, lsn, kind, where) of its newest image and the deltas
        after it (all its deltas if it has no image); keys whose newest record is a
        tombstone are left out. Holds the read against GC while it runs."""
        first, lsn = chain[-1]
        with self._pins.hold(first[0], lsn, index=True), closing(self._open()) as conn:
            # Held from here; checked again now: a GC may have moved the readable start
            # since the caller looked (it then saw this pin, or the check sees it).
            fresh = conn.execute("SELECT min_readable_lsn FROM timelines WHERE id = ?",
                                 (first[0],)).fetchone()
            if fresh is None:
                raise UnknownTimeline(f'timeline "{TimelineId(first[1])}" was deleted')
            if lsn < fresh[0]:
                raise LsnOutOfRange(f"LSN {Lsn(lsn)} is before timeline "
                                    f"{TimelineId(first[1])} is readable (from "
                                    f"{Lsn(fresh[0])} on)")
            conn.execute("BEGIN")

            def stream(depth: int, tl: int, bound: int
                       ) -> Iterator[tuple[bytes, int, int, int, _Loc]]:
                row = chain[depth][0]
                if hi is None:
                    cursor = conn.execute(
                        "SELECT key, lsn, kind, off, len FROM records"
                        " WHERE tl = ? AND key >= ? AND lsn <= ? ORDER BY key, lsn",
                        (tl, lo, bound),
                    )
                else:
                    cursor = conn.execute(
                        "SELECT key, lsn, kind, off, len FROM records"
                        " WHERE tl = ? AND key >= ? AND key < ? AND lsn <= ? ORDER BY key, lsn",
                        (tl, lo, hi, bound),
                    )
                while batch := cursor.fetchmany(256):
                    for key, lsn_, kind, off, length in batch:
                        yield key, depth, lsn_, kind, (row, off, length)

            merged = heapq.merge(
                *(stream(d, row[0], b) for d, (row, b) in enumerate(chain)), key=lambda r: r[:2]
            )
            for n, (key, group) in enumerate(itertools.groupby(merged, key=lambda r: r[0])):
                if cancel is not None and not n % CANCEL_CHECK_EVERY and cancel.is_set():
                    raise Cancelled("cancelled while reading every key at an LSN")
                history = list(group)
                # Only the newest image (or tombstone) and the deltas after it matter.
                i = len(history) - 1
                while i >= 0 and history[i][3] == _DELTA:
                    i -= 1
                if i >= 0 and history[i][3] not in _IMAGES:
                    if i == len(history) - 1:
                        continue  # a tombstone last: no value
                    i += 1  # deltas on no value
                yield key, [(key, h[2], h[3], h[4]) for h in history[max(i, 0):]]
            conn.execute("COMMIT")

    def digest(self, timeline_id: TimelineId, lsn: Lsn, *,
               cancel: threading.Event | None = None) -> str:
        """SHA-256 of every (key, value) at ``lsn`` in key order: equal states give equal
        digests however their histories were written. ``cancel``: as for
        :meth:`materialize` (:class:`Cancelled` soon after it is set)."""
        h = hashlib.sha256()
        for key, value in self.materialize(timeline_id, lsn, cancel=cancel):
            h.update(key)
            h.update(_DIGEST_LEN.pack(len(value)))
            h.update(value)
        return h.hexdigest()

    # garbage collection --------------------------------------------------------------------

    def gc(self, timeline_id: TimelineId, horizon: Lsn, *, batch_rows: int = 5000,
           cancel: threading.Event | None = None) -> GcResult:
        """Make the timeline readable from ``horizon`` on (no earlier than it already is,
        no later than its last record) and remove the records no read at or above it, at
        a child's branch point or at an LSN a read in progress holds can need (gc.py).
        Index rows go in transactions of ``batch_rows``; the payloads' bytes are added to
        the timeline's garbage (freed when the data file is rewritten). ``cancel``: stop
        between batches (what is removed stays removed; a later GC goes on)."""
        with self._gc_lock:
            cut, points, internal, before = self._gc_start(timeline_id, horizon)
            # Only keys written since the last horizon can have new garbage, unless kept
            # points went away (a child deleted, a read ended): then, and every few passes,
            # every key is looked at.
            passes = self._gc_passes.get(internal, 0) + 1
            full = cut == before or passes % FULL_SWEEP_EVERY == 0
            self._gc_passes[internal] = passes
            removed, size = self._gc_records(internal, cut, [*points, cut], batch_rows,
                                             cancel, since=None if full else before)
            reclaimed = self._reclaim(internal)
        return GcResult(timeline_id, Lsn(cut), tuple(Lsn(p) for p in points), removed, size,
                        reclaimed)

    def _reclaim(self, tl: int) -> int:
        """Flag removed records in their frames' directories and punch their payloads out
        of the data file (``unpunched``), unless a walk holds the file (then a later GC
        does it). Returns the bytes given back to the file system."""
        with self._pins.reclaiming(tl) as free:
            if not free:
                return 0
            conn = self._conn()
            row = self._row_by_id(conn, tl)
            pending = conn.execute("SELECT off, len, key, lsn FROM unpunched WHERE tl = ?"
                                   " ORDER BY off", (tl,)).fetchall()
            if not pending:
                return 0
            starts = [int(r[0]) for r in conn.execute(
                "SELECT start FROM batches WHERE tl = ? ORDER BY start", (tl,))]
            f = self._file(row)
            by_frame: dict[int, set[tuple[bytes, int]]] = {}
            for off, _length, key, lsn in pending:
                # A packed image's payload is in a pack frame: its entry is in the frame
                # compaction took it from.
                moved = conn.execute("SELECT frame FROM repacked WHERE tl = ? AND key = ?"
                                     " AND lsn = ?", (tl, key, lsn)).fetchone()
                frame = int(moved[0]) if moved is not None else \
                    starts[bisect.bisect_right(starts, off) - 1]
                by_frame.setdefault(frame, set()).add((bytes(key), int(lsn)))
            ranges = []
            for frame, records in by_frame.items():
                ranges += mark_removed(f, frame, records)
            # Packed records removed: a pack frame none of whose records is kept any more
            # gives all its payload blocks back (packed payloads share blocks).
            packs = conn.execute("SELECT start, end, live FROM packs WHERE tl = ?"
                                 " ORDER BY start", (tl,)).fetchall()
            pack_starts = [int(p[0]) for p in packs]
            gone: Counter[int] = Counter()
            for off, *_rest in pending:
                i = bisect.bisect_right(pack_starts, off) - 1
                if i >= 0 and off < packs[i][1]:
                    gone[i] += 1
            emptied = [i for i, n in gone.items() if packs[i][2] - n <= 0]
            ranges += [(pack_starts[i] + PACK_HEADER, int(packs[i][1]) - pack_starts[i]
                        - PACK_HEADER) for i in emptied]
            if self._durable:
                os.fdatasync(f.fd)  # flagged before any byte is punched
            punched = punch(f, ranges)
            with self._transaction() as w:
                w.executemany("DELETE FROM unpunched WHERE tl = ? AND off = ?",
                              [(tl, off) for off, *_rest in pending])
                w.executemany("DELETE FROM repacked WHERE tl = ? AND key = ? AND lsn = ?",
                              [(tl, key, lsn) for _off, _len, key, lsn in pending])
                w.executemany("UPDATE packs SET live = live - ? WHERE tl = ? AND start = ?",
                              [(n, tl, pack_starts[i]) for i, n in gone.items()
                               if i not in emptied])
                w.executemany("DELETE FROM packs WHERE tl = ? AND start = ?",
                              [(tl, pack_starts[i]) for i in emptied])
            return punched

    @contextmanager
    def hold(self, timeline_id: TimelineId, lsn: Lsn) -> Iterator[None]:
        """Keep the timeline readable at ``lsn`` for the duration, whatever GC runs
        meanwhile (for reads made of many calls: an export). :class:`LsnOutOfRange` if it
        is not readable now."""
        conn = self._conn()
        epoch = self._pins.epoch
        row = self._row_by_tid(conn, timeline_id)
        with self._pins.hold(row[0], int(lsn)):
            if self._pins.epoch != epoch:
                row = self._row_by_id(conn, row[0])
            self._check_readable(row, check_lsn(lsn))
            yield

    def _gc_start(self, timeline_id: TimelineId, horizon: Lsn
                  ) -> tuple[int, list[int], int, int]:
        """Move the readable start to the horizon and collect the points kept below it.
        The commit happens under the pin lock, and the epoch moves with it: a read pins
        either before (and is kept) or after (and sees the new start)."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._row_by_tid(conn, timeline_id)
                cut = max(check_lsn(horizon), int(row[5]))
                if cut > row[4]:
                    raise LsnOutOfRange(f"GC horizon {Lsn(cut)} is beyond the last record LSN "
                                        f"{Lsn(row[4])} of timeline {timeline_id}")
                branch_points = {int(r[0]) for r in conn.execute(
                    "SELECT ancestor_lsn FROM timelines WHERE ancestor = ?", (row[0],))}
                with self._pins.lock:
                    held = self._pins.held(row[0])
                    # A read or walk in progress keeps its LSN readable: the horizon stops
                    # there (it moves on at a later GC, once the read is over).
                    if held:
                        cut = max(int(row[5]), min(cut, min(held)))
                    if cut > row[5]:
                        conn.execute("UPDATE timelines SET min_readable_lsn = ? WHERE id = ?",
                                     (cut, row[0]))
                    conn.execute("COMMIT")
                    self._pins.epoch += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if cut > row[5]:
                # The history hash at the new start, while every record up to it is still
                # here (GC removes them after this returns; reclaim waits for _gc_lock):
                # hashes at and after it never need what GC removes (proofs, a shallow
                # copy's base). An older GC's horizon had no hash: it stays unknown.
                with contextlib.suppress(HistoryCollected):
                    digest = writes.history_hash(self, timeline_id, Lsn(cut))
                    conn.execute("INSERT OR IGNORE INTO history (tl, lsn, hash) VALUES (?, ?, ?)",
                                 (row[0], cut, digest))
        return cut, sorted(p for p in branch_points | held if p < cut), int(row[0]), \
            int(row[5])

    def _keys_since(self, tl: int, since: int, cut: int) -> list[bytes]:
        """Keys with records in ``(since, cut]``, from the directories of the frames that
        hold them (no index scan)."""
        conn = self._conn()
        row = self._row_by_id(conn, tl)
        starts = [r[0] for r in conn.execute(
            "SELECT start FROM batches WHERE tl = ? AND last_lsn > ? AND first_lsn <= ?",
            (tl, since, cut))]
        f = self._file(row)
        keys = {entry[0] for start in starts for entry in read_directory(f, start)
                if since < entry[1] <= cut}
        return sorted(keys)

    def _gc_records(self, tl: int, cut: int, points: list[int], batch_rows: int,
                    cancel: threading.Event | None, *, since: int | None = None
                    ) -> tuple[int, int]:
        removed = size = 0
        doomed: list[tuple[int, bytes, int, int, int]] = []
        doomed_bytes = 0
        unpacked = 0  # what packing saved on the doomed records (no longer saved)

        def flush() -> None:
            nonlocal doomed, doomed_bytes, removed, size, unpacked
            if not doomed:
                return
            with self._transaction() as conn:
                conn.executemany("DELETE FROM records WHERE tl = ? AND key = ? AND lsn = ?",
                                 [d[:3] for d in doomed])
                conn.executemany("INSERT OR IGNORE INTO unpunched (tl, key, lsn, off, len)"
                                 " VALUES (?, ?, ?, ?, ?)", doomed)
                conn.execute("UPDATE timelines SET garbage = garbage + ?,"
                             " packed_saving = packed_saving - ?,"
                             " collected_lsn = max(collected_lsn, ?) WHERE id = ?",
                             (doomed_bytes, unpacked, max(d[2] for d in doomed), tl))
            removed, size = removed + len(doomed), size + doomed_bytes
            doomed, doomed_bytes, unpacked = [], 0, 0

        with closing(self._open()) as reader:
            reader.execute("BEGIN")
            if since is None:
                rows: Iterable[tuple[bytes, int, int, int, int]] = reader.execute(
                    "SELECT key, lsn, kind, off, len FROM records"
                    " WHERE tl = ? AND lsn <= ? ORDER BY key, lsn", (tl, cut))
            else:
                rows = (r for key in self._keys_since(tl, since, cut) for r in reader.execute(
                    "SELECT key, lsn, kind, off, len FROM records"
                    " WHERE tl = ? AND key = ? AND lsn <= ? ORDER BY lsn", (tl, key, cut)))
            for key, group in itertools.groupby(rows, key=lambda r: r[0]):
                history = list(group)
                if len(history) == 1:
                    continue  # one record is always needed at the horizon (or at none)
                keep = needed([r[1] for r in history], [r[2] for r in history], points)
                for i, (_key, lsn, kind, off, length) in enumerate(history):
                    if i not in keep:
                        doomed.append((tl, key, lsn, off, length))
                        doomed_bytes += length
                        if kind == _PACKED_IMAGE:  # garbage counts the record's own bytes
                            old = reader.execute(
                                "SELECT old_len - len FROM repacked WHERE tl = ? AND key = ?"
                                " AND lsn = ?", (tl, key, lsn)).fetchone()
                            saved = int(old[0]) if old is not None else 0
                            doomed_bytes += saved
                            unpacked += saved
                if len(doomed) >= batch_rows:
                    flush()
                    if cancel is not None and cancel.is_set():
                        reader.execute("COMMIT")
                        raise Cancelled("GC cancelled; what it removed stays removed")
            reader.execute("COMMIT")
        flush()
        return removed, size

    def compact(self, timeline_id: TimelineId, *, max_bytes: int | None = None,
                cancel: threading.Event | None = None, pause: float = 0.0,
                wait: float = 5.0) -> CompactResult:
        """Store the timeline's old plain images packed (compressed) where that saves a
        quarter, as the same records (``compaction.py``): one pass over the frames not
        looked at yet, at most ``max_bytes`` of payloads read. Moves commit under the GC
        lock (a GC reading the index while images move would count them wrong)."""
        return compaction.compact(self, timeline_id, lock=self._gc_lock, max_bytes=max_bytes,
                                  cancel=cancel, pause=pause, wait=wait)

    def garbage(self, timeline_id: TimelineId) -> int:
        """Payload bytes GC removed from the timeline, in all (reclaimed or not yet)."""
        conn = self._conn()
        found = conn.execute("SELECT garbage FROM timelines WHERE timeline_id = ?",
                             (bytes(timeline_id),)).fetchone()
        if found is None:
            raise UnknownTimeline(f'timeline "{timeline_id}" does not exist')
        return int(found[0])

    def space(self, timeline_id: TimelineId) -> tuple[int, int]:
        """(payload bytes, as stored, of the records the timeline keeps; payload bytes GC
        removed that are still in the data file: a walk held it; the next GC gives them
        back)."""
        conn = self._conn()
        found = conn.execute(
            "SELECT (SELECT total(b.bytes) FROM batches b WHERE b.tl = t.id) - t.garbage"
            " - t.packed_saving,"
            " (SELECT total(u.len) FROM unpunched u WHERE u.tl = t.id)"
            " FROM timelines t WHERE t.timeline_id = ?", (bytes(timeline_id),)).fetchone()
        if found is None:
            raise UnknownTimeline(f'timeline "{timeline_id}" does not exist')
        return int(found[0]), int(found[1])

    def commit_lsn_at(self, timeline_id: TimelineId, when: float) -> Lsn | None:
        """The newest commit point written at or before the time ``when`` (seconds since
        the epoch) in the timeline's ancestry -- each ancestor up to the branch point its
        child starts at; ``None`` when there is none that old (commit points of an older
        zenith have no time and never count)."""
        conn = self._conn()
        row: Row | None = self._row_by_tid(conn, timeline_id)
        bound = MAX_STORED_LSN
        while row is not None:
            found = conn.execute(
                "SELECT max(lsn) FROM history WHERE tl = ? AND lsn <= ? AND at IS NOT NULL"
                " AND at <= ?", (row[0], int(bound), when)).fetchone()
            if found is not None and found[0] is not None:
                return Lsn(found[0])
            bound = Lsn(row[3] or 0)
            row = self._row_by_id(conn, row[2]) if row[2] is not None else None
        return None

    # helpers -------------------------------------------------------------------------------

    def _transaction(self) -> Transaction:
        return Transaction(self._conn(), self._write_lock)


def _check_history(row: Row, lo: int, hi: int) -> None:
    """A range of a shallow timeline's records must lie after its base (the images there
    are no records of its history)."""
    if lo < hi and row[14] is not None and (lo < row[14] or not row[16]):
        raise HistoryCollected(
            f"timeline {TimelineId(row[1])} is held here from {Lsn(row[14])} on (received "
            f"shallow): its records after {Lsn(lo)} are not all here",
            hint="transfer it from a pageserver that holds its history, or with --since")


def _clamp(lsn: int) -> int:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or lsn < 0:
        raise InvalidArgument(f"LSN {lsn!r} is out of range")
    return min(int(lsn), int(MAX_STORED_LSN))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise InvalidArgument(f"a key is {KEY_SIZE} bytes, got {key!r:.60}")
