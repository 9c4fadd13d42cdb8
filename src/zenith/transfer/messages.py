"""The vocabulary of a transfer: every message both ends exchange, as a typed value with one
encoder and one checked decoder.

The sender (``sender.py``), the receiver (``receiver.py``), the pageserver's commands and
the CLI all speak through these types; none of them touches a raw dict. A control
message travels as a JSON object in one frame (``frames.py``); decoding checks every
field's type and range and the size of the whole, and anything else is
:class:`TransferAborted` (it came from the network). DATA frames are binary and have
their own codec in ``frames.py``.

The exchange (docs/push-pull.md tells it for users)::

    sender                                   receiver
    Offer {chain, compression}          ->
                                        <-   Ask {points}        prove these hashes
    Proof {hashes}                      ->
                                        <-   PlanMsg {status, ranges, ...}
    dry run:  Summary {records, bytes}  ->
    per range (a shallow transfer's first range is a *base*: the state at ``after`` as
    images, then the history hash there in its RangeEnd):
      Range {timeline, after, upto, resume, base} ->
      DATA ...                          ->   applied in groups, durable
                                        <-   Ack {timeline, lsn, pending}
      RangeEnd {upto, records, bytes, hash} ->
                                        <-   Ack {timeline, lsn: upto}
                                        <-   Done {result}       after the name moved

This module imports nothing heavy: the CLI uses :class:`TransferResult`,
:class:`ProgressNotice` and :class:`TransferArgs` from here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Final, TypeVar

from zenith.errors import InvalidArgument, TransferAborted
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage.api import KEY_SIZE, Cursor, TimelineInfo

PROTOCOL_VERSION: Final = 3
#: Seconds a transfer waits for a silent peer (config.toml ``transfer_timeout``).
DEFAULT_TIMEOUT: Final = 60.0
#: Bound on one control message's JSON (an offer of MAX_CHAIN timelines fits easily).
MAX_JSON: Final = 1 << 20
#: Longest ancestry a transfer carries.
MAX_CHAIN: Final = 1000
MAX_TEXT: Final = 4096
HASH_SIZE: Final = 32


class FrameType(IntEnum):
    OFFER = 1  # sender: the source's timeline chain
    PLAN = 2  # receiver: what to send, or why not
    RANGE = 3  # sender: the DATA frames that follow belong to this range of a timeline
    DATA = 4  # sender: records (binary, frames.py)
    RANGE_END = 5  # sender: counts and history hash of the range
    ACK = 6  # receiver: durable up to this LSN (and pending cursor)
    DONE = 7  # receiver: the outcome, after the branch name moved
    SUMMARY = 8  # sender, for a dry run: what it would send
    ASK = 9  # receiver: history hashes it needs before it plans
    PROOF = 10  # sender: those hashes


class Status(StrEnum):
    NEW = "new"  # destination branch absent: created
    FAST_FORWARD = "fast-forward"  # destination behind, on the same or an ancestor timeline
    UP_TO_DATE = "up-to-date"
    FORCED = "forced"  # diverged, name repointed by --force (old timeline kept)
    REJECTED = "rejected"


# -- checked decoding ---------------------------------------------------------------------


class _Fields:
    """Typed access to a decoded JSON object; every failure names the message and field."""

    def __init__(self, value: Any, what: str) -> None:
        if not isinstance(value, dict):
            raise TransferAborted(f"{what}: expected a JSON object")
        self.value, self.what = value, what

    def _get(self, name: str) -> Any:
        if name not in self.value:
            raise TransferAborted(f"{self.what}: missing field {name!r}")
        return self.value[name]

    def _bad(self, name: str, expected: str) -> TransferAborted:
        return TransferAborted(f"{self.what}: field {name!r} is not {expected}")

    def integer(self, name: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        v = self._get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._bad(name, f"an integer in [{lo}, {hi}]")
        return v

    def boolean(self, name: str) -> bool:
        v = self._get(name)
        if not isinstance(v, bool):
            raise self._bad(name, "a boolean")
        return v

    def text(self, name: str, limit: int = MAX_TEXT) -> str:
        v = self._get(name)
        if not isinstance(v, str) or len(v) > limit:
            raise self._bad(name, f"a string of at most {limit} characters")
        return v

    def optional(self, name: str) -> bool:
        """True when the field is present and not null."""
        return self.value.get(name) is not None

    def lsn(self, name: str) -> Lsn:
        try:
            return Lsn.parse(self.text(name, 17))
        except ValueError:
            raise self._bad(name, "an LSN") from None

    def tid(self, name: str) -> TimelineId:
        try:
            return TimelineId.parse(self.text(name, 32))
        except ValueError:
            raise self._bad(name, "a timeline id") from None

    def hex(self, name: str, size: int) -> bytes:
        try:
            raw = bytes.fromhex(self.text(name, 2 * size))
        except ValueError:
            raise self._bad(name, f"{size} bytes in hex") from None
        if len(raw) != size:
            raise self._bad(name, f"{size} bytes in hex")
        return raw

    def items(self, name: str, limit: int) -> list[Any]:
        v = self._get(name)
        if not isinstance(v, list) or len(v) > limit:
            raise self._bad(name, f"a list of at most {limit} items")
        return v

    def sub(self, name: str) -> _Fields:
        return _Fields(self._get(name), f"{self.what}.{name}")


#: Checked access to a decoded JSON object, for other codecs of JSON from a peer (the
#: objects of a bucket origin, ``bucket/layout.py``).
Fields = _Fields


def _timeline_json(tl: TimelineInfo) -> dict[str, Any]:
    return {
        "timeline_id": str(tl.timeline_id),
        "ancestor_id": str(tl.ancestor_id) if tl.ancestor_id else None,
        "ancestor_lsn": str(tl.ancestor_lsn) if tl.ancestor_lsn is not None else None,
        "last_record_lsn": str(tl.last_record_lsn),
        "min_readable_lsn": str(tl.min_readable_lsn),
        # The sender holds every record of the timeline's own after this LSN (not
        # before: GC removed some, or it is shallow there).
        "history_from": str(tl.history_start),
    }


def _timeline(f: _Fields) -> TimelineInfo:
    ancestor = f.tid("ancestor_id") if f.optional("ancestor_id") else None
    tl = TimelineInfo(
        timeline_id=f.tid("timeline_id"),
        ancestor_id=ancestor,
        ancestor_lsn=f.lsn("ancestor_lsn") if ancestor is not None else None,
        last_record_lsn=f.lsn("last_record_lsn"),
        min_readable_lsn=f.lsn("min_readable_lsn"),
    )
    if f.optional("history_from"):
        whole_after = f.lsn("history_from")
        if whole_after > tl.start_lsn:
            tl = dataclasses.replace(tl, collected_lsn=whole_after)
    if tl.last_record_lsn < tl.start_lsn or tl.min_readable_lsn < tl.start_lsn \
            or tl.history_start > tl.last_record_lsn:
        raise TransferAborted(f"{f.what}: timeline {tl.timeline_id} ends before it starts")
    return tl


def _cursor_json(c: Cursor | None) -> dict[str, Any] | None:
    return None if c is None else {"lsn": str(c.lsn), "count": c.count, "key": c.key.hex()}


def _cursor(f: _Fields, name: str) -> Cursor | None:
    if not f.optional(name):
        return None
    c = f.sub(name)
    return Cursor(c.lsn("lsn"), c.integer("count", 1), c.hex("key", KEY_SIZE))


# -- messages -----------------------------------------------------------------------------

M = TypeVar("M", bound="Message")


class Message:
    """A control message: ``TYPE`` names its frame type; ``to_json``/``from_json`` are its
    codec (``from_json`` checks everything)."""

    TYPE: ClassVar[FrameType]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls: type[M], f: _Fields) -> M:
        raise NotImplementedError

    def encode(self) -> bytes:
        """The JSON body of this message's frame."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def decode(cls: type[M], ftype: FrameType, body: bytes) -> M:
    """Decode a control frame's body as message ``cls``: the frame type must match and the
    JSON must be well-formed, within :data:`MAX_JSON`, and carry every field in range."""
    if ftype is not cls.TYPE:
        raise TransferAborted(f"expected {cls.TYPE.name}, got a {ftype.name} frame")
    if len(body) > MAX_JSON:
        raise TransferAborted(f"{ftype.name} message of {len(body)} bytes exceeds {MAX_JSON}")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TransferAborted(f"{ftype.name} frame holds no valid JSON") from exc
    return cls.from_json(_Fields(value, ftype.name))


