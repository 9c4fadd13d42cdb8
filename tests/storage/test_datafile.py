"""The data files beside the index: truncation of what was never committed, removal with
their timeline, iterators that outlive a deletion, frames in LSN order, and corruption."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from zenith.errors import HistoryImmutable, InvalidArgument, UnknownTimeline
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, datafile, open_repository
from zenith.storage.api import _RecordSlots
from zenith.storage.datafile import CorruptDataFile, file_name
from zenith.storage.redo import make_patch

IMG, DELTA, TOMB = RecordKind.IMAGE, RecordKind.DELTA, RecordKind.TOMBSTONE


def key(n: int) -> bytes:
    return n.to_bytes(18, "big")


def committed(repo: SqliteRepository, tid: TimelineId) -> tuple[Path, int]:
    """The timeline's data file and the length the index committed for it."""
    internal, end = (
        repo._conn()
        .execute("SELECT id, data_end FROM timelines WHERE timeline_id = ?", (bytes(tid),))
        .fetchone()
    )
    return repo.data_dir / file_name(tid, internal), end


@pytest.fixture
def repo(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "zenith.db")
    yield r
    r.close()


def _fill(repo: SqliteRepository, batches: int = 3, per: int = 50) -> TimelineId:
    tid = repo.create_branch("main").timeline.timeline_id
    for b in range(batches):
        repo.put_records(
            tid,
            [Record(key(i), Lsn(1000 * (b + 1) + i), IMG, bytes([b, i]) * 600) for i in range(per)],
        )
    return tid


def test_refused_batch_leaves_no_bytes_and_the_next_one_appends_in_place(
    repo: SqliteRepository,
) -> None:
    tid = _fill(repo, batches=1)
    path, end = committed(repo, tid)
    assert path.stat().st_size == end > 0
    big = [Record(key(i), Lsn(5000 + i), IMG, b"z" * 100_000) for i in range(30)]  # > 1 flush
    for bad in (
        [*big, Record(key(1), Lsn(10), IMG, b"old")],  # history: refused after 3 MB written
        [*big, Record(key(0), Lsn(5000), IMG, b"dup")],  # duplicate: refused at indexing
    ):
        with pytest.raises((HistoryImmutable, InvalidArgument)):
            repo.put_records(tid, bad)
        assert path.stat().st_size == end
        assert committed(repo, tid)[1] == end
    repo.put_records(tid, big)
    assert committed(repo, tid)[1] == path.stat().st_size > end
    assert repo.get_value(tid, key(29), Lsn(5029)) == b"z" * 100_000
    assert repo.count_records(tid, Lsn(0), Lsn(10_000)) == (80, 50 * 1200 + 30 * 100_000)


def test_refused_first_batch_leaves_no_file(repo: SqliteRepository) -> None:
    tid = repo.create_timeline().timeline_id
    with pytest.raises(InvalidArgument):
        repo.put_records(
            tid, [Record(key(1), Lsn(5), IMG, b"x"), Record(key(2), Lsn(6), TOMB, b"!")]
        )
    assert list(repo.data_dir.iterdir()) == []


def test_bytes_of_a_crashed_batch_are_cut_off(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "db")
    tid = _fill(repo)
    path, end = committed(repo, tid)
    expected = [(r.key, r.lsn, r.payload) for r in repo.iter_records(tid, Lsn(0), Lsn(9999))]
    repo.close()
    # What a writer killed between its data write and its commit leaves behind.
    with open(path, "ab") as f:
        f.write(datafile.HEADER.pack(datafile.MAGIC, 3, 100) + b"\xee" * 5000)
    repo = open_repository(tmp_path / "db")
    assert path.stat().st_size == end
    # The same left-over appearing while open (another process crashed) is cut before a batch.
    with open(path, "ab") as f:
        f.write(b"\xee" * 777)
    repo.put_records(tid, [Record(key(7), Lsn(8000), IMG, b"after")])
    got = [(r.key, r.lsn, r.payload) for r in repo.iter_records(tid, Lsn(0), Lsn(9999))]
    assert got == [*expected, (key(7), 8000, b"after")]
    assert path.stat().st_size == committed(repo, tid)[1]
    repo.close()


