"""History windows: parsing, and which horizon each timeline gets from the branches that
run through it (zenith.pageserver.retention)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenith.errors import InvalidArgument
from zenith.lsn import Lsn
from zenith.pageserver.retention import Window, collect, horizons
from zenith.storage import Record, RecordKind, open_repository


def test_window_spellings() -> None:
    assert Window.parse("7d").seconds == 7 * 86400
    assert Window.parse("1.5h").seconds == 5400
    assert Window.parse("2GiB").distance == 2 << 30
    assert Window.parse("500kB").distance == 500_000
    assert Window.parse("0B").distance == 0
    forever = Window.parse("forever")
    assert forever.seconds is None and forever.distance is None
    for bad in ("", "7", "7 days", "-1d", "1xb", "nan", 7):
        with pytest.raises(InvalidArgument):
            Window.parse(bad)


def _write(repo, name: str, lsns: range) -> None:  # type: ignore[no-untyped-def]
    tid = repo.branch_for_writing(name).timeline_id
    repo.put_records(tid, [Record(bytes(18), Lsn(x), RecordKind.IMAGE, b"v%d" % x)
                           for x in lsns])


def test_a_child_window_reaches_into_its_ancestor_only_before_its_branch_point(
        tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        main = repo.create_branch("main").timeline.timeline_id
        _write(repo, "main", range(0x100, 0x1000, 0x100))  # head 0xF00
        repo.create_branch("young", "main", Lsn(0x800))   # no history of its own
        old = repo.create_branch("old", "main", Lsn(0x400)).timeline.timeline_id
        _write(repo, "old", range(0x1000, 0x3000, 0x100))  # long past its branch point
        windows = {"main": Window.parse("0B"), "old": Window.parse("256B")}
        got = horizons(repo, windows, Window.parse("512B"))
        # young's window (512 bytes back from 0x800) reaches into main: main's horizon.
        assert got[main] == Lsn(0x800 - 512)
        # old's cut (0x2F00 - 256) is on its own line, far past 0x400: main only keeps
        # the point 0x400 for it.
        assert got[old] == Lsn(0x2F00 - 256)
        results = {r.timeline_id: r for r in collect(repo, windows, Window.parse("512B"))}
        assert results[main].kept_points == (Lsn(0x400),)
        assert repo.get_value(old, bytes(18), Lsn(0x2F00)) == b"v%d" % 0x2F00
        # Only one branch's timelines, when asked.
        assert set(horizons(repo, windows, Window.parse("512B"), only="old")) == {old, main}
        with pytest.raises(InvalidArgument):
            horizons(repo, windows, Window.parse("1d"), only="nope")
    finally:
        repo.close()


def test_a_time_window_uses_commit_times(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        main = repo.create_branch("main").timeline.timeline_id
        _write(repo, "main", range(0x100, 0x400, 0x100))
        import time
        now = time.time()
        # Everything was committed just now: a 1-hour window keeps all of it; as seen an
        # hour from now, the newest commit point is the cut.
        assert horizons(repo, {}, Window.parse("1h"), now)[main] == Lsn(0)
        assert horizons(repo, {}, Window.parse("1h"), now + 3601)[main] == Lsn(0x300)
        assert repo.commit_lsn_at(main, now - 10) is None
    finally:
        repo.close()
