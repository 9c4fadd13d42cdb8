"""Push a branch into a bucket origin: :func:`push_to_bucket`.

The same decisions as a push to a pageserver (``transfer/plan.py`` over a
:class:`BucketView`), then three steps, each a commit point for what follows it:

1. segments: every planned range cut into segment objects (immutable; one already there
   from a killed push, with the history hash we hold at its end, is reused, not sent
   again);
2. indexes: each timeline's index extended with its new segments, written only if it is
   still what was read (``If-Match``; ``If-None-Match: *`` for a new timeline);
3. the ref: written last, the same way. Another push in between makes this one fail with
   "remote changed", never overwrite it; a push killed before leaves the old ref.

Blocking (storage reads and S3 calls): the pageserver runs it in a worker thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

import google_crc32c

from zenith.bucket.gc import PushLease
from zenith.bucket.layout import (
    MARKER,
    MAX_JSON,
    PRINCIPAL,
    Ref,
    Segment,
    TimelineIndex,
    encode_marker,
    index_key,
    ref_key,
    segment_key,
    segment_range,
    segments_prefix,
)
from zenith.bucket.state import BucketView, read_segment
from zenith.bucket.store import Bucket, Conflict
from zenith.errors import FeatureNotSupported, PushRejected
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, Repository, TimelineInfo
from zenith.transfer.frames import AdaptiveCompressor, cut_frames, encode_records
from zenith.transfer.messages import (
    FrameType,
    Offer,
    Progress,
    RangeRequest,
    Status,
    TransferResult,
    decode,
)
from zenith.transfer.plan import Depth, Plan, Send, make_plan, points_to_prove

#: A segment is closed at the first LSN boundary past this many bytes of frames.
SEGMENT_BYTES: Final = 32 << 20
#: More small segments than this on one timeline, and a push merges them.
MERGE_AFTER: Final = 8

ProgressFn = Callable[[Progress], None]


def push_to_bucket(
    repo: Repository,
    bucket: Bucket,
    chain: list[TimelineInfo],
    dest: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    depth: Depth | None = None,
    progress: ProgressFn | None = None,
    scratch: Path,
    segment_bytes: int = SEGMENT_BYTES,
) -> TransferResult:
    """Push the timeline ``chain[0]`` (with its ancestors, nearest first) as branch
    ``dest`` of the bucket. Raises PushRejected for the cases a pageserver rejects, and
    when another push moved the branch or its timelines meanwhile."""
    started = time.monotonic()
    with contextlib.ExitStack() as holds:
        for tl in chain:
            holds.enter_context(repo.hold_history(tl.timeline_id, tl.start_lsn))
        chain = repo.ancestry(chain[0].timeline_id)
        # What a receiver would read of our offer (the same encoding: history_from).
        offer = Offer(tuple(reversed(chain)))
        offered = decode(Offer, FrameType.OFFER, offer.encode()).chain
        source = offered[-1]
        view = BucketView(bucket)
        if not dry_run:
            _check_conditional_writes(bucket, view)
            lease = holds.enter_context(PushLease(bucket))
        points = points_to_prove(view, offered)  # type: ignore[arg-type]
        mismatched = {p.timeline_id: p.lsn for p in points
                      if view.hash_at(p.timeline_id, p.lsn)
                      != repo.history_hash(p.timeline_id, p.lsn)}
        since = None if depth is None else depth.since(
            source.last_record_lsn, None if depth.seconds is None else
            repo.commit_lsn_at(source.timeline_id, time.time() - depth.seconds))
        plan = make_plan(view, dest, offered, mismatched,  # type: ignore[arg-type]
                         pushing=True, force=force, since=since, depth=depth,
                         principal=PRINCIPAL)
        answer = plan.to_message(dry_run, None)

        def result(records: int, nbytes: int) -> TransferResult:
            return answer.result(source, records, nbytes, time.monotonic() - started)

        if plan.status is Status.REJECTED:
            raise PushRejected(plan.message, hint="nothing was changed")
        if plan.status is Status.UP_TO_DATE:
            return result(0, 0)
        state = Progress()
        for send in plan.sends:
            if not send.request.base:
                n, size = repo.count_records(send.request.timeline_id, send.request.after,
                                             send.request.upto)
                state.records_total += n
                state.bytes_total += size
        if dry_run:
            return result(state.records_total, state.bytes_total)
        uploader = _Uploader(repo, bucket, scratch, state, progress, segment_bytes)
        uploader.tick = lease.renew
        try:
            new: dict[TimelineId, list[Segment]] = {}
            for send in plan.sends:
                new.setdefault(send.request.timeline_id, []).extend(uploader.send(send))
            uploader.uploads.wait()
            # Every timeline the plan sends gets its index written if it has new segments
            # or has none yet (a timeline with no records of its own still has one: a
            # child's chain reads through it).
            indexes = [(tl.timeline_id, uploader.merged(_index(view, tl, new[tl.timeline_id])))
                       for tl in offered if tl.timeline_id in new and (
                           new[tl.timeline_id] or view.held_index(tl.timeline_id) is None)]
            uploader.uploads.wait()
        finally:
            uploader.uploads.close()
        lease.check_no_gc()
        _commit(bucket, view, plan, indexes, dest)
    return result(state.records_done, state.bytes_done)


def _check_conditional_writes(bucket: Bucket, view: BucketView) -> None:
    """Refuse a server that ignores ``If-None-Match``/``If-Match`` (some S3 look-alikes
    do): there, two pushes of one branch could both "win" and one would be lost. The
    probe writes nothing new: a create-only PUT of the format marker, which exists (it is
    written here first if it does not), and a PUT of it if it had another ETag, must both
    be refused."""
    if view.marker is None:
        with contextlib.suppress(Conflict):
            bucket.put(MARKER, encode_marker(), create=True)
        view.marker = (encode_marker(), "")
    for condition in ({"create": True}, {"if_match": '"0-not-its-etag"'}):
        try:
            bucket.put(MARKER, encode_marker(), **condition)
        except Conflict:
            continue
        break
    else:
        return
    raise FeatureNotSupported(
        f"{bucket.where} ignores conditional writes (If-None-Match or If-Match accepted "
        "where it must refuse): concurrent pushes could lose updates there, so zenith does "
        "not push to it",
        hint="use a server with S3 conditional writes (AWS S3, MinIO, Ceph RGW, recent "
             "moto); pulls from it still work")


class _Uploader:
    """Cuts planned ranges into segment objects and uploads them."""

    def __init__(self, repo: Repository, bucket: Bucket, scratch: Path, state: Progress,
                 progress: ProgressFn | None, segment_bytes: int) -> None:
        self.repo, self.bucket, self.scratch = repo, bucket, scratch
        self.state, self.progress = state, progress
        self.segment_bytes = segment_bytes
        self.compressor = AdaptiveCompressor()
        self.listed: dict[TimelineId, dict[Lsn, list[tuple[Lsn, str]]]] = {}
        self.uploads = _Uploads(bucket)
        #: Called after each segment (the push's lock is renewed).
        self.tick: Callable[[], None] = lambda: None


    def send(self, send: Send) -> list[Segment]:
        r = send.request
        if r.base:
            return [self._base(r)]
        segments: list[Segment] = []
        at = r.after
        while at < r.upto:
            seg = self._reuse(r.timeline_id, at, r.upto) or self._build(r.timeline_id, at,
                                                                         r.upto)
            segments.append(seg)
            self.tick()
            at = seg.upto
            self.state.acked_lsn = at
            self._report()
        return segments

    def merged(self, index: TimelineIndex) -> TimelineIndex:
        """``index``, its small segments (under a quarter of the segment size) merged into
        segments of at most the segment size once there are more than MERGE_AFTER of them:
        a pull then reads O(branch) objects, not O(pushes). A merged segment is the small
        ones' bytes back to back (frames delimit themselves); they stay in the bucket, no
        longer listed, until ``origin gc``."""
        small = self.segment_bytes // 4
        if sum(1 for s in index.segments if not s.base and s.size < small) <= MERGE_AFTER:
            return index
        out: list[Segment] = []
        run: list[Segment] = []

        def flush() -> None:
            out.extend([self._concat(index.timeline_id, run)] if len(run) > 1 else run)
            run.clear()

        for seg in index.segments:
            if seg.base or seg.size >= small:
                flush()
                out.append(seg)
                continue
            if run and sum(r.size for r in run) + seg.size > self.segment_bytes:
                flush()
            run.append(seg)
        flush()
        merged = dataclasses.replace(index, segments=tuple(out))
        merged.check(f"merged index of timeline {index.timeline_id}")
        return merged

    def _concat(self, tid: TimelineId, run: list[Segment]) -> Segment:
        with _Scratch(self.scratch) as out:
            for seg in run:
                buf = io.BytesIO()
                read_segment(self.bucket, seg, buf)
                data = buf.getvalue()
                out.append(data)
            first, last = run[0], run[-1]
            seg = Segment(segment_key(tid, first.after, last.upto), first.after, last.upto,
                          sum(r.records for r in run), sum(r.nbytes for r in run), out.size,
                          out.crc, last.hash)
            out.upload(self.uploads, seg)
        return seg

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.state)

    def _existing(self, tid: TimelineId) -> dict[Lsn, list[tuple[Lsn, str]]]:
        """Segment objects of the timeline already in the bucket, by their ``after``."""
        if tid not in self.listed:
            found: dict[Lsn, list[tuple[Lsn, str]]] = {}
            for obj in self.bucket.list_objects(segments_prefix(tid)):
                span = segment_range(tid, obj.key)
                if span is not None:
                    found.setdefault(span[0], []).append((span[1], obj.key))
            self.listed[tid] = found
        return self.listed[tid]

    def _reuse(self, tid: TimelineId, at: Lsn, upto: Lsn) -> Segment | None:
        """A segment a killed push left at ``at``, if its records are ours: the history
        hash at its end (in its metadata) must be the one we hold there."""
        for end, key in sorted(self._existing(tid).get(at, []), reverse=True):
            if not at < end <= upto:
                continue
            found = self.bucket.stat(key)
            if found is None:
                continue
            size, meta, _mtime = found
            try:
                seg = Segment(key, at, end, int(meta["records"]), int(meta["bytes"]), size,
                              int(meta["crc32c"]), bytes.fromhex(meta["hash"]))
            except (KeyError, ValueError):
                continue
            if seg.hash != self.repo.history_hash(tid, end):
                continue
            # Not sent again: neither counted as sent nor still to send.
            self.state.records_total -= seg.records
            self.state.bytes_total -= seg.nbytes
            return seg
        return None

    def _build(self, tid: TimelineId, at: Lsn, upto: Lsn) -> Segment:
        """The next segment from ``at``: records until the first LSN boundary past
        ``segment_bytes`` of frames (or ``upto``), written to a scratch file, uploaded."""
        records = self.repo.iter_records(tid, at, upto)
        # A fresh compressor each segment: the same records always make the same bytes,
        # so a push run again after a kill resumes the same multipart upload.
        self.compressor = AdaptiveCompressor()
        with _Scratch(self.scratch) as out:
            end = upto  # unless the segment is cut before

            def until_cut() -> Iterator[Record]:
                nonlocal end
                last = at
                for rec in records:
                    if rec.lsn != last and out.size >= self.segment_bytes:
                        end = last
                        return
                    last = rec.lsn
                    yield rec

            try:
                out.write(self.compressor, cut_frames(until_cut()), self.state)
            finally:
                close = getattr(records, "close", None)
                if close is not None:
                    close()
            seg = Segment(segment_key(tid, at, end), at, end, out.records, out.nbytes,
                          out.size, out.crc, self.repo.history_hash(tid, end))
            out.upload(self.uploads, seg)
        return seg

    def _base(self, r: RangeRequest) -> Segment:
        """A shallow copy's base at ``r.after``: one segment of images, in key order."""
        digest = self.repo.history_hash(r.timeline_id, r.after)
        self.compressor = AdaptiveCompressor()
        with _Scratch(self.scratch) as out:
            out.write(self.compressor, cut_frames(self.repo.base_records(r.timeline_id,
                                                                         r.after)), self.state)
            key = segment_key(r.timeline_id, r.after, r.after, base=True)
            seg = Segment(key, r.after, r.after, out.records, out.nbytes, out.size, out.crc,
                          digest, base=True)
            out.upload(self.uploads, seg)
        self._report()
        return seg


