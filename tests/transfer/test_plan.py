"""Negotiation as a pure function of the offer, the proofs and the receiver's repository
(DESIGN §6): every case, the identity rules and the write rules, without I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, TimelineInfo, open_repository
from zenith.transfer.messages import Point, Status
from zenith.transfer.plan import make_plan, points_to_prove


def key(n: int) -> bytes:
    return n.to_bytes(18, "big")


def fill(repo: SqliteRepository, tid: TimelineId, lsns: range) -> TimelineInfo:
    repo.put_records(tid, [Record(key(n), Lsn(n), RecordKind.IMAGE, b"v%d" % n) for n in lsns])
    return repo.get_timeline(tid)


@pytest.fixture
def src(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "src.db", durable=False)
    yield r
    r.close()


@pytest.fixture
def dst(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "dst.db", durable=False)
    yield r
    r.close()


def copy(src: SqliteRepository, dst: SqliteRepository, tl: TimelineInfo, upto: Lsn,
         name: str | None = None) -> None:
    """Receive ``tl`` up to ``upto`` as a transfer would."""
    try:
        dst.get_timeline(tl.timeline_id)
    except Exception:
        dst.create_timeline(tl.timeline_id, (tl.ancestor_id, tl.ancestor_lsn)
                            if tl.ancestor_id and tl.ancestor_lsn is not None else None,
                            received=True)
    have = dst.get_timeline(tl.timeline_id).last_record_lsn
    dst.put_records(tl.timeline_id, list(src.iter_records(tl.timeline_id, have, upto)), upto)
    if name:
        dst.set_branch(name, tl.timeline_id)


def plan(src: SqliteRepository, dst: SqliteRepository, name: str, tid: TimelineId, *,
         pushing: bool = True, force: bool = False, lie: bool = False):  # type: ignore[no-untyped-def]
    chain = tuple(reversed(src.ancestry(tid)))
    points = points_to_prove(dst, chain)
    mismatched = {}
    for p in points:
        theirs = bytes(32) if lie else src.history_hash(p.timeline_id, p.lsn)
        if theirs != dst.history_hash(p.timeline_id, p.lsn):
            mismatched[p.timeline_id] = p.lsn
    return points, make_plan(dst, name, chain, mismatched, pushing=pushing, force=force)


def test_new_then_incremental_then_up_to_date(src: SqliteRepository,
                                              dst: SqliteRepository) -> None:
    main = src.create_branch("main").timeline.timeline_id
    tl = fill(src, main, range(1, 11))
    points, p = plan(src, dst, "main", main)
    assert points == [] and p.status is Status.NEW
    assert [(s.request.after, s.request.upto, s.request.create) for s in p.sends] == \
        [(Lsn(0), Lsn(10), True)]
    copy(src, dst, tl, Lsn(10), "main")
    tl = fill(src, main, range(11, 15))
    points, p = plan(src, dst, "main", main)
    assert points == [Point(main, Lsn(10))]  # proven where both hold it
    assert p.status is Status.FAST_FORWARD
    assert [(s.request.after, s.request.upto, s.request.create) for s in p.sends] == \
        [(Lsn(10), Lsn(14), False)]
    copy(src, dst, tl, Lsn(14))
    _, p = plan(src, dst, "main", main)
    assert p.status is Status.UP_TO_DATE and p.sends == []


def test_a_lying_proof_is_diverged_even_with_force(src: SqliteRepository,
                                                   dst: SqliteRepository) -> None:
    main = src.create_branch("main").timeline.timeline_id
    tl = fill(src, main, range(1, 11))
    copy(src, dst, tl, Lsn(10), "main")
    fill(src, main, range(11, 15))
    for force in (False, True):
        _, p = plan(src, dst, "main", main, force=force, lie=True)
        assert p.status is Status.REJECTED and "histories diverged" in p.message
        assert "one timeline id cannot hold two histories" in p.message
    # Even under another destination name: the timeline itself is the same id.
    _, p = plan(src, dst, "evil", main, lie=True)
    assert p.status is Status.REJECTED


def test_same_id_other_history_is_caught(src: SqliteRepository,
                                         dst: SqliteRepository) -> None:
    """Scenario 2's root cause: a timeline id holding two histories. The receiver has
    records the sender does not; the proof at the receiver's LSN differs."""
    tid = TimelineId.generate()
    src.create_timeline(tid)
    src.set_branch("main", tid)
    fill(src, tid, range(1, 21))
    dst.create_timeline(tid, received=True)
    dst.set_branch("main", tid)
    dst.put_records(tid, [Record(key(n), Lsn(n), RecordKind.IMAGE, b"other") for n in
                          range(1, 6)], Lsn(5))
    _, p = plan(src, dst, "cmain", tid)
    assert p.status is Status.REJECTED and "histories diverged" in p.message


