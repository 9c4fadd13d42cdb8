"""The frames of a transfer: a sans-I/O codec shared by push and pull.

Each CopyData message of a transfer carries exactly one frame::

    type u8 | flags u8 | reserved u16 | body_len u32 | raw_len u32 | crc32c u32 | body

``crc32c`` covers the body as sent (compressed or not), so corruption is caught before
anything is decompressed or parsed. ``raw_len`` is the body's size once decompressed: it
is bounded, and a zstd body must declare exactly that content size, before any memory is
given to it. Control frames carry the JSON of a message (``messages.py``); DATA frames
carry records in stored order::

    DATA body: count u32 | count x record
    record:    key 18B | lsn u64 | kind u8 | len u32 | payload

A DATA frame may end anywhere between two records, inside one LSN too (a base-backup
import puts a whole cluster at one LSN); the receiver publishes only LSNs it holds whole.
"""

from __future__ import annotations

import builtins
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import google_crc32c
import zstandard

from zenith.errors import TransferAborted
from zenith.pgwire.messages import DEFAULT_MAX_MESSAGE_SIZE
from zenith.storage import KEY_SIZE, Record, RecordKind, checked_record
from zenith.transfer.messages import MAX_JSON, FrameType, M, Message, decode

HEADER: Final = struct.Struct(">BBHIII")
RECORD_HEADER: Final = struct.Struct(f">{KEY_SIZE}sQBI")
DATA_HEADER: Final = struct.Struct(">I")
#: Bound on a frame's body, sent and decompressed: what one CopyData message can carry.
MAX_FRAME: Final = DEFAULT_MAX_MESSAGE_SIZE - 1024
#: Control frames carry one JSON message: bounded before their CRC is even computed.
MAX_CONTROL: Final = MAX_JSON + 1024
FRAME_TARGET: Final = 1024 * 1024  # cut DATA frames at about this many payload bytes
FLAG_ZSTD: Final = 0x01
_KINDS: Final = {k.value: k for k in RecordKind}


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: bytes  # decompressed

    def message(self, cls: builtins.type[M]) -> M:
        """This frame as control message ``cls`` (checked: see ``messages.decode``)."""
        return decode(cls, self.type, self.body)


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


class AdaptiveCompressor:
    """zstd for DATA frames while it pays. Compressing incompressible pages (random or
    already-compressed data) costs the sender a core for nothing, so after a frame that did
    not shrink by a tenth the next ``backoff`` frames go uncompressed, then it tries again."""

    def __init__(self, level: int = 1, backoff: int = 16) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level)
        self.backoff = backoff
        self.skip = 0

    def frame(self, ftype: FrameType, body: bytes) -> bytes:
        if self.skip:
            self.skip -= 1
            return encode_frame(ftype, body)
        wire = encode_frame(ftype, body, compressor=self.compressor)
        if not wire[1] & FLAG_ZSTD:
            self.skip = self.backoff
        return wire


def encode_message(message: Message) -> bytes:
    return encode_frame(message.TYPE, message.encode())


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
    if kind is not FrameType.DATA and max(raw_len, body_len) > MAX_CONTROL:
        raise TransferAborted(f"{kind.name} frame of {max(raw_len, body_len)} bytes exceeds "
                              f"{MAX_CONTROL}")
    wire = bytes(memoryview(data)[HEADER.size :])
    if google_crc32c.value(wire) != crc:
        raise TransferAborted(f"{kind.name} frame failed its CRC32C check")
    if flags & FLAG_ZSTD:
        # A zstd frame may declare its content size, and the decompressor then allocates
        # that much whatever ``max_output_size`` says: it must be the header's raw_len.
        try:
            declared = zstandard.frame_content_size(wire)
        except zstandard.ZstdError as exc:
            raise TransferAborted(f"{kind.name} frame is not zstd: {exc}") from exc
        if declared not in (raw_len, -1):
            raise TransferAborted(
                f"{kind.name} frame declares {declared} bytes decompressed, header says {raw_len}"
            )
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
    """A DATA body."""
    parts = [DATA_HEADER.pack(len(records))]
    pack = RECORD_HEADER.pack
    for rec in records:
        parts.append(pack(rec.key, rec.lsn, rec.kind, len(rec.payload)))
        parts.append(rec.payload)
    return b"".join(parts)


def decode_records(body: bytes, *, lsn_order: bool = True) -> list[Record]:
    """A DATA body to its records, in LSN order (``lsn_order=False``: a shallow copy's
    base, in key order); every length and value is checked."""
    if len(body) < DATA_HEADER.size:
        raise TransferAborted("truncated DATA frame")
    (count,) = DATA_HEADER.unpack_from(body)
    pos = DATA_HEADER.size
    records: list[Record] = []
    previous = 0
    size = RECORD_HEADER.size
    make = checked_record
    if count == 0:
        raise TransferAborted("a DATA frame without records")
    if count * size > len(body):
        raise TransferAborted(f"a DATA frame of {len(body)} bytes cannot hold {count} records")
    for _ in range(count):
        if pos + size > len(body):
            raise TransferAborted("truncated record header in DATA frame")
        key, lsn, kind, length = RECORD_HEADER.unpack_from(body, pos)
        pos += size
        if pos + length > len(body):
            raise TransferAborted("truncated record payload in DATA frame")
        if kind not in _KINDS or (lsn < previous and lsn_order) or lsn == 0:
            raise TransferAborted(f"invalid record (kind {kind}, lsn {lsn}) in DATA frame")
        # Fields checked above and by the layout (key and LSN sizes): storage checks the
        # rest (LSN range, payload) when it keeps the record.
        records.append(make(key, lsn, kind, body[pos : pos + length]))
        pos += length
        previous = lsn
    if pos != len(body):
        raise TransferAborted("trailing bytes after the records of a DATA frame")
    return records


def cut_frames(records: Iterable[Record], target: int = FRAME_TARGET) -> Iterator[list[Record]]:
    """Group records into batches of about ``target`` payload bytes, cut anywhere (a batch
    may end inside one LSN): memory stays bounded whatever the size of one LSN."""
    batch: list[Record] = []
    size = 0
    for rec in records:
        batch.append(rec)
        size += len(rec.payload) + RECORD_HEADER.size
        if size >= target:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
