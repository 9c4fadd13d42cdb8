"""Negotiation: what the receiving side accepts, given the sender's offer and proofs.

Pure functions of the offer (the source's timeline chain), the sender's history hashes
and the receiver's repository, so every case is tested without I/O. DESIGN §6:

* identity first: every timeline of the chain that the receiver holds must have the same
  ancestry and the same history hash up to where both have it (:func:`points_to_prove`),
  or the histories diverged — refused, with or without ``--force``, since one timeline id
  cannot hold two histories;
* then cases are decided on timelines, and the branch name is created or moved;
* a transfer writes only the destination's own chain, and never moves another branch:
  it creates timelines, extends the timeline the destination name points to, or extends
  an unnamed one (an ancestor kept up to a branch point, or what an interrupted transfer
  left) — and only timelines this pageserver received, never ones it writes itself;
* a timeline the receiver lacks is sent from where the sender's history is whole, or
  from the requested depth (``--since``, or the destination's history window), as a
  *shallow* copy: its state at that LSN as images (a base), then its records after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zenith.errors import UnknownBranch, UnknownTimeline
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Repository, TimelineInfo
from zenith.transfer.messages import MAX_CHAIN, PlanMsg, Point, RangeRequest, Status


@dataclass(frozen=True)
class Send:
    """Records of ``timeline`` in ``(after, upto]`` (less what ``request.resume`` says the
    receiver holds); ``create``: the receiver creates the timeline first."""

    timeline: TimelineInfo
    request: RangeRequest


@dataclass(frozen=True)
class Depth:
    """How much history a new copy of a branch gets: from ``lsn``, from ``distance``
    bytes of WAL before the head, or from ``seconds`` ago (the sender finds the LSN);
    none of them: all of it. ``explicit``: the user asked (``--since``), rather than
    the destination's history window."""

    text: str
    lsn: Lsn | None = None
    distance: int | None = None
    seconds: float | None = None
    explicit: bool = False

    def since(self, head: Lsn, at_time: Lsn | None) -> Lsn | None:
        """The oldest LSN a new copy of a branch whose head is ``head`` needs;
        ``at_time``: the source's LSN ``seconds`` ago, as its sender found it (None: none
        that old). None: all of it."""
        since: Lsn | None = None
        if self.lsn is not None:
            since = self.lsn
        elif self.distance is not None:
            since = Lsn(max(0, int(head) - self.distance))
        elif self.seconds is not None:
            since = at_time
        return min(since, head) if since is not None else None


@dataclass
class Plan:
    status: Status
    message: str
    old: TimelineInfo | None
    source: TimelineInfo
    sends: list[Send] = field(default_factory=list)
    #: Where a shallow copy starts (the base's LSN), or None.
    base: Lsn | None = None

    def to_message(self, dry_run: bool, compression: str | None) -> PlanMsg:
        return PlanMsg(self.status, self.message, dry_run, self.old,
                       tuple(s.request for s in self.sends), compression)


def _held(repo: Repository, tid: TimelineId) -> TimelineInfo | None:
    """The timeline as held here; None if it is not, or if its shallow base did not
    arrive whole (the receiver starts it again)."""
    try:
        held = repo.get_timeline(tid)
    except UnknownTimeline:
        return None
    return held if held.base_complete else None


def _needed(chain: tuple[TimelineInfo, ...], i: int) -> Lsn:
    """How far the chain needs timeline ``i``: the next one's branch point, or its end."""
    nxt = chain[i + 1].ancestor_lsn if i + 1 < len(chain) else chain[i].last_record_lsn
    assert nxt is not None
    return nxt


def points_to_prove(repo: Repository, chain: tuple[TimelineInfo, ...]) -> list[Point]:
    """Where the sender must prove its history: every chain timeline held here, at the
    lower of our ``last_record_lsn`` and the LSN the chain needs it to."""
    points = []
    for i, tl in enumerate(chain):
        held = _held(repo, tl.timeline_id)
        if held is None:
            continue
        at = min(held.last_record_lsn, _needed(chain, i))
        if at < held.history_start or at < tl.history_start:
            continue  # not whole here or there: the chain cannot use it (see _sends)
        points.append(Point(tl.timeline_id, at))
    return points


