"""A push to a bucket killed at several points (SIGKILL of the pushing pageserver): the
branch keeps its old ref, and the push run again sends less — the segments already
uploaded are reused (issue 13)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.bucket.s3server import S3Server
from tests.fixtures import PageserverProc, started_pageservers
from tests.transfer.test_push_pull import records_sent

SEGMENT = 256 * 1024


@pytest.fixture
def pair(pageserver_factory, s3server: S3Server, aws_env: None  # type: ignore[no-untyped-def]
         ) -> tuple[PageserverProc, PageserverProc, str]:
    a, b = (pageserver_factory(name=n, start=False) for n in ("a", "b"))
    with a.config.updating() as doc:
        doc["bucket_segment_bytes"] = SEGMENT
    started_pageservers(lambda name, start: {"a": a, "b": b}[name], "a", "b")
    bucket = s3server.new_bucket()
    for ps in (a, b):
        ps.cli("origin", "add", "backup", s3server.uri(bucket), check=True)
    return a, b, bucket


def _segment_keys(s3server: S3Server, bucket: str) -> list[str]:
    listed = s3server.client().list_objects_v2(Bucket=bucket, Prefix="team/timelines/")
    return [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".zseg")]


def _segments(s3server: S3Server, bucket: str) -> int:
    return len(_segment_keys(s3server, bucket))


def _records_in(s3server: S3Server, bucket: str) -> int:
    """Records in the segment objects there (their metadata says)."""
    s3 = s3server.client()
    return sum(int(s3.head_object(Bucket=bucket, Key=k)["Metadata"]["records"])
               for k in _segment_keys(s3server, bucket))


def test_killed_push_resumes_sending_less(pair: tuple[PageserverProc, PageserverProc, str],
                                          s3server: S3Server) -> None:
    a, b, bucket = pair
    a.cli("generate", "main", "--pages", "3000", "--rounds", "2", "--seed", "7", check=True)
    total = 6000

    for kill_at in (2, 6):
        push = subprocess.Popen([sys.executable, "-m", "zenith.cli", "-D", str(a.path),
                                 "push", "main", "backup"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _segments(s3server, bucket) < kill_at:
            assert push.poll() is None, push.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        a.kill()
        _, err = push.communicate(timeout=30)
        assert push.returncode != 0, err
        listed = b.cli("branch", "list", "--origin", "backup", check=True).stdout
        assert "main" not in listed  # the old ref: none
        a.start()
    uploaded = _records_in(s3server, bucket)
    assert uploaded > 0
    again = a.cli("push", "main", "backup", check=True).stdout
    assert again.startswith("* [new branch] main -> backup:main 0/0.."), again
    # every segment a killed push completed is reused (none sent twice), the rest sent
    assert records_sent(again) == total - uploaded
    b.cli("pull", "main", "backup", check=True)
    assert b.digest("main") == a.digest("main")
