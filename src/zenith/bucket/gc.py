"""``zenith origin gc NAME``: remove what no ref of a bucket reaches (:func:`gc_bucket`).

Reachable: every ref, the index of every timeline a ref's chain runs through (its own and
its ancestors'), and every segment those indexes list (including history an index holds
beyond its ref's head). Everything else under ``timelines/`` — what a killed or rejected
push uploaded, timelines no ref names any more after ``--force``, small segments merged
away — is removed once it is older than the grace period (``--prune``, a day by
default), as are multipart uploads started that long ago and never completed.

Pushes and gc exclude each other through two kinds of lock objects under ``locks/``,
each created with ``If-None-Match: *``: a push holds ``locks/push-<id>`` from before it
reads the bucket until it has committed, and checks, just before it commits, that no
``locks/gc`` exists; gc creates ``locks/gc`` and then refuses to run while any push lock
is live. Whichever order the two happen in, either the push sees the gc lock and fails
cleanly (run it again), or gc sees the push lock and stops: gc never removes what a push
is about to name. A lock left by a killed process is stale after :data:`LOCK_TTL`
(a running push rewrites its lock every :data:`LOCK_RENEW` seconds).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Final

from zenith.bucket.layout import index_key, ref_key
from zenith.bucket.state import BucketView
from zenith.bucket.store import Bucket, Conflict
from zenith.errors import ObjectInUse, TransferAborted, ZenithError
from zenith.ids import TimelineId

#: Graces shorter than this warn: a pull running meanwhile may find a segment gone.
MIN_GRACE: Final = 60 * 60.0
#: A lock object older than this (not renewed) was left by a killed process.
LOCK_TTL: Final = 60 * 60.0
LOCK_RENEW: Final = 5 * 60.0
GC_LOCK: Final = "locks/gc"
PUSH_LOCKS: Final = "locks/push-"
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


def _lock_body() -> bytes:
    return f'{{"started": {time.time():.0f}}}\n'.encode()


class PushLease:
    """A push's lock object (see the module's docstring), renewed as the push goes on."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.key = f"{PUSH_LOCKS}{uuid.uuid4().hex}"
        self.written = 0.0

    def __enter__(self) -> PushLease:
        self.renew()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ZenithError):
            self.bucket.delete([self.key])

    def renew(self) -> None:
        if time.monotonic() - self.written >= LOCK_RENEW:
            self.bucket.put(self.key, _lock_body())
            self.written = time.monotonic()

    def check_no_gc(self) -> None:
        """Just before the commit: no gc may be running."""
        found = self.bucket.stat(GC_LOCK)
        if found is not None and found[2] > time.time() - LOCK_TTL:
            raise ObjectInUse(
                f"{self.bucket.where}: an origin gc is running; this push did not commit",
                hint="run the push again once it has finished (what was uploaded is reused)")


def _live_push_locks(bucket: Bucket) -> list[str]:
    cutoff = time.time() - LOCK_TTL
    return [o.key for o in bucket.list_objects(PUSH_LOCKS) if o.mtime > cutoff]


def gc_bucket(bucket: Bucket, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
              now: float | None = None) -> GcResult:
    """Remove unreachable objects under ``timelines/`` older than ``grace`` seconds, with
    the gc lock held (refused while a push runs)."""
    try:
        bucket.put(GC_LOCK, _lock_body(), create=True)
    except Conflict:
        found = bucket.stat(GC_LOCK)
        if found is not None and found[2] > time.time() - LOCK_TTL:
            raise ObjectInUse(f"{bucket.where}: another origin gc is running",
                              hint="run it again once that one has finished") from None
        bucket.put(GC_LOCK, _lock_body())  # stale: ours now
    try:
        pushing = _live_push_locks(bucket)
        if pushing:
            raise ObjectInUse(
                f"{bucket.where}: {len(pushing)} push(es) to the bucket are running; gc "
                "does not run beside them", hint="run it again once they have finished")
        return _collect(bucket, grace=grace, dry_run=dry_run, now=now)
    finally:
        with contextlib.suppress(ZenithError):
            bucket.delete([GC_LOCK])


def _collect(bucket: Bucket, *, grace: float, dry_run: bool, now: float | None) -> GcResult:
    # Refs and indexes first, the listing after: whatever a push commits in between is
    # younger than the grace period.
    view = BucketView(bucket)
    if view.bad_refs:
        name, why = next(iter(view.bad_refs.items()))
        raise TransferAborted(
            f"{bucket.where}: refs/{name} is not a ref zenith reads ({why}); gc cannot tell "
            "what it reaches, so it removes nothing",
            hint="remove or repair that object, then run gc again")
    reachable = reachable_keys(view)
    cutoff = (time.time() if now is None else now) - grace
    doomed: list[str] = []
    removed_bytes = young = 0
    listed = list(bucket.list_objects("timelines/"))
    for obj in listed:
        if obj.key in reachable:
            continue
        if obj.mtime > cutoff:
            young += 1
            continue
        doomed.append(obj.key)
        removed_bytes += obj.size
    stale = [u for u in bucket.unfinished_uploads("timelines/") if u[2] <= cutoff]
    if not dry_run:
        failed = set(bucket.delete(doomed))
        if failed:
            removed_bytes -= sum(o.size for o in listed if o.key in failed)
            doomed = [k for k in doomed if k not in failed]
        for key, upload_id, _ in stale:
            bucket.abort_upload(key, upload_id)
    return GcResult(len(reachable), len(doomed), removed_bytes, young, len(stale), dry_run)
