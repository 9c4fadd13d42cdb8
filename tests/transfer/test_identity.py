"""History identity end to end (issue 9, scenario 2): a timeline has one writer, new
history on a received branch forks a timeline of its own, and two histories of one
timeline are never grafted together — by push or by pull."""

from __future__ import annotations

import pytest

from tests.fixtures import PageserverProc, started_pageservers


def _timelines(ps: PageserverProc) -> dict[str, dict[str, object]]:
    return {str(r["timeline_id"]): r for r in ps.query("timeline_list")}


@pytest.fixture
def trio(pageserver_factory) -> tuple[PageserverProc, PageserverProc, PageserverProc]:  # type: ignore[no-untyped-def]
    a, b, c = started_pageservers(pageserver_factory, "a", "b", "c")
    for ps in (a, c):
        ps.cli("origin", "add", "cloud", b.uri(), check=True)
    # A writes main and pushes it; C pulls it; both then add history of their own.
    a.cli("generate", "main", "--pages", "40", check=True)
    a.cli("push", "main", "cloud", check=True)
    c.cli("pull", "main", "cloud", check=True)
    return a, b, c


def test_writing_a_received_branch_forks_it(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc],
) -> None:
    a, _b, c = trio
    received = c.branch("main")
    assert received["timeline_id"] == a.branch("main")["timeline_id"]
    c.cli("generate", "main", "--pages", "5", "--seed", "7", check=True)
    mine = c.branch("main")
    assert mine["timeline_id"] != received["timeline_id"]  # a timeline of C's own
    assert mine["ancestor_timeline_id"] == received["timeline_id"]
    assert mine["ancestor_lsn"] == received["last_record_lsn"]
    tls = _timelines(c)
    assert tls[str(received["timeline_id"])]["last_record_lsn"] == received["last_record_lsn"]
    assert tls[str(received["timeline_id"])]["received"] == "true"
    assert tls[str(mine["timeline_id"])]["received"] == "false"
    # A timeline id of another writer cannot be written directly either.
    res = c.cli("generate", str(received["timeline_id"]), "--pages", "1")
    assert res.returncode == 1 and "received from another pageserver" in res.stderr


def test_two_writers_never_graft_on_push(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc],
) -> None:
    a, b, c = trio
    c.cli("generate", "main", "--pages", "6", "--seed", "3", check=True)  # C forks
    a.cli("generate", "main", "--pages", "9", "--seed", "4", check=True)  # A goes on
    a.cli("push", "main", "cloud", check=True)  # fast-forward on B
    b_main = b.branch("main")
    b_digest = b.digest("main")
    assert b_digest == a.digest("main")

    out = c.cli("push", "main", "cloud:cmain", check=True).stdout
    assert out.startswith("* [new branch] main -> cloud:cmain")
    assert b.branch("main") == b_main and b.digest("main") == b_digest  # untouched
    cmain, c_main = b.branch("cmain"), c.branch("main")
    assert cmain["timeline_id"] == c_main["timeline_id"] != b_main["timeline_id"]
    assert (cmain["ancestor_timeline_id"], cmain["ancestor_lsn"]) == \
        (c_main["ancestor_timeline_id"], c_main["ancestor_lsn"])
    assert b.digest("cmain") == c.digest("main")  # exactly C's history
    # A's history on B at C's branch point is what C branched from.
    at = f"{b_main['timeline_id']}@{c_main['ancestor_lsn']}"
    assert b.digest(at) == c.digest(at)

    # C pushing to B's main is a diverged push: refused, nothing changed. Forced, it would
    # give C's timeline a second name on B (cmain): refused too, since two names of one
    # timeline would move together. Without cmain, the name moves; A's timeline is kept.
    res = c.cli("push", "main", "cloud")
    assert res.returncode == 1 and "histories diverged" in res.stderr, res.stderr
    assert b.branch("main") == b_main
    res = c.cli("push", "main", "cloud", "--force")
    assert res.returncode == 1 and "already named cmain" in res.stderr, res.stderr
    assert b.branch("main") == b_main
    b.cli("branch", "delete", "cmain", check=True)
    forced = c.cli("push", "main", "cloud", "--force", check=True).stdout
    assert forced.startswith("+ main -> cloud:main") and "(forced update)" in forced
    assert b.branch("main")["timeline_id"] == c_main["timeline_id"]
    kept = _timelines(b)[str(b_main["timeline_id"])]
    assert kept["last_record_lsn"] == b_main["last_record_lsn"]
    assert b.digest(f"{b_main['timeline_id']}@{b_main['last_record_lsn']}") == b_digest


