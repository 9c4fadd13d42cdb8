"""A raw transfer peer for hostile tests: it speaks the frames of ``zenith.transfer`` over
our pgwire client's CopyBoth stream by hand, so a test can send exactly the frames (or
bytes) it wants, and it can fetch a branch's real chain and records from a live
pageserver (as a ``branch_pull`` receiver) to build convincing lies from them."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from zenith.errors import ZenithError
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.pgwire.client import ClientCopyStream, Connection, connect, parse_uri
from zenith.storage import Record, TimelineInfo
from zenith.storage.history import EMPTY, Folder
from zenith.transfer.frames import (
    HEADER,
    Frame,
    decode_frame,
    decode_records,
    encode_frame,
    encode_message,
    encode_records,
)
from zenith.transfer.messages import (
    Ack,
    Ask,
    Done,
    FrameType,
    Message,
    Offer,
    PlanMsg,
    Proof,
    Range,
    RangeEnd,
    RangeRequest,
    Status,
    TransferResult,
)

#: Bound on any single wait of a raw peer: a hung server fails the test, not the suite.
WAIT = 20.0


def raw_frame(ftype: int, wire: bytes, *, raw_len: int | None = None, flags: int = 0,
              crc: int | None = None, body_len: int | None = None) -> bytes:
    """A frame with every header field under the caller's control (defaults: honest)."""
    return HEADER.pack(ftype, flags, 0, len(wire) if body_len is None else body_len,
                       len(wire) if raw_len is None else raw_len,
                       google_crc32c.value(wire) if crc is None else crc) + wire


