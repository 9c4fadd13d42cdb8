"""GC of page versions against the plain model (tests/storage/model.py): at random points
of random histories with branches, GC at random horizons must leave every read it
promises -- every LSN from the horizon on, every child's branch point, every LSN a read in
progress holds -- exactly as the model computes it, and remove what nothing can read."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.storage.model import Model, ModelTimeline
from zenith.errors import LsnOutOfRange
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.gc import needed
from zenith.storage.redo import make_patch

KEYS = [bytes([0] * 17 + [k]) for k in range(4)]


def _record(key: bytes, lsn: int, choice: int, salt: int) -> Record:
    if choice == 0:  # a third of them a block or more: compaction packs those
        size = 24 if salt % 3 else 4800
        return Record(key, Lsn(lsn), RecordKind.IMAGE, bytes([salt % 251]) * size)
    if choice == 1:
        return Record(key, Lsn(lsn), RecordKind.TOMBSTONE)
    return Record(key, Lsn(lsn), RecordKind.DELTA,
                  make_patch([(salt % 20, bytes([lsn % 256, salt % 256]))]))


# An operation: ("write", branch#, [(key#, kind choice)...]), ("branch", from#, lsn-pick),
# ("gc", branch#, horizon-pick), where picks are fractions turned into valid LSNs.
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3),
              st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 0, 1, 2, 2, 2])),
                       min_size=1, max_size=6)),
    st.tuples(st.just("branch"), st.integers(0, 3), st.floats(0, 1)),
    st.tuples(st.just("gc"), st.integers(0, 3), st.floats(0, 1)),
    # A push reading a branch's whole history while GC runs, and an export holding an
    # LSN while GC runs: neither may see a version missing.
    st.tuples(st.just("push"), st.integers(0, 3), st.floats(0, 1)),
    st.tuples(st.just("export"), st.integers(0, 3), st.floats(0, 1)),
    # A shallow copy of a branch to another repository from a readable LSN (after GCs):
    # it reads as the model from there on.
    st.tuples(st.just("copy"), st.integers(0, 3), st.floats(0, 1)),
    # Compaction of a branch's timeline while a read holds an LSN of it.
    st.tuples(st.just("compact"), st.integers(0, 3), st.floats(0, 1)),
), min_size=3, max_size=25)


class Harness:
    def __init__(self, repo: SqliteRepository, other: SqliteRepository | None = None) -> None:
        self.repo = repo
        self.other = other
        self.model = Model()
        self.lsn = 0x100
        self.readable: dict[TimelineId, int] = {}
        self.lsns: dict[TimelineId, list[int]] = {}
        info = repo.create_branch("b0")
        tid = info.timeline.timeline_id
        self.model.timelines[tid] = ModelTimeline(None, None, 0)
        self.model.branches["b0"] = tid
        self.readable[tid] = 0
        self.lsns[tid] = [0]

    def branch(self, n: int) -> str:
        names = sorted(self.model.branches)
        return names[n % len(names)]

    def write(self, name: str, changes: list[tuple[int, int]]) -> None:
        tid = self.repo.branch_for_writing(name).timeline_id
        records = []
        for i, (k, choice) in enumerate(changes):
            self.lsn += 8
            records.append(_record(KEYS[k], self.lsn, choice, self.lsn + i))
        self.repo.put_records(tid, records)
        self.model.timelines[tid].records += records
        self.model.timelines[tid].last = self.lsn
        self.lsns[tid] += [r.lsn for r in records]

    def create(self, source: str, pick: float) -> None:
        tid = self.model.branches[source]
        tl = self.model.timelines[tid]
        lo = self.readable[tid]
        candidates = [x for x in self.lsns[tid] if lo <= x <= tl.last]
        at = candidates[int(pick * (len(candidates) - 1))]
        name = f"b{len(self.model.branches)}"
        child = self.repo.create_branch(name, source, Lsn(at)).timeline.timeline_id
        self.model.timelines[child] = ModelTimeline(tid, at, at)
        self.model.branches[name] = child
        self.readable[child] = at
        self.lsns[child] = [at]

    def gc(self, name: str, pick: float, held: int | None = None) -> None:
        """GC ``name`` at a horizon picked in its readable range; ``held``: an LSN a read
        in progress holds, where the horizon must stop."""
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        lo = self.readable[tid]
        horizon = lo + int(pick * (tl.last - lo))
        expected = max(lo, min(horizon, held)) if held is not None else max(horizon, lo)
        before = {x: self.repo.digest(tid, Lsn(x)) for x in self.points(tid)
                  if x >= expected}
        result = self.repo.gc(tid, Lsn(horizon))
        assert result.horizon == expected
        self.readable[tid] = int(result.horizon)
        after = {x: self.repo.digest(tid, Lsn(x)) for x in before}
        assert after == before  # no readable state changed
        if result.horizon > lo:
            with pytest.raises(LsnOutOfRange):
                self.repo.get_value(tid, KEYS[0], Lsn(result.horizon - 1))

    def push_during_gc(self, name: str, pick: float) -> None:
        """A walk of the timeline's history from its readable start, started before a
        GC and finished after it: exactly the records the model holds there (the GC's
        horizon stops at the walk's start)."""
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        lo = self.readable[tid]
        walk = self.repo.iter_records(tid, Lsn(lo), Lsn(tl.last))
        first = next(walk, None)
        self.gc(name, pick, held=lo if first is not None else None)
        got = ([first] if first is not None else []) + list(walk)
        assert got == [r for r in tl.records if lo < r.lsn <= tl.last]

    def export_during_gc(self, name: str, pick: float) -> None:
        """An export holding an LSN of the readable range across a GC asked to move past
        it: the horizon stops there, and the export's reads stay the model's."""
        tid = self.model.branches[name]
        lsns = self.points(tid)
        at = lsns[int(pick * (len(lsns) - 1))]
        with self.repo.hold(tid, Lsn(at)):
            self.gc(name, 1.0, held=at)
            for key in KEYS:
                assert self.repo.get_value(tid, key, Lsn(at)) == self.model.value(tid, key, at)
        assert self.readable[tid] <= at

    def copy(self, name: str, pick: float) -> None:
        """A shallow copy, as a transfer makes it: the records a read at ``at`` needs,
        the history hash there, then the records after it, checked by their hash."""
        assert self.other is not None
        tid = self.model.branches[name]
        tl = self.model.timelines[tid]
        lsns = self.points(tid)
        at = Lsn(lsns[int(pick * (len(lsns) - 1))])
        copy = TimelineId.generate()
        self.other.create_shallow_timeline(copy, None, at)
        self.other.put_base(copy, self.repo.base_records(tid, at))
        self.other.finish_base(copy, self.repo.history_hash(tid, at))
        last = Lsn(tl.last)
        self.other.put_records(copy, list(self.repo.iter_records(tid, at, last)), last,
                               expect_hash=self.repo.history_hash(tid, last))
        for x in (p for p in lsns if p >= at):
            assert self.other.digest(copy, Lsn(x)) == self.model.digest(tid, x), hex(x)

    def compact(self, name: str, pick: float) -> None:
        """Compaction while a read at a readable LSN is under way (it looked up places the
        moves change): that read, and every read after, stay the model's."""
        tid = self.model.branches[name]
        lsns = self.points(tid)
        at = lsns[int(pick * (len(lsns) - 1))]
        reading = self.repo.materialize(tid, Lsn(at))
        first = next(reading, None)
        self.repo.compact(tid, wait=0.0)
        got = dict(([first] if first is not None else []) + list(reading))
        assert got == {k: v for k in KEYS
                       if (v := self.model.value(tid, k, at)) is not None}

    def points(self, tid: TimelineId) -> list[int]:
        """LSNs worth reading on ``tid``: every record LSN and its readable start."""
        tl = self.model.timelines[tid]
        lo = self.readable[tid]
        return sorted({x for x in self.lsns[tid] if lo <= x <= tl.last} | {lo, tl.last})

    def check(self) -> None:
        for tid, tl in self.model.timelines.items():
            for x in self.points(tid):
                for key in KEYS:
                    assert self.repo.get_value(tid, key, Lsn(x)) == \
                        self.model.value(tid, key, x), (tid, key.hex(), hex(x))
            if tl.ancestor is not None:  # the child's start reads the ancestor there
                assert self.repo.digest(tid, Lsn(self.readable[tid])) == \
                    self.model.digest(tid, self.readable[tid])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(program=ops)
def test_gc_keeps_every_promised_read(tmp_path_factory: pytest.TempPathFactory,
                                      program: list[tuple[object, ...]]) -> None:
    path = tmp_path_factory.mktemp("gc") / "r.db"
    repo = open_repository(path, durable=False)
    other = open_repository(path.with_name("o.db"), durable=False)
    try:
        h = Harness(repo, other)
        for op in program:
            if op[0] == "write":
                h.write(h.branch(int(op[1])), list(op[2]))  # type: ignore[arg-type]
            elif op[0] == "branch":
                h.create(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            elif op[0] == "gc":
                h.gc(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            elif op[0] == "push":
                h.push_during_gc(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            elif op[0] == "copy":
                h.copy(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            elif op[0] == "compact":
                h.compact(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            else:
                h.export_during_gc(h.branch(int(op[1])), float(op[2]))  # type: ignore[arg-type]
            h.check()
    finally:
        repo.close()
        other.close()


def test_gc_removes_what_nothing_reads_and_counts_it(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        key = KEYS[0]
        lsn = 0x100
        for _round in range(10):  # 10 images of 8 KiB, each followed by 4 deltas
            repo.put_records(tid, [Record(key, Lsn(lsn), RecordKind.IMAGE, bytes(8192))])
            lsn += 8
            for d in range(4):
                repo.put_records(tid, [Record(key, Lsn(lsn), RecordKind.DELTA,
                                              make_patch([(d, b"x")]))])
                lsn += 8
        child_at = Lsn(0x100 + 8 * 12)  # inside the third round: image at 0x100 + 80
        repo.create_branch("child", "main", child_at)
        last = repo.get_timeline(tid).last_record_lsn
        result = repo.gc(tid, last)
        # Kept: the child's point (image of round 3 and its 2 deltas up to it) and the
        # last round's image and 4 deltas; removed: the other 8 rounds and 2 deltas.
        assert result.kept_points == (child_at,)
        assert result.records_removed == 50 - 3 - 5
        assert result.bytes_removed == repo.garbage(tid)
        assert result.bytes_removed >= 8 * 8192
        assert repo.get_timeline(tid).min_readable_lsn == last
        with pytest.raises(LsnOutOfRange):
            repo.create_branch("late", "main", child_at)
        # Again: nothing more to remove, the horizon stays.
        again = repo.gc(tid, Lsn(0x100))
        assert again.horizon == last and again.records_removed == 0
        with pytest.raises(LsnOutOfRange):
            repo.gc(tid, Lsn(last + 8))
    finally:
        repo.close()


def test_a_held_read_keeps_its_versions(tmp_path: Path) -> None:
    """A digest running at an old LSN when GC starts reads the state it started on."""
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        for rnd in range(3):
            repo.put_records(tid, [Record(bytes([0] * 14) + k.to_bytes(4, "big"),
                                          Lsn(0x1000 * (rnd + 1)), RecordKind.IMAGE,
                                          bytes([rnd]) * 16) for k in range(2000)])
        old = Lsn(0x1000)
        expected = repo.digest(tid, old)
        it = repo.materialize(tid, old)
        first = next(it)  # the read holds 0x1000 from here
        result = repo.gc(tid, Lsn(0x3000))
        assert result.horizon == old  # stopped at the read: nothing below it to remove
        assert result.records_removed == 0
        rest = list(it)
        assert [first, *rest] == list(_values(2000, 0))
        assert repo.digest(tid, old) == expected
        # Once the read is over, a later GC moves on and removes rounds 1 and 2.
        again = repo.gc(tid, Lsn(0x3000))
        assert (again.horizon, again.records_removed) == (Lsn(0x3000), 4000)
        with pytest.raises(LsnOutOfRange):
            repo.digest(tid, old)
    finally:
        repo.close()


def _values(n: int, rnd: int) -> list[tuple[bytes, bytes]]:
    return [(bytes([0] * 14) + k.to_bytes(4, "big"), bytes([rnd]) * 16) for k in range(n)]


def test_reads_racing_gc_never_see_a_partial_chain(tmp_path: Path) -> None:
    """get_value in threads at LSNs just above and below a moving horizon: each read is
    either the model's value or refused as before the readable start, never wrong."""
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        key = KEYS[1]
        model = Model()
        model.timelines[tid] = ModelTimeline(None, None, 0)
        lsn, records = 0x100, []
        for i in range(400):
            records.append(_record(key, lsn, 0 if i % 5 == 0 else 2, i))
            lsn += 8
        repo.put_records(tid, records)
        model.timelines[tid].records = records
        wrong: list[str] = []
        stop = threading.Event()

        def reader(offset: int) -> None:
            n = offset
            while not stop.is_set():
                at = records[n % len(records)].lsn
                n += 7
                try:
                    got = repo.get_value(tid, key, at)
                except LsnOutOfRange:
                    continue
                if got != model.value(tid, key, at):
                    wrong.append(hex(at))

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            for cut in range(0x100, lsn, 8 * 20):
                repo.gc(tid, Lsn(cut), batch_rows=3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not wrong
    finally:
        repo.close()


def test_needed_is_the_suffix_from_the_base_for_each_point() -> None:
    image, delta, tomb = int(RecordKind.IMAGE), int(RecordKind.DELTA), int(RecordKind.TOMBSTONE)
    lsns = [10, 20, 30, 40, 50, 60]
    kinds = [delta, image, delta, tomb, delta, delta]
    assert needed(lsns, kinds, [5]) == set()
    assert needed(lsns, kinds, [10]) == {0}  # a delta on the ancestor's value
    assert needed(lsns, kinds, [35]) == {1, 2}
    assert needed(lsns, kinds, [60]) == {3, 4, 5}
    assert needed(lsns, kinds, [25, 60]) == {1, 3, 4, 5}


def test_removed_payloads_are_punched_out_and_never_walked(tmp_path: Path) -> None:
    from zenith.storage.datafile import HistoryCollected

    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        keys = [bytes([0] * 14) + k.to_bytes(4, "big") for k in range(256)]
        for rnd in range(9):  # 9 rounds of 256 pages of 8 KiB: 18 MiB
            repo.put_records(tid, [Record(k, Lsn(0x10000 * (rnd + 1)), RecordKind.IMAGE,
                                          bytes([rnd + 1]) * 8192) for k in keys])
        data = next((tmp_path / "r.db.d").iterdir())
        before = data.stat().st_blocks * 512
        head = repo.get_timeline(tid).last_record_lsn
        # A walk in progress holds the file: GC removes from the index, punches nothing
        # (the walk reads after the horizon, which it would otherwise stop at).
        walker = repo.iter_records(tid, Lsn(0x80000), head)
        next(walker)
        first = repo.gc(tid, Lsn(0x80000))
        assert first.records_removed == 7 * 256 and first.bytes_reclaimed == 0
        assert data.stat().st_blocks * 512 == before
        walker.close()
        # The next GC finds nothing new to remove but gives the space back.
        second = repo.gc(tid, Lsn(0x80000))
        assert second.records_removed == 0
        assert second.bytes_reclaimed >= 7 * 256 * 4096  # at least one block a payload
        after = data.stat().st_blocks * 512
        assert after < before - 7 * 256 * 4096, (before, after)
        assert data.stat().st_size >= 18 << 20  # offsets stay: only holes
        # Every read still answers; a walk into the removed history is refused, one
        # after the horizon is whole.
        assert repo.digest(tid, head) == repo.digest(tid, head)
        for k in keys[:5]:
            assert repo.get_value(tid, k, head) == bytes([9]) * 8192
            assert repo.get_value(tid, k, Lsn(0x80000)) == bytes([8]) * 8192
        with pytest.raises(HistoryCollected):
            list(repo.iter_records(tid, Lsn(0), head))
        assert len(list(repo.iter_records(tid, Lsn(0x70000), head))) == 512
    finally:
        repo.close()
