"""Typed parsers for the main data of the WAL records that ingest acts on.

With ``wal_consistency_checking = all`` almost every page change arrives as a full-page
image on a block reference, which :mod:`zenith.postgres.waldecoder` already exposes. What
remains are the changes that ride in a record's *main data*: checkpoints (next XID/OID
and multixact counters for an export's control file), transaction commit/abort/prepare
(pg_xact, with subtransactions and the relations dropped at commit), relation create and
truncate, CREATE/DROP DATABASE, relmap file updates, multixact and CLOG SLRU records, and
the heap flags that say a visibility-map bit was cleared without registering the VM page.
Each parser takes the ``main_data`` bytes (and the record's ``info`` where the layout
depends on it) and returns a frozen dataclass; layouts are PostgreSQL 15's, checked
against its headers with ``offsetof``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from zenith.lsn import Lsn
from zenith.postgres.pg_constants import (
    SMGR_TRUNCATE_FSM,
    SMGR_TRUNCATE_HEAP,
    SMGR_TRUNCATE_VM,
    XACT_XINFO_HAS_DBINFO,
    XACT_XINFO_HAS_DROPPED_STATS,
    XACT_XINFO_HAS_GID,
    XACT_XINFO_HAS_INVALS,
    XACT_XINFO_HAS_ORIGIN,
    XACT_XINFO_HAS_RELFILENODES,
    XACT_XINFO_HAS_SUBXACTS,
    XACT_XINFO_HAS_TWOPHASE,
    XLH_DELETE_ALL_VISIBLE_CLEARED,
    XLH_INSERT_ALL_VISIBLE_CLEARED,
    XLH_LOCK_ALL_FROZEN_CLEARED,
    XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED,
    XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED,
    XLOG_XACT_HAS_INFO,
    maxalign,
)
from zenith.postgres.waldecoder import RelFileNode, WalDecodeError

_SIZEOF_RELFILENODE: Final = 12
_SIZEOF_STATS_ITEM: Final = 12  # xl_xact_stats_item: kind, dboid, objoid
_SIZEOF_INVAL_MSG: Final = 16  # SharedInvalidationMessage


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise WalDecodeError(f"{what} record is {len(data)} bytes, needs at least {size}")


class _Reader:
    """A cursor over main data that reports truncation as a WalDecodeError."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, fmt: str) -> tuple[int, ...]:
        try:
            values = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error as exc:
            raise WalDecodeError(f"{self.what} record is truncated at byte {self.pos}") from exc
        self.pos += struct.calcsize(fmt)
        return values

    def one(self, fmt: str) -> int:
        return self.take(fmt)[0]

    def array(self, count: int, fmt: str, what: str) -> tuple[int, ...]:
        if count < 0:
            raise WalDecodeError(f"{self.what} record has a negative {what} count {count}")
        return self.take(f"<{count}{fmt}")

    def rels(self, count: int) -> tuple[RelFileNode, ...]:
        flat = self.array(count * 3, "I", "relation")
        return tuple(RelFileNode(*flat[i : i + 3]) for i in range(0, len(flat), 3))

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise WalDecodeError(f"{self.what} record is truncated at byte {self.pos}")
        self.pos += n

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise WalDecodeError(f"{self.what} record has an unterminated string")
        text = self.data[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return text


# -- RM_XLOG_ID -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckPoint:
    """The body of XLOG_CHECKPOINT_SHUTDOWN / _ONLINE (catalog/pg_control.h)."""

    redo: Lsn
    this_timeline_id: int
    prev_timeline_id: int
    full_page_writes: bool
    next_xid: int  # FullTransactionId: epoch << 32 | xid
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int  # pg_time_t, seconds since the Unix epoch
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def next_xid_value(self) -> int:
        """The 32-bit next XID, as ``pg_resetwal -x`` takes it."""
        return self.next_xid & 0xFFFFFFFF


_CHECKPOINT: Final = struct.Struct("<QII?7xQIIIIIII4xqIII4x")
assert _CHECKPOINT.size == 88


def parse_checkpoint(data: bytes) -> CheckPoint:
    _need(data, _CHECKPOINT.size, "checkpoint")
    v = _CHECKPOINT.unpack_from(data)
    return CheckPoint(Lsn(v[0]), *v[1:])


def parse_end_of_recovery(data: bytes) -> int:
    """XLOG_END_OF_RECOVERY (xl_end_of_recovery: i64 time, u32 ThisTimeLineID, u32 Prev):
    the new timeline."""
    _need(data, 16, "END_OF_RECOVERY")
    return int(struct.unpack_from("<I", data, 8)[0])


def parse_nextoid(data: bytes) -> int:
    """XLOG_NEXTOID: the next OID to assign."""
    _need(data, 4, "NEXTOID")
    return int(struct.unpack_from("<I", data)[0])


@dataclass(frozen=True, slots=True)
class ParameterChange:
    """XLOG_PARAMETER_CHANGE (xl_parameter_change in access/xlog_internal.h)."""

    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    wal_level: int
    wal_log_hints: bool
    track_commit_timestamp: bool


def parse_parameter_change(data: bytes) -> ParameterChange:
    _need(data, 26, "PARAMETER_CHANGE")
    return ParameterChange(*struct.unpack_from("<6i??", data))


# -- RM_XACT_ID -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XactCommitOrAbort:
    """A parsed xl_xact_commit / xl_xact_abort (also COMMIT_PREPARED / ABORT_PREPARED).

    The transaction itself is the record's ``xid``, except for the *_PREPARED kinds,
    whose record xid is 0 and whose transaction is ``twophase_xid``."""

    xact_time: int  # TimestampTz: microseconds since 2000-01-01
    xinfo: int
    db_id: int
    ts_id: int
    subxacts: tuple[int, ...]
    dropped_rels: tuple[RelFileNode, ...]  # relation files to unlink (all forks)
    n_dropped_stats: int
    n_inval_msgs: int
    twophase_xid: int | None
    gid: str | None
    origin_lsn: Lsn | None
    origin_timestamp: int | None


def parse_xact_commit(info: int, data: bytes) -> XactCommitOrAbort:
    """XLOG_XACT_COMMIT / XLOG_XACT_COMMIT_PREPARED (xact.c ParseCommitRecord)."""
    return _parse_commit_or_abort(info, data, "commit", has_invals=True)


def parse_xact_abort(info: int, data: bytes) -> XactCommitOrAbort:
    """XLOG_XACT_ABORT / XLOG_XACT_ABORT_PREPARED (xact.c ParseAbortRecord)."""
    return _parse_commit_or_abort(info, data, "abort", has_invals=False)


def _parse_commit_or_abort(
    info: int, data: bytes, what: str, *, has_invals: bool
) -> XactCommitOrAbort:
    r = _Reader(data, f"transaction {what}")
    xact_time = r.one("<q")
    xinfo = r.one("<I") if info & XLOG_XACT_HAS_INFO else 0
    db_id = ts_id = 0
    if xinfo & XACT_XINFO_HAS_DBINFO:
        db_id, ts_id = r.take("<II")
    subxacts: tuple[int, ...] = ()
    if xinfo & XACT_XINFO_HAS_SUBXACTS:
        subxacts = r.array(r.one("<i"), "I", "subtransaction")
    rels: tuple[RelFileNode, ...] = ()
    if xinfo & XACT_XINFO_HAS_RELFILENODES:
        rels = r.rels(r.one("<i"))
    n_stats = 0
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
        n_stats = r.one("<i")
        r.skip(n_stats * _SIZEOF_STATS_ITEM)
    n_invals = 0
    if has_invals and xinfo & XACT_XINFO_HAS_INVALS:
        n_invals = r.one("<i")
        r.skip(n_invals * _SIZEOF_INVAL_MSG)
    twophase_xid: int | None = None
    gid: str | None = None
    if xinfo & XACT_XINFO_HAS_TWOPHASE:
        twophase_xid = r.one("<I")
        if xinfo & XACT_XINFO_HAS_GID:
            gid = r.cstring()
    origin_lsn: Lsn | None = None
    origin_ts: int | None = None
    if xinfo & XACT_XINFO_HAS_ORIGIN:
        # Stored unaligned after the variable-length GID.
        lsn, origin_ts = r.take("<Qq")
        origin_lsn = Lsn(lsn)
    return XactCommitOrAbort(
        xact_time, xinfo, db_id, ts_id, subxacts, rels, n_stats, n_invals,
        twophase_xid, gid, origin_lsn, origin_ts,
    )


@dataclass(frozen=True, slots=True)
class XactPrepare:
    """XLOG_XACT_PREPARE: the two-phase state file's contents (xl_xact_prepare header,
    then MAXALIGNed GID, subxacts, relations to drop on commit and on abort, ...)."""

    xid: int
    database: int
    prepared_at: int
    owner: int
    gid: str
    subxacts: tuple[int, ...]
    commit_rels: tuple[RelFileNode, ...]
    abort_rels: tuple[RelFileNode, ...]
    origin_lsn: int = 0  # the replication origin's LSN of a prepared remote transaction


_PREPARE: Final = struct.Struct("<IIIIqIiiiiii?xHQq")
assert _PREPARE.size == 72


def parse_xact_prepare(data: bytes) -> XactPrepare:
    _need(data, _PREPARE.size, "transaction prepare")
    (_magic, _total_len, xid, database, prepared_at, owner, nsubxacts, ncommitrels,
     nabortrels, _ncommitstats, _nabortstats, _ninvals, _initfileinval, gidlen,
     origin_lsn, _origin_ts) = _PREPARE.unpack_from(data)
    r = _Reader(data, "transaction prepare")
    r.skip(maxalign(_PREPARE.size))
    gid_bytes = data[r.pos : r.pos + gidlen]
    r.skip(maxalign(gidlen))
    subxacts = r.array(nsubxacts, "I", "subtransaction")
    r.pos = maxalign(r.pos)
    commit_rels = r.rels(ncommitrels)
    r.pos = maxalign(r.pos)
    abort_rels = r.rels(nabortrels)
    gid = gid_bytes.split(b"\0", 1)[0].decode("utf-8", "replace")
    return XactPrepare(xid, database, prepared_at, owner, gid, subxacts, commit_rels,
                       abort_rels, origin_lsn)


@dataclass(frozen=True, slots=True)
class XactAssignment:
    """XLOG_XACT_ASSIGNMENT: subtransaction XIDs assigned to a top-level transaction."""

    xtop: int
    subxacts: tuple[int, ...]


def parse_xact_assignment(data: bytes) -> XactAssignment:
    r = _Reader(data, "transaction assignment")
    xtop, nsub = r.take("<Ii")
    return XactAssignment(xtop, r.array(nsub, "I", "subtransaction"))


# -- RM_SMGR_ID -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmgrCreate:
    rnode: RelFileNode
    forknum: int


def parse_smgr_create(data: bytes) -> SmgrCreate:
    _need(data, 16, "SMGR_CREATE")
    spc, db, rel, fork = struct.unpack_from("<IIIi", data)
    return SmgrCreate(RelFileNode(spc, db, rel), fork)


@dataclass(frozen=True, slots=True)
class SmgrTruncate:
    """XLOG_SMGR_TRUNCATE: the relation is cut to ``blkno`` blocks in the forks named by
    ``flags``. For the VM and FSM forks ``blkno`` is the *heap* size: the fork is cut to
    the map pages covering it, and the last map page's bits beyond it are cleared."""

    blkno: int
    rnode: RelFileNode
    flags: int

    @property
    def truncates_heap(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_HEAP)

    @property
    def truncates_vm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_VM)

    @property
    def truncates_fsm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_FSM)


