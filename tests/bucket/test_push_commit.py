"""The commit order of a push to a bucket, in process against moto: a push that dies after
its index but before its ref leaves the old ref (pulls see the old head), and the next
push completes it by moving the ref, sending nothing again (issue 13)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.bucket.s3server import S3Server
from zenith.bucket.layout import parse_s3_uri
from zenith.bucket.pull import pull_from_bucket
from zenith.bucket.push import push_to_bucket
from zenith.bucket.state import BucketView
from zenith.bucket.store import Bucket
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
