"""What an S3-compatible bucket origin holds, and where: a sans-I/O codec (docs/s3.md).

Under the origin's prefix::

    zenith-bucket.json                    format marker, written by the first push
    refs/<branch>                         {"timeline": ID, "lsn": LSN}   moved last
    timelines/<id>/index.json             the timeline and its segments, in LSN order
    timelines/<id>/segments/<after>-<upto>[-base].zseg
                                          immutable: transfer DATA frames, back to back

A *segment* holds every record of one timeline with an LSN in ``(after, upto]`` (cut only
between two LSNs), as the DATA frames a push sends (``transfer/frames.py``: each frame
CRC32C-checked, zstd when it pays). A *base* segment holds a shallow timeline's state at
``after`` (= ``upto``) as images, the way a shallow transfer sends it. Its index entry
carries the object's size and CRC32C, the number of records and payload bytes, and the
timeline's history hash at ``upto``: a pull checks all of them, and the receiver checks
the hash again as it applies.

A branch's head is its ref's LSN, not its timeline's end: the index is written before the
ref, so a push interrupted between the two leaves the old head (what the index holds
beyond it is unnamed history, as an interrupted transfer leaves on a pageserver).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Final

from zenith.errors import InvalidArgument, TransferAborted
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage.api import TimelineInfo
from zenith.transfer.messages import HASH_SIZE, Fields

FORMAT: Final = "zenith-bucket"
VERSION: Final = 1
MARKER: Final = "zenith-bucket.json"
#: Bound on one JSON object read from a bucket (an index of many segments fits easily).
MAX_JSON: Final = 16 << 20
MAX_SEGMENTS: Final = 100_000
#: Who sent a shallow base held in a bucket (plan.py's trust rule): the bucket itself.
PRINCIPAL: Final = "bucket"

_BUCKET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_PREFIX_PART: Final = re.compile(r"[A-Za-z0-9!_.*'()\-]+")
ADDRESSING: Final = ("auto", "path", "virtual")


@dataclass(frozen=True)
class S3Location:
    """An ``s3://BUCKET/PREFIX?endpoint=...&region=...&addressing=...&profile=...`` origin.
    Credentials are never part of it: they come from the AWS chain (environment, shared
    config and credentials files, ``profile``)."""

    bucket: str
    prefix: str  # "" or "a/b/" (with its trailing slash)
    endpoint: str | None = None
    region: str | None = None
    addressing: str = "auto"
    profile: str | None = None

    def key(self, name: str) -> str:
        return self.prefix + name

    def __str__(self) -> str:
        params = {k: v for k, v in (("endpoint", self.endpoint), ("region", self.region),
                                    ("profile", self.profile)) if v is not None}
        if self.addressing != "auto":
            params["addressing"] = self.addressing
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"s3://{self.bucket}/{self.prefix}{query}"


def is_s3_uri(uri: str) -> bool:
    return uri[:5].lower() == "s3://"


def parse_s3_uri(uri: str) -> S3Location:
    """Check and split an ``s3://`` origin URI; InvalidArgument names what is wrong."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "s3":
        raise InvalidArgument(f"not an s3:// URI: {uri!r:.80}")
    if "@" in parts.netloc or parts.password is not None:
        raise InvalidArgument(
            "an s3:// origin carries no credentials",
            hint="zenith takes them from the AWS chain: AWS_ACCESS_KEY_ID and "
                 "AWS_SECRET_ACCESS_KEY in the pageserver's environment, or its shared "
                 "credentials file (?profile=NAME picks a profile)")
    bucket = parts.netloc
    if _BUCKET_NAME.fullmatch(bucket) is None or ".." in bucket:
        raise InvalidArgument(f"invalid bucket name {bucket!r:.80}",
                              hint="3-63 lower-case letters, digits, '.' and '-'")
    path = parts.path.strip("/")
    if path and not all(_PREFIX_PART.fullmatch(p) for p in path.split("/")):
        raise InvalidArgument(f"invalid prefix {path!r:.80}",
                              hint="letters, digits and !_.*'()- between slashes")
    if parts.fragment:
        raise InvalidArgument("an s3:// origin takes no #fragment")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                      strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidArgument(f"invalid parameters in {uri!r:.80}") from None
    params: dict[str, str] = {}
    for name, values in query.items():
        if name not in ("endpoint", "region", "addressing", "profile"):
            raise InvalidArgument(
                f"unknown s3:// parameter {name!r:.40}",
                hint="endpoint, region, addressing (path, virtual or auto), profile")
        if len(values) != 1 or not values[0]:
            raise InvalidArgument(f"s3:// parameter {name} takes one value")
        params[name] = values[0]
    endpoint = params.get("endpoint")
    if endpoint is not None:
        e = urllib.parse.urlsplit(endpoint)
        if e.scheme not in ("http", "https") or not e.hostname or e.username or e.password:
            raise InvalidArgument(f"invalid endpoint {endpoint!r:.80}",
                                  hint="http://HOST:PORT or https://HOST[:PORT]")
    addressing = params.get("addressing", "auto")
    if addressing not in ADDRESSING:
        raise InvalidArgument(f"invalid addressing {addressing!r:.20}",
                              hint="path, virtual or auto")
    return S3Location(bucket, path + "/" if path else "", endpoint, params.get("region"),
                      addressing, params.get("profile"))


