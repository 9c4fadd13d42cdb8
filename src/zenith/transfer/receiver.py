"""The receiving end of a push or pull: :func:`receive_branch`.

Its loop, over the exchange in ``messages.py``: read the offer, ask the sender to prove its
history where ours overlaps it, plan (``plan.py``), lock the destination name and the
timelines the plan writes and plan again under the locks, then for each planned range
apply the DATA frames in groups — each group one transaction, ACKed once durable — check
the range's end against what arrived (counts and history hash), and finally move the
branch name if it still points where the plan found it.

Durability: a group's greatest LSN may continue in the next frame, so it is stored as the
pending cursor and only the LSNs before it are published; an interrupted transfer leaves
a consistent ``last_record_lsn`` plus the cursor, and the next plan resumes after it.
Bounds (DESIGN §12): frames are bounded by the codec, the read-ahead by bytes, the peer's
silence by ``timeout``; checks, decompression and storage run in worker threads (storage
steps through the caller's ``offload``, see ``offload.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from zenith.errors import ObjectInUse, PushRejected, TransferAborted, UnknownTimeline
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Cursor, Record, RecordKind, Repository
from zenith.storage.history import record_digest
from zenith.transfer.channel import (
    Channel,
    TransferLocks,
    read_message,
    read_raw,
    send,
)
from zenith.transfer.frames import HEADER, Frame, decode_frame, decode_records
from zenith.transfer.messages import (
    DEFAULT_TIMEOUT,
    Ack,
    Ask,
    Done,
    FrameType,
    Offer,
    Point,
    Progress,
    ProgressFn,
    Proof,
    Range,
    RangeEnd,
    Status,
    Summary,
    TransferResult,
)
from zenith.transfer.offload import Offload, to_thread
from zenith.transfer.plan import Depth, Plan, Send, make_plan, points_to_prove

#: Read-ahead while the previous group commits, and the most one transaction takes, in
#: decompressed bytes (a single frame larger than either still passes, alone): the
#: receiver's memory is bounded by about their sum.
READ_AHEAD_BYTES = 24 * 1024 * 1024
GROUP_BYTES = 16 * 1024 * 1024


async def receive_branch(
    channel: Channel,
    repo: Repository,
    dest_name: str,
    *,
    pushing: bool,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    locks: TransferLocks | None = None,
    offload: Offload = to_thread,
    depth: Depth | None = None,
    principal: str | None = None,
) -> TransferResult:
    """Receive into branch ``dest_name``. ``pushing`` says whether the peer is pushing to
    us (for the wording and rules of DESIGN §6). Raises PushRejected when the plan
    rejects; anything the sender does wrong is TransferAborted with nothing published
    beyond what was acknowledged. ``offload`` runs the storage steps in a thread.
    ``depth``: how much history a new copy gets (None: all the sender has).
    ``principal``: who sends (``user NAME``, ``origin HOST:PORT``): a shallow copy keeps
    it, and only the same principal's transfers build on that copy (its base is outside
    the history hash)."""
    started = time.monotonic()
    offer = await read_message(channel, Offer, timeout)
    # Negotiate without locks (a peer that goes silent meanwhile holds nothing), then lock
    # what the plan writes — the destination name and the timelines it sends — and check
    # under the locks that nothing changed meanwhile.
    points, mismatched, since = await _prove(channel, repo, offer, depth, timeout, offload)

    def planned() -> Plan:
        return make_plan(repo, dest_name, offer.chain, mismatched, pushing=pushing,
                         force=force, since=since, depth=depth, principal=principal)

    plan = await offload(planned)
    keys = [f"branch:{dest_name}",
            *dict.fromkeys(f"timeline:{s.request.timeline_id}" for s in plan.sends)]
    writes = plan.status not in (Status.REJECTED, Status.UP_TO_DATE) and not dry_run
    async with (locks or TransferLocks()).hold(keys if writes else [], wait=timeout):
        if writes:
            plan = await _recheck(repo, dest_name, offer, points, plan, planned, offload)
        answer = plan.to_message(dry_run, "zstd" if "zstd" in offer.compression else None)
        await send(channel, answer, timeout)

        def result(records: int, nbytes: int) -> TransferResult:
            return answer.result(plan.source, records, nbytes, time.monotonic() - started)

        if plan.status is Status.REJECTED:
            raise PushRejected(plan.message, hint="nothing was changed")
        if plan.status is Status.UP_TO_DATE:
            return result(0, 0)
        if dry_run:
            summary = await read_message(channel, Summary, timeout)
            return result(summary.records, summary.bytes)

        state = Progress()
        for item in plan.sends:
            await _receive_range(channel, repo, item, state, progress, timeout, offload,
                                 principal)
        # Only if the name still points where the plan found it (a local write may have
        # forked it meanwhile): never undo someone else's move.
        await offload(repo.move_branch, dest_name, plan.source.timeline_id,
                      plan.old.timeline_id if plan.old else None)
        outcome = result(state.records_done, state.bytes_done)
        await send(channel, Done(outcome), timeout)
        return outcome


async def _prove(
    channel: Channel, repo: Repository, offer: Offer, depth: Depth | None, timeout: float,
    offload: Offload,
) -> tuple[list[Point], dict[TimelineId, Lsn], Lsn | None]:
    """Ask for proofs where our history overlaps the offer; the points asked, the
    timelines whose proof differs from our own hash, and the oldest LSN ``depth`` asks
    a new copy for (None: all)."""
    points = await offload(points_to_prove, repo, offer.chain)
    since_time = max(0.0, time.time() - depth.seconds) \
        if depth is not None and depth.seconds is not None else None
    await send(channel, Ask(tuple(points), since_time), timeout)
    proof = await read_message(channel, Proof, timeout)
    since = depth.since(offer.source.last_record_lsn, proof.since) \
        if depth is not None else None
    if len(proof.hashes) != len(points):
        raise TransferAborted(f"asked for {len(points)} proofs, got {len(proof.hashes)}")
    ours = await offload(
        lambda: [repo.history_hash(p.timeline_id, p.lsn) for p in points])
    mismatched = {p.timeline_id: p.lsn
                  for p, mine, theirs in zip(points, ours, proof.hashes, strict=True)
                  if mine != theirs}
    return points, mismatched, since


async def _recheck(
    repo: Repository, dest_name: str, offer: Offer, points: list[Point], plan: Plan,
    planned: Callable[[], Plan], offload: Offload,
) -> Plan:
    """Under the locks, plan again; if what we asked the peer to prove changed meanwhile
    (another transfer, a local write), the peer must start over."""
    now = await offload(points_to_prove, repo, offer.chain)
    again = await offload(planned)
    # The same proof points: the proofs still hold, and the new plan (say, "diverged" now
    # that another push created the branch) is sound — if it writes only what we locked.
    locked = {s.request.timeline_id for s in plan.sends}
    if now != points or not {s.request.timeline_id for s in again.sends} <= locked:
        raise ObjectInUse(
            f'branch "{dest_name}" or its timelines changed while this transfer negotiated',
            hint="run the command again",
        )
    return again


#: A DATA frame being checked, decoded and hashed in the decoding thread.
_Decoded = concurrent.futures.Future[tuple[list[Record], list[int]]]
_Item = _Decoded | Frame | BaseException


def _decode_base(data: bytes) -> tuple[list[Record], list[int]]:
    """Check and decode one DATA frame of a base (records in key order, not hashed)."""
    return decode_records(decode_frame(data).body, lsn_order=False), []


def _decode_data(data: bytes) -> tuple[list[Record], list[int]]:
    """Check and decode one DATA frame, and compute its records' history digests (in the
    decoding thread, beside the thread that stores the previous group)."""
    records = decode_records(decode_frame(data).body)
    return records, [record_digest(r.key, r.lsn, r.kind, r.payload) for r in records]


class _ReadAhead:
    """Frames read ahead of the storing thread, bounded by their DECOMPRESSED size (one
    frame always fits; zstd shrinks pages tenfold, so wire bytes would bound nothing): DATA
    frames as they are being decoded, then the RANGE_END, or the error."""

    def __init__(self) -> None:
        self.items: list[tuple[_Item, int]] = []
        self.size = 0
        self.changed = asyncio.Event()

    async def put(self, item: _Item, size: int = 0) -> None:
        while self.size and self.size + size > READ_AHEAD_BYTES:
            self.changed.clear()
            await self.changed.wait()
        self.items.append((item, size))
        self.size += size
        self.changed.set()

    async def take_group(self) -> list[_Item]:
        """Wait for something, then take what is there (up to GROUP_BYTES of DATA)."""
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        group: list[_Item] = []
        size = 0
        while self.items and (not group or size + self.items[0][1] <= GROUP_BYTES):
            item, n = self.items.pop(0)
            group.append(item)
            size += n
            self.size -= n
            if not isinstance(item, concurrent.futures.Future):
                break
        self.changed.set()
        return group


async def _pump(channel: Channel, ahead: _ReadAhead, decoder: concurrent.futures.Executor,
                timeout: float, base: bool = False) -> None:
    """Read one range's frames up to its RANGE_END, handing each DATA frame to the
    decoding thread; a failure is queued after the good frames before it. Only the frame
    type is looked at here."""
    try:
        while True:
            data = await read_raw(channel, timeout)
            if len(data) >= HEADER.size and data[0] == FrameType.DATA:
                raw_len = HEADER.unpack_from(data)[4]  # checked (bounded) when decoded
                size = max(raw_len, len(data))
                await ahead.put(decoder.submit(_decode_base if base else _decode_data, data),
                                size)
                continue
            frame = decode_frame(data)
            if frame.type is not FrameType.RANGE_END:
                raise TransferAborted(f"expected DATA or RANGE_END, got a {frame.type.name} frame")
            await ahead.put(frame)
            return
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        await ahead.put(exc)


@dataclass
class _Applied:
    records: int
    payload: int
    last_lsn: Lsn  # greatest record LSN so far


def _apply(repo: Repository, tid: TimelineId, frames: list[_Decoded], after: Lsn, upto: Lsn,
           last: Lsn) -> tuple[_Applied, Lsn, Cursor | None]:
    """Check the decoded DATA frames' records and store them in one transaction, the last
    LSN left pending. Runs in a worker thread."""
    batch: list[Record] = []
    digests: list[int] = []
    top = last
    failure: TransferAborted | None = None
    for decoded in frames:
        try:
            records, hashes = decoded.result()
        except TransferAborted as exc:
            failure = exc  # keep the good frames before it
            break
        first, final = records[0].lsn, records[-1].lsn
        if first < top or first <= after or final > upto:
            failure = TransferAborted(
                f"DATA frame records {first}..{final} fall outside the range ({after}, {upto}] "
                f"or before records already received ({top})"
            )
            break
        batch.extend(records)
        digests.extend(hashes)
        top = final
    written = repo.put_records(tid, batch, partial=True, digests=digests)
    if failure is not None:
        raise failure
    return (_Applied(len(batch), sum(len(r.payload) for r in batch), top),
            written.last_record_lsn, written.pending)


def _create(repo: Repository, item: Send, principal: str | None) -> None:
    """Create the timeline a range starts (a shallow one for a base), after dropping what
    an interrupted shallow copy of it left (its base incomplete: never readable)."""
    tl, request = item.timeline, item.request
    with contextlib.suppress(UnknownTimeline):
        if not repo.get_timeline(tl.timeline_id).base_complete:
            repo.delete_timeline(tl.timeline_id)
    ancestor = (tl.ancestor_id, tl.ancestor_lsn) \
        if tl.ancestor_id is not None and tl.ancestor_lsn is not None else None
    if request.base:
        repo.create_shallow_timeline(tl.timeline_id, ancestor, request.after, source=principal)
    else:
        repo.create_timeline(tl.timeline_id, ancestor, min_readable_lsn=tl.min_readable_lsn,
                             received=True)


def _apply_base(repo: Repository, tid: TimelineId, frames: list[_Decoded], at: Lsn,
                after: tuple[bytes, int]) -> tuple[_Applied, tuple[bytes, int]]:
    """Check a base's decoded frames (records at or below ``at``, in (key, lsn) order past
    ``after``: each key's image and the deltas after it) and store them in one
    transaction; the last (key, lsn). Runs in a worker thread."""
    batch: list[Record] = []
    failure: TransferAborted | None = None
    for decoded in frames:
        try:
            records, _digests = decoded.result()
        except TransferAborted as exc:
            failure = exc
            break
        for rec in records:
            if rec.lsn > at or rec.kind is RecordKind.TOMBSTONE \
                    or (rec.key, int(rec.lsn)) <= after:
                failure = TransferAborted(
                    f"base of timeline {tid}: a {rec.kind.name.lower()} of key "
                    f"{rec.key.hex()} at {rec.lsn} is not a next record at or below {at}")
                break
            after = (rec.key, int(rec.lsn))
            batch.append(rec)
        if failure is not None:
            break
    repo.put_base(tid, batch)
    if failure is not None:
        raise failure
    return _Applied(len(batch), sum(len(r.payload) for r in batch), at), after


async def _receive_range(
    channel: Channel, repo: Repository, item: Send, state: Progress,
    progress: ProgressFn | None, timeout: float, offload: Offload, principal: str | None,
) -> None:
    request = item.request
    head = await read_message(channel, Range, timeout)
    if head.request != request:
        raise TransferAborted("the sender announced another range than the plan asked for")
    state.records_total, state.bytes_total = head.total_records, head.total_bytes
    if request.create:
        await offload(_create, repo, item, principal)
    records, nbytes = 0, 0
    end: RangeEnd | None = None
    last = request.resume.lsn if request.resume else request.after
    base_at = (b"", 0)  # a base's records come in (key, lsn) order
    ahead = _ReadAhead()
    decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zenith-decode")
    pump = asyncio.create_task(_pump(channel, ahead, decoder, timeout, request.base))
    try:
        while True:
            group = await ahead.take_group()
            data = [g for g in group if isinstance(g, concurrent.futures.Future)]
            if data:
                # One transaction for every frame that arrived while the last one
                # committed: the commit rate follows fsync's latency, not the frame rate.
                if request.base:
                    applied, base_at = await offload(
                        _apply_base, repo, request.timeline_id, data, request.after, base_at)
                    published, pending = request.after, None
                else:
                    applied, published, pending = await offload(
                        _apply, repo, request.timeline_id, data, request.after, request.upto,
                        last)
                last = applied.last_lsn
                records += applied.records
                nbytes += applied.payload
                state.records_done += applied.records
                state.bytes_done += applied.payload
                state.acked_lsn = published
                await send(channel, Ack(request.timeline_id, published, pending), timeout)
                if progress is not None:
                    progress(state)
            tail = group[-1]
            if isinstance(tail, BaseException):
                raise tail
            if isinstance(tail, Frame):
                end = tail.message(RangeEnd)
                break
    finally:
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        decoder.shutdown(wait=False, cancel_futures=True)
    assert end is not None
    if (end.timeline_id, end.upto) != (request.timeline_id, request.upto) \
            or (end.records, end.nbytes) != (records, nbytes):
        raise TransferAborted(
            f"timeline {request.timeline_id}: the range's end does not match what arrived "
            f"({records} records, {nbytes} bytes); kept everything acknowledged"
        )
    if request.base:
        # The base stands in for the history before it: its hash is the sender's there.
        await offload(repo.finish_base, request.timeline_id, end.hash)
    else:
        # Publish the range's end only if our records hash to what the sender's do there.
        await offload(
            repo.put_records, request.timeline_id, [], request.upto, expect_hash=end.hash)
    state.acked_lsn = request.upto
    await send(channel, Ack(request.timeline_id, request.upto), timeout)
