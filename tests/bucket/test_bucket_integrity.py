"""A bucket shared by several pageservers: racing pushes end with one winner and a clean
rejection, never a lost update; a corrupt or truncated object is refused on pull with
nothing applied (issue 13)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.bucket.s3server import S3Server
from tests.fixtures import PageserverProc, started_pageservers


@pytest.fixture
def trio(pageserver_factory, s3server: S3Server, aws_env: None  # type: ignore[no-untyped-def]
         ) -> tuple[PageserverProc, PageserverProc, PageserverProc, str]:
    a, b, reader = started_pageservers(pageserver_factory, "a", "b", "reader")
    bucket = s3server.new_bucket()
    for ps in (a, b, reader):
        ps.cli("origin", "add", "shared", s3server.uri(bucket), check=True)
    return a, b, reader, bucket


def test_racing_pushes_have_one_winner(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc, str],
) -> None:
    """Two pageservers push their own histories to one new branch at the same moment, round
    after round (four): exactly one wins each round, the other is rejected cleanly, and the
    branch holds the winner's history whole."""
    a, b, reader, _ = trio
    for ps, seed in ((a, "1"), (b, "2")):
        ps.cli("generate", "main", "--pages", "400", "--seed", seed, check=True)
    raced = 0
    for rnd in range(4):
        name = f"race{rnd}"
        for ps in (a, b):  # a new timeline of its own each round (one name per timeline)
            ps.cli("branch", "create", name, "--from", "main", check=True)
            ps.cli("generate", name, "--pages", "20", "--seed", str(rnd), check=True)
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda ps, n=name: ps.cli("push", n, "shared"), (a, b)))
        won = [ps for ps, r in zip((a, b), runs, strict=True) if r.returncode == 0]
        lost = [r for r in runs if r.returncode != 0]
        assert len(won) == 1 and len(lost) == 1, [r.stdout + r.stderr for r in runs]
        assert runs[(a, b).index(won[0])].stdout.startswith(
            f"* [new branch] {name} -> shared:{name}")
        why = lost[0].stderr
        raced += "rejected: remote changed" in why
        assert "rejected: remote changed" in why or "rejected: histories diverged" in why, why
        assert "Traceback" not in why
        reader.cli("pull", f"copy{rnd}", f"shared:{name}", check=True)
        assert reader.branch(f"copy{rnd}")["timeline_id"] == won[0].branch(name)["timeline_id"]
        assert reader.digest(f"copy{rnd}") == won[0].digest(name)
    # The conditional writes decided at least once (the pushes overlapped), rather than
    # the plan of a push that started after the other had finished.
    assert raced >= 1


def _index(s3server: S3Server, bucket: str, tid: str) -> dict:  # type: ignore[type-arg]
    body = s3server.client().get_object(Bucket=bucket, Key=f"team/timelines/{tid}/index.json")
    return json.loads(body["Body"].read())  # type: ignore[no-any-return]


def test_damaged_object_refused_with_nothing_applied(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc, str], s3server: S3Server,
) -> None:
    a, _, reader, bucket = trio
    a.cli("generate", "main", "--pages", "300", "--rounds", "2", check=True)
    a.cli("push", "main", "shared", check=True)
    segment = _index(s3server, bucket, str(a.branch("main")["timeline_id"]))["segments"][-1]
    s3 = s3server.client()
    key = "team/" + segment["key"]
    good = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    for damaged, expected in ((bytes(flipped), "fails its CRC32C check"),
                              (good[:-100], "its index says")):
        s3.put_object(Bucket=bucket, Key=key, Body=damaged)
        res = reader.cli("pull", "main", "shared")
        assert res.returncode != 0
        assert expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert reader.query("branch_list") == []
        assert reader.query("timeline_list") == []  # nothing created, nothing applied
    s3.put_object(Bucket=bucket, Key=key, Body=good)  # repaired: the pull goes through
    reader.cli("pull", "main", "shared", check=True)
    assert reader.digest("main") == a.digest("main")