# -- keys -------------------------------------------------------------------------------------


def ref_key(branch: str) -> str:
    return f"refs/{branch}"


def index_key(tid: TimelineId) -> str:
    return f"timelines/{tid}/index.json"


def segment_key(tid: TimelineId, after: Lsn, upto: Lsn, *, base: bool = False) -> str:
    return (f"timelines/{tid}/segments/{int(after):016X}-{int(upto):016X}"
            f"{'-base' if base else ''}.zseg")


def segment_range(tid: TimelineId, key: str) -> tuple[Lsn, Lsn] | None:
    """``(after, upto)`` of a (non-base) segment key of ``tid`` as :func:`segment_key`
    writes it; None for any other key."""
    name = key.removeprefix(segments_prefix(tid)).removesuffix(".zseg")
    after, _, upto = name.partition("-")
    try:
        found = Lsn(int(after, 16)), Lsn(int(upto, 16))
    except ValueError:
        return None
    return found if segment_key(tid, *found) == key else None


def segments_prefix(tid: TimelineId) -> str:
    return f"timelines/{tid}/segments/"


# -- objects ----------------------------------------------------------------------------------


def _load(data: bytes, what: str) -> Fields:
    if len(data) > MAX_JSON:
        raise TransferAborted(f"{what} in the bucket is {len(data)} bytes (at most {MAX_JSON})")
    try:
        return Fields(json.loads(data), what)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TransferAborted(f"{what} in the bucket is not valid JSON") from exc


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=1).encode() + b"\n"


def encode_marker() -> bytes:
    return _dump({"format": FORMAT, "version": VERSION})


def check_marker(data: bytes) -> None:
    f = _load(data, MARKER)
    if f.text("format", 64) != FORMAT or f.integer("version") != VERSION:
        raise TransferAborted(
            f"the bucket holds format {f.value.get('format')!r:.40} version "
            f"{f.value.get('version')!r:.10}; this zenith reads {FORMAT} {VERSION}")


@dataclass(frozen=True)
class Ref:
    timeline_id: TimelineId
    lsn: Lsn

    def encode(self) -> bytes:
        return _dump({"timeline": str(self.timeline_id), "lsn": str(self.lsn)})

    @classmethod
    def decode(cls, data: bytes, what: str) -> Ref:
        f = _load(data, what)
        return cls(f.tid("timeline"), f.lsn("lsn"))


@dataclass(frozen=True)
class Segment:
    """One segment object of a timeline: records in ``(after, upto]`` (a base: the state
    at ``after`` == ``upto``)."""

    key: str
    after: Lsn
    upto: Lsn
    records: int
    nbytes: int  # payload bytes of its records
    size: int  # the object's size
    crc32c: int  # of the whole object
    hash: bytes  # the timeline's history hash at ``upto``
    base: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "after": str(self.after), "upto": str(self.upto),
                "records": self.records, "bytes": self.nbytes, "size": self.size,
                "crc32c": self.crc32c, "hash": self.hash.hex(), "base": self.base}

    @classmethod
    def from_json(cls, f: Fields) -> Segment:
        return cls(f.text("key", 1024), f.lsn("after"), f.lsn("upto"), f.integer("records"),
                   f.integer("bytes"), f.integer("size"), f.integer("crc32c", 0, 2**32 - 1),
                   f.hex("hash", HASH_SIZE), f.boolean("base"))


