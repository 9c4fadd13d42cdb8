"""GC through a live pageserver: history windows from config.toml, `zenith gc`, the
background collector, `branch list --verbose`, and a push running while GC removes
versions (the receiver still gets every version), then a shallow push of what is left."""

from __future__ import annotations

import re
import time

import pytest

from tests.fixtures import PageserverProc, start_together
from zenith.lsn import Lsn

pytestmark = pytest.mark.timeout(240)


def set_config(ps: PageserverProc, **values: object) -> None:
    with ps.config.updating() as doc:
        for name, value in values.items():
            doc[name] = value


def space(ps: PageserverProc) -> dict[str, dict[str, str | None]]:
    return {r["name"]: r for r in ps.query("branch_space")}  # type: ignore[misc]


def test_gc_keeps_the_window_and_branch_points(pageserver_factory) -> None:
    ps = pageserver_factory()
    ps.cli("generate", "main", "--pages", "300", "--rounds", "4", check=True)
    mid = ps.branch("main")["last_record_lsn"]
    ps.cli("branch", "create", "dev", "--from", f"main@{mid}", check=True)
    ps.cli("generate", "main", "--pages", "300", "--rounds", "2", "--seed", "5", check=True)
    ps.cli("generate", "dev", "--pages", "10", "--rounds", "1", "--seed", "6", check=True)
    head = ps.branch("main")["last_record_lsn"]
    before = {"main": ps.digest("main"), "dev": ps.digest("dev"),
              "mid": ps.digest(f"main@{mid}")}

    # The default window (7 days) keeps everything written just now.
    out = ps.cli("gc", check=True).stdout
    assert "removed 0 page versions" in out and "gc: 0 bytes given back" in out
    # A one-hour window likewise; a window of 0 bytes of WAL keeps only the head.
    set_config(ps, pitr="1h")
    assert "removed 0 page versions" in ps.cli("gc", check=True).stdout
    set_config(ps, pitr="0B")
    out = ps.cli("gc", "main", check=True).stdout
    assert f"keeps {mid}" in out  # dev's branch point stays readable
    # 6 rounds of 300 pages on main: the head's round and the round dev reads remain.
    assert "removed 1200 page versions" in out, out
    assert ps.digest("main") == before["main"] and ps.digest("dev") == before["dev"]
    rows = space(ps)
    assert rows["main"]["readable_from"] != "0/0"
    assert int(rows["main"]["unreclaimed_bytes"] or 0) == 0  # given back at once
    assert int(rows["main"]["stored_bytes"] or 0) <= (1800 - 1200) * 8192
    assert "gc: 0 bytes given back" not in out
    assert rows["main"]["window"] == "0B" and rows["dev"]["window"] == "0B"
    # Reading main before the new horizon is refused, not answered wrongly.
    result = ps.cli("digest", f"main@{mid}")
    assert result.returncode != 0 and "readable" in result.stderr
    verbose = ps.cli("branch", "list", "--verbose", check=True).stdout
    assert "main: window 0B, readable from" in verbose and "of page versions" in verbose
    status = ps.cli("status", check=True).stdout
    assert "history: 2 branches" in status and "window 0B" in status
    # A per-branch window overrides the default.
    set_config(ps, pitr_branches={"dev": "forever"})
    assert space(ps)["dev"]["window"] == "forever"
    assert ps.branch("main")["last_record_lsn"] == head


def test_background_gc_then_pushes(pageserver_factory) -> None:
    src = pageserver_factory(start=False)
    set_config(src, gc_period=1)
    dst, fresh = pageserver_factory(start=False), pageserver_factory(start=False)
    start_together(src, dst, fresh)
    src.cli("generate", "main", "--pages", "2000", "--rounds", "3", check=True)
    first = src.branch("main")["last_record_lsn"]
    src.cli("generate", "main", "--pages", "2000", "--rounds", "1", "--seed", "9", check=True)
    old = src.digest(f"main@{first}")
    src.cli("origin", "add", "dst", dst.uri(), check=True)
    src.cli("origin", "add", "fresh", fresh.uri(), check=True)
    src.cli("push", "main", "dst", check=True)
    blocks = sum(p.stat().st_blocks for p in (src.path / "zenith.db.d").iterdir())

    set_config(src, pitr="0B")  # the background collector picks it up within a second
    deadline = time.monotonic() + 60
    while space(src)["main"]["readable_from"] == "0/0":
        assert time.monotonic() < deadline, "background GC did not run"
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while sum(p.stat().st_blocks for p in (src.path / "zenith.db.d").iterdir()) > blocks * 0.4:
        assert time.monotonic() < deadline, "GC gave no space back"
        time.sleep(0.2)
    # The pass logs what it removed once it ends (after giving the space back).
    while "GC removed" not in (src.path / "pageserver.log").read_text():
        assert time.monotonic() < deadline, "the background GC pass logged nothing"
        time.sleep(0.2)
    # The receiver pushed to before has every version; the source no longer answers the
    # old LSN, and says so.
    assert dst.digest(f"main@{first}") == old
    result = src.cli("digest", f"main@{first}")
    assert result.returncode != 0 and "readable" in result.stderr
    # More history pushes incrementally to it as before.
    src.cli("generate", "main", "--pages", "10", "--seed", "11", check=True)
    src.cli("push", "main", "dst", check=True)
    assert dst.digest("main") == src.digest("main")
    # A server that has nothing gets a shallow copy from where the source's history is
    # whole, and the push says so.
    out = src.cli("push", "main", "fresh", check=True).stdout
    m = re.search(r"shallow: history from (\S+) on", out)
    assert m and "collected on the sending" in out, out
    base = m.group(1)
    # Past what the source collected (the background GC goes on moving its start, so it
    # may no longer read there): the state there is the one dst, which holds it all, has.
    assert Lsn.parse(base) > Lsn.parse(str(first))
    assert fresh.digest("main") == src.digest("main")
    assert fresh.digest(f"main@{base}") == dst.digest(f"main@{base}")
    result = fresh.cli("digest", f"main@{first}")
    assert result.returncode != 0 and "readable" in result.stderr
