"""What PostgreSQL's redo keeps besides pages: the ID counters and replication origins.

A standby replaying WAL advances its next XID, OID and multixact counters, the oldest XID
and multixact still needed, the commit-timestamp horizon and each replication origin's
progress, record by record. An export at an arbitrary LSN must start with exactly those
values (DESIGN §7): a counter behind hands out an ID already in use; one rounded forward
wastes IDs and, for multixacts, leaves offset entries PostgreSQL reads as corrupt.
:class:`Counters` is that state, with one method per redo action that changes it (the
names say which PostgreSQL function each follows); ingest stores it under the control key
``COUNTERS`` whenever a record changes it, so a read at any LSN is one lookup.
:class:`Origins` is the replication origin progress, stored under ``ORIGINS`` and written
out as ``pg_logical/replorigin_checkpoint``.

The comparisons are PostgreSQL's modulo-2^32 ones (``TransactionIdPrecedes``,
``MultiXactIdPrecedes``, ``MultiXactOffsetPrecedes``), so the counters stay right across
XID and multixact wraparound; the next XID is a 64-bit FullTransactionId whose epoch
advances when the 32-bit value wraps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Final

import google_crc32c

from zenith.errors import InvalidState
from zenith.postgres.keys import SlruId
from zenith.postgres.walrecord import CheckPoint

__all__ = ["Counters", "Origins", "multi_precedes", "rounded_counters", "xid_precedes"]

FIRST_NORMAL_XID: Final = 3
_U32: Final = 0xFFFFFFFF
_COUNTERS: Final = struct.Struct("<QIIIIIIIII?I")
_ORIGIN: Final = struct.Struct("<HQ")
#: origin.c: REPLICATION_STATE_MAGIC, and ReplicationStateOnDisk {u16 roident; 6 bytes of
#: padding; u64 remote_lsn}.
REPLORIGIN_MAGIC: Final = 0x1257DADE
_ORIGIN_ON_DISK: Final = struct.Struct("<H6xQ")
REPLORIGIN_CHECKPOINT_PATH: Final = "pg_logical/replorigin_checkpoint"


def _signed_diff(a: int, b: int) -> int:
    d = (a - b) & _U32
    return d - (1 << 32) if d >= 1 << 31 else d


def xid_precedes(a: int, b: int) -> bool:
    """TransactionIdPrecedes: modulo-2^32 order between normal XIDs."""
    if a < FIRST_NORMAL_XID or b < FIRST_NORMAL_XID:
        return a < b
    return _signed_diff(a, b) < 0


def multi_precedes(a: int, b: int) -> bool:
    """MultiXactIdPrecedes (and MultiXactOffsetPrecedes: the same arithmetic)."""
    return _signed_diff(a, b) < 0


@dataclass(frozen=True, slots=True)
class Counters:
    """The counters a standby's redo keeps (transam/varsup.c, multixact.c, commit_ts.c)."""

    next_xid: int  # FullTransactionId: epoch << 32 | xid
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    #: track_commit_timestamp as the WAL last set it (pg_control, PARAMETER_CHANGE): redo
    #: records commit timestamps only while it is on.
    commit_ts_active: bool
    #: The timeline the WAL is on (checkpoints, END_OF_RECOVERY): an export goes one past.
    timeline: int

    @classmethod
    def from_checkpoint(cls, cp: CheckPoint, commit_ts_active: bool) -> Counters:
        """The state recovery starts from: the checkpoint's values (StartupXLOG)."""
        return cls(cp.next_xid, cp.next_oid, cp.next_multi, cp.next_multi_offset,
                   cp.oldest_xid, cp.oldest_xid_db, cp.oldest_multi, cp.oldest_multi_db,
                   cp.oldest_commit_ts_xid, cp.newest_commit_ts_xid, commit_ts_active,
                   cp.this_timeline_id)

    def pack(self) -> bytes:
        return _COUNTERS.pack(
            self.next_xid, self.next_oid, self.next_multi, self.next_multi_offset,
            self.oldest_xid, self.oldest_xid_db, self.oldest_multi, self.oldest_multi_db,
            self.oldest_commit_ts_xid, self.newest_commit_ts_xid, self.commit_ts_active,
            self.timeline)

    @classmethod
    def unpack(cls, data: bytes) -> Counters:
        if len(data) != _COUNTERS.size:
            raise InvalidState(f"stored counters are {len(data)} bytes, not {_COUNTERS.size}")
        return cls(*_COUNTERS.unpack(data))

    def into_checkpoint(self, cp: CheckPoint) -> CheckPoint:
        """``cp`` with these counters in place of its own."""
        return replace(
            cp, next_xid=self.next_xid, next_oid=self.next_oid, next_multi=self.next_multi,
            next_multi_offset=self.next_multi_offset, oldest_xid=self.oldest_xid,
            oldest_xid_db=self.oldest_xid_db, oldest_multi=self.oldest_multi,
            oldest_multi_db=self.oldest_multi_db, this_timeline_id=self.timeline,
            oldest_commit_ts_xid=self.oldest_commit_ts_xid if self.commit_ts_active else 0,
            newest_commit_ts_xid=self.newest_commit_ts_xid if self.commit_ts_active else 0)

    # -- redo actions ------------------------------------------------------------------

    def past_xid(self, xid: int) -> Counters:
        """AdvanceNextFullTransactionIdPastXid: next XID beyond ``xid`` (epoch inferred)."""
        next32 = self.next_xid & _U32
        if xid < FIRST_NORMAL_XID or not (next32 < FIRST_NORMAL_XID or
                                          _signed_diff(xid, next32) >= 0):
            return self
        epoch = self.next_xid >> 32
        after = (xid + 1) & _U32
        if after < FIRST_NORMAL_XID:  # TransactionIdAdvance skips the special XIDs
            after = FIRST_NORMAL_XID
        if after < next32:
            epoch += 1
        return replace(self, next_xid=epoch << 32 | after)

    def past_multi(self, next_multi: int, next_offset: int) -> Counters:
        """MultiXactAdvanceNextMXact: next multixact and member offset at least these."""
        multi, offset = self.next_multi, self.next_multi_offset
        if multi_precedes(multi, next_multi & _U32):
            multi = next_multi & _U32
        if multi_precedes(offset, next_offset & _U32):
            offset = next_offset & _U32
        if (multi, offset) == (self.next_multi, self.next_multi_offset):
            return self
        return replace(self, next_multi=multi, next_multi_offset=offset)

    def with_next_oid(self, oid: int) -> Counters:
        """XLOG_NEXTOID: the OID counter is set (not maxed: OIDs wrap)."""
        return self if oid == self.next_oid else replace(self, next_oid=oid)

    def after_checkpoint(self, cp: CheckPoint, *, shutdown: bool) -> Counters:
        """xlog_redo for a checkpoint record: a shutdown checkpoint sets the counters, an
        online one only advances them (and leaves the OID counter alone)."""
        if shutdown:
            new = replace(self, next_xid=cp.next_xid, next_oid=cp.next_oid,
                          next_multi=cp.next_multi, next_multi_offset=cp.next_multi_offset,
                          oldest_xid=cp.oldest_xid, oldest_xid_db=cp.oldest_xid_db)
        else:
            new = self
            if new.next_xid < cp.next_xid:  # FullTransactionIdPrecedes: plain 64-bit order
                new = replace(new, next_xid=cp.next_xid)
            new = new.past_multi(cp.next_multi, cp.next_multi_offset)
            if xid_precedes(new.oldest_xid, cp.oldest_xid):
                new = replace(new, oldest_xid=cp.oldest_xid, oldest_xid_db=cp.oldest_xid_db)
        if multi_precedes(new.oldest_multi, cp.oldest_multi):  # MultiXactAdvanceOldest
            new = replace(new, oldest_multi=cp.oldest_multi, oldest_multi_db=cp.oldest_multi_db)
        return new.on_timeline(cp.this_timeline_id)

    def on_timeline(self, timeline: int) -> Counters:
        """A checkpoint or END_OF_RECOVERY record names the timeline the WAL is on."""
        return self if timeline == self.timeline else replace(self, timeline=timeline)

    def clog_truncated(self, oldest_xid: int, oldest_xid_db: int) -> Counters:
        """CLOG_TRUNCATE. A standby's redo only moves its oldest CLOG XID here and takes
        the oldest XID from the next checkpoint; the primary set its oldest XID to this
        same value right after truncating (vac_truncate_clog's SetTransactionIdLimit), so
        an export takes it now: its checkpoint never names an XID whose status is gone."""
        if xid_precedes(self.oldest_xid, oldest_xid):
            return replace(self, oldest_xid=oldest_xid, oldest_xid_db=oldest_xid_db)
        return self

    def multi_truncated(self, oldest_multi: int, oldest_multi_db: int) -> Counters:
        """MULTIXACT_TRUNCATE_ID: SetMultiXactIdLimit(endTruncOff, oldestMultiDB)."""
        if (oldest_multi, oldest_multi_db) == (self.oldest_multi, self.oldest_multi_db):
            return self
        return replace(self, oldest_multi=oldest_multi, oldest_multi_db=oldest_multi_db)

    def commit_ts_truncated(self, oldest_xid: int) -> Counters:
        """COMMIT_TS_TRUNCATE: AdvanceOldestCommitTsXid."""
        if self.oldest_commit_ts_xid and xid_precedes(self.oldest_commit_ts_xid, oldest_xid):
            return replace(self, oldest_commit_ts_xid=oldest_xid)
        return self

    def committed_ts(self, newest_xid: int) -> Counters:
        """TransactionTreeSetCommitTsData: the newest XID with a timestamp."""
        if self.commit_ts_active and xid_precedes(self.newest_commit_ts_xid, newest_xid):
            return replace(self, newest_commit_ts_xid=newest_xid)
        return self

    def track_commit_ts(self, on: bool) -> Counters:
        """XLOG_PARAMETER_CHANGE of track_commit_timestamp (CommitTsParameterChange):
        switching it off forgets the horizon (and PostgreSQL deletes the files)."""
        if on == self.commit_ts_active:
            return self
        if on:  # ActivateCommitTs: the horizon starts at the next XID
            xid = self.next_xid & _U32
            return replace(self, commit_ts_active=True,
                           oldest_commit_ts_xid=self.oldest_commit_ts_xid or xid,
                           newest_commit_ts_xid=self.newest_commit_ts_xid or xid)
        return replace(self, commit_ts_active=False, oldest_commit_ts_xid=0,
                       newest_commit_ts_xid=0)


