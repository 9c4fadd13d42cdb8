"""The SQLite repository: behaviour, bad input, and the query plans it promises."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from zenith.errors import (
    AlreadyExists,
    HistoryImmutable,
    InvalidArgument,
    LsnOutOfRange,
    UnknownBranch,
    UnknownTimeline,
    ZenithError,
)
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.storage.redo import make_patch

IMG, DELTA, TOMB = RecordKind.IMAGE, RecordKind.DELTA, RecordKind.TOMBSTONE


def key(n: int) -> bytes:
    return n.to_bytes(18, "big")


@pytest.fixture
def repo(tmp_path: Path) -> SqliteRepository:
    r = open_repository(tmp_path / "zenith.db")
    yield r
    r.close()


def snapshot(path: Path) -> list[tuple[object, ...]]:
    """Everything the repository holds — every table and every data file's bytes — to prove
    a refused call changed nothing."""
    with sqlite3.connect(path) as conn:
        out: list[tuple[object, ...]] = []
        for table in ("timelines", "branches", "records", "batches", "history"):
            out += [(table, *r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2")]
    data_dir = path.with_name(path.name + ".d")
    for file in sorted(data_dir.iterdir()):
        out.append(("file", file.name, hashlib.sha256(file.read_bytes()).hexdigest()))
    return out


def test_write_and_read_with_deltas_and_tombstones(repo: SqliteRepository) -> None:
    main = repo.create_branch("main").timeline.timeline_id
    repo.put_records(
        main, [Record(key(1), Lsn(10), IMG, b"aaaa"), Record(key(2), Lsn(10), IMG, b"x")]
    )
    repo.put_records(main, [Record(key(1), Lsn(20), DELTA, make_patch([(1, b"ZZ")]))])
    repo.put_records(main, [Record(key(1), Lsn(30), DELTA, make_patch([(6, b"!")]))])
    repo.put_records(main, [Record(key(2), Lsn(40), TOMB)], last_record_lsn=Lsn(50))
    assert repo.get_timeline(main).last_record_lsn == 50
    assert repo.get_value(main, key(1), Lsn(9)) is None
    assert repo.get_value(main, key(1), Lsn(10)) == b"aaaa"
    assert repo.get_value(main, key(1), Lsn(25)) == b"aZZa"
    assert repo.get_value(main, key(1), Lsn(50)) == b"aZZa\0\0!"
    assert repo.get_value(main, key(2), Lsn(39)) == b"x"
    assert repo.get_value(main, key(2), Lsn(40)) is None
    assert repo.get_value(main, key(3), Lsn(50)) is None
    assert [(r.key, r.lsn) for r in repo.iter_records(main, Lsn(10), Lsn(30))] == [
        (key(1), 20),
        (key(1), 30),
    ]
    assert repo.count_records(main, Lsn(0), Lsn(50))[0] == 5
    assert list(repo.materialize(main, Lsn(50))) == [(key(1), b"aZZa\0\0!")]


def test_branches_read_through_ancestors(repo: SqliteRepository) -> None:
    main = repo.create_branch("main").timeline.timeline_id
    repo.put_records(main, [Record(key(1), Lsn(10), IMG, b"v10")])
    repo.put_records(main, [Record(key(1), Lsn(20), IMG, b"v20")])
    child = repo.create_branch("dev", "main", Lsn(15)).timeline
    assert child.ancestor_id == main and child.ancestor_lsn == 15
    assert child.last_record_lsn == 15
    cid = child.timeline_id
    assert repo.get_value(cid, key(1), Lsn(15)) == b"v10"
    repo.put_records(cid, [Record(key(1), Lsn(30), DELTA, make_patch([(0, b"V")]))])
    assert repo.get_value(cid, key(1), Lsn(30)) == b"V10"
    assert repo.get_value(main, key(1), Lsn(20)) == b"v20"
    # A child of the child, from the branch's head, by timeline id.
    grand = repo.create_branch("g", TimelineId(cid))
    assert grand.timeline.ancestor_lsn == 30
    assert repo.get_value(grand.timeline.timeline_id, key(1), Lsn(30)) == b"V10"
    assert repo.digest(grand.timeline.timeline_id, Lsn(30)) == repo.digest(cid, Lsn(30))
    assert repo.digest(cid, Lsn(15)) == repo.digest(main, Lsn(15))
    assert repo.digest(cid, Lsn(30)) != repo.digest(main, Lsn(20))
    names = [(b.name, b.timeline.timeline_id) for b in repo.list_branches()]
    assert names == [("dev", cid), ("g", grand.timeline.timeline_id), ("main", main)]
    assert repo.resolve("dev").timeline_id == cid
    assert repo.resolve(str(cid)).timeline_id == cid


def test_digest_is_independent_of_history(repo: SqliteRepository) -> None:
    a = repo.create_branch("a").timeline.timeline_id
    b = repo.create_branch("b").timeline.timeline_id
    repo.put_records(a, [Record(key(1), Lsn(5), IMG, b"old"), Record(key(2), Lsn(5), IMG, b"gone")])
    repo.put_records(a, [Record(key(1), Lsn(6), IMG, b"new"), Record(key(2), Lsn(6), TOMB)])
    repo.put_records(b, [Record(key(1), Lsn(6), IMG, b"n"), Record(key(3), Lsn(6), TOMB)])
    repo.put_records(b, [Record(key(1), Lsn(7), DELTA, make_patch([(1, b"ew")]))])
    assert repo.digest(a, Lsn(6)) == repo.digest(b, Lsn(7))
    assert repo.digest(a, Lsn(5)) != repo.digest(a, Lsn(6))


def test_timeline_with_given_id_and_ancestor(repo: SqliteRepository) -> None:
    root = repo.create_timeline()
    repo.put_records(root.timeline_id, [Record(key(1), Lsn(100), IMG, b"r")])
    tid = TimelineId.generate()
    child = repo.create_timeline(tid, (root.timeline_id, Lsn(100)))
    assert child.timeline_id == tid and child.ancestor_id == root.timeline_id
    with pytest.raises(AlreadyExists):
        repo.create_timeline(tid)
    with pytest.raises(LsnOutOfRange, match="beyond the last record LSN"):
        repo.create_timeline(None, (root.timeline_id, Lsn(101)))
    with pytest.raises(UnknownTimeline):
        repo.create_timeline(None, (TimelineId.generate(), Lsn(1)))


def test_min_readable_lsn(repo: SqliteRepository) -> None:
    tl = repo.create_timeline(min_readable_lsn=Lsn(50))
    repo.put_records(tl.timeline_id, [Record(key(1), Lsn(40), IMG, b"a")], Lsn(60))
    with pytest.raises(LsnOutOfRange, match="readable"):
        repo.get_value(tl.timeline_id, key(1), Lsn(49))
    assert repo.get_value(tl.timeline_id, key(1), Lsn(50)) == b"a"
    with pytest.raises(LsnOutOfRange):
        repo.digest(tl.timeline_id, Lsn(45))
    repo.set_branch("imp", tl.timeline_id)
    with pytest.raises(LsnOutOfRange):
        repo.create_branch("early", "imp", Lsn(45))


def test_delete_branch_keeps_data_others_depend_on(repo: SqliteRepository) -> None:
    main = repo.create_branch("main").timeline.timeline_id
    repo.put_records(main, [Record(key(1), Lsn(10), IMG, b"m")])
    dev = repo.create_branch("dev", "main").timeline.timeline_id
    repo.put_records(dev, [Record(key(1), Lsn(20), IMG, b"d")])
    repo.delete_branch("main")
    with pytest.raises(UnknownBranch):
        repo.get_branch("main")
    assert repo.get_value(dev, key(1), Lsn(10)) == b"m"  # ancestor data survives
    assert repo.get_timeline(main).last_record_lsn == 10
    repo.delete_branch("dev")  # now both are garbage
    assert repo.list_timelines() == []
    with pytest.raises(UnknownBranch):
        repo.delete_branch("dev")


def test_set_branch_repoints_without_losing_data(repo: SqliteRepository) -> None:
    a = repo.create_branch("a").timeline.timeline_id
    repo.put_records(a, [Record(key(1), Lsn(10), IMG, b"a")])
    b = repo.create_timeline().timeline_id
    repo.set_branch("a", b)
    assert repo.get_branch("a").timeline.timeline_id == b
    assert repo.get_value(a, key(1), Lsn(10)) == b"a"


def test_queries_use_their_indexes(repo: SqliteRepository) -> None:
    def plan(sql: str) -> str:
        return " ".join(str(r[-1]) for r in repo._conn().execute("EXPLAIN QUERY PLAN " + sql))

    # GetPage@LSN: a range of the (tl, key, lsn) primary key, already in the wanted order.
    detail = plan(
        "SELECT kind, off, len FROM records WHERE tl = 1 AND key = x'00' AND lsn <= 5"
        " ORDER BY lsn DESC"
    )
    assert "PRIMARY KEY" in detail and "SCAN" not in detail and "TEMP B-TREE" not in detail
    # An LSN range: the first frame through the (tl, last_lsn, start) index of batches.
    detail = plan(
        "SELECT start FROM batches WHERE tl = 1 AND last_lsn > 5 ORDER BY last_lsn, start"
        " LIMIT 1"
    )
    assert "batches_by_lsn" in detail and "SCAN" not in detail and "TEMP B-TREE" not in detail


def test_iterator_reads_a_snapshot(repo: SqliteRepository) -> None:
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, [Record(key(i), Lsn(i + 1), IMG, b"x" * 100) for i in range(1000)])
    it = repo.iter_records(tid, Lsn(0), Lsn(10_000))
    first = next(it)
    repo.put_records(tid, [Record(key(5000), Lsn(5000), IMG, b"late")])
    rest = list(it)
    assert first.lsn == 1 and len(rest) == 999 and rest[-1].lsn == 1000


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    r = open_repository(tmp_path / "db")
    tid = r.create_branch("main").timeline.timeline_id
    r.put_records(tid, [Record(key(1), Lsn(3), IMG, b"x")])
    rid = r.repository_id
    r.close()
    r = open_repository(tmp_path / "db")
    assert r.repository_id == rid
    assert r.get_value(tid, key(1), Lsn(3)) == b"x"
    r.close()


# ---- bad input: a clear exception type, and the database unchanged ----------------------


def _prepared(repo: SqliteRepository) -> TimelineId:
    tid = repo.create_branch("main").timeline.timeline_id
    repo.put_records(tid, [Record(key(1), Lsn(100), IMG, b"x")])
    return tid


BAD_CALLS = [
    (
        "record below last_record_lsn",
        HistoryImmutable,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(99), IMG, b"y")]),
    ),
    (
        "record at last_record_lsn",
        HistoryImmutable,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(100), IMG, b"y")]),
    ),
    (
        "good then bad record in one batch",
        HistoryImmutable,
        lambda r, t: r.put_records(
            t, [Record(key(2), Lsn(200), IMG, b"y"), Record(key(3), Lsn(50), IMG, b"z")]
        ),
    ),
    ("moving last_record_lsn back", HistoryImmutable, lambda r, t: r.put_records(t, [], Lsn(90))),
    (
        "record beyond the batch's last LSN",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(300), IMG, b"y")], Lsn(200)),
    ),
    (
        "short key",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(b"k", Lsn(200), IMG, b"y")]),
    ),
    (
        "str payload",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(200), IMG, "y")]),
    ),  # type: ignore[arg-type]
    (
        "unknown delta type",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(200), DELTA, b"\xfe")]),
    ),
    (
        "tombstone with payload",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(200), TOMB, b"y")]),
    ),
    (
        "duplicate key and LSN",
        InvalidArgument,
        lambda r, t: r.put_records(
            t, [Record(key(2), Lsn(200), IMG, b"y"), Record(key(2), Lsn(200), IMG, b"z")]
        ),
    ),
    (
        "LSN too large",
        InvalidArgument,
        lambda r, t: r.put_records(t, [Record(key(2), Lsn(1 << 63), IMG, b"y")]),
    ),
    ("unknown timeline", UnknownTimeline, lambda r, t: r.put_records(TimelineId.generate(), [])),
    ("unknown branch", UnknownBranch, lambda r, t: r.create_branch("x", "nope")),
    ("bad branch name", InvalidArgument, lambda r, t: r.create_branch("a b")),
    ("branch name like an id", InvalidArgument, lambda r, t: r.create_branch("a" * 32)),
    ("branch name with ..", InvalidArgument, lambda r, t: r.create_branch("a..b")),
    ("existing branch", AlreadyExists, lambda r, t: r.create_branch("main")),
    (
        "branch point in the future",
        LsnOutOfRange,
        lambda r, t: r.create_branch("f", "main", Lsn(101)),
    ),
    ("read in the future", LsnOutOfRange, lambda r, t: r.get_value(t, key(1), Lsn(101))),
    ("read with a bad key", InvalidArgument, lambda r, t: r.get_value(t, b"", Lsn(100))),
    ("digest in the future", LsnOutOfRange, lambda r, t: r.digest(t, Lsn(500))),
    ("resolve garbage", UnknownBranch, lambda r, t: r.resolve("garbage")),
]


@pytest.mark.parametrize(("what", "error", "call"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_and_changes_nothing(
    tmp_path: Path, what: str, error: type[ZenithError], call: object
) -> None:
    repo = open_repository(tmp_path / "db")
    tid = _prepared(repo)
    before = snapshot(tmp_path / "db")
    with pytest.raises(error):
        call(repo, tid)  # type: ignore[operator]
    assert snapshot(tmp_path / "db") == before
    # and the repository still works afterwards
    repo.put_records(tid, [Record(key(9), Lsn(1000), IMG, b"ok")])
    assert repo.get_value(tid, key(9), Lsn(1000)) == b"ok"
    repo.close()


def test_materialize_key_range_reads_only_that_range(repo: SqliteRepository) -> None:
    main = repo.create_branch("main").timeline.timeline_id
    repo.put_records(main, [Record(key(n), Lsn(10), IMG, bytes([n])) for n in range(1, 8)])
    repo.put_records(main, [Record(key(3), Lsn(20), TOMB)])
    child = repo.create_branch("dev", "main", Lsn(20)).timeline.timeline_id
    repo.put_records(child, [Record(key(4), Lsn(30), DELTA, make_patch([(1, b"!")]))])
    got = list(repo.materialize(child, Lsn(30), lo=key(2), hi=key(5)))
    assert got == [(key(2), b"\x02"), (key(4), b"\x04!")]
    assert [k for k, _ in repo.materialize(main, Lsn(20), lo=key(6))] == [key(6), key(7)]
    assert [k for k, _ in repo.materialize(main, Lsn(20), hi=key(2))] == [key(1)]
    with pytest.raises(InvalidArgument):
        list(repo.materialize(main, Lsn(20), lo=b"short"))
