"""The client side of the PostgreSQL v3 protocol: how zenith talks to pageservers.

The CLI talks to its local pageserver, and a pageserver to a remote one (push and pull),
through :func:`connect`. It speaks what those conversations need -- simple queries, notices
as they arrive, and COPY streams (CopyBoth for segment transfer) -- with libpq's connection
behaviour: the URI forms of :mod:`zenith.pgwire.conninfo` (re-exported here), sslmode
disable/allow/prefer/require/verify-ca/verify-full, SCRAM-SHA-256, MD5, cleartext and trust
authentication, and one time budget for the whole connection attempt.

Trust: a password is never sent in clear or as MD5 unless the connection is TLS that
verified the server's certificate (verify-ca, verify-full, or require with sslrootcert) or
the URI's ``require_auth`` allows it (:func:`~zenith.pgwire.conninfo.allowed_auth`),
checked before anything is sent; SCRAM must end with the server's verified signature, its
iteration count is bounded (``SCRAM_MAX_ITERATIONS``) and its key derivation runs in a
worker thread. (A server may ask for as few as 1 iteration, PostgreSQL's minimum: that
only makes the client's proof cheaper to attack offline, which a fake server can do anyway
with any count; the proof is useless without the password, and the connection fails
without the server's signature.)
Origins (other pageservers) are parsed with :func:`parse_origin_uri`: ``verify-full`` by
default.

Errors: an unreachable server or a lost connection is :class:`~zenith.errors.ConnectionFailed`
naming ``host:port``; an ErrorResponse becomes the :class:`~zenith.errors.ZenithError` class
registered for its SQLSTATE (so 28P01 is ``AuthenticationFailed``). After an ErrorResponse
to a query the connection is still usable: the error is raised only once ReadyForQuery
has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType

from zenith.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    FeatureNotSupported,
    InvalidArgument,
    ProtocolViolation,
    ZenithError,
    error_from_sqlstate,
)
from zenith.pgwire.auth import SCRAM_MECHANISM, ScramClientExchange, md5_client_response
from zenith.pgwire.conninfo import (
    ConnInfo,
    PgpassEntry,
    allowed_auth,
    certificate_verified,
    lookup_password,
    mask_uri,
    parse_local_uri,
    parse_origin_uri,
    parse_pgpass,
    parse_uri,
    read_pgpass,
)
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    OtherBackendMessage,
    ParameterStatus,
    PasswordMessage,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    Sender,
    SSLRequest,
    StartupMessage,
    Terminate,
)
from zenith.pgwire.stream import MessageStream

__all__ = [
    "ClientCopyStream",
    "ConnInfo",
    "Connection",
    "Notice",
    "PgpassEntry",
    "QueryResult",
    "connect",
    "decode_bytea",
    "lookup_password",
    "mask_uri",
    "parse_local_uri",
    "parse_origin_uri",
    "parse_pgpass",
    "parse_uri",
    "read_pgpass",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    """A NoticeResponse (progress, warnings) as the client reports it."""

    severity: str
    code: str
    message: str
    detail: str | None = None
    hint: str | None = None

    @classmethod
    def from_message(cls, message: NoticeResponse) -> Notice:
        return cls(message.severity, message.code, message.message, message.detail,
                   message.hint)


@dataclass
class QueryResult:
    """The last result set of a query (text values, ``None`` for NULL), its command tag
    (``None`` for an empty query) and every notice received meanwhile."""

    columns: list[str] = field(default_factory=list)
    column_types: list[int] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    command_tag: str | None = None
    notices: list[Notice] = field(default_factory=list)


def decode_bytea(text: str) -> bytes:
    """A bytea value in text format (``\\x`` + hex) back to bytes."""
    if not text.startswith("\\x"):
        raise InvalidArgument("not a bytea value in hex format (expected \\x...)")
    try:
        return bytes.fromhex(text[2:])
    except ValueError as exc:
        raise InvalidArgument("invalid hex digits in bytea value") from exc


def _error(message: ErrorResponse) -> ZenithError:
    return error_from_sqlstate(message.code, message.message, detail=message.detail,
                               hint=message.hint)


class CopyKind(Enum):
    IN = "copy_in"
    OUT = "copy_out"
    BOTH = "copy_both"


_COPY_RESPONSES: dict[CopyKind, type[Message]] = {
    CopyKind.IN: CopyInResponse, CopyKind.OUT: CopyOutResponse, CopyKind.BOTH: CopyBothResponse,
}


class Connection:
    """One authenticated connection. Operations are sequential: a second one while a
    query or COPY is in progress raises ``RuntimeError``."""

    def __init__(self, stream: MessageStream, info: ConnInfo, user: str,
                 parameters: dict[str, str], backend_key: tuple[int, int] | None,
                 notices: list[Notice]):
        self._stream = stream
        self.info = info
        self.user = user
        #: ParameterStatus values (server_version, application_name, ...), kept current.
        self.parameters = parameters
        self.backend_key = backend_key
        #: Notices received while connecting.
        self.startup_notices = notices
        #: Called with every Notice as it arrives (e.g. progress of a push).
        self.on_notice: Callable[[Notice], None] | None = None
        self._busy = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<Connection {self.user}@{self.info.address}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed or self._stream.broken is not None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- bookkeeping ---------------------------------------------------------------

    def _enter(self) -> None:
        if self._closed:
            raise ConnectionFailed(f"connection to {self.info.address} is closed")
        if self._stream.broken is not None:
            raise self._stream.broken
        if self._busy:
            raise RuntimeError("another query or COPY is in progress on this connection")
        self._busy = True

    def _leave(self) -> None:
        self._busy = False

    def _notice(self, message: NoticeResponse, sink: list[Notice]) -> None:
        notice = Notice.from_message(message)
        sink.append(notice)
        if self.on_notice is not None:
            try:
                self.on_notice(notice)
            except Exception:
                logger.exception("on_notice callback failed")

    async def _recv(self) -> BackendMessage:
        message = await self._stream.recv()
        return message  # type: ignore[return-value]  # a backend decoder yields these only

    async def _consume(self, result: QueryResult,
                       error: ZenithError | None = None) -> ZenithError | None:
        """Read to ReadyForQuery, filling ``result``; the first error, if any (``error``
        if given). After an error the server may close instead (a FATAL one): that error
        is returned, not the lost connection."""
        while True:
            try:
                message = await self._recv()
            except ConnectionFailed:
                if error is None:
                    raise
                return error
            if isinstance(message, ReadyForQuery):
                return error
            if isinstance(message, RowDescription):
                result.columns = [f.name for f in message.fields]
                result.column_types = [f.type_oid for f in message.fields]
                result.rows = []
            elif isinstance(message, DataRow):
                result.rows.append([None if v is None else v.decode("utf-8", "replace")
                                    for v in message.values])
            elif isinstance(message, CommandComplete):
                result.command_tag = message.tag
            elif isinstance(message, EmptyQueryResponse):
                result.command_tag = None
            elif isinstance(message, ErrorResponse):
                error = error or _error(message)
            elif isinstance(message, CopyInResponse | CopyOutResponse | CopyBothResponse):
                error = error or FeatureNotSupported(
                    "the query started a COPY: use copy_in(), copy_out() or copy_both()")
                await self._refuse_copy(message, result)
            else:
                self._other(message, result.notices)

    def _other(self, message: BackendMessage, notices: list[Notice]) -> None:
        """Messages that may come at any time."""
        if isinstance(message, NoticeResponse):
            self._notice(message, notices)
        elif isinstance(message, ParameterStatus):
            self.parameters[message.name] = message.value
        elif isinstance(message, OtherBackendMessage) and message.kind == ord("A"):
            pass  # NotificationResponse: zenith has no LISTEN
        else:
            self._stream.broken = ProtocolViolation(
                f"unexpected message {type(message).__name__} from the server")
            raise self._stream.broken

    async def _refuse_copy(self, response: Message, result: QueryResult) -> None:
        if isinstance(response, CopyInResponse):
            await self._stream.send(CopyFail("COPY FROM STDIN is not supported by simple_query"))
            return
        if isinstance(response, CopyBothResponse):
            await self._stream.send(CopyDone())
        while True:  # the server's copy data, up to its CopyDone or an error
            message = await self._recv()
            if isinstance(message, CopyDone):
                return
            if isinstance(message, ErrorResponse):
                result.notices.append(Notice("ERROR", message.code, message.message))
                return
            if not isinstance(message, CopyData):
                self._other(message, result.notices)

    # -- operations ----------------------------------------------------------------

    async def simple_query(self, sql: str) -> QueryResult:
        """Run ``sql`` with the simple query protocol; raise the server's error, if any,
        after the connection is ready again."""
        self._enter()
        try:
            await self._stream.send(Query(sql))
            result = QueryResult()
            error = await self._consume(result)
        finally:
            self._leave()
        if error is not None:
            raise error
        return result

    async def copy_both(self, sql: str) -> ClientCopyStream:
        """Send ``sql``, which must switch the connection to CopyBoth, and stream."""
        return await self._start_copy(sql, CopyKind.BOTH)

    async def copy_out(self, sql: str, *,
                       results: list[QueryResult] | None = None) -> ClientCopyStream:
        """Send ``sql``, which must start a CopyOut, and stream. With ``results``, result
        sets the command sends before its COPY starts are appended there instead of being
        refused (a replication connection's BASE_BACKUP sends the start LSN that way)."""
        return await self._start_copy(sql, CopyKind.OUT, results)

    async def copy_in(self, sql: str) -> ClientCopyStream:
        return await self._start_copy(sql, CopyKind.IN)

    async def _start_copy(self, sql: str, kind: CopyKind,
                          results: list[QueryResult] | None = None) -> ClientCopyStream:
        self._enter()
        try:
            await self._stream.send(Query(sql))
            notices: list[Notice] = []
            while True:
                message = await self._recv()
                if isinstance(message, _COPY_RESPONSES[kind]):
                    return ClientCopyStream(self, kind, notices)
                if results is not None and self._preamble(message, results, notices):
                    continue
                if isinstance(message, NoticeResponse | ParameterStatus):
                    self._other(message, notices)
                    continue
                if isinstance(message, ErrorResponse):
                    error = _error(message)
                    await self._consume(QueryResult(notices=notices), error)
                    raise error
                if isinstance(message, RowDescription | CommandComplete | EmptyQueryResponse):
                    await self._consume(QueryResult(notices=notices))
                    raise ProtocolViolation(f"the server did not start {kind.value} for "
                                            f"{sql[:60]!r}")
                self._stream.broken = ProtocolViolation(
                    f"expected {kind.value} response, got {type(message).__name__}")
                raise self._stream.broken
        except BaseException:
            self._leave()
            raise

    @staticmethod
    def _preamble(message: BackendMessage, results: list[QueryResult],
                  notices: list[Notice]) -> bool:
        """Collect a result set sent before a COPY starts; False if ``message`` is none."""
        if isinstance(message, RowDescription):
            results.append(QueryResult(columns=[f.name for f in message.fields],
                                       column_types=[f.type_oid for f in message.fields],
                                       notices=notices))
        elif isinstance(message, DataRow) and results:
            results[-1].rows.append([None if v is None else v.decode("utf-8", "replace")
                                     for v in message.values])
        elif isinstance(message, CommandComplete) and results:
            results[-1].command_tag = message.tag
        else:
            return False
        return True

    async def cancel(self) -> None:
        """Ask the server to cancel the running query (CancelRequest on a new connection)."""
        if self.backend_key is None:
            raise InvalidArgument("the server sent no cancellation key")
        try:
            async with asyncio.timeout(10):
                reader, writer = await _open(self.info)
                writer.write(CancelRequest(*self.backend_key).encode())
                await writer.drain()
                writer.close()
                await reader.read()  # the server closes when done
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(f"could not send cancel request to {self.info.address}: "
                                   f"{exc}") from exc

    async def close(self) -> None:
        """Send Terminate and close; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        if self._stream.broken is None:
            with contextlib.suppress(Exception):
                self._stream.write(Terminate())
        await self._stream.close()


class ClientCopyStream:
    """The client's end of a COPY. ``read()`` returns the server's CopyData payloads and
    ``None`` once it sent CopyDone; ``write()`` sends CopyData (with back-pressure) and
    ``done()`` CopyDone; for copy_in, ``fail(reason)`` aborts. When both directions have
    ended, the stream reads the query's end (CommandComplete .. ReadyForQuery) by itself
    and raises the server's ErrorResponse if there was one; ``result`` then holds the
    outcome and ``finish()`` returns it (ending our direction and draining the server's
    first if needed). ``async with`` finishes on success and aborts on an exception.
    """

    def __init__(self, conn: Connection, kind: CopyKind, notices: list[Notice]):
        self.kind = kind
        self._conn = conn
        self._stream = conn._stream
        self._server_open = kind in (CopyKind.OUT, CopyKind.BOTH)
        self._client_open = kind in (CopyKind.IN, CopyKind.BOTH)
        self._notices = notices
        self.result: QueryResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None or not self._conn._busy

    async def read(self) -> bytes | None:
        if self.kind is CopyKind.IN:
            raise RuntimeError("a copy_in stream has nothing to read")
        while self._server_open:
            message = await self._conn._recv()
            if isinstance(message, CopyData):
                return message.data
            if isinstance(message, CopyDone):
                self._server_open = False
                if not self._client_open:
                    await self._tail(None)
                return None
            if isinstance(message, ErrorResponse):
                self._server_open = self._client_open = False
                await self._tail(_error(message))  # raises
            else:
                self._conn._other(message, self._notices)
        return None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._client_open:
            raise RuntimeError(f"cannot write to this {self.kind.value} stream"
                               + (" after done()" if self.kind is not CopyKind.OUT else ""))
        self._stream.write_copy_data(data)
        await self._stream.drain()

    def abort(self, reason: str) -> None:
        """Drop the connection (a server that stopped reading cannot be told why)."""
        self._stream.abort(reason)

    async def done(self) -> None:
        """Send CopyDone: no more data from us. Idempotent."""
        if self.kind is CopyKind.OUT:
            raise RuntimeError("a copy_out stream sends no data, so it has no done()")
        if self._client_open:
            self._client_open = False
            await self._stream.send(CopyDone())
            if not self._server_open:
                await self._tail(None)

    async def fail(self, reason: str) -> None:
        """Abort a copy_in with CopyFail; the server's resulting error is not raised."""
        if self.kind is not CopyKind.IN:
            raise RuntimeError("only a copy_in stream can fail()")
        if self._client_open:
            self._client_open = False
            await self._stream.send(CopyFail(reason))
            try:
                await self._tail(None)
            except ZenithError as exc:
                if isinstance(exc, ConnectionFailed | ProtocolViolation):
                    raise

    async def finish(self) -> QueryResult:
        if self.result is None:
            if self._client_open:
                await self.done()
            while self._server_open:
                await self.read()
        assert self.result is not None
        return self.result

    async def _tail(self, error: ZenithError | None) -> None:
        result = QueryResult(notices=self._notices)
        try:
            error = await self._conn._consume(result, error)
        finally:
            self._conn._leave()
        self.result = result
        if error is not None:
            raise error

    def __aiter__(self) -> ClientCopyStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def __aenter__(self) -> ClientCopyStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.result is not None or self._stream.broken is not None:
            return
        if exc is None:
            await self.finish()
            return
        try:  # resynchronise: end our side, drain theirs, ignore the outcome
            async with asyncio.timeout(5):
                if self.kind is CopyKind.IN:
                    await self.fail(f"client error: {exc_type.__name__ if exc_type else ''}")
                else:
                    await self.finish()
        except (ZenithError, TimeoutError):
            pass
        if self.result is None:
            await self._conn.close()


# ---------------------------------------------------------------------------------------
# Connecting


def _ssl_context(info: ConnInfo) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certificate_verified(info):
        root = info.sslrootcert or str(Path.home() / ".postgresql" / "root.crt")
        if root == "system":
            context.load_default_certs()
        elif not os.path.exists(root):
            raise ConnectionFailed(
                f'root certificate file "{root}" does not exist',
                hint="Name the CA's certificate with sslrootcert=FILE, use the system's "
                     "trusted roots with sslrootcert=system, or change sslmode (disable "
                     "verification only on a network you trust).")
        else:
            context.load_verify_locations(root)
        context.check_hostname = info.sslmode == "verify-full"
        # Only subjectAltName names the server (no fallback to the CN, which a client
        # certificate from the same CA may carry).
        context.hostname_checks_common_name = False
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if info.sslcert or info.sslkey:
        _load_client_certificate(context, info)
    return context


def _load_client_certificate(context: ssl.SSLContext, info: ConnInfo) -> None:
    """``sslcert``/``sslkey``: the certificate a server's ``cert`` authentication checks.
    As libpq, a key file that group or others may read is refused."""
    if not info.sslcert:
        raise ConnectionFailed("sslkey is given without sslcert",
                               hint="name the client certificate with sslcert=FILE")
    key = info.sslkey or info.sslcert  # a PEM file may hold both
    for what, path in (("certificate", info.sslcert), ("private key", key)):
        if not os.path.exists(path):
            raise ConnectionFailed(f'{what} file "{path}" does not exist')
    if os.stat(key).st_mode & 0o077:
        raise ConnectionFailed(
            f'private key file "{key}" has group or world access',
            hint=f"it must have permissions u=rw (0600) or less: chmod 600 {key}")
    try:
        context.load_cert_chain(info.sslcert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConnectionFailed(f'could not load the client certificate "{info.sslcert}" '
                               f'and its key "{key}": {exc}') from None


async def _open(info: ConnInfo) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if info.host.startswith("/"):
            return await asyncio.open_unix_connection(
                os.path.join(info.host, f".s.PGSQL.{info.port}"))
        return await asyncio.open_connection(info.hostaddr or info.host, info.port)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionFailed(f"could not connect to {info.address}: {reason}") from exc


class _TLSFailed(ConnectionFailed):
    pass


async def _negotiate_tls(stream: MessageStream, info: ConnInfo) -> bool:
    """SSLRequest and the TLS handshake; False when a ``prefer`` server declined."""
    context = _ssl_context(info)
    await stream.send(SSLRequest())
    answer = await stream.recv_raw(2)
    if answer == b"N":
        if info.sslmode != "prefer":
            raise ConnectionFailed(f"server at {info.address} does not support SSL, "
                                   f"but SSL was required (sslmode={info.sslmode})")
        return False
    if answer[:1] == b"E":  # a server that predates SSL answers with an ErrorResponse
        stream.decoder.feed(answer)
        message = await stream.recv()
        raise _error(message) if isinstance(message, ErrorResponse) else ProtocolViolation(
            "invalid answer to SSLRequest")
    if answer != b"S":
        raise ProtocolViolation("received invalid response to SSL negotiation"
                                if answer[:1] != b"S" else
                                "received unencrypted data after SSL response")
    server_hostname = None if info.host.startswith("/") else info.host
    try:
        await stream.writer.start_tls(context, server_hostname=server_hostname)
    except (OSError, ssl.SSLError) as exc:
        raise _TLSFailed(f"SSL error connecting to {info.address}: {exc}") from exc
    return True


_METHOD_NAMES: dict[str, str] = {
    "password": "a cleartext password", "md5": "an MD5 password",
    "scram-sha-256": "SCRAM-SHA-256 authentication", "none": "no authentication",
}


def _check_method(info: ConnInfo, allowed: frozenset[str], method: str,
                  verified: bool) -> None:
    """Refuse, before anything is sent, a method the connection does not allow."""
    if method in allowed:
        return
    asked = _METHOD_NAMES[method]
    if info.require_auth is not None:
        raise AuthenticationFailed(
            f'authentication method requirement "{info.require_auth}" failed: the server at '
            f"{info.address} requested {asked}; nothing was sent")
    assert not verified  # without require_auth every method is allowed over verified TLS
    raise AuthenticationFailed(
        f"the server at {info.address} requested {asked} over a connection without TLS "
        "that verified its certificate: refused, the password was not sent",
        hint=f"Use TLS with a checked certificate (sslmode=verify-full, or verify-ca or "
             f"require with sslrootcert), or allow it explicitly with "
             f"require_auth={method} in the URI.")


async def _authenticate(conn_stream: MessageStream, info: ConnInfo, user: str,
                        password: str | None, notices: list[Notice], tls: bool) -> None:
    """Answer the server's authentication requests with the methods
    :func:`~zenith.pgwire.conninfo.allowed_auth` allows; SCRAM must end with the server's
    verified signature before AuthenticationOk is accepted."""
    # TLS counts only when it checked the server's certificate: without that, anyone in
    # the middle may be the other end of the encrypted connection.
    verified = tls and certificate_verified(info)
    allowed = allowed_auth(info, tls=verified)
    scram: ScramClientExchange | None = None
    scram_step = ""  # "first" sent, "final" sent, "verified" server signature checked
    authenticated = False

    def need_password() -> str:
        if password is None:
            raise AuthenticationFailed(
                f'password authentication requested by the server at {info.address}, '
                f'but no password was supplied for user "{user}"',
                hint="Give it in the URI, PGPASSWORD or ~/.pgpass.")
        return password

    while True:
        message = await conn_stream.recv()
        try:
            if isinstance(message, AuthenticationOk):
                if scram is not None and scram_step != "verified":
                    raise AuthenticationFailed(
                        f"the server at {info.address} ended SCRAM authentication without "
                        "proving that it knows the password (no valid server signature)")
                if not authenticated:
                    _check_method(info, allowed, "none", verified)
                return
            if (isinstance(message, AuthenticationCleartextPassword | AuthenticationMD5Password
                           | AuthenticationSASL)
                    and (authenticated or scram is not None)):
                raise ProtocolViolation(f"the server at {info.address} asked for "
                                        "authentication twice")
            if isinstance(message, AuthenticationCleartextPassword):
                _check_method(info, allowed, "password", verified)
                authenticated = True
                await conn_stream.send(PasswordMessage(need_password()))
            elif isinstance(message, AuthenticationMD5Password):
                _check_method(info, allowed, "md5", verified)
                authenticated = True
                response = md5_client_response(user, need_password(), message.salt)
                await conn_stream.send(PasswordMessage(response))
            elif isinstance(message, AuthenticationSASL) and scram is None:
                _check_method(info, allowed, "scram-sha-256", verified)
                if SCRAM_MECHANISM not in message.mechanisms:
                    raise FeatureNotSupported(
                        "none of the server's SASL authentication mechanisms are supported: "
                        + ", ".join(message.mechanisms))
                scram = ScramClientExchange(need_password())
                scram_step = "first"
                await conn_stream.send(SASLInitialResponse(SCRAM_MECHANISM, scram.client_first()))
            elif (isinstance(message, AuthenticationSASLContinue) and scram is not None
                  and scram_step == "first"):
                # PBKDF2 with the server's iteration count: off the event loop.
                final = await asyncio.to_thread(scram.client_final, message.data)
                scram_step = "final"
                await conn_stream.send(SASLResponse(final))
            elif (isinstance(message, AuthenticationSASLFinal) and scram is not None
                  and scram_step == "final"):
                scram.check_server_final(message.data)
                scram_step = "verified"
                authenticated = True
            elif isinstance(message, AuthenticationOther):
                raise FeatureNotSupported(
                    f"authentication method {message.code} requested by the server is not "
                    "supported (zenith supports SCRAM-SHA-256, MD5, password, trust)")
            elif isinstance(message, ErrorResponse):
                raise _error(message)
            elif isinstance(message, NoticeResponse):
                notices.append(Notice.from_message(message))
            elif isinstance(message, AuthenticationSASL | AuthenticationSASLContinue
                            | AuthenticationSASLFinal):
                raise ProtocolViolation(f"unexpected {type(message).__name__} from the server "
                                        f"at {info.address}: SCRAM messages out of order")
            elif not isinstance(message, NegotiateProtocolVersion):
                raise ProtocolViolation(f"unexpected {type(message).__name__} during "
                                        "authentication")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid SCRAM message from the server") from exc


async def _connect_once(info: ConnInfo, user: str, dbname: str, password: str | None,
                        use_tls: bool, extra: Mapping[str, str]) -> Connection:
    reader, writer = await _open(info)
    stream = MessageStream(reader, writer, Decoder(Sender.BACKEND),
                           peer_name=f"server at {info.address}")
    try:
        tls = await _negotiate_tls(stream, info) if use_tls else False
        params = {"user": user, "database": dbname, "client_encoding": "UTF8"}
        if info.application_name:
            params["application_name"] = info.application_name
        if info.options:
            params["options"] = info.options
        params.update(extra)
        await stream.send(StartupMessage.build(params))
        notices: list[Notice] = []
        await _authenticate(stream, info, user, password, notices, tls)
        parameters: dict[str, str] = {}
        key: tuple[int, int] | None = None
        while True:
            message = await stream.recv()
            if isinstance(message, ReadyForQuery):
                return Connection(stream, info, user, parameters, key, notices)
            if isinstance(message, ParameterStatus):
                parameters[message.name] = message.value
            elif isinstance(message, BackendKeyData):
                key = (message.process_id, message.secret_key)
            elif isinstance(message, NoticeResponse):
                notices.append(Notice.from_message(message))
            elif isinstance(message, ErrorResponse):
                raise _error(message)
            elif not isinstance(message, NegotiateProtocolVersion):
                raise ProtocolViolation(f"unexpected {type(message).__name__} during startup")
    except BaseException:
        await stream.close()
        raise


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError) as exc:
        raise InvalidArgument("no user name: give one in the URI or in PGUSER") from exc


async def connect(target: str | ConnInfo, *, timeout: float = 10.0,
                  startup_params: Mapping[str, str] | None = None) -> Connection:
    """Connect and authenticate, within ``timeout`` seconds (or the URI's shorter
    ``connect_timeout``) for everything: DNS, TCP, TLS, authentication, startup.
    ``startup_params`` are added to the StartupMessage (e.g. ``replication``)."""
    extra = dict(startup_params or {})
    info = parse_uri(target) if isinstance(target, str) else target
    user = info.user or os.environ.get("PGUSER") or _os_user()
    dbname = info.dbname or user
    password = lookup_password(info, user, dbname)
    limit = timeout if info.connect_timeout is None else min(timeout, info.connect_timeout)
    try:
        async with asyncio.timeout(limit):
            if info.sslmode == "disable":
                return await _connect_once(info, user, dbname, password, False, extra)
            if info.sslmode == "allow":
                try:
                    return await _connect_once(info, user, dbname, password, False, extra)
                except ZenithError as exc:
                    if isinstance(exc, ConnectionFailed):
                        raise
                    return await _connect_once(info, user, dbname, password, True, extra)
            try:
                return await _connect_once(info, user, dbname, password, True, extra)
            except _TLSFailed:
                if info.sslmode != "prefer":
                    raise
                return await _connect_once(info, user, dbname, password, False, extra)
    except TimeoutError as exc:
        raise ConnectionFailed(f"timeout expired connecting to {info.address} "
                               f"after {limit:g} s") from exc