def parse_smgr_truncate(data: bytes) -> SmgrTruncate:
    _need(data, 20, "SMGR_TRUNCATE")
    blkno, spc, db, rel, flags = struct.unpack_from("<IIIIi", data)
    return SmgrTruncate(blkno, RelFileNode(spc, db, rel), flags)


# -- RM_DBASE_ID ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DbaseCreateFileCopy:
    """CREATE DATABASE ... STRATEGY FILE_COPY: the new database's directory is a copy of
    the source's as of this record; nothing else about its contents is logged."""

    db_id: int
    tablespace_id: int
    src_db_id: int
    src_tablespace_id: int


def parse_dbase_create_file_copy(data: bytes) -> DbaseCreateFileCopy:
    _need(data, 16, "DBASE_CREATE_FILE_COPY")
    return DbaseCreateFileCopy(*struct.unpack_from("<IIII", data))


@dataclass(frozen=True, slots=True)
class DbaseCreateWalLog:
    """CREATE DATABASE ... STRATEGY WAL_LOG: creates the directory (and PG_VERSION); the
    relation blocks follow as their own FPI records."""

    db_id: int
    tablespace_id: int


def parse_dbase_create_wal_log(data: bytes) -> DbaseCreateWalLog:
    _need(data, 8, "DBASE_CREATE_WAL_LOG")
    return DbaseCreateWalLog(*struct.unpack_from("<II", data))


