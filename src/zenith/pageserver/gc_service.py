"""``gc`` and ``branch_space``: garbage collection of page versions outside the history
windows (``retention.py``), on demand and in the background.

``gc [<branch>]`` (admin) collects every timeline some branch runs through (or those of
one branch's ancestry) at its horizon and answers one row per timeline: its branch names,
the horizon (the readable start from then on), the LSNs kept below it, the records and
payload bytes removed, and the timeline's stored and garbage bytes. The background task
does the same every ``gc_period`` seconds, in the long worker pool, and logs what it
freed. ``branch_space`` (read) shows, per branch, its window, the oldest LSN it is
readable at and the payload bytes its timeline holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Final

from zenith.pageserver.config import RepoConfig
from zenith.pageserver.page_service import command, expect_args, still_working
from zenith.pageserver.retention import collect
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import job_of, workers_of
from zenith.pgwire.server import Session
from zenith.storage import GcResult

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

log = logging.getLogger("zenith.gc")

GC_COLUMNS: Final = ["timeline_id", "branches", "horizon", "kept_points", "records_removed",
                     "bytes_removed", "bytes_reclaimed", "stored_bytes", "unreclaimed_bytes"]
SPACE_COLUMNS: Final = ["name", "timeline_id", "window", "readable_from", "last_record_lsn",
                        "stored_bytes", "unreclaimed_bytes"]
#: Index rows a background GC removes per transaction (a bounded step: readers and
#: writers interleave with it).
BACKGROUND_BATCH: Final = 2000


def _rows(server: Pageserver, results: list[GcResult]) -> list[list[str | None]]:
    names: dict[str, list[str]] = {}
    for b in server.repo.list_branches():
        names.setdefault(str(b.timeline.timeline_id), []).append(b.name)
    rows: list[list[str | None]] = []
    for r in results:
        stored, unreclaimed = server.repo.space(r.timeline_id)
        rows.append([str(r.timeline_id), ",".join(names.get(str(r.timeline_id), [])),
                     str(r.horizon), " ".join(str(p) for p in r.kept_points),
                     str(r.records_removed), str(r.bytes_removed), str(r.bytes_reclaimed),
                     str(stored), str(unreclaimed)])
    return rows


def run_gc(server: Pageserver, only: str | None = None, *,
           cancel: threading.Event | None = None, batch_rows: int = 5000) -> list[GcResult]:
    """One GC pass with the windows of config.toml as they are now (blocking)."""
    default, windows = RepoConfig.load(server.config.path).pitr
    return collect(server.repo, windows, default, only=only, cancel=cancel,
                   batch_rows=batch_rows)


@command("gc", "[<branch>]", "remove page versions outside the history windows now")
async def _gc(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 1)
    require(session.user, Role.ADMIN, "collect garbage")
    only = args[0] if args else None
    if only is not None:
        server.repo.get_branch(only)  # an unknown name: UnknownBranch at once
    async with still_working(server, session, "garbage collection"), \
            job_of(server, session.user) as job:
        results = await job.run(run_gc, server, only, cancel=job.cancel)
    rows = _rows(server, results)
    await session.send_rows(GC_COLUMNS, rows, f"SELECT {len(rows)}")


@command("branch_space", "", "per branch: history window, readable start, stored bytes")
async def _branch_space(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    require(session.user, Role.READ, "read")
    default, windows = RepoConfig.load(server.config.path).pitr
    rows: list[list[str | None]] = []
    for b in server.repo.list_branches():
        stored, unreclaimed = server.repo.space(b.timeline.timeline_id)
        rows.append([b.name, str(b.timeline.timeline_id), str(windows.get(b.name, default)),
                     str(b.timeline.min_readable_lsn), str(b.timeline.last_record_lsn),
                     str(stored), str(unreclaimed)])
    await session.send_rows(SPACE_COLUMNS, rows, f"SELECT {len(rows)}")


async def background_gc(server: Pageserver, stop: asyncio.Event) -> None:
    """Every ``gc_period`` seconds (re-read from config.toml each time; 0: off), one GC
    pass in the long worker pool, in small batches; what it freed goes to the log."""
    while not stop.is_set():
        try:
            period = RepoConfig.load(server.config.path).gc_period
        except Exception as exc:  # a config.toml being edited: try again later
            log.warning("background GC: %s", exc)
            period = 0.0
        try:
            await asyncio.wait_for(stop.wait(), timeout=period or 60.0)
            return
        except TimeoutError:
            pass
        if not period:
            continue
        cancel = threading.Event()
        try:
            results = await workers_of(server).long.run(
                run_gc, server, cancel=cancel, batch_rows=BACKGROUND_BATCH)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except Exception:
            log.exception("background GC failed")
            continue
        removed = sum(r.records_removed for r in results)
        if removed:
            log.info("GC removed %d page versions (%d bytes) from %d timelines; %d bytes "
                     "given back to the file system", removed,
                     sum(r.bytes_removed for r in results),
                     sum(1 for r in results if r.records_removed),
                     sum(r.bytes_reclaimed for r in results))
