"""The two ends of a transfer: :func:`send_branch` and :func:`receive_branch`.

Push and pull use the same two functions; only who connects to whom differs (the pulling
pageserver connects out and receives, the pushing one connects out and sends). The
exchange, over one CopyBoth stream of frames (see :mod:`zenith.transfer.frames`)::

    sender                              receiver
    OFFER {chain, compression}  ->
                                <-      PLAN {status, sends, dry_run}
    per planned send:
    TIMELINE {timeline, after, upto} ->
    DATA ...                    ->      (each applied in one transaction)
                                <-      ACK {timeline_id, lsn}   (durable up to lsn)
    TIMELINE_END {upto, records, bytes, crc} ->
                                <-      ACK {timeline_id, lsn: upto}
                                <-      DONE {status, ...}       (after the name moved)

For a dry run the receiver still plans, the sender answers the PLAN with SUMMARY
{records, bytes} (what it would send) and nothing else travels.

The receiver publishes ``last_record_lsn`` only at frame boundaries (every record of each
LSN is in one frame), so an interrupted transfer leaves a consistent prefix and the next
run's plan starts from there. A mismatch at TIMELINE_END aborts before the final LSN is
published. An error on either side ends the stream with an ErrorResponse or a closed
connection, which the other side reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import google_crc32c
import zstandard

from zenith.errors import PushRejected, TransferAborted
from zenith.ids import TimelineId
from zenith.lsn import INVALID_LSN, Lsn
from zenith.storage import Record, Repository, TimelineInfo
from zenith.transfer.frames import (
    Frame,
    FrameType,
    cut_frames,
    decode_frame,
    decode_records,
    encode_frame,
    encode_json,
    encode_records,
)
from zenith.transfer.plan import Plan, Status, chain_from_json, chain_to_json, make_plan

PROTOCOL_VERSION = 1


class Channel(Protocol):
    """One CopyBoth stream: CopyData payloads in and out; ``None`` when the peer is done."""

    async def read(self) -> bytes | None: ...

    async def write(self, data: bytes) -> None: ...


@dataclass
class Progress:
    bytes_done: int = 0
    bytes_total: int = 0
    records_done: int = 0
    records_total: int = 0
    acked_lsn: Lsn = INVALID_LSN


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class TransferResult:
    """What a push or pull did, for the CLI to render."""

    status: str
    message: str
    timeline_id: TimelineId
    old_timeline_id: TimelineId | None
    old_lsn: Lsn | None
    new_lsn: Lsn
    records: int
    bytes: int
    seconds: float
    dry_run: bool

    def to_row(self) -> dict[str, str | None]:
        return {
            "status": self.status,
            "message": self.message,
            "timeline_id": str(self.timeline_id),
            "old_timeline_id": str(self.old_timeline_id) if self.old_timeline_id else None,
            "old_lsn": str(self.old_lsn) if self.old_lsn is not None else None,
            "new_lsn": str(self.new_lsn),
            "records": str(self.records),
            "bytes": str(self.bytes),
            "seconds": f"{self.seconds:.3f}",
            "dry_run": "true" if self.dry_run else "false",
        }


async def _expect(channel: Channel, *types: FrameType) -> Frame:
    data = await channel.read()
    if data is None:
        raise TransferAborted("the peer ended the transfer early")
    frame = decode_frame(data)
    if frame.type not in types:
        raise TransferAborted(
            f"expected {' or '.join(t.name for t in types)}, got a {frame.type.name} frame"
        )
    return frame


def _corrupt_hook() -> int:
    """Test-only fault injection: ``ZENITH_TEST_CORRUPT_FRAME=N`` flips a byte of the N-th
    DATA frame this process sends (so the receiver's CRC check can be seen to work)."""
    value = os.environ.get("ZENITH_TEST_CORRUPT_FRAME", "")
    return int(value) if value.isdigit() else 0


# -- sender ---------------------------------------------------------------------------------


async def send_branch(
    channel: Channel,
    repo: Repository,
    timeline: TimelineInfo,
    *,
    chain: list[TimelineInfo],
    compress: bool = True,
    progress: ProgressFn | None = None,
) -> TransferResult:
    """Offer ``timeline`` (whose ancestry, nearest first, is ``chain``) and send what the
    receiver asks for. Raises PushRejected when the receiver refuses."""
    started = time.monotonic()
    root_first = list(reversed(chain))
    await channel.write(encode_json(FrameType.OFFER, {
        "version": PROTOCOL_VERSION,
        "chain": chain_to_json(root_first),
        "compression": ["zstd"] if compress else [],
    }))
    plan = (await _expect(channel, FrameType.PLAN)).json()
    status = str(plan.get("status"))
    old = plan.get("old") or {}
    old_tid = TimelineId.parse(old["timeline_id"]) if old.get("timeline_id") else None
    old_lsn = Lsn.parse(old["last_record_lsn"]) if old.get("last_record_lsn") else None
    sends = plan.get("sends") or []
    by_id = {t.timeline_id: t for t in root_first}
    state = Progress()
    ranges: list[tuple[TimelineInfo, Lsn, Lsn]] = []
    try:
        for s in sends:
            tl = by_id[TimelineId.parse(s["timeline_id"])]
            after, upto = Lsn.parse(s["after"]), Lsn.parse(s["upto"])
            if not tl.start_lsn <= after <= upto <= tl.last_record_lsn:
                raise ValueError("range outside the timeline")
            ranges.append((tl, after, upto))
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferAborted(f"the receiver's plan is malformed: {exc}") from exc
    for tl, after, upto in ranges:
        n, size = await asyncio.to_thread(repo.count_records, tl.timeline_id, after, upto)
        state.records_total += n
        state.bytes_total += size

    def result(records: int, nbytes: int, message: str) -> TransferResult:
        return TransferResult(status, message, timeline.timeline_id, old_tid, old_lsn,
                              timeline.last_record_lsn, records, nbytes,
                              time.monotonic() - started, bool(plan.get("dry_run")))

    if status == Status.REJECTED.value:
        raise PushRejected(str(plan.get("message")))
    if status == Status.UP_TO_DATE.value:
        return result(0, 0, str(plan.get("message")))
    if plan.get("dry_run"):
        await channel.write(encode_json(FrameType.SUMMARY, {
            "records": state.records_total, "bytes": state.bytes_total}))
        return result(state.records_total, state.bytes_total, str(plan.get("message")))

    compressor = zstandard.ZstdCompressor(level=1) if plan.get("compression") == "zstd" else None
    acks: asyncio.Queue[Frame] = asyncio.Queue()

    async def read_acks() -> Frame:
        """Read ACKs (progress) until DONE; raises what the receiver raised."""
        while True:
            frame = await _expect(channel, FrameType.ACK, FrameType.DONE)
            if frame.type is FrameType.DONE:
                return frame
            ack = frame.json()
            state.acked_lsn = Lsn.parse(str(ack.get("lsn", "0/0")))
            await acks.put(frame)

    reader = asyncio.create_task(read_acks())

    async def write(data: bytes) -> None:
        """Write, unless the receiver already failed: then raise what it said."""
        if reader.done():
            reader.result()  # raises the receiver's error
            raise TransferAborted("the receiver ended the transfer early")
        try:
            await channel.write(data)
        except Exception:
            if reader.done() and reader.exception() is not None:
                raise reader.exception() from None  # type: ignore[misc]
            raise

    try:
        corrupt_at = _corrupt_hook()
        frames_sent = 0
        for tl, after, upto in ranges:
            await write(encode_json(FrameType.TIMELINE, {
                "timeline": chain_to_json([tl])[0], "after": str(after), "upto": str(upto),
                "total_records": state.records_total, "total_bytes": state.bytes_total,
            }))
            crc, records, nbytes = 0, 0, 0
            batches = _batches(repo, tl.timeline_id, after, upto)
            while True:
                chunk = await asyncio.to_thread(_next_frame, batches, compressor)
                if chunk is None:
                    break
                wire, body, count, payload = chunk
                frames_sent += 1
                if corrupt_at and frames_sent == corrupt_at:
                    wire = wire[:-1] + bytes([wire[-1] ^ 0xFF])
                crc = google_crc32c.extend(crc, body)
                await write(wire)
                records += count
                nbytes += payload
                state.records_done += count
                state.bytes_done += payload
                if progress is not None:
                    progress(state)
            await write(encode_json(FrameType.TIMELINE_END, {
                "timeline_id": str(tl.timeline_id), "upto": str(upto), "records": records,
                "bytes": nbytes, "crc32c": crc,
            }))
        done = (await reader).json()
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(BaseException):
            await reader  # retrieve its outcome: never an unobserved exception
    return result(state.records_done, state.bytes_done, str(done.get("message", "")))


def _batches(repo: Repository, tid: TimelineId, after: Lsn, upto: Lsn) -> Iterator[list[Record]]:
    return cut_frames(repo.iter_records(tid, after, upto))


def _next_frame(
    batches: Iterator[list[Record]], compressor: zstandard.ZstdCompressor | None
) -> tuple[bytes, bytes, int, int] | None:
    batch = next(batches, None)
    if batch is None:
        return None
    body = encode_records(batch)
    return (encode_frame(FrameType.DATA, body, compressor=compressor), body, len(batch),
            sum(len(r.payload) for r in batch))


# -- receiver -------------------------------------------------------------------------------

QUEUE_FRAMES = 16  # frames read ahead while the previous group commits (~16 MiB)
GROUP_BYTES = 16 * 1024 * 1024  # at most this much in one transaction


async def _pump(channel: Channel, queue: asyncio.Queue[Frame | BaseException]) -> None:
    """Read one timeline range's frames into ``queue`` up to its TIMELINE_END; a failure
    is queued too, after the good frames before it."""
    try:
        while True:
            frame = await _expect(channel, FrameType.DATA, FrameType.TIMELINE_END)
            await queue.put(frame)
            if frame.type is FrameType.TIMELINE_END:
                return
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        await queue.put(exc)


async def _take_group(
    queue: asyncio.Queue[Frame | BaseException],
) -> tuple[list[Frame], BaseException | None]:
    """Wait for one item, then take what else is queued (up to GROUP_BYTES)."""
    group: list[Frame] = []
    size = 0
    item = await queue.get()
    while True:
        if isinstance(item, BaseException):
            return group, item
        group.append(item)
        size += len(item.body)
        if item.type is FrameType.TIMELINE_END or size >= GROUP_BYTES or queue.empty():
            return group, None
        item = queue.get_nowait()


@dataclass(frozen=True)
class _Applied:
    commit_lsn: Lsn
    records: int
    payload: int


def _apply_frames(
    repo: Repository, tid: TimelineId, frames: list[Frame], after: Lsn, upto: Lsn
) -> _Applied:
    """Decode DATA frames and store their records in one transaction, publishing the last
    frame's commit LSN. Runs in a worker thread."""
    batch: list[Record] = []
    last = after
    for frame in frames:
        commit_lsn, records = decode_records(frame.body)
        if records and (records[0].lsn <= last or commit_lsn > upto):
            raise TransferAborted(
                f"DATA frame records {records[0].lsn}..{commit_lsn} fall outside ({last}, {upto}]"
            )
        batch.extend(records)
        last = max(last, commit_lsn)
    repo.put_records(tid, batch, last)
    return _Applied(last, len(batch), sum(len(r.payload) for r in batch))


async def receive_branch(
    channel: Channel,
    repo: Repository,
    dest_name: str,
    *,
    pushing: bool,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> TransferResult:
    """Receive into branch ``dest_name``: answer the offer with a plan, apply frames, then
    move the name. ``pushing`` says whether the peer is pushing to us (for the wording and
    rules of DESIGN §6). Raises PushRejected when the plan rejects."""
    started = time.monotonic()
    offer = (await _expect(channel, FrameType.OFFER)).json()
    if offer.get("version") != PROTOCOL_VERSION:
        raise TransferAborted(f"unsupported transfer protocol version {offer.get('version')!r}")
    chain = chain_from_json(offer.get("chain"))
    plan: Plan = await asyncio.to_thread(
        make_plan, repo, dest_name, chain, pushing=pushing, force=force
    )
    reply = plan.to_json(dry_run)
    compressions = offer.get("compression")
    reply["compression"] = "zstd" if isinstance(compressions, list) and "zstd" in compressions \
        else None
    await channel.write(encode_json(FrameType.PLAN, reply))
    source = plan.source
    old = plan.old

    def result(records: int, nbytes: int) -> TransferResult:
        return TransferResult(plan.status.value, plan.message, source.timeline_id,
                              old.timeline_id if old else None,
                              old.last_record_lsn if old else None, source.last_record_lsn,
                              records, nbytes, time.monotonic() - started, dry_run)

    if plan.status is Status.REJECTED:
        raise PushRejected(plan.message, hint="nothing was changed")
    if plan.status is Status.UP_TO_DATE:
        return result(0, 0)
    if dry_run:
        summary = (await _expect(channel, FrameType.SUMMARY)).json()
        records, nbytes = summary.get("records"), summary.get("bytes")
        if not isinstance(records, int) or not isinstance(nbytes, int):
            raise TransferAborted("malformed SUMMARY frame")
        return result(records, nbytes)

    state = Progress()
    for send in plan.sends:
        head = (await _expect(channel, FrameType.TIMELINE)).json()
        if head.get("timeline", {}).get("timeline_id") != str(send.timeline.timeline_id) or \
                head.get("after") != str(send.after) or head.get("upto") != str(send.upto):
            raise TransferAborted("the sender sent another range than the plan asked for")
        for field, key in (("records_total", "total_records"), ("bytes_total", "total_bytes")):
            value = head.get(key)
            if isinstance(value, int) and value >= 0:
                setattr(state, field, value)
        tl = send.timeline
        if send.create:
            await asyncio.to_thread(
                repo.create_timeline, tl.timeline_id,
                (tl.ancestor_id, tl.ancestor_lsn) if tl.ancestor_id and tl.ancestor_lsn
                is not None else None,
                min_readable_lsn=tl.min_readable_lsn,
            )
        crc, records, nbytes = 0, 0, 0
        last = send.after
        queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue(maxsize=QUEUE_FRAMES)
        pump = asyncio.create_task(_pump(channel, queue))
        try:
            while True:
                group, failure = await _take_group(queue)
                data = [f for f in group if f.type is FrameType.DATA]
                if data:
                    # One transaction for every frame that arrived while the last one
                    # committed: the commit rate follows fsync's latency, not the frame rate.
                    applied = await asyncio.to_thread(
                        _apply_frames, repo, tl.timeline_id, data, last, send.upto
                    )
                    last = applied.commit_lsn
                    records += applied.records
                    nbytes += applied.payload
                    for f in data:
                        crc = google_crc32c.extend(crc, f.body)
                    state.records_done += applied.records
                    state.bytes_done += applied.payload
                    state.acked_lsn = last
                    await channel.write(encode_json(FrameType.ACK, {
                        "timeline_id": str(tl.timeline_id), "lsn": str(last)}))
                    if progress is not None:
                        progress(state)
                if failure is not None:
                    raise failure
                if group and group[-1].type is FrameType.TIMELINE_END:
                    frame = group[-1]
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        end = frame.json()
        if (end.get("upto") != str(send.upto) or end.get("records") != records
                or end.get("bytes") != nbytes or end.get("crc32c") != crc):
            raise TransferAborted(
                f"timeline {tl.timeline_id}: the end frame does not match what arrived "
                f"({records} records, {nbytes} bytes); kept everything up to {last}"
            )
        await asyncio.to_thread(repo.put_records, tl.timeline_id, [], send.upto)
        await channel.write(encode_json(FrameType.ACK, {
            "timeline_id": str(tl.timeline_id), "lsn": str(send.upto)}))

    await asyncio.to_thread(repo.set_branch, dest_name, source.timeline_id)
    outcome = result(state.records_done, state.bytes_done)
    await channel.write(encode_json(FrameType.DONE, outcome.to_row()))
    return outcome
