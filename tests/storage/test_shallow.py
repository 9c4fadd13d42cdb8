"""Shallow timelines in storage: a timeline held from an LSN on (its state there as
images, its records after it), as a shallow push or pull leaves it; and what GC records
of the history it removed (``collected_lsn``), which decides when a copy must be shallow."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenith.errors import InvalidArgument, LsnOutOfRange
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.datafile import HistoryCollected
from zenith.storage.redo import make_patch


def key(n: int) -> bytes:
    return n.to_bytes(18, "big")


@pytest.fixture
def repos(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = open_repository(tmp_path / "a.db", durable=False)
    b = open_repository(tmp_path / "b.db", durable=False)
    yield a, b
    a.close()
    b.close()


def _history(repo: SqliteRepository) -> tuple[TimelineId, TimelineId, Lsn]:
    """main with images and deltas, and dev branched from it at 0x400 with its own."""
    main = repo.create_branch("main").timeline.timeline_id
    lsn = 0x100
    for rnd in range(6):
        repo.put_records(main, [Record(key(k), Lsn(lsn + k), RecordKind.IMAGE if rnd % 3 == 0
                                       else RecordKind.DELTA,
                                       bytes([rnd]) * 32 if rnd % 3 == 0
                                       else make_patch([(k, bytes([rnd]))]))
                                for k in range(8)])
        lsn += 0x100
    dev = repo.create_branch("dev", "main", Lsn(0x400)).timeline.timeline_id
    repo.put_records(dev, [Record(key(k), Lsn(0x700 + k), RecordKind.DELTA,
                                  make_patch([(2, b"d")])) for k in range(3)])
    repo.put_records(dev, [Record(key(3), Lsn(0x720), RecordKind.TOMBSTONE)])
    return main, dev, Lsn(0x500)


def test_a_shallow_copy_reads_as_the_source_from_its_base(
        repos: tuple[SqliteRepository, SqliteRepository]) -> None:
    a, b = repos
    main, dev, _ = _history(a)
    info = a.get_timeline(dev)
    base = Lsn(0x705)  # inside dev's own history: its ancestor is not copied
    b.create_shallow_timeline(dev, (main, Lsn(0x400)), base)
    # Not readable, not writable until the base is whole.
    with pytest.raises(LsnOutOfRange, match="still being received"):
        b.get_value(dev, key(0), base)
    with pytest.raises(InvalidArgument, match="receiving its base"):
        b.put_records(dev, [Record(key(0), Lsn(0x800), RecordKind.IMAGE, b"x")])
    # The base as the sender reads it: each key's image and the deltas after it, from
    # dev and from main below the branch point, as stored (no redo).
    needed = list(a.base_records(dev, base))
    assert {r.kind for r in needed} == {RecordKind.IMAGE, RecordKind.DELTA}
    assert any(r.lsn < Lsn(0x400) for r in needed)  # main's records
    assert [(r.key, r.lsn) for r in needed] == sorted((r.key, r.lsn) for r in needed)
    assert key(3) in {r.key for r in needed}  # dev's tombstone of key 3 comes later
    assert b.put_base(dev, needed[:3]) == 3
    b.put_base(dev, needed[3:])
    with pytest.raises(InvalidArgument, match="at or below"):
        b.put_base(dev, [Record(key(99), base, RecordKind.TOMBSTONE)])
    with pytest.raises(InvalidArgument, match="at or below"):
        b.put_base(dev, [Record(key(99), Lsn(base + 1), RecordKind.IMAGE, b"x")])
    with pytest.raises(InvalidArgument, match="two records for one key"):
        b.put_base(dev, [needed[0]])
    images = [Record(k, base, RecordKind.IMAGE, v) for k, v in a.materialize(dev, base)]
    b.finish_base(dev, a.history_hash(dev, base))
    b.put_records(dev, list(a.iter_records(dev, base, info.last_record_lsn)),
                  info.last_record_lsn, expect_hash=a.history_hash(dev, info.last_record_lsn))

    held = b.get_timeline(dev)
    assert (held.ancestor_id, held.ancestor_lsn) == (main, Lsn(0x400))  # its identity
    assert (held.base_lsn, held.min_readable_lsn, held.history_start) == (base, base, base)
    assert held.received and held.base_complete
    assert b.ancestry(dev) == [held]  # the ancestor is not held here
    for lsn in (base, Lsn(0x710), Lsn(0x720)):
        assert b.digest(dev, lsn) == a.digest(dev, lsn)
        assert b.history_hash(dev, lsn) == a.history_hash(dev, lsn)
    with pytest.raises(LsnOutOfRange):
        b.get_value(dev, key(0), Lsn(base - 1))
    # Its base images are not history: a walk or hash from before the base is refused.
    with pytest.raises(HistoryCollected):
        list(b.iter_records(dev, Lsn(0x400), held.last_record_lsn))
    with pytest.raises(HistoryCollected):
        b.count_records(dev, Lsn(0x400), held.last_record_lsn)
    with pytest.raises(HistoryCollected):
        b.history_hash(dev, Lsn(0x700))
    assert list(b.iter_records(dev, base, held.last_record_lsn)) == \
        list(a.iter_records(dev, base, held.last_record_lsn))
    # Branches from it and GC on it work as on any timeline.
    b.create_branch("fork", str(dev), Lsn(0x710))
    assert b.digest(b.resolve("fork").timeline_id, Lsn(0x710)) == a.digest(dev, Lsn(0x710))
    b.gc(dev, Lsn(0x720))
    assert b.digest(dev, Lsn(0x720)) == a.digest(dev, Lsn(0x720))
    # An unfinished copy can be dropped and started again.
    other = TimelineId.generate()
    b.create_shallow_timeline(other, None, Lsn(0x300))
    b.put_base(other, [Record(r.key, Lsn(0x300), r.kind, r.payload) for r in images[:2]])
    b.delete_timeline(other)
    with pytest.raises(InvalidArgument, match="before the timeline's start"):
        b.create_shallow_timeline(other, (main, Lsn(0x400)), Lsn(0x300))


def test_gc_marks_where_history_is_whole(repos: tuple[SqliteRepository, SqliteRepository]
                                         ) -> None:
    a, _ = repos
    main, _dev, _ = _history(a)
    assert a.get_timeline(main).history_start == Lsn(0)
    result = a.gc(main, Lsn(0x300))  # images at 0x100.., deltas at 0x200..: none removable
    assert result.records_removed == 0
    assert a.get_timeline(main).collected_lsn == Lsn(0)  # readable from 0x300, whole
    cut = Lsn(0x503)  # inside a batch: no commit point there
    expected = {lsn: a.history_hash(main, lsn) for lsn in (cut, Lsn(0x507), Lsn(0x600))}
    removed = a.gc(main, cut)  # the images of 0x100 and deltas of 0x200 go
    assert removed.records_removed > 0
    # The history hash at and after the horizon stays known (GC stored it at the
    # horizon before removing anything): proofs and a shallow copy's base need it.
    assert {lsn: a.history_hash(main, lsn) for lsn in expected} == expected
    info = a.get_timeline(main)
    assert Lsn(0x200) <= info.collected_lsn <= cut
    assert info.history_start == info.collected_lsn
    # Records after it are all there.
    assert len(list(a.iter_records(main, info.collected_lsn, info.last_record_lsn))) > 0


def test_the_hash_at_the_horizon_survives_the_records_gc_removes(
        repos: tuple[SqliteRepository, SqliteRepository]) -> None:
    a, _ = repos
    tid = a.create_timeline().timeline_id
    # One batch: its only commit point is its end, so a hash inside it is a fold from
    # the start over records GC removes.
    a.put_records(tid, [Record(key(k), Lsn(0x100 * rnd + k), RecordKind.IMAGE, bytes([rnd]) * 64)
                        for rnd in range(1, 5) for k in range(4)])
    cut = Lsn(0x302)
    expected = {lsn: a.history_hash(tid, lsn) for lsn in (cut, Lsn(0x303), Lsn(0x403))}
    assert a.gc(tid, cut).records_removed == 7  # rounds 1-2 of keys 0-2, round 1 of key 3
    assert {lsn: a.history_hash(tid, lsn) for lsn in expected} == expected


def test_a_shallow_timeline_cannot_descend_from_itself(
        repos: tuple[SqliteRepository, SqliteRepository]) -> None:
    _, b = repos
    tid = TimelineId.generate()
    with pytest.raises(InvalidArgument, match="descend from itself"):
        b.create_shallow_timeline(tid, (tid, Lsn(0x100)), Lsn(0x200))
