"""The storage interface: value types and the calls every repository engine answers.

The rest of zenith talks to storage only through :class:`Repository`, so another engine
(LMDB, layer files) can replace the SQLite one by passing the same shared tests.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

from zenith.errors import InvalidArgument
from zenith.ids import TimelineId
from zenith.lsn import Lsn

if TYPE_CHECKING:
    from zenith.storage.compaction import CompactResult
    from zenith.storage.gc import GcResult

KEY_SIZE: Final = 18
MAX_PAYLOAD: Final = 64 * 1024 * 1024
#: Largest LSN storage accepts: SQLite integers are signed 64-bit.
MAX_STORED_LSN: Final = Lsn((1 << 63) - 1)

_BRANCH_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")


class RecordKind(IntEnum):
    IMAGE = 0  # the whole value at that LSN
    DELTA = 1  # a change on top of the previous value, applied by the redo registry
    TOMBSTONE = 2  # the key has no value from that LSN on
    #: The whole value at that LSN, zstd-compressed (a frame with its content size): an
    #: image to every reader, GC and transfer, stored in less space (``redo.unpack``).
    ZIMAGE = 3


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    lsn: Lsn
    kind: RecordKind
    payload: bytes = b""

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` unless this record can be stored."""
        if not isinstance(self.key, bytes) or len(self.key) != KEY_SIZE:
            raise InvalidArgument(f"a key is {KEY_SIZE} bytes, got {self.key!r:.60}")
        if not isinstance(self.lsn, int) or not 0 < self.lsn <= MAX_STORED_LSN:
            raise InvalidArgument(f"record LSN {self.lsn!r} is out of range")
        if not isinstance(self.kind, RecordKind):
            raise InvalidArgument(f"unknown record kind {self.kind!r}")
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_PAYLOAD:
            raise InvalidArgument("a payload is bytes of at most 64 MiB")
        if self.kind is RecordKind.TOMBSTONE and self.payload:
            raise InvalidArgument("a tombstone carries no payload")
        if self.kind is RecordKind.DELTA and not self.payload:
            raise InvalidArgument("a delta needs a payload naming its redo type")
        if self.kind is RecordKind.ZIMAGE and not self.payload:
            raise InvalidArgument("a compressed image needs a payload")


class _RecordSlots:
    """:class:`Record`'s memory layout without its frozen ``__setattr__``.

    Why: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    which costs more than reading an 8 KiB payload from the page cache. An engine streaming
    records it validated when they were written builds this twin (plain slot stores) and
    re-labels it ``rec.__class__ = Record``: the object is then an ordinary, immutable
    Record. CPython allows the re-labelling only while both classes have the same slots, so
    a field added to Record and not here fails loudly (tests/storage checks it too).
    """

    __slots__ = ("key", "kind", "lsn", "payload")

    def __init__(self, key: bytes, lsn: Lsn, kind: RecordKind, payload: bytes) -> None:
        self.key = key
        self.lsn = lsn
        self.kind = kind
        self.payload = payload


_KIND_OF: Final = tuple(sorted(RecordKind, key=int))
_new_int = int.__new__


def checked_record(key: bytes, lsn: int, kind: int, payload: bytes) -> Record:
    """A :class:`Record` from fields its caller already checked (a stored record, a
    decoded frame whose layout fixed the key's size and kind's range): the LSN is made
    without ``Lsn``'s checks and the record without the frozen ``__init__`` (a third of
    the cost; the hot paths of transfers build one per record)."""
    rec: Any = _RecordSlots(key, _new_int(Lsn, lsn), _KIND_OF[kind], payload)
    rec.__class__ = Record
    return rec  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a timeline's durable but unpublished records end: the first ``count`` records
    of LSN ``lsn`` (in the order they were written, which every copy of a timeline keeps)
    are stored, later ones of that LSN are not yet. ``key`` is the key of the last one."""

    lsn: Lsn
    count: int
    key: bytes


@dataclass(frozen=True, slots=True)
class TimelineInfo:
    timeline_id: TimelineId
    ancestor_id: TimelineId | None
    ancestor_lsn: Lsn | None
    last_record_lsn: Lsn
    #: Reads below this LSN are refused (an imported base backup is consistent only from
    #: its end LSN; a child timeline starts at its branch point).
    min_readable_lsn: Lsn
    #: Created by a transfer from another pageserver: this one is not its writer, so new
    #: history goes on a child timeline (:meth:`Repository.branch_for_writing`).
    received: bool = False
    #: Records of one LSN beyond ``last_record_lsn`` already stored by an interrupted
    #: transfer (a frame may end inside one LSN); ``None`` when there are none.
    pending: Cursor | None = None
    #: Records of its own at or below this LSN may be missing here: GC removed some (or
    #: the timeline is shallow). Its history is whole after :attr:`history_start`.
    collected_lsn: Lsn = Lsn(0)  # noqa: RUF009 (an int: immutable)
    #: Set on a *shallow* timeline (received from an LSN on, ``push --since``): its state
    #: at this LSN is held as images, its records after it; not its ancestors, nor its
    #: history before. Reads and transfers below it are refused.
    base_lsn: Lsn | None = None
    #: False while a shallow timeline's base images are still arriving (unreadable).
    base_complete: bool = True
    #: Who sent a shallow timeline's base (``user NAME`` for a push, ``origin HOST:PORT``
    #: for a pull); None when unknown. Its base is outside the history hash, so only
    #: that sender's transfers extend the timeline (docs/push-pull.md, "Trust").
    base_from: str | None = None

    @property
    def start_lsn(self) -> Lsn:
        return self.ancestor_lsn if self.ancestor_lsn is not None else Lsn(0)

    @property
    def history_start(self) -> Lsn:
        """Every record of the timeline's own with a greater LSN is held here."""
        return max(self.start_lsn, self.collected_lsn, self.base_lsn or Lsn(0))