@dataclass(frozen=True)
class Offer(Message):
    """The source's chain, root first: each timeline the child of the one before it."""

    TYPE: ClassVar[FrameType] = FrameType.OFFER
    chain: tuple[TimelineInfo, ...]
    compression: tuple[str, ...] = ("zstd",)
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "chain": [_timeline_json(t) for t in self.chain],
                "compression": list(self.compression)}

    @classmethod
    def from_json(cls, f: _Fields) -> Offer:
        version = f.integer("version")
        if version != PROTOCOL_VERSION:
            raise TransferAborted(
                f"unsupported transfer protocol version {version} (this side speaks "
                f"{PROTOCOL_VERSION}); run the same zenith version on both pageservers"
            )
        items = f.items("chain", MAX_CHAIN)
        chain = tuple(_timeline(_Fields(item, f"OFFER.chain[{i}]"))
                      for i, item in enumerate(items))
        if not chain:
            raise TransferAborted("OFFER: the chain is empty")
        for i, tl in enumerate(chain):
            parent = chain[i - 1] if i else None
            # A chain starts at a root, or at a timeline the sender holds from an LSN on
            # (shallow: neither its ancestors nor its history before are there).
            if parent is not None and tl.ancestor_id is None:
                raise TransferAborted("OFFER: the chain is not a line of descent")
            if parent is not None:
                assert tl.ancestor_lsn is not None
                if tl.ancestor_id != parent.timeline_id or \
                        tl.ancestor_lsn > parent.last_record_lsn:
                    raise TransferAborted("OFFER: the chain is not a line of descent")
        ids = {t.timeline_id for t in chain}
        if len(ids) != len(chain):
            raise TransferAborted("OFFER: the chain repeats a timeline")
        if chain[0].ancestor_id in ids:  # a shallow root's ancestor is outside the chain
            raise TransferAborted("OFFER: the chain descends from itself")
        compression = tuple(str(c) for c in f.items("compression", 8) if isinstance(c, str))
        return cls(chain, compression, version)

    @property
    def source(self) -> TimelineInfo:
        return self.chain[-1]