def test_never_moves_another_branch(src: SqliteRepository, dst: SqliteRepository) -> None:
    main = src.create_branch("main").timeline.timeline_id
    tl = fill(src, main, range(1, 11))
    copy(src, dst, tl, Lsn(10), "main")
    fill(src, main, range(11, 15))
    # A second name for main's timeline would move with main: refused.
    _, p = plan(src, dst, "evil", main)
    assert p.status is Status.REJECTED and "is already named main" in p.message
    # A branch of main's timeline beyond where the receiver's main is: sending it would
    # extend the timeline main names, i.e. move main.
    dev = src.create_branch("dev", "main").timeline.timeline_id
    fill(src, dev, range(15, 17))
    _, p = plan(src, dst, "dev", dev)
    assert p.status is Status.REJECTED and "writes only dev's own timelines" in p.message
    assert "(by main)" in p.message and "transfer main first" in p.message
    # Once main itself is transferred, dev needs nothing of it.
    copy(src, dst, src.get_timeline(main), Lsn(14))
    _, p = plan(src, dst, "dev", dev)
    assert p.status is Status.NEW and [s.timeline.timeline_id for s in p.sends] == [dev]


def test_never_receives_a_timeline_it_writes(src: SqliteRepository,
                                             dst: SqliteRepository) -> None:
    tid = TimelineId.generate()
    for repo in (src, dst):
        repo.create_timeline(tid, received=repo is src)
        repo.set_branch("main", tid)
    fill(src, tid, range(1, 11))
    fill(dst, tid, range(1, 6))  # the same records: the proof passes
    _, p = plan(src, dst, "main", tid)
    assert p.status is Status.REJECTED and "written by this pageserver" in p.message


def test_unnamed_ancestor_is_extended_and_pending_resumes(
    src: SqliteRepository, dst: SqliteRepository
) -> None:
    main = src.create_branch("main").timeline.timeline_id
    fill(src, main, range(1, 11))
    dev = src.create_branch("dev", "main").timeline.timeline_id
    tl = fill(src, dev, range(11, 16))
    _, p = plan(src, dst, "dev", dev)
    assert [(s.timeline.timeline_id, s.request.upto) for s in p.sends] == \
        [(main, Lsn(10)), (dev, Lsn(15))]
    copy(src, dst, src.get_timeline(main), Lsn(10))
    copy(src, dst, tl, Lsn(15), "dev")
    fill(src, main, range(16, 20))
    _, p = plan(src, dst, "main", main)  # main's timeline is unnamed there: extend it
    assert p.status is Status.NEW
    assert [(s.request.after, s.request.upto) for s in p.sends] == [(Lsn(10), Lsn(19))]
    # An interrupted transfer left part of one LSN: the plan resumes after it.
    dst.put_records(main, list(src.iter_records(main, Lsn(10), Lsn(16))), partial=True)
    _, p = plan(src, dst, "main", main)
    (send,) = p.sends
    assert send.request.after == Lsn(10)
    assert send.request.resume is not None and send.request.resume.lsn == Lsn(16)
    assert send.request.resume.count == 1


def test_diverged_descendant_and_fast_forward_cases(src: SqliteRepository,
                                                    dst: SqliteRepository) -> None:
    main = src.create_branch("main").timeline.timeline_id
    tl = fill(src, main, range(1, 11))
    copy(src, dst, tl, Lsn(10), "main")
    # Destination forks (new history of its own), source goes on: diverged both ways.
    fork = dst.branch_for_writing("main").timeline_id
    fill(dst, fork, range(11, 13))
    fill(src, main, range(11, 15))
    _, p = plan(src, dst, "main", main)
    assert p.status is Status.REJECTED and "histories diverged" in p.message
    _, p = plan(src, dst, "main", main, pushing=False)
    assert p.status is Status.REJECTED
    _, p = plan(src, dst, "main", main, force=True)
    assert p.status is Status.FORCED
    # Pulling a source the destination descends from, at its end: up to date.
    _, p = plan(src, dst, "x", main, pushing=False)
    assert p.status is Status.NEW


# -- shallow copies: where a new copy starts (plan._base) ---------------------------------

def _tl(start: int | None, last: int, readable: int, whole_after: int = 0,
        parent: TimelineInfo | None = None) -> TimelineInfo:
    return TimelineInfo(TimelineId.generate(), parent.timeline_id if parent else None,
                        Lsn(start) if start is not None else None, Lsn(last), Lsn(readable),
                        collected_lsn=Lsn(whole_after))


