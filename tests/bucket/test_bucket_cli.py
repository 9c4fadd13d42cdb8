"""A bucket as an origin, through the CLI: push, pull, the same cases and messages as with
a pageserver origin (issue 13)."""

from __future__ import annotations

import re

import pytest

from tests.bucket.s3server import S3RVER_PROFILE, S3Server
from tests.fixtures import PageserverProc, started_pageservers
from tests.transfer.test_push_pull import records_sent
from zenith.bucket.layout import parse_s3_uri


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


def test_cases_as_with_a_pageserver(pair: tuple[PageserverProc, PageserverProc, str]) -> None:
    laptop, cloud, _ = pair
    assert laptop.cli("branch", "list", "--origin", "backup", check=True).stdout.strip() == \
        "origin backup has no branches yet"
    laptop.cli("generate", "main", "--pages", "50", check=True)
    laptop.cli("push", "main", "backup", check=True)
    head = laptop.branch("main")
    listed = laptop.cli("branch", "list", "--origin", "backup", check=True).stdout
    assert re.search(rf"^main\s+{head['timeline_id']}\s+-\s+{head['last_record_lsn']}$",
                     listed, re.M), listed

    # dry runs change nothing
    laptop.cli("generate", "main", "--pages", "5", "--seed", "2", check=True)
    dry = laptop.cli("push", "main", "backup", "--dry-run", check=True).stdout
    assert dry.startswith(f"(dry run) main -> backup:main {head['last_record_lsn']}.."), dry
    assert records_sent(dry) == 5
    assert laptop.cli("branch", "list", "--origin", "backup", check=True).stdout == listed
    dry = cloud.cli("pull", "main", "backup", "--dry-run", check=True).stdout
    assert dry.startswith("(dry run) * [new branch] backup:main -> main 0/0.."), dry
    assert records_sent(dry) == 50
    assert not cloud.query("branch_list")

    # a child branch sends only its own records, on top of its ancestor
    cloud.cli("pull", "main", "backup", check=True)
    laptop.cli("push", "main", "backup", check=True)
    laptop.cli("branch", "create", "dev", "--from", "main", check=True)
    laptop.cli("generate", "dev", "--pages", "3", "--seed", "3", check=True)
    out = laptop.cli("push", "dev", "backup", check=True).stdout
    assert out.startswith("* [new branch] dev -> backup:dev"), out
    assert records_sent(out) == 3
    refused = cloud.cli("pull", "dev", "backup")  # needs main beyond what main holds here
    assert refused.returncode != 0 and "transfer main first" in refused.stderr
    assert records_sent(cloud.cli("pull", "main", "backup", check=True).stdout) == 5
    out = cloud.cli("pull", "dev", "backup", check=True).stdout
    assert records_sent(out) == 3
    assert cloud.digest("dev") == laptop.digest("dev")

    # the remote is ahead of a stale copy: pull first
    stale = cloud.cli("push", "main", "backup:dev")
    assert stale.returncode != 0
    assert "rejected" in stale.stderr
    laptop.cli("generate", "main", "--pages", "2", "--seed", "4", check=True)
    laptop.cli("push", "main", "backup", check=True)
    behind = cloud.cli("push", "main", "backup")
    assert behind.returncode != 0
    assert "rejected: remote is ahead" in behind.stderr and "pull first" in behind.stderr

    # diverged: another pageserver's own history under the same name
    cloud.cli("generate", "mine", "--pages", "4", "--seed", "5", check=True)
    diverged = cloud.cli("push", "mine", "backup:main")
    assert diverged.returncode != 0
    assert "rejected: histories diverged" in diverged.stderr and "--force" in diverged.stderr
    forced = cloud.cli("push", "mine", "backup:main", "--force", check=True).stdout
    assert forced.startswith("+ mine -> backup:main") and "(forced update" in forced, forced
    mine = cloud.branch("mine")
    listed = laptop.cli("branch", "list", "--origin", "backup", check=True).stdout
    assert re.search(rf"^main\s+{mine['timeline_id']}\s", listed, re.M), listed
    refused = laptop.cli("push", "main", "backup")
    assert refused.returncode != 0 and "rejected: histories diverged" in refused.stderr

    # what is not there
    missing = cloud.cli("pull", "nope", "backup")
    assert missing.returncode != 0
    assert 'branch "nope" not found' in missing.stderr
    assert "Traceback" not in missing.stderr