@dataclass(frozen=True)
class Point:
    """A timeline at an LSN (where a history hash is asked for)."""

    timeline_id: TimelineId
    lsn: Lsn


@dataclass(frozen=True)
class Ask(Message):
    """The points to prove; ``since_time`` (seconds since the epoch): the receiver's
    history window, in time, for a new copy: which LSN of the source is that old?"""

    TYPE: ClassVar[FrameType] = FrameType.ASK
    points: tuple[Point, ...]
    since_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"points": [{"timeline_id": str(p.timeline_id), "lsn": str(p.lsn)}
                           for p in self.points], "since_time": self.since_time}

    @classmethod
    def from_json(cls, f: _Fields) -> Ask:
        since = None
        if f.optional("since_time"):
            since = f.value["since_time"]
            if isinstance(since, bool) or not isinstance(since, int | float) \
                    or not 0 <= since < 1e11:
                raise f._bad("since_time", "a time in seconds")
        return cls(tuple(
            Point(p.tid("timeline_id"), p.lsn("lsn"))
            for p in (_Fields(x, "ASK.points[]") for x in f.items("points", MAX_CHAIN))
        ), None if since is None else float(since))


@dataclass(frozen=True)
class Proof(Message):
    """The sender's history hash at each asked point, in the order asked; ``since``: the
    newest commit point of the source at or before the asked time (None: none that old)."""

    TYPE: ClassVar[FrameType] = FrameType.PROOF
    hashes: tuple[bytes, ...]
    since: Lsn | None = None

    def to_json(self) -> dict[str, Any]:
        return {"hashes": [h.hex() for h in self.hashes],
                "since": str(self.since) if self.since is not None else None}

    @classmethod
    def from_json(cls, f: _Fields) -> Proof:
        raw = f.items("hashes", MAX_CHAIN)
        return cls(tuple(_Fields({"h": h}, "PROOF.hashes[]").hex("h", HASH_SIZE) for h in raw),
                   f.lsn("since") if f.optional("since") else None)