class RawPeer:
    """One CopyBoth command on a live pageserver, driven frame by frame."""

    def __init__(self, conn: Connection, stream: ClientCopyStream) -> None:
        self.conn, self.stream = conn, stream
        self.acked: Lsn | None = None  # the last ACK read

    @classmethod
    async def open(cls, uri: str, command: str) -> RawPeer:
        conn = await connect(parse_uri(uri))
        try:
            stream = await conn.copy_both(command)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, stream)

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> RawPeer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writing ---------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        await self.stream.write(encode_message(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.write(data)

    async def send_records(self, records: list[Record]) -> None:
        await self.stream.write(encode_frame(FrameType.DATA, encode_records(records)))

    # -- reading ---------------------------------------------------------------------

    async def recv(self) -> Frame:
        async with asyncio.timeout(WAIT):
            data = await self.stream.read()
        assert data is not None, "the server ended its side of the COPY"
        return decode_frame(data)

    async def expect(self, cls: type[Message]) -> Message:
        return (await self.recv()).message(cls)

    async def expect_ack(self) -> Ack:
        ack = (await self.recv()).message(Ack)
        self.acked = ack.lsn
        return ack

    async def failure(self, within: float = WAIT) -> ZenithError:
        """Read until the server's error (what the ErrorResponse became); frames it sends
        first (ACKs) are noted. Fails the test if the COPY ends without an error."""
        async with asyncio.timeout(within):
            while True:
                try:
                    data = await self.stream.read()
                except ZenithError as exc:
                    return exc
                if data is None:
                    try:
                        await self.stream.finish()
                    except ZenithError as exc:
                        return exc
                    raise AssertionError("the server ended the transfer without an error")
                frame = decode_frame(data)
                if frame.type is FrameType.ACK:
                    self.acked = frame.message(Ack).lsn

    async def query(self, sql: str) -> list[list[str | None]]:
        """A plain query on the same connection (after the COPY ended)."""
        return (await self.conn.simple_query(sql)).rows


# -- a branch's history, fetched from a live pageserver ----------------------------------


@dataclass
class Source:
    """A branch as a pageserver sends it: the chain (root first) and every record of
    each timeline of it up to where the chain needs it."""

    chain: tuple[TimelineInfo, ...]
    records: dict[TimelineId, list[Record]]
    hashes: dict[TimelineId, bytes]  # the sender's RANGE_END hash at each timeline's end

    @property
    def tip(self) -> TimelineInfo:
        return self.chain[-1]

    def between(self, tid: TimelineId, after: int, upto: int) -> list[Record]:
        return [r for r in self.records[tid] if after < r.lsn <= upto]

    def hash_at(self, tid: TimelineId, lsn: int) -> bytes:
        return history_hash(self.records[tid], lsn)

    def offer(self, **changes: object) -> Offer:
        """The offer of this branch, its tip changed as given."""
        return Offer((*self.chain[:-1], dataclasses.replace(self.tip, **changes)))


def history_hash(records: Iterable[Record], lsn: int, start: bytes = EMPTY) -> bytes:
    """``zenith.storage.history`` over records (in stored order) with lsn <= ``lsn``."""
    folder = Folder(start)
    for r in records:
        if r.lsn <= lsn:
            folder.add(r.key, int(r.lsn), int(r.kind), r.payload)
    return folder.close()


async def fetch(uri: str, branch: str) -> Source:
    """Pull ``branch`` of the pageserver at ``uri`` as a raw receiver: every timeline of
    its chain in full, uncompressed; the sender's own hashes are kept to check ours."""
    async with await RawPeer.open(uri, f"branch_pull {branch}") as peer:
        offer = await peer.expect(Offer)
        assert isinstance(offer, Offer)
        await peer.send(Ask(()))
        await peer.expect(Proof)
        ranges = []
        for i, tl in enumerate(offer.chain):
            nxt = offer.chain[i + 1].ancestor_lsn if i + 1 < len(offer.chain) else None
            upto = nxt if nxt is not None else tl.last_record_lsn
            ranges.append(RangeRequest(tl.timeline_id, tl.start_lsn, upto, create=True))
        await peer.send(PlanMsg(Status.NEW, "hostile test", False, None, tuple(ranges)))
        records: dict[TimelineId, list[Record]] = {}
        hashes: dict[TimelineId, bytes] = {}
        for request in ranges:
            head = await peer.expect(Range)
            assert isinstance(head, Range) and head.request == request
            got: list[Record] = []
            while True:
                frame = await peer.recv()
                if frame.type is FrameType.DATA:
                    got.extend(decode_records(frame.body))
                    continue
                end = frame.message(RangeEnd)
                break
            assert end.records == len(got)
            assert history_hash(got, request.upto) == end.hash  # our hash is theirs
            records[request.timeline_id] = got
            hashes[request.timeline_id] = end.hash
        tip = offer.chain[-1]
        await peer.send(Done(TransferResult(Status.NEW, "", tip.timeline_id, None, None,
                                            tip.last_record_lsn, 0, 0, 0.0, False)))
        await peer.stream.finish()
    return Source(offer.chain, records, hashes)


# -- the receiver's repository, read from the test ---------------------------------------


def snapshot(ps_path: Path) -> list[tuple[object, ...]]:
    """Everything a pageserver's repository holds: every table and every data file's
    bytes (read-only; the server keeps running, with no transfer active)."""
    db = ps_path / "zenith.db"
    out: list[tuple[object, ...]] = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for table in ("timelines", "branches", "records", "batches", "history"):
            out += [(table, *r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2")]
    finally:
        conn.close()
    data_dir = db.with_name(db.name + ".d")
    for file in sorted(data_dir.iterdir()):
        out.append(("file", file.name, hashlib.sha256(file.read_bytes()).hexdigest()))
    return out


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def random_hash() -> bytes:
    return os.urandom(32)


def relabel(source: Source, tid: TimelineId) -> Source:
    """The same history under another (root) timeline id: a fresh victim timeline."""
    assert len(source.chain) == 1, "only a root timeline can be relabelled"
    old = source.tip.timeline_id
    return Source((dataclasses.replace(source.tip, timeline_id=tid),),
                  {tid: source.records[old]}, {tid: source.hashes[old]})


def server_holds(server_port: int, client_port: int) -> bool:
    """Whether the server still holds its end of our connection: an ESTABLISHED socket
    owned by a process (a socket closed with unsent data lingers orphaned, inode 0)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if int(local.split(":")[1], 16) == server_port and \
                int(remote.split(":")[1], 16) == client_port:
            return state == "01" and inode != "0"
    return False


def local_port(peer: RawPeer) -> int:
    return int(peer.conn._stream.writer.get_extra_info("sockname")[1])
