"""Export: a PostgreSQL 15 data directory as of any readable LSN of a branch (DESIGN §7).

:func:`export_entries` streams the directory as :class:`ExportEntry` items (directories
first, then files with their exact size and their contents in chunks of at most 1 MiB), so
a caller can write it to disk (:func:`write_directory`) or into a tar stream
(:func:`tar_chunks`) without ever holding a relation segment in memory. It reads the
branch once, in key order (:mod:`zenith.postgres.keys`): each database directory's relmap,
PG_VERSION and relation forks, then the SLRU pages, the other stored files, and finally
writes what a copy taken at an arbitrary LSN needs to start cleanly:

* relation forks split at 1 GiB segments (131072 blocks); blocks never written inside the
  fork's size are zero pages, which PostgreSQL accepts; stored blocks beyond the size
  (left by a truncation) are not written;
* an unlogged relation's main fork as a copy of its init fork: that is what crash recovery
  would do, and a cleanly shut-down cluster skips that reset (the base backup leaves
  unlogged main forks out);
* data checksums recomputed when the source has them on: ingest rewrites pd_lsn;
* a control file and WAL start (:mod:`zenith.postgres.pgcontrol`): a shutdown checkpoint in
  a fresh segment past the export LSN and past every page's pd_lsn (otherwise PostgreSQL
  fails to flush those pages: "xlog flush request ... is not satisfied"). Its counters
  (next XID, OID, multixact and offset, the oldest XID and multixact, the commit-timestamp
  horizon) are redo's at the LSN exactly, as ingest stored them
  (:mod:`zenith.postgres.redostate`), so no ID in use is handed out again and none is
  skipped; transactions in progress at the LSN (neither committed nor aborted in pg_xact,
  below next XID, not running) read as aborted. A timeline ingested before the counters
  were kept gets the newest checkpoint's, moved to the end of the last SLRU page that
  exists (:func:`~zenith.postgres.redostate.rounded_counters`);
* ``pg_logical/replorigin_checkpoint`` from the replication origins' progress at the LSN;
* a timeline of its own: the checkpoint, the control file and the WAL segment's name are
  on the source's timeline + 1, with ``pg_wal/<TLI>.history`` saying it branched off the
  source's timeline at the export LSN (as a promoted standby's history says), so the copy's
  WAL never takes the name of a source segment in an archive both write to;
* configuration that would make a copy started next to the source act on the source's
  behalf (:data:`DISABLED_SETTINGS`: archiving into its archive, restoring or streaming
  from it, waiting for its synchronous standbys) turned off unless ``keep_config``:
  commented out in ``postgresql.conf`` (and other stored ``*.conf`` files) with a marker,
  dropped from ``postgresql.auto.conf``; :func:`disabled_settings` says which. Replication
  slots never travel: a base backup leaves ``pg_replslot`` out and so does the export.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from zenith.errors import InvalidArgument, InvalidState
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres import pgcontrol
from zenith.postgres.keys import (
    DEFAULTTABLESPACE_OID,
    GLOBALTABLESPACE_OID,
    SLRU_PAGES_PER_SEGMENT,
    ControlItem,
    ForkNumber,
    KeyKind,
    RelTag,
    SlruId,
    control_key,
    file_key,
    file_range,
    key_kind,
    parse_rel_key,
    parse_slru_key,
    rel_fork_range,
    rel_size_key,
    unpack_file_value,
)
from zenith.postgres.redostate import (
    REPLORIGIN_CHECKPOINT_PATH,
    Counters,
    Origins,
    rounded_counters,
)
from zenith.postgres.walrecord import CheckPoint, parse_checkpoint
from zenith.storage.api import Repository

__all__ = ["DISABLED_SETTINGS", "ExportEntry", "disabled_settings", "export_entries",
           "tar_chunks", "write_directory"]

BLCKSZ: Final = 8192
RELSEG_SIZE: Final = 131072  # blocks per 1 GiB segment file
CHUNK_BLOCKS: Final = 128  # 1 MiB of pages per chunk
_ZERO_CHUNK: Final = bytes(CHUNK_BLOCKS * BLCKSZ)
_FORK_SUFFIX: Final = {ForkNumber.MAIN: "", ForkNumber.FSM: "_fsm",
                       ForkNumber.VISIBILITYMAP: "_vm", ForkNumber.INIT: "_init"}
#: IDs per SLRU page: 4 xact statuses a byte; u32 offsets; 409 groups of 4 members.
#: Directories PostgreSQL expects to exist (initdb's ``subdirs``), parents first.
STANDARD_DIRS: Final = (
    "global", "pg_wal", "pg_wal/archive_status", "pg_commit_ts", "pg_dynshmem", "pg_notify",
    "pg_serial", "pg_snapshots", "pg_subtrans", "pg_twophase", "pg_multixact",
    "pg_multixact/members", "pg_multixact/offsets", "base", "pg_replslot", "pg_tblspc",
    "pg_stat", "pg_stat_tmp", "pg_xact", "pg_logical", "pg_logical/snapshots",
    "pg_logical/mappings",
)
#: Stored files an export must not contain: a backup label would make PostgreSQL recover
#: from a backup, the control file is written anew, the others belong to a running server.
_EXCLUDED_FILES: Final = frozenset({
    "backup_label", "backup_label.old", "tablespace_map", "tablespace_map.old",
    "global/pg_control", "postmaster.pid", "postmaster.opts", "standby.signal",
    "recovery.signal",
})
#: Directories whose stored contents an export leaves out: replication slots belong to
#: the source (a base backup never has them; older or foreign imports might).
_EXCLUDED_DIRS: Final = ("pg_replslot/", "pg_wal/")
#: Settings turned off in an export unless ``keep_config``: with them a copy started next
#: to the source would archive into the source's archive, restore or stream from it, or
#: make its commits wait for the source's synchronous standbys.
DISABLED_SETTINGS: Final = (
    "archive_mode", "archive_command", "archive_library", "primary_conninfo",
    "primary_slot_name", "restore_command", "synchronous_standby_names",
)
#: The comment written above each setting an export comments out.
DISABLED_MARKER: Final = ("# zenith export disabled the next setting (the copy must not act "
                          "for its source; zenith export --keep-config keeps it):")
_AUTO_CONF: Final = "postgresql.auto.conf"
_NOT_SETTINGS: Final = frozenset({"pg_hba.conf", "pg_ident.conf"})
_SETTING_LINE: Final = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_$.]*)\s*(?:=|\s|$)")


@dataclass(slots=True)
class ExportEntry:
    """One directory (``chunks`` is None) or file of the export: ``path`` relative to the
    data directory with ``/`` separators, ``size`` the file's exact length. A file's chunks
    must be read before the next entry is asked for (as with :func:`itertools.groupby`);
    the generator skips whatever was left unread."""

    path: str
    size: int = 0
    chunks: Iterator[bytes] | None = None


@dataclass(slots=True)
class _State:
    checksums: bool
    catalog_version: int
    max_page_lsn: int = 0
    last_main: RelTag | None = None
    max_relnode: int = 0
    slru_pages: dict[SlruId, set[int]] = field(default_factory=dict)
    made_dirs: set[str] = field(default_factory=lambda: set(STANDARD_DIRS))
    #: Redo's counters and origin progress at the LSN (None: ingested before zenith kept
    #: them; then the checkpoint's counters are rounded up: ``rounded_counters``).
    counters: Counters | None = None
    origins: Origins | None = None
    slru_files: set[str] = field(default_factory=set)


class _Source:
    """The branch's (key, value) stream with one item of look-ahead."""

    def __init__(self, it: Iterator[tuple[bytes, bytes]]) -> None:
        self._it = it
        self.head: tuple[bytes, bytes] | None = next(it, None)

    def advance(self) -> tuple[bytes, bytes]:
        assert self.head is not None
        item, self.head = self.head, next(self._it, None)
        return item