@dataclass(frozen=True)
class RangeRequest:
    """Records of ``timeline_id`` with lsn in ``(after, upto]``, less the first
    ``resume.count`` of LSN ``resume.lsn`` (already durable on the receiver). ``create``:
    the receiver lacks the timeline and creates it from the offer. ``base``: instead of
    records, the timeline's state at ``after`` (= ``upto``) as images, the start of a
    shallow copy; the receiver creates the timeline held from there on."""

    timeline_id: TimelineId
    after: Lsn
    upto: Lsn
    create: bool
    resume: Cursor | None = None
    base: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"timeline_id": str(self.timeline_id), "after": str(self.after),
                "upto": str(self.upto), "create": self.create,
                "resume": _cursor_json(self.resume), "base": self.base}

    @classmethod
    def from_json(cls, f: _Fields) -> RangeRequest:
        r = cls(f.tid("timeline_id"), f.lsn("after"), f.lsn("upto"), f.boolean("create"),
                _cursor(f, "resume"), f.boolean("base") if f.optional("base") else False)
        if r.after > r.upto or (r.resume is not None and not r.after < r.resume.lsn <= r.upto):
            raise TransferAborted(f"{f.what}: range ({r.after}, {r.upto}] is malformed")
        if r.base and (r.after != r.upto or not r.create or r.resume is not None):
            raise TransferAborted(f"{f.what}: a base is the state at one LSN of a new timeline")
        return r


@dataclass(frozen=True)
class PlanMsg(Message):
    TYPE: ClassVar[FrameType] = FrameType.PLAN
    status: Status
    message: str
    dry_run: bool
    old: TimelineInfo | None
    ranges: tuple[RangeRequest, ...] = ()
    compression: str | None = None

    def result(self, source: TimelineInfo, records: int, nbytes: int,
               seconds: float) -> TransferResult:
        """What the transfer of ``source`` under this plan did (either end's view)."""
        old = self.old
        return TransferResult(self.status, self.message, source.timeline_id,
                              old.timeline_id if old else None,
                              old.last_record_lsn if old else None, source.last_record_lsn,
                              records, nbytes, seconds, self.dry_run)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "message": self.message, "dry_run": self.dry_run,
                "old": _timeline_json(self.old) if self.old else None,
                "ranges": [r.to_json() for r in self.ranges], "compression": self.compression}

    @classmethod
    def from_json(cls, f: _Fields) -> PlanMsg:
        try:
            status = Status(f.text("status", 32))
        except ValueError:
            raise f._bad("status", "a known status") from None
        compression = f.text("compression", 16) if f.optional("compression") else None
        if compression not in (None, "zstd"):
            raise f._bad("compression", "zstd or null")
        ranges = tuple(RangeRequest.from_json(_Fields(r, "PLAN.ranges[]"))
                       for r in f.items("ranges", MAX_CHAIN))
        return cls(status, f.text("message"), f.boolean("dry_run"),
                   _timeline(f.sub("old")) if f.optional("old") else None, ranges, compression)


