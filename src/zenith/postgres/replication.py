"""Physical replication from a real PostgreSQL: how the pageserver gets a cluster's pages and
then its WAL.

A pageserver imports a PostgreSQL 15 cluster with BASE_BACKUP and then follows it with
START_REPLICATION on a physical slot, the way a standby would (DESIGN.md section 7). Both
are commands of the replication protocol, spoken on a connection opened with the startup
parameter ``replication=true`` (a "walsender"); this module drives them over zenith's own
pgwire client:

- :func:`connect_replication` opens the connection; a role without the REPLICATION
  attribute, or a server that accepts no walsenders (``max_wal_senders = 0``, as any
  ``wal_level = minimal`` server), is refused with an error saying what to change.
- :meth:`ReplicationConnection.base_backup` streams the archives chunk by chunk (never the
  whole backup in memory) with the start and end LSN that bound its consistency.
- :meth:`ReplicationConnection.start_replication` returns a :class:`WalStream` of WAL
  chunks that answers the server's keepalives and sends standby status updates, so that
  the slot's ``restart_lsn`` advances and the source can recycle its WAL.

Server errors that matter to an operator (slot missing, WAL already removed, walsender
terminated) become zenith errors of their own, each with a hint.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Final, NoReturn

from zenith.errors import (
    ConnectionFailed,
    InvalidArgument,
    InvalidState,
    LsnOutOfRange,
    NotFound,
    PermissionDenied,
    ProtocolViolation,
    ZenithError,
)
from zenith.lsn import Lsn
from zenith.pgwire.client import ClientCopyStream, Connection, ConnInfo, QueryResult, connect
from zenith.pgwire.client import parse_uri as _parse_uri
from zenith.postgres.basebackup import TarPiece, TarReader, data_dir_path

__all__ = [
    "Archive",
    "BaseBackup",
    "ReplicationConnection",
    "ReplicationNotPermitted",
    "ReplicationUnavailable",
    "SlotInfo",
    "SlotNotFound",
    "SourceSettings",
    "SystemInfo",
    "TablespaceInfo",
    "TimelineEnd",
    "WalRemoved",
    "WalStream",
    "connect_replication",
]

#: Name under which :class:`BaseBackup` yields the backup manifest's chunks.
MANIFEST_NAME: Final = "backup_manifest"
# PostgreSQL timestamps count microseconds from 2000-01-01 00:00 UTC.
_PG_EPOCH_US: Final = 946_684_800 * 1_000_000
_SLOT_NAME: Final = re.compile(r"[a-z0-9_]{1,63}")
_XLOGDATA: Final = struct.Struct(">QQq")  # after 'w': dataStart, walEnd, sendTime
_KEEPALIVE: Final = struct.Struct(">Qq?")  # after 'k': walEnd, sendTime, replyRequested
_STATUS: Final = struct.Struct(">cQQQq?")  # 'r', write, flush, apply, clock, replyRequested


# ---------------------------------------------------------------------------------------
# Errors


class ReplicationNotPermitted(PermissionDenied):
    """The role may not open replication connections (it lacks REPLICATION)."""


class ReplicationUnavailable(InvalidState):
    """The source accepts no replication (``max_wal_senders``, slots or ``wal_level``)."""


class SlotNotFound(NotFound):
    """The replication slot does not exist (never created, or dropped)."""


class WalRemoved(InvalidState):
    """WAL the stream needs is gone from the source; only a new base backup helps."""


def _map_error(exc: ZenithError, user: str | None = None) -> ZenithError:
    """The server's error as the zenith error an operator can act on; ``exc`` itself when
    it has nothing to add."""
    msg = exc.message
    kw = {"detail": exc.detail}
    if "superuser or replication role" in msg or (
            isinstance(exc, PermissionDenied) and "walsender" in msg):
        role = f'"{user}"' if user else "the role"
        return ReplicationNotPermitted(
            f"{role} may not open replication connections to the source: {msg}",
            hint=f"Give it the REPLICATION attribute: ALTER ROLE {role} REPLICATION;", **kw)
    if "exceeds max_wal_senders (currently 0)" in msg:
        return ReplicationUnavailable(
            "the source PostgreSQL accepts no replication connections (max_wal_senders = 0)",
            hint="Set wal_level = replica, max_wal_senders > 0 and max_replication_slots > 0 "
                 "on the source, and restart it.", **kw)
    if "exceeds max_wal_senders" in msg:
        return ReplicationUnavailable(
            f"every replication connection of the source is in use: {msg}",
            hint="Raise max_wal_senders on the source, or stop another replication client.",
            **kw)
    if "requested WAL segment" in msg and "already been removed" in msg:
        return WalRemoved(
            f"the source no longer has the WAL to stream: {msg}",
            hint="Use a replication slot that reserves WAL, or import a new base backup.",
            **kw)
    if "replication slot" in msg and "does not exist" in msg:
        return SlotNotFound(msg, hint="The slot was dropped or never created on the source.",
                            **kw)
    if "can only be used if" in msg or ("wal_level" in msg and "requires" in msg):
        return ReplicationUnavailable(f"the source cannot replicate: {msg}",
                                      hint="Set wal_level = replica, max_wal_senders > 0 and "
                                           "max_replication_slots > 0 on the source.", **kw)
    if "is ahead of the WAL flush position" in msg:
        return LsnOutOfRange(msg, **kw)
    if exc.sqlstate.startswith("57P"):  # admin_shutdown, crash_shutdown, cannot_connect_now
        return ConnectionFailed(f"the source ended the replication connection: {msg}",
                                hint="It was terminated or is shutting down; reconnect.", **kw)
    return exc


def _reraise(exc: ZenithError, user: str | None) -> NoReturn:
    mapped = _map_error(exc, user)
    if mapped is exc:
        raise exc
    raise mapped from exc


def _checked_slot(name: str) -> str:
    if not _SLOT_NAME.fullmatch(name):
        raise InvalidArgument(f"invalid replication slot name {name!r}",
                              hint="Use 1 to 63 lower-case letters, digits and underscores.")
    return name


def _quote(text: str) -> str:
    """A string literal of the replication grammar (no backslash escapes there)."""
    if "\0" in text:
        raise InvalidArgument("a NUL byte cannot be sent in a replication command")
    return "'" + text.replace("'", "''") + "'"


def _pg_now() -> int:
    return time.time_ns() // 1000 - _PG_EPOCH_US


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SystemInfo:
    """IDENTIFY_SYSTEM: the cluster's identity and where its WAL is flushed to."""

    systemid: int
    timeline: int
    xlogpos: Lsn
    dbname: str | None