def make_plan(
    repo: Repository,
    dest_name: str,
    chain: tuple[TimelineInfo, ...],
    mismatched: dict[TimelineId, Lsn],
    *,
    pushing: bool,
    force: bool,
    since: Lsn | None = None,
    depth: Depth | None = None,
    principal: str | None = None,
) -> Plan:
    """Decide what to receive for branch ``dest_name`` from the offered ``chain`` (root
    first). ``mismatched``: the timelines whose proof failed, with the LSN of the proof.
    ``since``: the oldest LSN a new copy needs (resolved from ``depth``); None: all.
    ``principal``: who sends. A new shallow copy records it; a shallow copy held here
    already is built on (extended, named, or said to be up to date) only by the one who
    sent its base, whose hash is not proven (:func:`_untrusted_base`)."""
    plan = _plan(repo, dest_name, chain, mismatched, pushing=pushing, force=force,
                 since=since, depth=depth)
    if plan.status is Status.REJECTED:
        return plan
    untrusted = _untrusted_base(repo, chain, plan.sends, principal)
    if untrusted is None:
        return plan
    here = "remote" if pushing else "local"
    return Plan(Status.REJECTED, (
        f"rejected: timeline {untrusted} is held on the {here} side as a shallow copy "
        "whose base came from another user or origin; the base is not covered by the "
        "history hash, so this transfer does not build on it. An admin there can remove "
        f"it (zenith timeline delete {untrusted}, after deleting or moving the branches "
        "on it); the transfer then sends a base of its own"), plan.old, plan.source)


def _plan(
    repo: Repository,
    dest_name: str,
    chain: tuple[TimelineInfo, ...],
    mismatched: dict[TimelineId, Lsn],
    *,
    pushing: bool,
    force: bool,
    since: Lsn | None = None,
    depth: Depth | None = None,
) -> Plan:
    """:func:`make_plan` but for the shallow-base check."""
    source = chain[-1]
    try:
        old: TimelineInfo | None = repo.get_branch(dest_name).timeline
    except UnknownBranch:
        old = None
    here, there = ("remote", "local") if pushing else ("local", "remote")

    def reject(message: str) -> Plan:
        return Plan(Status.REJECTED, message, old, source)

    for tl in chain:
        held = _held(repo, tl.timeline_id)
        if held is not None and (held.ancestor_id, held.ancestor_lsn) != \
                (tl.ancestor_id, tl.ancestor_lsn):
            return reject(
                f"rejected: histories diverged: timeline {tl.timeline_id} has another ancestry "
                f"on the {here} side than on the {there} side; it cannot be received "
                "(no --force: one timeline id cannot hold two histories)"
            )
        if tl.timeline_id in mismatched:
            return reject(
                f"rejected: histories diverged: timeline {tl.timeline_id} holds different "
                f"records on the {here} side than on the {there} side up to "
                f"{mismatched[tl.timeline_id]}; it cannot be received (no --force: one "
                "timeline id cannot hold two histories)"
            )

    if old is None:
        status, message = Status.NEW, f"new branch {dest_name}"
    elif old.timeline_id == source.timeline_id:
        if old.last_record_lsn == source.last_record_lsn:
            return Plan(Status.UP_TO_DATE, "Everything up-to-date", old, source)
        if old.last_record_lsn > source.last_record_lsn:
            if pushing:
                return reject(f"rejected: remote is ahead ({old.last_record_lsn} > "
                              f"{source.last_record_lsn}); pull first")
            return Plan(Status.UP_TO_DATE,
                        f"Already up-to-date (local is ahead: {old.last_record_lsn} > "
                        f"{source.last_record_lsn})", old, source)
        status, message = Status.FAST_FORWARD, "fast-forward"
    else:
        ids = [t.timeline_id for t in chain]
        if old.timeline_id in ids[:-1]:
            child = chain[ids.index(old.timeline_id) + 1]
            assert child.ancestor_lsn is not None
            if old.last_record_lsn <= child.ancestor_lsn:
                status, message = Status.FAST_FORWARD, "fast-forward onto a descendant timeline"
            else:
                status, message = _diverged(old, source, dest_name, here, there, force)
        elif (_branch_point(repo, old, source.timeline_id) or Lsn(0)) >= \
                source.last_record_lsn:
            # The destination descends from the source's end: it holds all of it and more.
            if not pushing:
                return Plan(Status.UP_TO_DATE, "Already up-to-date (local descends from remote)",
                            old, source)
            if not force:
                return reject(
                    f"rejected: remote {dest_name} is ahead (on timeline {old.timeline_id}, "
                    f"which descends from {source.timeline_id}); pull first"
                )
            status, message = Status.FORCED, "forced update"
        else:
            status, message = _diverged(old, source, dest_name, here, there, force)
        if status is Status.REJECTED:
            return reject(message)

    named = _names(repo)
    others = sorted(set(named.get(source.timeline_id, [])) - {dest_name})
    if others:
        # A second name for one timeline would move with the first: not git's refs.
        return reject(
            f"rejected: timeline {source.timeline_id} is already named {', '.join(others)} "
            f"on the {here} side; {dest_name} cannot name it too (two names of one timeline move "
            f"together). Transfer {others[0]} instead, or branch from it there "
            f"(zenith branch create {dest_name} --from {others[0]})"
        )
    sends = _sends(repo, chain, old, dest_name, named, since)
    if isinstance(sends, str):
        return reject(sends)
    base = next((s.request.after for s in sends if s.request.base), None)
    if base is not None:
        asked = depth is not None and since is not None and base == since
        why = (f"--since {depth.text}" if asked and depth is not None and depth.explicit else
               f"the {here} history window {depth.text}" if asked and depth is not None
               else "the history before it was collected on the sending side")
        message += f" (shallow: history from {base} on, by {why})"
    return Plan(status, message, old, source, sends, base)