def test_bad_uris_and_options(pair: tuple[PageserverProc, PageserverProc, str],
                              s3server: S3Server) -> None:
    laptop, _, uri = pair
    secret = "wJalrXUtnFEMI-K7MDENG"
    bad = laptop.cli("origin", "add", "leaky", f"s3://AKIDEXAMPLE:{secret}@zenith-x/p")
    assert bad.returncode != 0 and "carries no credentials" in bad.stderr
    assert secret not in bad.stderr + bad.stdout
    for wrong, says in ((s3server.uri("zenith-x") + "&colour=blue", "unknown s3:// parameter"),
                        ("s3://Not_A_Bucket/p", "invalid bucket name"),
                        ("s3://zenith-x/p?addressing=sideways", "invalid addressing"),
                        ("s3://zenith-x/p?endpoint=ftp://h", "invalid endpoint")):
        res = laptop.cli("origin", "add", "x", wrong)
        assert res.returncode != 0 and says in res.stderr, (wrong, res.stderr)
    assert "leaky" not in laptop.cli("origin", "list", check=True).stdout
    laptop.cli("generate", "main", "--pages", "3", check=True)
    since = laptop.cli("pull", "other", "backup:main", "--since", "0/1")
    assert since.returncode != 0 and "--since is not supported" in since.stderr
    # a bucket that does not exist
    laptop.cli("origin", "add", "void", s3server.uri("zenith-no-such-bucket"), check=True)
    void = laptop.cli("push", "main", "void")
    assert void.returncode != 0 and "does not exist" in void.stderr, void.stderr
    # a profile the shared files do not have
    laptop.cli("origin", "add", "ghost", s3server.uri("zenith-x") + "&profile=ghost",
               check=True)
    ghost = laptop.cli("push", "main", "ghost")
    assert ghost.returncode != 0 and "no AWS profile 'ghost'" in ghost.stderr, ghost.stderr
    # a client may not point the pageserver's credentials at a bucket of its choosing
    direct = laptop.query  # psycopg, as an admin of the pageserver
    with pytest.raises(Exception, match="must be one of this repository's origins"):
        direct(f"perform_push main '{s3server.uri('zenith-elsewhere')}' main")
    assert uri in laptop.cli("origin", "list", check=True).stdout


def test_second_server_without_conditional_writes(
        pair: tuple[PageserverProc, PageserverProc, str], s3server: S3Server, s3rver: str) -> None:
    """s3rver, an S3 look-alike that accepts If-None-Match and If-Match and ignores them:
    zenith refuses to push there (concurrent pushes could lose updates), and pulls from a
    copy of a bucket there as from any. Its keys come from a profile of the shared
    credentials file (``?profile=``), the others' from the environment."""
    laptop, cloud, uri = pair
    laptop.cli("generate", "main", "--pages", "30", check=True)
    laptop.cli("push", "main", "backup", check=True)
    import boto3
    import botocore.config

    other = boto3.client("s3", endpoint_url=s3rver, region_name="us-east-1",
                         aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER",
                         config=botocore.config.Config(s3={"addressing_style": "path"}))
    other.create_bucket(Bucket="zenith-copy")
    for ps in (laptop, cloud):
        ps.cli("origin", "add", "lookalike",
               f"s3://zenith-copy/team?endpoint={s3rver}&addressing=path"
               f"&profile={S3RVER_PROFILE}", check=True)  # its keys: from the shared file
    refused = laptop.cli("push", "main", "lookalike")
    assert refused.returncode != 0 and "ignores conditional writes" in refused.stderr, \
        refused.stderr
    listed = other.list_objects_v2(Bucket="zenith-copy").get("Contents", [])
    assert [o["Key"] for o in listed] == ["team/zenith-bucket.json"]  # no ref, no segment
    source = s3server.client()
    bucket = parse_s3_uri(uri).bucket
    for o in source.list_objects_v2(Bucket=bucket)["Contents"]:
        body = source.get_object(Bucket=bucket, Key=o["Key"])
        other.put_object(Bucket="zenith-copy", Key=o["Key"], Body=body["Body"].read(),
                         Metadata=body.get("Metadata", {}))
    cloud.cli("pull", "main", "lookalike", check=True)
    assert cloud.digest("main") == laptop.digest("main")