class _Scratch:
    """A segment being written to a scratch file (frames, with their CRC32C kept)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(dir=directory, suffix=".zseg")
        self.file = os.fdopen(fd, "wb")
        self.size = 0
        self.crc = 0
        self.records = self.nbytes = 0  # records written, and their payload bytes
        self.handed = False

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if not self.handed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def append(self, data: bytes) -> None:
        """Frames as they are (CRC32C kept)."""
        self.file.write(data)
        self.size += len(data)
        self.crc = google_crc32c.extend(self.crc, data)

    def write(self, compressor: AdaptiveCompressor, batches: Iterable[list[Record]],
              state: Progress) -> None:
        """Each batch as one DATA frame (``transfer/frames.py``), counted here and in
        ``state``."""
        for batch in batches:
            self.append(compressor.frame(FrameType.DATA, encode_records(batch)))
            nbytes = sum(len(rec.payload) for rec in batch)
            self.records += len(batch)
            self.nbytes += nbytes
            state.records_done += len(batch)
            state.bytes_done += nbytes

    def upload(self, uploads: _Uploads, seg: Segment) -> None:
        """Hand the file to ``uploads`` (which removes it once sent)."""
        self.file.close()
        self.handed = True
        uploads.submit(self.path, seg.key, {
            "records": str(seg.records), "bytes": str(seg.nbytes), "crc32c": str(seg.crc32c),
            "hash": seg.hash.hex()})


class _Uploads:
    """Segment uploads in one thread behind the building of the next segment (building is
    CPU work, an upload mostly waits on the socket): one runs while at most one waits, so
    scratch space stays bounded by three segments."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zenith-s3")
        self.pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()
        self.paths: set[str] = set()

    def submit(self, path: str, key: str, metadata: dict[str, str]) -> None:
        self.paths.add(path)  # removed by close() if it never goes up
        while len(self.pending) >= 2:
            self.pending.popleft().result()  # an upload's error surfaces here
        self.pending.append(self.pool.submit(self._upload, path, key, metadata))

    def _upload(self, path: str, key: str, metadata: dict[str, str]) -> None:
        try:
            self.bucket.upload(key, path, metadata)
        finally:
            os.unlink(path)
            self.paths.discard(path)

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for path in list(self.paths):  # handed over, never uploaded
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _index(view: BucketView, tl: TimelineInfo, segments: list[Segment]) -> TimelineIndex:
    """The timeline's index with this push's segments."""
    held = view.held_index(tl.timeline_id)
    if held is None:
        base = segments[0].after if segments and segments[0].base else None
        index = TimelineIndex(tl.timeline_id, tl.ancestor_id, tl.ancestor_lsn,
                              tl.min_readable_lsn, tuple(segments), base)
    else:
        index = held.index.extended(segments)
    index.check(f"index of timeline {tl.timeline_id}")
    return index