@dataclass(frozen=True, slots=True)
class Origins:
    """Replication origin progress: origin id -> remote LSN (origin.c)."""

    progress: tuple[tuple[int, int], ...] = ()

    def pack(self) -> bytes:
        return b"".join(_ORIGIN.pack(o, lsn) for o, lsn in self.progress)

    @classmethod
    def unpack(cls, data: bytes) -> Origins:
        if len(data) % _ORIGIN.size:
            raise InvalidState("stored replication origins are truncated")
        return cls(tuple(_ORIGIN.iter_unpack(data)))

    def advance(self, origin: int, remote_lsn: int, *, backward: bool) -> Origins:
        """replorigin_advance: move an origin's remote LSN forward (or anywhere when
        ``backward``, as ``pg_replication_origin_advance`` may)."""
        if origin in (0, 0xFFFF):  # InvalidRepOriginId; DoNotReplicateId is not tracked
            return self
        current = dict(self.progress)
        old = current.get(origin)
        if old is not None and not backward and old >= remote_lsn:
            return self
        current[origin] = remote_lsn
        return Origins(tuple(sorted(current.items())))

    def drop(self, origin: int) -> Origins:
        return Origins(tuple(p for p in self.progress if p[0] != origin))

    def checkpoint_file(self) -> bytes:
        """``pg_logical/replorigin_checkpoint`` as CheckPointReplicationOrigin writes it."""
        body = struct.pack("<I", REPLORIGIN_MAGIC) + b"".join(
            _ORIGIN_ON_DISK.pack(o, lsn) for o, lsn in self.progress)
        return body + struct.pack("<I", google_crc32c.value(body))

    @classmethod
    def from_checkpoint_file(cls, data: bytes) -> Origins:
        """Read a ``replorigin_checkpoint`` file (StartupReplicationOrigin's checks)."""
        if len(data) < 8 or (len(data) - 8) % _ORIGIN_ON_DISK.size:
            raise InvalidState(f"{REPLORIGIN_CHECKPOINT_PATH} has a bad size ({len(data)})")
        (magic,) = struct.unpack_from("<I", data)
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if magic != REPLORIGIN_MAGIC or crc != google_crc32c.value(data[:-4]):
            raise InvalidState(f"{REPLORIGIN_CHECKPOINT_PATH} fails its magic or CRC check")
        entries = _ORIGIN_ON_DISK.iter_unpack(data[4:-4])
        return cls(tuple(sorted((o, lsn) for o, lsn in entries)))


