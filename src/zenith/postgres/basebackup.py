"""Reading a PostgreSQL base backup: its tar archives, and what each file in them is.

BASE_BACKUP (see :mod:`zenith.postgres.replication`) delivers a data directory as tar
archives, one for the main directory and one per tablespace, in chunks of about 32 KiB.
The import must never hold a whole archive, nor a whole 1 GiB relation segment, in memory,
so :class:`TarReader` is a sans-I/O parser: it is fed chunks as they arrive and returns
pieces of file contents as slices of those chunks. It reads what PostgreSQL's tar writer
(``src/port/tar.c``) produces -- ustar headers, directory and symlink names with a trailing
slash, base-256 sizes for files over 8 GiB -- and, so that archives made by other tools
(``tar``, Python's ``tarfile``) work as well, pax extended headers and GNU long names.

:func:`classify_path` then says what a data-directory path holds, so the importer can store
relation segments block by block, SLRU segments and relation maps under their own keys,
and leave out what PostgreSQL itself leaves out of a backup or rewrites on recovery (the
lists follow ``basebackup.c``'s ``excludeDirContents``/``excludeFiles`` and pg_rewind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final

from zenith.errors import InvalidArgument, ProtocolViolation
from zenith.postgres.keys import DEFAULTTABLESPACE_OID, ForkNumber, RelTag

__all__ = [
    "BLOCK_SIZE",
    "GLOBALTABLESPACE_OID",
    "EntryType",
    "FileKind",
    "InvalidTar",
    "RelMapFile",
    "RelationSegment",
    "Skipped",
    "SlruKind",
    "SlruSegment",
    "SpecialFile",
    "SpecialKind",
    "TarPiece",
    "TarReader",
    "VersionFile",
    "classify_path",
    "data_dir_path",
]

BLOCK_SIZE: Final = 512
GLOBALTABLESPACE_OID: Final = 1664
#: Longest pax or GNU long-name record accepted: names, not data, so small.
MAX_META_SIZE: Final = 1 << 20


class InvalidTar(ProtocolViolation):
    """The archive is not a tar stream this reader understands, or is cut short."""


class EntryType(Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    OTHER = "other"  # devices and fifos: a data directory has none


@dataclass(frozen=True, slots=True)
class TarPiece:
    """A piece of one archive member: ``chunk`` holds bytes ``offset .. offset+len(chunk)``
    of the ``size`` bytes of ``path``. A member yields one piece at least (an empty file,
    a directory or a link yields exactly one, with an empty chunk); ``last`` marks its
    final piece. ``path`` is relative, without ``./`` or a trailing slash."""

    path: str
    size: int
    mode: int
    chunk: bytes
    type: EntryType = EntryType.FILE
    offset: int = 0
    last: bool = True
    linkname: str | None = None


_TYPES: Final = {
    b"0": EntryType.FILE, b"\0": EntryType.FILE, b"7": EntryType.FILE,
    b"5": EntryType.DIRECTORY, b"2": EntryType.SYMLINK, b"1": EntryType.HARDLINK,
    b"3": EntryType.OTHER, b"4": EntryType.OTHER, b"6": EntryType.OTHER,
}


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or base-256 when the top bit is set (GNU and
    PostgreSQL's ``print_tar_number`` for values that do not fit the octal digits)."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise InvalidTar(f"negative {what} in tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidTar(f"invalid {what} {field!r} in tar header") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _normalise(name: str) -> str | None:
    """``name`` as a relative ``/``-separated path ("" for the top directory itself), or
    None if it could escape the directory it is relative to: archives come from another
    machine, and the importer must not be steered outside its target."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise InvalidTar("malformed pax extended header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidTar("malformed pax record length") from None
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise InvalidTar("malformed pax record")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise InvalidTar("pax record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape")
        pos += length
    return records