def _put_over(bucket: Bucket, key: str, data: bytes, etag: str | None) -> None:
    """Write ``data`` only over the object read with ``etag`` (None: only if absent). A
    conflict where the object now holds exactly ``data`` is our own write whose answer was
    lost and that the client tried again: not a conflict."""
    try:
        if etag is None:
            bucket.put(key, data, create=True)
        else:
            bucket.put(key, data, if_match=etag)
    except Conflict:
        now = bucket.get(key, MAX_JSON)
        if now is None or now[0] != data:
            raise


def _commit(bucket: Bucket, view: BucketView, plan: Plan,
            indexes: list[tuple[TimelineId, TimelineIndex]], dest: str) -> None:
    """Indexes, then the ref: each written only over the state the plan read."""
    try:
        if view.marker is None:
            with contextlib.suppress(Conflict):
                bucket.put(MARKER, encode_marker(), create=True)
        for tid, index in indexes:
            held = view.held_index(tid)
            _put_over(bucket, index_key(tid), index.encode(), held.etag if held else None)
        source = plan.source
        ref = Ref(source.timeline_id, source.last_record_lsn).encode()
        old = view.refs.get(dest)
        _put_over(bucket, ref_key(dest), ref, old.etag if old else None)
    except Conflict:
        raise PushRejected(
            f"rejected: remote changed: another push moved {dest} or its timelines in "
            f"{bucket.where} while this one ran; pull first",
            hint="the branch was not moved; what this push uploaded is reused next time",
        ) from None
