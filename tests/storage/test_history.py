"""History hashes, partial LSNs and fork-on-write: what makes "same timeline id, same
history" checkable (storage side of issue 9)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.storage.test_repository import snapshot
from zenith.errors import HistoryImmutable, HistoryMismatch, InvalidArgument, LsnOutOfRange
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Cursor, Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.history import EMPTY

IMG = RecordKind.IMAGE


def key(n: int) -> bytes:
    return n.to_bytes(18, "big")


def history(spec: list[int]) -> list[Record]:
    """Records in stored order: ``spec[i]`` records at LSN 100*(i+1), distinct keys."""
    out = []
    for i, n in enumerate(spec):
        lsn = Lsn(100 * (i + 1))
        out += [Record(key(i * 1000 + j), lsn, IMG, bytes([i, j]) * 50) for j in range(n)]
    return out


@pytest.fixture
def repo(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "zenith.db", durable=False)
    yield r
    r.close()


def test_hash_depends_on_records_only(repo: SqliteRepository) -> None:
    recs = history([3, 1, 4])
    a = repo.create_timeline()
    repo.put_records(a.timeline_id, recs, Lsn(500))
    # The same set of records, batched otherwise and with one LSN written in another order.
    b = repo.create_timeline()
    repo.put_records(b.timeline_id, recs[:2], partial=True)
    repo.put_records(b.timeline_id, [recs[2], *reversed(recs[3:5])], partial=True)
    repo.put_records(b.timeline_id, recs[5:], Lsn(500))
    for lsn in (0, 100, 150, 200, 300, 450, 500):
        assert repo.history_hash(a.timeline_id, Lsn(lsn)) == \
            repo.history_hash(b.timeline_id, Lsn(lsn))
    assert repo.history_hash(a.timeline_id, Lsn(50)) == EMPTY
    assert repo.history_hash(a.timeline_id, Lsn(100)) != repo.history_hash(a.timeline_id, Lsn(200))
    # One different payload: a different hash from that LSN on, the same before it.
    c = repo.create_timeline()
    changed = [*recs[:4], Record(recs[4].key, recs[4].lsn, IMG, b"other"), *recs[5:]]
    repo.put_records(c.timeline_id, changed, Lsn(500))
    assert repo.history_hash(c.timeline_id, Lsn(200)) == repo.history_hash(a.timeline_id, Lsn(200))
    assert repo.history_hash(c.timeline_id, Lsn(300)) != repo.history_hash(a.timeline_id, Lsn(300))
    with pytest.raises(LsnOutOfRange):
        repo.history_hash(a.timeline_id, Lsn(501))


def test_partial_lsn_is_stored_not_published(repo: SqliteRepository) -> None:
    tl = repo.create_timeline()
    tid = tl.timeline_id
    recs = history([2, 5])  # LSN 100: 2 records, LSN 200: 5 records
    repo.put_records(tid, recs[:4], partial=True)  # ends inside LSN 200
    info = repo.get_timeline(tid)
    assert info.last_record_lsn == 100
    assert info.pending == Cursor(Lsn(200), 2, recs[3].key)
    # Unpublished records are invisible to reads and iteration.
    assert repo.get_value(tid, recs[2].key, Lsn(100)) is None
    with pytest.raises(LsnOutOfRange):
        repo.get_value(tid, recs[2].key, Lsn(200))
    assert list(repo.iter_records(tid, Lsn(0), Lsn(100))) == recs[:2]
    # Nothing at or below the pending LSN's stored part can be written again.
    with pytest.raises(HistoryImmutable):
        repo.put_records(tid, [Record(key(77), Lsn(150), IMG, b"x")])
    with pytest.raises(InvalidArgument):  # the same (key, lsn) twice
        repo.put_records(tid, [recs[3]], partial=True)
    repo.put_records(tid, [], Lsn(150))  # publishing below them keeps them pending
    assert repo.get_timeline(tid).pending == Cursor(Lsn(200), 2, recs[3].key)
    # Continue: the rest of LSN 200, still partial, then complete it.
    repo.put_records(tid, recs[4:6], partial=True)
    assert repo.get_timeline(tid).pending == Cursor(Lsn(200), 4, recs[5].key)
    repo.put_records(tid, recs[6:], Lsn(250))
    info = repo.get_timeline(tid)
    assert info.last_record_lsn == 250 and info.pending is None
    assert list(repo.iter_records(tid, Lsn(0), Lsn(250))) == recs
    whole = repo.create_timeline()
    repo.put_records(whole.timeline_id, recs, Lsn(250))
    assert repo.history_hash(tid, Lsn(250)) == repo.history_hash(whole.timeline_id, Lsn(250))


def test_iterate_skipping_what_the_receiver_holds(repo: SqliteRepository) -> None:
    tid = repo.create_timeline().timeline_id
    recs = history([1, 6, 2])
    repo.put_records(tid, recs[:3], partial=True)
    repo.put_records(tid, recs[3:], Lsn(300))  # LSN 200 spans two batches
    rest = list(repo.iter_records(tid, Lsn(100), Lsn(300), skip=Cursor(Lsn(200), 4, b"")))
    assert rest == recs[5:]
    assert list(repo.iter_records(tid, Lsn(100), Lsn(300), skip=Cursor(Lsn(200), 0, b""))) \
        == recs[1:]
    # The cursor names the key of the last record held: another key is another history.
    assert list(repo.iter_records(tid, Lsn(100), Lsn(300),
                                  skip=Cursor(Lsn(200), 4, recs[4].key))) == recs[5:]
    with pytest.raises(HistoryMismatch):
        list(repo.iter_records(tid, Lsn(100), Lsn(300), skip=Cursor(Lsn(200), 4, recs[3].key)))


def test_expected_hash_refuses_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "zenith.db"
    repo = open_repository(path)
    src = repo.create_timeline()
    recs = history([2, 2])
    repo.put_records(src.timeline_id, recs, Lsn(200))
    good = repo.history_hash(src.timeline_id, Lsn(200))
    dst = repo.create_timeline(received=True)
    repo.put_records(dst.timeline_id, recs[:3], partial=True)
    before = snapshot(path)
    with pytest.raises(HistoryMismatch):
        repo.put_records(dst.timeline_id, [recs[3]], Lsn(200), expect_hash=EMPTY)
    assert snapshot(path) == before
    repo.put_records(dst.timeline_id, [recs[3]], Lsn(200), expect_hash=good)
    assert repo.digest(dst.timeline_id, Lsn(200)) == repo.digest(src.timeline_id, Lsn(200))
    repo.close()


def test_writing_a_received_branch_forks_it(repo: SqliteRepository) -> None:
    got = repo.create_timeline(TimelineId.generate(), received=True)
    repo.put_records(got.timeline_id, history([2]), Lsn(150))
    repo.set_branch("main", got.timeline_id)
    child = repo.branch_for_writing("main")
    assert child.timeline_id != got.timeline_id and not child.received
    assert (child.ancestor_id, child.ancestor_lsn) == (got.timeline_id, Lsn(150))
    assert repo.get_branch("main").timeline.timeline_id == child.timeline_id
    assert repo.branch_for_writing("main").timeline_id == child.timeline_id  # ours now
    assert repo.get_timeline(got.timeline_id).last_record_lsn == 150  # never extended
    local = repo.create_branch("dev").timeline
    assert repo.branch_for_writing("dev").timeline_id == local.timeline_id


@settings(max_examples=40, deadline=None)
@given(
    spec=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_any_split_gives_the_same_timeline(
    tmp_path_factory: pytest.TempPathFactory, spec: list[int], cuts: list[int]
) -> None:
    """Splitting a stream at arbitrary points (inside LSNs too) stores the same history."""
    recs = history(spec)
    end = Lsn(100 * len(spec) + 7)
    repo = open_repository(tmp_path_factory.mktemp("split") / "z.db", durable=False)
    try:
        whole = repo.create_timeline()
        repo.put_records(whole.timeline_id, recs, end)
        split = repo.create_timeline(received=True)
        points = sorted({c for c in cuts if 0 < c < len(recs)})
        for lo, hi in zip([0, *points], points, strict=False):
            repo.put_records(split.timeline_id, recs[lo:hi], partial=True)
            info = repo.get_timeline(split.timeline_id)
            assert info.last_record_lsn < recs[hi - 1].lsn
        repo.put_records(split.timeline_id, recs[points[-1] if points else 0:], end)
        assert list(repo.iter_records(split.timeline_id, Lsn(0), end)) == recs
        assert repo.history_hash(split.timeline_id, end) == \
            repo.history_hash(whole.timeline_id, end)
        assert repo.digest(split.timeline_id, end) == repo.digest(whole.timeline_id, end)
    finally:
        repo.close()


V5_COLUMNS = ("collected_lsn", "base_lsn", "foreign_ancestor", "base_done")


def _back_to_5(conn: sqlite3.Connection) -> None:
    """Undo what schema 6 added (compaction)."""
    for column in ("compacted", "packed_saving", "base_from"):
        conn.execute(f"ALTER TABLE timelines DROP COLUMN {column}")
    conn.execute("DROP TABLE repacked")
    conn.execute("DROP TABLE packs")
    conn.execute("UPDATE meta SET value = '5' WHERE name = 'schema_version'")


def test_schema_5_is_migrated_to_nothing_compacted(tmp_path: Path) -> None:
    path = tmp_path / "zenith.db"
    repo = open_repository(path)
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, [Record(bytes(18), Lsn(100), RecordKind.IMAGE, bytes(8192))],
                     Lsn(100))
    repo.close()
    with sqlite3.connect(path) as conn:
        _back_to_5(conn)
    repo = open_repository(path)
    try:
        assert repo.space(tid) == (8192, 0)
        result = repo.compact(tid)
        assert (result.records, result.bytes_before, result.done) == (1, 8192, True)
        assert repo.get_value(tid, bytes(18), Lsn(100)) == bytes(8192)
        assert repo.space(tid)[0] == result.bytes_after
    finally:
        repo.close()


def test_schema_4_is_migrated_to_whole_timelines(tmp_path: Path) -> None:
    path = tmp_path / "zenith.db"
    repo = open_repository(path)
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, history([3, 2]), Lsn(200))
    other = repo.create_branch("collected").timeline.timeline_id
    repo.put_records(other, history([3, 2]), Lsn(200))
    repo.close()
    with sqlite3.connect(path) as conn:  # back to the version 4 layout
        _back_to_5(conn)
        for column in V5_COLUMNS:
            conn.execute(f"ALTER TABLE timelines DROP COLUMN {column}")
        # as a schema-4 GC leaves it: readable from 150, some bytes removed below
        conn.execute("UPDATE timelines SET min_readable_lsn = 150, garbage = 10"
                     " WHERE timeline_id = ?", (bytes(other),))
        conn.execute("UPDATE meta SET value = '4' WHERE name = 'schema_version'")
    repo = open_repository(path)
    try:
        info = repo.get_timeline(tid)
        assert (info.collected_lsn, info.base_lsn, info.base_complete) == (Lsn(0), None, True)
        assert info.history_start == Lsn(0)
        assert len(list(repo.iter_records(tid, Lsn(0), Lsn(200)))) == 5
        # Where GC removed records, the history is whole only from its horizon on.
        assert repo.get_timeline(other).history_start == Lsn(150)
    finally:
        repo.close()


def test_schema_2_is_migrated_with_hashes(tmp_path: Path) -> None:
    path = tmp_path / "zenith.db"
    repo = open_repository(path)
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, history([3, 2]), Lsn(200))
    expected = repo.history_hash(tid, Lsn(200))
    repo.close()
    # Take it back to the version 2 layout.
    with sqlite3.connect(path) as conn:
        _back_to_5(conn)
        for column in ("received", "hash", "pending_lsn", "pending_count", "pending_key",
                       "pending_sum", "garbage", *V5_COLUMNS):
            conn.execute(f"ALTER TABLE timelines DROP COLUMN {column}")
        conn.execute("DROP TABLE history")
        conn.execute("ALTER TABLE batches RENAME TO b3")
        conn.execute("DROP INDEX batches_by_lsn")
        conn.execute(
            "CREATE TABLE batches (tl INTEGER NOT NULL, last_lsn INTEGER NOT NULL,"
            " first_lsn INTEGER NOT NULL, start INTEGER NOT NULL, records INTEGER NOT NULL,"
            " bytes INTEGER NOT NULL, PRIMARY KEY (tl, last_lsn)) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO batches SELECT tl, last_lsn, first_lsn, start, records, bytes"
                     " FROM b3")
        conn.execute("DROP TABLE b3")
        conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    repo = open_repository(path)
    try:
        assert repo.history_hash(tid, Lsn(200)) == expected
        assert repo.get_timeline(tid).received  # unknown writer: the safe side
        assert repo.branch_for_writing("main").timeline_id != tid
    finally:
        repo.close()


def test_schema_3_is_migrated_without_commit_times(tmp_path: Path) -> None:
    import time

    path = tmp_path / "zenith.db"
    repo = open_repository(path)
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, history([3, 2]), Lsn(200))
    expected = repo.history_hash(tid, Lsn(200))
    repo.close()
    with sqlite3.connect(path) as conn:  # back to the version 3 layout
        _back_to_5(conn)
        for column in ("garbage", *V5_COLUMNS):
            conn.execute(f"ALTER TABLE timelines DROP COLUMN {column}")
        conn.execute("ALTER TABLE history DROP COLUMN at")
        conn.execute("UPDATE meta SET value = '3' WHERE name = 'schema_version'")
    repo = open_repository(path)
    try:
        assert repo.history_hash(tid, Lsn(200)) == expected
        assert repo.space(tid)[1] == 0
        # Old commit points have no time: a time window never collects them.
        assert repo.commit_lsn_at(tid, time.time() + 86400) is None
        repo.put_records(tid, [Record(bytes(18), Lsn(300), RecordKind.IMAGE, b"x")])
        assert repo.commit_lsn_at(tid, time.time() + 1) == Lsn(300)
    finally:
        repo.close()


def test_a_large_batch_is_split_into_frames(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than a frame (a base-backup import: one LSN) goes into several
    data-file frames in one transaction: bounded directories for writer and readers."""
    import zenith.storage.writes as engine

    monkeypatch.setattr(engine, "FRAME_RECORDS", 10)
    path = tmp_path / "z.db"
    repo = open_repository(path)
    try:
        tid = repo.create_timeline().timeline_id
        recs = history([25, 3, 12])
        repo.put_records(tid, iter(recs), Lsn(300))
        with sqlite3.connect(path) as conn:
            frames = conn.execute("SELECT first_lsn, last_lsn, records FROM batches"
                                  " ORDER BY start").fetchall()
        assert frames == [(100, 100, 10), (100, 100, 10), (100, 300, 10), (300, 300, 10)]
        assert list(repo.iter_records(tid, Lsn(0), Lsn(300))) == recs
        assert list(repo.iter_records(tid, Lsn(0), Lsn(300),
                                      skip=Cursor(Lsn(100), 17, recs[16].key))) == recs[17:]
        whole = open_repository(tmp_path / "w.db")
        w = whole.create_timeline().timeline_id
        monkeypatch.setattr(engine, "FRAME_RECORDS", 1000)
        whole.put_records(w, recs, Lsn(300))
        assert whole.history_hash(w, Lsn(300)) == repo.history_hash(tid, Lsn(300))
        assert repo.count_records(tid, Lsn(0), Lsn(300)) == whole.count_records(w, Lsn(0),
                                                                               Lsn(300))
        whole.close()
        # Out of LSN order across a frame boundary: refused, nothing kept.
        monkeypatch.setattr(engine, "FRAME_RECORDS", 10)
        before = snapshot(path)
        late = history([0, 0, 0, 12])
        with pytest.raises(InvalidArgument, match="must come in LSN order"):
            repo.put_records(tid, [*late[:11], Record(key(999_999), Lsn(350), IMG, b"x")])
        assert snapshot(path) == before
    finally:
        repo.close()
