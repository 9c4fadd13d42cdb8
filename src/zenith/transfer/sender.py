"""The sending end of a push or pull: :func:`send_branch`.

Push and pull both run it (the pushing pageserver sends; for a pull, the remote one does).
Its loop, over the exchange in ``messages.py``: offer the chain, prove the hashes the
receiver asks for, read the plan, then stream each planned range and wait for DONE. The
receiver decides everything; the sender checks that what it is asked for is its own
history, and reads its records off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from zenith.errors import PushRejected, TransferAborted
from zenith.storage import Record, Repository, TimelineInfo
from zenith.transfer.channel import (
    Channel,
    read_message,
    read_raw,
    send,
    write_raw,
)
from zenith.transfer.frames import (
    FRAME_TARGET,
    AdaptiveCompressor,
    cut_frames,
    decode_frame,
    encode_frame,
    encode_records,
)
from zenith.transfer.messages import (
    DEFAULT_TIMEOUT,
    Ack,
    Ask,
    Done,
    FrameType,
    Offer,
    PlanMsg,
    Progress,
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

#: An ACK or DONE is small; anything larger from the receiver is refused unread.
MAX_ACK: Final = 16 * 1024


async def send_branch(
    channel: Channel,
    repo: Repository,
    chain: list[TimelineInfo],
    *,
    compress: bool = True,
    progress: ProgressFn | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    frame_target: int = FRAME_TARGET,
    offload: Offload = to_thread,
) -> TransferResult:
    """Offer the timeline ``chain[0]`` (``chain``: it and its ancestors, nearest first, as
    ``Repository.ancestry`` gives them) and send what the receiver asks for. Raises
    PushRejected when the receiver refuses, TransferAborted/PeerTimeout when it misbehaves.
    ``offload`` runs the reading steps in a thread."""
    with contextlib.ExitStack() as planned, contextlib.ExitStack() as offered:
        # What is offered stays sendable until the plan says what will be sent: no GC
        # moves a horizon of the chain meanwhile. The chain is read again under the holds:
        # a GC that ran since the caller read it moved readable starts it does not show.
        for tl in chain:
            offered.enter_context(repo.hold_history(tl.timeline_id, tl.start_lsn))

        def narrow(ranges: list[RangeRequest]) -> None:
            """Once planned, hold only where each range starts (GC may collect what the
            receiver does not need while a long transfer runs), then let the rest go."""
            for request in ranges:
                planned.enter_context(repo.hold_history(request.timeline_id, request.after))
            offered.close()

        fresh = await offload(repo.ancestry, chain[0].timeline_id)
        return await _send_branch(channel, repo, fresh, compress=compress, progress=progress,
                                  timeout=timeout, frame_target=frame_target, offload=offload,
                                  narrow=narrow)


async def _send_branch(
    channel: Channel,
    repo: Repository,
    chain: list[TimelineInfo],
    *,
    compress: bool,
    progress: ProgressFn | None,
    timeout: float,
    frame_target: int,
    offload: Offload,
    narrow: Callable[[list[RangeRequest]], None],
) -> TransferResult:
    started = time.monotonic()
    offered = tuple(reversed(chain))
    source = offered[-1]
    await send(channel, Offer(offered, ("zstd",) if compress else ()), timeout)
    ask = await read_message(channel, Ask, timeout)
    since = None
    if ask.since_time is not None:  # the receiver's window, in time: we know the LSN
        since = await offload(repo.commit_lsn_at, source.timeline_id, ask.since_time)
    proof = Proof(tuple(await offload(_prove, repo, offered, ask)), since)
    await send(channel, proof, timeout)
    # The receiver may first wait for another transfer of the same branch to finish.
    plan = await read_message(channel, PlanMsg, 2 * timeout)
    ranges = _check_ranges(plan, offered)
    narrow(ranges)

    state = Progress()
    for request in ranges:
        if request.base:
            continue  # as many images as keys: counted as they go
        n, size = await offload(
            repo.count_records, request.timeline_id, request.after, request.upto
        )
        skipped = request.resume.count if request.resume else 0
        state.records_total += max(0, n - skipped)
        state.bytes_total += size

    def result(records: int, nbytes: int) -> TransferResult:
        return plan.result(source, records, nbytes, time.monotonic() - started)

    if plan.status is Status.REJECTED:
        raise PushRejected(plan.message, hint="nothing was changed")
    if plan.status is Status.UP_TO_DATE:
        return result(0, 0)
    if plan.dry_run:
        await send(channel, Summary(state.records_total, state.bytes_total), timeout)
        return result(state.records_total, state.bytes_total)

    compressor = AdaptiveCompressor() if plan.compression == "zstd" else None
    sent = _Sent(ranges=len(ranges))
    reader = asyncio.create_task(_read_acks(channel, state, sent, timeout))
    try:
        for request in ranges:
            await _send_range(channel, repo, request, state, sent, compressor, reader,
                              progress, frame_target, timeout, offload)
        done = await reader
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(BaseException):
            await reader  # retrieve its outcome: never an unobserved exception
    # Our own counts (what we sent); the receiver's words for what happened.
    return dataclasses.replace(result(state.records_done, state.bytes_done),
                               message=done.result.message)


def _prove(repo: Repository, chain: tuple[TimelineInfo, ...], ask: Ask) -> list[bytes]:
    """The history hash at each asked point, which must lie within our offered history."""
    offered = {t.timeline_id: t for t in chain}
    if len(ask.points) > len(chain):
        raise TransferAborted("the receiver asked for more proofs than timelines offered")
    hashes = []
    for point in ask.points:
        tl = offered.get(point.timeline_id)
        if tl is None or not tl.start_lsn <= point.lsn <= tl.last_record_lsn:
            raise TransferAborted(
                f"the receiver asked for a proof outside the offer ({point.timeline_id} "
                f"at {point.lsn})"
            )
        hashes.append(repo.history_hash(point.timeline_id, point.lsn))
    return hashes


def _check_ranges(plan: PlanMsg, chain: tuple[TimelineInfo, ...]) -> list[RangeRequest]:
    """The planned ranges must be parts of the offered timelines that we hold, each asked
    at most once (a base may come first), in the chain's order (ancestors first)."""
    order = {t.timeline_id: i for i, t in enumerate(chain)}
    last, after_base = -1, False
    for r in plan.ranges:
        i = order.get(r.timeline_id)
        if i is None or (i <= last and not (i == last and after_base and not r.base)):
            raise TransferAborted(f"the receiver's plan asks for timeline {r.timeline_id} "
                                  "out of the offer or out of order")
        last, after_base = i, r.base
        tl = chain[i]
        if not tl.start_lsn <= r.after <= r.upto <= tl.last_record_lsn:
            raise TransferAborted(f"the receiver's plan asks for ({r.after}, {r.upto}] of "
                                  f"timeline {r.timeline_id}, outside its history")
        if r.base and r.after < max(tl.min_readable_lsn, tl.history_start):
            raise TransferAborted(f"the receiver's plan asks for the state of timeline "
                                  f"{r.timeline_id} at {r.after}, where it is not readable")
        if not r.base and r.after < r.upto and r.after < tl.history_start:
            raise TransferAborted(f"the receiver's plan asks for records of timeline "
                                  f"{r.timeline_id} after {r.after}; this side holds them "
                                  f"from {tl.history_start} on")
    return list(plan.ranges)