def export_entries(repo: Repository, timeline_id: TimelineId, lsn: Lsn, *,
                   keep_config: bool = False) -> Iterator[ExportEntry]:
    """The data directory of ``timeline_id`` at ``lsn`` (see the module docstring), with
    :data:`DISABLED_SETTINGS` turned off in its configuration unless ``keep_config``.
    Raises :class:`InvalidArgument` for an LSN outside ``[min_readable_lsn,
    last_record_lsn]`` and :class:`InvalidState` for a timeline holding no imported
    PostgreSQL cluster."""
    info = repo.get_timeline(timeline_id)
    if lsn > info.last_record_lsn:
        raise InvalidArgument(f"LSN {lsn} is beyond the branch's last record LSN "
                              f"{info.last_record_lsn}")
    if lsn < info.min_readable_lsn:
        raise InvalidArgument(f"LSN {lsn} is before the branch's first readable LSN "
                              f"{info.min_readable_lsn}")
    control = repo.get_value(timeline_id, control_key(ControlItem.PG_CONTROL), lsn)
    if control is None:
        raise InvalidState("the branch holds no PostgreSQL cluster (no pg_control) at "
                           f"LSN {lsn}")
    ctl = pgcontrol.parse_control(control)
    raw_cp = repo.get_value(timeline_id, control_key(ControlItem.CHECKPOINT), lsn)
    cp = parse_checkpoint(raw_cp if raw_cp is not None else control[40:128])
    st = _State(checksums=ctl.data_checksum_version != 0,
                catalog_version=ctl.catalog_version_no)
    raw = repo.get_value(timeline_id, control_key(ControlItem.COUNTERS), lsn)
    st.counters = Counters.unpack(raw) if raw is not None else None
    raw = repo.get_value(timeline_id, control_key(ControlItem.ORIGINS), lsn)
    st.origins = Origins.unpack(raw) if raw is not None else None
    return _generate(repo, timeline_id, lsn, control, ctl, cp, st, keep_config)