def _untrusted_base(repo: Repository, chain: tuple[TimelineInfo, ...], sends: list[Send],
                    principal: str | None) -> TimelineId | None:
    """The shallow timeline held here that the branch would read through (its base
    stands in for all history before it) if another sender than ``principal`` sent its
    base, else None. Walks the chain down from the source: timelines this transfer
    creates whole, or holds whole, read their ancestors; a base it sends is its own."""
    based = {s.request.timeline_id for s in sends if s.request.base}
    for tl in reversed(chain):
        if tl.timeline_id in based:
            return None
        held = _held(repo, tl.timeline_id)
        if held is not None and held.base_lsn is not None:
            return None if held.base_from == principal else tl.timeline_id
    return None


def _names(repo: Repository) -> dict[TimelineId, list[str]]:
    named: dict[TimelineId, list[str]] = {}
    for b in repo.list_branches():
        named.setdefault(b.timeline.timeline_id, []).append(b.name)
    return named


def _diverged(old: TimelineInfo, source: TimelineInfo, name: str, here: str, there: str,
              force: bool) -> tuple[Status, str]:
    if force:
        return Status.FORCED, (f"forced update (timeline {old.timeline_id} at "
                               f"{old.last_record_lsn} is kept, unnamed)")
    return Status.REJECTED, (
        f"rejected: histories diverged: {here} {name} is on timeline {old.timeline_id} at "
        f"{old.last_record_lsn}, {there} on timeline {source.timeline_id} at "
        f"{source.last_record_lsn}; use --force to repoint the name (no data is deleted)"
    )


def _branch_point(repo: Repository, tl: TimelineInfo, ancestor: TimelineId) -> Lsn | None:
    """Where ``tl``'s line of descent leaves timeline ``ancestor``; None if it does not.
    The walk ends at a shallow timeline: its ancestor is not held here (identity only)."""
    for _ in range(MAX_CHAIN):
        if tl.ancestor_id is None:
            return None
        assert tl.ancestor_lsn is not None
        if tl.ancestor_id == ancestor:
            return tl.ancestor_lsn
        if tl.base_lsn is not None:
            return None
        tl = repo.get_timeline(tl.ancestor_id)
    return None


def _base(chain: tuple[TimelineInfo, ...], first: int, since: Lsn, *,
          must: bool = False) -> tuple[int, Lsn] | None:
    """Where a new copy of ``chain[first:]`` starts: None for its whole history (possible
    and wanted, and not ``must``), else the timeline index and LSN of the lowest base that
    covers ``since`` and that the sender can give (it reads the state there; it holds
    every record of the timelines after it). At equal LSNs the later timeline (fewer
    timelines to create)."""
    whole = [tl.history_start <= tl.start_lsn and not (i == 0 and tl.ancestor_id)
             for i, tl in enumerate(chain)]
    if since <= chain[first].start_lsn and all(whole[first:]) and not must:
        return None
    best: tuple[int, Lsn] | None = None
    for k in range(first, len(chain)):
        if not all(whole[k + 1:]):
            continue
        tl = chain[k]
        at = max(since, tl.start_lsn, tl.history_start, tl.min_readable_lsn)
        if at <= _needed(chain, k) and (best is None or at <= best[1]):
            best = (k, Lsn(at))
    return best


