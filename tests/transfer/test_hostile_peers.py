"""Hostile transfer peers against a LIVE pageserver (DESIGN §6, §12).

A raw peer (``hostile_peer.RawPeer``: our pgwire client's CopyBoth stream, frames made
by hand) runs ``branch_push`` (the server receives) or ``branch_pull`` (the server sends)
and lies, floods, bombs or falls silent. Each test checks that (a) the server answers with
an ErrorResponse, never an internal error or a crash, (b) the receiving repository is
unchanged (a snapshot of every table and data file), or, where acknowledged data may stay
durable, that nothing beyond the last ACK is published and no branch name moved, and (c)
the server keeps serving: queries, and a legitimate push by the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import pytest
import zstandard

from tests.fixtures import (
    PageserverProc,
    make_pageserver,
    start_together,
    started_pageservers,
    stop_all,
)
from tests.transfer.hostile_peer import (
    RawPeer,
    Source,
    fetch,
    history_hash,
    local_port,
    peak_rss_kib,
    random_hash,
    raw_frame,
    relabel,
    server_holds,
    snapshot,
)
from zenith.errors import (
    InvalidArgument,
    InvalidState,
    PeerTimeout,
    TransferAborted,
    ZenithError,
)
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.pageserver.pidfile import running_pid
from zenith.storage import Record, RecordKind
from zenith.transfer.frames import (
    FLAG_ZSTD,
    MAX_CONTROL,
    MAX_FRAME,
    RECORD_HEADER,
    encode_frame,
)
from zenith.transfer.messages import (
    MAX_JSON,
    Ask,
    Done,
    FrameType,
    Offer,
    PlanMsg,
    Point,
    Proof,
    Range,
    RangeEnd,
    RangeRequest,
    Status,
)

pytestmark = pytest.mark.timeout(60)

PUSHER = ("pusher", "push-pw")
READER = ("reader", "read-pw")
FAR = Lsn.parse("7FFFFFFF/FFFFFFFE")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@dataclass
class World:
    """A (the source) pushed ``main`` to S with the CLI, then wrote more: S holds main's
    timeline as a received one, behind A. S also has ``other`` (its own) and ``side``."""

    a: PageserverProc
    s: PageserverProc
    source: Source  # A's main: chain and every record
    l1: Lsn  # S's main
    rounds: Iterator[int]

    @property
    def push_uri(self) -> str:
        return self.s.uri(*PUSHER)

    @property
    def read_uri(self) -> str:
        return self.s.uri(*READER)

    @property
    def main_tid(self) -> TimelineId:
        return self.source.tip.timeline_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("hostile")
    a, s = make_pageserver(base / "a"), make_pageserver(base / "s")
    try:
        start_together(a, s)
        a.cli("origin", "add", "s", s.uri(), check=True)
        a.cli("generate", "main", "--pages", "24", check=True)
        a.cli("push", "main", "s", check=True)
        # beyond S: one LSN of 6 records (a frame may end inside it), then 6 LSNs of one
        a.cli("generate", "main", "--pages", "6", "--seed", "1", "--one-lsn", check=True)
        a.cli("generate", "main", "--pages", "6", "--seed", "2", check=True)
        a.cli("generate", "side", "--pages", "2", check=True)
        a.cli("push", "side", "s", check=True)
        s.cli("generate", "other", "--pages", "3", check=True)
        s.add_user(PUSHER[0], PUSHER[1], "push")
        s.add_user(READER[0], READER[1], "read")
        source = run(fetch(a.uri(), "main"))
        l1 = Lsn.parse(str(s.branch("main")["last_record_lsn"]))
        assert source.tip.last_record_lsn > l1
        yield World(a, s, source, l1, itertools.count(1))
    finally:
        stop_all([s, a])


# -- checks -------------------------------------------------------------------------------


def assert_refused(err: BaseException, *fragments: str,
                   cls: type[ZenithError] = ZenithError) -> None:
    """An ErrorResponse the server meant: its class, no internal error, the words."""
    assert isinstance(err, cls), repr(err)
    assert err.sqlstate != "XX000" and err.message != "internal error", repr(err)
    for fragment in fragments:
        assert fragment in err.message, err.message


def still_serving(world: World, peer_rows: list[list[str | None]] | None = None, *,
                  cli: bool = True) -> None:
    """Queries answer, the log holds no crash, and a legitimate CLI push goes through."""
    s, a = world.s, world.a
    assert str(s.query("status")[0]["server_version"]).startswith("zenith")
    assert {"main", "other", "side"} <= {b["name"] for b in s.query("branch_list")}
    if peer_rows is not None:  # the hostile peer's own connection is usable again
        assert {"main", "other", "side"} <= {r[0] for r in peer_rows}
    seed = next(world.rounds)
    if cli:
        a.cli("generate", "side", "--pages", "1", "--seed", str(seed), check=True)
        out = a.cli("push", "side", "s", check=True).stdout
        assert out.startswith("side -> s:side"), out
    else:  # the same commands, without starting a CLI process
        a.query(f"generate side 1 1 {seed}")
        row = a.query(f"perform_push side {world.s.uri()} side")[0]
        assert row["status"] == "fast-forward" and row["records"] == "1", row
    assert s.digest("side") == a.digest("side")
    log = s.config.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log


def main_state(world: World) -> tuple[dict[str, str | None], str]:
    return world.s.branch("main"), world.s.digest("main")


def honest(source: Source) -> Callable[[Point], bytes]:
    return lambda p: source.hash_at(p.timeline_id, p.lsn)


def wanted(source: Source, request: RangeRequest) -> list[Record]:
    """The records a planned range asks for (less what the receiver holds pending)."""
    records = source.between(request.timeline_id, request.after, request.upto)
    if request.resume is not None:
        held = [r for r in records if r.lsn == request.resume.lsn][: request.resume.count]
        records = [r for r in records if r not in held]
    return records


async def negotiate(peer: RawPeer, offer: Offer, prove: Callable[[Point], bytes]) -> PlanMsg:
    await peer.send(offer)
    ask = await peer.expect(Ask)
    assert isinstance(ask, Ask)
    await peer.send(Proof(tuple(prove(p) for p in ask.points)))
    plan = await peer.expect(PlanMsg)
    assert isinstance(plan, PlanMsg)
    return plan


async def open_range(uri: str, dest: str, source: Source) -> tuple[RawPeer, RangeRequest]:
    """A push of ``source`` to ``dest`` negotiated honestly, up to its first RANGE."""
    peer = await RawPeer.open(uri, f"branch_push {dest}")
    plan = await negotiate(peer, source.offer(), honest(source))
    assert plan.status in (Status.NEW, Status.FAST_FORWARD), plan
    request = plan.ranges[0]
    await peer.send(Range(request))
    return peer, request


async def honest_push(uri: str, dest: str, source: Source, upto: Lsn) -> Done:
    """A legitimate push by the raw peer (the control: the peer itself is right)."""
    offer = source.offer(last_record_lsn=upto)
    async with await RawPeer.open(uri, f"branch_push {dest}") as peer:
        plan = await negotiate(peer, offer, honest(source))
        for request in plan.ranges:
            await peer.send(Range(request))
            records = wanted(source, request)
            await peer.send_records(records)
            await peer.send(RangeEnd(request.timeline_id, request.upto, len(records),
                                     sum(len(r.payload) for r in records),
                                     source.hash_at(request.timeline_id, request.upto)))
        while True:
            frame = await peer.recv()
            if frame.type is FrameType.DONE:
                done = frame.message(Done)
                break
        await peer.stream.finish()
    return done


def seeded(world: World, name: str) -> Source:
    """A fresh received timeline on S, branch ``name``, holding A's main history up to
    S's main LSN under a new id: a victim of its own for tests that leave durable data."""
    source = relabel(world.source, TimelineId.generate())
    done = run(honest_push(world.push_uri, name, source, world.l1))
    assert done.result.status is Status.NEW and done.result.new_lsn == world.l1
    return source


