"""The S3 calls of a bucket origin against a real S3 API server: conditional writes and a
multipart upload that a later call resumes (``bucket/store.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import zenith.bucket.store as store
from tests.bucket.s3server import S3Server
from zenith.bucket.layout import parse_s3_uri
from zenith.bucket.store import Bucket, Conflict


@pytest.fixture
def bucket(s3server: S3Server, aws_env: None) -> Bucket:
    return Bucket(parse_s3_uri(s3server.uri(s3server.new_bucket())))


def test_conditional_writes(bucket: Bucket) -> None:
    etag = bucket.put("refs/main", b"one", create=True)
    with pytest.raises(Conflict):
        bucket.put("refs/main", b"two", create=True)  # If-None-Match: * on an existing one
    newer = bucket.put("refs/main", b"two", if_match=etag)
    with pytest.raises(Conflict):
        bucket.put("refs/main", b"three", if_match=etag)  # a stale ETag
    assert bucket.get("refs/main", 100) == (b"two", newer)
    assert bucket.get("refs/other", 100) is None


class _Killed(Exception):
    pass


def test_multipart_upload_resumes(bucket: Bucket, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "PART_SIZE", 5 << 20)  # S3's smallest part
    monkeypatch.setattr(store, "SINGLE_PUT_MAX", 5 << 20)
    data = os.urandom(12 << 20)  # three parts: 5, 5 and 2 MiB
    path = tmp_path / "segment"
    path.write_bytes(data)
    meta = {"records": "1"}
    parts = 0

    def die_after_two(n: int) -> None:
        nonlocal parts
        parts += 1
        if parts == 2:
            raise _Killed

    with pytest.raises(_Killed):
        bucket.upload("seg", str(path), meta, die_after_two)
    assert bucket.head("seg") is None  # not there until completed
    assert bucket.upload("seg", str(path), meta) == 2 << 20  # only the last part went up
    assert bucket.head("seg") == (len(data), meta)
    got = bucket.get("seg", len(data))
    assert got is not None and got[0] == data
    assert bucket.upload("seg", str(path), meta) == 0  # immutable: never sent again

    # A killed upload of other bytes under a key: its parts are not mixed into the new one.
    other = bytearray(os.urandom(12 << 20))
    path.write_bytes(other)
    parts = 0
    with pytest.raises(_Killed):
        bucket.upload("seg2", str(path), meta, die_after_two)
    other[1] ^= 1  # the same sizes, other bytes in the first part
    path.write_bytes(other)
    # the first part again (its MD5 differs), not the second (the same bytes), the third
    assert bucket.upload("seg2", str(path), meta) == (5 << 20) + (2 << 20)
    got = bucket.get("seg2", len(other))
    assert got is not None and got[0] == bytes(other)
