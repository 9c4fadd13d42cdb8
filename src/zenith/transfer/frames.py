"""The segment stream's frames: a sans-I/O codec shared by push and pull.

Each CopyData message of a transfer carries exactly one frame::

    type u8 | flags u8 | reserved u16 | body_len u32 | raw_len u32 | crc32c u32 | body

``crc32c`` covers the body as sent (compressed or not), so corruption is caught before
anything is decompressed or parsed. ``raw_len`` is the body's size once decompressed and is
bounded before any memory is given to it. Control frames carry JSON; DATA frames carry
records in LSN order::

    DATA body: commit_lsn u64 | count u32 | count x record
    record:    key 18B | lsn u64 | kind u8 | len u32 | payload

A DATA frame holds every record of each LSN it touches (frames are cut only between
LSNs), so ``commit_lsn`` (its greatest record LSN) is a consistent point to publish once
the frame is applied.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import google_crc32c
import zstandard

from zenith.errors import TransferAborted
from zenith.lsn import Lsn
from zenith.storage import KEY_SIZE, Record, RecordKind

HEADER: Final = struct.Struct(">BBHIII")
RECORD_HEADER: Final = struct.Struct(f">{KEY_SIZE}sQBI")
DATA_HEADER: Final = struct.Struct(">QI")
MAX_FRAME: Final = 64 * 1024 * 1024  # bound on body and raw sizes
FRAME_TARGET: Final = 1024 * 1024  # cut DATA frames at about this many payload bytes
FLAG_ZSTD: Final = 0x01
_KINDS: Final = {k.value: k for k in RecordKind}


class FrameType(IntEnum):
    OFFER = 1  # sender -> receiver: the source's timelines (JSON)
    PLAN = 2  # receiver -> sender: what to send, or why not (JSON)
    TIMELINE = 3  # sender: the records that follow belong to this timeline range (JSON)
    DATA = 4  # sender: records
    TIMELINE_END = 5  # sender: final LSN, counts and digest of the timeline's records (JSON)
    ACK = 6  # receiver: everything up to this LSN of this timeline is durable (JSON)
    DONE = 7  # receiver: the outcome, after the branch name moved (JSON)
    SUMMARY = 8  # sender, for a dry run: what it would send (JSON: records, bytes)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: bytes  # decompressed

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TransferAborted(f"{self.type.name} frame holds no valid JSON") from exc
        if not isinstance(value, dict):
            raise TransferAborted(f"{self.type.name} frame holds no JSON object")
        return value


def encode_frame(
    ftype: FrameType, body: bytes, *, compressor: zstandard.ZstdCompressor | None = None
) -> bytes:
    """One frame, compressed when a compressor is given and compression pays."""
    flags = 0
    wire = body
    if compressor is not None and len(body) > 256:
        packed = compressor.compress(body)
        if len(packed) < len(body) * 0.9:
            wire, flags = packed, FLAG_ZSTD
    if len(wire) > MAX_FRAME or len(body) > MAX_FRAME:
        raise TransferAborted(f"a frame of {len(body)} bytes exceeds {MAX_FRAME}")
    crc = google_crc32c.value(wire)
    return HEADER.pack(ftype, flags, 0, len(wire), len(body), crc) + wire


def encode_json(ftype: FrameType, value: dict[str, Any]) -> bytes:
    return encode_frame(ftype, json.dumps(value, separators=(",", ":")).encode())


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Check and unpack one frame (one CopyData message). Raises TransferAborted."""
    if len(data) < HEADER.size:
        raise TransferAborted(f"truncated frame: {len(data)} bytes")
    ftype, flags, _reserved, body_len, raw_len, crc = HEADER.unpack_from(data)
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise TransferAborted(f"unknown frame type {ftype}") from None
    if body_len != len(data) - HEADER.size:
        raise TransferAborted(
            f"{kind.name} frame says {body_len} bytes but carries {len(data) - HEADER.size}"
        )
    if raw_len > MAX_FRAME or flags & ~FLAG_ZSTD:
        raise TransferAborted(f"{kind.name} frame header is invalid")
    wire = bytes(memoryview(data)[HEADER.size :])
    if google_crc32c.value(wire) != crc:
        raise TransferAborted(f"{kind.name} frame failed its CRC32C check")
    if flags & FLAG_ZSTD:
        try:
            body = zstandard.ZstdDecompressor().decompress(wire, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise TransferAborted(f"{kind.name} frame does not decompress: {exc}") from exc
    else:
        body = wire
    if len(body) != raw_len:
        raise TransferAborted(f"{kind.name} frame is {len(body)} bytes, header says {raw_len}")
    return Frame(kind, body)


def encode_records(records: list[Record]) -> bytes:
    """A DATA body. The records must be in LSN order."""
    parts = [DATA_HEADER.pack(records[-1].lsn if records else 0, len(records))]
    pack = RECORD_HEADER.pack
    for rec in records:
        parts.append(pack(rec.key, rec.lsn, rec.kind, len(rec.payload)))
        parts.append(rec.payload)
    return b"".join(parts)


def decode_records(body: bytes) -> tuple[Lsn, list[Record]]:
    """A DATA body to ``(commit_lsn, records)``; every length and value is checked."""
    if len(body) < DATA_HEADER.size:
        raise TransferAborted("truncated DATA frame")
    commit_lsn, count = DATA_HEADER.unpack_from(body)
    pos = DATA_HEADER.size
    records: list[Record] = []
    previous = 0
    size = RECORD_HEADER.size
    for _ in range(count):
        if pos + size > len(body):
            raise TransferAborted("truncated record header in DATA frame")
        key, lsn, kind, length = RECORD_HEADER.unpack_from(body, pos)
        pos += size
        if pos + length > len(body):
            raise TransferAborted("truncated record payload in DATA frame")
        if kind not in _KINDS or lsn < previous or lsn == 0:
            raise TransferAborted(f"invalid record (kind {kind}, lsn {lsn}) in DATA frame")
        records.append(Record(key, Lsn(lsn), _KINDS[kind], body[pos : pos + length]))
        pos += length
        previous = lsn
    if pos != len(body):
        raise TransferAborted("trailing bytes after the records of a DATA frame")
    if records and records[-1].lsn != commit_lsn:
        raise TransferAborted("DATA frame's commit LSN is not its last record's")
    return Lsn(commit_lsn), records


def cut_frames(records: Iterable[Record], target: int = FRAME_TARGET) -> Iterator[list[Record]]:
    """Group records (in LSN order) into batches of about ``target`` payload bytes, cutting
    only between LSNs so each batch ends at a consistent point."""
    batch: list[Record] = []
    size = 0
    for rec in records:
        if size >= target and batch and rec.lsn != batch[-1].lsn:
            yield batch
            batch, size = [], 0
        batch.append(rec)
        size += len(rec.payload) + RECORD_HEADER.size
    if batch:
        yield batch
