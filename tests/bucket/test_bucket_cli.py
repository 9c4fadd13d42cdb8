"""A bucket as an origin, through the CLI: push, pull, the same cases and messages as with
a pageserver origin (issue 13)."""

from __future__ import annotations

import re

import pytest

from tests.bucket.s3server import S3Server
from tests.fixtures import PageserverProc, started_pageservers


def records_sent(out: str) -> int:
    m = re.search(r"(\d+) records", out)
    assert m, out
    return int(m.group(1))


@pytest.fixture
def pair(pageserver_factory, s3server: S3Server, aws_env: None  # type: ignore[no-untyped-def]
         ) -> tuple[PageserverProc, PageserverProc, str]:
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    uri = s3server.uri(s3server.new_bucket())
    for ps in (laptop, cloud):
        ps.cli("origin", "add", "backup", uri, check=True)
    return laptop, cloud, uri


def test_push_then_pull(pair: tuple[PageserverProc, PageserverProc, str]) -> None:
    laptop, cloud, _ = pair
    laptop.cli("generate", "main", "--pages", "200", "--rounds", "2", check=True)
    first = laptop.cli("push", "main", "backup", check=True).stdout
    assert first.startswith("* [new branch] main -> backup:main 0/0.."), first
    assert records_sent(first) == 400
    assert laptop.cli("push", "main", "backup", check=True).stdout.strip() == \
        "Everything up-to-date"

    got = cloud.cli("pull", "main", "backup", check=True).stdout
    assert got.startswith("* [new branch] backup:main -> main 0/0.."), got
    assert records_sent(got) == 400
    assert cloud.digest("main") == laptop.digest("main")
    assert cloud.branch("main")["timeline_id"] == laptop.branch("main")["timeline_id"]

    old = laptop.branch("main")["last_record_lsn"]
    laptop.cli("generate", "main", "--pages", "7", "--seed", "9", check=True)
    inc = laptop.cli("push", "main", "backup", check=True).stdout
    assert inc.startswith(f"main -> backup:main {old}.."), inc
    assert records_sent(inc) == 7
    got = cloud.cli("pull", "main", "backup", check=True).stdout
    assert got.startswith(f"backup:main -> main {old}.."), got
    assert records_sent(got) == 7
    assert cloud.digest("main") == laptop.digest("main")
    assert cloud.digest(f"main@{old}") == laptop.digest(f"main@{old}")