def _generate(repo: Repository, tid: TimelineId, lsn: Lsn, control: bytes,
              ctl: pgcontrol.ControlInfo, cp: CheckPoint, st: _State,
              keep_config: bool) -> Iterator[ExportEntry]:
    for d in STANDARD_DIRS:
        yield ExportEntry(d)
    src = _Source(repo.materialize(tid, lsn))
    has_version = False
    while src.head is not None:
        key, value = src.head
        kind = key_kind(key)
        entries: Iterator[ExportEntry]
        if kind in (KeyKind.REL_BLOCK, KeyKind.REL_SIZE):
            entries = _fork(repo, tid, lsn, src, st)
        elif kind is KeyKind.SLRU_PAGE:
            entries = _slru_segment(repo, tid, lsn, src, st)
        else:
            src.advance()
            entries = iter(())
            if kind in (KeyKind.RELMAP, KeyKind.DB_VERSION):
                spc, db = int.from_bytes(key[1:5], "big"), int.from_bytes(key[5:9], "big")
                name = "pg_filenode.map" if kind is KeyKind.RELMAP else "PG_VERSION"
                entries = _file(f"{_db_dir(spc, db, st)}/{name}", value, st)
            elif kind is KeyKind.FILE:
                path, content = unpack_file_value(value)
                has_version |= path == "PG_VERSION"
                # A tablespace's symlink: its database directories are written in place.
                # pg_commit_ts segments stored whole by an older import are superseded by
                # pages; the origins' checkpoint file is written from the WAL's progress.
                superseded = path in st.slru_files or (
                    path == REPLORIGIN_CHECKPOINT_PATH and st.origins is not None)
                if path not in _EXCLUDED_FILES and path not in st.made_dirs and \
                        not path.startswith(_EXCLUDED_DIRS) and not superseded:
                    if not keep_config:
                        content = _disable_settings(path, content)[0]
                    entries = _file(path, content, st)
        for entry in entries:
            yield entry
            if entry.chunks is not None:
                for _ in entry.chunks:  # whatever the caller left unread
                    pass
    if not has_version:
        yield from _file("PG_VERSION", b"15\n", st)
    if st.origins is not None:
        yield from _file(REPLORIGIN_CHECKPOINT_PATH, st.origins.checkpoint_file(), st)
    yield from _control_and_wal(lsn, control, ctl, cp, st, keep_config)


def _db_dir(spc: int, db: int, st: _State) -> str:
    if spc == GLOBALTABLESPACE_OID:
        return "global"
    if spc == DEFAULTTABLESPACE_OID:
        return f"base/{db}"
    return f"pg_tblspc/{spc}/PG_15_{st.catalog_version}/{db}"


def _parents(path: str, st: _State) -> Iterator[ExportEntry]:
    """Directory entries for the parents of ``path`` not yet produced, outermost first."""
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in st.made_dirs:
            st.made_dirs.add(d)
            yield ExportEntry(d)