def published(world: World, tid: TimelineId) -> dict[str, str | None]:
    rows = [r for r in world.s.query("timeline_list") if r["timeline_id"] == str(tid)]
    assert len(rows) == 1
    return rows[0]


def lsn_of(row: dict[str, str | None]) -> Lsn:
    return Lsn.parse(str(row["last_record_lsn"]))


# -- the control ----------------------------------------------------------------------------


def test_the_raw_peer_pushes_legitimately(world: World) -> None:
    source = seeded(world, "control")
    tid = source.tip.timeline_id
    done = run(honest_push(world.push_uri, "control", source, source.tip.last_record_lsn))
    assert done.result.status is Status.FAST_FORWARD
    assert lsn_of(published(world, tid)) == source.tip.last_record_lsn
    assert world.s.digest("control") == world.a.digest("main")
    still_serving(world)


# -- 1. an offer naming a foreign timeline --------------------------------------------------


async def blast_after_refusal(peer: RawPeer, request: RangeRequest,
                              records: list[Record]) -> BaseException:
    """Ignore the refusal: announce the range and send the records anyway."""
    await peer.send(Range(request))
    await peer.send_records(records)
    await peer.send(RangeEnd(request.timeline_id, request.upto, len(records), 0, random_hash()))
    return await peer.failure()


@pytest.mark.parametrize("proof", ["wrong", "right"])
def test_foreign_timeline_under_another_name(world: World, proof: str) -> None:
    """Offering main's timeline (beyond S's LSN) for a new branch ``evil``: a wrong proof
    is diverged history; the right one still may not extend the timeline ``main`` names."""
    before, state = snapshot(world.s.path), main_state(world)
    source = world.source
    prove = honest(source) if proof == "right" else (lambda p: random_hash())

    async def attack() -> tuple[PlanMsg, BaseException, list[list[str | None]]]:
        async with await RawPeer.open(world.push_uri, "branch_push evil") as peer:
            plan = await negotiate(peer, source.offer(), prove)
            request = RangeRequest(world.main_tid, world.l1, source.tip.last_record_lsn, False)
            err = await blast_after_refusal(
                peer, request, source.between(world.main_tid, world.l1, request.upto))
            return plan, err, await peer.query("branch_list")

    plan, err, rows = run(attack())
    assert plan.status is Status.REJECTED and plan.ranges == ()
    if proof == "wrong":
        assert "histories diverged" in plan.message and str(world.main_tid) in plan.message
    else:
        assert "is already named main" in plan.message
    assert_refused(err, plan.message, cls=InvalidState)
    assert snapshot(world.s.path) == before
    assert main_state(world) == state
    still_serving(world, rows, cli=False)


def test_foreign_timeline_forced_onto_another_branch(world: World) -> None:
    """``branch_push other force`` with main's timeline: force repoints a diverged name,
    but never by extending the timeline another branch names."""
    before, state = snapshot(world.s.path), main_state(world)

    async def attack() -> tuple[PlanMsg, BaseException]:
        async with await RawPeer.open(world.push_uri, "branch_push other force") as peer:
            plan = await negotiate(peer, world.source.offer(), honest(world.source))
            return plan, await peer.failure()

    plan, err = run(attack())
    assert plan.status is Status.REJECTED and "is already named main" in plan.message
    assert_refused(err, "is already named main", cls=InvalidState)
    assert snapshot(world.s.path) == before and main_state(world) == state
    still_serving(world)


def test_timeline_written_by_the_receiver(world: World) -> None:
    """S writes ``other`` itself: no one may send history for its timeline, however
    well proven (a reader pulled it, then pushes a made-up continuation)."""
    mine = run(fetch(world.read_uri, "other"))
    tid = mine.tip.timeline_id
    made_up = replace(mine.records[tid][-1], lsn=mine.tip.last_record_lsn + 8192)
    forged = Source(mine.chain, {tid: [*mine.records[tid], made_up]}, {})
    offer = forged.offer(last_record_lsn=made_up.lsn)
    before = snapshot(world.s.path)

    async def attack() -> tuple[PlanMsg, BaseException]:
        async with await RawPeer.open(world.push_uri, "branch_push other") as peer:
            plan = await negotiate(peer, offer, honest(forged))
            return plan, await peer.failure()

    plan, err = run(attack())
    assert plan.status is Status.REJECTED and "written by this pageserver" in plan.message
    assert_refused(err, "written by this pageserver", cls=InvalidState)
    assert snapshot(world.s.path) == before
    still_serving(world)


