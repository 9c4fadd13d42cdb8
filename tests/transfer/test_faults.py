"""Transfers that are interrupted or corrupted: the destination stays at a consistent LSN,
the source loses nothing, and running the command again continues (DESIGN §9)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.fixtures import PageserverProc, started_pageservers
from tests.transfer.faultproxy import FaultProxy, Faults
from tests.transfer.test_push_pull import records_sent

PAGES = 8000  # 64 MiB: long enough to be caught in the middle


def _start_push(src: PageserverProc, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zenith.cli", "-D", str(src.path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(dst: PageserverProc, tid: str) -> int:
    for row in dst.query("timeline_list"):
        if row["timeline_id"] == tid:
            hi, lo = str(row["last_record_lsn"]).split("/")
            return (int(hi, 16) << 32) | int(lo, 16)
    return 0


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _settled(ps: PageserverProc, tid: str) -> dict[str, str | None]:
    """The timeline's row once it stopped changing (three equal reads 0.2 s apart)."""
    deadline = time.monotonic() + 30
    seen: list[dict[str, str | None]] = []
    while len(seen) < 3 or any(r != seen[-1] for r in seen[-3:]):
        assert time.monotonic() < deadline, seen[-3:]
        seen.append(next(r for r in ps.query("timeline_list") if r["timeline_id"] == tid))
        time.sleep(0.2)
    return seen[-1]


def _check_consistent(src: PageserverProc, dst: PageserverProc, tid: str) -> int:
    """The destination's timeline is at an LSN whose state equals the source's there."""
    at = _progress(dst, tid)
    if at:
        lsn = _lsn_text(at)
        assert dst.digest(f"{tid}@{lsn}") == src.digest(f"main@{lsn}"), lsn
    return at


def test_receiver_killed_during_push_resumes(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    laptop.cli("generate", "main", "--pages", str(PAGES), check=True)
    src = laptop.branch("main")
    tid, end = str(src["timeline_id"]), str(src["last_record_lsn"])
    hi, lo = end.split("/")
    final = (int(hi, 16) << 32) | int(lo, 16)
    source_digest = laptop.digest("main")
    reached = []
    for fraction in (0.1, 0.4, 0.7):
        push = _start_push(laptop, "push", "main", "cloud")
        deadline = time.monotonic() + 120
        # Past the fraction, and past where the last run left it: on a loaded machine the
        # last kill may land beyond the next fraction, and a kill before this push has sent
        # anything finds it still connecting ("cannot reach remote"), not interrupted.
        while _progress(cloud, tid) < max(final * fraction, reached[-1] + 1 if reached else 0):
            assert push.poll() is None, push.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cloud.kill()
        out, err = push.communicate(timeout=60)
        assert push.returncode == 1, (out, err)
        assert re.search(r"error: push interrupted: .*server at 127\.0\.0\.1:\d+", err), err
        assert err.splitlines()[-1].startswith("hint: the destination kept"), err
        assert "Traceback" not in err
        cloud.start()
        at = _check_consistent(laptop, cloud, tid)
        assert final * fraction <= at < final
        assert [b for b in cloud.query("branch_list") if b["name"] == "main"] == []
        reached.append(at)
    assert reached == sorted(reached)  # each run continued from the last
    out = laptop.cli("push", "main", "cloud", check=True).stdout
    assert records_sent(out) < PAGES * 0.4  # resumed, not started over
    assert cloud.digest("main") == laptop.digest("main") == source_digest


def test_sender_killed_during_pull(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    cloud, laptop = started_pageservers(pageserver_factory, "cloud", "laptop")
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    cloud.cli("generate", "main", "--pages", str(PAGES), check=True)
    src = cloud.branch("main")
    tid = str(src["timeline_id"])
    digest = cloud.digest("main")
    pull = _start_push(laptop, "pull", "main", "cloud")
    deadline = time.monotonic() + 120
    while _progress(laptop, tid) == 0:
        assert pull.poll() is None, pull.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cloud.kill()
    out, err = pull.communicate(timeout=60)
    assert pull.returncode == 1, (out, err)
    assert re.search(r"error: pull interrupted: .*server at 127\.0\.0\.1:\d+", err), err
    cloud.start()
    assert cloud.digest("main") == digest  # the source lost nothing
    _check_consistent(cloud, laptop, tid)
    laptop.cli("pull", "main", "cloud", check=True)
    assert laptop.digest("main") == digest


@pytest.mark.parametrize("bad_frame", [1, 3])
def test_corrupted_frame_is_rejected(pageserver_factory, bad_frame: int) -> None:  # type: ignore[no-untyped-def]
    """A proxy flips a byte of one DATA frame: the receiver's CRC32C check refuses it,
    keeps what came before, sets no name; a clean push then completes."""
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("generate", "main", "--pages", "1000", check=True)
    tid = str(laptop.branch("main")["timeline_id"])
    with FaultProxy(cloud.port, Faults(corrupt_data_frame=bad_frame)) as proxy:
        laptop.cli("origin", "add", "flaky", cloud.uri(port=proxy.port), check=True)
        res = laptop.cli("push", "main", "flaky")
    assert res.returncode == 1 and "CRC32C" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # nothing past the last good frame is visible, and no branch name was set
    at = _check_consistent(laptop, cloud, tid)
    assert (at == 0) == (bad_frame == 1)
    assert at < _progress(laptop, tid)
    assert cloud.query("branch_list") == []
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    out = laptop.cli("push", "main", "cloud", check=True).stdout
    assert records_sent(out) < 1000 or bad_frame == 1  # resumed after the good frames
    assert cloud.digest("main") == laptop.digest("main")


def test_connection_cut_inside_one_lsn_resumes(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    """One LSN far larger than a frame (as a base-backup import makes): a transfer cut in
    its middle keeps a durable cursor inside it, and the next one sends only the rest."""
    laptop, cloud = started_pageservers(pageserver_factory, "laptop", "cloud")
    laptop.cli("generate", "main", "--pages", "2000", "--one-lsn", check=True)
    src = laptop.branch("main")
    tid = str(src["timeline_id"])
    with FaultProxy(cloud.port, Faults(cut_after_data_frames=8)) as proxy:
        laptop.cli("origin", "add", "flaky", cloud.uri(port=proxy.port), check=True)
        res = laptop.cli("push", "main", "flaky")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    # The sender saw the cut first; the receiver still stores the frames it had read.
    row = _settled(cloud, tid)
    assert row["last_record_lsn"] != src["last_record_lsn"]  # the one LSN is not published
    pending = int(str(row["pending_records"]))
    assert 0 < pending < 2000  # but part of it is durable
    laptop.cli("origin", "add", "cloud", cloud.uri(), check=True)
    out = laptop.cli("push", "main", "cloud", check=True).stdout
    assert records_sent(out) == 2000 - pending
    assert cloud.digest("main") == laptop.digest("main")