class _State(Enum):
    HEADER = 1
    DATA = 2  # a member's contents, handed out as pieces
    META = 3  # a pax or GNU long-name record, collected
    SKIP = 4  # contents nobody needs (devices), or padding
    END = 5  # after the two zero blocks


class TarReader:
    """Feed it a tar stream in pieces of any size; it returns :class:`TarPiece` objects.

    Memory use is one 512-byte header plus any pax/GNU name record (at most
    :data:`MAX_META_SIZE`): contents are returned as slices of the data fed in. Call
    :meth:`close` at the end of the stream: it raises :class:`InvalidTar` if a member was
    cut short. The end-of-archive marker (two zero blocks) is optional, as archives that
    PostgreSQL before 15 sent lacked it; anything but zeros after it is refused.
    """

    def __init__(self) -> None:
        self._state = _State.HEADER
        self._buf = bytearray()
        self._remaining = 0  # bytes left in the current member's contents or record
        self._padding = 0  # zero bytes after them, up to the block boundary
        self._zero_blocks = 0
        self._member: TarPiece | None = None  # header of the member being read
        self._offset = 0
        self._meta_kind = b""
        self._pax: dict[str, str] = {}  # for the next member
        self._pax_global: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None

    @property
    def at_end(self) -> bool:
        """True after the end-of-archive marker."""
        return self._state is _State.END

    def feed(self, data: bytes | bytearray | memoryview) -> list[TarPiece]:
        view = memoryview(data).cast("B")
        pieces: list[TarPiece] = []
        pos = 0
        while pos < len(view):
            if self._padding and self._remaining == 0:
                take = min(self._padding, len(view) - pos)
                self._padding -= take
                pos += take
                continue
            state = self._state
            if state is _State.HEADER:
                take = min(BLOCK_SIZE - len(self._buf), len(view) - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) == BLOCK_SIZE:
                    block = bytes(self._buf)
                    self._buf.clear()
                    piece = self._header(block)
                    if piece is not None:
                        pieces.append(piece)
            elif state is _State.DATA:
                assert self._member is not None
                take = min(self._remaining, len(view) - pos)
                self._remaining -= take
                chunk = bytes(view[pos:pos + take])
                pos += take
                last = self._remaining == 0
                pieces.append(TarPiece(self._member.path, self._member.size, self._member.mode,
                                       chunk, self._member.type, self._offset, last,
                                       self._member.linkname))
                self._offset += take
                if last:
                    self._state = _State.HEADER
            elif state is _State.META:
                take = min(self._remaining, len(view) - pos)
                self._buf += view[pos:pos + take]
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._end_meta()
            elif state is _State.SKIP:
                take = min(self._remaining, len(view) - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = _State.HEADER
            else:  # END: trailing zeros (tar pads archives to whole records) only
                if bytes(view[pos:]).strip(b"\0"):
                    raise InvalidTar("data after the end-of-archive marker")
                pos = len(view)
        return pieces

    def close(self) -> None:
        """Check that the stream ended between members."""
        if self._state in (_State.DATA, _State.META) or (
                self._state is _State.SKIP and self._remaining) or self._buf:
            what = self._member.path if self._member is not None else "a header"
            raise InvalidTar(f"tar archive truncated in {what!r}")
        if self._padding or self._long_name is not None or self._pax:
            raise InvalidTar("tar archive truncated after an extended header")

    # -- headers -------------------------------------------------------------------

    def _header(self, block: bytes) -> TarPiece | None:
        if block == bytes(BLOCK_SIZE):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._state = _State.END
            return None
        if self._zero_blocks:
            raise InvalidTar("a single zero block inside the tar archive")
        stored = _number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 128)
        if stored not in (unsigned, signed):
            raise InvalidTar("tar header checksum mismatch (not a tar stream, or corrupt)")
        magic = block[257:265]
        name = _text(block[0:100])
        if magic[:6] == b"ustar\0":  # POSIX: a prefix for names over 100 bytes
            prefix = _text(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        typeflag = block[156:157]
        size = _number(block[124:136], "size")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_META_SIZE:
                raise InvalidTar(f"extended tar header of {size} bytes is too large")
            self._meta_kind = typeflag
            self._start(size, _State.META)
            if size == 0:
                self._end_meta()
            return None
        entry_type = _TYPES.get(typeflag)
        if entry_type is None:
            raise InvalidTar(f"unsupported tar member type {typeflag!r} for {name!r}")
        if entry_type is EntryType.FILE and typeflag == b"\0" and name.endswith("/"):
            entry_type = EntryType.DIRECTORY  # pre-POSIX directories
        pax = {**self._pax_global, **self._pax}
        name = pax.get("path", self._long_name if self._long_name is not None else name)
        linkname = _text(block[157:257]) or None
        if self._long_link is not None:
            linkname = self._long_link
        linkname = pax.get("linkpath", linkname)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise InvalidTar(f"invalid pax size {pax['size']!r}") from None
        self._pax, self._long_name, self._long_link = {}, None, None
        size_on_tape = size
        if entry_type is not EntryType.FILE:
            size = 0  # links and directories have no contents; skip whatever is there
        path = _normalise(name)
        if path is None or (path == "" and entry_type is not EntryType.DIRECTORY):
            raise InvalidTar(f"unsafe or empty member name {name!r} in tar archive")
        member = TarPiece(path, size, _number(block[100:108], "mode") & 0o7777,
                          b"", entry_type, 0, size == 0,
                          linkname if entry_type in (EntryType.SYMLINK, EntryType.HARDLINK)
                          else None)
        self._member, self._offset = member, 0
        if entry_type is EntryType.FILE and size:
            self._start(size, _State.DATA)
            return None
        self._start(size_on_tape, _State.SKIP)
        if size_on_tape == 0:
            self._state = _State.HEADER
        return member if path else None  # "./", the archive's own top directory

    def _start(self, size: int, state: _State) -> None:
        self._remaining = size
        self._padding = -size % BLOCK_SIZE
        self._state = state

    def _end_meta(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        self._state = _State.HEADER
        if self._meta_kind == b"x":
            self._pax.update(_pax_records(data))
        elif self._meta_kind == b"g":
            self._pax_global.update(_pax_records(data))
        else:
            text = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if self._meta_kind == b"L":
                self._long_name = text
            else:
                self._long_link = text


# ---------------------------------------------------------------------------------------
# What a data-directory path holds


@dataclass(frozen=True, slots=True)
class RelationSegment:
    """One segment file of a relation fork: ``<relnode>[_fsm|_vm|_init][.<segno>]``."""

    path: str
    spcnode: int
    dbnode: int
    relnode: int
    forknum: ForkNumber
    segno: int

    @property
    def rel(self) -> RelTag:
        return RelTag(self.spcnode, self.dbnode, self.relnode, self.forknum)


class SlruKind(Enum):
    """The SLRU directories whose pages the pageserver keeps (the value is the path)."""

    XACT = "pg_xact"
    MULTIXACT_OFFSETS = "pg_multixact/offsets"
    MULTIXACT_MEMBERS = "pg_multixact/members"
    COMMIT_TS = "pg_commit_ts"


@dataclass(frozen=True, slots=True)
class SlruSegment:
    path: str
    slru: SlruKind
    segno: int


@dataclass(frozen=True, slots=True)
class RelMapFile:
    """``pg_filenode.map``: the shared one (``global/``, dbnode 0) or a database's."""

    path: str
    spcnode: int
    dbnode: int


@dataclass(frozen=True, slots=True)
class VersionFile:
    """``PG_VERSION`` of the cluster (``dbnode`` None) or of a database directory."""

    path: str
    spcnode: int | None = None
    dbnode: int | None = None


class SpecialKind(Enum):
    CONTROL = "control"  # global/pg_control
    CONFIG = "config"  # postgresql.conf, postgresql.auto.conf, pg_hba.conf, pg_ident.conf
    BACKUP_LABEL = "backup_label"
    TABLESPACE_MAP = "tablespace_map"
    TABLESPACE_LINK = "tablespace_link"  # pg_tblspc/<oid> (when sent as a symlink)
    TWOPHASE = "twophase"  # pg_twophase/<xid>: state of a prepared transaction
    OTHER = "other"  # anything else PostgreSQL keeps (pg_logical/..., extension files)


@dataclass(frozen=True, slots=True)
class SpecialFile:
    path: str
    kind: SpecialKind


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path a copy of the cluster must not take (``reason`` says why)."""

    path: str
    reason: str


FileKind = RelationSegment | SlruSegment | RelMapFile | VersionFile | SpecialFile | Skipped

_REL_FILE: Final = re.compile(r"([1-9][0-9]{0,9})(?:_(fsm|vm|init))?(?:\.([1-9][0-9]{0,9}))?")
_FORKS: Final = {None: ForkNumber.MAIN, "fsm": ForkNumber.FSM,
                 "vm": ForkNumber.VISIBILITYMAP, "init": ForkNumber.INIT}
_TEMP_REL: Final = re.compile(r"t[0-9]+_[0-9]+(?:_(?:fsm|vm|init))?(?:\.[0-9]+)?")
_SLRU_SEGMENT: Final = re.compile(r"[0-9A-F]{4,15}")
_OID: Final = re.compile(r"[1-9][0-9]{0,9}")
_TBLSPC_VERSION: Final = re.compile(r"PG_[0-9]+_[0-9]+")
_TWOPHASE_FILE: Final = re.compile(r"[0-9A-F]{8,16}")
_CONFIG_FILES: Final = frozenset({"postgresql.conf", "postgresql.auto.conf", "pg_hba.conf",
                                  "pg_ident.conf"})
_UINT32_MAX: Final = 0xFFFFFFFF

# Directories whose contents PostgreSQL leaves out of a base backup (basebackup.c's
# excludeDirContents, plus pg_wal, which BASE_BACKUP sends only with WAL), and why.
_SKIPPED_DIRS: Final = {
    "pg_wal": "WAL is streamed, not copied",
    "pg_stat_tmp": "temporary statistics",
    "pg_replslot": "replication slots are not copied",
    "pg_dynshmem": "dynamic shared memory, rebuilt at startup",
    "pg_notify": "LISTEN/NOTIFY queue, reset at startup",
    "pg_serial": "serializable transaction state, reset at startup",
    "pg_snapshots": "exported snapshots, reset at startup",
    "pg_subtrans": "subtransaction parents, rebuilt at startup",
    "pg_stat": "statistics are reset by recovery from a backup",
}
# Files PostgreSQL leaves out (excludeFiles) or that must not travel with a copy.
_SKIPPED_FILES: Final = {
    "postmaster.pid": "belongs to the running server",
    "postmaster.opts": "belongs to the running server",
    "postgresql.auto.conf.tmp": "temporary file",
    "current_logfiles": "belongs to the running server's logging collector",
    "current_logfiles.tmp": "temporary file",
    "backup_manifest": "describes a backup, not the cluster",
    "backup_manifest.tmp": "temporary file",
    "standby.signal": "would make a copy start as a standby",
    "recovery.signal": "would make a copy start recovery",
}


def _rel(path: str, spcnode: int, dbnode: int, name: str) -> FileKind | None:
    match = _REL_FILE.fullmatch(name)
    if match is None:
        return None
    relnode, fork, segno = match.groups()
    if int(relnode) > _UINT32_MAX:
        return None
    return RelationSegment(path, spcnode, dbnode, int(relnode), _FORKS[fork],
                           int(segno) if segno else 0)


def _database_file(path: str, spcnode: int, dbnode: int, name: str) -> FileKind:
    """A file directly in a database directory (``base/<db>`` or a tablespace's)."""
    if name == "pg_filenode.map":
        return RelMapFile(path, spcnode, dbnode)
    if name == "PG_VERSION":
        return VersionFile(path, spcnode, dbnode)
    if name.startswith("pg_internal.init"):
        return Skipped(path, "relation cache file, rebuilt at startup")
    if _TEMP_REL.fullmatch(name):
        return Skipped(path, "temporary relation")
    rel = _rel(path, spcnode, dbnode, name)
    return rel if rel is not None else SpecialFile(path, SpecialKind.OTHER)


def classify_path(path: str) -> FileKind:
    """What the file at ``path`` (relative to the data directory, ``/``-separated, as
    :func:`data_dir_path` makes it) holds. Directories are not classified."""
    clean = _normalise(path)
    if not clean:
        raise InvalidArgument(f"not a path inside a data directory: {path!r}")
    parts = clean.split("/")
    path = clean
    name = parts[-1]
    if any(p.startswith("pgsql_tmp") for p in parts):
        return Skipped(path, "temporary file")
    if len(parts) == 1:
        if name == "PG_VERSION":
            return VersionFile(path)
        if name in _CONFIG_FILES:
            return SpecialFile(path, SpecialKind.CONFIG)
        if name == "backup_label":
            return SpecialFile(path, SpecialKind.BACKUP_LABEL)
        if name == "tablespace_map":
            return SpecialFile(path, SpecialKind.TABLESPACE_MAP)
        if name in _SKIPPED_FILES:
            return Skipped(path, _SKIPPED_FILES[name])
        return SpecialFile(path, SpecialKind.OTHER)
    top = parts[0]
    if top in _SKIPPED_DIRS:
        return Skipped(path, _SKIPPED_DIRS[top])
    if name.startswith("pg_internal.init"):
        return Skipped(path, "relation cache file, rebuilt at startup")
    if top == "global" and len(parts) == 2:
        if name == "pg_control":
            return SpecialFile(path, SpecialKind.CONTROL)
        if name == "pg_filenode.map":
            return RelMapFile(path, GLOBALTABLESPACE_OID, 0)
        rel = _rel(path, GLOBALTABLESPACE_OID, 0, name)
        return rel if rel is not None else SpecialFile(path, SpecialKind.OTHER)
    if top == "base" and len(parts) == 3 and _OID.fullmatch(parts[1]):
        return _database_file(path, DEFAULTTABLESPACE_OID, int(parts[1]), name)
    if top == "pg_tblspc" and _OID.fullmatch(parts[1]):
        if len(parts) == 2:
            return SpecialFile(path, SpecialKind.TABLESPACE_LINK)
        if (len(parts) == 5 and _TBLSPC_VERSION.fullmatch(parts[2])
                and _OID.fullmatch(parts[3])):
            return _database_file(path, int(parts[1]), int(parts[3]), name)
    slru = "/".join(parts[:-1])
    for kind in SlruKind:
        if slru == kind.value and _SLRU_SEGMENT.fullmatch(name):
            return SlruSegment(path, kind, int(name, 16))
    if top == "pg_twophase" and len(parts) == 2 and _TWOPHASE_FILE.fullmatch(name):
        return SpecialFile(path, SpecialKind.TWOPHASE)
    return SpecialFile(path, SpecialKind.OTHER)


def data_dir_path(spcoid: int | None, member: str) -> str:
    """The data-directory path of ``member`` of a backup archive: the main archive's
    members are already relative to the data directory, a tablespace archive's (``spcoid``)
    to the tablespace's directory, which the data directory reaches as ``pg_tblspc/<oid>``."""
    clean = _normalise(member)
    if not clean:
        raise InvalidArgument(f"not a path inside a backup archive: {member!r}")
    return clean if spcoid is None else f"pg_tblspc/{spcoid}/{member}"