def test_skipping_the_proof(world: World) -> None:
    before = snapshot(world.s.path)

    async def attack() -> BaseException:
        async with await RawPeer.open(world.push_uri, "branch_push main") as peer:
            await peer.send(world.source.offer())
            await peer.expect(Ask)
            request = RangeRequest(world.main_tid, world.l1, world.source.tip.last_record_lsn,
                                   False)
            await peer.send(Range(request))  # straight to the data
            return await peer.failure()

    assert_refused(run(attack()), "expected PROOF, got a RANGE frame", cls=TransferAborted)
    assert snapshot(world.s.path) == before
    still_serving(world)


# -- 2. empty and out-of-range DATA frames ----------------------------------------------------


def _record(lsn: int, key: bytes = bytes(18)) -> Record:
    return Record(key, Lsn(lsn), RecordKind.IMAGE, b"x" * 64)


def _pack(count: int, records: list[Record], tail: bytes = b"") -> bytes:
    parts = [struct.pack(">I", count)]
    for r in records:
        parts += [RECORD_HEADER.pack(r.key, r.lsn, r.kind, len(r.payload)), r.payload]
    return b"".join(parts) + tail


def _data(body: bytes) -> bytes:
    return raw_frame(FrameType.DATA, body)


# Each builds the FIRST data frame of a planned range (after, upto] from the real records.
BAD_DATA: dict[str, tuple[Callable[[RangeRequest, list[Record]], bytes], str]] = {
    "empty body": (lambda q, rs: _data(b""), "truncated DATA frame"),
    "zero records": (lambda q, rs: _data(_pack(0, [])), "a DATA frame without records"),
    "count beyond the body": (lambda q, rs: _data(_pack(10_000, rs[:1])), "cannot hold"),
    "far LSN": (lambda q, rs: _data(_pack(1, [_record(FAR)])), "outside the range"),
    "largest LSN": (lambda q, rs: _data(_pack(1, [_record((1 << 64) - 1)])),
                    "outside the range"),
    "just past the range": (lambda q, rs: _data(_pack(1, [_record(q.upto + 1)])),
                            "outside the range"),
    "good records, then one far": (lambda q, rs: _data(_pack(2, [rs[0], _record(FAR)])),
                                   "outside the range"),
    "at the range's start": (lambda q, rs: _data(_pack(1, [_record(q.after)])),
                             "outside the range"),
    "below the range": (lambda q, rs: _data(_pack(1, [_record(1)])), "outside the range"),
    "LSN zero": (lambda q, rs: _data(_pack(1, [_record(0)])), "invalid record"),
    "LSNs going back": (lambda q, rs: _data(_pack(2, [rs[-1], rs[0]])), "invalid record"),
    "unknown kind": (lambda q, rs: _data(_pack(1, [replace(rs[0], kind=7)])),  # type: ignore[arg-type]
                     "invalid record (kind 7"),
    "trailing bytes": (lambda q, rs: _data(_pack(1, rs[:1], b"junk")), "trailing bytes"),
    "truncated payload": (lambda q, rs: _data(_pack(1, rs[:1])[:-10]), "truncated record"),
    "bad CRC": (lambda q, rs: raw_frame(FrameType.DATA, _pack(1, rs[:1]), crc=1), "CRC32C"),
    "short header": (lambda q, rs: bytes([FrameType.DATA, 0, 0]), "truncated frame"),
    "body length lies": (lambda q, rs: raw_frame(FrameType.DATA, _pack(1, rs[:1]),
                                                 body_len=7), "says 7 bytes"),
    "unknown flags": (lambda q, rs: raw_frame(FrameType.DATA, _pack(1, rs[:1]), flags=0x80),
                      "header is invalid"),
    "unknown frame type": (lambda q, rs: raw_frame(99, b"{}"), "unknown frame type 99"),
    "a control frame": (lambda q, rs: encode_frame(FrameType.OFFER, b"{}"),
                        "expected DATA or RANGE_END, got a OFFER frame"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_frame(world: World, case: str) -> None:
    """The first DATA frame of a fast-forward of main is malformed or out of range:
    refused before anything is stored."""
    build, fragment = BAD_DATA[case]
    before, state = snapshot(world.s.path), main_state(world)

    async def attack() -> tuple[BaseException, Lsn | None]:
        peer, request = await open_range(world.push_uri, "main", world.source)
        async with peer:
            assert (request.after, request.upto) == (world.l1, world.source.tip.last_record_lsn)
            await peer.send_raw(build(request, wanted(world.source, request)))
            return await peer.failure(), peer.acked

    err, acked = run(attack())
    assert_refused(err, fragment, cls=TransferAborted)
    assert acked is None
    assert snapshot(world.s.path) == before
    assert main_state(world) == state
    still_serving(world, cli=False)


# -- 3. decompression bombs ---------------------------------------------------------------


BOMB_SIZE = 1 << 30


@cache
def zstd_bomb(declare: bool) -> bytes:
    """1 GiB of zeros in a few KiB of zstd, its content size declared or not."""
    compressor = zstandard.ZstdCompressor(write_content_size=declare)
    obj = compressor.compressobj(size=BOMB_SIZE if declare else -1)
    chunk = bytes(1 << 20)
    return b"".join(obj.compress(chunk) for _ in range(BOMB_SIZE >> 20)) + obj.flush()


def bomb_frame(ftype: FrameType, declare: bool, raw_len: int = 16 << 10) -> bytes:
    return raw_frame(ftype, zstd_bomb(declare), raw_len=raw_len, flags=FLAG_ZSTD)


BOMBS = {
    "declared 1 GiB, header 16 KiB": (True, 16 << 10, "declares 1073741824 bytes decompressed"),
    "undeclared, header 16 KiB": (False, 16 << 10, "does not decompress"),
    "header beyond the frame bound": (False, MAX_FRAME + 1, "header is invalid"),
}


def server_pid(ps: PageserverProc) -> int:
    pid = running_pid(ps.config.pid_path)
    assert pid is not None
    return pid


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("where", ["DATA", "OFFER"])
def test_decompression_bomb_pushed(world: World, bomb: str, where: str) -> None:
    declare, raw_len, fragment = BOMBS[bomb]
    frame = bomb_frame(FrameType.DATA if where == "DATA" else FrameType.OFFER, declare, raw_len)
    before, pid = snapshot(world.s.path), server_pid(world.s)
    peak = peak_rss_kib(pid)

    async def attack() -> tuple[BaseException, float]:
        if where == "DATA":
            peer, _ = await open_range(world.push_uri, "main", world.source)
        else:
            peer = await RawPeer.open(world.push_uri, "branch_push main")
        async with peer:
            started = time.monotonic()
            await peer.send_raw(frame)
            return await peer.failure(), time.monotonic() - started

    err, seconds = run(attack())
    assert_refused(err, fragment, cls=TransferAborted)
    assert seconds < 2.0
    assert peak_rss_kib(pid) - peak < 100 << 10  # nothing near 1 GiB was ever allocated
    assert snapshot(world.s.path) == before
    still_serving(world, cli=False)


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("where", ["ASK", "PLAN"])
def test_decompression_bomb_from_a_puller(world: World, bomb: str, where: str) -> None:
    """A ``read`` user pulls main: the server sends, and reads the puller's ASK and PLAN."""
    declare, raw_len, fragment = BOMBS[bomb]
    ftype = FrameType.ASK if where == "ASK" else FrameType.PLAN
    before, pid = snapshot(world.s.path), server_pid(world.s)
    peak = peak_rss_kib(pid)

    async def attack() -> tuple[BaseException, float]:
        async with await RawPeer.open(world.read_uri, "branch_pull main") as peer:
            offer = await peer.expect(Offer)
            assert isinstance(offer, Offer) and offer.source.timeline_id == world.main_tid
            if where == "PLAN":
                await peer.send(Ask(()))
                await peer.expect(Proof)
            started = time.monotonic()
            await peer.send_raw(bomb_frame(ftype, declare, raw_len))
            return await peer.failure(), time.monotonic() - started

    err, seconds = run(attack())
    assert_refused(err, fragment, cls=TransferAborted)
    assert seconds < 2.0
    assert peak_rss_kib(pid) - peak < 100 << 10
    assert snapshot(world.s.path) == before
    still_serving(world, cli=False)


# -- 4. oversize JSON ------------------------------------------------------------------------


# An oversize control frame is refused by the frame codec (before its CRC or any
# decompression); one within the frame bound but over MAX_JSON by the message decoder.
OVERSIZE = {
    "2 MiB": (2 << 20, False, "frame of"),
    "2 MiB of zstd": (2 << 20, True, "frame of"),
    "MAX_JSON + 1": (MAX_JSON + 1, False, "message of"),
}


def oversize(message_json: dict[str, Any], size: int) -> bytes:
    """The message's JSON padded with an extra string field to exactly ``size`` bytes."""
    base = json.dumps({**message_json, "padding": ""}).encode()
    body = base[:-2] + b"x" * (size - len(base)) + base[-2:]
    assert len(body) == size and json.loads(body)["padding"]
    return body


def oversize_frame(ftype: FrameType, message: Any, size_case: str) -> tuple[bytes, str]:
    size, compressed, what = OVERSIZE[size_case]
    assert size > MAX_CONTROL if what == "frame of" else MAX_JSON < size <= MAX_CONTROL
    frame = encode_frame(ftype, oversize(message.to_json(), size),
                         compressor=zstandard.ZstdCompressor() if compressed else None)
    assert (frame[1] == FLAG_ZSTD) == compressed
    limit = MAX_CONTROL if what == "frame of" else MAX_JSON
    return frame, f"{ftype.name} {what} {size} bytes exceeds {limit}"


@pytest.mark.parametrize("size", list(OVERSIZE))
@pytest.mark.parametrize("where", ["OFFER", "PROOF", "RANGE", "RANGE_END"])
def test_oversize_json_pushed(world: World, where: str, size: str) -> None:
    source = world.source
    before, state = snapshot(world.s.path), main_state(world)
    expected = ""

    async def attack() -> BaseException:
        nonlocal expected

        async def bad(ftype: FrameType, message: Any) -> BaseException:
            nonlocal expected
            frame, expected = oversize_frame(ftype, message, size)
            await peer.send_raw(frame)
            return await peer.failure()

        async with await RawPeer.open(world.push_uri, "branch_push main") as peer:
            if where == "OFFER":
                return await bad(FrameType.OFFER, source.offer())
            await peer.send(source.offer())
            ask = await peer.expect(Ask)
            assert isinstance(ask, Ask)
            proof = Proof(tuple(honest(source)(p) for p in ask.points))
            if where == "PROOF":
                return await bad(FrameType.PROOF, proof)
            await peer.send(proof)
            plan = await peer.expect(PlanMsg)
            assert isinstance(plan, PlanMsg) and plan.status is Status.FAST_FORWARD
            request = plan.ranges[0]
            if where == "RANGE":
                return await bad(FrameType.RANGE, Range(request))
            await peer.send(Range(request))
            end = RangeEnd(request.timeline_id, request.upto, 0, 0, random_hash())
            return await bad(FrameType.RANGE_END, end)

    assert_refused(run(attack()), expected, cls=TransferAborted)
    assert snapshot(world.s.path) == before and main_state(world) == state
    still_serving(world, cli=False)


@pytest.mark.parametrize("size", ["2 MiB of zstd", "MAX_JSON + 1"])
@pytest.mark.parametrize("where", ["ASK", "PLAN"])
def test_oversize_json_from_a_puller(world: World, where: str, size: str) -> None:
    """A ``read`` user pulling main sends an oversize ASK or PLAN."""
    expected = ""

    async def attack() -> BaseException:
        nonlocal expected
        async with await RawPeer.open(world.read_uri, "branch_pull main") as peer:
            await peer.expect(Offer)
            if where == "ASK":
                frame, expected = oversize_frame(FrameType.ASK, Ask(()), size)
            else:
                await peer.send(Ask(()))
                await peer.expect(Proof)
                plan = PlanMsg(Status.NEW, "", False, None, ())
                frame, expected = oversize_frame(FrameType.PLAN, plan, size)
            await peer.send_raw(frame)
            return await peer.failure()

    assert_refused(run(attack()), expected, cls=TransferAborted)
    still_serving(world, cli=False)


def test_deeply_nested_json(world: World) -> None:
    before = snapshot(world.s.path)
    body = b"[" * 500_000 + b"]" * 500_000  # within MAX_JSON; too deep for any parser

    async def attack() -> BaseException:
        async with await RawPeer.open(world.push_uri, "branch_push main") as peer:
            await peer.send_raw(encode_frame(FrameType.OFFER, body))
            return await peer.failure()

    assert_refused(run(attack()), "OFFER frame holds no valid JSON", cls=TransferAborted)
    assert snapshot(world.s.path) == before
    still_serving(world)


# -- 5. repeated and overlapping ranges and records -------------------------------------------


def test_range_announced_twice(world: World) -> None:
    before = snapshot(world.s.path)

    async def attack() -> BaseException:
        peer, request = await open_range(world.push_uri, "main", world.source)
        async with peer:
            await peer.send(Range(request))
            return await peer.failure()

    assert_refused(run(attack()), "expected DATA or RANGE_END, got a RANGE frame",
                   cls=TransferAborted)
    assert snapshot(world.s.path) == before
    still_serving(world)


def test_range_other_than_planned(world: World) -> None:
    before = snapshot(world.s.path)

    async def attack() -> BaseException:
        async with await RawPeer.open(world.push_uri, "branch_push main") as peer:
            plan = await negotiate(peer, world.source.offer(), honest(world.source))
            request = plan.ranges[0]
            await peer.send(Range(replace(request, after=Lsn(0))))  # resend all history
            return await peer.failure()

    assert_refused(run(attack()), "announced another range than the plan asked for",
                   cls=TransferAborted)
    assert snapshot(world.s.path) == before
    still_serving(world)


def test_duplicate_record_in_one_frame(world: World) -> None:
    before = snapshot(world.s.path)

    async def attack() -> BaseException:
        peer, request = await open_range(world.push_uri, "main", world.source)
        async with peer:
            first = wanted(world.source, request)[0]
            await peer.send_records([first, first])
            return await peer.failure()

    assert_refused(run(attack()), "two records for one key at one LSN", cls=InvalidArgument)
    assert snapshot(world.s.path) == before
    still_serving(world)


# (records sent first, then what is sent again, the refusal): the records of the range
# are 6 at one LSN, then 6 LSNs of one record each
REPEATS: dict[str, tuple[int, Callable[[list[Record]], list[Record]] | None, str,
                         type[ZenithError]]] = {
    "the range again": (4, None, "got a RANGE frame", TransferAborted),
    "records already acknowledged": (8, lambda rs: rs[:8], "before records already received",
                                     TransferAborted),
    "last record again": (4, lambda rs: rs[3:], "two records for one key at one LSN",
                          InvalidArgument),
}


@pytest.mark.parametrize("repeat", list(REPEATS))
def test_repeats_after_an_ack(world: World, repeat: str) -> None:
    """Part of a range arrives and is acknowledged (durable and published up to the ACK,
    which is allowed), then the sender repeats itself: refused, nothing beyond the ACK."""
    first, again, fragment, cls = REPEATS[repeat]
    name = f"repeat-{list(REPEATS).index(repeat)}"
    source = seeded(world, name)
    tid = source.tip.timeline_id
    branch_before = world.s.branch(name)
    records = source.between(tid, world.l1, source.tip.last_record_lsn)
    assert len({r.lsn for r in records[:6]}) == 1 and len({r.lsn for r in records[5:]}) == 7
    # the ACK publishes every LSN before the last one sent, which stays pending
    pending = records[first - 1].lsn
    published_lsn = max([world.l1, *(r.lsn for r in records[:first] if r.lsn < pending)])
    pending_count = sum(r.lsn == pending for r in records[:first])

    async def attack() -> tuple[BaseException, Lsn | None]:
        peer, request = await open_range(world.push_uri, name, source)
        async with peer:
            assert wanted(source, request) == records
            await peer.send_records(records[:first])
            ack = await peer.expect_ack()
            assert ack.pending is not None and ack.pending.count == pending_count
            if again is None:
                await peer.send(Range(request))
            else:
                await peer.send_records(again(records))
            return await peer.failure(), peer.acked

    err, acked = run(attack())
    assert_refused(err, fragment, cls=cls)
    row = published(world, tid)
    assert acked == published_lsn and lsn_of(row) == acked  # nothing beyond the ACK
    assert row["pending_lsn"] == str(pending) and row["pending_records"] == str(pending_count)
    assert world.s.branch(name) == {**branch_before, "last_record_lsn": str(acked)}
    assert world.s.digest(name) == world.a.digest(f"main@{acked}")
    still_serving(world, cli=False)


def test_first_range_replayed_instead_of_the_next(world: World) -> None:
    """A two-range plan (main's timeline, then a new child): after range 1 is complete
    and acknowledged, the sender replays it. Refused: the first timeline keeps what was
    acknowledged, the child is not created, and the branch stays on its timeline."""
    name = "replay"
    source = seeded(world, name)
    tid = source.tip.timeline_id
    top = source.tip.last_record_lsn
    child = replace(source.tip, timeline_id=TimelineId.generate(), ancestor_id=tid,
                    ancestor_lsn=top, min_readable_lsn=top, last_record_lsn=top + 8192)
    offer = Offer((source.tip, child))

    async def attack() -> tuple[BaseException, Lsn | None]:
        async with await RawPeer.open(world.push_uri, f"branch_push {name}") as peer:
            plan = await negotiate(peer, offer, honest(source))
            assert plan.status is Status.FAST_FORWARD and len(plan.ranges) == 2
            first = plan.ranges[0]
            assert plan.ranges[1].create and plan.ranges[1].timeline_id == child.timeline_id
            await peer.send(Range(first))
            records = wanted(source, first)
            await peer.send_records(records)
            await peer.send(RangeEnd(tid, first.upto, len(records),
                                     sum(len(r.payload) for r in records),
                                     source.hash_at(tid, first.upto)))
            await peer.expect_ack()
            assert (await peer.expect_ack()).lsn == first.upto  # the range's end
            await peer.send(Range(first))
            return await peer.failure(), peer.acked

    err, acked = run(attack())
    assert_refused(err, "announced another range", cls=TransferAborted)
    assert acked == top and lsn_of(published(world, tid)) == top
    assert world.s.branch(name)["timeline_id"] == str(tid)
    assert str(child.timeline_id) not in {r["timeline_id"] for r in world.s.query("timeline_list")}
    assert world.s.digest(name) == world.a.digest("main")
    still_serving(world)


# -- 7. senders lying about their history -----------------------------------------------------


def test_lie_below_the_receivers_lsn(world: World) -> None:
    """Same timeline id as S's main, other records below S's LSN: the liar proves its own
    history honestly, and that is what gives it away."""
    source = world.source
    records = list(source.records[world.main_tid])
    records[3] = replace(records[3], payload=bytes(len(records[3].payload)))
    liar = Source(source.chain, {world.main_tid: records}, {})
    before, state = snapshot(world.s.path), main_state(world)

    async def attack() -> tuple[PlanMsg, BaseException]:
        async with await RawPeer.open(world.push_uri, "branch_push main") as peer:
            plan = await negotiate(peer, liar.offer(), honest(liar))
            return plan, await peer.failure()

    plan, err = run(attack())
    assert plan.status is Status.REJECTED
    assert f"timeline {world.main_tid} holds different records" in plan.message
    assert_refused(err, "histories diverged", cls=InvalidState)
    assert snapshot(world.s.path) == before and main_state(world) == state
    still_serving(world)


ENDS = ["wrong hash", "tampered records", "wrong count", "wrong upto"]


@pytest.mark.parametrize("lie", ENDS)
def test_range_end_that_does_not_match(world: World, lie: str) -> None:
    """A new branch from a new timeline; the records arrive and are acknowledged, then the
    RANGE_END does not match them: the branch is not created, the timeline holds only
    what was acknowledged (and the LSN the ACK left pending)."""
    name = f"liar-{ENDS.index(lie)}"
    source = relabel(world.source, TimelineId.generate())
    tid, top = source.tip.timeline_id, source.tip.last_record_lsn

    async def attack() -> tuple[BaseException, Lsn | None]:
        peer, request = await open_range(world.push_uri, name, source)
        async with peer:
            assert request.create and (request.after, request.upto) == (0, top)
            records = wanted(source, request)
            sent = records
            if lie == "tampered records":
                sent = [*records[:5], replace(records[5], payload=b"\x00" * 8192), *records[6:]]
            await peer.send_records(sent)
            await peer.expect_ack()
            end = RangeEnd(tid, top, len(sent), sum(len(r.payload) for r in sent),
                           history_hash(records, top))
            if lie == "wrong hash":
                end = replace(end, hash=random_hash())
            elif lie == "wrong count":
                end = replace(end, records=end.records - 1)
            elif lie == "wrong upto":
                end = replace(end, upto=Lsn(top - 1))
            await peer.send(end)
            return await peer.failure(), peer.acked

    err, acked = run(attack())
    if lie in ("wrong hash", "tampered records"):
        assert_refused(err, "do not have the history hash the sender announced",
                       cls=TransferAborted)
    else:
        assert_refused(err, "the range's end does not match what arrived", cls=TransferAborted)
    last = source.records[tid][-1].lsn
    assert acked is not None and acked < last
    row = published(world, tid)
    assert lsn_of(row) == acked and row["branches"] == ""  # held, never named
    assert row["pending_lsn"] == str(last)  # the greatest LSN stays unpublished
    assert name not in {b["name"] for b in world.s.query("branch_list")}
    if lie != "tampered records":
        assert world.s.digest(f"{tid}@{acked}") == world.a.digest(f"main@{acked}")
    still_serving(world, cli=False)


# -- 1b. main's timeline, reached through a second name --------------------------------------


def test_second_name_on_a_named_timeline_is_refused(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    """A pusher tries to name main's timeline ``evil`` too (nothing to write: the plan
    would be NEW with no records). Two names of one timeline would move together, so a
    later fast-forward of ``evil`` would move main: the second name itself is refused."""
    a, s = started_pageservers(pageserver_factory, "a", "s")
    s.add_user(*PUSHER, "push")
    a.cli("origin", "add", "s", s.uri(), check=True)
    a.cli("generate", "main", "--pages", "10", check=True)
    a.cli("push", "main", "s", check=True)
    a.cli("generate", "main", "--pages", "5", "--seed", "1", check=True)
    source = run(fetch(a.uri(), "main"))
    l1 = Lsn.parse(str(s.branch("main")["last_record_lsn"]))
    uri = s.uri(*PUSHER)
    main_before, digest_before = s.branch("main"), s.digest("main")
    before = snapshot(s.path)
    for upto in (l1, source.tip.last_record_lsn):  # the alias alone, and with new records
        async def attack(upto: Lsn = upto) -> BaseException:
            async with await RawPeer.open(uri, "branch_push evil") as peer:
                plan = await negotiate(peer, source.offer(last_record_lsn=upto),
                                       honest(source))
                assert plan.status is Status.REJECTED, plan
                return await peer.failure()

        outcome = run(attack())
        assert_refused(outcome, "is already named main", cls=InvalidState)
        assert s.branch("main") == main_before and s.digest("main") == digest_before
        assert snapshot(s.path) == before
    # Through the CLI too: a second name for main's timeline is refused with advice.
    res = a.cli("push", "main", "s:backup")
    assert res.returncode == 1 and "is already named main" in res.stderr, res.stderr
    a.cli("push", "main", "s", check=True)  # the push to main itself is fine
    assert s.digest("main") == a.digest("main")


# -- 6. silent peers ------------------------------------------------------------------------


TIMEOUT = 2


def timed_pageserver(factory: Callable[..., PageserverProc], name: str) -> PageserverProc:
    """A pageserver that drops a peer silent for TIMEOUT seconds."""
    ps = factory(name=name, start=False)
    config = ps.path / "config.toml"
    config.write_text(f"transfer_timeout = {TIMEOUT}\n" + config.read_text())
    ps.start()
    assert ps.config.transfer_timeout == TIMEOUT
    return ps


async def cli(ps: PageserverProc, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zenith.cli", "-D", str(ps.path), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_silent_pushers(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    """Two pushers fall silent: one after its OFFER (holding main's locks, S waiting for
    its PROOF), one in the middle of a range of ``dev``. During the silence a push to
    another branch completes at once; a push to main waits; both silent ones are dropped
    after TIMEOUT; then the waiting push proceeds and ``dev`` resumes."""
    a = pageserver_factory(name="a")
    s = timed_pageserver(pageserver_factory, "s")
    s.add_user(*PUSHER, "push")
    a.cli("origin", "add", "s", s.uri(), check=True)
    for branch in ("main", "side", "dev"):
        a.cli("generate", branch, "--pages", "12", check=True)
    main, dev = run(fetch(a.uri(), "main")), run(fetch(a.uri(), "dev"))
    uri = s.uri(*PUSHER)

    async def scenario() -> dict[str, Any]:
        quiet = await RawPeer.open(uri, "branch_push main")
        await quiet.send(main.offer())
        await quiet.expect(Ask)  # S waits for our PROOF from now on, holding main's locks
        t0 = time.monotonic()
        mid, request = await open_range(uri, "dev", dev)
        await mid.send_records(wanted(dev, request)[:5])  # 4 published, 1 pending
        await mid.expect_ack()
        t_mid = time.monotonic()
        same = await cli(a, "push", "main", "s")
        other = await cli(a, "push", "side", "s")
        other_out = await other.communicate()
        t_other = time.monotonic() - t0
        quiet_err = await quiet.failure(within=TIMEOUT + 10)
        t_quiet = time.monotonic() - t0
        mid_err = await mid.failure(within=TIMEOUT + 10)
        t_mid_dropped = time.monotonic() - t_mid
        same_out = await same.communicate()
        t_same = time.monotonic() - t0
        await quiet.close()
        await mid.close()
        return {"other": (other.returncode, *other_out, t_other),
                "same": (same.returncode, *same_out, t_same),
                "quiet": (quiet_err, t_quiet), "mid": (mid_err, t_mid_dropped, mid.acked)}

    r = run(scenario())
    code, out, err, t_other = r["other"]
    assert code == 0 and out.startswith(b"* [new branch] side -> s:side"), err
    assert t_other < TIMEOUT  # while both silent peers were still held
    quiet_err, t_quiet = r["quiet"]
    assert_refused(quiet_err, f"the peer sent nothing for {TIMEOUT} s", cls=PeerTimeout)
    assert TIMEOUT - 0.5 < t_quiet < TIMEOUT + 3
    mid_err, t_mid, acked = r["mid"]
    assert_refused(mid_err, f"the peer sent nothing for {TIMEOUT} s", cls=PeerTimeout)
    assert TIMEOUT - 0.5 < t_mid < TIMEOUT + 3
    code, out, err, t_same = r["same"]
    assert code == 0 and out.startswith(b"* [new branch] main -> s:main"), err
    assert t_same > TIMEOUT - 0.5  # it waited for the silent one's locks
    assert s.digest("main") == a.digest("main")
    # dev kept what was acknowledged, unnamed; the CLI resumes after it
    row = [t for t in s.query("timeline_list") if t["timeline_id"] == str(dev.tip.timeline_id)]
    assert row and lsn_of(row[0]) == acked and row[0]["branches"] == ""
    out = a.cli("push", "dev", "s", check=True).stdout
    assert out.startswith("* [new branch] dev -> s:dev") and ", 7 records" in out, out
    assert s.digest("dev") == a.digest("dev")
    log = s.config.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log


def test_puller_that_stops_reading(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    """A ``read`` user plans a pull of a branch larger than the socket buffers, then neither
    reads nor writes. The server (sending) must drop it after TIMEOUT, not block on
    the full socket for ever."""
    s = timed_pageserver(pageserver_factory, "s")
    s.add_user(*READER, "read")
    s.cli("generate", "big", "--pages", "3000", "--page-size", "8192", check=True)

    async def scenario() -> bool:
        async with await RawPeer.open(s.uri(*READER), "branch_pull big") as peer:
            offer = await peer.expect(Offer)
            assert isinstance(offer, Offer)
            await peer.send(Ask(()))
            await peer.expect(Proof)
            tl = offer.source
            await peer.send(PlanMsg(Status.NEW, "", False, None, (
                RangeRequest(tl.timeline_id, Lsn(0), tl.last_record_lsn, True),)))
            # silent, and reading nothing: dropped within 2 * TIMEOUT + 1 seconds
            deadline = time.monotonic() + 2 * TIMEOUT + 1
            while server_holds(s.port, local_port(peer)) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return server_holds(s.port, local_port(peer))

    assert not run(scenario()), "the server still holds the silent puller's connection"
    assert str(s.query("status")[0]["server_version"]).startswith("zenith")


# -- a squatted timeline id, and the way out ---------------------------------------------------


def test_squatted_timeline_id_is_refused_and_can_be_removed(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    """A push user who knows a timeline id before the receiver holds it can store forged,
    self-consistent records under it (a push user may write any history to a branch). The
    real history is then refused as diverged — never grafted — and the admin removes the
    squatter: the branch (and with it the timeline), or an unnamed leftover with
    `zenith timeline delete`; then the real push goes through."""
    a, s = started_pageservers(pageserver_factory, "a", "s")
    s.add_user(*PUSHER, "push")
    a.cli("origin", "add", "s", s.uri(), check=True)
    a.cli("generate", "main", "--pages", "12", check=True)
    real = run(fetch(a.uri(), "main"))
    tid = real.tip.timeline_id
    forged_records = [replace(r, payload=b"forged" + r.payload[6:]) for r in real.records[tid]]
    forged = Source(real.chain, {tid: forged_records}, {})
    uri = s.uri(*PUSHER)

    # 1. Squatted under a name: refused as diverged, recovered by deleting that branch.
    run(honest_push(uri, "evil", forged, real.tip.last_record_lsn))
    res = a.cli("push", "main", "s")
    assert res.returncode == 1 and "histories diverged" in res.stderr, res.stderr
    assert "main" not in {r["name"] for r in s.query("branch_list")}
    s.cli("branch", "delete", "evil", check=True)
    a.cli("push", "main", "s", check=True)
    assert s.digest("main") == a.digest("main")

    # 2. Squatted by an interrupted transfer (unnamed, part of one LSN pending): the same.
    a.cli("generate", "side", "--pages", "30", "--one-lsn", check=True)
    real = run(fetch(a.uri(), "side"))
    tid = real.tip.timeline_id
    forged_records = [replace(r, payload=b"forged" + r.payload[6:]) for r in real.records[tid]]

    async def interrupted() -> None:
        forged = Source(real.chain, {tid: forged_records}, {})
        peer, _ = await open_range(uri, "evil2", forged)
        async with peer:
            await peer.send_records(forged_records[:10])
            await peer.expect_ack()

    run(interrupted())
    row = next(r for r in s.query("timeline_list") if r["timeline_id"] == str(tid))
    assert row["branches"] == "" and row["pending_records"] == "10", row
    # The real push resumes after the 10 held records (same keys), and its range end's
    # hash then refuses the mix: the LSN is never published.
    res = a.cli("push", "side", "s")
    assert res.returncode == 1 and "history hash" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    listed = s.cli("timeline", "list", check=True).stdout
    assert f"{tid}  (unnamed)  from -  at 0/0  (received, 30 records of" in listed, listed
    s.cli("timeline", "delete", str(tid), check=True)
    a.cli("push", "side", "s", check=True)
    assert s.digest("side") == a.digest("side")
    # A named timeline cannot be deleted this way.
    res = s.cli("timeline", "delete", str(tid))
    assert res.returncode == 1 and "branch name or descendants" in res.stderr


# -- shallow copies: a base (the state at one LSN) from a hostile pusher ------------------

BASE_LIES: dict[str, Callable[[list[Record], Lsn], list[Record]]] = {
    "a tombstone in the base": lambda rs, at: [rs[0], replace(rs[1], kind=RecordKind.TOMBSTONE,
                                                              payload=b"")],
    "keys out of order": lambda rs, at: [rs[1], rs[0]],
    "one key twice": lambda rs, at: [rs[0], rs[0]],
    "an image after the base's LSN": lambda rs, at: [rs[0], replace(rs[1], lsn=Lsn(at + 8))],
}


def _shallow_source(world: World) -> tuple[Offer, list[Record], Lsn]:
    """A shallow offer of a new timeline (its ancestor not offered: the receiver must
    take a base) and an honest base for it: distinct keys in order, images at its LSN."""
    at = world.l1
    tip = replace(world.source.tip, timeline_id=TimelineId.generate(),
                  ancestor_id=TimelineId.generate(), ancestor_lsn=Lsn(0x100),
                  last_record_lsn=at, min_readable_lsn=at, collected_lsn=at)
    images = {r.key: r.payload for r in world.source.records[world.main_tid]}
    base = [Record(k, at, RecordKind.IMAGE, v) for k, v in sorted(images.items())]
    return Offer((tip,)), base, at


async def _push_base(world: World, name: str, offer: Offer, base: list[Record],
                     end: bool) -> tuple[PlanMsg, BaseException | Done | None]:
    async with await RawPeer.open(world.push_uri, f"branch_push {name}") as peer:
        plan = await negotiate(peer, offer, lambda p: random_hash())
        request = plan.ranges[0]
        await peer.send(Range(request))
        await peer.send_records(base)
        if not end:
            return plan, None  # the connection drops half way through the base
        await peer.send(RangeEnd(request.timeline_id, request.upto, len(base),
                                 sum(len(r.payload) for r in base), random_hash()))
        while True:
            try:
                frame = await peer.recv()
            except ZenithError as exc:
                return plan, exc
            if frame.type is FrameType.DONE:
                done = frame.message(Done)
                await peer.stream.finish()
                return plan, done


@pytest.mark.parametrize("lie", list(BASE_LIES))
def test_a_lying_base_is_refused(world: World, lie: str) -> None:
    offer, base, at = _shallow_source(world)
    before = main_state(world)
    name = f"shallow-{list(BASE_LIES).index(lie)}"
    plan, err = run(_push_base(world, name, offer, BASE_LIES[lie](base, at), end=True))
    assert plan.ranges[0].base and plan.ranges[0].after == at
    assert isinstance(err, ZenithError), err
    assert_refused(err, "base")
    assert name not in {b["name"] for b in world.s.query("branch_list")}
    assert main_state(world) == before
    still_serving(world)


def test_a_base_cut_short_is_never_readable_and_is_sent_again(world: World) -> None:
    offer, base, at = _shallow_source(world)
    tid = offer.source.timeline_id
    plan, _ = run(_push_base(world, "shallow-cut", offer, base[: len(base) // 2], end=False))
    assert plan.ranges[0].base
    time.sleep(0.5)  # the server notices the closed connection
    assert "shallow-cut" not in {b["name"] for b in world.s.query("branch_list")}
    result = world.s.cli("digest", f"{tid}@{at}")
    assert result.returncode != 0 and "still being received" in result.stderr
    # The next push starts the base again, whole this time.
    _, done = run(_push_base(world, "shallow-cut", offer, base, end=True))
    assert isinstance(done, Done) and done.result.status is Status.NEW, done
    assert "shallow: history from" in done.result.message
    expected = hashlib.sha256()  # the state is the base, exactly (storage's digest)
    for rec in base:
        expected.update(rec.key + struct.pack(">I", len(rec.payload)) + rec.payload)
    assert world.s.digest("shallow-cut") == expected.hexdigest()
    still_serving(world)