@dataclass(frozen=True)
class Range(Message):
    """Announces the DATA frames of one planned range (it must equal the request)."""

    TYPE: ClassVar[FrameType] = FrameType.RANGE
    request: RangeRequest
    total_records: int = 0  # of the whole transfer, for progress
    total_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request.to_json(), "total_records": self.total_records,
                "total_bytes": self.total_bytes}

    @classmethod
    def from_json(cls, f: _Fields) -> Range:
        return cls(RangeRequest.from_json(f.sub("request")), f.integer("total_records"),
                   f.integer("total_bytes"))


@dataclass(frozen=True)
class RangeEnd(Message):
    """What the range held, and the sender's history hash at ``upto``."""

    TYPE: ClassVar[FrameType] = FrameType.RANGE_END
    timeline_id: TimelineId
    upto: Lsn
    records: int
    nbytes: int
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        return {"timeline_id": str(self.timeline_id), "upto": str(self.upto),
                "records": self.records, "bytes": self.nbytes, "hash": self.hash.hex()}

    @classmethod
    def from_json(cls, f: _Fields) -> RangeEnd:
        return cls(f.tid("timeline_id"), f.lsn("upto"), f.integer("records"), f.integer("bytes"),
                   f.hex("hash", HASH_SIZE))


@dataclass(frozen=True)
class Ack(Message):
    """Everything of the timeline up to ``lsn`` is durable, and so are the ``pending``
    records of the next LSN."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    timeline_id: TimelineId
    lsn: Lsn
    pending: Cursor | None = None

    def to_json(self) -> dict[str, Any]:
        return {"timeline_id": str(self.timeline_id), "lsn": str(self.lsn),
                "pending": _cursor_json(self.pending)}

    @classmethod
    def from_json(cls, f: _Fields) -> Ack:
        return cls(f.tid("timeline_id"), f.lsn("lsn"), _cursor(f, "pending"))


@dataclass(frozen=True)
class Summary(Message):
    TYPE: ClassVar[FrameType] = FrameType.SUMMARY
    records: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "bytes": self.bytes}

    @classmethod
    def from_json(cls, f: _Fields) -> Summary:
        return cls(f.integer("records"), f.integer("bytes"))


# -- results, progress and the commands' arguments (shared with the CLI) -----------------


@dataclass(frozen=True)
class TransferResult:
    """What a push or pull did: the receiver's DONE message, the pageserver's result row,
    and what the CLI renders."""

    status: Status
    message: str
    timeline_id: TimelineId
    old_timeline_id: TimelineId | None
    old_lsn: Lsn | None
    new_lsn: Lsn
    records: int
    bytes: int
    seconds: float
    dry_run: bool

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "status", "message", "timeline_id", "old_timeline_id", "old_lsn", "new_lsn",
        "records", "bytes", "seconds", "dry_run",
    )

    def to_row(self) -> dict[str, str | None]:
        return {
            "status": self.status.value,
            "message": self.message,
            "timeline_id": str(self.timeline_id),
            "old_timeline_id": str(self.old_timeline_id) if self.old_timeline_id else None,
            "old_lsn": str(self.old_lsn) if self.old_lsn is not None else None,
            "new_lsn": str(self.new_lsn),
            "records": str(self.records),
            "bytes": str(self.bytes),
            "seconds": f"{self.seconds:.3f}",
            "dry_run": "true" if self.dry_run else "false",
        }

    @classmethod
    def from_row(cls, row: dict[str, str | None]) -> TransferResult:
        """Parse a result row (from the local pageserver, or a DONE message)."""
        try:
            return cls(
                status=Status(str(row["status"])),
                message=str(row["message"] or "")[:MAX_TEXT],
                timeline_id=TimelineId.parse(str(row["timeline_id"])),
                old_timeline_id=(TimelineId.parse(str(row["old_timeline_id"]))
                                 if row.get("old_timeline_id") else None),
                old_lsn=Lsn.parse(str(row["old_lsn"])) if row.get("old_lsn") else None,
                new_lsn=Lsn.parse(str(row["new_lsn"])),
                records=int(str(row["records"])),
                bytes=int(str(row["bytes"])),
                seconds=float(str(row["seconds"])),
                dry_run=row["dry_run"] == "true",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferAborted(f"malformed transfer result: {exc}") from exc


@dataclass(frozen=True)
class Done(Message):
    TYPE: ClassVar[FrameType] = FrameType.DONE
    result: TransferResult

    def to_json(self) -> dict[str, Any]:
        return dict(self.result.to_row())

    @classmethod
    def from_json(cls, f: _Fields) -> Done:
        row = {k: (v if v is None else str(v)) for k, v in f.value.items()
               if k in TransferResult.COLUMNS}
        return cls(TransferResult.from_row(row))


@dataclass
class Progress:
    """A transfer's progress, as the sender or receiver counts it."""

    bytes_done: int = 0
    bytes_total: int = 0
    records_done: int = 0
    records_total: int = 0
    acked_lsn: Lsn = field(default_factory=lambda: Lsn(0))

    _NOTICE: ClassVar[re.Pattern[str]] = re.compile(
        r"progress bytes=(\d+)/(\d+) records=(\d+)/(\d+) lsn=([0-9A-F]{1,8}/[0-9A-F]{1,8})"
    )

    def to_notice(self) -> str:
        """The NOTICE the pageserver sends its CLI while a transfer runs."""
        return (f"progress bytes={self.bytes_done}/{self.bytes_total} "
                f"records={self.records_done}/{self.records_total} lsn={self.acked_lsn}")

    @classmethod
    def from_notice(cls, text: str) -> Progress | None:
        """The progress a NOTICE carries, or None for any other notice."""
        m = cls._NOTICE.fullmatch(text)
        if m is None:
            return None
        done, total, rec, rec_total = (int(m.group(i)) for i in range(1, 5))
        return cls(done, total, rec, rec_total, Lsn.parse(m.group(5)))


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class TransferArgs:
    """The arguments of ``perform_push``/``perform_pull`` (CLI to its pageserver) and of
    ``branch_push`` (pageserver to pageserver): one definition for both ends."""

    FLAGS: ClassVar[tuple[str, ...]] = ("force", "dry_run")
    PERFORM_USAGE: ClassVar[str] = \
        "<branch> <uri> <remote_branch> [force] [dry_run] [since=LSN|WINDOW|all]"

    branch: str
    uri: str
    remote_branch: str
    force: bool = False
    dry_run: bool = False
    #: How much history a new copy gets (``--since``): an LSN, a window ("2h",
    #: "1GiB") or "all"; None: the destination's history window.
    since: str | None = None

    def flag_words(self) -> list[str]:
        """``[force] [dry_run] [since=...]``, as :func:`parse_flags` reads them."""
        return (["force"] if self.force else []) + (["dry_run"] if self.dry_run else []) \
            + ([f"since={self.since}"] if self.since is not None else [])

    def perform_words(self, verb: str) -> list[str]:
        return [f"perform_{verb}", self.branch, self.uri, self.remote_branch,
                *self.flag_words()]

    @classmethod
    def parse_perform(cls, args: list[str]) -> TransferArgs:
        if not 3 <= len(args) <= 6:
            raise InvalidArgument(f"expected {cls.PERFORM_USAGE}")
        force, dry_run, since = parse_flags(args[3:])
        return cls(args[0], args[1], args[2], force, dry_run, since)


def parse_flags(words: list[str]) -> tuple[bool, bool, str | None]:
    """``[force] [dry_run] [since=...]`` words to ``(force, dry_run, since)``."""
    since = None
    flags = set()
    for w in words:
        if w.lower().startswith("since="):
            since = w[len("since="):]
            if not since or len(since) > 64:
                raise InvalidArgument("since= takes an LSN, a window or all")
        elif w.lower() in TransferArgs.FLAGS:
            flags.add(w.lower())
        else:
            raise InvalidArgument(
                f"unknown option {w!r:.60}: expected force, dry_run or since=...")
    return "force" in flags, "dry_run" in flags, since
