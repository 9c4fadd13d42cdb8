"""The sender and receiver over an in-memory channel: cutting the stream into frames at
any size and interrupting it at any frame leaves the receiver with the same repository as
one clean transfer (frames may end inside one LSN; resume continues from the cursor)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.transfer.receiver import receive_branch
from zenith.transfer.sender import send_branch

T = TypeVar("T")


class Pipe:
    """One direction of an in-memory CopyBoth stream; ``cut_after`` writes it breaks."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()


class End:
    def __init__(self, inbox: Pipe, outbox: Pipe, cut_after: int = 0) -> None:
        self.inbox, self.outbox, self.cut_after, self.writes = inbox, outbox, cut_after, 0

    async def read(self) -> bytes | None:
        return await self.inbox.queue.get()

    def abort(self, reason: str) -> None:
        self.outbox.queue.put_nowait(None)

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.cut_after and self.writes > self.cut_after:
            await self.outbox.queue.put(None)  # the peer sees the stream end
            raise ConnectionError("cut")
        await self.outbox.queue.put(data)


async def closing(outbox: Pipe, side: Coroutine[Any, Any, T]) -> T:
    """Run one side; once it ends, however, its peer reads the end of the stream, as when a
    connection closes (else a peer still reading, say an ACK reader whose cancellation
    came with an ACK, waits out the silence timeout: 5 s, in some interrupted runs)."""
    try:
        return await side
    finally:
        outbox.queue.put_nowait(None)


async def transfer(src: SqliteRepository, dst: SqliteRepository, *, target: int,
                   cut_after: int = 0) -> bool:
    a, b = Pipe(), Pipe()
    chain = src.ancestry(src.get_branch("main").timeline.timeline_id)
    sender = closing(a, send_branch(End(b, a, cut_after), src, chain, frame_target=target,
                                    timeout=5))
    receiver = closing(b, receive_branch(End(a, b), dst, "main", pushing=True, timeout=5))
    results = await asyncio.gather(sender, receiver, return_exceptions=True)
    return not any(isinstance(r, BaseException) for r in results)


def make_source(path: Path, spec: list[int]) -> SqliteRepository:
    """A branch whose LSNs hold ``spec[i]`` records each; the first is import-sized."""
    repo = open_repository(path, durable=False)
    tid = repo.create_branch("main").timeline.timeline_id
    n = 0
    for i, count in enumerate(spec):
        recs = [Record((n + j).to_bytes(18, "big"), Lsn(1000 * (i + 1)), RecordKind.IMAGE,
                       bytes([j % 256]) * (100 + j % 900)) for j in range(count)]
        n += count
        repo.put_records(tid, recs)
    return repo


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.lists(st.integers(1, 40), min_size=1, max_size=5).map(lambda s: [300, *s]),
    target=st.integers(200, 20_000),
    cuts=st.lists(st.integers(1, 30), max_size=3),
)
def test_any_split_and_interruption_gives_the_same_repository(
    tmp_path_factory: pytest.TempPathFactory, spec: list[int], target: int, cuts: list[int]
) -> None:
    base = tmp_path_factory.mktemp("split")
    src = make_source(base / "src.db", spec)
    dst = open_repository(base / "dst.db", durable=False)
    try:
        for cut in cuts:  # interrupted runs: each keeps a consistent prefix
            asyncio.run(transfer(src, dst, target=target, cut_after=cut))
            for tl in dst.list_timelines():
                assert dst.history_hash(tl.timeline_id, tl.last_record_lsn) == \
                    src.history_hash(tl.timeline_id, tl.last_record_lsn)
        assert asyncio.run(transfer(src, dst, target=target))
        s, d = src.get_branch("main").timeline, dst.get_branch("main").timeline
        assert (d.timeline_id, d.last_record_lsn, d.pending) == \
            (s.timeline_id, s.last_record_lsn, None)
        assert dst.digest(d.timeline_id, d.last_record_lsn) == \
            src.digest(s.timeline_id, s.last_record_lsn)
        assert list(dst.iter_records(d.timeline_id, Lsn(0), d.last_record_lsn)) == \
            list(src.iter_records(s.timeline_id, Lsn(0), s.last_record_lsn))
    finally:
        src.close()
        dst.close()
