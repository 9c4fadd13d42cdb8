"""Pull a branch from a bucket origin: :func:`pull_from_bucket`.

The bucket cannot run code, so the pulling pageserver plays its sender: it offers the
branch's chain as the bucket's refs and indexes describe it, answers the receiver's
proofs from the indexes (folding a segment's records when a point falls inside one), and
streams the planned ranges from the segment objects — the very frames a push wrote, cut
again only where a range starts or ends inside a segment. The receiver is the one every
pull runs (``transfer/receiver.py``), over an in-process channel, so a bucket's data gets
exactly the checks a peer's does: frame CRCs, the plan's rules, record order and ranges,
counts and the history hash at every range's end.

Every segment a plan needs is downloaded to a scratch directory and checked against its
index entry (size, CRC32C) before the first record is sent: a corrupt or truncated
object is refused with nothing applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zenith.bucket.layout import S3Location, Segment
from zenith.bucket.state import BucketView, frames_of, read_segment
from zenith.bucket.store import Bucket
from zenith.errors import TransferAborted
from zenith.storage import Record, Repository, TimelineInfo
from zenith.transfer.channel import TransferLocks, read_message, read_raw, send, write_raw
from zenith.transfer.frames import (
    AdaptiveCompressor,
    decode_frame,
    decode_records,
    encode_frame,
    encode_records,
)
from zenith.transfer.messages import (
    DEFAULT_TIMEOUT,
    Ask,
    Done,
    FrameType,
    Offer,
    PlanMsg,
    ProgressFn,
    Proof,
    Range,
    RangeEnd,
    RangeRequest,
    Status,
    Summary,
    TransferResult,
)
from zenith.transfer.offload import Offload, to_thread
from zenith.transfer.receiver import receive_branch

#: Bytes of frames in flight between the bucket's side and the receiver (which reads
#: ahead on its own, READ_AHEAD_BYTES).
PIPE_BYTES: Final = 4 << 20
#: Silence bound between the two in-process ends (a day: none, in effect).
IN_PROCESS: Final = 86400.0


def principal(loc: S3Location) -> str:
    """Who sent a shallow base pulled from this bucket (plan.py's trust rule)."""
    return f"origin s3://{loc.bucket}/{loc.prefix}"


async def pull_from_bucket(
    repo: Repository,
    bucket: Bucket,
    remote_branch: str,
    dest: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    locks: TransferLocks | None = None,
    offload: Offload = to_thread,
    scratch: Path,
) -> TransferResult:
    """Pull branch ``remote_branch`` of the bucket into local branch ``dest``: the cases,
    checks and messages of a pull from a pageserver (all the history the bucket holds)."""
    def load() -> tuple[BucketView, list[TimelineInfo]]:
        view = BucketView(bucket)
        return view, view.chain(remote_branch)

    view, chain = await offload(load)
    ours, theirs = _pipe_pair()
    # The two ends are in this process: no silence bound between them (every S3 call is
    # bounded on its own, by the bucket's timeout), else a plan whose segments take
    # longer than ``timeout`` to download and check would always be dropped.
    server = asyncio.create_task(_serve(ours, view, chain, scratch, offload, IN_PROCESS))
    try:
        result = await receive_branch(
            theirs, repo, dest, pushing=False, force=force, dry_run=dry_run,
            progress=progress, timeout=IN_PROCESS, locks=locks, offload=offload,
            principal=principal(bucket.loc))
    except BaseException:
        # The bucket's side failed first (a corrupt object: the receiver then saw the
        # stream end) — its error is the one to report; else the receiver's is.
        first = server.done()
        theirs.abort("the receiver failed")
        failure = await _outcome(server)
        if first and failure is not None and not isinstance(failure, _Closed):
            raise failure from None
        raise
    failure = await _outcome(server)
    if failure is not None:
        raise failure
    return result


async def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    with contextlib.suppress(BaseException):
        await task
    return None if task.cancelled() else task.exception()


# -- the channel ------------------------------------------------------------------------------


class _Closed(TransferAborted):
    """The other end of the in-process channel went away."""


class _Pipe:
    """One direction of the in-process channel, bounded in bytes."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.size = 0
        self.closed = False
        self.changed = asyncio.Event()

    async def put(self, data: bytes) -> None:
        while not self.closed and self.size and self.size + len(data) > PIPE_BYTES:
            self.changed.clear()
            await self.changed.wait()
        if self.closed:
            raise _Closed("the transfer ended")
        self.items.append(data)
        self.size += len(data)
        self.changed.set()

    async def get(self) -> bytes | None:
        while not self.items:
            if self.closed:
                return None
            self.changed.clear()
            await self.changed.wait()
        data = self.items.popleft()
        self.size -= len(data)
        self.changed.set()
        return data

    def close(self) -> None:
        self.closed = True
        self.changed.set()


@dataclass
class _End:
    inbox: _Pipe
    outbox: _Pipe

    async def read(self) -> bytes | None:
        return await self.inbox.get()

    async def write(self, data: bytes) -> None:
        await self.outbox.put(data)

    def abort(self, reason: str) -> None:
        self.inbox.close()
        self.outbox.close()

    def done(self) -> None:
        self.outbox.close()


def _pipe_pair() -> tuple[_End, _End]:
    a, b = _Pipe(), _Pipe()
    return _End(a, b), _End(b, a)


# -- the bucket's side ---------------------------------------------------------------------


async def _serve(end: _End, view: BucketView, chain: list[TimelineInfo], scratch: Path,
                 offload: Offload, timeout: float) -> None:
    try:
        with tempfile.TemporaryDirectory(dir=_mkdir(scratch)) as tmp:
            await _exchange(end, view, chain, Path(tmp), offload, timeout)
    except BaseException:
        end.abort("the bucket's side failed")
        raise
    end.done()


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


async def _exchange(end: _End, view: BucketView, chain: list[TimelineInfo], tmp: Path,
                    offload: Offload, timeout: float) -> None:
    await send(end, Offer(tuple(chain)), timeout)
    ask = await read_message(end, Ask, timeout)
    offered = {t.timeline_id: t for t in chain}
    for p in ask.points:
        tl = offered.get(p.timeline_id)
        if tl is None or not tl.history_start <= p.lsn <= tl.last_record_lsn:
            raise TransferAborted("the receiver asked for a proof outside the offer")
    hashes = await offload(lambda: [view.hash_at(p.timeline_id, p.lsn) for p in ask.points])
    await send(end, Proof(tuple(hashes)), timeout)
    plan = await read_message(end, PlanMsg, 2 * timeout)
    if plan.status in (Status.REJECTED, Status.UP_TO_DATE):
        return
    for r in plan.ranges:
        if r.timeline_id not in offered:
            raise TransferAborted("the receiver asked for a timeline outside the offer")
    # Every object the plan needs, downloaded and checked before anything is sent.
    # (A dry run reads only the segments a range cuts into, to count what it would send.)
    files = await offload(_fetch, view, plan.ranges, tmp, plan.dry_run)
    totals = await offload(lambda: [f.count() for f in files])
    total_records = sum(t[0] for t in totals)
    total_bytes = sum(t[1] for t in totals)
    if plan.dry_run:
        await send(end, Summary(total_records, total_bytes), timeout)
        return
    compressor = AdaptiveCompressor() if plan.compression == "zstd" else None
    for r, f in zip(plan.ranges, files, strict=True):
        await send(end, Range(r, total_records, total_bytes), timeout)
        frames = f.frames(compressor)
        while (wire := await offload(next, frames, None)) is not None:
            await write_raw(end, wire, timeout)
        await send(end, RangeEnd(r.timeline_id, r.upto, f.records, f.nbytes, f.hash), timeout)
    while True:  # ACKs until DONE
        frame = decode_frame(await read_raw(end, timeout))
        if frame.type is FrameType.DONE:
            frame.message(Done)
            return
        if frame.type is not FrameType.ACK:
            raise TransferAborted(f"expected ACK or DONE, got {frame.type.name}")


class _Filter:
    """The records of a range among a segment's: in ``(after, upto]``, less the first
    ``resume.count`` of LSN ``resume.lsn`` (the receiver holds them), across calls."""

    def __init__(self, request: RangeRequest) -> None:
        self.request = request
        self.held = request.resume.count if request.resume is not None else 0

    def keep(self, records: list[Record]) -> list[Record]:
        r = self.request
        kept = []
        for rec in records:
            if rec.lsn <= r.after or rec.lsn > r.upto:
                continue
            if r.resume is not None and rec.lsn <= r.resume.lsn:
                if rec.lsn < r.resume.lsn:
                    continue
                if self.held > 0:
                    self.held -= 1
                    continue
            kept.append(rec)
        return kept


@dataclass
class _RangeFiles:
    """One planned range as downloaded segment files, and what it sends."""

    request: RangeRequest
    parts: list[tuple[Segment, Path]]
    hash: bytes
    records: int = 0
    nbytes: int = 0

    def whole(self, seg: Segment) -> bool:
        r = self.request
        return seg.base or (r.after <= seg.after and seg.upto <= r.upto and (
            r.resume is None or not seg.after < r.resume.lsn <= seg.upto))

    def _cut(self, seg: Segment, path: Path, keep: _Filter) -> Iterator[list[Record]]:
        with open(path, "rb") as f:
            for wire in frames_of(f, seg.key):
                kept = keep.keep(decode_records(decode_frame(wire).body))
                if kept:
                    yield kept

    def count(self) -> tuple[int, int]:
        """Records and payload bytes the range sends (whole segments from their index
        entries, the others by reading them)."""
        records = nbytes = 0
        keep = _Filter(self.request)
        for seg, path in self.parts:
            if self.whole(seg):
                records += seg.records
                nbytes += seg.nbytes
                continue
            for kept in self._cut(seg, path, keep):
                records += len(kept)
                nbytes += sum(len(rec.payload) for rec in kept)
        return records, nbytes

    def frames(self, compressor: AdaptiveCompressor | None) -> Iterator[bytes]:
        """The range's DATA frames: a whole segment's as stored, others cut again."""
        self.records = self.nbytes = 0
        keep = _Filter(self.request)
        for seg, path in self.parts:
            if self.whole(seg):
                with open(path, "rb") as f:
                    for wire in frames_of(f, seg.key):
                        if wire[0] != FrameType.DATA:
                            raise TransferAborted(f"{seg.key}: a frame of type {wire[0]} "
                                                  "in a segment")
                        yield wire
                self.records += seg.records
                self.nbytes += seg.nbytes
                continue
            for kept in self._cut(seg, path, keep):
                self.records += len(kept)
                self.nbytes += sum(len(rec.payload) for rec in kept)
                body = encode_records(kept)
                yield compressor.frame(FrameType.DATA, body) if compressor is not None \
                    else encode_frame(FrameType.DATA, body)


def _fetch(view: BucketView, ranges: tuple[RangeRequest, ...], tmp: Path,
           counting: bool = False) -> list[_RangeFiles]:
    """Download and check every segment the ranges read (``counting``: only those a range
    does not take whole)."""
    out: list[_RangeFiles] = []
    for n, r in enumerate(ranges):
        index = view.index(r.timeline_id)
        if r.base:
            segs = [s for s in index.segments if s.base and s.after == r.after]
            if not segs:
                raise TransferAborted(
                    f"the bucket holds timeline {r.timeline_id} from {index.history_from} "
                    f"on; it has no base at {r.after}")
            digest = segs[0].hash
        else:
            if not index.history_from <= r.after or r.upto > index.last_lsn:
                raise TransferAborted(f"the bucket does not hold timeline {r.timeline_id} "
                                      f"over ({r.after}, {r.upto}]")
            segs = index.covering(r.after, r.upto)
            digest = view.hash_at(r.timeline_id, r.upto)
        files = _RangeFiles(r, [(seg, tmp / f"{n}-{i}.zseg") for i, seg in enumerate(segs)],
                            digest)
        for seg, path in files.parts:
            if not (counting and files.whole(seg)):
                with open(path, "wb") as f:
                    read_segment(view.bucket, seg, f)
        out.append(files)
    return out

