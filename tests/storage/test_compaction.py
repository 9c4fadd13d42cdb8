"""Compaction stores old plain images packed, as the same records: every read (page reads,
materialize, walks, base records, history hashes) returns what it returned before, on
every path a move can be in (committed and finished, committed and waiting for a read
of the old place, cut short by a crash), and the data file gives the old blocks back."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

import zenith.storage.compaction as compaction
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.datafile import PACKED, HistoryCollected
from zenith.storage.redo import make_patch, pack_image

KEYS = [bytes(14) + k.to_bytes(4, "big") for k in range(64)]
MANY = [bytes(14) + k.to_bytes(4, "big") for k in range(512)]


def _page(seed: int) -> bytes:
    """8 KiB that compress like a heap page: some varied bytes, the rest regular."""
    rnd = random.Random(seed)
    head = bytes(rnd.getrandbits(8) for _ in range(600))
    return head + bytes([seed % 7]) * (8192 - 600)


def _fill(repo: SqliteRepository, tid: TimelineId, rounds: int = 3, lsn: int = 0x100) -> int:
    """Rounds of: a compressible 8 KiB image of every key (one batch), then a delta, a
    small image, a compressed image, an incompressible image and a tombstone here and
    there. Returns the next LSN."""
    for rnd in range(rounds):
        repo.put_records(tid, [Record(k, Lsn(lsn + i), RecordKind.IMAGE, _page(rnd * 100 + i))
                               for i, k in enumerate(KEYS)])
        lsn += len(KEYS)
        extra = [
            Record(KEYS[0], Lsn(lsn), RecordKind.DELTA, make_patch([(5, b"delta")])),
            Record(KEYS[1], Lsn(lsn + 1), RecordKind.IMAGE, b"small"),
            Record(KEYS[2], Lsn(lsn + 2), RecordKind.ZIMAGE, pack_image(_page(7)) or b""),
            Record(KEYS[3], Lsn(lsn + 3), RecordKind.IMAGE, os.urandom(8192)),
            Record(KEYS[4], Lsn(lsn + 4), RecordKind.TOMBSTONE),
        ]
        repo.put_records(tid, extra)
        lsn += 5
    return lsn


def _state(repo: SqliteRepository, tid: TimelineId) -> dict[str, object]:
    """Everything a reader can see of the timeline."""
    info = repo.get_timeline(tid)
    lo, last = int(info.min_readable_lsn), int(info.last_record_lsn)
    points = sorted({lo, last, lo + (last - lo) // 3, lo + (last - lo) * 2 // 3})
    return {
        "values": {(k, p): repo.get_value(tid, k, Lsn(p)) for k in KEYS[:8] for p in points},
        "digests": {p: repo.digest(tid, Lsn(p)) for p in points},
        "walk": list(repo.iter_records(tid, Lsn(lo), Lsn(last))),
        "hashes": {p: repo.history_hash(tid, Lsn(p)) for p in points},
        "base": list(repo.base_records(tid, Lsn(points[1]))),
    }


def _blocks(repo: SqliteRepository) -> int:
    return sum(p.stat().st_blocks for p in repo.data_dir.iterdir()) * 512


def _stored(repo: SqliteRepository, tid: TimelineId) -> int:
    """The payload bytes the index cites: what space() must report."""
    with sqlite3.connect(repo.path) as conn:
        return int(conn.execute(
            "SELECT total(r.len) FROM records r JOIN timelines t ON r.tl = t.id"
            " WHERE t.timeline_id = ?", (bytes(tid),)).fetchone()[0])


def test_compaction_keeps_every_read_and_gives_blocks_back(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db")
    other = open_repository(tmp_path / "o.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        _fill(repo, tid)
        before, blocks = _state(repo, tid), _blocks(repo)
        assert repo.space(tid)[0] == _stored(repo, tid)

        result = repo.compact(tid)
        assert result.records == 3 * len(KEYS)  # the compressible 8 KiB images only
        assert result.bytes_before == 3 * len(KEYS) * 8192
        assert result.bytes_after < result.bytes_before // 4
        assert result.done
        assert result.bytes_reclaimed == result.bytes_before  # whole aligned blocks
        assert _state(repo, tid) == before
        assert _blocks(repo) <= blocks - result.bytes_before + result.bytes_after + 8192
        assert repo.space(tid)[0] == _stored(repo, tid)
        # The index says so; the incompressible image stays as it was.
        with sqlite3.connect(repo.path) as conn:
            kinds = dict(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind"))
        assert kinds[int(RecordKind.IMAGE) | PACKED] == 3 * len(KEYS)
        assert kinds[int(RecordKind.IMAGE)] == 3 * 2  # the small and the random ones

        # A copy made from the walk is checked against the history hash: same records.
        last = repo.get_timeline(tid).last_record_lsn
        copy = other.create_timeline(tid).timeline_id
        other.put_records(copy, repo.iter_records(tid, Lsn(0), last), last,
                          expect_hash=repo.history_hash(tid, last))
        assert other.digest(copy, last) == repo.digest(tid, last)

        # A second pass finds nothing new; new frames are looked at in the next one.
        assert repo.compact(tid).records == 0
        _fill(repo, tid, rounds=1, lsn=int(last) + 1)
        assert repo.compact(tid).records == len(KEYS)
        after = _state(repo, tid)
        repo.close()
        repo = open_repository(tmp_path / "r.db")
        assert _state(repo, tid) == after
    finally:
        repo.close()
        other.close()


def test_gc_after_compaction_counts_and_flags_packed_records(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        last = _fill(repo, tid, rounds=4) - 1
        repo.compact(tid)
        stored = _stored(repo, tid)
        horizon = Lsn(last - 10)
        kept = _state(repo, tid)
        result = repo.gc(tid, horizon)
        assert result.records_removed >= 3 * len(KEYS)
        # space() is what the index cites, before and after: GC counts a packed record's
        # own bytes as garbage, and the saving on it goes.
        assert repo.space(tid)[0] == _stored(repo, tid) < stored
        # The removed packed records are flagged in the frames they came from: a walk
        # from below the horizon refuses them instead of reading what is left.
        with pytest.raises(HistoryCollected):
            list(repo.iter_records(tid, Lsn(0x100), horizon))
        for key in KEYS[:8]:
            assert repo.get_value(tid, key, Lsn(last)) == kept["values"][(key, last)]
        assert repo.digest(tid, Lsn(last)) == kept["digests"][last]
    finally:
        repo.close()


def test_a_read_of_the_old_place_defers_the_punch(tmp_path: Path) -> None:
    """A materialize that looked up the old places before the moves committed keeps
    reading them: the old bytes stay until it ends, and a later pass punches them."""
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        last = Lsn(_fill(repo, tid, rounds=2) - 1)
        expected = list(repo.materialize(tid, last))
        reading = repo.materialize(tid, last)
        first = next(reading)  # holds, with index rows of the old places looked up
        blocks = _blocks(repo)
        result = repo.compact(tid, wait=0.0)
        assert result.records == 2 * len(KEYS) and result.bytes_reclaimed == 0
        assert not result.done
        assert _blocks(repo) >= blocks  # nothing punched
        assert [first, *reading] == expected
        # Meanwhile readers found the new places; the walk the old directory entries.
        assert list(repo.materialize(tid, last)) == expected
        again = repo.compact(tid)
        assert again.records == 0 and again.done
        assert again.bytes_reclaimed == result.bytes_before
        assert _blocks(repo) < blocks
        assert list(repo.materialize(tid, last)) == expected
    finally:
        repo.close()


def test_a_walk_in_progress_defers_the_directory_rewrite(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        last = Lsn(_fill(repo, tid, rounds=2) - 1)
        expected = list(repo.iter_records(tid, Lsn(0), last))
        walk = repo.iter_records(tid, Lsn(0), last)
        first = next(walk)
        result = repo.compact(tid, wait=0.0)
        assert result.records > 0 and not result.done
        assert [first, *walk] == expected
        assert repo.compact(tid).done
        assert list(repo.iter_records(tid, Lsn(0), last)) == expected
    finally:
        repo.close()


def test_moves_left_unfinished_by_a_crash_are_finished_at_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = open_repository(tmp_path / "r.db")
    tid = repo.create_branch("main").timeline.timeline_id
    _fill(repo, tid, rounds=2)
    before = _state(repo, tid)
    blocks = _blocks(repo)
    monkeypatch.setattr(compaction, "finish", lambda *a, **k: 0)  # as if killed after commit
    assert repo.compact(tid).records == 2 * len(KEYS)
    assert _state(repo, tid) == before  # the index's new places, the directories' old ones
    repo.close()
    monkeypatch.undo()
    repo = open_repository(tmp_path / "r.db")
    try:
        with sqlite3.connect(repo.path) as conn:
            assert conn.execute("SELECT count(*) FROM repacked WHERE done = 0").fetchone() \
                == (0,)
        assert _blocks(repo) < blocks
        assert _state(repo, tid) == before
    finally:
        repo.close()


def test_a_failed_pack_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        _fill(repo, tid, rounds=1)
        before = _state(repo, tid)
        data = next(repo.data_dir.iterdir())
        size = data.stat().st_size
        real = compaction.write_pack

        def failing(*args: object) -> object:
            real(*args)  # type: ignore[arg-type]
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(compaction, "write_pack", failing)
        with pytest.raises(OSError):
            repo.compact(tid)
        assert data.stat().st_size == size  # the pack frame was cut off
        assert _state(repo, tid) == before
        monkeypatch.undo()
        assert repo.compact(tid).records == len(KEYS)
        assert _state(repo, tid) == before
    finally:
        repo.close()


def test_a_bounded_pass_goes_on_where_it_stopped(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        _fill(repo, tid, rounds=3)
        before = _state(repo, tid)
        first = repo.compact(tid, max_bytes=3 * 8192)
        assert first.records == 3 and not first.done  # three images read, then it stops
        rest = repo.compact(tid)
        assert rest.records == 3 * len(KEYS) - 3 and rest.done
        assert _state(repo, tid) == before
        # Images that do not pack count too: the bound is on what a pass reads.
        last = repo.get_timeline(tid).last_record_lsn
        repo.put_records(tid, [Record(k, Lsn(last + 1 + i), RecordKind.IMAGE, os.urandom(8192))
                               for i, k in enumerate(KEYS)])
        assert not repo.compact(tid, max_bytes=8192).done
        assert repo.compact(tid).done
    finally:
        repo.close()


def test_a_walk_taken_before_a_compaction_reads_after_it(tmp_path: Path) -> None:
    """iter_records takes its end before the walk starts: a compaction that commits and
    finishes in between points the directories past that end, into the pack frame."""
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        last = Lsn(_fill(repo, tid, rounds=2) - 1)
        expected = list(repo.iter_records(tid, Lsn(0), last))
        counted = repo.count_records(tid, Lsn(0), Lsn(0x100 + 40))
        walk = repo.iter_records(tid, Lsn(0), last)
        assert repo.compact(tid).done
        assert list(walk) == expected
        # Counts are of the records, not of how they are stored.
        assert repo.count_records(tid, Lsn(0), Lsn(0x100 + 40)) == counted
    finally:
        repo.close()


def test_gc_of_every_packed_record_gives_the_pack_back(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db")
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        lsn = 0x100
        for rnd in range(2):  # 2 x 512 packable images, each batch one pack frame
            repo.put_records(tid, [Record(k, Lsn(lsn + i), RecordKind.IMAGE, _page(rnd + i))
                                   for i, k in enumerate(MANY)])
            lsn += len(MANY)
        packed = repo.compact(tid)
        assert packed.records == 2 * len(MANY)
        # A newer plain version of every key: GC removes both packed rounds.
        repo.put_records(tid, [Record(k, Lsn(lsn + i), RecordKind.IMAGE, b"new")
                               for i, k in enumerate(MANY)])
        blocks = _blocks(repo)
        last = repo.get_timeline(tid).last_record_lsn
        result = repo.gc(tid, last)
        assert result.records_removed == 2 * len(MANY)
        assert repo.space(tid)[0] == _stored(repo, tid)
        # The packs' payloads are punched out, less a block at each pack's edges.
        assert blocks - _blocks(repo) >= packed.bytes_after - 4 * 4096
        assert result.bytes_reclaimed >= packed.bytes_after - 4 * 4096
        assert repo.get_value(tid, MANY[5], last) == b"new"
    finally:
        repo.close()