@dataclass
class _Sent:
    """What went out, to bound what may come back: at most one ACK per DATA frame and
    one per range end (a receiver flooding ACKs would otherwise keep our loop busy)."""

    frames: int = 0
    ranges: int = 0
    acks: int = 0


async def _read_acks(channel: Channel, state: Progress, sent: _Sent, timeout: float) -> Done:
    """Read ACKs (progress) until DONE; raises what the receiver raised."""
    while True:
        data = await read_raw(channel, timeout)
        if len(data) > MAX_ACK:
            raise TransferAborted(f"the receiver sent a message of {len(data)} bytes")
        frame = decode_frame(data)
        if frame.type is FrameType.DONE:
            return frame.message(Done)
        state.acked_lsn = frame.message(Ack).lsn
        sent.acks += 1
        if sent.acks > sent.frames + sent.ranges:
            raise TransferAborted("the receiver acknowledged more than was sent")


async def _write(channel: Channel, data: bytes, reader: asyncio.Task[Done],
                 timeout: float) -> None:
    """Write, unless the receiver already failed or finished: then raise what it said."""
    if reader.done():
        reader.result()  # raises the receiver's error
        raise TransferAborted("the receiver ended the transfer early")
    try:
        await write_raw(channel, data, timeout)
    except Exception:
        if reader.done() and reader.exception() is not None:
            raise reader.exception() from None  # type: ignore[misc]
        raise


async def _send_range(
    channel: Channel,
    repo: Repository,
    request: RangeRequest,
    state: Progress,
    sent: _Sent,
    compressor: AdaptiveCompressor | None,
    reader: asyncio.Task[Done],
    progress: ProgressFn | None,
    frame_target: int,
    timeout: float,
    offload: Offload,
) -> None:
    await _write(channel, encode_frame(FrameType.RANGE, Range(
        request, state.records_total, state.bytes_total).encode()), reader, timeout)
    records, nbytes = 0, 0
    # A base's hash is known before its records go out (refused early if it is not).
    digest = await offload(repo.history_hash, request.timeline_id, request.upto) \
        if request.base else None
    if request.base:
        # What a read at the base needs, as stored (no redo here or there).
        source: Iterator[Record] = repo.base_records(request.timeline_id, request.after)
    else:
        source = repo.iter_records(request.timeline_id, request.after, request.upto,
                                   skip=request.resume)
    batches = cut_frames(source, frame_target)
    while True:
        chunk = await offload(_next_frame, batches, compressor)
        if chunk is None:
            break
        wire, count, payload = chunk
        sent.frames += 1
        await _write(channel, wire, reader, timeout)
        records += count
        nbytes += payload
        state.records_done += count
        state.bytes_done += payload
        if progress is not None:
            progress(state)
    if digest is None:
        digest = await offload(repo.history_hash, request.timeline_id, request.upto)
    end = RangeEnd(request.timeline_id, request.upto, records, nbytes, digest)
    await _write(channel, encode_frame(FrameType.RANGE_END, end.encode()), reader, timeout)


def _next_frame(
    batches: Iterator[list[Record]], compressor: AdaptiveCompressor | None
) -> tuple[bytes, int, int] | None:
    batch = next(batches, None)
    if batch is None:
        return None
    body = encode_records(batch)
    wire = compressor.frame(FrameType.DATA, body) if compressor is not None \
        else encode_frame(FrameType.DATA, body)
    return (wire, len(batch),
            sum(len(r.payload) for r in batch))
