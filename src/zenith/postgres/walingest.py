"""WAL ingest: what each decoded WAL record changes in storage.

With ``wal_consistency_checking = all`` (DESIGN §7) a record that changes a page carries
the page as it is after the change, so most of ingest is "store each block image at the
record's end LSN". :class:`WalIngest` adds what arrives without an image:

* relation sizes: from smgr create (0) and truncate records and from the highest block
  written (a size cache per fork, seeded by the base-backup import, keeps the rest cheap);
* visibility-map bits that heap insert/update/delete/lock/multi-insert clear through their
  ``*_CLEARED`` flags without registering the VM page (delta ``VM_CLEAR``);
* truncation of the main, FSM and VM forks (``XLOG_SMGR_TRUNCATE``), including clearing
  the VM bits beyond the new end as ``visibilitymap_prepare_truncate`` does;
* relation files dropped at commit/abort, DROP DATABASE: tombstones for every block;
* pg_xact statuses of commits and aborts, with subtransactions and 2PC (delta
  ``CLOG_SET``), multixact offsets and members (delta ``SLRU_PATCH``), SLRU zero pages;
* relmap updates (the record holds the whole file), CREATE DATABASE: FILE_COPY copies
  every key of the template database at that LSN (a key-range read, so the records before
  it must be stored first: :meth:`WalIngest.needs_flush`; :meth:`WalIngest.read_range`
  also works before the backup's end LSN), WAL_LOG writes PG_VERSION and
  its pages come as images;
* checkpoint records (for an export's control file) and two-phase state files;
* what redo keeps besides pages: the ID counters and the replication origins' progress
  (:mod:`zenith.postgres.redostate`, stored whenever a record changes them), commit
  timestamps, the next multixact's offset entry, SLRU truncation, GiST's follow-right
  clearing and the FSM's tail on truncation.

A block reference without an image stops ingest (:class:`MissingPageImage`): zenith runs no
redo for index or heap pages, so it could only keep the page stale.

Records whose effect needs no storage change (standby, running xacts, assignments, ...)
produce nothing. Everything produced by one WAL record is at its end LSN, one record per
key, so the pages read at an LSN between two records are the state after the first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Final

import google_crc32c

from zenith.errors import InvalidState
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres import pg_constants as pgc
from zenith.postgres import pgcontrol
from zenith.postgres import redo as pgredo
from zenith.postgres import walrecord as wr
from zenith.postgres.keys import (
    SLRU_PAGES_PER_SEGMENT,
    ControlItem,
    ForkNumber,
    KeyKind,
    RelTag,
    SlruId,
    control_key,
    db_key_range,
    db_version_key,
    file_key,
    key_kind,
    pack_file_value,
    parse_rel_key,
    parse_slru_key,
    rebase_db_key,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_page_key,
    slru_range,
    unpack_file_value,
)
from zenith.postgres.redostate import (
    REPLORIGIN_CHECKPOINT_PATH,
    Counters,
    Origins,
    multi_precedes,
    rounded_counters,
    xid_precedes,
)
from zenith.postgres.waldecoder import BlockImage, DecodedRecord, RelFileNode
from zenith.storage import Record, RecordKind, Repository, WriteResult
from zenith.storage.encode import VersionEncoder
from zenith.storage.redo import apply_delta, unpack_image

BLCKSZ: Final = pgc.BLCKSZ
_PAGE_HEADER: Final = pgc.maxalign(pgc.SIZE_OF_PAGE_HEADER_DATA)
#: visibilitymap.c: 2 bits per heap block in the page contents.
HEAPBLOCKS_PER_PAGE: Final = (BLCKSZ - _PAGE_HEADER) * 4
VISIBILITYMAP_ALL_VISIBLE: Final = 0x01
VISIBILITYMAP_ALL_FROZEN: Final = 0x02
VISIBILITYMAP_VALID_BITS: Final = 0x03
#: clog.c
CLOG_XACTS_PER_PAGE: Final = BLCKSZ * 4
#: multixact.c (PostgreSQL 15)
MULTIXACT_OFFSETS_PER_PAGE: Final = BLCKSZ // 4
MULTIXACT_MEMBERS_PER_GROUP: Final = 4
MULTIXACT_GROUP_SIZE: Final = 4 + 4 * MULTIXACT_MEMBERS_PER_GROUP
MULTIXACT_GROUPS_PER_PAGE: Final = BLCKSZ // MULTIXACT_GROUP_SIZE
MULTIXACT_MEMBERS_PER_PAGE: Final = MULTIXACT_GROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_GROUP
#: The last member page: offsets wrap at 2^32 (MXOffsetToMemberPage(MaxMultiXactOffset)).
MULTIXACT_MEMBER_PAGES: Final = 0xFFFFFFFF // MULTIXACT_MEMBERS_PER_PAGE + 1
#: commit_ts.c: an 8-byte TimestampTz and a 2-byte origin id per transaction, packed.
COMMIT_TS_ENTRY: Final = 10
COMMIT_TS_XACTS_PER_PAGE: Final = BLCKSZ // COMMIT_TS_ENTRY
#: freespace.c
FSM_SLOTS_PER_PAGE: Final = (BLCKSZ - _PAGE_HEADER - 4) - (BLCKSZ // 2 - 1)
FSM_TREE_DEPTH: Final = 3
#: Records per put_records call in :meth:`WalIngest.add`.
BATCH_RECORDS: Final = 2048

_IMAGE, _DELTA, _TOMB = RecordKind.IMAGE, RecordKind.DELTA, RecordKind.TOMBSTONE
_PG_VERSION: Final = b"15\n"
_FORKS: Final = tuple(ForkNumber)
_COUNTERS_KEY: Final = control_key(ControlItem.COUNTERS)
_ORIGINS_KEY: Final = control_key(ControlItem.ORIGINS)
#: Records whose block references may lack an image even when the source runs with
#: ``wal_consistency_checking = all``: redo restores only the images they carry
#: (xlog_redo skips a hint FPI's block without one).
_NO_IMAGE_OK: Final = frozenset({(pgc.RmgrId.XLOG, pgc.XLOG_FPI_FOR_HINT)})
#: Records that read storage at their start (so what precedes them must be stored).
_READS_STORAGE: Final = frozenset({
    (pgc.RmgrId.DBASE, pgc.XLOG_DBASE_CREATE_FILE_COPY),
    (pgc.RmgrId.CLOG, pgc.CLOG_TRUNCATE),
    (pgc.RmgrId.MULTIXACT, pgc.XLOG_MULTIXACT_TRUNCATE_ID),
    (pgc.RmgrId.COMMIT_TS, pgc.COMMIT_TS_TRUNCATE),
})


class MissingPageImage(InvalidState):
    """A WAL record changes a page without carrying its image: ingest cannot rebuild the
    page (zenith runs no redo for it), so it stops rather than leave the page stale."""


def vm_position(heap_blkno: int) -> tuple[int, int, int]:
    """``(VM block, byte offset in that page, bit shift)`` of a heap block's 2 bits."""
    block, rest = divmod(heap_blkno, HEAPBLOCKS_PER_PAGE)
    return block, _PAGE_HEADER + rest // 4, (rest % 4) * 2


