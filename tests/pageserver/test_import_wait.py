"""``import`` waits for the new branch to become readable (issue 10): progress notices, and
the ways it gives up while the follower keeps going (no PostgreSQL: a stand-in server and
follower; the real path is in tests/cli/test_export_cli.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from zenith.errors import InvalidState
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.pageserver import wal_service
from zenith.pageserver.wal_service import Follower, _wait_readable

TARGET = Lsn(0x5000100)


class Notices:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_notice(self, message: str) -> None:
        self.sent.append(message)


def setup(at: list[Lsn]) -> tuple[Any, Follower, Notices]:
    """A server whose branch is at ``at[0]`` (change it to make progress)."""
    tid = TimelineId.generate()
    f = Follower("main", tid, "postgresql://x@127.0.0.1/x", "zenith_slot", 1)
    repo = SimpleNamespace(get_timeline=lambda _tid: SimpleNamespace(last_record_lsn=at[0]))
    return SimpleNamespace(repo=repo, followers={"main": f}), f, Notices()


async def test_returns_once_readable_with_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal_service, "PROGRESS_EVERY", 0.1)
    at = [Lsn(0x5000028)]
    server, f, session = setup(at)

    async def ingest() -> None:
        await asyncio.sleep(0.35)
        at[0] = Lsn(0x5000080)
        await asyncio.sleep(0.2)
        at[0] = Lsn(0x6000000)

    task = asyncio.create_task(ingest())
    await _wait_readable(server, session, f, TARGET, 10.0)  # type: ignore[arg-type]
    await task
    assert session.sent[0] == "waiting for WAL up to 0/5000100: at 0/5000028"
    assert "waiting for WAL up to 0/5000100: at 0/5000080" in session.sent
    assert len(session.sent) >= 4


async def test_gives_up_on_a_failing_follower() -> None:
    at = [Lsn(0x5000028)]
    server, f, session = setup(at)
    f.failures = 7  # failures before the wait do not count

    async def fail() -> None:
        for i in range(2):  # two failures, then progress: the count starts again
            await asyncio.sleep(0.06)
            f.failures, f.error = f.failures + 1, f"boom {i}"
        at[0] = Lsn(0x5000080)
        await asyncio.sleep(0.3)  # seen before the next failure
        for _ in range(3):
            await asyncio.sleep(0.06)
            f.failures, f.error = f.failures + 1, "requested WAL segment has been removed"

    task = asyncio.create_task(fail())
    with pytest.raises(InvalidState) as exc:
        await _wait_readable(server, session, f, TARGET, 10.0)  # type: ignore[arg-type]
    await task
    assert exc.value.message == (
        'branch "main" is not readable yet: streaming WAL from the source failed 3 times in '
        "a row (requested WAL segment has been removed); it is at 0/5000080, readable from "
        "0/5000100")
    assert exc.value.hint is not None and "`zenith wait main 0/5000100`" in exc.value.hint


async def test_times_out_or_stops_with_the_follower() -> None:
    at = [Lsn(0x5000028)]
    server, f, session = setup(at)
    with pytest.raises(InvalidState, match=r"timed out after 0.2 s waiting for WAL up to "
                                           r"0/5000100: branch \"main\" is at 0/5000028"):
        await _wait_readable(server, session, f, TARGET, 0.2)  # type: ignore[arg-type]
    del server.followers["main"]  # detached meanwhile
    with pytest.raises(InvalidState, match="stopped following its source at 0/5000028"):
        await _wait_readable(server, session, f, TARGET, 10.0)  # type: ignore[arg-type]
