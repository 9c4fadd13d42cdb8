"""A sender holds its offered chain against GC until the plan is known, then only where
each planned range starts: a long incremental push of a followed branch no longer stops
its GC at the branch's start."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.transfer.test_stream_split import End, Pipe
from zenith.lsn import Lsn
from zenith.storage import GcResult, Record, RecordKind, SqliteRepository, open_repository
from zenith.transfer.messages import FrameType
from zenith.transfer.receiver import receive_branch
from zenith.transfer.sender import send_branch

KEYS = [k.to_bytes(18, "big") for k in range(50)]


def _round(repo: SqliteRepository, lsn: int, salt: int) -> None:
    tid = repo.get_branch("main").timeline.timeline_id
    repo.put_records(tid, [Record(k, Lsn(lsn + i), RecordKind.IMAGE, bytes([salt]) * 64)
                           for i, k in enumerate(KEYS)])


class GcOnFirstRange(End):
    """The receiver's end: when the sender's first RANGE arrives (the sender planned and
    holds what it will send), GC the source up to its head."""

    def __init__(self, inbox: Pipe, outbox: Pipe, src: SqliteRepository) -> None:
        super().__init__(inbox, outbox)
        self.src, self.result = src, None

    async def read(self) -> bytes | None:
        data = await super().read()
        if data and data[0] == FrameType.RANGE and self.result is None:
            tid = self.src.get_branch("main").timeline.timeline_id
            head = self.src.get_timeline(tid).last_record_lsn
            self.result = await asyncio.to_thread(self.src.gc, tid, head)
        return data


async def push(src: SqliteRepository, dst: SqliteRepository) -> GcResult | None:
    a, b = Pipe(), Pipe()
    chain = src.ancestry(src.get_branch("main").timeline.timeline_id)
    end = GcOnFirstRange(a, b, src)
    await asyncio.gather(send_branch(End(b, a), src, chain, timeout=5),
                         receive_branch(end, dst, "main", pushing=True, timeout=5))
    return end.result


def test_gc_moves_up_to_where_a_planned_range_starts(tmp_path: Path) -> None:
    src = open_repository(tmp_path / "src.db", durable=False)
    dst = open_repository(tmp_path / "dst.db", durable=False)
    try:
        src.create_branch("main")
        _round(src, 0x1000, 1)
        first = asyncio.run(push(src, dst))  # a whole copy: held from the start
        assert first is not None and first.horizon == Lsn(0)
        held = dst.get_branch("main").timeline.last_record_lsn
        _round(src, 0x2000, 2)
        _round(src, 0x3000, 3)
        # The incremental push sends (held, head]: GC may collect below held meanwhile.
        second = asyncio.run(push(src, dst))
        assert second is not None and second.horizon == held
        assert second.records_removed == 0  # every key's version at held is still read
        tid = src.get_branch("main").timeline.timeline_id
        head = src.get_timeline(tid).last_record_lsn
        assert dst.digest(tid, head) == src.digest(tid, head)
    finally:
        src.close()
        dst.close()
