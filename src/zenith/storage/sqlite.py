"""The embedded repository engine: one SQLite database in WAL mode.

Records live in one rowid table with two indexes, which answer every question the
pageserver asks without scanning unrelated data:

* ``(tl, key, lsn)`` — GetPage@LSN: the newest record of a key at or below an LSN;
* ``(tl, lsn)`` — the records of a timeline in an LSN range, in LSN order (what push and
  pull send), and nothing else of the table is touched.

Writes are batches inside one ``BEGIN IMMEDIATE`` transaction that also advances the
timeline's ``last_record_lsn``, so a crash leaves a consistent prefix of the history.
Each thread gets its own connection; iterators get a connection of their own, so they read
one consistent snapshot however long they run.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
import sqlite3
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Final

from zenith.errors import (
    AlreadyExists,
    HistoryImmutable,
    InvalidArgument,
    LsnOutOfRange,
    ObjectInUse,
    UnknownBranch,
    UnknownTimeline,
)
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import redo
from zenith.storage.api import (
    KEY_SIZE,
    MAX_STORED_LSN,
    BranchInfo,
    Record,
    RecordKind,
    TimelineInfo,
    WriteResult,
    validate_branch_name,
)

SCHEMA_VERSION: Final = 1
PAGE_SIZE: Final = 65536

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timelines (
    id               INTEGER PRIMARY KEY,
    timeline_id      BLOB NOT NULL UNIQUE,
    ancestor         INTEGER REFERENCES timelines(id),
    ancestor_lsn     INTEGER,
    last_record_lsn  INTEGER NOT NULL,
    min_readable_lsn INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS branches (
    name     TEXT PRIMARY KEY,
    timeline INTEGER NOT NULL REFERENCES timelines(id)
);
CREATE TABLE IF NOT EXISTS records (
    tl      INTEGER NOT NULL,
    key     BLOB NOT NULL,
    lsn     INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_by_key ON records (tl, key, lsn);
CREATE INDEX IF NOT EXISTS records_by_lsn ON records (tl, lsn);
"""

_TL_COLUMNS: Final = "id, timeline_id, ancestor, ancestor_lsn, last_record_lsn, min_readable_lsn"
_KIND_OF: Final = {k.value: k for k in RecordKind}
_DIGEST_LEN: Final = struct.Struct(">I")

_Row = tuple[int, bytes, int | None, int | None, int, int]