@dataclass(frozen=True, slots=True)
class DbaseDrop:
    db_id: int
    tablespace_ids: tuple[int, ...]


def parse_dbase_drop(data: bytes) -> DbaseDrop:
    r = _Reader(data, "DBASE_DROP")
    db_id, n = r.take("<Ii")
    return DbaseDrop(db_id, r.array(n, "I", "tablespace"))


# -- RM_RELMAP_ID ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelmapUpdate:
    """The new pg_filenode.map of database ``dbid`` (0: the shared map in global/)."""

    dbid: int
    tsid: int
    data: bytes  # the whole file (RelMapFile, 512 bytes)


def parse_relmap_update(data: bytes) -> RelmapUpdate:
    _need(data, 12, "RELMAP_UPDATE")
    dbid, tsid, nbytes = struct.unpack_from("<IIi", data)
    if nbytes < 0 or 12 + nbytes > len(data):
        raise WalDecodeError(f"RELMAP_UPDATE says {nbytes} bytes, has {len(data) - 12}")
    return RelmapUpdate(dbid, tsid, data[12 : 12 + nbytes])


# -- RM_MULTIXACT_ID and RM_CLOG_ID ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class MultiXactMember:
    xid: int
    status: int  # MultiXactStatus


@dataclass(frozen=True, slots=True)
class MultiXactCreate:
    """XLOG_MULTIXACT_CREATE_ID: multixact ``mid`` has ``members`` stored from member
    offset ``moff`` on."""

    mid: int
    moff: int
    members: tuple[MultiXactMember, ...]


