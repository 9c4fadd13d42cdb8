"""Garbage collection of page versions: which records no retained LSN can read.

A timeline GC'd at ``horizon`` stays readable at every LSN from ``horizon`` on, and at a
few *kept points* below it: the branch points of its child timelines (a child reads its
ancestor there). The horizon never passes an LSN that a read in progress holds
(:class:`Pins`: a page read, an export, a walk of the records after an LSN, a transfer):
it stops there, and a later GC moves it on. Everything else below the
horizon is history nobody can ask for any more. For one key, reading at a point ``P``
needs the newest image (or tombstone) at or below ``P`` in this timeline and the deltas
after it up to ``P``; with no image in this timeline at or below ``P``, every record up
to ``P`` (they are deltas on top of the ancestor's value). A record that no point needs
is removed: its index row goes at once, its payload bytes count as *garbage* in the data
file until the file is rewritten. Records above the horizon are never touched.

Why that is enough for every read at or above the horizon: reading at ``X >= horizon``
needs the newest image at or below ``X`` and the deltas after it. If that image is above
the horizon, nothing below is needed. If not, it is the newest image at or below the
horizon, which the point ``horizon`` itself keeps, with its deltas up to the horizon; the
deltas above it are above the horizon.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage.api import RecordKind

_DELTA: Final = int(RecordKind.DELTA)


@dataclass(frozen=True, slots=True)
class GcResult:
    """What one GC of one timeline did."""

    timeline_id: TimelineId
    #: The timeline is readable from here on (its new ``min_readable_lsn``).
    horizon: Lsn
    #: LSNs below the horizon that stay readable: child branch points.
    kept_points: tuple[Lsn, ...]
    records_removed: int
    bytes_removed: int
    #: Bytes given back to the file system (holes punched in the data file) by this GC,
    #: also for records an earlier GC removed while a walk held the file.
    bytes_reclaimed: int = 0


def needed(lsns: Sequence[int], kinds: Sequence[int], points: Sequence[int]) -> set[int]:
    """Indexes of the records of one key (``lsns`` ascending, with their ``kinds``) that a
    read at one of ``points`` (ascending) needs."""
    keep: set[int] = set()
    for point in points:
        last = bisect.bisect_right(lsns, point) - 1
        if last < 0:
            continue
        base = last
        while base >= 0 and kinds[base] == _DELTA:
            base -= 1
        keep.update(range(max(base, 0), last + 1))
    return keep


class Pins:
    """LSNs that reads in progress hold on timelines (by internal id), so that a GC that
    starts meanwhile keeps what they read. ``epoch`` counts GCs that moved a timeline's
    readable start: a reader that looked at the timeline before it pinned re-reads it if
    the epoch changed (its view of ``min_readable_lsn`` may be stale)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self.epoch = 0
        self._held: dict[int, Counter[int]] = {}
        self._walkers: Counter[int] = Counter()
        self._reclaiming: set[int] = set()
        #: Holds taken per *generation*: a compaction that moved payloads bumps it, and
        #: gives the old bytes back only once no hold of an older generation is left (a
        #: read that looked up the old place in the index may still read it).
        self.generation = 0
        self._by_generation: Counter[int] = Counter()

    @contextmanager
    def walking(self, tl: int) -> Iterator[None]:
        """A walk of ``tl``'s data file (it reads directories and payloads by itself):
        no GC reclaims space in that file meanwhile (it would flag entries the walk may
        already have read as live)."""
        with self._changed:
            while tl in self._reclaiming:
                self._changed.wait()
            self._walkers[tl] += 1
        try:
            yield
        finally:
            with self._changed:
                self._walkers[tl] -= 1
                if not self._walkers[tl]:
                    del self._walkers[tl]
                    self._changed.notify_all()

    @contextmanager
    def reclaiming(self, tl: int) -> Iterator[bool]:
        """Yields False (and does nothing) while walks of ``tl`` run; else True, and new
        walks wait until the block ends (a few milliseconds a frame)."""
        with self._changed:
            busy = bool(self._walkers[tl]) or tl in self._reclaiming
            if not busy:
                self._reclaiming.add(tl)
        if busy:
            yield False
            return
        try:
            yield True
        finally:
            with self._changed:
                self._reclaiming.discard(tl)
                self._changed.notify_all()

    @contextmanager
    def hold(self, tl: int, lsn: int, *, index: bool = False) -> Iterator[None]:
        """Hold ``lsn`` on ``tl``. ``index``: the holder looks payload places up in the
        index (a page read, materialize): it counts in the current generation."""
        generation = -1
        with self.lock:
            self._held.setdefault(tl, Counter())[lsn] += 1
            if index:
                generation = self.generation
                self._by_generation[generation] += 1
        try:
            yield
        finally:
            with self._changed:
                held = self._held[tl]
                held[lsn] -= 1
                if not held[lsn]:
                    del held[lsn]
                    if not held:
                        del self._held[tl]
                if index:
                    self._by_generation[generation] -= 1
                    if not self._by_generation[generation]:
                        del self._by_generation[generation]
                        self._changed.notify_all()

    def next_generation(self) -> int:
        """Start a new generation of holds; returns the previous one (whose holds may still
        run: see :meth:`wait_generation`). Every read that looks payloads up in the index
        holds an LSN while it does (page reads, materialize: ``hold(..., index=True)``):
        one that began after this call sees what was committed before it."""
        with self.lock:
            self.generation += 1
            return self.generation - 1

    def wait_generation(self, generation: int, timeout: float) -> bool:
        """Wait until no hold of ``generation`` or older is left; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(g <= generation for g in self._by_generation), timeout)

    def held(self, tl: int) -> set[int]:
        """The LSNs held on ``tl`` (the caller holds :attr:`lock`)."""
        return set(self._held.get(tl, ()))
