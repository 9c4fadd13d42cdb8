"""``gc`` and ``branch_space``: garbage collection of page versions outside the history
windows (``retention.py``), on demand and in the background.

``gc [<branch>]`` (admin) collects every timeline some branch runs through (or those of
one branch's ancestry) at its horizon, then compacts it (old plain page images stored
packed, as the same records: ``storage/compaction.py``), and answers one row per timeline:
its branch names, the horizon (the readable start from then on), the LSNs kept below it,
the records and payload bytes removed, the images packed with their bytes before and
after, and the timeline's stored and garbage bytes. The background task does the same
every ``gc_period`` seconds, in the long worker pool, at a bounded rate (at most
``BACKGROUND_COMPACT_BYTES`` read per timeline a pass, resting as long as it works), and
logs what it freed. ``branch_space`` (read) shows, per branch, its window, the oldest LSN it is
readable at and the payload bytes its timeline holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from zenith.errors import UnknownTimeline
from zenith.pageserver.config import RepoConfig
from zenith.pageserver.page_service import command, expect_args, still_working
from zenith.pageserver.retention import collect
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import job_of, workers_of
from zenith.pgwire.server import Session
from zenith.storage import CompactResult, GcResult

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

log = logging.getLogger("zenith.gc")

GC_COLUMNS: Final = ["timeline_id", "branches", "horizon", "kept_points", "records_removed",
                     "bytes_removed", "images_packed", "packed_bytes_before",
                     "packed_bytes_after", "bytes_reclaimed", "stored_bytes",
                     "unreclaimed_bytes"]
SPACE_COLUMNS: Final = ["name", "timeline_id", "window", "readable_from", "last_record_lsn",
                        "stored_bytes", "unreclaimed_bytes"]
#: Index rows a background GC removes per transaction (a bounded step: readers and
#: writers interleave with it).
BACKGROUND_BATCH: Final = 2000
#: Payload bytes a background pass reads to compact per timeline (the next pass goes on),
#: and the rest it takes after each chunk, as a fraction of the chunk's time (at most
#: half of one core).
BACKGROUND_COMPACT_BYTES: Final = 256 << 20
BACKGROUND_COMPACT_PAUSE: Final = 1.0


@dataclass(frozen=True, slots=True)
class Pass:
    """One timeline's GC and compaction in one pass."""

    gc: GcResult
    compact: CompactResult | None

    @property
    def reclaimed(self) -> int:
        return self.gc.bytes_reclaimed + (self.compact.bytes_reclaimed if self.compact else 0)


def _rows(server: Pageserver, results: list[Pass]) -> list[list[str | None]]:
    names: dict[str, list[str]] = {}
    for b in server.repo.list_branches():
        names.setdefault(str(b.timeline.timeline_id), []).append(b.name)
    rows: list[list[str | None]] = []
    for p in results:
        r, c = p.gc, p.compact
        stored, unreclaimed = server.repo.space(r.timeline_id)
        rows.append([str(r.timeline_id), ",".join(names.get(str(r.timeline_id), [])),
                     str(r.horizon), " ".join(str(k) for k in r.kept_points),
                     str(r.records_removed), str(r.bytes_removed),
                     str(c.records if c else 0), str(c.bytes_before if c else 0),
                     str(c.bytes_after if c else 0), str(p.reclaimed),
                     str(stored), str(unreclaimed)])
    return rows


def run_gc(server: Pageserver, only: str | None = None, *,
           cancel: threading.Event | None = None, batch_rows: int = 5000,
           compact_bytes: int | None = None, pause: float = 0.0,
           wait: float = 5.0) -> list[Pass]:
    """One GC pass with the windows of config.toml as they are now, each timeline then
    compacted (blocking). ``wait``: how long compaction may wait for reads that hold old
    places before giving their bytes back (else a later pass does)."""
    default, windows = RepoConfig.load(server.config.path).pitr
    passes = []
    for result in collect(server.repo, windows, default, only=only, cancel=cancel,
                          batch_rows=batch_rows):
        compacted = None
        if cancel is None or not cancel.is_set():
            # A timeline deleted since its GC has nothing left to compact.
            with contextlib.suppress(UnknownTimeline):
                compacted = server.repo.compact(result.timeline_id, max_bytes=compact_bytes,
                                                cancel=cancel, pause=pause, wait=wait)
        passes.append(Pass(result, compacted))
    return passes


@command("gc", "[<branch>]", "remove page versions outside the history windows and "
         "compact the rest now")
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
                run_gc, server, cancel=cancel, batch_rows=BACKGROUND_BATCH,
                compact_bytes=BACKGROUND_COMPACT_BYTES, pause=BACKGROUND_COMPACT_PAUSE,
                wait=1.0)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except Exception:
            log.exception("background GC failed")
            continue
        removed = sum(r.gc.records_removed for r in results)
        packed = [r.compact for r in results if r.compact is not None and r.compact.records]
        if removed or packed:
            log.info("GC removed %d page versions (%d bytes) from %d timelines; compaction "
                     "packed %d images (%d -> %d bytes); %d bytes given back to the file "
                     "system", removed, sum(r.gc.bytes_removed for r in results),
                     sum(1 for r in results if r.gc.records_removed),
                     sum(c.records for c in packed), sum(c.bytes_before for c in packed),
                     sum(c.bytes_after for c in packed), sum(r.reclaimed for r in results))
