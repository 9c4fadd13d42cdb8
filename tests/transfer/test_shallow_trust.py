"""A shallow copy's base is not covered by the history hash (the receiver takes the
sender's hash at the base's LSN as the start of the chain): a user with the push role could
plant a forged base under another source's timeline id, and honest transfers of that
timeline would then be built on it. So a shallow copy is built on only by whoever sent its
base: the same user pushing, or pulls from the same origin. Live pageservers; the planter
is a raw transfer peer (tests/transfer/hostile_peer.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from tests.fixtures import started_pageservers
from tests.transfer.hostile_peer import RawPeer, Source, fetch
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind
from zenith.transfer.messages import Ask, Done, FrameType, PlanMsg, Proof, Range, RangeEnd

pytestmark = pytest.mark.timeout(120)

PUSHER = ("mallory", "push-pw")


async def raw_push(uri: str, command: str, source: Source,
                   base: list[Record] | None = None) -> tuple[PlanMsg, Done]:
    """Push ``source`` by hand (``command``: ``branch_push ...``): honest proofs, hashes
    and records after the base; ``base``: what to send if the plan asks for one."""
    tid = source.tip.timeline_id
    async with await RawPeer.open(uri, command) as peer:
        await peer.send(source.offer())
        ask = await peer.expect(Ask)
        assert isinstance(ask, Ask)
        await peer.send(Proof(tuple(source.hash_at(p.timeline_id, p.lsn) for p in ask.points)))
        plan = await peer.expect(PlanMsg)
        assert isinstance(plan, PlanMsg) and plan.ranges, plan
        for request in plan.ranges:
            await peer.send(Range(request))
            if request.base:
                assert base is not None, "a base was not expected"
                records = base
            else:
                records = source.between(tid, request.after, request.upto)
            await peer.send_records(records)
            await peer.send(RangeEnd(tid, request.upto, len(records),
                                     sum(len(r.payload) for r in records),
                                     source.hash_at(tid, request.upto)))
        while True:
            frame = await peer.recv()
            if frame.type is FrameType.DONE:
                done = frame.message(Done)
                break
        await peer.stream.finish()
    return plan, done


async def plant(uri: str, name: str, source: Source, at: Lsn) -> Done:
    """Push ``source`` as a shallow copy from ``at`` with every base image forged, the
    honest history hash at ``at`` and the honest records after it."""
    newest: dict[bytes, Record] = {}
    for rec in source.between(source.tip.timeline_id, Lsn(0), at):
        newest[rec.key] = rec
    assert all(r.kind is RecordKind.IMAGE for r in newest.values())
    forged = [replace(r, payload=b"forged" + r.payload[6:])
              for _key, r in sorted(newest.items())]
    plan, done = await raw_push(uri, f"branch_push {name} since={at}", source, forged)
    assert plan.ranges[0].base, plan
    return done


def test_a_planted_base_is_never_built_on_by_another_sender(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    a, s = started_pageservers(pageserver_factory, "a", "s")
    s.add_user(*PUSHER, "push")
    a.cli("generate", "main", "--pages", "40", "--rounds", "3", check=True)
    source = asyncio.run(fetch(a.uri(), "main"))
    tid = source.tip.timeline_id
    at = source.tip.last_record_lsn
    # The planter copies A's main shallow from its head, every image forged, under the
    # name A will push to.
    done = asyncio.run(plant(s.uri(*PUSHER), "main", source, at))
    assert "shallow: history from" in done.result.message, done.result.message
    planted = s.digest("main")
    assert planted != a.digest("main")

    # A's honest push of the same timeline (by another user: the admin) would be told it
    # is up to date, then extend it: refused both times, nothing changed.
    a.cli("origin", "add", "s", s.uri(), check=True)
    for attempt in range(2):
        res = a.cli("push", "main", "s")
        assert res.returncode == 1, res.stdout
        assert f"timeline {tid} is held on the remote side as a shallow copy whose base " \
            "came from another user or origin" in res.stderr, res.stderr
        assert "zenith timeline delete" in res.stderr and "Traceback" not in res.stderr
        assert s.digest("main") == planted
        assert s.branch("main")["last_record_lsn"] == str(at)
        if attempt == 0:
            a.cli("generate", "main", "--pages", "5", "--seed", "3", check=True)
    # S's admin pulling it from A (an origin, not the planter) is refused the same way.
    s.cli("origin", "add", "a", a.uri(), check=True)
    res = s.cli("pull", "main", "a")
    assert res.returncode == 1 and "whose base came from another user or origin" in \
        res.stderr, res.stderr
    assert s.digest("main") == planted

    # The planter extending its own copy is its own business (same sender).
    more = asyncio.run(fetch(a.uri(), "main"))
    done = asyncio.run(_extend(s.uri(*PUSHER), "main", more, at))
    assert done.result.status.name == "FAST_FORWARD", done.result

    # The remedy the message gives: the admin removes the planted copy; the honest push
    # then sends everything, and S holds A's state.
    s.cli("branch", "delete", "main", check=True)
    listed = s.cli("timeline", "list", check=True).stdout
    if str(tid) in listed:
        s.cli("timeline", "delete", str(tid), check=True)
    a.cli("push", "main", "s", check=True)
    assert s.digest("main") == a.digest("main")


async def _extend(uri: str, name: str, source: Source, held: Lsn) -> Done:
    """An honest push of ``source`` onto the copy the same user holds up to ``held``."""
    plan, done = await raw_push(uri, f"branch_push {name}", source)
    assert all(not r.base and r.after == held for r in plan.ranges), plan
    return done
