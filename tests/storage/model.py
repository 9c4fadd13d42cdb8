"""A plain in-memory model of the repository, the oracle of the storage tests.

It keeps every record in a list and computes a value by folding, from the root ancestor
down, every record at or below the requested LSN — no indexes, no early exits — so it
shares no algorithm with the engine under test.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from zenith.ids import TimelineId
from zenith.storage import Record, RecordKind
from zenith.storage.redo import apply_delta


@dataclass
class ModelTimeline:
    ancestor: TimelineId | None
    ancestor_lsn: int | None
    last: int
    records: list[Record] = field(default_factory=list)


class Model:
    def __init__(self) -> None:
        self.timelines: dict[TimelineId, ModelTimeline] = {}
        self.branches: dict[str, TimelineId] = {}

    def chain(self, tid: TimelineId, lsn: int) -> list[tuple[TimelineId, int]]:
        out = [(tid, lsn)]
        tl = self.timelines[tid]
        while tl.ancestor is not None:
            assert tl.ancestor_lsn is not None
            out.append((tl.ancestor, tl.ancestor_lsn))
            tl = self.timelines[tl.ancestor]
        return out[::-1]

    def value(self, tid: TimelineId, key: bytes, lsn: int) -> bytes | None:
        value: bytes | None = None
        for t, bound in self.chain(tid, lsn):
            mine = [r for r in self.timelines[t].records if r.key == key and r.lsn <= bound]
            for rec in sorted(mine, key=lambda r: r.lsn):
                if rec.kind is RecordKind.IMAGE:
                    value = rec.payload
                elif rec.kind is RecordKind.TOMBSTONE:
                    value = None
                else:
                    value = apply_delta(value, rec.payload)
        return value

    def keys(self, tid: TimelineId) -> set[bytes]:
        return {r.key for t, _ in self.chain(tid, 0) for r in self.timelines[t].records}

    def digest(self, tid: TimelineId, lsn: int) -> str:
        h = hashlib.sha256()
        for key in sorted(self.keys(tid)):
            v = self.value(tid, key, lsn)
            if v is not None:
                h.update(key + struct.pack(">I", len(v)) + v)
        return h.hexdigest()

    def drop_unreferenced(self, tid: TimelineId | None) -> None:
        while tid is not None:
            if tid in self.branches.values() or any(
                t.ancestor == tid for t in self.timelines.values()
            ):
                return
            tid = self.timelines.pop(tid).ancestor
