"""What a query handler sees of its connection: :class:`Session` and :class:`CopyStream`.

The server (``server.py``) runs one handler call per simple Query; the handler answers
through the session -- rows, a command tag, notices -- or switches the connection into
COPY mode and streams through a :class:`CopyStream`. The session checks that the answers
form a valid protocol exchange (no rows in the middle of a COPY, nothing after the query
has been answered), so a handler bug raises ``RuntimeError`` here instead of confusing the
client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from enum import Enum, auto
from typing import TypeAlias

from zenith.errors import ConnectionFailed, ProtocolViolation, ServerError
from zenith.pgwire.auth import StoredUser
from zenith.pgwire.messages import (
    TYPE_OID_BYTEA,
    TYPE_OID_TEXT,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    FieldDescription,
    Flush,
    NoticeResponse,
    RowDescription,
    Sync,
    Terminate,
)
from zenith.pgwire.stream import MessageStream

# Rows are flushed to the socket in batches of about this many bytes.
_ROW_FLUSH_BYTES = 256 * 1024


class SessionState(Enum):
    """What the handler of the current query may do next."""

    INACTIVE = auto()  # no query is running
    ANSWERING = auto()  # a query is running; rows/tags/COPY may be sent
    COPY = auto()  # a COPY is in progress: only the CopyStream and notices


class CopyKind(Enum):
    IN = "copy_in"  # client -> server
    OUT = "copy_out"  # server -> client
    BOTH = "copy_both"


Value: TypeAlias = str | bytes | None


def _encode_value(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return b"\\x" + bytes(value).hex().encode("ascii")  # bytea, text format
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


class CopyStream:
    """One COPY sub-protocol exchange, server side.

    ``read()`` returns the next CopyData payload from the client, ``None`` once it sent
    CopyDone, and raises :class:`ServerError` (57014) if it sent CopyFail. ``write()`` sends
    a CopyData and waits for the socket buffer to drain (back-pressure); ``done()`` sends
    CopyDone. ``async for chunk in stream`` reads to the end.
    """

    def __init__(self, session: Session, kind: CopyKind):
        self.kind = kind
        self._session = session
        self._stream = session._stream
        self._in_open = kind in (CopyKind.IN, CopyKind.BOTH)
        self._out_open = kind in (CopyKind.OUT, CopyKind.BOTH)

    @property
    def finished(self) -> bool:
        return not self._in_open and not self._out_open

    async def read(self) -> bytes | None:
        if self.kind is CopyKind.OUT:
            raise RuntimeError("a copy_out stream has nothing to read")
        if not self._in_open:
            return None
        while True:
            message = await self._stream.recv()
            if isinstance(message, CopyData):
                return message.data
            if isinstance(message, CopyDone):
                self._close_in()
                return None
            if isinstance(message, CopyFail):
                self._close_in()
                raise ServerError(f"COPY from stdin failed: {message.message}",
                                  sqlstate="57014")
            self._unexpected(message)

    def _unexpected(self, message: object) -> None:
        if isinstance(message, Flush | Sync):
            return  # ignored during COPY, as PostgreSQL does
        if isinstance(message, Terminate):
            self._stream.broken = ConnectionFailed("client terminated the connection in COPY")
        else:
            self._stream.broken = ProtocolViolation(
                f"unexpected message {type(message).__name__} during COPY")
        raise self._stream.broken

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._out_open:
            raise RuntimeError(f"cannot write to a {self.kind.value} stream"
                               + (" after done()" if self.kind is not CopyKind.IN else ""))
        self._stream.write_copy_data(data)
        await self._stream.drain()

    def abort(self, reason: str) -> None:
        """Drop the connection (a peer that stopped reading cannot be sent an error)."""
        self._stream.abort(reason)

    async def done(self) -> None:
        """Send CopyDone: this side will send no more data. Idempotent."""
        if self.kind is CopyKind.IN:
            raise RuntimeError("a copy_in stream sends no data, so it has no done()")
        if self._out_open:
            self._out_open = False
            await self._stream.send(CopyDone())
            self._check_finished()

    def _close_in(self) -> None:
        self._in_open = False
        self._stream.decoder.copy_in = False  # later CopyData: dropped unbuffered
        self._check_finished()

    def _check_finished(self) -> None:
        if self.finished:
            self._session._copy_finished(self)

    async def _close(self) -> None:
        """End both directions after the handler returned: CopyDone if not yet sent, and
        the client's remaining data (if any) read and dropped."""
        if self._out_open:
            await self.done()
        while self._in_open:
            message = await self._stream.recv()
            if isinstance(message, CopyDone | CopyFail):
                self._close_in()
            elif not isinstance(message, CopyData):
                self._unexpected(message)

    def __aiter__(self) -> CopyStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class Session:
    """A connected, authenticated client, as a query handler sees it."""

    def __init__(self, stream: MessageStream, *, user: StoredUser, database: str,
                 application_name: str, parameters: Mapping[str, str], backend_pid: int,
                 peer: str, tls: bool):
        self._stream = stream
        self.user = user
        self.database = database
        self.application_name = application_name
        #: The startup packet's parameters (user, database, options, ...).
        self.parameters = dict(parameters)
        self.backend_pid = backend_pid
        self.peer = peer
        self.tls = tls
        #: The query being answered.
        self.query = ""
        self.state = SessionState.INACTIVE
        self._result_open = False
        self._copy: CopyStream | None = None

    def __repr__(self) -> str:
        return f"Session(user={self.user.name!r}, database={self.database!r}, peer={self.peer})"

    # -- called by the server around each query ---------------------------------------

    def _begin(self, query: str) -> None:
        self.query = query
        self.state = SessionState.ANSWERING
        self._result_open = True
        self._copy = None

    async def _finish(self, default_tag: str) -> None:
        if self._copy is not None:
            await self._copy._close()
        if self._result_open:
            self._stream.write(CommandComplete(default_tag))
        self._end()

    def _abort(self) -> None:
        self._end()

    def _end(self) -> None:
        self._stream.decoder.copy_in = False
        self.state = SessionState.INACTIVE
        self._copy = None
        self._result_open = False

    def _copy_finished(self, copy: CopyStream) -> None:
        if self._copy is copy:
            self._copy = None
            self.state = SessionState.ANSWERING

    def _check(self, *, copy_allowed: bool = False) -> None:
        if self.state is SessionState.INACTIVE:
            raise RuntimeError("the session is only usable while its query handler runs")
        if self.state is SessionState.COPY and not copy_allowed:
            raise RuntimeError("a COPY is in progress: finish it first")

    # -- the handler's API --------------------------------------------------------------

    async def send_rows(self, columns: Sequence[str], rows: Iterable[Sequence[Value]],
                        tag: str) -> None:
        """A result set: RowDescription, DataRows, CommandComplete ``tag`` (e.g. "SELECT 2").

        Columns are ``text`` (OID 25), or ``bytea`` (OID 17) when a value in them is bytes;
        bytes are sent in text format as ``\\x`` + hex, as PostgreSQL sends bytea.
        """
        self._check()
        materialized = [tuple(row) for row in rows]
        for row in materialized:
            if len(row) != len(columns):
                raise ValueError(f"row has {len(row)} values for {len(columns)} columns")
        fields = tuple(
            FieldDescription(name, TYPE_OID_BYTEA if any(
                isinstance(row[i], bytes | bytearray | memoryview) for row in materialized)
                else TYPE_OID_TEXT)
            for i, name in enumerate(columns))
        self._stream.write(RowDescription(fields))
        pending = 0
        for row in materialized:
            message = DataRow(tuple(_encode_value(v) for v in row))
            encoded = message.encode()
            self._stream.write_raw(encoded)
            pending += len(encoded)
            if pending >= _ROW_FLUSH_BYTES:
                await self._stream.drain()
                pending = 0
        await self.send_command_complete(tag)

    async def send_command_complete(self, tag: str) -> None:
        """End one result with CommandComplete (e.g. "SET", "BEGIN", "INSERT 0 1")."""
        self._check()
        self._stream.write(CommandComplete(tag))  # goes out with ReadyForQuery
        self._result_open = False

    async def send_notice(self, message: str, severity: str = "NOTICE", *,
                          detail: str | None = None, hint: str | None = None) -> None:
        """A NoticeResponse, flushed at once (progress of long commands; allowed in COPY)."""
        self._check(copy_allowed=True)
        await self._stream.send(NoticeResponse.build(message, severity=severity,
                                                     detail=detail, hint=hint))

    async def copy_both(self) -> CopyStream:
        """Switch to CopyBoth (both sides stream CopyData until both sent CopyDone)."""
        return await self._start_copy(CopyKind.BOTH, CopyBothResponse())

    async def copy_out(self) -> CopyStream:
        """Switch to CopyOut (the server streams; ``done()`` ends it)."""
        return await self._start_copy(CopyKind.OUT, CopyOutResponse())

    async def copy_in(self) -> CopyStream:
        """Switch to CopyIn (the client streams until CopyDone or CopyFail)."""
        return await self._start_copy(CopyKind.IN, CopyInResponse())

    async def _start_copy(self, kind: CopyKind, response: CopyBothResponse | CopyOutResponse
                          | CopyInResponse) -> CopyStream:
        self._check()
        stream = CopyStream(self, kind)
        self._copy = stream
        self.state = SessionState.COPY
        # Only now may the client's CopyData be large (max_message_size, e.g. a transfer's
        # DATA frames); outside COPY IN/BOTH it is dropped as it arrives.
        self._stream.decoder.copy_in = kind is not CopyKind.OUT
        self._result_open = True
        await self._stream.send(response)
        return stream


QueryHandler: TypeAlias = Callable[[Session, str], Awaitable[None]]
