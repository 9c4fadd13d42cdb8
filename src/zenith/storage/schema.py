"""The SQLite side of the repository: schema, connection settings, write transactions.

The database holds the metadata and the index of the repository (``sqlite.py`` says what
each table answers; ``datafile.py`` holds the payloads). It runs in WAL mode so readers
never wait for the writer, with ``synchronous=FULL`` when the repository promises
durability: a commit is on disk when ``COMMIT`` returns.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from zenith.errors import InvalidArgument

#: 2: payloads moved from the ``records`` table into data files.
#: 3: history hashes, received timelines, pending cursors; batches keyed by their start.
#: 4: the time of each commit point (history.at), payload bytes GC left unreferenced
#: (timelines.garbage).
#: 5: shallow timelines, collected_lsn.
#: 6: compaction (timelines.compacted and packed_saving, the repacked and packs tables).
SCHEMA_VERSION: Final = 6
#: The database holds only small index rows now; small pages keep the commit of a small
#: batch (WAL ingest) small.
PAGE_SIZE: Final = 4096
MMAP_SIZE: Final = 256 * 1024 * 1024

_BATCHES: Final = (
    # One row per write batch (a frame of the data file): where the frame of an LSN
    # range starts, and the counts of whole batches for count_records. Several batches
    # may share an LSN (a transfer stores one LSN across frames), so the start keys it.
    """CREATE TABLE batches (
        tl        INTEGER NOT NULL,
        start     INTEGER NOT NULL,
        first_lsn INTEGER NOT NULL,
        last_lsn  INTEGER NOT NULL,
        records   INTEGER NOT NULL,
        bytes     INTEGER NOT NULL,
        PRIMARY KEY (tl, start)
    ) WITHOUT ROWID""",
    "CREATE INDEX batches_by_lsn ON batches (tl, last_lsn, start)",
)
_HISTORY: Final = (
    # The history hash (``history.py``) at commit points, so the hash at any LSN is a
    # lookup plus a fold over at most one batch's records.
    """CREATE TABLE history (
        tl   INTEGER NOT NULL,
        lsn  INTEGER NOT NULL,
        hash BLOB NOT NULL,
        at   REAL,
        PRIMARY KEY (tl, lsn)
    ) WITHOUT ROWID""",
)

_UNPUNCHED: Final = (
    # Payloads GC removed from the index whose bytes are still in the data file: flagged
    # in their frame's directory and punched out when no walk holds the file (gc.py).
    """CREATE TABLE IF NOT EXISTS unpunched (
        tl  INTEGER NOT NULL,
        off INTEGER NOT NULL,
        len INTEGER NOT NULL,
        key BLOB NOT NULL,
        lsn INTEGER NOT NULL,
        PRIMARY KEY (tl, off)
    ) WITHOUT ROWID""",
)

_REPACKED: Final = (
    # Images compaction moved into a pack frame (the index points there): ``frame``, the
    # start of the frame whose directory lists the record (GC flags it there when it
    # removes the record), and the old place. ``done = 0``: the directory entry and the
    # old bytes are not dealt with yet (pointed to the new place, punched out, once no
    # read that may have looked up the old place is left: compaction.py).
    """CREATE TABLE repacked (
        tl      INTEGER NOT NULL,
        key     BLOB NOT NULL,
        lsn     INTEGER NOT NULL,
        frame   INTEGER NOT NULL,
        old_off INTEGER NOT NULL,
        old_len INTEGER NOT NULL,
        off     INTEGER NOT NULL,
        len     INTEGER NOT NULL,
        done    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tl, key, lsn)
    ) WITHOUT ROWID""",
    "CREATE INDEX repacked_pending ON repacked (tl) WHERE done = 0",
    # Pack frames and how many of their packed records are still kept: GC decrements it
    # as it removes them, and punches the pack's payloads out when none is left.
    """CREATE TABLE packs (
        tl    INTEGER NOT NULL,
        start INTEGER NOT NULL,
        end   INTEGER NOT NULL,
        live  INTEGER NOT NULL,
        PRIMARY KEY (tl, start)
    ) WITHOUT ROWID""",
)

SCHEMA: Final = (
    """CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    # AUTOINCREMENT: an id is never reused, and it names the timeline's data file.
    # ``data_end``: the committed length of the timeline's data file.
    """CREATE TABLE timelines (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        timeline_id      BLOB NOT NULL UNIQUE,
        ancestor         INTEGER REFERENCES timelines(id),
        ancestor_lsn     INTEGER,
        last_record_lsn  INTEGER NOT NULL,
        min_readable_lsn INTEGER NOT NULL DEFAULT 0,
        data_end         INTEGER NOT NULL DEFAULT 0,
        received         INTEGER NOT NULL DEFAULT 0,
        hash             BLOB NOT NULL DEFAULT X'{zero}',
        pending_lsn      INTEGER,
        pending_count    INTEGER NOT NULL DEFAULT 0,
        pending_key      BLOB,
        pending_sum      BLOB,
        garbage          INTEGER NOT NULL DEFAULT 0,
        collected_lsn    INTEGER NOT NULL DEFAULT 0,
        base_lsn         INTEGER,
        foreign_ancestor BLOB,
        base_done        INTEGER NOT NULL DEFAULT 1,
        compacted        INTEGER NOT NULL DEFAULT 0,
        packed_saving    INTEGER NOT NULL DEFAULT 0,
        base_from        TEXT
    )""".format(zero="00" * 32),
    """CREATE TABLE branches (
        name     TEXT PRIMARY KEY,
        timeline INTEGER NOT NULL REFERENCES timelines(id)
    )""",
    # GetPage@LSN: the newest records of (tl, key) at or below an LSN, and where their
    # payloads are in the timeline's data file. WITHOUT ROWID: the rows are small and the
    # lookup is one B-tree descent, in the wanted order.
    """CREATE TABLE records (
        tl   INTEGER NOT NULL,
        key  BLOB NOT NULL,
        lsn  INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        off  INTEGER NOT NULL,
        len  INTEGER NOT NULL,
        PRIMARY KEY (tl, key, lsn)
    ) WITHOUT ROWID""",
    *_BATCHES,
    *_HISTORY,
    *_UNPUNCHED,
    *_REPACKED,
)

