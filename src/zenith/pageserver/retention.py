"""History windows and garbage collection: how long each branch's past stays readable.

A branch's *window* is either a time (``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``: every
state of the branch since that long ago stays readable, as Neon's ``pitr_interval``) or an
LSN distance (``"2GiB"``, ``"64MiB"``, ``"500kB"``: every LSN within that much WAL of the
branch's head, as Neon's ``gc_horizon``); ``"forever"`` keeps everything. ``config.toml``:
``pitr`` is every branch's window, ``[pitr_branches]`` overrides it per branch name.

The *cut* of a branch is the oldest LSN its window covers (for a time window, the newest
commit point written at or before that time). A timeline's GC horizon is the smallest cut
of the branches on it and of the branches whose line leaves it after their cut (their
window reaches back into it), and never past its last record: the history of a branch, in
every timeline it runs through, stays readable inside its window. A timeline no branch's
window reaches into is collected up to its last record, keeping only its children's
branch points.
Storage keeps the branch points of children and the LSNs reads in progress hold (an
export, a digest) below the horizon as well (``zenith.storage.gc``).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Final

from zenith.errors import InvalidArgument
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import GcResult, SqliteRepository

DEFAULT_WINDOW: Final = "7d"
_TIME: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_SIZE: Final = re.compile(r"(\d+)\s*(B|kB|KiB|MB|MiB|GB|GiB|TB|TiB)")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BYTES: Final = {"B": 1, "kB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
                 "GB": 1000**3, "GiB": 1024**3, "TB": 1000**4, "TiB": 1024**4}


@dataclass(frozen=True, slots=True)
class Window:
    """A history window: ``seconds`` or ``distance`` (bytes of WAL), or neither (forever)."""

    text: str
    seconds: float | None = None
    distance: int | None = None

    @classmethod
    def parse(cls, text: object) -> Window:
        if not isinstance(text, str):
            raise InvalidArgument(f"a history window is a string such as \"7d\" or \"2GiB\", "
                                  f"not {text!r:.40}")
        value = text.strip()
        if value == "forever":
            return cls(value)
        if (m := _TIME.fullmatch(value)) is not None:
            return cls(value, seconds=float(m[1]) * _SECONDS[m[2]])
        if (m := _SIZE.fullmatch(value)) is not None:
            return cls(value, distance=int(m[1]) * _BYTES[m[2]])
        raise InvalidArgument(
            f"invalid history window {text!r:.60}",
            hint='a time ("7d", "12h", "30m", "45s", "1w"), an LSN distance ("2GiB", '
                 '"64MiB", "500kB") or "forever"')

    def __str__(self) -> str:
        return self.text


def branch_cut(repo: SqliteRepository, timeline_id: TimelineId, head: Lsn, window: Window,
               now: float) -> Lsn:
    """The oldest LSN ``window`` keeps readable for a branch at ``head``."""
    if window.distance is not None:
        return Lsn(max(0, int(head) - window.distance))
    if window.seconds is not None:
        found = repo.commit_lsn_at(timeline_id, now - window.seconds)
        return found if found is not None else Lsn(0)
    return Lsn(0)


def horizons(repo: SqliteRepository, windows: dict[str, Window], default: Window,
             now: float | None = None, *, only: str | None = None) -> dict[TimelineId, Lsn]:
    """GC horizon of every timeline some branch runs through (``only``: the timelines of
    that branch's ancestry), from each branch's window."""
    now = time.time() if now is None else now
    found: dict[TimelineId, int] = {}
    last: dict[TimelineId, int] = {}
    wanted: set[TimelineId] | None = None
    for branch in repo.list_branches():
        tl = branch.timeline
        cut = int(branch_cut(repo, tl.timeline_id, tl.last_record_lsn,
                             windows.get(branch.name, default), now))
        chain = repo.ancestry(tl.timeline_id)
        if only is not None and branch.name == only:
            wanted = {t.timeline_id for t in chain}
        # On the branch's own timeline the cut applies as it is; on an ancestor only if it
        # falls before the point where the branch's line leaves it (the ancestor's LSNs
        # after that point are another history). Otherwise the branch needs the ancestor
        # at that point alone, which storage keeps as a child's branch point.
        leaves_at: int | None = None
        for t in chain:
            last[t.timeline_id] = int(t.last_record_lsn)
            if leaves_at is None or cut < leaves_at:
                found[t.timeline_id] = min(found.get(t.timeline_id, cut), cut)
            else:
                found.setdefault(t.timeline_id, int(t.last_record_lsn))
            leaves_at = int(t.ancestor_lsn) if t.ancestor_lsn is not None else 0
    if only is not None and wanted is None:
        raise InvalidArgument(f'no branch "{only}"')
    return {tid: Lsn(min(cut, last[tid])) for tid, cut in found.items()
            if wanted is None or tid in wanted}


def collect(repo: SqliteRepository, windows: dict[str, Window], default: Window, *,
            only: str | None = None, cancel: threading.Event | None = None,
            batch_rows: int = 5000) -> list[GcResult]:
    """GC every timeline (or those of branch ``only``) at its horizon. Timelines whose
    horizon is not past their readable start are still swept (``gc`` never moves the start
    back): a child deleted since the last GC may have left versions nothing needs."""
    results = []
    for tid, horizon in sorted(horizons(repo, windows, default, only=only).items(),
                               key=lambda item: str(item[0])):
        if cancel is not None and cancel.is_set():
            break
        results.append(repo.gc(tid, horizon, batch_rows=batch_rows, cancel=cancel))
    return results