@dataclass(frozen=True)
class TimelineIndex:
    """A timeline as the bucket holds it: its place in the ancestry, where its whole
    history starts (``history_from``: a shallow timeline's base LSN), and its segments in
    LSN order, contiguous from ``history_from`` (a base segment first if shallow)."""

    timeline_id: TimelineId
    ancestor_id: TimelineId | None
    ancestor_lsn: Lsn | None
    min_readable_lsn: Lsn
    segments: tuple[Segment, ...] = field(default=())
    base_lsn: Lsn | None = None

    @property
    def start_lsn(self) -> Lsn:
        return self.ancestor_lsn if self.ancestor_lsn is not None else Lsn(0)

    @property
    def history_from(self) -> Lsn:
        return self.base_lsn if self.base_lsn is not None else self.start_lsn

    @property
    def last_lsn(self) -> Lsn:
        """The end of its history held in the bucket."""
        return self.segments[-1].upto if self.segments else self.history_from

    def hash_at_start(self) -> bytes | None:
        """The history hash at ``history_from`` (zeros for a whole timeline, the base's
        hash for a shallow one; None while a shallow one has no base yet)."""
        if self.base_lsn is None:
            return bytes(HASH_SIZE)
        first = self.segments[0] if self.segments else None
        return first.hash if first is not None and first.base else None

    def info(self, last: Lsn | None = None) -> TimelineInfo:
        """As a repository would describe it (``last``: where a ref puts its head)."""
        return TimelineInfo(
            self.timeline_id, self.ancestor_id, self.ancestor_lsn,
            self.last_lsn if last is None else last, self.min_readable_lsn,
            received=True, base_lsn=self.base_lsn,
            base_complete=self.hash_at_start() is not None,
            base_from=PRINCIPAL if self.base_lsn is not None else None)

    def encode(self) -> bytes:
        return _dump({
            "timeline": str(self.timeline_id),
            "ancestor": str(self.ancestor_id) if self.ancestor_id else None,
            "ancestor_lsn": str(self.ancestor_lsn) if self.ancestor_lsn is not None else None,
            "min_readable_lsn": str(self.min_readable_lsn),
            "base_lsn": str(self.base_lsn) if self.base_lsn is not None else None,
            "segments": [s.to_json() for s in self.segments],
        })

    @classmethod
    def decode(cls, data: bytes, what: str) -> TimelineIndex:
        f = _load(data, what)
        ancestor = f.tid("ancestor") if f.optional("ancestor") else None
        index = cls(
            f.tid("timeline"), ancestor,
            f.lsn("ancestor_lsn") if ancestor is not None else None,
            f.lsn("min_readable_lsn"),
            tuple(Segment.from_json(Fields(s, f"{what}.segments[{i}]"))
                  for i, s in enumerate(f.items("segments", MAX_SEGMENTS))),
            f.lsn("base_lsn") if f.optional("base_lsn") else None)
        index.check(what)
        return index

    def check(self, what: str) -> None:
        """Segments contiguous from ``history_from``, a base only first and only on a
        shallow timeline, each key where its range says."""
        at = self.history_from
        if self.base_lsn is not None and self.base_lsn < self.start_lsn:
            raise TransferAborted(f"{what}: base below the timeline's start")
        for i, s in enumerate(self.segments):
            base = self.base_lsn is not None and i == 0
            if s.base != base or s.after != at or (s.upto != at if base else s.upto <= at) \
                    or s.key != segment_key(self.timeline_id, s.after, s.upto, base=s.base):
                raise TransferAborted(f"{what}: segment {i} ({s.key:.200}) is out of place")
            at = s.upto

    def extended(self, segments: list[Segment]) -> TimelineIndex:
        return TimelineIndex(self.timeline_id, self.ancestor_id, self.ancestor_lsn,
                             self.min_readable_lsn, (*self.segments, *segments), self.base_lsn)

    def hash_at(self, lsn: Lsn) -> bytes | None:
        """The history hash at ``lsn`` if a segment ends there (or the history starts
        there), else None (fold the segment's records to find it)."""
        if lsn == self.history_from:
            return self.hash_at_start()
        for s in self.segments:
            if s.upto == lsn and not s.base:
                return s.hash
        return None

    def covering(self, after: Lsn, upto: Lsn) -> list[Segment]:
        """The (non-base) segments holding records in ``(after, upto]``."""
        return [s for s in self.segments if not s.base and s.upto > after and s.after < upto]
