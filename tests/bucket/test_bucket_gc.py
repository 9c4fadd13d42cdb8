"""``zenith origin gc``: what no ref reaches goes, after its grace period; everything a ref
reaches stays, however it is reached (issue 13)."""

from __future__ import annotations

import re

from tests.bucket.s3server import S3Server
from tests.fixtures import started_pageservers


def _keys(s3server: S3Server, bucket: str) -> set[str]:
    listed = s3server.client().list_objects_v2(Bucket=bucket, Prefix="team/")
    return {o["Key"][len("team/"):] for o in listed.get("Contents", [])}


def test_gc_keeps_what_refs_reach(pageserver_factory, s3server: S3Server,  # type: ignore[no-untyped-def]
                                  aws_env: None) -> None:
    a, b, c = started_pageservers(pageserver_factory, "a", "b", "c")
    bucket = s3server.new_bucket()
    for ps in (a, b, c):
        ps.cli("origin", "add", "backup", s3server.uri(bucket), check=True)
    a.cli("generate", "main", "--pages", "60", "--rounds", "2", check=True)
    a.cli("push", "main", "backup", check=True)
    a.cli("branch", "create", "dev", "--from", "main", check=True)
    a.cli("generate", "dev", "--pages", "5", "--seed", "1", check=True)
    a.cli("push", "dev", "backup", check=True)
    # B takes the name main: A's main timeline is now reached only as dev's ancestor
    b.cli("generate", "mine", "--pages", "7", "--seed", "2", check=True)
    b.cli("push", "mine", "backup:main", "--force", check=True)
    # and tmp's timeline is reached by nothing once B takes that name too
    a.cli("generate", "tmp", "--pages", "9", "--seed", "3", check=True)
    a.cli("push", "tmp", "backup", check=True)
    b.cli("generate", "mine2", "--pages", "4", "--seed", "4", check=True)
    b.cli("push", "mine2", "backup:tmp", "--force", check=True)
    lost = str(a.branch("tmp")["timeline_id"])
    s3 = s3server.client()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="team/timelines/x/segments/y.zseg")
    before = _keys(s3server, bucket)
    assert f"timelines/{lost}/index.json" in before

    dry = a.cli("origin", "gc", "backup", "--dry-run", check=True)
    # (moto dates every multipart upload in 2010: it counts as unfinished for a day)
    assert re.match(r"backup: would remove 0 objects \(0\.0 MiB\), kept \d+ reachable and "
                    r"[1-9]\d* younger than 1d(; would abort 1 unfinished uploads)?$",
                    dry.stdout.strip()), dry.stdout
    assert _keys(s3server, bucket) == before

    now = a.cli("origin", "gc", "backup", "--prune", "now", check=True)
    assert "may remove small segments a pull from backup" in now.stderr  # warned
    m = re.match(r"backup: removed (\d+) objects \(\d+\.\d MiB\), kept (\d+) reachable and "
                 r"0 younger than now; aborted 1 unfinished uploads$", now.stdout.strip())
    assert m, now.stdout
    after = _keys(s3server, bucket)
    gone = before - after
    assert gone and all(k.startswith(f"timelines/{lost}/") for k in gone), gone
    assert int(m[1]) == len(gone) and int(m[2]) == len(after - {"zenith-bucket.json"})
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert upload["UploadId"]

    # every branch reads whole from what is left
    for name, owner, branch in (("main", b, "mine"), ("dev", a, "dev"), ("tmp", b, "mine2")):
        c.cli("pull", name, "backup", check=True)
        assert c.digest(name) == owner.digest(branch)
    again = a.cli("origin", "gc", "backup", "--prune", "now", check=True).stdout
    assert again.startswith("backup: removed 0 objects")
    bad = a.cli("origin", "gc", "backup", "--prune", "2GiB")
    assert bad.returncode != 0 and "expected an age" in bad.stderr