def _sends(
    repo: Repository, chain: tuple[TimelineInfo, ...], old: TimelineInfo | None, dest: str,
    named: dict[TimelineId, list[str]], since: Lsn | None = None,
) -> list[Send] | str:
    """For each timeline of the chain, root first, the records the receiver lacks up to
    where the chain needs it; or why it may not write them."""
    sends: list[Send] = []
    helds = [_held(repo, tl.timeline_id) for tl in chain]
    # Timelines below the highest one held here are this side's business (held, or not
    # needed under a shallow copy); a new copy starts above it.
    top = max((i for i, h in enumerate(helds) if h is not None), default=-1)
    first = top + 1
    # A held timeline that is not readable (here) where the next one branches from it
    # cannot be its ancestor: the new copy then starts with a base above it.
    held_top = helds[top] if top >= 0 else None
    unusable = held_top is not None and top < len(chain) - 1 and \
        _needed(chain, top) < max(held_top.min_readable_lsn, held_top.history_start)
    shallow: tuple[int, list[Send]] | None = None
    if first < len(chain):
        # A depth applies to a branch new here; otherwise only what the sender can give.
        base = _base(chain, first, since if since is not None and top < 0 else Lsn(0),
                     must=unusable)
        if base is None and unusable:
            assert held_top is not None
            return (f"rejected: timeline {chain[top].timeline_id} is held here from "
                    f"{held_top.min_readable_lsn} on; the branch leaves it before, and the "
                    "sender has no base to start a copy above it")
        if base is None and first == 0 and chain[0].ancestor_id is not None:
            return "rejected: the sender holds no base for its shallow timeline"
        if base is not None:
            k, at = base
            tl = chain[k]
            first_sends = [Send(tl, RangeRequest(tl.timeline_id, at, at, create=True,
                                                 base=True))]
            if at < _needed(chain, k):
                first_sends.append(Send(tl, RangeRequest(tl.timeline_id, at,
                                                         _needed(chain, k), create=False)))
            shallow = (k, first_sends)
            first = k + 1
    for i, tl in enumerate(chain):
        needed = _needed(chain, i)
        held = helds[i]
        if shallow is not None and i == shallow[0]:
            sends.extend(shallow[1])
            continue
        if held is None or (unusable and i <= top):
            if i < first:
                continue  # below a shallow copy here or being made
            request = RangeRequest(tl.timeline_id, tl.start_lsn, needed, create=True)
            sends.append(Send(tl, request))
            continue
        if held.last_record_lsn < needed and held.last_record_lsn < tl.history_start:
            holders = named.get(held.timeline_id)
            remedy = (f"delete the branch {', '.join(holders)} here" if holders else
                      f"remove it here (zenith timeline delete {tl.timeline_id}, after the "
                      "branches that start on it)")
            return (f"rejected: timeline {tl.timeline_id} is held here up to "
                    f"{held.last_record_lsn}, and the sender holds its history only from "
                    f"{tl.history_start} on (collected there); {remedy} and transfer it "
                    "again (a shallow copy)")
        if held.last_record_lsn >= needed:
            continue
        ours = old is not None and held.timeline_id == old.timeline_id \
            and named.get(held.timeline_id) == [dest]
        # Unnamed (an ancestor kept up to a branch point, or left by an interrupted
        # transfer): extending it moves no branch, since descendants read it only up to
        # their branch points.
        unnamed = held.timeline_id not in named
        if not held.received:
            return (f"rejected: histories diverged: timeline {tl.timeline_id} is written by "
                    "this pageserver; it cannot receive history for it from elsewhere")
        if not (ours or unnamed):
            names = ", ".join(sorted(named[held.timeline_id]))
            return (f"rejected: timeline {tl.timeline_id} is held here at "
                    f"{held.last_record_lsn} (by {names}) and {dest} needs it up to {needed}; "
                    f"a transfer to {dest} writes only {dest}'s own timelines: transfer "
                    f"{names} first")
        pending = held.pending
        resume = pending if pending is not None and pending.lsn <= needed else None
        request = RangeRequest(tl.timeline_id, held.last_record_lsn, needed, False, resume)
        sends.append(Send(tl, request))
    return sends