#: IDs per SLRU page: 4 XID statuses a byte; u32 offsets; 409 groups of 4 members.
_IDS_PER_PAGE: Final = {SlruId.XACT: 8192 * 4, SlruId.MULTIXACT_OFFSETS: 8192 // 4,
                        SlruId.MULTIXACT_MEMBERS: (8192 // 20) * 4}


def _past_pages(next_id: int, slru: SlruId, pages: set[int]) -> int:
    """``next_id`` moved to the end of the run of existing pages of ``slru`` from its own
    page on (PostgreSQL zeroes a page before handing out its first ID, so every ID in use
    lies below that bound); may exceed 2^32 when the run wraps."""
    per_page = _IDS_PER_PAGE[slru]
    n_pages = ((1 << 32) + per_page - 1) // per_page
    page = next_id // per_page
    if page not in pages:
        return next_id
    while (page + 1) % n_pages in pages and (page + 1) % n_pages != next_id // per_page:
        page += 1
    return max(next_id, (page + 1) * per_page)


def rounded_counters(cp: CheckPoint, pages: dict[SlruId, set[int]],
                     max_relnode: int = 0) -> CheckPoint:
    """For a timeline ingested before zenith kept the counters: ``cp``'s next XID,
    multixact and offset moved past every ID the stored SLRU ``pages`` can hold, its next
    OID past ``max_relnode``. Safe (no ID in use is handed out again), not exact."""
    epoch, xid = cp.next_xid >> 32, cp.next_xid & _U32
    new_xid = _past_pages(xid, SlruId.XACT, pages.get(SlruId.XACT, set()))
    if new_xid >= 1 << 32:
        epoch, new_xid = epoch + 1, max(new_xid - (1 << 32), FIRST_NORMAL_XID)
    multi = _past_pages(cp.next_multi, SlruId.MULTIXACT_OFFSETS,
                        pages.get(SlruId.MULTIXACT_OFFSETS, set()))
    offset = _past_pages(cp.next_multi_offset, SlruId.MULTIXACT_MEMBERS,
                         pages.get(SlruId.MULTIXACT_MEMBERS, set()))
    next_oid = cp.next_oid
    if cp.next_oid <= max_relnode < _U32:
        next_oid = max_relnode + 1
    return replace(cp, next_xid=epoch << 32 | new_xid, next_oid=next_oid,
                   next_multi=max(multi & _U32, 1), next_multi_offset=offset & _U32,
                   oldest_commit_ts_xid=0, newest_commit_ts_xid=0)