def parse_multixact_create(data: bytes) -> MultiXactCreate:
    r = _Reader(data, "MULTIXACT_CREATE_ID")
    mid, moff, n = r.take("<IIi")
    flat = r.array(n * 2, "I", "member")
    members = tuple(MultiXactMember(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    return MultiXactCreate(mid, moff, members)


@dataclass(frozen=True, slots=True)
class MultiXactTruncate:
    oldest_multi_db: int
    start_trunc_off: int
    end_trunc_off: int
    start_trunc_memb: int
    end_trunc_memb: int


def parse_multixact_truncate(data: bytes) -> MultiXactTruncate:
    _need(data, 20, "MULTIXACT_TRUNCATE_ID")
    return MultiXactTruncate(*struct.unpack_from("<IIIII", data))


def parse_zero_page(data: bytes) -> int:
    """CLOG_ZEROPAGE, XLOG_MULTIXACT_ZERO_OFF_PAGE / _ZERO_MEM_PAGE: the SLRU page number
    to initialise with zeros (an ``int`` in PostgreSQL 15)."""
    _need(data, 4, "zero-page")
    return int(struct.unpack_from("<i", data)[0])


@dataclass(frozen=True, slots=True)
class ClogTruncate:
    pageno: int
    oldest_xact: int
    oldest_xact_db: int


def parse_clog_truncate(data: bytes) -> ClogTruncate:
    _need(data, 12, "CLOG_TRUNCATE")
    return ClogTruncate(*struct.unpack_from("<iII", data))


# -- RM_HEAP_ID and RM_HEAP2_ID -------------------------------------------------------
# Only what ingest needs: each of these may clear visibility-map bits of the heap
# block(s) it changes, through the *_CLEARED flags, without registering the VM page.


@dataclass(frozen=True, slots=True)
class HeapInsert:
    offnum: int
    flags: int

    @property
    def all_visible_cleared(self) -> bool:
        return bool(self.flags & XLH_INSERT_ALL_VISIBLE_CLEARED)


def parse_heap_insert(data: bytes) -> HeapInsert:
    _need(data, 3, "heap INSERT")
    return HeapInsert(*struct.unpack_from("<HB", data))


@dataclass(frozen=True, slots=True)
class HeapDelete:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int

    @property
    def all_visible_cleared(self) -> bool:
        return bool(self.flags & XLH_DELETE_ALL_VISIBLE_CLEARED)


def parse_heap_delete(data: bytes) -> HeapDelete:
    _need(data, 8, "heap DELETE")
    return HeapDelete(*struct.unpack_from("<IHBB", data))


@dataclass(frozen=True, slots=True)
class HeapUpdate:
    """UPDATE and HOT_UPDATE. The new tuple is on block 0; the old one on block 1 when
    it is another page, else on block 0 too."""

    old_xmax: int
    old_offnum: int
    old_infobits_set: int
    flags: int
    new_xmax: int
    new_offnum: int

    @property
    def old_all_visible_cleared(self) -> bool:
        return bool(self.flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED)

    @property
    def new_all_visible_cleared(self) -> bool:
        return bool(self.flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED)


def parse_heap_update(data: bytes) -> HeapUpdate:
    _need(data, 14, "heap UPDATE")
    return HeapUpdate(*struct.unpack_from("<IHBBIH", data))


@dataclass(frozen=True, slots=True)
class HeapLock:
    """Heap LOCK (xl_heap_lock) and Heap2 LOCK_UPDATED (xl_heap_lock_updated), which
    share their layout; ``xmax`` may be a MultiXactId."""

    xmax: int
    offnum: int
    infobits_set: int
    flags: int

    @property
    def all_frozen_cleared(self) -> bool:
        return bool(self.flags & XLH_LOCK_ALL_FROZEN_CLEARED)


def parse_heap_lock(data: bytes) -> HeapLock:
    _need(data, 8, "heap LOCK")
    return HeapLock(*struct.unpack_from("<IHBB", data))


def parse_heap_lock_updated(data: bytes) -> HeapLock:
    _need(data, 8, "heap2 LOCK_UPDATED")
    return HeapLock(*struct.unpack_from("<IHBB", data))


@dataclass(frozen=True, slots=True)
class HeapMultiInsert:
    flags: int
    ntuples: int
    offsets: tuple[int, ...]  # empty when the record re-initialises the page (+INIT)

    @property
    def all_visible_cleared(self) -> bool:
        return bool(self.flags & XLH_INSERT_ALL_VISIBLE_CLEARED)


def parse_heap_multi_insert(data: bytes) -> HeapMultiInsert:
    _need(data, 4, "heap2 MULTI_INSERT")
    flags, ntuples = struct.unpack_from("<BxH", data)
    offsets: tuple[int, ...] = ()
    # The offsets are left out when the page is initialised by the record.
    if len(data) >= 4 + 2 * ntuples:
        offsets = struct.unpack_from(f"<{ntuples}H", data, 4)
    return HeapMultiInsert(flags, ntuples, offsets)


# -- RM_COMMIT_TS_ID and RM_REPLORIGIN_ID ---------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitTsTruncate:
    pageno: int
    oldest_xid: int


def parse_commit_ts_truncate(data: bytes) -> CommitTsTruncate:
    """COMMIT_TS_TRUNCATE (xl_commit_ts_truncate)."""
    _need(data, 8, "COMMIT_TS_TRUNCATE")
    return CommitTsTruncate(*struct.unpack_from("<iI", data))


@dataclass(frozen=True, slots=True)
class ReplOriginSet:
    remote_lsn: int
    node_id: int
    force: bool


def parse_replorigin_set(data: bytes) -> ReplOriginSet:
    """XLOG_REPLORIGIN_SET (xl_replorigin_set: u64 remote_lsn, u16 node_id, bool force)."""
    _need(data, 11, "REPLORIGIN_SET")
    return ReplOriginSet(*struct.unpack_from("<QH?", data))


def parse_replorigin_drop(data: bytes) -> int:
    """XLOG_REPLORIGIN_DROP: the origin id."""
    _need(data, 2, "REPLORIGIN_DROP")
    return int(struct.unpack_from("<H", data)[0])
