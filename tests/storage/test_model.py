"""A hypothesis state machine: random timelines, branches at random LSNs, batches of images,
deltas and tombstones, and reads of every key at every LSN checked against the model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.storage.model import Model, ModelTimeline
from zenith.errors import HistoryImmutable, LsnOutOfRange
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, open_repository
from zenith.storage.redo import make_patch

KEYS = [bytes([0] * 17 + [n]) for n in range(5)]

record_spec = st.tuples(
    st.sampled_from(range(len(KEYS))),
    st.sampled_from([RecordKind.IMAGE, RecordKind.DELTA, RecordKind.TOMBSTONE]),
    st.binary(min_size=0, max_size=12),
    st.integers(min_value=0, max_value=16),
)


class RepositoryMachine(RuleBasedStateMachine):
    branches = Bundle("branches")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="zenith-model-"))
        self.repo = open_repository(self.dir / "db", durable=False)
        self.model = Model()
        self.counter = 0

    def teardown(self) -> None:
        self.repo.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _name(self) -> str:
        self.counter += 1
        return f"b{self.counter}"

    @initialize(target=branches)
    def root(self) -> str:
        name = self._name()
        info = self.repo.create_branch(name)
        self.model.timelines[info.timeline.timeline_id] = ModelTimeline(None, None, 0)
        self.model.branches[name] = info.timeline.timeline_id
        return name

    @rule(target=branches)
    def new_root(self) -> str:
        return self.root()

    @rule(target=branches, source=branches, frac=st.floats(0, 1))
    def branch(self, source: str, frac: float) -> str:
        tid = self.model.branches[source]
        tl = self.model.timelines[tid]
        start = tl.ancestor_lsn or 0
        lsn = start + int((tl.last - start) * frac)
        name = self._name()
        info = self.repo.create_branch(name, source, Lsn(lsn))
        assert info.timeline.ancestor_id == tid and info.timeline.ancestor_lsn == lsn
        self.model.timelines[info.timeline.timeline_id] = ModelTimeline(tid, lsn, lsn)
        self.model.branches[name] = info.timeline.timeline_id
        return name

    @rule(
        name=branches,
        specs=st.lists(record_spec, min_size=0, max_size=6),
        gap=st.integers(1, 5),
        extra=st.integers(0, 3),
    )
    def write(
        self, name: str, specs: list[tuple[int, RecordKind, bytes, int]], gap: int, extra: int
    ) -> None:
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        lsn = tl.last
        records, seen = [], set()
        for k, kind, data, offset in specs:
            lsn += gap if (k, lsn) in seen or not records else 0
            seen.add((k, lsn))
            if kind is RecordKind.IMAGE:
                payload = data
            elif kind is RecordKind.DELTA:
                payload = make_patch([(offset, data)])
            else:
                payload = b""
            records.append(Record(KEYS[k], Lsn(lsn), kind, payload))
        new_last = max(lsn, tl.last) + extra
        result = self.repo.put_records(tid, records, Lsn(new_last))
        assert result.last_record_lsn == new_last and result.records == len(records)
        tl.records += records
        tl.last = new_last

    @rule(name=branches, back=st.integers(0, 3))
    def rewrite_history_is_refused(self, name: str, back: int) -> None:
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        if tl.last == 0:
            return
        try:
            self.repo.put_records(
                tid, [Record(KEYS[0], Lsn(max(1, tl.last - back)), RecordKind.IMAGE, b"evil")]
            )
        except HistoryImmutable:
            pass
        else:
            raise AssertionError("rewriting history was accepted")

    @precondition(lambda self: len(self.model.branches) > 1)
    @rule(name=consumes(branches))
    def delete(self, name: str) -> None:
        tid = self.model.branches.pop(name)
        self.repo.delete_branch(name)
        self.model.drop_unreferenced(tid)

    @rule(name=branches, frac=st.floats(0, 1))
    def digest(self, name: str, frac: float) -> None:
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        start = tl.ancestor_lsn or 0
        lsn = start + int((tl.last - start) * frac)
        assert self.repo.digest(tid, Lsn(lsn)) == self.model.digest(tid, lsn)

    @invariant()
    def every_read_matches(self) -> None:
        for name, tid in self.model.branches.items():
            tl = self.model.timelines[tid]
            start = tl.ancestor_lsn or 0
            for lsn in range(start, tl.last + 1):
                for key in KEYS:
                    got = self.repo.get_value(tid, key, Lsn(lsn))
                    assert got == self.model.value(tid, key, lsn), (name, key, lsn)
            if start > 0:
                try:
                    self.repo.get_value(tid, KEYS[0], Lsn(start - 1))
                except LsnOutOfRange:
                    pass
                else:
                    raise AssertionError("read before the branch point was accepted")
        stored = {t.timeline_id for t in self.repo.list_timelines()}
        assert stored == set(self.model.timelines)
        for tid, tl in self.model.timelines.items():
            got = list(self.repo.iter_records(tid, Lsn(0), Lsn(tl.last)))
            assert sorted(got, key=lambda r: (r.lsn, r.key)) == sorted(
                tl.records, key=lambda r: (r.lsn, r.key)
            )
            assert [r.lsn for r in got] == sorted(r.lsn for r in got)


RepositoryMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRepositoryModel = RepositoryMachine.TestCase
