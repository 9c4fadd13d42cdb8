"""A bucket's branches and timelines, read once, seen as a repository by ``plan.py``.

A push to a bucket plans exactly as a push to a pageserver (``transfer/plan.py``): the
same cases, rules and messages. :class:`BucketView` gives the planner what it reads of a
repository (timelines, branches) from the bucket's refs and indexes, each with the ETag
it was read at, so the push can move them only from that state (conditional writes).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from zenith.bucket.layout import (
    MARKER,
    MAX_JSON,
    Ref,
    Segment,
    TimelineIndex,
    check_marker,
    index_key,
)
from zenith.bucket.store import Bucket
from zenith.errors import InvalidArgument, TransferAborted, UnknownBranch, UnknownTimeline
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage.api import BranchInfo, Record, TimelineInfo, validate_branch_name
from zenith.storage.history import Folder
from zenith.transfer.frames import HEADER, MAX_FRAME, decode_frame, decode_records
from zenith.transfer.messages import MAX_CHAIN

MAX_REFS = 100_000


@dataclass(frozen=True)
class Held:
    """An object as read, with the ETag a conditional write names."""

    etag: str


@dataclass(frozen=True)
class HeldRef(Held):
    ref: Ref


@dataclass(frozen=True)
class HeldIndex(Held):
    index: TimelineIndex


class BucketView:
    """Refs and indexes of one bucket: all refs (listed), indexes as asked for (cached)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.marker = bucket.get(MARKER, MAX_JSON)
        if self.marker is not None:
            check_marker(self.marker[0])
        self.refs: dict[str, HeldRef] = {}
        #: Objects under refs/ that are not a ref zenith can read, and why: the branch
        #: they would name cannot be used, the others can (gc refuses to run).
        self.bad_refs: dict[str, str] = {}
        for obj in bucket.list_objects("refs/"):
            name = obj.key[len("refs/"):]
            if not name or name.endswith("/"):
                continue  # a "folder" marker some S3 tools write
            if len(self.refs) + len(self.bad_refs) >= MAX_REFS:
                raise TransferAborted(f"{bucket.where} holds more than {MAX_REFS} refs")
            try:
                validate_branch_name(name)
                got = bucket.get(obj.key, MAX_JSON)
                if got is None:
                    continue  # deleted since the listing
                self.refs[name] = HeldRef(got[1], Ref.decode(got[0], f"ref {name}"))
            except (TransferAborted, InvalidArgument) as exc:
                self.bad_refs[name] = exc.message
        self._indexes: dict[TimelineId, HeldIndex | None] = {}

    def held_index(self, tid: TimelineId) -> HeldIndex | None:
        if tid not in self._indexes:
            got = self.bucket.get(index_key(tid), MAX_JSON)
            held = None
            if got is not None:
                index = TimelineIndex.decode(got[0], f"index of timeline {tid}")
                if index.timeline_id != tid:
                    raise TransferAborted(f"the index of timeline {tid} describes "
                                          f"{index.timeline_id}")
                held = HeldIndex(got[1], index)
            self._indexes[tid] = held
        return self._indexes[tid]

    def index(self, tid: TimelineId) -> TimelineIndex:
        held = self.held_index(tid)
        if held is None:
            raise UnknownTimeline(f"timeline {tid} is not in {self.bucket.where}")
        return held.index

    # -- what plan.py reads of a repository ---------------------------------------------------

    def get_timeline(self, tid: TimelineId) -> TimelineInfo:
        return self.index(tid).info()

    def get_branch(self, name: str) -> BranchInfo:
        held = self.refs.get(name)
        if name in self.bad_refs:
            raise TransferAborted(f"{self.bucket.where}: {self.bad_refs[name]}")
        if held is None:
            raise UnknownBranch(f'branch "{name}" not found in {self.bucket.where}')
        index = self.index(held.ref.timeline_id)
        return BranchInfo(name, index.info(self._head(name, held.ref, index)))

    def list_branches(self) -> list[BranchInfo]:
        return [self.get_branch(name) for name in sorted(self.refs)]

    def _head(self, name: str, ref: Ref, index: TimelineIndex) -> Lsn:
        if not index.history_from <= ref.lsn <= index.last_lsn:
            raise TransferAborted(f"ref {name} points at {ref.lsn}, outside what the index of "
                                  f"timeline {ref.timeline_id} holds")
        return ref.lsn

    # -- what a pull offers --------------------------------------------------------------------

    def chain(self, name: str) -> list[TimelineInfo]:
        """Branch ``name``'s timeline and its ancestors held here, root first, each as far
        as the bucket holds it (the branch's own up to its ref)."""
        branch = self.get_branch(name)
        chain = [branch.timeline]
        tl = branch.timeline
        while tl.ancestor_id is not None and tl.base_lsn is None:
            if len(chain) >= MAX_CHAIN:
                raise TransferAborted(f"branch {name}'s ancestry is longer than {MAX_CHAIN}")
            tl = self.get_timeline(tl.ancestor_id)
            chain.append(tl)
        return chain[::-1]

    def hash_at(self, tid: TimelineId, lsn: Lsn) -> bytes:
        """The history hash of timeline ``tid`` at ``lsn``: from the index where a segment
        ends there, else folded from the segment holding ``lsn`` (downloaded)."""
        index = self.index(tid)
        known = index.hash_at(lsn)
        if known is not None:
            return known
        start = index.hash_at_start()
        if start is None or not index.history_from <= lsn <= index.last_lsn:
            raise TransferAborted(f"timeline {tid} is not held in the bucket at {lsn}")
        seg = next(s for s in index.segments if not s.base and s.after < lsn <= s.upto)
        previous = index.hash_at(seg.after)
        assert previous is not None
        folder = Folder(previous)
        for rec in segment_records(self.bucket, seg):
            if rec.lsn > lsn:
                break
            folder.add(rec.key, rec.lsn, rec.kind, rec.payload)
        return folder.close()


def read_segment(bucket: Bucket, seg: Segment, out: BinaryIO) -> None:
    """Download a segment into ``out``, checked against its index entry (size, CRC32C)."""
    crc = bucket.download(seg.key, out, seg.size)
    if crc != seg.crc32c:
        raise TransferAborted(f"{bucket.where}{seg.key} fails its CRC32C check (the object "
                              "is corrupt or was replaced); nothing was applied from it")


def frames_of(data: BinaryIO, what: str) -> Iterator[bytes]:
    """The frames (wire bytes) of a segment, one by one."""
    while head := data.read(HEADER.size):
        if len(head) < HEADER.size:
            raise TransferAborted(f"{what}: truncated frame header")
        body_len = HEADER.unpack(head)[3]
        if body_len > MAX_FRAME:
            raise TransferAborted(f"{what}: a frame of {body_len} bytes (at most {MAX_FRAME})")
        body = data.read(body_len)
        if len(body) != body_len:
            raise TransferAborted(f"{what}: truncated frame")
        yield head + body


def segment_records(bucket: Bucket, seg: Segment) -> Iterator[Record]:
    """A segment's records, frame by frame (downloaded to a temporary file)."""
    with tempfile.TemporaryFile() as f:
        read_segment(bucket, seg, f)
        f.seek(0)
        for wire in frames_of(f, seg.key):
            yield from decode_records(decode_frame(wire).body, lsn_order=not seg.base)
