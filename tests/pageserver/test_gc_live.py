"""GC through a live pageserver: history windows from config.toml, `zenith gc`, the
background collector, `branch list --verbose`, and a push running while GC removes
versions (the receiver still gets every version)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.fixtures import PageserverProc

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
    assert "removed 0 page versions" in out and "gc: 0 bytes" in out
    # A one-hour window likewise; a window of 0 bytes of WAL keeps only the head.
    set_config(ps, pitr="1h")
    assert "gc: 0 bytes" in ps.cli("gc", check=True).stdout
    set_config(ps, pitr="0B")
    out = ps.cli("gc", "main", check=True).stdout
    assert f"keeps {mid}" in out  # dev's branch point stays readable
    # 6 rounds of 300 pages on main: the head's round and the round dev reads remain.
    assert "removed 1200 page versions" in out, out
    assert ps.digest("main") == before["main"] and ps.digest("dev") == before["dev"]
    rows = space(ps)
    assert rows["main"]["readable_from"] != "0/0"
    assert int(rows["main"]["garbage_bytes"] or 0) >= 1200 * 8192
    assert rows["main"]["window"] == "0B" and rows["dev"]["window"] == "0B"
    # Reading main before the new horizon is refused, not answered wrongly.
    result = ps.cli("digest", f"main@{mid}")
    assert result.returncode != 0 and "readable" in result.stderr
    verbose = ps.cli("branch", "list", "--verbose", check=True).stdout
    assert "main: window 0B, readable from" in verbose and "garbage" in verbose
    # A per-branch window overrides the default.
    set_config(ps, pitr_branches={"dev": "forever"})
    assert space(ps)["dev"]["window"] == "forever"
    assert ps.branch("main")["last_record_lsn"] == head


def test_background_gc_and_a_push_during_gc(pageserver_factory) -> None:
    src = pageserver_factory(start=False)
    set_config(src, gc_period=1)
    src.start()
    dst = pageserver_factory()
    src.cli("generate", "main", "--pages", "2000", "--rounds", "3", check=True)
    first = src.branch("main")["last_record_lsn"]
    src.cli("generate", "main", "--pages", "2000", "--rounds", "1", "--seed", "9", check=True)
    old = src.digest(f"main@{first}")
    src.cli("origin", "add", "dst", dst.uri(), check=True)
    pushed: list[object] = []

    def push() -> None:
        pushed.append(src.cli("push", "main", "dst"))

    thread = threading.Thread(target=push)
    thread.start()
    set_config(src, pitr="1kB")  # the background collector picks it up within a second
    deadline = time.monotonic() + 60
    while space(src)["main"]["readable_from"] == "0/0":
        assert time.monotonic() < deadline, "background GC did not run"
        time.sleep(0.2)
    thread.join(120)
    assert pushed and pushed[0].returncode == 0, pushed  # type: ignore[union-attr]
    # The receiver has every version: reads at the old LSN there equal the source's
    # before GC, though the source no longer answers them.
    assert dst.digest(f"main@{first}") == old
    assert dst.digest("main") == src.digest("main")
    assert src.cli("digest", f"main@{first}").returncode != 0
    log = (src.path / "pageserver.log").read_text()
    assert "GC removed" in log