def test_deleting_a_timeline_removes_its_file(repo: SqliteRepository) -> None:
    tid = _fill(repo)
    dev = repo.create_branch("dev", "main").timeline.timeline_id
    repo.put_records(dev, [Record(key(1), Lsn(9000), IMG, b"dev")])
    main_file, dev_file = committed(repo, tid)[0], committed(repo, dev)[0]
    repo.delete_branch("main")  # dev descends from it: the data stays
    assert main_file.exists() and dev_file.exists()
    repo.delete_branch("dev")  # now both go
    assert not main_file.exists() and not dev_file.exists()
    other = repo.create_timeline().timeline_id
    repo.put_records(other, [Record(key(1), Lsn(1), IMG, b"o")])
    path = committed(repo, other)[0]
    repo.delete_timeline(other)
    assert not path.exists() and list(repo.data_dir.iterdir()) == []


def test_a_recreated_timeline_gets_a_new_file(repo: SqliteRepository) -> None:
    tid = TimelineId.generate()
    repo.create_timeline(tid)
    repo.put_records(tid, [Record(key(1), Lsn(1), IMG, b"first life")])
    old = committed(repo, tid)[0]
    repo.delete_timeline(tid)
    repo.create_timeline(tid)
    repo.put_records(tid, [Record(key(1), Lsn(1), IMG, b"second")])
    assert committed(repo, tid)[0] != old
    assert repo.get_value(tid, key(1), Lsn(1)) == b"second"


def test_orphan_files_are_removed_on_open(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "db")
    tid = _fill(repo, batches=1)
    repo.close()
    # A crash between a deletion's commit and its unlink leaves a file nobody owns.
    orphan = tmp_path / "db.d" / file_name(bytes(16), 999)
    orphan.write_bytes(b"x" * 10)
    unrelated = tmp_path / "db.d" / "notes.txt"
    unrelated.write_text("not ours")
    repo = open_repository(tmp_path / "db")
    assert not orphan.exists() and unrelated.exists()
    assert repo.get_value(tid, key(3), Lsn(1003)) == bytes([0, 3]) * 600
    repo.close()


@pytest.mark.parametrize("how", ["delete_timeline", "delete_branch"])
def test_an_iterator_outlives_the_deletion_of_its_timeline(
    repo: SqliteRepository, how: str
) -> None:
    tid = _fill(repo, batches=4)
    expected = list(repo.iter_records(tid, Lsn(0), Lsn(99_999)))
    started = repo.iter_records(tid, Lsn(0), Lsn(99_999))
    first = next(started)
    not_started = repo.iter_records(tid, Lsn(1500), Lsn(99_999))
    path = committed(repo, tid)[0]
    if how == "delete_timeline":
        repo.set_branch("main", repo.create_timeline().timeline_id)
        repo.delete_timeline(tid)
    else:
        repo.delete_branch("main")
    assert not path.exists()
    assert [first, *started] == expected
    assert list(not_started) == [r for r in expected if r.lsn > 1500]
    with pytest.raises(UnknownTimeline):
        repo.iter_records(tid, Lsn(0), Lsn(99_999))


def test_an_iterator_in_another_thread_survives_a_concurrent_delete(
    repo: SqliteRepository,
) -> None:
    tid = _fill(repo, batches=8, per=200)
    it = repo.iter_records(tid, Lsn(0), Lsn(1 << 40))
    got: list[Record] = []
    halfway, deleted = threading.Event(), threading.Event()

    def reader() -> None:
        for n, rec in enumerate(it):
            got.append(rec)
            if n == 700:
                halfway.set()
                deleted.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    assert halfway.wait(10)
    repo.delete_branch("main")
    deleted.set()
    t.join(10)
    assert [(r.lsn, r.key) for r in got] == sorted(
        (Lsn(1000 * (b + 1) + i), key(i)) for b in range(8) for i in range(200)
    )