def _file(path: str, content: bytes, st: _State) -> Iterator[ExportEntry]:
    yield from _parents(path, st)
    yield ExportEntry(path, len(content), iter((content,)))


def _fork(repo: Repository, tid: TimelineId, lsn: Lsn, src: _Source,
          st: _State) -> Iterator[ExportEntry]:
    """Every segment file of the fork at the head of ``src``; consumes the fork's keys."""
    assert src.head is not None
    kind, rel, _ = parse_rel_key(src.head[0])
    if kind is KeyKind.REL_SIZE:
        size_value: bytes | None = src.head[1]
    else:
        size_value = repo.get_value(tid, rel_size_key(rel), lsn)
    if size_value is not None:
        nblocks = int.from_bytes(size_value[:4], "little")
    else:  # no size key: the highest block written decides
        lo, hi = rel_fork_range(rel)
        nblocks = 0
        for k, _v in repo.materialize(tid, lsn, lo=lo, hi=hi):
            k_kind, _, blk = parse_rel_key(k)
            if k_kind is KeyKind.REL_BLOCK:
                nblocks = blk + 1
    base = f"{_db_dir(rel.spcnode, rel.dbnode, st)}/{rel.relnode}"
    yield from _parents(base, st)
    st.max_relnode = max(st.max_relnode, rel.relnode)
    if rel.forknum == ForkNumber.MAIN:
        st.last_main = rel
    elif rel.forknum == ForkNumber.INIT:
        # Unlogged relation: the init fork is a few pages; its main fork is a copy of it.
        pages = [b"".join(_blocks(src, rel, 0, nblocks, st))]
        _skip_fork(src, rel)
        yield ExportEntry(f"{base}_init", len(pages[0]), iter(pages))
        if st.last_main != replace(rel, forknum=ForkNumber.MAIN):
            yield ExportEntry(base, len(pages[0]), iter(pages))
        return
    suffix = _FORK_SUFFIX[ForkNumber(rel.forknum)]
    nseg = max(1, (nblocks + RELSEG_SIZE - 1) // RELSEG_SIZE)
    for seg in range(nseg):
        first = seg * RELSEG_SIZE
        count = max(0, min(RELSEG_SIZE, nblocks - first))
        name = f"{base}{suffix}" + (f".{seg}" if seg else "")
        yield ExportEntry(name, count * BLCKSZ, _blocks(src, rel, first, first + count, st))
    _skip_fork(src, rel)


def _skip_fork(src: _Source, rel: RelTag) -> None:
    """Drop the fork's remaining keys: blocks beyond its size and the size key."""
    while src.head is not None:
        kind = key_kind(src.head[0])
        if kind not in (KeyKind.REL_BLOCK, KeyKind.REL_SIZE) or parse_rel_key(
            src.head[0]
        )[1] != rel:
            return
        src.advance()


def _blocks(src: _Source, rel: RelTag, start: int, end: int, st: _State) -> Iterator[bytes]:
    """Blocks ``[start, end)`` of ``rel`` in chunks of up to 1 MiB, zero pages where none
    is stored, checksums set when the cluster has them."""
    for first in range(start, end, CHUNK_BLOCKS):
        n = min(CHUNK_BLOCKS, end - first)
        buf = bytearray(_ZERO_CHUNK[: n * BLCKSZ])
        while src.head is not None and key_kind(src.head[0]) is KeyKind.REL_BLOCK:
            _, tag, blk = parse_rel_key(src.head[0])
            if tag != rel or blk >= first + n:
                break
            page = src.advance()[1]
            if len(page) != BLCKSZ:
                raise InvalidState(f"block {blk} of {tag} is {len(page)} bytes")
            off = (blk - first) * BLCKSZ
            buf[off : off + BLCKSZ] = page
            page_lsn = int.from_bytes(page[0:4], "little") << 32 | int.from_bytes(
                page[4:8], "little")
            st.max_page_lsn = max(st.max_page_lsn, page_lsn)
        if st.checksums:
            pgcontrol.set_checksums(buf, first)
        yield bytes(buf)


def _slru_segment(repo: Repository, tid: TimelineId, lsn: Lsn, src: _Source,
                  st: _State) -> Iterator[ExportEntry]:
    """One SLRU segment file (32 pages at most: held whole), holes as zero pages."""
    assert src.head is not None
    slru, pageno = parse_slru_key(src.head[0])
    segno = pageno // SLRU_PAGES_PER_SEGMENT
    pages: dict[int, bytes] = {}
    while src.head is not None and key_kind(src.head[0]) is KeyKind.SLRU_PAGE:
        s, p = parse_slru_key(src.head[0])
        if s != slru or p // SLRU_PAGES_PER_SEGMENT != segno:
            break
        pages[p % SLRU_PAGES_PER_SEGMENT] = src.advance()[1]
    st.slru_pages.setdefault(slru, set()).update(segno * SLRU_PAGES_PER_SEGMENT + i
                                                  for i in pages)
    path = f"{slru.directory}/{segno:04X}"
    data = b"".join(pages.get(i, bytes(BLCKSZ)).ljust(BLCKSZ, b"\0")
                    for i in range(max(pages) + 1))
    if slru is SlruId.COMMIT_TS and (whole := repo.get_value(tid, file_key(path), lsn)):
        data = _merge_commit_ts(unpack_file_value(whole)[1], data)
    st.slru_files.add(path)
    yield from _file(path, data, st)


def _merge_commit_ts(old: bytes, new: bytes) -> bytes:
    """An older import kept pg_commit_ts segments whole; ingest since patched pages of
    their own into zeros: each 10-byte entry ingest wrote wins, the rest is the file's."""
    out = bytearray(old.ljust(len(new), b"\0"))
    for page in range(0, len(new), BLCKSZ):
        for at in range(page, page + BLCKSZ - 9, 10):
            if any(new[at : at + 10]):
                out[at : at + 10] = new[at : at + 10]
    return bytes(out)


def _control_and_wal(lsn: Lsn, control: bytes, ctl: pgcontrol.ControlInfo, cp: CheckPoint,
                     st: _State, keep_config: bool) -> Iterator[ExportEntry]:
    """``global/pg_control`` and the WAL segment with its shutdown checkpoint, in the first
    segment after both the export LSN and the newest page LSN written. The counters are
    redo's at the LSN, exactly (:mod:`zenith.postgres.redostate`)."""
    if st.counters is not None:
        cp = st.counters.into_checkpoint(cp)
        cp = replace(cp, next_multi=cp.next_multi or 1)  # GetNewMultiXactId skips 0
    else:
        cp = rounded_counters(cp, st.slru_pages, st.max_relnode)
    segsize = ctl.wal_segment_size
    segno = max(int(lsn), st.max_page_lsn) // segsize + 1
    redo = segno * segsize + pgcontrol.LONG_PAGE_HEADER_SIZE
    new_cp = pgcontrol.shutdown_checkpoint(cp, redo)
    yield from _file("global/pg_control", pgcontrol.control_file(control, new_cp), st)
    head = pgcontrol.wal_segment_head(new_cp, ctl.system_identifier, segsize)

    def wal() -> Iterator[bytes]:
        yield head
        left = segsize - len(head)
        while left > 0:
            n = min(left, len(_ZERO_CHUNK))
            yield _ZERO_CHUNK[:n]
            left -= n

    name = pgcontrol.wal_file_name(new_cp.this_timeline_id, segno, segsize)
    yield ExportEntry(f"pg_wal/{name}", segsize, wal())
    # The new timeline's history: it branched off the source's at the export LSN, the end
    # of the source's WAL the data reflects (what a promoted standby writes: the end of the
    # last record it replayed). The source's own history files are not stored (a base
    # backup sends none), so a source past timeline 1 leaves only its last switch here.
    history = pgcontrol.timeline_history(new_cp.prev_timeline_id, int(lsn),
                                         f"zenith export at {lsn}")
    history_name = pgcontrol.history_file_name(new_cp.this_timeline_id)
    yield from _file(f"pg_wal/{history_name}", history, st)
    if keep_config:  # archiving may be on: a promotion marks the history file for it too
        yield from _file(f"pg_wal/archive_status/{history_name}.ready", b"", st)


def _setting_value(rest: str) -> str:
    """The value of a ``postgresql.conf`` line after its name (guc-file.l: ``=`` optional,
    a quoted string with ``''`` or backslash escapes, or a bare word; ``#`` starts a
    comment)."""
    rest = rest.lstrip()
    if rest.startswith("="):
        rest = rest[1:].lstrip()
    if not rest.startswith("'"):
        return re.split(r"[\s#]", rest, maxsplit=1)[0]
    out: list[str] = []
    i = 1
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            out.append(rest[i + 1])
            i += 2
        elif c == "'" and rest[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
        elif c == "'":
            break
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _is_off(setting: str, value: str) -> bool:
    """Whether ``value`` already turns ``setting`` off: empty, or archive_mode's off
    (and its boolean spellings); the others are strings, ``'false'`` a command."""
    return value == "" or (setting == "archive_mode"
                           and value.lower() in ("off", "false", "no", "0"))


def _disable_settings(path: str, content: bytes) -> tuple[bytes, list[str]]:
    """``content`` of the stored file ``path`` with every line setting one of
    :data:`DISABLED_SETTINGS` to something other than empty/off turned off (dropped from
    ``postgresql.auto.conf``, which ``ALTER SYSTEM`` rewrites anyway; commented out under
    :data:`DISABLED_MARKER` elsewhere), and the names of the settings turned off. Files
    other than ``*.conf`` settings files come back unchanged."""
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(".conf") or name in _NOT_SETTINGS:
        return content, []
    out: list[bytes] = []
    found: list[str] = []
    for line in content.splitlines(keepends=True):
        text = line.decode("latin-1")
        m = _SETTING_LINE.match(text)
        setting = m.group(1).lower() if m else ""
        if m is None or setting not in DISABLED_SETTINGS or _is_off(
                setting, _setting_value(text[m.end(1):])):
            out.append(line)
            continue
        if setting not in found:
            found.append(setting)
        if path != _AUTO_CONF:
            ending = line[len(line.rstrip(b"\r\n")):] or b"\n"
            out.append(DISABLED_MARKER.encode() + ending + b"#" + line.rstrip(b"\r\n") + ending)
    return b"".join(out), found


def disabled_settings(repo: Repository, timeline_id: TimelineId, lsn: Lsn) -> list[str]:
    """Which of :data:`DISABLED_SETTINGS` an export of ``timeline_id`` at ``lsn`` turns
    off (unless ``keep_config``), in that tuple's order: read from the stored
    configuration files alone, so a caller can say so before (or without) exporting."""
    found: set[str] = set()
    lo, hi = file_range()
    for _key, value in repo.materialize(timeline_id, lsn, lo=lo, hi=hi):
        path, content = unpack_file_value(value)
        if path not in _EXCLUDED_FILES and not path.startswith(_EXCLUDED_DIRS):
            found.update(_disable_settings(path, content)[1])
    return [s for s in DISABLED_SETTINGS if s in found]


def write_directory(entries: Iterator[ExportEntry], target: str | os.PathLike[str]) -> int:
    """Write ``entries`` under ``target`` (created, or empty: an export never mixes with
    other files), directories 0700 and files 0600 as PostgreSQL wants; the bytes written."""
    root = Path(target)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InvalidArgument(f"target directory {root} exists and is not empty")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    total = 0
    for entry in entries:
        path = root / entry.path
        if entry.chunks is None:
            path.mkdir(mode=0o700, exist_ok=True)
            continue
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            for chunk in entry.chunks:
                f.write(chunk)
                written += len(chunk)
        if written != entry.size:
            raise InvalidState(f"{entry.path}: wrote {written} bytes, expected {entry.size}")
        total += written
    return total


def tar_chunks(entries: Iterator[ExportEntry]) -> Iterator[bytes]:
    """``entries`` as a tar stream (what ``pg_basebackup -Ft`` reads), file by file."""
    for entry in entries:
        info = tarfile.TarInfo(entry.path)
        if entry.chunks is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            yield info.tobuf(format=tarfile.GNU_FORMAT)
            continue
        info.size, info.mode = entry.size, 0o600
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        written = 0
        for chunk in entry.chunks:
            written += len(chunk)
            yield chunk
        if written != entry.size:
            raise InvalidState(f"{entry.path}: produced {written} bytes, expected {entry.size}")
        if entry.size % 512:
            yield bytes(512 - entry.size % 512)
    yield bytes(1024)