class SqliteRepository:
    """A repository in one SQLite file. Implements :class:`zenith.storage.api.Repository`."""

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = Path(path)
        self._durable = durable
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._conn()
        with self._write_lock:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?), ('repository_id', ?)",
                    (str(SCHEMA_VERSION), uuid.uuid4().hex),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise InvalidArgument(
                    f"{self.path} has schema version {row[0]}; this zenith reads {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")

    # connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=60.0
        )
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'OFF'}")
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()
        self._local = threading.local()

    @property
    def repository_id(self) -> str:
        row = self._conn().execute("SELECT value FROM meta WHERE name='repository_id'").fetchone()
        return str(row[0])

    # timelines -----------------------------------------------------------------------------

    def _row_by_tid(self, conn: sqlite3.Connection, timeline_id: TimelineId) -> _Row:
        row = conn.execute(
            f"SELECT {_TL_COLUMNS} FROM timelines WHERE timeline_id = ?", (bytes(timeline_id),)
        ).fetchone()
        if row is None:
            raise UnknownTimeline(f'timeline "{timeline_id}" does not exist')
        return row  # type: ignore[no-any-return]

    def _row_by_id(self, conn: sqlite3.Connection, internal: int) -> _Row:
        row = conn.execute(f"SELECT {_TL_COLUMNS} FROM timelines WHERE id = ?", (internal,))
        return row.fetchone()  # type: ignore[no-any-return]

    def _info(self, conn: sqlite3.Connection, row: _Row) -> TimelineInfo:
        ancestor_tid = None
        if row[2] is not None:
            ancestor_tid = TimelineId(self._row_by_id(conn, row[2])[1])
        return TimelineInfo(
            timeline_id=TimelineId(row[1]),
            ancestor_id=ancestor_tid,
            ancestor_lsn=Lsn(row[3]) if row[3] is not None else None,
            last_record_lsn=Lsn(row[4]),
            min_readable_lsn=Lsn(row[5]),
        )

    def create_timeline(
        self,
        timeline_id: TimelineId | None = None,
        ancestor: tuple[TimelineId, Lsn] | None = None,
        *,
        min_readable_lsn: Lsn | None = None,
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
                start = _check_lsn(ancestor[1])
                self._check_readable(parent, start, what="branch point")
                ancestor_id = parent[0]
            readable = start if min_readable_lsn is None else _check_lsn(min_readable_lsn)
            if readable < start:
                raise InvalidArgument(
                    f"min readable LSN {readable} is before the timeline's start {start}"
                )
            conn.execute(
                "INSERT INTO timelines (timeline_id, ancestor, ancestor_lsn, last_record_lsn,"
                " min_readable_lsn) VALUES (?, ?, ?, ?, ?)",
                (bytes(tid), ancestor_id, start if ancestor else None, start, readable),
            )
            return self._info(conn, self._row_by_tid(conn, tid))

    def get_timeline(self, timeline_id: TimelineId) -> TimelineInfo:
        conn = self._conn()
        return self._info(conn, self._row_by_tid(conn, timeline_id))

    def list_timelines(self) -> list[TimelineInfo]:
        conn = self._conn()
        rows = conn.execute(f"SELECT {_TL_COLUMNS} FROM timelines ORDER BY id").fetchall()
        return [self._info(conn, row) for row in rows]

    def set_min_readable_lsn(self, timeline_id: TimelineId, lsn: Lsn) -> None:
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            start = Lsn(row[3] or 0)
            if _check_lsn(lsn) < start:
                raise InvalidArgument(f"min readable LSN {lsn} is before the start {start}")
            conn.execute("UPDATE timelines SET min_readable_lsn = ? WHERE id = ?", (lsn, row[0]))

    def _check_readable(self, row: _Row, lsn: Lsn, *, what: str = "LSN") -> None:
        tid = TimelineId(row[1])
        if lsn > row[4]:
            raise LsnOutOfRange(
                f"{what} {lsn} is beyond the last record LSN {Lsn(row[4])} of timeline {tid}"
            )
        if lsn < row[5]:
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
        row = conn.execute(
            f"SELECT {_TL_COLUMNS} FROM timelines WHERE id ="
            " (SELECT timeline FROM branches WHERE name = ?)",
            (name,),
        ).fetchone()
        if row is None:
            raise UnknownBranch(f'branch "{name}" does not exist')
        return BranchInfo(name, self._info(conn, row))

    def list_branches(self) -> list[BranchInfo]:
        conn = self._conn()
        rows = conn.execute(
            f"SELECT b.name, {', '.join('t.' + c.strip() for c in _TL_COLUMNS.split(','))}"
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
        with self._transaction() as conn:
            current: int | None = self._row_by_tid(conn, timeline_id)[0]
            while current is not None:
                in_use = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM branches WHERE timeline = ?)"
                    " OR EXISTS (SELECT 1 FROM timelines WHERE ancestor = ?)",
                    (current, current),
                ).fetchone()[0]
                if in_use:
                    return
                parent = self._row_by_id(conn, current)[2]
                conn.execute("DELETE FROM records WHERE tl = ?", (current,))
                conn.execute("DELETE FROM timelines WHERE id = ?", (current,))
                current = parent

    def delete_timeline(self, timeline_id: TimelineId) -> None:
        """Drop a timeline that has no names and no descendants, with its records."""
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            if conn.execute(
                "SELECT EXISTS (SELECT 1 FROM branches WHERE timeline = ?)"
                " OR EXISTS (SELECT 1 FROM timelines WHERE ancestor = ?)",
                (row[0], row[0]),
            ).fetchone()[0]:
                raise ObjectInUse(f"timeline {timeline_id} has a branch name or descendants")
            conn.execute("DELETE FROM records WHERE tl = ?", (row[0],))
            conn.execute("DELETE FROM timelines WHERE id = ?", (row[0],))

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
    ) -> WriteResult:
        """Append records with lsn in ``(last_record_lsn, new last_record_lsn]`` and publish the
        new ``last_record_lsn`` in the same transaction. All or nothing."""
        if last_record_lsn is not None:
            _check_lsn(last_record_lsn)
        with self._transaction() as conn:
            row = self._row_by_tid(conn, timeline_id)
            internal, current = row[0], Lsn(row[4])
            if last_record_lsn is not None and last_record_lsn < current:
                raise HistoryImmutable(
                    f"last record LSN {last_record_lsn} is behind the timeline's {current}"
                )
            state = {"count": 0, "max": int(current)}
            limit = last_record_lsn

            def rows() -> Iterator[tuple[int, bytes, int, int, bytes]]:
                for rec in records:
                    rec.validate()
                    if rec.lsn <= current:
                        raise HistoryImmutable(
                            f"record at {rec.lsn} is at or below the timeline's last record "
                            f"LSN {current}: recorded history never changes"
                        )
                    if limit is not None and rec.lsn > limit:
                        raise InvalidArgument(
                            f"record at {rec.lsn} is beyond the batch's last record LSN {limit}"
                        )
                    if rec.kind is RecordKind.DELTA and not redo.is_known(rec.payload):
                        raise InvalidArgument(
                            f"delta record at {rec.lsn} has unknown redo type {rec.payload[0]}"
                        )
                    state["count"] += 1
                    if rec.lsn > state["max"]:
                        state["max"] = int(rec.lsn)
                    yield internal, rec.key, int(rec.lsn), int(rec.kind), rec.payload

            try:
                conn.executemany(
                    "INSERT INTO records (tl, key, lsn, kind, payload) VALUES (?, ?, ?, ?, ?)",
                    rows(),
                )
            except sqlite3.IntegrityError as exc:
                raise InvalidArgument(f"two records for one key at one LSN: {exc}") from exc
            new_last = Lsn(state["max"] if last_record_lsn is None else last_record_lsn)
            conn.execute(
                "UPDATE timelines SET last_record_lsn = ? WHERE id = ?", (new_last, internal)
            )
            return WriteResult(records=state["count"], last_record_lsn=new_last)

    def get_value(self, timeline_id: TimelineId, key: bytes, lsn: Lsn) -> bytes | None:
        """The value of ``key`` at ``lsn``: the newest image at or below it plus the deltas
        after it, falling back to the ancestor at the branch point. ``None``: no value."""
        _check_key(key)
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        self._check_readable(row, _check_lsn(lsn))
        deltas: list[bytes] = []
        base: bytes | None = None
        tl: int | None = row[0]
        bound = int(lsn)
        ancestor, ancestor_lsn = row[2], row[3]
        while tl is not None:
            found = False
            for kind, payload in conn.execute(
                "SELECT kind, payload FROM records WHERE tl = ? AND key = ? AND lsn <= ?"
                " ORDER BY lsn DESC",
                (tl, key, bound),
            ):
                if kind == RecordKind.DELTA:
                    deltas.append(payload)
                    continue
                base = payload if kind == RecordKind.IMAGE else None
                found = True
                break
            if found or ancestor is None:
                break
            tl, bound = ancestor, int(ancestor_lsn or 0)
            parent = self._row_by_id(conn, tl)
            ancestor, ancestor_lsn = parent[2], parent[3]
        value = base
        for payload in reversed(deltas):
            value = redo.apply_delta(value, payload)
        return value

    def iter_records(self, timeline_id: TimelineId, after: Lsn, upto: Lsn) -> Iterator[Record]:
        """Records of this timeline only (not its ancestors) with lsn in ``(after, upto]``,
        in LSN order, streamed from one snapshot through the LSN index."""
        row = self._row_by_tid(self._conn(), timeline_id)
        lo, hi = _clamp(after), _clamp(upto)
        return self._iter_records(row[0], lo, hi)

    def _iter_records(self, internal: int, lo: int, hi: int) -> Iterator[Record]:
        with closing(self._open()) as conn:
            conn.execute("BEGIN")
            cursor = conn.execute(
                "SELECT key, lsn, kind, payload FROM records INDEXED BY records_by_lsn"
                " WHERE tl = ? AND lsn > ? AND lsn <= ? ORDER BY lsn",
                (internal, lo, hi),
            )
            kinds = _KIND_OF
            while batch := cursor.fetchmany(256):
                for key, lsn, kind, payload in batch:
                    yield Record(key, Lsn(lsn), kinds[kind], payload)
            conn.execute("COMMIT")

    def count_records(self, timeline_id: TimelineId, after: Lsn, upto: Lsn) -> tuple[int, int]:
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        count, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records"
            " INDEXED BY records_by_lsn WHERE tl = ? AND lsn > ? AND lsn <= ?",
            (row[0], _clamp(after), _clamp(upto)),
        ).fetchone()
        return int(count), int(size)

    def ancestry(self, timeline_id: TimelineId) -> list[TimelineInfo]:
        """The timeline and its ancestors, nearest first."""
        chain = [self.get_timeline(timeline_id)]
        while chain[-1].ancestor_id is not None:
            chain.append(self.get_timeline(chain[-1].ancestor_id))
        return chain

    def materialize(self, timeline_id: TimelineId, lsn: Lsn) -> Iterator[tuple[bytes, bytes]]:
        conn = self._conn()
        row = self._row_by_tid(conn, timeline_id)
        self._check_readable(row, _check_lsn(lsn))
        # (internal id, bound) from the root ancestor down to this timeline.
        chain: list[tuple[int, int]] = [(row[0], int(lsn))]
        parent, bound = row[2], row[3]
        while parent is not None:
            chain.append((parent, int(bound or 0)))
            prow = self._row_by_id(conn, parent)
            parent, bound = prow[2], prow[3]
        chain.reverse()
        return self._materialize(chain)

    def _materialize(self, chain: list[tuple[int, int]]) -> Iterator[tuple[bytes, bytes]]:
        with closing(self._open()) as conn:
            conn.execute("BEGIN")

            def stream(depth: int, tl: int, bound: int) -> Iterator[tuple[bytes, int, int, bytes]]:
                cursor = conn.execute(
                    "SELECT key, lsn, kind, payload FROM records INDEXED BY records_by_key"
                    " WHERE tl = ? AND lsn <= ? ORDER BY key, lsn",
                    (tl, bound),
                )
                while batch := cursor.fetchmany(256):
                    for key, _lsn, kind, payload in batch:
                        yield key, depth, kind, payload

            merged = heapq.merge(
                *(stream(d, tl, b) for d, (tl, b) in enumerate(chain)), key=lambda r: r[:2]
            )
            for key, group in itertools.groupby(merged, key=lambda r: r[0]):
                value: bytes | None = None
                for _key, _depth, kind, payload in group:
                    if kind == RecordKind.IMAGE:
                        value = payload
                    elif kind == RecordKind.TOMBSTONE:
                        value = None
                    else:
                        value = redo.apply_delta(value, payload)
                if value is not None:
                    yield key, value
            conn.execute("COMMIT")

    def digest(self, timeline_id: TimelineId, lsn: Lsn) -> str:
        """SHA-256 of every (key, value) at ``lsn`` in key order: equal states give equal
        digests however their histories were written."""
        h = hashlib.sha256()
        for key, value in self.materialize(timeline_id, lsn):
            h.update(key)
            h.update(_DIGEST_LEN.pack(len(value)))
            h.update(value)
        return h.hexdigest()

    # helpers -------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn(), self._write_lock)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the writer lock; rollback on any exception."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


def _check_lsn(lsn: Lsn | int) -> Lsn:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_STORED_LSN:
        raise InvalidArgument(f"LSN {lsn!r} is out of range")
    return Lsn(lsn)


def _clamp(lsn: int) -> int:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or lsn < 0:
        raise InvalidArgument(f"LSN {lsn!r} is out of range")
    return min(int(lsn), int(MAX_STORED_LSN))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise InvalidArgument(f"a key is {KEY_SIZE} bytes, got {key!r:.60}")