def fsm_blocks_after_truncate(heap_nblocks: int) -> int:
    """FreeSpaceMapPrepareTruncateRel's new FSM size for a heap cut to ``heap_nblocks``."""
    logpageno, slot = divmod(heap_nblocks, FSM_SLOTS_PER_PAGE)
    leafno, pages = logpageno, 0
    for _ in range(FSM_TREE_DEPTH):
        pages += leafno + 1
        leafno //= FSM_SLOTS_PER_PAGE
    physical = pages - 1  # fsm_logical_to_physical at the bottom level
    return physical + 1 if slot > 0 else physical


def set_page_lsn(page: bytes, lsn: Lsn) -> bytes:
    """``page`` with pd_lsn = ``lsn``, as redo's PageSetLSN does (not on a new page)."""
    if len(page) != BLCKSZ or page[14:16] == b"\0\0":  # PageIsNew: pd_upper == 0
        return page
    return struct.pack("<II", lsn >> 32, lsn & 0xFFFFFFFF) + page[8:]


_ZEROS: Final = memoryview(bytes(BLCKSZ))
_PD_LSN: Final = struct.Struct("<II")


def image_at(image: BlockImage, lsn: Lsn) -> bytes:
    """``set_page_lsn(image.page(), lsn)``, built with one copy for the usual image (not
    compressed, hole after the page header): nearly every WAL record carries one."""
    data, hole_offset, hole_length = image.data, image.hole_offset, image.hole_length
    if image.bimg_info & pgc.BKPIMAGE_COMPRESS_MASK or len(data) + hole_length != BLCKSZ \
            or (hole_length and hole_offset < 16):
        return set_page_lsn(image.page(), lsn)
    view = memoryview(data)
    if data[14:16] == b"\0\0":  # PageIsNew: the LSN stays
        if not hole_length:
            return data
        return b"".join((view[:hole_offset], _ZEROS[:hole_length], view[hole_offset:]))
    head = _PD_LSN.pack(lsn >> 32, lsn & 0xFFFFFFFF)
    if not hole_length:
        return b"".join((head, view[8:]))
    return b"".join((head, view[8:hole_offset], _ZEROS[:hole_length], view[hole_offset:]))