def test_a_new_copy_starts_where_asked_and_the_sender_can() -> None:
    from zenith.transfer.plan import _base

    root = _tl(None, 0x500, 0x100)
    child = _tl(0x300, 0x900, 0x300, parent=root)
    assert _base((root,), 0, Lsn(0)) is None  # all of it
    assert _base((root,), 0, Lsn(0x280)) == (0, Lsn(0x280))
    assert _base((root,), 0, Lsn(0x50)) == (0, Lsn(0x100))  # not readable before 0x100
    assert _base((root, child), 0, Lsn(0x400)) == (1, Lsn(0x400))
    assert _base((root, child), 0, Lsn(0x300)) == (1, Lsn(0x300))  # fewer timelines
    assert _base((root, child), 0, Lsn(0x200)) == (0, Lsn(0x200))
    assert _base((root, child), 0, Lsn(0xA00)) is None  # beyond its end: nothing fits
    # The sender's GC removed history: the copy starts where its history is whole.
    collected = _tl(None, 0x500, 0x280, whole_after=0x250)
    assert _base((collected,), 0, Lsn(0)) == (0, Lsn(0x280))
    gc_child = _tl(0x300, 0x900, 0x450, whole_after=0x440, parent=root)
    assert _base((root, gc_child), 0, Lsn(0)) == (1, Lsn(0x450))
    # A chain offered from a shallow copy: its root has an ancestor the sender lacks.
    shallow = _tl(0x300, 0x900, 0x400, whole_after=0x400, parent=root)
    assert _base((shallow,), 0, Lsn(0)) == (0, Lsn(0x400))


def test_a_held_timeline_behind_collected_history_is_refused(
        src: SqliteRepository, dst: SqliteRepository) -> None:
    tid = src.create_branch("main").timeline.timeline_id
    fill(src, tid, range(0x100, 0x110))
    copy(src, dst, src.get_timeline(tid), Lsn(0x10F), "main")
    for n in range(3):  # every key rewritten: GC can remove the old versions
        src.put_records(tid, [Record(key(k), Lsn(0x200 + 0x20 * n + k), RecordKind.IMAGE,
                                     b"w") for k in range(0x100, 0x110)])
    assert src.gc(tid, src.get_timeline(tid).last_record_lsn).records_removed > 0
    _, p = plan(src, dst, "main", tid)
    assert p.status is Status.REJECTED
    assert "holds its history only from" in p.message and "shallow" in p.message
    assert "delete the branch main here" in p.message
    # Held unnamed (a branch here starts on it): the remedy names the timeline.
    dst.create_branch("child", "main", Lsn(0x108))
    dst.delete_branch("main")
    _, p = plan(src, dst, "main", tid)
    assert p.status is Status.REJECTED
    assert f"zenith timeline delete {tid}" in p.message, p.message


def _shallow_copy(src: SqliteRepository, dst: SqliteRepository, tid: TimelineId, at: Lsn,
                  name: str) -> None:
    """What a shallow transfer of ``tid`` from ``at`` leaves on ``dst``."""
    tl = src.get_timeline(tid)
    dst.create_shallow_timeline(tid, (tl.ancestor_id, tl.ancestor_lsn)
                                if tl.ancestor_id and tl.ancestor_lsn is not None else None, at)
    dst.put_base(tid, src.base_records(tid, at))
    dst.finish_base(tid, src.history_hash(tid, at))
    dst.put_records(tid, list(src.iter_records(tid, at, tl.last_record_lsn)),
                    tl.last_record_lsn, expect_hash=src.history_hash(tid, tl.last_record_lsn))
    dst.set_branch(name, tid)


def _main_and_dev(src: SqliteRepository) -> tuple[TimelineId, TimelineId]:
    """main with records at 0x100..0x10F, dev from it at 0x104 with its own at 0x120.."""
    main = src.create_branch("main").timeline.timeline_id
    fill(src, main, range(0x100, 0x110))
    dev = src.create_branch("dev", "main", Lsn(0x104)).timeline.timeline_id
    fill(src, dev, range(0x120, 0x128))
    return main, dev


def test_a_branch_on_a_shallow_copy_is_diverged_not_missing(
        src: SqliteRepository, dst: SqliteRepository) -> None:
    _main, dev = _main_and_dev(src)
    _shallow_copy(src, dst, dev, Lsn(0x124), "dev")  # its ancestor main is not held there
    other = src.create_branch("other").timeline.timeline_id
    fill(src, other, range(0x200, 0x204))
    _, p = plan(src, dst, "dev", other)
    assert p.status is Status.REJECTED and "diverged" in p.message
    _, p = plan(src, dst, "dev", other, force=True)
    assert p.status is Status.FORCED


def test_a_branch_leaving_a_shallow_copy_below_its_base_gets_a_base_of_its_own(
        src: SqliteRepository, dst: SqliteRepository) -> None:
    main, dev = _main_and_dev(src)
    _shallow_copy(src, dst, main, Lsn(0x108), "main")
    points, p = plan(src, dst, "dev", dev)
    assert points == []  # main is not whole there at 0x104: nothing to prove on it
    assert p.status is Status.NEW, p.message
    assert [(s.request.timeline_id, s.request.after, s.request.base) for s in p.sends] == \
        [(dev, Lsn(0x104), True), (dev, Lsn(0x104), False)]
    assert "shallow: history from 0/104" in p.message
