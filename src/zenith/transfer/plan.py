"""Negotiation: what the receiving side decides to accept, given the sender's offer.

The decision is a pure function of the offer (the source's timeline chain) and the
receiver's repository, so it is tested without any I/O. It follows DESIGN §6: cases are
decided on timelines, then the branch name is created or moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from zenith.errors import InvalidArgument, TransferAborted, UnknownBranch, UnknownTimeline
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Repository, TimelineInfo


class Status(StrEnum):
    NEW = "new"  # destination branch absent: created
    FAST_FORWARD = "fast-forward"  # destination behind, on the same or an ancestor timeline
    UP_TO_DATE = "up-to-date"
    FORCED = "forced"  # diverged, name repointed by --force (old timeline kept)
    REJECTED = "rejected"


@dataclass(frozen=True)
class Send:
    """Records of ``timeline`` with lsn in ``(after, upto]``; ``create`` if the receiver
    lacks the timeline (it is then created with the offered id and ancestry)."""

    timeline: TimelineInfo
    after: Lsn
    upto: Lsn
    create: bool


@dataclass
class Plan:
    status: Status
    message: str
    old: TimelineInfo | None
    source: TimelineInfo
    sends: list[Send] = field(default_factory=list)

    def to_json(self, dry_run: bool) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "message": self.message,
            "dry_run": dry_run,
            "old": _tl_json(self.old) if self.old else None,
            "sends": [
                {"timeline_id": str(s.timeline.timeline_id), "after": str(s.after),
                 "upto": str(s.upto), "create": s.create}
                for s in self.sends
            ],
        }


def _tl_json(tl: TimelineInfo) -> dict[str, Any]:
    return {
        "timeline_id": str(tl.timeline_id),
        "ancestor_id": str(tl.ancestor_id) if tl.ancestor_id else None,
        "ancestor_lsn": str(tl.ancestor_lsn) if tl.ancestor_lsn is not None else None,
        "last_record_lsn": str(tl.last_record_lsn),
        "min_readable_lsn": str(tl.min_readable_lsn),
    }


def chain_to_json(chain: list[TimelineInfo]) -> list[dict[str, Any]]:
    """The source's chain, root first, as the OFFER carries it."""
    return [_tl_json(t) for t in chain]


def chain_from_json(raw: Any) -> list[TimelineInfo]:
    """Parse and check an offered chain: root first, each the child of the one before at an
    LSN within it. Anything else is refused (it comes from the network)."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= 10_000:
        raise TransferAborted("the offer's timeline chain is missing or too long")
    chain: list[TimelineInfo] = []
    try:
        for item in raw:
            anc = item["ancestor_id"]
            tl = TimelineInfo(
                timeline_id=TimelineId.parse(item["timeline_id"]),
                ancestor_id=TimelineId.parse(anc) if anc is not None else None,
                ancestor_lsn=Lsn.parse(item["ancestor_lsn"]) if anc is not None else None,
                last_record_lsn=Lsn.parse(item["last_record_lsn"]),
                min_readable_lsn=Lsn.parse(item["min_readable_lsn"]),
            )
            chain.append(tl)
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferAborted(f"malformed timeline in the offer: {exc}") from exc
    for i, tl in enumerate(chain):
        parent = chain[i - 1] if i else None
        if (parent is None) != (tl.ancestor_id is None):
            raise TransferAborted("the offer's chain does not start at a root timeline")
        if parent is not None:
            assert tl.ancestor_lsn is not None
            if tl.ancestor_id != parent.timeline_id or tl.ancestor_lsn > parent.last_record_lsn:
                raise TransferAborted("the offer's chain is not a line of descent")
        if tl.last_record_lsn < tl.start_lsn or tl.min_readable_lsn < tl.start_lsn:
            raise TransferAborted("an offered timeline ends before it starts")
    if len({t.timeline_id for t in chain}) != len(chain):
        raise TransferAborted("the offer's chain repeats a timeline")
    return chain


def _held(repo: Repository, tid: TimelineId) -> TimelineInfo | None:
    try:
        return repo.get_timeline(tid)
    except UnknownTimeline:
        return None


def make_plan(
    repo: Repository, dest_name: str, chain: list[TimelineInfo], *, pushing: bool, force: bool
) -> Plan:
    """Decide what to receive for branch ``dest_name`` from the offered ``chain``."""
    source = chain[-1]
    try:
        old: TimelineInfo | None = repo.get_branch(dest_name).timeline
    except UnknownBranch:
        old = None
    here, there = ("remote", "local") if pushing else ("local", "remote")

    if old is None:
        status, message = Status.NEW, f"new branch {dest_name}"
    elif old.timeline_id == source.timeline_id:
        if old.last_record_lsn == source.last_record_lsn:
            return Plan(Status.UP_TO_DATE, "Everything up-to-date", old, source)
        if old.last_record_lsn > source.last_record_lsn:
            if pushing:
                return Plan(
                    Status.REJECTED,
                    f"rejected: remote is ahead ({old.last_record_lsn} > "
                    f"{source.last_record_lsn}); pull first",
                    old, source,
                )
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
        elif source.timeline_id in _ancestor_ids(repo, old):
            # The destination descends from the source: it holds all of it and more.
            if pushing and not force:
                return Plan(
                    Status.REJECTED,
                    f"rejected: remote {dest_name} is ahead (on timeline {old.timeline_id}, "
                    f"which descends from {source.timeline_id}); pull first",
                    old, source,
                )
            if not pushing:
                return Plan(Status.UP_TO_DATE, "Already up-to-date (local descends from remote)",
                            old, source)
            status, message = Status.FORCED, "forced update"
        else:
            status, message = _diverged(old, source, dest_name, here, there, force)
        if status is Status.REJECTED:
            return Plan(status, message, old, source)

    sends = _sends(repo, chain)
    return Plan(status, message, old, source, sends)


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


def _ancestor_ids(repo: Repository, tl: TimelineInfo) -> set[TimelineId]:
    out: set[TimelineId] = set()
    while tl.ancestor_id is not None:
        out.add(tl.ancestor_id)
        tl = repo.get_timeline(tl.ancestor_id)
    return out


def _sends(repo: Repository, chain: list[TimelineInfo]) -> list[Send]:
    """For each timeline of the chain, root first, the records the receiver lacks up to the
    point the chain needs (the branch point of the next one; the source's end)."""
    sends: list[Send] = []
    for i, tl in enumerate(chain):
        needed = chain[i + 1].ancestor_lsn if i + 1 < len(chain) else tl.last_record_lsn
        assert needed is not None
        held = _held(repo, tl.timeline_id)
        if held is not None:
            if held.ancestor_id != tl.ancestor_id or held.ancestor_lsn != tl.ancestor_lsn:
                raise InvalidArgument(
                    f"timeline {tl.timeline_id} exists here with another ancestry; "
                    "refusing to mix histories"
                )
            if held.last_record_lsn >= needed:
                continue
            sends.append(Send(tl, held.last_record_lsn, needed, create=False))
        else:
            sends.append(Send(tl, tl.start_lsn, needed, create=True))
    return sends