@dataclass(frozen=True, slots=True)
class BranchInfo:
    name: str
    timeline: TimelineInfo


@dataclass(frozen=True, slots=True)
class WriteResult:
    records: int
    last_record_lsn: Lsn
    #: The timeline's pending cursor after the batch (see :class:`TimelineInfo`).
    pending: Cursor | None = None


def validate_branch_name(name: str) -> str:
    """Branch names follow git's rules loosely: no spaces, ``@``, ``:``, ``..`` or leading -."""
    if (
        not isinstance(name, str)
        or _BRANCH_NAME.fullmatch(name) is None
        or ".." in name
        or name.endswith(("/", ".", ".lock"))
        or "//" in name
        or TimelineId.looks_like(name)
    ):
        raise InvalidArgument(
            f"invalid branch name {name!r}",
            hint="use letters, digits, '_', '-', '.', '/' (no '..', no 32-hex-digit names)",
        )
    return name


class Repository(Protocol):
    """What the pageserver needs from storage. All calls are thread-safe."""

    # timelines -----------------------------------------------------------------------------
    def create_timeline(
        self,
        timeline_id: TimelineId | None = None,
        ancestor: tuple[TimelineId, Lsn] | None = None,
        *,
        min_readable_lsn: Lsn | None = None,
        received: bool = False,
    ) -> TimelineInfo: ...

    def get_timeline(self, timeline_id: TimelineId) -> TimelineInfo: ...

    def create_shallow_timeline(
        self, timeline_id: TimelineId, ancestor: tuple[TimelineId, Lsn] | None, base_lsn: Lsn,
        *, source: str | None = None,
    ) -> TimelineInfo:
        """A received timeline held from ``base_lsn`` on (its ``ancestor``, which need not
        be held here, is kept as its identity). Unreadable until :meth:`finish_base`;
        :meth:`put_base` stores its state at ``base_lsn`` first. ``source``: who sent the
        base (a user, an origin), kept in :attr:`TimelineInfo.base_from`."""
        ...

    def put_base(self, timeline_id: TimelineId, records: Iterable[Record]) -> int:
        """Store a shallow timeline's base: what a read at its ``base_lsn`` needs, as
        :meth:`base_records` gives it (images and deltas at or below that LSN, no
        tombstones); outside the history hash. Returns the count."""
        ...

    def base_records(self, timeline_id: TimelineId, lsn: Lsn) -> Iterator[Record]:
        """The records a read at ``lsn`` needs, key by key in key order (each key's newest
        image at or below it and the deltas after that, across the ancestry; nothing for a
        key without a value there): a shallow copy's base, as stored."""
        ...

    def finish_base(self, timeline_id: TimelineId, history_hash: bytes) -> TimelineInfo:
        """The shallow timeline's base is complete: readable at ``base_lsn``, whose
        history hash (the sender's, over the history not held here) it takes."""
        ...

    def list_timelines(self) -> list[TimelineInfo]: ...

    def set_min_readable_lsn(self, timeline_id: TimelineId, lsn: Lsn) -> None: ...

    # branches ------------------------------------------------------------------------------
    def create_branch(
        self, name: str, source: str | TimelineId | None = None, lsn: Lsn | None = None
    ) -> BranchInfo: ...

    def set_branch(self, name: str, timeline_id: TimelineId) -> BranchInfo: ...

    def move_branch(
        self, name: str, timeline_id: TimelineId, expected: TimelineId | None
    ) -> BranchInfo:
        """Point ``name`` at ``timeline_id`` only if it still points at ``expected`` (None:
        only if it does not exist), in one transaction; otherwise :class:`ObjectInUse`."""
        ...

    def get_branch(self, name: str) -> BranchInfo: ...

    def list_branches(self) -> list[BranchInfo]: ...

    def delete_branch(self, name: str) -> None: ...

    def delete_timeline(self, timeline_id: TimelineId) -> None:
        """Drop a timeline with no branch names and no descendants, with its records."""
        ...

    def resolve(self, name_or_id: str) -> TimelineInfo: ...

    def ancestry(self, timeline_id: TimelineId) -> list[TimelineInfo]:
        """The timeline and its ancestors, nearest first."""
        ...

    def branch_for_writing(self, name: str) -> TimelineInfo:
        """The timeline new history of branch ``name`` goes to: its own if this repository
        is the timeline's writer; otherwise (received from elsewhere) a new child timeline
        at its ``last_record_lsn``, which the name is moved to. Never extends a timeline
        another pageserver writes."""
        ...

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
        """Append records above ``last_record_lsn`` (or, continuing a pending LSN, after
        its stored records) and publish the new ``last_record_lsn`` in one transaction.
        ``partial``: the batch's greatest LSN may go on in a later batch, so it is stored
        but not published (it becomes the pending cursor). ``expect_hash``: refuse the
        batch (nothing written) unless the history hash at the new ``last_record_lsn``
        equals it. ``digests``: each record's digest (``history.record_digest``), if the
        caller computed them already."""
        ...

    def history_hash(self, timeline_id: TimelineId, lsn: Lsn) -> bytes:
        """The chained hash of this timeline's own records with lsn <= ``lsn`` (which must
        be within its published history): equal on two repositories exactly when they
        hold the same records up to there, however they were batched."""
        ...

    def get_value(self, timeline_id: TimelineId, key: bytes, lsn: Lsn, *,
                  before_readable: bool = False) -> bytes | None:
        """The value of ``key`` at ``lsn``. ``before_readable``: also below the timeline's
        ``min_readable_lsn`` (for a writer's own bookkeeping keys, whose values are whole at
        every LSN even where the timeline as a whole is not)."""
        ...

    def get_value_of(self, name_or_id: str, key: bytes, lsn: Lsn) -> bytes | None:
        """:meth:`get_value` for a branch name or timeline id."""
        ...

    def iter_records(
        self, timeline_id: TimelineId, after: Lsn, upto: Lsn, *, skip: Cursor | None = None
    ) -> Iterator[Record]:
        """Records of the timeline itself with lsn in ``(after, upto]`` in stored order;
        ``skip`` leaves out the first ``skip.count`` records of LSN ``skip.lsn`` (what a
        receiver already holds) without reading their payloads; the last of them must have
        key ``skip.key`` (if not empty), or HistoryMismatch."""
        ...

    def count_records(self, timeline_id: TimelineId, after: Lsn, upto: Lsn) -> tuple[int, int]:
        """Number of records and payload bytes with lsn in ``(after, upto]``."""
        ...

    def materialize(
        self,
        timeline_id: TimelineId,
        lsn: Lsn,
        *,
        lo: bytes | None = None,
        hi: bytes | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every key with a value at ``lsn`` and that value, in key order; only keys in
        ``[lo, hi)`` when given (the PostgreSQL layer lists one database's keys so).
        ``cancel``: once it is set the iteration soon raises :class:`zenith.errors.Cancelled`."""
        ...

    def digest(self, timeline_id: TimelineId, lsn: Lsn, *,
               cancel: threading.Event | None = None) -> str:
        """SHA-256 of the state at ``lsn``; ``cancel`` as for :meth:`materialize`."""
        ...

    # garbage collection --------------------------------------------------------------------

    def gc(self, timeline_id: TimelineId, horizon: Lsn, *, batch_rows: int = 5000,
           cancel: threading.Event | None = None) -> GcResult:
        """Make the timeline readable from ``horizon`` on and remove the records no read at
        or above it, at a child's branch point, or held by a read in progress, can need
        (``gc.py``)."""
        ...

    def hold(self, timeline_id: TimelineId, lsn: Lsn) -> AbstractContextManager[None]:
        """Keep the timeline readable at ``lsn`` while the context lasts (GC's horizon
        stops there)."""
        ...

    def hold_history(self, timeline_id: TimelineId, after: Lsn
                     ) -> AbstractContextManager[None]:
        """Keep every record of the timeline after ``after`` while the context lasts (GC's
        horizon stops there): what a transfer offered stays sendable until it ends."""
        ...

    def space(self, timeline_id: TimelineId) -> tuple[int, int]:
        """(payload bytes, as stored, of the records the timeline keeps; removed bytes not
        yet given back to the file system)."""
        ...

    def compact(self, timeline_id: TimelineId, *, max_bytes: int | None = None,
                cancel: threading.Event | None = None, pause: float = 0.0,
                wait: float = 5.0) -> CompactResult:
        """Store the timeline's old plain images compressed, as the same records
        (``compaction.py``)."""
        ...

    def commit_lsn_at(self, timeline_id: TimelineId, when: float) -> Lsn | None:
        """The newest commit point written at or before ``when`` (epoch seconds) in the
        timeline's ancestry; ``None``: none that old."""
        ...

    def close(self) -> None: ...