@dataclass(frozen=True)
class SlotInfo:
    """READ_REPLICATION_SLOT: ``restart_lsn`` is None until the slot reserves WAL."""

    name: str
    slot_type: str
    restart_lsn: Lsn | None
    restart_tli: int | None


@dataclass(frozen=True)
class SourceSettings:
    """The settings a pageserver source must have, read with SHOW."""

    server_version_num: int
    wal_level: str
    wal_consistency_checking: str
    data_checksums: bool
    wal_segment_size: int
    block_size: int

    def problems(self) -> list[str]:
        """Why the pageserver cannot follow this source (empty when it can)."""
        found = []
        if self.server_version_num // 10000 != 15:
            found.append(f"the source runs PostgreSQL {self.server_version_num}, "
                         "zenith supports 15")
        if self.wal_level not in ("replica", "logical"):
            found.append(f"wal_level is {self.wal_level}, it must be replica or logical")
        if "all" not in self.wal_consistency_checking.split(","):
            found.append(f"wal_consistency_checking is '{self.wal_consistency_checking}', it "
                         "must be 'all' so that every WAL record carries the page images")
        if self.block_size != 8192:
            found.append(f"block_size is {self.block_size}, zenith supports 8192")
        return found


_UNITS: Final = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def _parse_bytes(text: str) -> int:
    """``16MB`` as SHOW prints memory sizes, in bytes."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kMGT]?B)?\s*", text)
    if match is None:
        raise ProtocolViolation(f"unexpected size {text!r} from the source")
    return int(match.group(1)) * _UNITS[match.group(2) or "B"]


@dataclass(frozen=True)
class TablespaceInfo:
    """A tablespace in a base backup; ``spcoid`` and ``location`` are None for the main
    data directory. ``size_kb`` is only known when progress was asked for."""

    spcoid: int | None
    location: str | None
    size_kb: int | None


@dataclass(frozen=True)
class Archive:
    """One archive of a base backup: ``base.tar`` or ``<spcoid>.tar``."""

    name: str
    location: str | None
    spcoid: int | None


@dataclass(frozen=True)
class TimelineEnd:
    """The server ended streaming because the timeline ended (the source was promoted):
    the next timeline and where it starts."""

    next_timeline: int
    start_lsn: Lsn


def _single_row(result: QueryResult, what: str, columns: int) -> list[str | None]:
    if len(result.rows) != 1 or len(result.rows[0]) < columns:
        raise ProtocolViolation(f"unexpected answer to {what} from the source: "
                                f"{len(result.rows)} rows of {result.columns}")
    return result.rows[0]


def _lsn(text: str | None, what: str) -> Lsn:
    try:
        return Lsn.parse(text or "")
    except ValueError as exc:
        raise ProtocolViolation(f"invalid {what} {text!r} from the source") from exc


# ---------------------------------------------------------------------------------------
# The connection


async def connect_replication(target: str | ConnInfo, *, timeout: float = 10.0,
                              application_name: str | None = None) -> ReplicationConnection:
    """Open a physical replication connection (``replication=true``) within ``timeout``.

    Without a database in the URI the database is ``replication``, which only matters for
    ``~/.pgpass``: that is the name libpq programs use there for replication connections.
    """
    info = _parse_uri(target) if isinstance(target, str) else target
    if info.dbname is None:
        info = replace(info, dbname="replication")
    params = {"replication": "true"}
    if application_name is not None:
        params["application_name"] = application_name
    try:
        conn = await connect(info, timeout=timeout, startup_params=params)
    except ZenithError as exc:
        _reraise(exc, info.user)
    return ReplicationConnection(conn)


class ReplicationConnection:
    """A walsender connection. One command at a time, like any connection; a base backup
    or a WAL stream occupies it until it ends."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def __repr__(self) -> str:
        return f"<ReplicationConnection {self.conn.user}@{self.conn.info.address}>"

    async def __aenter__(self) -> ReplicationConnection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.conn.close()

    async def _command(self, sql: str) -> QueryResult:
        try:
            return await self.conn.simple_query(sql)
        except ZenithError as exc:
            _reraise(exc, self.conn.user)

    async def identify_system(self) -> SystemInfo:
        row = _single_row(await self._command("IDENTIFY_SYSTEM"), "IDENTIFY_SYSTEM", 4)
        try:
            return SystemInfo(int(row[0] or ""), int(row[1] or ""),
                              _lsn(row[2], "WAL position"), row[3])
        except ValueError as exc:
            raise ProtocolViolation(f"invalid IDENTIFY_SYSTEM row {row}") from exc

    async def show(self, setting: str) -> str:
        """The value of a server setting, as SHOW prints it."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", setting):
            raise InvalidArgument(f"invalid setting name {setting!r}")
        row = _single_row(await self._command(f"SHOW {setting}"), "SHOW", 1)
        return row[0] or ""

    async def source_settings(self) -> SourceSettings:
        try:
            return SourceSettings(
                server_version_num=int(await self.show("server_version_num")),
                wal_level=await self.show("wal_level"),
                wal_consistency_checking=await self.show("wal_consistency_checking"),
                data_checksums=await self.show("data_checksums") == "on",
                wal_segment_size=_parse_bytes(await self.show("wal_segment_size")),
                block_size=int(await self.show("block_size")))
        except ValueError as exc:
            raise ProtocolViolation(f"unexpected setting value from the source: {exc}") from exc

    # -- slots ---------------------------------------------------------------------

    async def create_physical_slot(self, name: str, *, reserve_wal: bool = True) -> Lsn | None:
        """Create a physical slot; with ``reserve_wal`` the source keeps WAL from the
        returned LSN (the slot's ``restart_lsn``) on; without, None is returned."""
        reserve = " RESERVE_WAL" if reserve_wal else ""
        await self._command(f"CREATE_REPLICATION_SLOT {_checked_slot(name)} PHYSICAL{reserve}")
        if not reserve_wal:
            return None
        slot = await self.read_slot(name)
        return slot.restart_lsn if slot is not None else None

    async def read_slot(self, name: str) -> SlotInfo | None:
        """The slot (READ_REPLICATION_SLOT, PostgreSQL 15), or None if there is none.
        A logical slot is refused by the server."""
        result = await self._command(f"READ_REPLICATION_SLOT {_checked_slot(name)}")
        row = _single_row(result, "READ_REPLICATION_SLOT", 3)
        if row[0] is None:
            return None
        try:
            tli = int(row[2]) if row[2] is not None else None
        except ValueError as exc:
            raise ProtocolViolation(f"invalid timeline {row[2]!r} of slot {name}") from exc
        restart = _lsn(row[1], "restart LSN") if row[1] is not None else None
        return SlotInfo(name, row[0], restart, tli)

    async def slot_exists(self, name: str) -> bool:
        return await self.read_slot(name) is not None

    async def drop_slot(self, name: str, *, wait: bool = False,
                        missing_ok: bool = False) -> None:
        """Drop the slot. An active slot is refused unless ``wait``, which waits for its
        user to go; a missing one raises :class:`SlotNotFound` unless ``missing_ok``."""
        try:
            await self._command(f"DROP_REPLICATION_SLOT {_checked_slot(name)}"
                                + (" WAIT" if wait else ""))
        except SlotNotFound:
            if not missing_ok:
                raise

    # -- base backup ---------------------------------------------------------------

    async def base_backup(self, *, label: str, checkpoint_fast: bool = True,
                          wal: bool = False, manifest: bool = False, progress: bool = False,
                          max_rate_kb: int | None = None) -> BaseBackup:
        """Start BASE_BACKUP (PostgreSQL 15 syntax) and return once the server has sent the
        start LSN: iterate the result for the archives' chunks.

        ``wal`` adds the WAL needed to make the backup consistent to ``base.tar``
        (``pg_wal/...``); ``manifest`` adds the backup manifest; ``progress`` makes the
        server compute the tablespace sizes first (a second pass over the files).
        """
        checkpoint = "fast" if checkpoint_fast else "spread"
        options = [f"LABEL {_quote(label)}", f"CHECKPOINT '{checkpoint}'", "WAIT false",
                   f"WAL {str(wal).lower()}",
                   f"MANIFEST '{'yes' if manifest else 'no'}'", "TABLESPACE_MAP true"]
        if progress:
            options.append("PROGRESS true")
        if max_rate_kb is not None:
            options.append(f"MAX_RATE {int(max_rate_kb)}")
        preamble: list[QueryResult] = []
        try:
            copy = await self.conn.copy_out(f"BASE_BACKUP ({', '.join(options)})",
                                            results=preamble)
        except ZenithError as exc:
            _reraise(exc, self.conn.user)
        return BaseBackup(self, copy, preamble)

    # -- streaming -----------------------------------------------------------------

    async def start_replication(self, slot: str | None, start_lsn: Lsn,
                                timeline: int) -> WalStream:
        """Stream WAL from ``start_lsn`` on ``timeline`` (IDENTIFY_SYSTEM's for the
        current one), through ``slot`` if given."""
        via = f"SLOT {_checked_slot(slot)} " if slot is not None else ""
        sql = f"START_REPLICATION {via}PHYSICAL {Lsn(start_lsn)} TIMELINE {int(timeline)}"
        try:
            copy = await self.conn.copy_both(sql)
        except ZenithError as exc:
            _reraise(exc, self.conn.user)
        return WalStream(self, copy, Lsn(start_lsn))


# ---------------------------------------------------------------------------------------
# Base backup


class BaseBackup:
    """A running BASE_BACKUP. ``async for archive_name, chunk in backup`` yields the tar
    data as the server sends it (about 32 KiB at a time); :meth:`files` parses it into
    :class:`~zenith.postgres.basebackup.TarPiece` objects with data-directory paths.
    ``end_lsn`` is known once the iteration is over: the backup's files are consistent only
    when WAL up to it has been applied. ``async with`` closes the connection if the
    iteration stops early, since a COPY OUT cannot be left half read.
    """

    def __init__(self, conn: ReplicationConnection, copy: ClientCopyStream,
                 preamble: list[QueryResult]):
        self._conn = conn
        self._copy = copy
        if len(preamble) < 2:
            raise ProtocolViolation("BASE_BACKUP did not send its start position and "
                                    "tablespace list")
        row = _single_row(preamble[0], "BASE_BACKUP", 2)
        self.start_lsn = _lsn(row[0], "backup start LSN")
        self.timeline = int(row[1] or "0")
        self.tablespaces = [TablespaceInfo(int(r[0]) if r[0] else None, r[1],
                                           int(r[2]) if r[2] else None)
                            for r in preamble[1].rows]
        self.archives: list[Archive] = []
        self.end_lsn: Lsn | None = None
        self.end_timeline: int | None = None
        #: Bytes of archive data the server reports having sent (its 'p' messages).
        self.bytes_done = 0
        self.on_progress: Callable[[int], None] | None = None
        self._current: str | None = None
        self._started = False

    @property
    def done(self) -> bool:
        return self.end_lsn is not None

    async def __aenter__(self) -> BaseBackup:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.done:
            await self._conn.close()

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        if self._started:
            raise RuntimeError("a base backup can be iterated only once")
        self._started = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        try:
            while (data := await self._copy.read()) is not None:
                kind = data[:1]
                if kind == b"d":
                    if self._current is None:
                        raise ProtocolViolation("base backup data before any archive")
                    yield self._current, data[1:]
                elif kind == b"n":
                    self._new_archive(data)
                elif kind == b"p" and len(data) == 9:
                    self.bytes_done = struct.unpack_from(">q", data, 1)[0]
                    if self.on_progress is not None:
                        self.on_progress(self.bytes_done)
                elif kind == b"m":
                    self._current = MANIFEST_NAME
                else:
                    raise ProtocolViolation(f"unknown base backup message type {kind!r}")
        except ZenithError as exc:
            _reraise(exc, self._conn.conn.user)
        assert self._copy.result is not None
        row = _single_row(self._copy.result, "BASE_BACKUP end", 2)
        self.end_lsn = _lsn(row[0], "backup end LSN")
        self.end_timeline = int(row[1] or "0")

    def _new_archive(self, data: bytes) -> None:
        parts = data[1:].split(b"\0")
        if len(parts) < 3:
            raise ProtocolViolation("malformed new-archive message in base backup")
        name, location = (p.decode("utf-8", "surrogateescape") for p in parts[:2])
        spcoid = None
        if location:
            matches = [t.spcoid for t in self.tablespaces if t.location == location]
            spcoid = matches[0] if matches else None
            if spcoid is None and name.removesuffix(".tar").isdigit():
                spcoid = int(name.removesuffix(".tar"))  # the server names it <oid>.tar
            if spcoid is None:
                raise ProtocolViolation(f"base backup archive {name!r} for unknown "
                                        f"tablespace {location!r}")
        self.archives.append(Archive(name, location or None, spcoid))
        self._current = name

    async def files(self) -> AsyncIterator[TarPiece]:
        """The archives' members as pieces, paths relative to the data directory
        (tablespace members under ``pg_tblspc/<oid>/``); the manifest is left out."""
        reader: TarReader | None = None
        spcoid: int | None = None
        current: str | None = None
        async for name, chunk in self:
            if name != current:
                if reader is not None:
                    reader.close()
                current = name
                reader = None if name == MANIFEST_NAME else TarReader()
                spcoid = self.archives[-1].spcoid if self.archives else None
            if reader is None:
                continue
            for piece in reader.feed(chunk):
                yield replace(piece, path=data_dir_path(spcoid, piece.path))
        if reader is not None:
            reader.close()


# ---------------------------------------------------------------------------------------
# WAL streaming


class WalStream:
    """WAL from START_REPLICATION: ``async for start_lsn, data in stream``.

    Chunks are contiguous, starting at the requested LSN. Keepalives that ask for an answer
    are answered with the positions last given to :meth:`send_status` (the start LSN until
    then), so the stream must be read for the connection to stay alive (the server drops a
    standby silent for ``wal_sender_timeout``). The iteration ends when the server ends the
    stream, which it does at the end of a timeline: ``timeline_end`` then says where the
    next one starts. Errors: :class:`SlotNotFound`, :class:`WalRemoved`,
    :class:`~zenith.errors.ConnectionFailed` when the walsender is terminated.
    """

    def __init__(self, conn: ReplicationConnection, copy: ClientCopyStream, start_lsn: Lsn):
        self._conn = conn
        self._copy = copy
        self.start_lsn = start_lsn
        #: End of the WAL received so far.
        self.received_lsn = start_lsn
        #: The server's end of WAL, as of its last message.
        self.server_wal_end = Lsn(0)
        #: The server's clock (µs since 2000-01-01) in its last message.
        self.server_time = 0
        self.write_lsn = self.flush_lsn = self.apply_lsn = start_lsn
        self.keepalives_answered = 0
        self.timeline_end: TimelineEnd | None = None
        self._ended = False

    def __aiter__(self) -> WalStream:
        return self

    async def __anext__(self) -> tuple[Lsn, bytes]:
        chunk = await self.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def __aenter__(self) -> WalStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop the stream; on an exception, or if it cannot stop cleanly, close the
        connection instead (a stream cannot be abandoned half read)."""
        if exc is None and not self._ended:
            try:
                async with asyncio.timeout(5):
                    await self.stop()
                return
            except (ZenithError, TimeoutError):
                pass
        if exc is not None or not self._ended:
            await self._conn.close()

    async def read(self) -> tuple[Lsn, bytes] | None:
        """The next WAL chunk, or None once the server ended the stream."""
        if self._ended:
            return None
        try:
            while True:
                data = await self._copy.read()
                if data is None:
                    await self._end()
                    return None
                kind = data[:1]
                if kind == b"w" and len(data) >= 1 + _XLOGDATA.size:
                    start, wal_end, send_time = _XLOGDATA.unpack_from(data, 1)
                    if start != self.received_lsn:
                        raise ProtocolViolation(f"WAL chunk at {Lsn(start)}, expected "
                                                f"{self.received_lsn}")
                    chunk = data[1 + _XLOGDATA.size:]
                    self.received_lsn = Lsn(start + len(chunk))
                    self.server_wal_end, self.server_time = Lsn(wal_end), send_time
                    return Lsn(start), chunk
                if kind == b"k" and len(data) >= 1 + _KEEPALIVE.size:
                    wal_end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
                    self.server_wal_end, self.server_time = Lsn(wal_end), send_time
                    if reply:
                        await self.send_status(self.write_lsn, self.flush_lsn, self.apply_lsn)
                        self.keepalives_answered += 1
                    continue
                raise ProtocolViolation(f"unexpected replication message {kind!r} "
                                        f"({len(data)} bytes)")
        except ZenithError as exc:
            self._ended = True
            _reraise(exc, self._conn.conn.user)

    async def send_status(self, write_lsn: Lsn, flush_lsn: Lsn, apply_lsn: Lsn, *,
                          reply: bool = False) -> None:
        """Standby status update: WAL up to ``flush_lsn`` is safe here, so a slot may let
        the source recycle it. ``reply`` asks the server for a keepalive back."""
        self.write_lsn, self.flush_lsn, self.apply_lsn = (
            Lsn(write_lsn), Lsn(flush_lsn), Lsn(apply_lsn))
        await self._copy.write(_STATUS.pack(b"r", write_lsn, flush_lsn, apply_lsn,
                                            _pg_now(), reply))

    async def _end(self) -> None:
        """The server sent CopyDone: end our side and read why (the next timeline)."""
        self._ended = True
        await self._copy.done()
        self._read_timeline_end()

    def _read_timeline_end(self) -> None:
        # Only a stream of a past timeline ends with a result set: (next_tli, its start).
        result = self._copy.result
        if result is not None and result.rows and len(result.rows[0]) >= 2:
            tli, start = result.rows[0][:2]
            if tli is not None and start is not None:
                self.timeline_end = TimelineEnd(int(tli), _lsn(start, "timeline switch LSN"))

    async def stop(self) -> None:
        """End the stream from our side (CopyDone) and wait for the server's end; the
        connection can then run other commands."""
        if self._ended:
            return
        self._ended = True
        await self._copy.done()
        try:
            while await self._copy.read() is not None:
                pass  # WAL already in flight
        except ZenithError as exc:
            _reraise(exc, self._conn.conn.user)
        self._read_timeline_end()
