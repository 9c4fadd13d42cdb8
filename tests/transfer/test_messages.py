"""The transfer's vocabulary and frames, without I/O: every message round-trips, and every
malformed, oversized or lying input is TransferAborted before memory is spent on it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith.errors import InvalidArgument, TransferAborted
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Cursor, Record, RecordKind, TimelineInfo
from zenith.transfer.frames import (
    HEADER,
    MAX_CONTROL,
    MAX_FRAME,
    cut_frames,
    decode_frame,
    decode_records,
    encode_frame,
    encode_message,
    encode_records,
)
from zenith.transfer.messages import (
    MAX_JSON,
    Ack,
    Ask,
    Done,
    FrameType,
    Message,
    Offer,
    PlanMsg,
    Point,
    Progress,
    Proof,
    Range,
    RangeEnd,
    RangeRequest,
    Status,
    Summary,
    TransferArgs,
    TransferResult,
    decode,
)

ROOT = TimelineInfo(TimelineId.generate(), None, None, Lsn(0x500), Lsn(0x100))
CHILD = TimelineInfo(TimelineId.generate(), ROOT.timeline_id, Lsn(0x300), Lsn(0x900), Lsn(0x300))
RESULT = TransferResult(Status.NEW, "new branch x", CHILD.timeline_id, None, None, Lsn(0x900),
                        12, 3456, 1.5, False)

MESSAGES: list[Message] = [
    Offer((ROOT, CHILD)),
    Offer((ROOT,), ()),
    # A shallow chain: the sender holds the child from 0x400 on, not its ancestor.
    Offer((dataclasses.replace(CHILD, collected_lsn=Lsn(0x400)),)),
    Ask((Point(ROOT.timeline_id, Lsn(0x300)),)),
    Ask((), 1.7e9),
    Proof((bytes(range(32)),)),
    Proof((), Lsn(0x480)),
    Range(RangeRequest(CHILD.timeline_id, Lsn(0x400), Lsn(0x400), True, base=True), 0, 0),
    PlanMsg(Status.FAST_FORWARD, "fast-forward", False, ROOT,
            (RangeRequest(CHILD.timeline_id, Lsn(0x300), Lsn(0x900), True),
             RangeRequest(ROOT.timeline_id, Lsn(0x100), Lsn(0x500), False,
                          Cursor(Lsn(0x200), 7, bytes(18)))), "zstd"),
    PlanMsg(Status.REJECTED, "no", True, None),
    Range(RangeRequest(CHILD.timeline_id, Lsn(0x300), Lsn(0x900), True), 5, 6),
    RangeEnd(CHILD.timeline_id, Lsn(0x900), 5, 6, b"\x01" * 32),
    Ack(CHILD.timeline_id, Lsn(0x800), Cursor(Lsn(0x900), 3, b"\x02" * 18)),
    Ack(CHILD.timeline_id, Lsn(0x900)),
    Summary(1, 2),
    Done(RESULT),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    frame = decode_frame(encode_message(message))
    assert frame.type is message.TYPE
    assert frame.message(type(message)) == message


def test_a_message_of_another_type_is_refused() -> None:
    frame = decode_frame(encode_message(Summary(1, 2)))
    with pytest.raises(TransferAborted, match="expected ACK, got a SUMMARY"):
        frame.message(Ack)


def _json(ftype: FrameType, value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize("cls, value", [
    (Offer, {"version": 1, "chain": [], "compression": []}),  # old version
    (Offer, {"version": 3, "chain": [], "compression": []}),  # empty chain
    (Offer, {"version": 3, "chain": [{"timeline_id": "zz"}], "compression": []}),
    (Offer, {"version": 3, "chain": [json.loads(Offer((CHILD,)).encode())["chain"][0],
                                     json.loads(Offer((ROOT,)).encode())["chain"][0]],
             "compression": []}),  # a root after a child
    (Offer, {"version": 3, "chain": [json.loads(Offer((ROOT,)).encode())["chain"][0]] * 2,
             "compression": []}),  # repeats
    (Offer, {"version": 3, "chain": [{**json.loads(Offer((ROOT,)).encode())["chain"][0],
                                      "history_from": "1/0"}],
             "compression": []}),  # history after its end
    (Offer, {"version": 3, "chain": [{**json.loads(Offer((CHILD,)).encode())["chain"][0],
                                      "ancestor_id": str(CHILD.timeline_id)}],
             "compression": []}),  # its own ancestor
    (Ack, {"timeline_id": str(ROOT.timeline_id), "lsn": "not an lsn"}),
    (Ack, {"timeline_id": str(ROOT.timeline_id), "lsn": 5}),
    (Summary, {"records": -1, "bytes": 0}),
    (Summary, {"records": True, "bytes": 0}),
    (Summary, {"records": 1}),
    (Summary, [1, 2]),
    (Proof, {"hashes": ["00" * 31]}),
    (Proof, {"hashes": ["zz" * 32]}),
    (PlanMsg, {"status": "merged", "message": "", "dry_run": False, "old": None, "ranges": []}),
    (PlanMsg, {"status": "new", "message": "x" * 5000, "dry_run": False, "old": None,
               "ranges": []}),
    (RangeEnd, {"timeline_id": str(ROOT.timeline_id), "upto": "0/1", "records": 0,
                "bytes": 0, "hash": "00"}),
    (Range, {"request": {"timeline_id": str(ROOT.timeline_id), "after": "0/9", "upto": "0/1",
                         "create": False, "resume": None}, "total_records": 0,
             "total_bytes": 0}),  # after > upto
    (Range, {"request": {"timeline_id": str(ROOT.timeline_id), "after": "0/1", "upto": "0/9",
                         "create": True, "resume": None, "base": True}, "total_records": 0,
             "total_bytes": 0}),  # a base is the state at one LSN
    (Range, {"request": {"timeline_id": str(ROOT.timeline_id), "after": "0/9", "upto": "0/9",
                         "create": False, "resume": None, "base": True}, "total_records": 0,
             "total_bytes": 0}),  # of a timeline it creates
])
def test_malformed_messages_are_refused(cls: type[Message], value: object) -> None:
    with pytest.raises(TransferAborted):
        decode(cls, cls.TYPE, _json(cls.TYPE, value))


def test_oversized_and_broken_json_is_refused() -> None:
    big = json.dumps({"records": 1, "bytes": 2, "pad": "x" * MAX_JSON}).encode()
    with pytest.raises(TransferAborted, match="exceeds"):
        decode(Summary, FrameType.SUMMARY, big)
    with pytest.raises(TransferAborted, match="no valid JSON"):
        decode(Summary, FrameType.SUMMARY, b"{" * 100_000)
    with pytest.raises(TransferAborted, match="no valid JSON"):
        decode(Summary, FrameType.SUMMARY, b"\xff\xfe")


def test_frame_header_checks() -> None:
    good = encode_frame(FrameType.SUMMARY, b'{"records":1,"bytes":2}')
    with pytest.raises(TransferAborted, match="truncated"):
        decode_frame(good[:5])
    with pytest.raises(TransferAborted, match="CRC32C"):
        decode_frame(good[:-1] + b"x")
    with pytest.raises(TransferAborted, match="says"):
        decode_frame(good + b"x")
    with pytest.raises(TransferAborted, match="unknown frame type"):
        decode_frame(bytes([99]) + good[1:])
    lying = HEADER.pack(FrameType.DATA, 0, 0, 0, MAX_FRAME + 1, 0)
    with pytest.raises(TransferAborted, match="invalid"):
        decode_frame(lying)
    # A control frame is bounded far lower, before its CRC is computed.
    big = encode_frame(FrameType.OFFER, b" " * (MAX_CONTROL + 1))
    with pytest.raises(TransferAborted, match=r"OFFER frame of .* exceeds"):
        decode_frame(big[:HEADER.size + 10] + bytes(len(big) - HEADER.size - 10))


def test_zstd_bomb_is_refused_before_allocation() -> None:
    """A zstd frame declaring a content size other than raw_len is refused unread (the
    decompressor would allocate the declared size whatever max_output_size says)."""
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(bomb) < 64 << 10
    import google_crc32c
    frame = HEADER.pack(FrameType.DATA, 1, 0, len(bomb), 16384, google_crc32c.value(bomb)) + bomb
    with pytest.raises(TransferAborted, match="declares 67108864 bytes"):
        decode_frame(frame)
    # Without a declared size the bound is raw_len.
    small = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    frame = HEADER.pack(FrameType.DATA, 1, 0, len(small), 4096, google_crc32c.value(small)) \
        + small
    with pytest.raises(TransferAborted):
        decode_frame(frame)


def test_compressed_frames_round_trip() -> None:
    body = encode_records([Record(bytes(18), Lsn(5), RecordKind.IMAGE, bytes(8192))])
    wire = encode_frame(FrameType.DATA, body, compressor=zstandard.ZstdCompressor())
    assert len(wire) < len(body) // 4
    assert decode_frame(wire).body == body


def test_data_bodies() -> None:
    recs = [Record(bytes([i]) * 18, Lsn(10 + i // 3), RecordKind.IMAGE, b"p" * i)
            for i in range(10)]
    assert decode_records(encode_records(recs)) == recs
    with pytest.raises(TransferAborted, match="without records"):
        decode_records(encode_records([]))
    with pytest.raises(TransferAborted, match="cannot hold"):
        decode_records((1 << 31).to_bytes(4, "big"))
    backwards = encode_records(list(reversed(recs)))
    with pytest.raises(TransferAborted, match="invalid record"):
        decode_records(backwards)
    with pytest.raises(TransferAborted, match="trailing"):
        decode_records(encode_records(recs) + b"x")


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=60),
       target=st.integers(1, 8000))
def test_cut_frames_keeps_every_record_in_order(sizes: list[int], target: int) -> None:
    recs = [Record(bytes(18), Lsn(1 + i // 7), RecordKind.IMAGE, b"x" * n)
            for i, n in enumerate(sizes)]
    batches = list(cut_frames(recs, target))
    assert [r for b in batches for r in b] == recs
    assert all(b for b in batches)


def test_progress_notice_and_result_row_round_trip() -> None:
    p = Progress(5, 10, 1, 2, Lsn(0x16B374D848))
    assert Progress.from_notice(p.to_notice()) == p
    assert Progress.from_notice("some other notice") is None
    assert TransferResult.from_row(RESULT.to_row()) == RESULT
    with pytest.raises(TransferAborted):
        TransferResult.from_row({**RESULT.to_row(), "records": "many"})


def test_command_arguments() -> None:
    args = TransferArgs("main", "postgresql://h:1", "dev", force=True)
    words = args.perform_words("push")
    assert words == ["perform_push", "main", "postgresql://h:1", "dev", "force"]
    assert TransferArgs.parse_perform(words[1:]) == args
    with pytest.raises(InvalidArgument, match="unknown option"):
        TransferArgs.parse_perform(["a", "b", "c", "merge"])
    with pytest.raises(InvalidArgument):
        TransferArgs.parse_perform(["a"])


def test_adaptive_compression_backs_off_on_incompressible_frames() -> None:
    import os

    from zenith.transfer.frames import FLAG_ZSTD, AdaptiveCompressor

    c = AdaptiveCompressor(backoff=3)
    noise, zeros = os.urandom(1 << 16), bytes(1 << 16)
    flags = [c.frame(FrameType.DATA, body)[1] & FLAG_ZSTD
             for body in (zeros, noise, zeros, zeros, zeros, zeros)]
    assert flags == [FLAG_ZSTD, 0, 0, 0, 0, FLAG_ZSTD]  # three frames untried, then again
    for body in (zeros, noise):
        assert decode_frame(c.frame(FrameType.DATA, body)).body == body