def test_concurrent_readers_see_whole_batches(repo: SqliteRepository) -> None:
    tid = repo.create_branch("main").timeline.timeline_id
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                last = repo.get_timeline(tid).last_record_lsn
                records = list(repo.iter_records(tid, Lsn(0), last))
                assert len(records) == 10 * (last // 100)
                assert all(r.payload == bytes([r.lsn // 100 % 256]) * 3000 for r in records)
                if last:
                    assert repo.get_value(tid, key(9), last) == bytes([last // 100 % 256]) * 3000
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for b in range(1, 60):
        repo.put_records(
            tid,
            [Record(key(i), Lsn(100 * b), IMG, bytes([b]) * 3000) for i in range(10)],
            Lsn(100 * b),
        )
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors


def test_frames_come_back_in_lsn_order_whatever_order_they_were_written(
    repo: SqliteRepository,
) -> None:
    tid = repo.create_branch("main").timeline.timeline_id
    rng = random.Random(7)
    lsns = list(range(1, 301))
    model: list[Record] = []
    for b in range(3):
        chunk = lsns[b * 100 : (b + 1) * 100]
        rng.shuffle(chunk)
        batch = [
            Record(
                key(n % 17),
                Lsn(n),
                [IMG, DELTA, TOMB][n % 3],
                [rng.randbytes(n), make_patch([(n, b"p")]), b""][n % 3],
            )
            for n in chunk
        ]
        repo.put_records(tid, batch, Lsn(100 * (b + 1)))
        model += batch
    model.sort(key=lambda r: r.lsn)
    bounds = [0, 1, 50, 99, 100, 101, 150, 200, 250, 299, 300, 400]
    for after in bounds:
        for upto in bounds:
            want = [r for r in model if after < r.lsn <= upto]
            assert list(repo.iter_records(tid, Lsn(after), Lsn(upto))) == want, (after, upto)
            assert repo.count_records(tid, Lsn(after), Lsn(upto)) == (
                len(want),
                sum(len(r.payload) for r in want),
            ), (after, upto)


def test_payloads_larger_than_the_read_window(repo: SqliteRepository) -> None:
    tid = repo.create_branch("main").timeline.timeline_id
    huge = random.Random(1).randbytes(datafile.WINDOW + 12345)
    batch = [
        Record(key(1), Lsn(1), IMG, b"small"),
        Record(key(2), Lsn(2), IMG, huge),
        Record(key(3), Lsn(3), IMG, b"after"),
        *(Record(key(10 + i), Lsn(10 + i), IMG, b"d" * 9000) for i in range(3000)),
    ]
    repo.put_records(tid, batch)
    repo.put_records(tid, [Record(key(1), Lsn(5000), IMG, b"next frame")])
    got = list(repo.iter_records(tid, Lsn(0), Lsn(5000)))
    assert got == [*batch, Record(key(1), Lsn(5000), IMG, b"next frame")]
    assert repo.get_value(tid, key(2), Lsn(3)) == huge


def test_records_read_back_are_ordinary_records() -> None:
    assert sorted(_RecordSlots.__slots__) == sorted(Record.__slots__)
    fast: object = _RecordSlots(key(1), Lsn(5), DELTA, b"\x01")
    fast.__class__ = Record
    slow = Record(key(1), Lsn(5), DELTA, b"\x01")
    assert type(fast) is Record and fast == slow and hash(fast) == hash(slow)
    assert repr(fast) == repr(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.payload = b"changed"  # type: ignore[attr-defined]


def test_a_truncated_data_file_is_reported_not_misread(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "db")
    tid = _fill(repo)
    path, end = committed(repo, tid)
    repo.close()
    with open(path, "r+b") as f:
        f.truncate(end - 3000)  # the last frame's directory and part of its last payload
    repo = open_repository(tmp_path / "db")
    with pytest.raises(CorruptDataFile):
        list(repo.iter_records(tid, Lsn(0), Lsn(99_999)))
    with pytest.raises(CorruptDataFile):
        repo.put_records(tid, [Record(key(1), Lsn(50_000), IMG, b"x")])
    with pytest.raises(CorruptDataFile):
        repo.get_value(tid, key(49), Lsn(3049))
    assert repo.get_value(tid, key(0), Lsn(1000)) == bytes([0, 0]) * 600  # the intact part
    repo.close()
    path.unlink()
    repo = open_repository(tmp_path / "db")
    with pytest.raises(CorruptDataFile, match="missing"):
        repo.get_value(tid, key(0), Lsn(1000))
    repo.close()


def test_an_old_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with pytest.raises(InvalidArgument, match="schema version 1"):
        open_repository(tmp_path / "old.db")