def test_two_writers_never_graft_on_pull(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc],
) -> None:
    a, b, c = trio
    c.cli("generate", "main", "--pages", "6", "--seed", "3", check=True)  # C forks
    a.cli("generate", "main", "--pages", "9", "--seed", "4", check=True)
    a.cli("push", "main", "cloud", check=True)
    b_branches = b.query("branch_list")
    c_main, c_digest = c.branch("main"), c.digest("main")

    res = c.cli("pull", "main", "cloud")
    assert res.returncode == 1 and "histories diverged" in res.stderr, res.stderr
    assert c.branch("main") == c_main and c.digest("main") == c_digest

    # Into a new name: A's timeline, extended on C past the point C forked from.
    out = c.cli("pull", "bmain", "cloud:main", check=True).stdout
    assert out.startswith("* [new branch] cloud:main -> bmain")
    assert c.digest("bmain") == a.digest("main")
    assert c.branch("main") == c_main and c.digest("main") == c_digest
    assert b.query("branch_list") == b_branches  # pulls never change the remote

    res = c.cli("pull", "main", "cloud", "--force")  # would be a second name (bmain)
    assert res.returncode == 1 and "already named bmain" in res.stderr, res.stderr
    c.cli("branch", "delete", "bmain", check=True)  # A's timeline is kept: C's descends
    forced = c.cli("pull", "main", "cloud", "--force", check=True).stdout
    assert "(forced update)" in forced
    assert c.digest("main") == a.digest("main")
    kept = _timelines(c)[str(c_main["timeline_id"])]  # C's own history is kept, unnamed
    assert kept["last_record_lsn"] == c_main["last_record_lsn"] and kept["branches"] == ""


def test_history_on_top_of_a_received_branch_fast_forwards_its_writer(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc],
) -> None:
    """B adds history on top of A's main (on a timeline of B's own) and pushes it back:
    A's main fast-forwards onto B's timeline, and A's own timeline is not extended."""
    a, b, _c = trio
    a_main = a.branch("main")
    b.cli("origin", "add", "a", a.uri(), check=True)
    b.cli("generate", "main", "--pages", "3", "--seed", "8", check=True)  # forks on B
    b_main = b.branch("main")
    assert b_main["timeline_id"] != a_main["timeline_id"]
    out = b.cli("push", "main", "a", check=True).stdout
    assert out.startswith("main -> a:main") and "3 records" in out
    assert a.branch("main")["timeline_id"] == b_main["timeline_id"]
    assert a.digest("main") == b.digest("main")
    assert _timelines(a)[str(a_main["timeline_id"])]["last_record_lsn"] == \
        a_main["last_record_lsn"]
    # A now writes main on a timeline of its own again.
    a.cli("generate", "main", "--pages", "2", "--seed", "9", check=True)
    assert a.branch("main")["ancestor_timeline_id"] == b_main["timeline_id"]


def test_remote_errors_keep_their_sqlstate_across_the_hop(
    trio: tuple[PageserverProc, PageserverProc, PageserverProc],
) -> None:
    """What the remote pageserver refuses reaches the local pageserver's client with the
    remote's SQLSTATE and message (psycopg as the client of the local pageserver)."""
    import psycopg

    from zenith.pageserver.quoting import command_text

    a, b, c = trio
    c.cli("generate", "main", "--pages", "2", "--seed", "1", check=True)
    a.cli("generate", "main", "--pages", "2", "--seed", "2", check=True)
    a.cli("push", "main", "cloud", check=True)
    b.add_user("reader", "s3cret-reader", "read")
    cases = [
        (b.uri(), "55000", "histories diverged"),  # the remote's plan: rejected
        (b.uri("reader", "s3cret-reader"), "42501", "push"),  # the remote's rights
    ]
    for uri, sqlstate, words in cases:
        with psycopg.connect(c.uri(), autocommit=True) as conn, \
                pytest.raises(psycopg.Error) as info:
            conn.execute(command_text("perform_push", "main", uri, "main"))
        assert info.value.sqlstate == sqlstate, info.value
        assert words in str(info.value)