class WalIngest:
    """Per-timeline ingest state: turns :class:`DecodedRecord` objects into records.

    ``rel_sizes`` is the size (in blocks) of every relation fork at the point ingest
    resumes: :class:`~zenith.postgres.import_basebackup.ImportResult` has it after an
    import; without it, it is read from storage (:meth:`load_sizes`).
    """

    def __init__(
        self,
        repo: Repository,
        timeline_id: TimelineId,
        rel_sizes: dict[RelTag, int] | None = None,
        *,
        batch_records: int = BATCH_RECORDS,
        compact: bool = True,
    ) -> None:
        self.repo = repo
        self.timeline_id = timeline_id
        self.batch_records = batch_records
        self.last_lsn = repo.get_timeline(timeline_id).last_record_lsn
        #: End of the last record :meth:`ingest` turned into records (stored or not).
        self.ingested_lsn = self.last_lsn
        self.sizes: dict[RelTag, int] = (
            dict(rel_sizes) if rel_sizes is not None else self.load_sizes()
        )
        self.pending: list[Record] = []
        #: Whole page images of recently written keys go to storage as XOR deltas
        #: against the version before (docs/storage.md, "Compact page versions").
        self.encoder: VersionEncoder | None = VersionEncoder() if compact else None
        self.records_seen = 0
        #: Redo's counters and replication origin progress as of ``ingested_lsn``.
        self.counters = self._load_counters()
        self.origins = self._load_origins()
        #: multixact.c's last_initialized_offsets_page / pre_initialized_offsets_page.
        self.last_zeroed_offsets: int | None = None
        self.pre_initialized_offsets: int | None = None

    def load_sizes(self) -> dict[RelTag, int]:
        """Every relation fork's size from storage at ``last_record_lsn`` (one pass over
        the database keys: resuming is rare, so no separate index of sizes).

        Before the base backup's end LSN the timeline cannot be read, so the size records
        are replayed from the timeline's own records instead (an imported timeline has no
        ancestor)."""
        sizes: dict[RelTag, int] = {}
        info = self.repo.get_timeline(self.timeline_id)
        if info.last_record_lsn < info.min_readable_lsn and info.ancestor_id is None:
            for rec in self.repo.iter_records(self.timeline_id, Lsn(0), info.last_record_lsn):
                if rec.key[0] == 0 and key_kind(rec.key) is KeyKind.REL_SIZE:
                    tag = parse_rel_key(rec.key)[1]
                    if rec.kind is _TOMB:
                        sizes.pop(tag, None)
                    else:
                        sizes[tag] = int.from_bytes(rec.payload[:4], "little")
            return sizes
        lo, hi = bytes(18), b"\x01" + bytes(17)
        for key, value in self.repo.materialize(self.timeline_id, self.last_lsn, lo=lo, hi=hi):
            if key_kind(key) is KeyKind.REL_SIZE:
                sizes[parse_rel_key(key)[1]] = int.from_bytes(value[:4], "little")
        return sizes

    def _read_own(self, key: bytes) -> bytes | None:
        """A key ingest itself keeps whole at every LSN (counters, origins, pg_control), at
        ``last_record_lsn``, even before the timeline is readable."""
        return self.repo.get_value(self.timeline_id, key, self.last_lsn, before_readable=True)

    def _load_counters(self) -> Counters:
        stored = self._read_own(_COUNTERS_KEY)
        if stored is not None:
            return Counters.unpack(stored)
        # A timeline ingested before the counters were kept: its newest checkpoint's,
        # moved past every ID the stored SLRU pages can hold (the WAL between that
        # checkpoint and here is gone), as an export of it would.
        control = self._read_own(control_key(ControlItem.PG_CONTROL))
        checkpoint = self._read_own(control_key(ControlItem.CHECKPOINT))
        if checkpoint is not None:
            cp = wr.parse_checkpoint(checkpoint)
        elif control is not None:
            cp = pgcontrol.checkpoint_copy(control)
        else:
            return Counters(3, 16384, 1, 0, 3, 1, 1, 1, 0, 0, False, 1)
        pages = {slru: {parse_slru_key(k)[1] for k, _ in self.read_range(*slru_range(slru))}
                 for slru in (SlruId.XACT, SlruId.MULTIXACT_OFFSETS, SlruId.MULTIXACT_MEMBERS)}
        cp = rounded_counters(cp, pages)
        return Counters.from_checkpoint(
            cp, control is not None and pgcontrol.tracks_commit_timestamps(control))

    def _load_origins(self) -> Origins:
        stored = self._read_own(_ORIGINS_KEY)
        if stored is not None:
            return Origins.unpack(stored)
        file = self._read_own(file_key(REPLORIGIN_CHECKPOINT_PATH))
        return Origins.from_checkpoint_file(unpack_file_value(file)[1]) if file else Origins()

    def read_range(self, lo: bytes, hi: bytes) -> Iterable[tuple[bytes, bytes]]:
        """Every key in ``[lo, hi)`` with its value at the stored ``last_record_lsn``.

        Between a base backup's start and end LSN storage refuses reads (the files are not
        consistent yet), but WAL there must still be ingested -- CREATE DATABASE FILE_COPY
        included, which copies whatever the template holds at that point of the WAL, just
        as PostgreSQL's own recovery would. So there the range is rebuilt from the
        timeline's records (an imported timeline has no ancestor): rare, and bounded by
        the template database's size."""
        info = self.repo.get_timeline(self.timeline_id)
        if info.last_record_lsn >= info.min_readable_lsn or info.ancestor_id is not None:
            return self.repo.materialize(self.timeline_id, info.last_record_lsn, lo=lo, hi=hi)
        values: dict[bytes, bytes | None] = {}
        for rec in self.repo.iter_records(self.timeline_id, Lsn(0), info.last_record_lsn):
            if not lo <= rec.key < hi:
                continue
            if rec.kind is _IMAGE:
                values[rec.key] = rec.payload
            elif rec.kind is RecordKind.ZIMAGE:
                values[rec.key] = unpack_image(rec.payload)
            elif rec.kind is _TOMB:
                values[rec.key] = None
            else:
                values[rec.key] = apply_delta(values.get(rec.key), rec.payload)
        return sorted((k, v) for k, v in values.items() if v is not None)

    # -- batching -------------------------------------------------------------------------

    def add(self, rec: DecodedRecord) -> None:
        """Ingest ``rec`` into the pending batch, writing it when full (or before a record
        that reads storage)."""
        if self.needs_flush(rec):
            self.flush()
        self.pending += self.ingest(rec)
        if rec.end_lsn > self.last_lsn:
            self.last_lsn = rec.end_lsn
        if len(self.pending) >= self.batch_records:
            self.flush()

    def flush(self, last_record_lsn: Lsn | None = None) -> WriteResult | None:
        """Store the pending records and advance ``last_record_lsn`` to the end of the
        last record ingested (or ``last_record_lsn``, e.g. the WAL flushed so far)."""
        upto = max(self.last_lsn, last_record_lsn or 0)
        stored = self.repo.get_timeline(self.timeline_id).last_record_lsn
        if upto <= stored and not self.pending:
            return None
        records = self.pending if self.encoder is None else self.encoder.encode(self.pending)
        result = self.repo.put_records(self.timeline_id, records, Lsn(upto))
        self.pending = []
        self.last_lsn = Lsn(upto)
        return result

    @staticmethod
    def needs_flush(rec: DecodedRecord) -> bool:
        """Whether ingesting ``rec`` reads storage at its start (CREATE DATABASE
        FILE_COPY, SLRU truncations), so every earlier record must be stored first."""
        info = rec.rmgr_info & 0x70 if rec.rmid == pgc.RmgrId.DBASE else rec.rmgr_info
        return (rec.rmid, info) in _READS_STORAGE

    # -- one record -----------------------------------------------------------------------

    def ingest(self, rec: DecodedRecord) -> list[Record]:
        """The storage records (all at ``rec.end_lsn``) for one WAL record."""
        self.records_seen += 1
        out: dict[bytes, Record] = {}
        lsn = rec.end_lsn
        blocks = rec.blocks
        bare = None
        for b in blocks:
            if b.image is None:
                bare = b
                break
        if bare is not None and (rec.rmid, rec.rmgr_info) not in _NO_IMAGE_OK:
            raise MissingPageImage(
                f"WAL record {_describe(rec)} at {rec.lsn} changes block {bare.blkno} of "
                f"relation {bare.rel_tag} without a page image; zenith rebuilds pages only "
                "from images, so it stops here rather than keep a stale page",
                hint="every session on the source must run with wal_consistency_checking = "
                     "'all' (a superuser can turn it off for one session); `zenith detach` "
                     "the branch (dropping its slot) and import the source again",
            )
        sizes = self.sizes
        for blk in blocks:
            rl, blkno = blk.rlocator, blk.blkno
            tag = RelTag(rl.spcnode, rl.dbnode, rl.relnode, blk.forknum)
            if blk.image is not None:
                key = rel_block_key(tag, blkno)
                out[key] = Record(key, lsn, _IMAGE, image_at(blk.image, lsn))
            if blkno >= sizes.get(tag, 0):
                self._set_size(out, tag, blkno + 1, lsn)
        before, origins = self.counters, self.origins
        # xlogrecovery.c ApplyWalRecord: the next XID is beyond every record's XID.
        self.counters = self.counters.past_xid(rec.xid)
        handler = _HANDLERS.get(rec.rmid)
        if handler is not None:
            handler(self, rec, out)
        if self.counters is not before and self.counters != before:
            out[_COUNTERS_KEY] = Record(_COUNTERS_KEY, lsn, _IMAGE, self.counters.pack())
        if self.origins is not origins and self.origins != origins:
            out[_ORIGINS_KEY] = Record(_ORIGINS_KEY, lsn, _IMAGE, self.origins.pack())
        self.ingested_lsn = max(self.ingested_lsn, rec.end_lsn)
        return list(out.values())

    # -- helpers --------------------------------------------------------------------------

    def _set_size(self, out: dict[bytes, Record], tag: RelTag, n: int, lsn: Lsn) -> None:
        old = self.sizes.get(tag, 0)
        for blkno in range(n, old):
            key = rel_block_key(tag, blkno)
            out[key] = Record(key, lsn, _TOMB)
        self.sizes[tag] = n
        key = rel_size_key(tag)
        out[key] = Record(key, lsn, _IMAGE, n.to_bytes(4, "little"))

    def _drop_rel(self, out: dict[bytes, Record], node: RelFileNode, lsn: Lsn) -> None:
        for fork in _FORKS:
            tag = node.tag(fork)
            if tag in self.sizes:
                self._set_size(out, tag, 0, lsn)
                del self.sizes[tag]
                out[rel_size_key(tag)] = Record(rel_size_key(tag), lsn, _TOMB)

    def _vm_clear(self, out: dict[bytes, Record], rec: DecodedRecord, node: RelFileNode,
                  heap_blkno: int, bits: int) -> None:
        vm = node.tag(ForkNumber.VISIBILITYMAP)
        vm_blk, offset, shift = vm_position(heap_blkno)
        if vm_blk >= self.sizes.get(vm, 0):
            return  # no VM page: no bit was set
        key = rel_block_key(vm, vm_blk)
        mask = ~(bits << shift) & 0xFF
        prev = out.get(key)
        if prev is not None and prev.kind is _IMAGE:
            return  # the record carries the VM page itself
        masks = [(offset, mask)]
        if prev is not None:  # update: old and new heap block on one VM page
            body = prev.payload[1:]
            masks += [(int.from_bytes(body[i : i + 2], "big"), body[i + 2])
                      for i in range(0, len(body), 3)]
        out[key] = Record(key, rec.end_lsn, _DELTA, pgredo.make_vm_clear(masks))

    def _clog(self, out: dict[bytes, Record], xids: Iterable[int], status: int,
              lsn: Lsn) -> None:
        pages: dict[int, list[tuple[int, int, int]]] = {}
        for xid in xids:
            page, rest = divmod(xid, CLOG_XACTS_PER_PAGE)
            pages.setdefault(page, []).append((rest // 4, (rest % 4) * 2, status))
        for page, sets in pages.items():
            key = slru_page_key(SlruId.XACT, page)
            out[key] = Record(key, lsn, _DELTA, pgredo.make_clog_set(sets))


# -- resource managers ---------------------------------------------------------------------


def _heap(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    op = rec.rmgr_info & pgc.XLOG_HEAP_OPMASK
    if not rec.blocks:
        return
    b0 = rec.blocks[0]
    if op == pgc.XLOG_HEAP_INSERT:
        if wr.parse_heap_insert(rec.main_data).all_visible_cleared:
            ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_VALID_BITS)
    elif op == pgc.XLOG_HEAP_DELETE:
        if wr.parse_heap_delete(rec.main_data).all_visible_cleared:
            ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_VALID_BITS)
    elif op in (pgc.XLOG_HEAP_UPDATE, pgc.XLOG_HEAP_HOT_UPDATE):
        upd = wr.parse_heap_update(rec.main_data)
        old_blk = next((b.blkno for b in rec.blocks if b.block_id == 1), b0.blkno)
        if upd.old_all_visible_cleared:
            ing._vm_clear(out, rec, b0.rlocator, old_blk, VISIBILITYMAP_VALID_BITS)
        if upd.new_all_visible_cleared:
            ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_VALID_BITS)
    elif op == pgc.XLOG_HEAP_LOCK and wr.parse_heap_lock(rec.main_data).all_frozen_cleared:
        ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_ALL_FROZEN)


