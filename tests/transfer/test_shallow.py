"""Shallow push and pull (issue 12): `--since`, the destination's history window, and a
branch whose early history was collected, each sent as the state at one LSN plus the
history after it, against real pageserver processes; digests compared on both sides."""

from __future__ import annotations

import re

import pytest

from tests.fixtures import PageserverProc, start_together, started_pageservers

pytestmark = pytest.mark.timeout(240)


def records_sent(out: str) -> int:
    m = re.search(r"(\d+) records", out)
    assert m, out
    return int(m.group(1))


def lsn_of(ps: PageserverProc, branch: str) -> str:
    value = ps.branch(branch)["last_record_lsn"]
    assert value is not None
    return value


def test_push_since_an_lsn_then_incremental_then_onwards(pageserver_factory) -> None:
    laptop, cloud, third = started_pageservers(pageserver_factory, "laptop", "cloud", "third")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    third.cli("origin", "add", "cloud", cloud.uri(), check=True)
    laptop.cli("generate", "main", "--pages", "200", "--rounds", "3", check=True)
    old = lsn_of(laptop, "main")
    laptop.cli("generate", "main", "--pages", "50", "--rounds", "2", "--seed", "4", check=True)
    since = lsn_of(laptop, "main")
    laptop.cli("generate", "main", "--pages", "20", "--rounds", "1", "--seed", "5", check=True)
    head = lsn_of(laptop, "main")

    out = laptop.cli("push", "main", "cloud", "--since", since, check=True).stdout
    assert f"(shallow: history from {since} on, by --since {since})" in out, out
    # The 200 pages' images at `since` and the 20 records after it: not 3 rounds of 200.
    assert records_sent(out) == 200 + 20
    assert cloud.branch("main")["timeline_id"] == laptop.branch("main")["timeline_id"]
    assert cloud.digest("main") == laptop.digest("main")
    assert cloud.digest(f"main@{since}") == laptop.digest(f"main@{since}")
    refused = cloud.cli("digest", f"main@{old}")
    assert refused.returncode != 0 and "readable" in refused.stderr
    assert "Traceback" not in refused.stderr

    # More history goes as a plain fast-forward: the same timeline, only the new records.
    laptop.cli("generate", "main", "--pages", "7", "--seed", "6", check=True)
    inc = laptop.cli("push", "main", "cloud", check=True).stdout
    assert inc.startswith(f"main -> cloud:main {head}..") and records_sent(inc) == 7
    assert "shallow" not in inc
    assert cloud.digest("main") == laptop.digest("main")
    assert laptop.cli("push", "main", "cloud", check=True).stdout.strip() == \
        "Everything up-to-date"

    # From the shallow copy onwards: a third server pulls what cloud has, from `since`.
    pulled = third.cli("pull", "main", "cloud", check=True).stdout
    assert f"shallow: history from {since} on" in pulled, pulled
    assert third.digest("main") == laptop.digest("main")
    assert third.digest(f"main@{since}") == laptop.digest(f"main@{since}")
    # A branch made on the shallow copy after its base works as any other.
    third.cli("branch", "create", "dev", "--from", "main", check=True)
    third.cli("generate", "dev", "--pages", "3", "--seed", "7", check=True)
    assert third.digest(f"main@{lsn_of(laptop, 'main')}") == laptop.digest("main")


def test_pull_since_a_window_and_all(pageserver_factory) -> None:
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    cloud.cli("generate", "main", "--pages", "100", "--rounds", "4", check=True)
    # A window of 0 bytes of WAL: the head's state alone.
    out = laptop.cli("pull", "main", "cloud:main", "--since", "0B", check=True).stdout
    head = lsn_of(cloud, "main")
    assert f"(shallow: history from {head} on, by --since 0B)" in out, out
    assert records_sent(out) == 100
    assert laptop.digest("main") == cloud.digest("main")
    # "all" takes every record, as without a depth.
    third = pageserver_factory(name="third")
    third.cli("origin", "add", "cloud", cloud.uri(), check=True)
    whole = third.cli("pull", "main", "cloud", "--since", "all", check=True).stdout
    assert "shallow" not in whole and records_sent(whole) == 400
    # A malformed depth is refused before anything moves.
    bad = laptop.cli("pull", "other", "cloud:main", "--since", "yesterday")
    assert bad.returncode != 0 and "invalid history window" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not [b for b in laptop.query("branch_list") if b["name"] == "other"]


def test_a_push_to_a_new_server_sends_what_its_window_needs(pageserver_factory) -> None:
    laptop = pageserver_factory(name="laptop", start=False)
    cloud = pageserver_factory(name="cloud", start=False)
    with cloud.config.updating() as doc:
        doc["pitr_branches"] = {"main": "0B"}
    start_together(laptop, cloud)
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    laptop.cli("generate", "main", "--pages", "100", "--rounds", "3", check=True)
    laptop.cli("generate", "other", "--pages", "10", "--rounds", "3", check=True)
    out = laptop.cli("push", "main", "cloud", check=True).stdout
    head = lsn_of(laptop, "main")
    assert f"(shallow: history from {head} on, by the remote history window 0B)" in out, out
    assert cloud.digest("main") == laptop.digest("main")
    # Its default window (7 days) keeps all of a branch written just now: a full push.
    full = laptop.cli("push", "other", "cloud", check=True).stdout
    assert "shallow" not in full and records_sent(full) == 30


def test_a_branch_leaving_a_shallow_copy_below_its_base(pageserver_factory) -> None:
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    laptop.cli("generate", "main", "--pages", "60", "--rounds", "2", check=True)
    fork = lsn_of(laptop, "main")
    laptop.cli("branch", "create", "dev", "--from", f"main@{fork}", check=True)
    laptop.cli("generate", "dev", "--pages", "5", "--seed", "3", check=True)
    laptop.cli("generate", "main", "--pages", "60", "--seed", "4", check=True)
    laptop.cli("push", "main", "cloud", "--since", lsn_of(laptop, "main"), check=True)
    # cloud holds main only from its head: dev leaves it before, so dev gets a base of its
    # own (its branch point's state) instead of main's history, and says so.
    out = laptop.cli("push", "dev", "cloud", check=True).stdout
    assert f"shallow: history from {fork} on" in out, out
    assert cloud.digest("dev") == laptop.digest("dev")
    assert cloud.digest("main") == laptop.digest("main")
