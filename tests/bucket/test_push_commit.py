"""The commit order of a push to a bucket, in process against moto: a push that dies after
its index but before its ref leaves the old ref (pulls see the old head), and the next
push completes it by moving the ref, sending nothing again (issue 13)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.bucket.s3server import S3Server
from zenith.bucket.gc import GC_LOCK, PushLease, gc_bucket
from zenith.bucket.layout import parse_s3_uri
from zenith.bucket.pull import pull_from_bucket
from zenith.bucket.push import push_to_bucket
from zenith.bucket.state import BucketView
from zenith.bucket.store import Bucket
from zenith.errors import FeatureNotSupported, ObjectInUse
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, SqliteRepository, open_repository
from zenith.transfer.messages import Status

KEYS = [k.to_bytes(18, "big") for k in range(40)]


class _Died(Exception):
    pass


def _round(repo: SqliteRepository, lsn: int, salt: int) -> None:
    tid = repo.get_branch("main").timeline.timeline_id
    repo.put_records(tid, [Record(k, Lsn(lsn + i), RecordKind.IMAGE, bytes([salt]) * 300)
                           for i, k in enumerate(KEYS)])


def _push(repo: SqliteRepository, bucket: Bucket, scratch: Path):  # type: ignore[no-untyped-def]
    chain = repo.ancestry(repo.get_branch("main").timeline.timeline_id)
    return push_to_bucket(repo, bucket, chain, "main", scratch=scratch)


def _head(repo: SqliteRepository) -> Lsn:
    return repo.get_branch("main").timeline.last_record_lsn


def test_death_between_index_and_ref(tmp_path: Path, s3server: S3Server, aws_env: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    src = open_repository(tmp_path / "src.db")
    src.create_branch("main")
    _round(src, 100, 1)
    bucket = Bucket(parse_s3_uri(s3server.uri(s3server.new_bucket())), timeout=10)
    put = Bucket.put

    def dying_put(self: Bucket, key: str, data: bytes, **kw: object) -> str:
        if key.startswith("refs/"):
            raise _Died
        return put(self, key, data, **kw)  # type: ignore[arg-type]

    for round_no, expected in ((2, Status.NEW), (3, Status.FAST_FORWARD)):
        before = BucketView(bucket).refs.get("main")
        monkeypatch.setattr(Bucket, "put", dying_put)
        with pytest.raises(_Died):
            _push(src, bucket, tmp_path / "scratch")
        monkeypatch.setattr(Bucket, "put", put)
        view = BucketView(bucket)
        assert view.refs.get("main") == before  # the old ref (none, then the first head)
        assert view.index(src.get_branch("main").timeline.timeline_id).last_lsn == _head(src)
        if before is not None:  # a pull reads up to the ref's head, not the index's end
            dst = open_repository(tmp_path / f"dst{round_no}.db")
            asyncio.run(pull_from_bucket(dst, bucket, "main", "main", scratch=tmp_path / "s"))
            assert _head(dst) == before.ref.lsn < _head(src)
        again = _push(src, bucket, tmp_path / "scratch")
        assert again.status is expected and again.records == 0  # nothing sent twice
        assert BucketView(bucket).refs["main"].ref.lsn == _head(src)
        _round(src, 100 * round_no, round_no)
    dst = open_repository(tmp_path / "final.db")
    asyncio.run(pull_from_bucket(dst, bucket, "main", "main", scratch=tmp_path / "s"))
    tid = src.get_branch("main").timeline.timeline_id
    at = _head(dst)
    assert dst.history_hash(tid, at) == src.history_hash(tid, at)


def test_a_timeline_without_records_of_its_own_gets_an_index(
        tmp_path: Path, s3server: S3Server, aws_env: None) -> None:
    """main -> c (no records of its own) -> d: d's chain reads through c's index."""
    src = open_repository(tmp_path / "src.db")
    src.create_branch("main")
    _round(src, 100, 1)
    src.create_branch("c", "main")
    src.create_branch("d", "c")
    d = src.get_branch("d").timeline.timeline_id
    src.put_records(d, [Record(KEYS[0], Lsn(500), RecordKind.IMAGE, b"d" * 300)])
    bucket = Bucket(parse_s3_uri(s3server.uri(s3server.new_bucket())), timeout=10)
    push_to_bucket(src, bucket, src.ancestry(d), "d", scratch=tmp_path / "s")
    dst = open_repository(tmp_path / "dst.db")
    asyncio.run(pull_from_bucket(dst, bucket, "d", "d", scratch=tmp_path / "s"))
    assert dst.history_hash(d, Lsn(500)) == src.history_hash(d, Lsn(500))
    assert gc_bucket(bucket, grace=0).removed == 0  # every object reachable, gc reads it all


def test_gc_and_pushes_exclude_each_other(tmp_path: Path, s3server: S3Server,
                                          aws_env: None) -> None:
    bucket = Bucket(parse_s3_uri(s3server.uri(s3server.new_bucket())), timeout=10)
    with PushLease(bucket), pytest.raises(ObjectInUse, match="push"):
        gc_bucket(bucket, grace=0)  # a push is running: gc does not
    assert bucket.get(GC_LOCK, 100) is None  # and leaves no lock behind
    bucket.put(GC_LOCK, b"{}", create=True)  # a gc is running
    with PushLease(bucket) as lease, pytest.raises(ObjectInUse, match="gc is running"):
        lease.check_no_gc()  # the push does not commit
    with pytest.raises(ObjectInUse, match="another origin gc"):
        gc_bucket(bucket, grace=0)


def test_a_server_ignoring_if_match_is_refused(tmp_path: Path, s3server: S3Server,
                                               aws_env: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that honours If-None-Match but not If-Match (simulated)."""
    src = open_repository(tmp_path / "src.db")
    src.create_branch("main")
    _round(src, 100, 1)
    bucket = Bucket(parse_s3_uri(s3server.uri(s3server.new_bucket())), timeout=10)
    put = Bucket.put

    def ignoring_if_match(self: Bucket, key: str, data: bytes, *, if_match: str | None = None,
                          **kw: object) -> str:
        return put(self, key, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Bucket, "put", ignoring_if_match)
    with pytest.raises(FeatureNotSupported, match="ignores conditional writes"):
        _push(src, bucket, tmp_path / "s")
    assert BucketView(bucket).refs == {}
