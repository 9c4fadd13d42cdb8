"""Importing a base backup: every file of a running PostgreSQL cluster, at one LSN.

BASE_BACKUP (:mod:`zenith.postgres.replication`) streams the data directory as tar
pieces; :class:`BackupRecords` turns them into storage records, all at the backup's
*start* LSN, under the keys of :mod:`zenith.postgres.keys`:

* relation segment files are cut into 8 KiB blocks (block ``segno * 131072 + offset /
  8192``), one IMAGE each, plus one size record per relation fork;
* pg_xact and pg_multixact segments are cut into SLRU pages;
* ``pg_filenode.map`` files, PG_VERSION files, ``global/pg_control`` and the other files
  (configuration, two-phase state, ...) are stored whole under their own keys.

The files were copied while the cluster ran, so they are consistent only once WAL up to
the backup's *end* LSN has been applied (DESIGN §7): the timeline's ``last_record_lsn``
becomes the start LSN and its ``min_readable_lsn`` the end LSN, so reads in between are
refused until WAL ingest (:mod:`zenith.postgres.walingest`) has passed the end.

Why one ``put_records`` call fed by a generator: storage refuses records at or below a
timeline's ``last_record_lsn``, and every record of a backup has the same LSN, so a second
batch at the start LSN would be refused once the first had been published. ``put_records``
consumes its iterable as a stream (payloads go to the data file as they come; only the
~60-byte index entries are kept until commit), so the import runs the write in a worker
thread reading from a bounded queue while the event loop receives the backup: memory
stays bounded by the queue, never the backup, and the import is all or nothing. The queue
carries the tar pieces themselves: cutting them into records (:class:`BackupRecords`)
happens in that thread too, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from zenith.errors import InvalidState
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres import pgcontrol
from zenith.postgres.basebackup import (
    EntryType,
    RelationSegment,
    RelMapFile,
    Skipped,
    SlruKind,
    SlruSegment,
    SpecialFile,
    SpecialKind,
    TarPiece,
    VersionFile,
    classify_path,
)
from zenith.postgres.keys import (
    SLRU_PAGES_PER_SEGMENT,
    ControlItem,
    RelTag,
    SlruId,
    control_key,
    db_version_key,
    file_key,
    pack_file_value,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_page_key,
)
from zenith.postgres.pg_constants import BLCKSZ
from zenith.postgres.redostate import REPLORIGIN_CHECKPOINT_PATH, Counters, Origins
from zenith.postgres.replication import ReplicationConnection
from zenith.storage import Record, RecordKind, Repository
from zenith.storage.api import MAX_PAYLOAD

#: Blocks per 1 GiB relation segment file (RELSEG_SIZE).
RELSEG_SIZE: Final = 131072
#: Tar bytes handed to the import thread at a time, and how many such lists may wait.
BATCH_BYTES: Final = 2 * 1024 * 1024
QUEUE_BATCHES: Final = 8

_SLRU_IDS: Final = {
    SlruKind.XACT: SlruId.XACT,
    SlruKind.MULTIXACT_OFFSETS: SlruId.MULTIXACT_OFFSETS,
    SlruKind.MULTIXACT_MEMBERS: SlruId.MULTIXACT_MEMBERS,
    SlruKind.COMMIT_TS: SlruId.COMMIT_TS,
}
_IMAGE: Final = RecordKind.IMAGE
_KeyOf = Callable[[int], bytes]
_Make = Callable[[bytes], tuple[bytes, bytes]]


@dataclass(slots=True)
class ImportResult:
    start_lsn: Lsn
    end_lsn: Lsn
    timeline: int  # the source's PostgreSQL timeline (for START_REPLICATION)
    records: int = 0
    bytes: int = 0
    #: Size in blocks of every relation fork imported: WAL ingest starts from it.
    rel_sizes: dict[RelTag, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class BackupRecords:
    """Sans-I/O: feed :class:`TarPiece` objects, get the records to store at ``lsn``.

    Relation and SLRU files are cut into pages as their pieces arrive (holding at most one
    partial page); whole-file values are collected until their last piece."""

    def __init__(self, lsn: Lsn) -> None:
        self.lsn = lsn
        self.rel_sizes: dict[RelTag, int] = {}
        self.skipped: list[str] = []
        self._partial = bytearray()
        self._whole = bytearray()
        self._control: bytes | None = None
        self._origins: bytes | None = None

    def feed(self, piece: TarPiece) -> list[Record]:
        if piece.type is not EntryType.FILE:
            return []
        kind = classify_path(piece.path)
        if isinstance(kind, RelationSegment):
            tag = RelTag(kind.spcnode, kind.dbnode, kind.relnode, kind.forknum)
            first = kind.segno * RELSEG_SIZE
            if piece.last:
                self.rel_sizes[tag] = max(
                    self.rel_sizes.get(tag, 0), first + piece.size // BLCKSZ
                )
            return self._pages(piece, lambda n: rel_block_key(tag, first + n))
        if isinstance(kind, SlruSegment):
            slru = _SLRU_IDS.get(kind.slru)
            if slru is not None:
                base = kind.segno * SLRU_PAGES_PER_SEGMENT
                return self._pages(piece, lambda n: slru_page_key(slru, base + n))
            return self._file(piece, lambda data: (file_key(piece.path),
                                                   pack_file_value(piece.path, data)))
        if isinstance(kind, RelMapFile):
            spc, db = kind.spcnode, kind.dbnode
            return self._file(piece, lambda data: (relmap_key(spc, db), data))
        if isinstance(kind, VersionFile) and kind.dbnode is not None:
            spc, db = kind.spcnode or 0, kind.dbnode
            return self._file(piece, lambda data: (db_version_key(spc, db), data))
        if isinstance(kind, SpecialFile) and kind.kind is SpecialKind.CONTROL:
            return self._file(piece, self._keep_control)
        if piece.path == REPLORIGIN_CHECKPOINT_PATH:
            return self._file(piece, self._keep_origins)
        if isinstance(kind, Skipped) or piece.size > MAX_PAYLOAD - 4096:
            if piece.last:
                self.skipped.append(piece.path)
            return []
        return self._file(piece, lambda data: (file_key(piece.path),
                                               pack_file_value(piece.path, data)))

    def _keep_control(self, data: bytes) -> tuple[bytes, bytes]:
        self._control = data
        return control_key(ControlItem.PG_CONTROL), data

    def _keep_origins(self, data: bytes) -> tuple[bytes, bytes]:
        self._origins = data
        return file_key(REPLORIGIN_CHECKPOINT_PATH), pack_file_value(
            REPLORIGIN_CHECKPOINT_PATH, data)

    def finish(self) -> list[Record]:
        """The size records, once every file has been fed, and the state WAL ingest
        starts from: redo's counters as pg_control's checkpoint copy has them (recovery
        starts from its checkpoint's values) and the replication origins' progress."""
        out = [
            Record(rel_size_key(tag), self.lsn, _IMAGE, n.to_bytes(4, "little"))
            for tag, n in sorted(self.rel_sizes.items())
        ]
        if self._control is not None:
            counters = Counters.from_checkpoint(
                pgcontrol.checkpoint_copy(self._control),
                commit_ts_active=pgcontrol.tracks_commit_timestamps(self._control))
            out.append(Record(control_key(ControlItem.COUNTERS), self.lsn, _IMAGE,
                              counters.pack()))
        origins = Origins()
        if self._origins is not None:
            origins = Origins.from_checkpoint_file(self._origins)
        out.append(Record(control_key(ControlItem.ORIGINS), self.lsn, _IMAGE, origins.pack()))
        return out

    def _pages(self, piece: TarPiece, key_of: _KeyOf) -> list[Record]:
        out: list[Record] = []
        if piece.offset == 0:
            self._partial.clear()
        start = piece.offset - len(self._partial)
        self._partial += piece.chunk
        n_full = len(self._partial) // BLCKSZ
        for i in range(n_full):
            page = bytes(self._partial[i * BLCKSZ : (i + 1) * BLCKSZ])
            out.append(Record(key_of((start + i * BLCKSZ) // BLCKSZ), self.lsn, _IMAGE, page))
        del self._partial[: n_full * BLCKSZ]
        if piece.last:
            # A torn last page (the file grew while being copied) comes back through WAL.
            self._partial.clear()
        return out

    def _file(self, piece: TarPiece, make: _Make) -> list[Record]:
        if piece.offset == 0:
            self._whole.clear()
        self._whole += piece.chunk
        if not piece.last:
            return []
        key, value = make(bytes(self._whole))
        self._whole.clear()
        return [Record(key, self.lsn, _IMAGE, value)]


async def import_base_backup(
    repo: Repository,
    timeline_id: TimelineId,
    conn: ReplicationConnection,
    *,
    label: str = "zenith import",
    executor: concurrent.futures.Executor | None = None,
) -> ImportResult:
    """Take a base backup over ``conn`` and store it on the (empty) timeline: records at
    the start LSN, ``last_record_lsn`` = start LSN, ``min_readable_lsn`` = end LSN. The
    pieces are cut into records and written in one thread of ``executor`` (default: the
    event loop's)."""
    info = repo.get_timeline(timeline_id)
    backup = await conn.base_backup(label=label)
    start = backup.start_lsn
    if info.last_record_lsn >= start:
        raise InvalidState(
            f"timeline {timeline_id} already has records up to {info.last_record_lsn}, "
            f"not before the backup's start {start}"
        )
    builder = BackupRecords(start)
    result = ImportResult(start, start, backup.timeline)
    q: queue.Queue[list[TarPiece] | None] = queue.Queue(maxsize=QUEUE_BATCHES)
    abort = threading.Event()

    def stream() -> Iterator[Record]:
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                if abort.is_set():
                    raise InvalidState("base backup import aborted") from None
                continue
            records = builder.finish() if item is None else \
                [rec for piece in item for rec in builder.feed(piece)]
            for rec in records:
                result.records += 1
                result.bytes += len(rec.payload)
                yield rec
            if item is None:
                return

    writer = asyncio.get_running_loop().run_in_executor(
        executor, lambda: repo.put_records(timeline_id, stream(), start)
    )

    async def put(item: list[TarPiece] | None) -> None:
        while True:
            if writer.done():
                writer.result()  # raises the writer's error
                raise InvalidState("base backup writer stopped early")
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                await asyncio.sleep(0.002)

    try:
        async with backup:
            pending: list[TarPiece] = []
            size = 0
            async for piece in backup.files():
                pending.append(piece)
                size += len(piece.chunk)
                if size >= BATCH_BYTES:
                    await put(pending)
                    pending, size = [], 0
            await put(pending)
            await put(None)  # the thread adds builder.finish()'s records
        await writer
    except BaseException:
        abort.set()
        await asyncio.gather(writer, return_exceptions=True)
        raise
    if backup.end_lsn is None:
        raise InvalidState("base backup ended without its end LSN")
    result.end_lsn = backup.end_lsn
    result.rel_sizes = builder.rel_sizes
    result.skipped = builder.skipped
    repo.set_min_readable_lsn(timeline_id, backup.end_lsn)
    return result
