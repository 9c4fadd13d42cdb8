"""Many small pushes to a bucket: the small segments are merged, so a pull reads O(branch)
objects, and a copy that pulled in between continues from inside a merged segment
(issue 13)."""

from __future__ import annotations

import json

from tests.bucket.s3server import S3Server
from tests.fixtures import started_pageservers
from zenith.bucket.push import MERGE_AFTER


def test_small_segments_are_merged(pageserver_factory, s3server: S3Server,  # type: ignore[no-untyped-def]
                                   aws_env: None) -> None:
    a, b, c = started_pageservers(pageserver_factory, "a", "b", "c")
    bucket = s3server.new_bucket()
    for ps in (a, b, c):
        ps.cli("origin", "add", "backup", s3server.uri(bucket), check=True)
    a.cli("generate", "main", "--pages", "20", check=True)
    a.cli("push", "main", "backup", check=True)
    tid = a.branch("main")["timeline_id"]
    s3 = s3server.client()

    def segments() -> list[dict]:  # type: ignore[type-arg]
        body = s3.get_object(Bucket=bucket, Key=f"team/timelines/{tid}/index.json")["Body"]
        return json.loads(body.read())["segments"]  # type: ignore[no-any-return]

    most = 0
    mid = None
    for i in range(MERGE_AFTER + 4):
        a.cli("generate", "main", "--pages", "3", "--seed", str(i + 1), check=True)
        a.cli("push", "main", "backup", check=True)
        if i == 2:
            b.cli("pull", "main", "backup", check=True)  # a copy of part of the history
            mid = b.branch("main")["last_record_lsn"]
        most = max(most, len(segments()))
    assert most <= MERGE_AFTER + 1
    assert len(segments()) < MERGE_AFTER + 4
    # the merged segments hold what the small ones did: the history, whole, from scratch
    # and from where b stopped (inside a merged segment now)
    c.cli("pull", "main", "backup", check=True)
    b.cli("pull", "main", "backup", check=True)
    for ps in (b, c):
        assert ps.digest("main") == a.digest("main")
    assert c.digest(f"main@{mid}") == a.digest(f"main@{mid}")