def _heap2(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    op = rec.rmgr_info & pgc.XLOG_HEAP_OPMASK
    if not rec.blocks:
        return
    b0 = rec.blocks[0]
    if op == pgc.XLOG_HEAP2_MULTI_INSERT:
        if wr.parse_heap_multi_insert(rec.main_data).all_visible_cleared:
            ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_VALID_BITS)
    elif (op == pgc.XLOG_HEAP2_LOCK_UPDATED
          and wr.parse_heap_lock_updated(rec.main_data).all_frozen_cleared):
        ing._vm_clear(out, rec, b0.rlocator, b0.blkno, VISIBILITYMAP_ALL_FROZEN)


def _smgr(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    info, lsn = rec.rmgr_info, rec.end_lsn
    if info == pgc.XLOG_SMGR_CREATE:
        create = wr.parse_smgr_create(rec.main_data)
        tag = create.rnode.tag(create.forknum)
        if tag not in ing.sizes:
            ing._set_size(out, tag, 0, lsn)
    elif info == pgc.XLOG_SMGR_TRUNCATE:
        trunc = wr.parse_smgr_truncate(rec.main_data)
        node, nblocks = trunc.rnode, trunc.blkno
        if trunc.truncates_heap:
            main = node.tag(ForkNumber.MAIN)
            if ing.sizes.get(main, 0) > nblocks:
                ing._set_size(out, main, nblocks, lsn)
        fsm = node.tag(ForkNumber.FSM)
        if trunc.truncates_fsm and fsm in ing.sizes:
            # FreeSpaceMapPrepareTruncateRel: clear the cut heap blocks' slots in the last
            # leaf page kept (if it exists), then cut the fork after it.
            new = fsm_blocks_after_truncate(nblocks)
            slot = nblocks % FSM_SLOTS_PER_PAGE
            if slot and new - 1 < ing.sizes[fsm]:
                key = rel_block_key(fsm, new - 1)
                out[key] = Record(key, lsn, _DELTA, pgredo.make_fsm_truncate(slot))
            if ing.sizes[fsm] > new:
                ing._set_size(out, fsm, new, lsn)
        vm = node.tag(ForkNumber.VISIBILITYMAP)
        if trunc.truncates_vm and vm in ing.sizes:
            _truncate_vm(ing, out, rec, vm, nblocks)


def _truncate_vm(ing: WalIngest, out: dict[bytes, Record], rec: DecodedRecord, vm: RelTag,
                 heap_nblocks: int) -> None:
    """visibilitymap_prepare_truncate: clear the bits of the cut heap blocks in the last
    VM page kept, then cut the fork after it."""
    block, rest = divmod(heap_nblocks, HEAPBLOCKS_PER_PAGE)
    trunc_byte, trunc_shift = rest // 4, (rest % 4) * 2
    new = block
    if trunc_byte or trunc_shift:
        if block >= ing.sizes[vm]:
            return  # the map is already smaller
        first = _PAGE_HEADER + trunc_byte
        masks = [(first, (1 << trunc_shift) - 1)] + [(o, 0) for o in range(first + 1, BLCKSZ)]
        key = rel_block_key(vm, block)
        out[key] = Record(key, rec.end_lsn, _DELTA, pgredo.make_vm_clear(masks))
        new = block + 1
    if ing.sizes[vm] > new:
        ing._set_size(out, vm, new, rec.end_lsn)


def _xact(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    op, lsn = rec.rmgr_info & pgc.XLOG_XACT_OPMASK, rec.end_lsn
    if op in (pgc.XLOG_XACT_COMMIT, pgc.XLOG_XACT_COMMIT_PREPARED,
              pgc.XLOG_XACT_ABORT, pgc.XLOG_XACT_ABORT_PREPARED):
        commit = op in (pgc.XLOG_XACT_COMMIT, pgc.XLOG_XACT_COMMIT_PREPARED)
        parsed = (wr.parse_xact_commit if commit else wr.parse_xact_abort)(rec.info,
                                                                           rec.main_data)
        xid = parsed.twophase_xid if parsed.twophase_xid is not None else rec.xid
        status = pgc.TRANSACTION_STATUS_COMMITTED if commit else pgc.TRANSACTION_STATUS_ABORTED
        ing._clog(out, (xid, *parsed.subxacts), status, lsn)
        for x in (xid, *parsed.subxacts):  # TransactionIdLatest, then advance past it
            ing.counters = ing.counters.past_xid(x)
        origin = rec.origin or 0
        if parsed.origin_lsn is not None:  # xact_redo_commit/_abort: apply progress
            ing.origins = ing.origins.advance(origin, parsed.origin_lsn, backward=False)
        if commit and ing.counters.commit_ts_active:
            when = (parsed.origin_timestamp if parsed.origin_timestamp is not None
                    else parsed.xact_time)
            _commit_ts(ing, out, (xid, *parsed.subxacts), when, origin, lsn)
        for node in parsed.dropped_rels:
            ing._drop_rel(out, node, lsn)
        if parsed.twophase_xid is not None:
            key = file_key(_twophase_path(parsed.twophase_xid))
            out[key] = Record(key, lsn, _TOMB)
    elif op == pgc.XLOG_XACT_PREPARE:
        # The state file PostgreSQL writes at the next checkpoint: the record's data
        # followed by its CRC32C (twophase.c RecreateTwoPhaseFile).
        prep = wr.parse_xact_prepare(rec.main_data)
        # Prepared subtransactions: ProcessTwoPhaseBuffer at the next startup.
        for x in (prep.xid, *prep.subxacts):
            ing.counters = ing.counters.past_xid(x)
        if prep.origin_lsn:  # PrepareRedoAdd: apply progress of the prepared transaction
            ing.origins = ing.origins.advance(rec.origin or 0, prep.origin_lsn,
                                              backward=False)
        path = _twophase_path(prep.xid)
        content = rec.main_data + struct.pack("<I", google_crc32c.value(rec.main_data))
        out[file_key(path)] = Record(file_key(path), lsn, _IMAGE, pack_file_value(path, content))


def _describe(rec: DecodedRecord) -> str:
    """``Heap/INSERT`` as pg_waldump names it (``Btree/0x00`` where the name is unknown)."""
    name = pgc.record_name(rec.rmid, rec.info)
    return f"{rec.rmgr_name}/{name if name is not None else f'0x{rec.rmgr_info:02X}'}"


def _commit_ts(ing: WalIngest, out: dict[bytes, Record], xids: tuple[int, ...], when: int,
               origin: int, lsn: Lsn) -> None:
    """TransactionTreeSetCommitTsData: each XID's 10-byte entry (time, origin id)."""
    entry = struct.pack("<qH", when, origin)
    pages: dict[int, list[tuple[int, bytes]]] = {}
    for xid in xids:
        page, slot = divmod(xid, COMMIT_TS_XACTS_PER_PAGE)
        pages.setdefault(page, []).append((slot * COMMIT_TS_ENTRY, entry))
    for page, changes in pages.items():
        _slru_patch(out, slru_page_key(SlruId.COMMIT_TS, page), changes, lsn)
    ing.counters = ing.counters.committed_ts(xids[-1])


def _slru_patch(out: dict[bytes, Record], key: bytes, changes: list[tuple[int, bytes]],
                lsn: Lsn) -> None:
    """Add ``changes`` to what the record already does to the SLRU page ``key``."""
    prev = out.get(key)
    if prev is not None:  # an earlier patch of the same record: keep its ranges first
        changes = pgredo.slru_patch_ranges(prev.payload) + changes
    out[key] = Record(key, lsn, _DELTA, pgredo.make_slru_patch(changes))


def _twophase_path(xid: int) -> str:
    return f"pg_twophase/{xid:08X}"


def _clog_rm(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    if rec.rmgr_info == pgc.CLOG_ZEROPAGE:
        key = slru_page_key(SlruId.XACT, wr.parse_zero_page(rec.main_data))
        out[key] = Record(key, rec.end_lsn, _IMAGE, bytes(BLCKSZ))
    elif rec.rmgr_info == pgc.CLOG_TRUNCATE:
        trunc = wr.parse_clog_truncate(rec.main_data)
        ing.counters = ing.counters.clog_truncated(trunc.oldest_xact, trunc.oldest_xact_db)
        _slru_truncate(ing, rec, out, SlruId.XACT, trunc.pageno,
                       _xid_pages_precede(CLOG_XACTS_PER_PAGE))


def _xid_pages_precede(per_page: int) -> Callable[[int, int], bool]:
    """CLOGPagePrecedes / CommitTsPagePrecedes for an SLRU of ``per_page`` XIDs a page."""

    def precedes(p1: int, p2: int) -> bool:
        x1, x2 = (p1 * per_page + 4) & 0xFFFFFFFF, (p2 * per_page + 4) & 0xFFFFFFFF
        return xid_precedes(x1, x2) and xid_precedes(x1, (x2 + per_page - 1) & 0xFFFFFFFF)

    return precedes


def _require_stored(ing: WalIngest, rec: DecodedRecord) -> None:
    """A record that reads storage: every record before it must be stored (needs_flush)."""
    stored = ing.repo.get_timeline(ing.timeline_id).last_record_lsn
    if stored < ing.ingested_lsn:
        raise InvalidState(
            f"{_describe(rec)} at {rec.lsn} reads storage, which has records up to "
            f"{stored} of the {ing.ingested_lsn} ingested: flush first")


def _slru_truncate(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record], slru: SlruId,
                   cutoff: int, precedes: Callable[[int, int], bool]) -> None:
    """SimpleLruTruncate: delete every segment whose first and last pages precede the
    cutoff page (SlruMayDeleteSegment), in the SLRU's own wrapping order."""
    _require_stored(ing, rec)
    lsn = rec.end_lsn
    lo, hi = slru_range(slru)
    for key, _value in ing.read_range(lo, hi):
        pageno = parse_slru_key(key)[1]
        first = pageno - pageno % SLRU_PAGES_PER_SEGMENT
        if precedes(first, cutoff) and precedes(first + SLRU_PAGES_PER_SEGMENT - 1, cutoff):
            out[key] = Record(key, lsn, _TOMB)


def _commit_ts_rm(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    if rec.rmgr_info == pgc.COMMIT_TS_ZEROPAGE:
        key = slru_page_key(SlruId.COMMIT_TS, wr.parse_zero_page(rec.main_data))
        out[key] = Record(key, rec.end_lsn, _IMAGE, bytes(BLCKSZ))
    elif rec.rmgr_info == pgc.COMMIT_TS_TRUNCATE:
        trunc = wr.parse_commit_ts_truncate(rec.main_data)
        ing.counters = ing.counters.commit_ts_truncated(trunc.oldest_xid)
        _slru_truncate(ing, rec, out, SlruId.COMMIT_TS, trunc.pageno,
                       _xid_pages_precede(COMMIT_TS_XACTS_PER_PAGE))


def _replorigin(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    if rec.rmgr_info == pgc.XLOG_REPLORIGIN_SET:
        st = wr.parse_replorigin_set(rec.main_data)
        ing.origins = ing.origins.advance(st.node_id, st.remote_lsn, backward=st.force)
    elif rec.rmgr_info == pgc.XLOG_REPLORIGIN_DROP:
        ing.origins = ing.origins.drop(wr.parse_replorigin_drop(rec.main_data))


def _multixact(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    info, lsn = rec.rmgr_info, rec.end_lsn
    if info in (pgc.XLOG_MULTIXACT_ZERO_OFF_PAGE, pgc.XLOG_MULTIXACT_ZERO_MEM_PAGE):
        offsets = info == pgc.XLOG_MULTIXACT_ZERO_OFF_PAGE
        pageno = wr.parse_zero_page(rec.main_data)
        key = slru_page_key(SlruId.MULTIXACT_OFFSETS if offsets else SlruId.MULTIXACT_MEMBERS,
                            pageno)
        if offsets:
            pre, ing.pre_initialized_offsets = ing.pre_initialized_offsets, None
            ing.last_zeroed_offsets = pageno
            if pre == pageno:  # see CREATE_ID below: zeroing now would lose that entry
                return
        out[key] = Record(key, lsn, _IMAGE, bytes(BLCKSZ))
    elif info == pgc.XLOG_MULTIXACT_CREATE_ID:
        create = wr.parse_multixact_create(rec.main_data)
        patches: dict[bytes, list[tuple[int, bytes]]] = {}
        page, entry = divmod(create.mid, MULTIXACT_OFFSETS_PER_PAGE)
        patches.setdefault(slru_page_key(SlruId.MULTIXACT_OFFSETS, page), []).append(
            (entry * 4, struct.pack("<I", create.moff)))
        # RecordNewMultiXact (15.16 on) also sets the NEXT multixact's offset to the end
        # of this one's members (skipping offset 0), which GetMultiXactIdMembers relies on.
        after = (create.mid + 1) & 0xFFFFFFFF or 1
        end = (create.moff + len(create.members)) & 0xFFFFFFFF or 1
        next_page = after // MULTIXACT_OFFSETS_PER_PAGE
        ing.pre_initialized_offsets = None
        if next_page != page and (
                ing.last_zeroed_offsets == page if ing.last_zeroed_offsets is not None
                else ing._read_own(slru_page_key(SlruId.MULTIXACT_OFFSETS, next_page)) is None):
            # WAL of a minor release before 15.16 zeroes the next page only when its first
            # multixact is created: this entry starts it, and that zeroing is skipped.
            ing.pre_initialized_offsets = next_page
        page, entry = divmod(after, MULTIXACT_OFFSETS_PER_PAGE)
        patches.setdefault(slru_page_key(SlruId.MULTIXACT_OFFSETS, page), []).append(
            (entry * 4, struct.pack("<I", end)))
        ing.counters = ing.counters.past_multi(create.mid + 1,
                                               create.moff + len(create.members))
        for member in create.members:
            ing.counters = ing.counters.past_xid(member.xid)
        for i, member in enumerate(create.members):
            off = (create.moff + i) & 0xFFFFFFFF
            page = off // MULTIXACT_MEMBERS_PER_PAGE
            flags_at = (off // MULTIXACT_MEMBERS_PER_GROUP % MULTIXACT_GROUPS_PER_PAGE
                        ) * MULTIXACT_GROUP_SIZE
            slot = off % MULTIXACT_MEMBERS_PER_GROUP
            changes = patches.setdefault(slru_page_key(SlruId.MULTIXACT_MEMBERS, page), [])
            changes.append((flags_at + 4 + slot * 4, struct.pack("<I", member.xid)))
            # 8 flag bits per member, little-endian in the group's flag word: one byte.
            changes.append((flags_at + slot, bytes([member.status & 0xFF])))
        for key, changes in patches.items():
            _slru_patch(out, key, changes, lsn)
    elif info == pgc.XLOG_MULTIXACT_TRUNCATE_ID:
        trunc = wr.parse_multixact_truncate(rec.main_data)
        ing.counters = ing.counters.multi_truncated(trunc.end_trunc_off, trunc.oldest_multi_db)
        _require_stored(ing, rec)
        _truncate_members(ing, out, trunc.start_trunc_memb, trunc.end_trunc_memb, lsn)
        # PerformOffsetsTruncation: up to the page of the multixact before the new oldest.
        last = (trunc.end_trunc_off - 1) & 0xFFFFFFFF or 0xFFFFFFFF
        per_page = MULTIXACT_OFFSETS_PER_PAGE

        def offsets_precedes(p1: int, p2: int) -> bool:  # MultiXactOffsetPagePrecedes
            m1, m2 = (p1 * per_page + 2) & 0xFFFFFFFF, (p2 * per_page + 2) & 0xFFFFFFFF
            return multi_precedes(m1, m2) and multi_precedes(
                m1, (m2 + per_page - 1) & 0xFFFFFFFF)

        _slru_truncate(ing, rec, out, SlruId.MULTIXACT_OFFSETS, last // per_page,
                       offsets_precedes)


def _truncate_members(ing: WalIngest, out: dict[bytes, Record], start: int, end: int,
                      lsn: Lsn) -> None:
    """PerformMembersTruncation: delete the member segments from ``start``'s up to, not
    including, ``end``'s, wrapping after the last one."""
    last_segment = (MULTIXACT_MEMBER_PAGES - 1) // SLRU_PAGES_PER_SEGMENT
    first_seg = start // MULTIXACT_MEMBERS_PER_PAGE // SLRU_PAGES_PER_SEGMENT
    end_seg = end // MULTIXACT_MEMBERS_PER_PAGE // SLRU_PAGES_PER_SEGMENT
    doomed: set[int] = set()
    seg = first_seg
    while seg != end_seg and len(doomed) <= last_segment:
        doomed.add(seg)
        seg = 0 if seg == last_segment else seg + 1
    if not doomed:
        return
    lo, hi = slru_range(SlruId.MULTIXACT_MEMBERS)
    for key, _value in ing.read_range(lo, hi):
        if parse_slru_key(key)[1] // SLRU_PAGES_PER_SEGMENT in doomed:
            out[key] = Record(key, lsn, _TOMB)


def _relmap(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    if rec.rmgr_info == pgc.XLOG_RELMAP_UPDATE:
        upd = wr.parse_relmap_update(rec.main_data)
        key = relmap_key(upd.tsid, upd.dbid)
        out[key] = Record(key, rec.end_lsn, _IMAGE, upd.data)


def _dbase(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    info, lsn = rec.rmgr_info & 0x70, rec.end_lsn
    if info == pgc.XLOG_DBASE_CREATE_FILE_COPY:
        cp = wr.parse_dbase_create_file_copy(rec.main_data)
        _require_stored(ing, rec)
        # dbase_redo removes the destination directory first: whatever is stored there
        # (a database dropped without its record reaching us) is not part of the copy.
        for key, _value in ing.read_range(*db_key_range(cp.tablespace_id, cp.db_id)):
            out[key] = Record(key, lsn, _TOMB)
        for tag in [t for t in ing.sizes if (t.spcnode, t.dbnode) == (cp.tablespace_id,
                                                                       cp.db_id)]:
            del ing.sizes[tag]
        lo, hi = db_key_range(cp.src_tablespace_id, cp.src_db_id)
        for key, value in ing.read_range(lo, hi):
            new = rebase_db_key(key, cp.tablespace_id, cp.db_id)
            out[new] = Record(new, lsn, _IMAGE, value)
            if key_kind(new) is KeyKind.REL_SIZE:
                ing.sizes[parse_rel_key(new)[1]] = int.from_bytes(value[:4], "little")
    elif info == pgc.XLOG_DBASE_CREATE_WAL_LOG:
        wl = wr.parse_dbase_create_wal_log(rec.main_data)
        key = db_version_key(wl.tablespace_id, wl.db_id)
        out[key] = Record(key, lsn, _IMAGE, _PG_VERSION)
    elif info == pgc.XLOG_DBASE_DROP:
        drop = wr.parse_dbase_drop(rec.main_data)
        for spc in drop.tablespace_ids:
            for tag in [t for t in ing.sizes if (t.spcnode, t.dbnode) == (spc, drop.db_id)]:
                ing._drop_rel(out, RelFileNode(tag.spcnode, tag.dbnode, tag.relnode), lsn)
            for key in (relmap_key(spc, drop.db_id), db_version_key(spc, drop.db_id)):
                out[key] = Record(key, lsn, _TOMB)


def _xlog(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    info = rec.rmgr_info
    if info in (pgc.XLOG_CHECKPOINT_SHUTDOWN, pgc.XLOG_CHECKPOINT_ONLINE):
        key = control_key(ControlItem.CHECKPOINT)
        out[key] = Record(key, rec.end_lsn, _IMAGE, rec.main_data)
        ing.counters = ing.counters.after_checkpoint(
            wr.parse_checkpoint(rec.main_data), shutdown=info == pgc.XLOG_CHECKPOINT_SHUTDOWN)
    elif info == pgc.XLOG_NEXTOID:
        ing.counters = ing.counters.with_next_oid(wr.parse_nextoid(rec.main_data))
    elif info == pgc.XLOG_END_OF_RECOVERY:  # a promotion: the WAL goes on on a new timeline
        ing.counters = ing.counters.on_timeline(wr.parse_end_of_recovery(rec.main_data))
    elif info == pgc.XLOG_PARAMETER_CHANGE:
        change = wr.parse_parameter_change(rec.main_data)
        ing.counters = ing.counters.track_commit_ts(change.track_commit_timestamp)


def _gist(ing: WalIngest, rec: DecodedRecord, out: dict[bytes, Record]) -> None:
    """gistRedoClearFollowRight: the child whose downlink this record inserts (block 1 of
    PAGE_UPDATE, block 0 of PAGE_SPLIT) gets NSN = the record's end LSN and loses
    F_FOLLOW_RIGHT. The primary does that after XLogInsert, so the image lacks it."""
    block_id = {pgc.XLOG_GIST_PAGE_UPDATE: 1, pgc.XLOG_GIST_PAGE_SPLIT: 0}.get(rec.rmgr_info)
    blk = rec.block(block_id) if block_id is not None else None
    if blk is None:
        return
    key = rel_block_key(blk.rel_tag, blk.blkno)
    prev = out.get(key)
    if prev is None or prev.kind is not _IMAGE or prev.payload[14:16] == b"\0\0":
        return
    page = bytearray(prev.payload)
    (special,) = struct.unpack_from("<H", page, 16)
    if special + 16 > BLCKSZ:
        return
    lsn = rec.end_lsn
    struct.pack_into("<II", page, special, lsn >> 32, lsn & 0xFFFFFFFF)  # NSN
    (flags,) = struct.unpack_from("<H", page, special + 12)
    struct.pack_into("<H", page, special + 12, flags & ~pgc.F_FOLLOW_RIGHT)
    out[key] = Record(key, lsn, _IMAGE, bytes(page))


_HANDLERS: Final[dict[int, Callable[[WalIngest, DecodedRecord, dict[bytes, Record]], None]]] = {
    pgc.RmgrId.XLOG: _xlog,
    pgc.RmgrId.XACT: _xact,
    pgc.RmgrId.SMGR: _smgr,
    pgc.RmgrId.CLOG: _clog_rm,
    pgc.RmgrId.DBASE: _dbase,
    pgc.RmgrId.MULTIXACT: _multixact,
    pgc.RmgrId.RELMAP: _relmap,
    pgc.RmgrId.HEAP: _heap,
    pgc.RmgrId.HEAP2: _heap2,
    pgc.RmgrId.GIST: _gist,
    pgc.RmgrId.COMMIT_TS: _commit_ts_rm,
    pgc.RmgrId.REPLORIGIN: _replorigin,
}
