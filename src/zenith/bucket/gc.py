"""``zenith origin gc NAME``: remove what no ref of a bucket reaches (:func:`gc_bucket`).

Reachable: every ref, the index of every timeline a ref's chain runs through (its own and
its ancestors'), and every segment those indexes list (including history an index holds
beyond its ref's head). Everything else under ``timelines/`` — what a killed or rejected
push uploaded, timelines no ref names any more after ``--force`` — is removed once it is
older than the grace period (``--prune``, a day by default), as are multipart uploads
started that long ago and never completed.

Why a push in flight loses nothing: it references (in an index it writes) only segments it
uploaded or refreshed within :data:`REFRESH_AFTER` (a push refreshes an older one, a
server-side copy onto itself, before it commits), and a grace of at least
:data:`MIN_GRACE` is longer than that. A shorter grace (``--prune now``) is for a bucket
no push is writing to, as ``git gc --prune=now`` is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from zenith.bucket.layout import index_key, ref_key
from zenith.bucket.state import BucketView
from zenith.bucket.store import Bucket
from zenith.ids import TimelineId

#: A push refreshes a segment it references that is older than this before committing.
REFRESH_AFTER: Final = 30 * 60.0
#: Graces at least this long never remove anything a push in flight will reference.
MIN_GRACE: Final = 60 * 60.0
DEFAULT_GRACE: Final = 24 * 60 * 60.0


@dataclass(frozen=True)
class GcResult:
    reachable: int  # objects a ref reaches
    removed: int
    bytes_removed: int
    kept_young: int  # unreachable, but younger than the grace period
    uploads_aborted: int
    dry_run: bool = False

    COLUMNS = ("reachable", "removed", "bytes_removed", "kept_young", "uploads_aborted",
               "dry_run")

    def to_row(self) -> list[str | None]:
        return [str(self.reachable), str(self.removed), str(self.bytes_removed),
                str(self.kept_young), str(self.uploads_aborted),
                "true" if self.dry_run else "false"]


def reachable_keys(view: BucketView) -> set[str]:
    """Every object some ref reaches."""
    keys: set[str] = set()
    seen: set[TimelineId] = set()
    for name, held in view.refs.items():
        keys.add(ref_key(name))
        tid: TimelineId | None = held.ref.timeline_id
        while tid is not None and tid not in seen:
            seen.add(tid)
            index = view.index(tid)
            keys.add(index_key(tid))
            keys.update(s.key for s in index.segments)
            tid = index.ancestor_id if index.base_lsn is None else None
    return keys


def gc_bucket(bucket: Bucket, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
              now: float | None = None) -> GcResult:
    """Remove unreachable objects under ``timelines/`` older than ``grace`` seconds."""
    # Refs and indexes first, the listing after: whatever a push commits in between is
    # younger than the grace period.
    view = BucketView(bucket)
    reachable = reachable_keys(view)
    cutoff = (time.time() if now is None else now) - grace
    doomed: list[str] = []
    removed_bytes = young = 0
    for obj in bucket.list_objects("timelines/"):
        if obj.key in reachable:
            continue
        if obj.mtime > cutoff:
            young += 1
            continue
        doomed.append(obj.key)
        removed_bytes += obj.size
    stale = [u for u in bucket.unfinished_uploads("timelines/") if u[2] <= cutoff]
    if not dry_run:
        bucket.delete(doomed)
        for key, upload_id, _ in stale:
            bucket.abort_upload(key, upload_id)
    return GcResult(len(reachable), len(doomed), removed_bytes, young, len(stale), dry_run)