#: From version 2: received is unknown for old timelines, so they count as received (new
#: history then goes on a child timeline: the safe side). Hashes are computed by the
#: repository right after (it needs the data files).
_MIGRATE_2_TO_3: Final = (
    "ALTER TABLE timelines ADD COLUMN received INTEGER NOT NULL DEFAULT 1",
    f"ALTER TABLE timelines ADD COLUMN hash BLOB NOT NULL DEFAULT X'{'00' * 32}'",
    "ALTER TABLE timelines ADD COLUMN pending_lsn INTEGER",
    "ALTER TABLE timelines ADD COLUMN pending_count INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE timelines ADD COLUMN pending_key BLOB",
    "ALTER TABLE timelines ADD COLUMN pending_sum BLOB",
    "ALTER TABLE batches RENAME TO batches_v2",
    *_BATCHES,
    "INSERT INTO batches SELECT tl, start, first_lsn, last_lsn, records, bytes FROM batches_v2",
    "DROP TABLE batches_v2",
    *_HISTORY,
)


#: From version 3: commit times are unknown for old commit points (NULL: as old as the
#: timeline's first known time, see gc.py), nothing is garbage yet.
_MIGRATE_3_TO_4: Final = (
    "ALTER TABLE history ADD COLUMN at REAL",
    "ALTER TABLE timelines ADD COLUMN garbage INTEGER NOT NULL DEFAULT 0",
    *_UNPUNCHED,
)


#: From version 4: a shallow timeline (received from an LSN on, ``base_lsn``) and what GC
#: removed from a timeline's own history (``collected_lsn``): none yet.
_MIGRATE_4_TO_5: Final = (
    "ALTER TABLE timelines ADD COLUMN collected_lsn INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE timelines ADD COLUMN base_lsn INTEGER",
    "ALTER TABLE timelines ADD COLUMN foreign_ancestor BLOB",
    "ALTER TABLE timelines ADD COLUMN base_done INTEGER NOT NULL DEFAULT 1",
    # GC removed records below its horizon where it counted garbage: the history is whole
    # only from the readable start on there.
    "UPDATE timelines SET collected_lsn = min_readable_lsn WHERE garbage > 0",
)


#: From version 5: nothing compacted yet (``compacted``: the data file offset compaction
#: has looked at every frame before; ``packed_saving``: the bytes packing saved, of the
#: records still kept).
_MIGRATE_5_TO_6: Final = (
    "ALTER TABLE timelines ADD COLUMN compacted INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE timelines ADD COLUMN packed_saving INTEGER NOT NULL DEFAULT 0",
    # Who sent a shallow timeline's base: unknown for those received before (no transfer
    # extends them: docs/push-pull.md, "Trust").
    "ALTER TABLE timelines ADD COLUMN base_from TEXT",
    *_REPACKED,
)


def connect(path: Path, *, durable: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread
    that the caller gives it to. A new database file is created 0600 (SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60.0)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB
    conn.execute(f"PRAGMA mmap_size={MMAP_SIZE}")  # index pages without a read() each
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def prepare(conn: sqlite3.Connection, path: Path) -> bool:
    """Create the schema in a new database, or check an existing one's version and migrate
    it; True when the caller must compute history hashes (migrated from version 2). The
    caller holds a write transaction."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO meta VALUES ('schema_version', ?), ('repository_id', ?)",
            (str(SCHEMA_VERSION), uuid.uuid4().hex),
        )
        return False
    row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    version = int(row[0]) if row is not None else None
    if version in (2, 3, 4, 5):
        steps = list(_MIGRATE_5_TO_6)
        if version <= 4:
            steps = list(_MIGRATE_4_TO_5) + steps
        if version == 4:  # made before the unpunched table existed, perhaps
            steps = list(_UNPUNCHED) + steps
        if version <= 3:
            steps = list(_MIGRATE_3_TO_4) + steps
        if version == 2:  # its history table is created with the ``at`` column already
            steps = list(_MIGRATE_2_TO_3) + steps[1:]
        for statement in steps:
            conn.execute(statement)
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'",
                     (str(SCHEMA_VERSION),))
        return version == 2
    if row is None or int(row[0]) != SCHEMA_VERSION:
        raise InvalidArgument(
            f"{path} has schema version {row and row[0]}; this zenith reads {SCHEMA_VERSION}"
        )
    return False


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the writer lock. On any exception, and if
    the commit itself fails: rollback, then the ``on_abort`` actions (which undo what the
    transaction did outside the database, such as bytes appended to a data file)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock
        self.on_abort: list[Callable[[], None]] = []

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
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return
                except BaseException:
                    self._abort()
                    raise
            self._abort()
        finally:
            self.lock.release()

    def _abort(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            for action in reversed(self.on_abort):
                action()
