"""The server side of PostgreSQL v3 connections, for the pageserver.

The pageserver's commands are simple-query strings; this module does everything around
them: TLS negotiation, startup, authentication, the message loop, errors and COPY. It knows
nothing of storage -- the pageserver passes a :data:`QueryHandler` and a
:class:`Credentials` source. The API, kept stable for the pageserver:

``ServerConfig(auth_method="scram-sha-256" | "md5" | "password" | "trust" | "cert" |
"scram+cert", ssl_context=None,
server_version="15.0 (zenith)", parameters={...}, max_message_size=64 MiB,
max_startup_size=10000, auth_timeout=30.0, max_query_size=1 MiB, max_connections=256,
max_connections_per_user=64, reserved_connections=3, reserved_role="admin",
idle_timeout=300.0, statement_timeout=600.0)``
    The limits are described in docs/limits.md; a ``None`` timeout means none. ``cert``
    and ``scram+cert`` need TLS with a client certificate whose common name is the user
    name (``ssl_context`` must verify client certificates: CERT_OPTIONAL or REQUIRED);
    ``scram+cert`` asks for the password as well.
    ``parameters`` are sent as ParameterStatus after authentication (``server_version``
    and the client's ``application_name`` are filled in per connection).

``StoredUser(name, role, scram_verifier=None, md5_hash=None)``, ``Credentials`` (a
Protocol with ``lookup(user) -> StoredUser | None``), ``InMemoryCredentials``,
``make_scram_verifier(password)``, ``make_md5_hash(user, password)``
    re-exported from :mod:`zenith.pgwire.auth`.

``QueryHandler = Callable[[Session, str], Awaitable[None]]``
    Called once per simple Query with the whole query string (never an empty one: that is
    answered with EmptyQueryResponse). It answers through the :class:`Session`:
    ``await send_rows(columns, rows, tag)``, ``await send_command_complete(tag)``,
    ``await send_notice(message, severity="NOTICE")`` (flushed at once: progress),
    ``await copy_both() / copy_out() / copy_in()`` returning a :class:`CopyStream` with
    ``read() -> bytes | None``, ``write(data)``, ``done()``. A :class:`ZenithError` it
    raises becomes an ErrorResponse with that SQLSTATE, message, detail and hint; any other
    exception is logged and becomes ``XX000 internal error``. Either way the connection
    stays usable and ReadyForQuery follows. A handler that returns without completing its
    result gets a CommandComplete whose tag is the query's first word in upper case.

``serve_connection(reader, writer, *, config, credentials, handler, on_cancel=None,
cancel_registry=None)``
    Serves one connection until the client leaves; never raises (but for cancellation)
    and always closes the writer. ``reader``/``writer`` must come from
    ``asyncio.start_server`` for TLS to work (``StreamWriter.start_tls`` takes the server
    role from there).

``start_server(host, port, *, config, credentials, handler, on_cancel=None, backlog=512,
cancel_registry=None, slots=None) -> asyncio.Server`` and ``close_server(server)``
    Listen, serve every connection with ``serve_connection`` (CancelRequests cancel the
    running handler of the matching connection, which then answers 57014), and stop.

Only the simple query protocol is spoken. Extended-protocol messages get a 0A000
ErrorResponse, after which everything up to Sync is discarded and Sync is answered with
ReadyForQuery, so a client trying prepared statements gets an error and never hangs.
Malformed input gets a FATAL 08P01 ErrorResponse (when it can still be sent) and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from zenith.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    FeatureNotSupported,
    ProtocolViolation,
    ServerError,
    TooManyConnections,
    ZenithError,
)
from zenith.pgwire.auth import (
    SCRAM_MECHANISM,
    Credentials,
    InMemoryCredentials,
    ScramServerExchange,
    ScramVerifier,
    StoredUser,
    check_md5_response,
    check_password,
    make_md5_hash,
    make_scram_verifier,
)
from zenith.pgwire.conninfo import mask_text
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_STARTUP_PACKET_SIZE,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationResponse,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    CopyData,
    CopyDone,
    CopyFail,
    EmptyQueryResponse,
    ErrorResponse,
    ExtendedQueryMessage,
    Flush,
    FrontendType,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    ParameterStatus,
    Query,
    ReadyForQuery,
    Sender,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
)
from zenith.pgwire.session import CopyStream, QueryHandler, Session
from zenith.pgwire.stream import MessageStream

__all__ = [
    "CancelRegistry",
    "ConnectionSlots",
    "CopyStream",
    "Credentials",
    "InMemoryCredentials",
    "QueryHandler",
    "ServerConfig",
    "ServerState",
    "Session",
    "StoredUser",
    "clip",
    "close_server",
    "make_md5_hash",
    "make_scram_verifier",
    "serve_connection",
    "start_server",
]

logger = logging.getLogger(__name__)

AUTH_METHODS: Final = ("scram-sha-256", "md5", "password", "trust", "cert", "scram+cert")
#: Methods that need a client certificate (TLS with ``ssl_context.verify_mode`` at least
#: CERT_OPTIONAL and the CA loaded): the user name must equal the certificate's CN.
CERT_METHODS: Final = ("cert", "scram+cert")
# Until a client has authenticated, no message may be larger than this (PostgreSQL's
# PG_MAX_AUTH_TOKEN_LENGTH): an anonymous peer cannot make us buffer 64 MiB.
PRE_AUTH_MAX_MESSAGE_SIZE: Final = 65535
#: Seconds between checks, while a command runs, that its client is still connected.
CLIENT_CHECK_INTERVAL: Final = 0.25
#: Client-supplied text an error quotes (a name, a command word) is cut to this length.
ECHO_LIMIT: Final = 200
#: No field of an ErrorResponse is longer (a net under the clip() of every known echo).
MAX_ERROR_FIELD: Final = 2000


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error may quote it: its first ``limit`` characters, and how many
    more there were, so an error never carries much of what a client sent."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def default_parameters() -> dict[str, str]:
    return {
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "IntervalStyle": "postgres",
        "TimeZone": "UTC",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "is_superuser": "off",
    }


@dataclass
class ServerConfig:
    auth_method: str = "scram-sha-256"
    ssl_context: ssl.SSLContext | None = None
    server_version: str = "15.0 (zenith)"
    parameters: dict[str, str] = field(default_factory=default_parameters)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_startup_size: int = MAX_STARTUP_PACKET_SIZE
    auth_timeout: float = 30.0
    #: After sign-in: the text of one Query (COPY data is bounded by max_message_size).
    max_query_size: int = 1024 * 1024
    #: Connections at once, signing in or signed in; one more is refused at once (53300).
    max_connections: int = 256
    #: Signed-in connections of one user; users of ``reserved_role`` are exempt.
    max_connections_per_user: int = 64
    #: Of ``max_connections``, slots only users of ``reserved_role`` may take.
    reserved_connections: int = 3
    reserved_role: str = "admin"
    #: False for a server's other listen addresses: their connections, signed in or not,
    #: never take the ``reserved_connections`` slots (connections are counted together when
    #: the listeners share one :class:`ConnectionSlots`).
    admin_listener: bool = True
    #: Seconds a signed-in connection may wait between commands (57P05 FATAL after);
    #: ``None`` or 0: no limit (PostgreSQL's idle_session_timeout = 0).
    idle_timeout: float | None = 300.0
    #: Seconds a command may run with nothing read or sent (57014 after).
    statement_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        if self.auth_method not in AUTH_METHODS:
            raise ValueError(f"unknown auth_method {self.auth_method!r}: "
                             f"expected one of {', '.join(AUTH_METHODS)}")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.auth_method in CERT_METHODS and (
                self.ssl_context is None or self.ssl_context.verify_mode == ssl.CERT_NONE):
            raise ValueError(f"auth_method {self.auth_method} needs an ssl_context that "
                             "asks for client certificates")


class ServerState(Enum):
    """Where a connection is in the protocol; each message is handled for its state."""

    STARTUP = auto()  # untyped packets: SSLRequest, GSSENCRequest, StartupMessage
    AUTHENTICATING = auto()  # waiting for password / SASL messages
    IDLE = auto()  # ReadyForQuery sent, waiting for a Query
    QUERY = auto()  # the handler is running (it may be in COPY: see SessionState)
    SKIP_TO_SYNC = auto()  # after an extended-protocol message: discard until Sync
    CLOSED = auto()


class ConnectionSlots:
    """Connections of one server, counted for ``max_connections`` and the per-user and
    reserved limits (PostgreSQL's max_connections, rolconnlimit and
    reserved_connections)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_user: dict[str, int] = {}
        self.refused = 0  # at accept time, since the last log line about it
        self._logged_at = float("-inf")

    def note_refusal(self) -> int:
        """Count one connection refused at accept time; returns how many to log now (at
        most one log line every 10 s, so a flood does not flood the log), else 0."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at < 10.0:
            return 0
        count, self.refused, self._logged_at = self.refused, 0, now
        return count

    def open(self, config: ServerConfig) -> None:
        # A listener other than the admin's stops short of the reserved slots even before
        # sign-in: anonymous peers there cannot fill the slots the local CLI needs.
        limit = config.max_connections - (0 if config.admin_listener
                                          else config.reserved_connections)
        if self.total >= limit:
            raise TooManyConnections("sorry, too many clients already")
        self.total += 1

    def sign_in(self, config: ServerConfig, user: StoredUser) -> None:
        """Check the limits that depend on the user; on success the user's slot is held
        until :meth:`close`."""
        if user.role != config.reserved_role:
            if self.total > config.max_connections - config.reserved_connections:
                raise TooManyConnections(
                    "remaining connection slots are reserved for users with role "
                    f'"{config.reserved_role}"')
            if self.per_user.get(user.name, 0) >= config.max_connections_per_user:
                raise TooManyConnections(f'too many connections for role "{user.name}"')
        self.per_user[user.name] = self.per_user.get(user.name, 0) + 1

    def close(self, user: StoredUser | None) -> None:
        self.total -= 1
        if user is not None:
            left = self.per_user.get(user.name, 0) - 1
            if left > 0:
                self.per_user[user.name] = left
            else:
                self.per_user.pop(user.name, None)


class CancelRegistry:
    """Backend keys of live connections, so a CancelRequest (which arrives on a new
    connection) can find the query it cancels."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, _Connection]] = {}

    def register(self, conn: _Connection) -> tuple[int, int]:
        while (pid := secrets.randbelow(2**31 - 2) + 1) in self._entries:
            pass
        secret = secrets.randbelow(2**31)
        self._entries[pid] = (secret, conn)
        return pid, secret

    def unregister(self, pid: int) -> None:
        self._entries.pop(pid, None)

    def cancel(self, pid: int, secret: int) -> bool:
        entry = self._entries.get(pid)
        if entry is None or not secrets.compare_digest(
                entry[0].to_bytes(4, "big"), (secret & 0xFFFFFFFF).to_bytes(4, "big")):
            return False
        return entry[1].cancel_query()


def _is_empty_query(sql: str) -> bool:
    return not sql.replace(";", " ").strip()


def _default_tag(sql: str) -> str:
    words = sql.split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 config: ServerConfig, credentials: Credentials, handler: QueryHandler,
                 registry: CancelRegistry, on_cancel: Callable[[int, int], None] | None,
                 slots: ConnectionSlots):
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "client")
        decoder = Decoder(Sender.FRONTEND, max_startup_size=config.max_startup_size,
                          max_message_size=min(config.max_message_size,
                                               PRE_AUTH_MAX_MESSAGE_SIZE))
        self.stream = MessageStream(reader, writer, decoder, peer_name=f"client {self.peer}")
        self.config = config
        self.credentials = credentials
        self.handler = handler
        self.registry = registry
        self.on_cancel = on_cancel
        self.slots = slots
        self.state = ServerState.STARTUP
        self.tls = False
        self.session: Session | None = None
        self._query_task: asyncio.Task[None] | None = None
        self._cancel_requested = False
        self._timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._client_watch: asyncio.TimerHandle | None = None
        self._client_left = False

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        pid: int | None = None
        try:
            self.slots.open(self.config)
        except TooManyConnections as exc:
            # Refused before reading anything: a flood costs no buffers (libpq reports an
            # ErrorResponse that answers its SSLRequest or startup packet alike).
            if count := self.slots.note_refusal():
                logger.warning("%d connection(s) refused (last from %s): %s", count,
                               self.peer, exc.message)
            await self._fatal(_error_from(exc, "FATAL"))
            await self.stream.close()
            return
        signed_in: StoredUser | None = None
        try:
            try:
                async with asyncio.timeout(self.config.auth_timeout):
                    startup = await self._startup()
                    if startup is None:
                        return
                    user = await self._authenticate(startup)
            except TimeoutError:
                await self._fatal(ErrorResponse.build(
                    "57014", "canceling authentication due to timeout", severity="FATAL"))
                return
            self.slots.sign_in(self.config, user)
            signed_in = user
            pid, secret = self.registry.register(self)
            await self._ready(startup, user, pid, secret)
            await self._command_loop()
        except ConnectionFailed:
            if self.stream.broken is None:
                raise  # not our connection: cannot happen outside a handler
            logger.debug("connection from %s closed", self.peer)
        except ProtocolViolation as exc:
            logger.info("protocol violation from %s: %s", self.peer, exc.message)
            await self._fatal(_error_from(exc, "FATAL"))
        except ZenithError as exc:  # authentication and startup refusals
            logger.info("connection from %s refused: %s", self.peer, exc.message)
            await self._fatal(_error_from(exc, "FATAL"))
        except Exception:  # a bug here or in the credentials source: say so, then close
            logger.exception("internal error serving %s", self.peer)
            await self._fatal(ErrorResponse.build("XX000", "internal error", severity="FATAL"))
        finally:
            self.state = ServerState.CLOSED
            self.slots.close(signed_in)
            if pid is not None:
                self.registry.unregister(pid)
            await self.stream.close()

    async def _fatal(self, error: ErrorResponse) -> None:
        if isinstance(self.stream.broken, ConnectionFailed):
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.stream.send(error)

    # -- startup --------------------------------------------------------------------

    async def _startup(self) -> StartupMessage | None:
        ssl_seen = gss_seen = False
        while True:
            message = await self.stream.recv()
            if isinstance(message, SSLRequest):
                if ssl_seen or self.tls:
                    raise ProtocolViolation("duplicate SSL negotiation request")
                ssl_seen = True
                await self._negotiate_tls()
            elif isinstance(message, GSSENCRequest):
                if gss_seen:
                    raise ProtocolViolation("duplicate GSSENC negotiation request")
                gss_seen = True
                self.stream.write_raw(b"N")
                await self.stream.drain()
            elif isinstance(message, CancelRequest):
                self._handle_cancel(message)
                return None
            elif isinstance(message, StartupMessage):
                await self._check_version(message)
                return message
            else:  # pragma: no cover - the startup decoder yields nothing else
                raise ProtocolViolation("unexpected startup packet")

    async def _negotiate_tls(self) -> None:
        # Bytes after the SSLRequest would be plaintext injected ahead of the handshake
        # (CVE-2021-23214).
        if self.stream.decoder.buffered:
            raise ProtocolViolation("received unencrypted data after SSL request")
        if self.config.ssl_context is None:
            self.stream.write_raw(b"N")
            await self.stream.drain()
            return
        self.stream.write_raw(b"S")
        self.stream.flush()  # the 'S' must go out before the handshake starts
        try:
            await self.stream.writer.start_tls(self.config.ssl_context)
        except (OSError, ssl.SSLError) as exc:
            # At INFO: a client certificate refused (unknown CA, expired) shows here.
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            logger.info("TLS handshake with %s failed: %s", self.peer, reason)
            self.stream.broken = ConnectionFailed(f"TLS handshake with {self.peer} failed")
            raise self.stream.broken from exc
        self.tls = True

    async def _check_version(self, startup: StartupMessage) -> None:
        major, minor = startup.protocol_version >> 16, startup.protocol_version & 0xFFFF
        if major != 3:
            raise FeatureNotSupported(
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
        unknown_options = tuple(k for k, _ in startup.parameters if k.startswith("_pq_."))
        if minor > 0 or unknown_options:
            await self.stream.send(NegotiateProtocolVersion(0, unknown_options))

    def _handle_cancel(self, request: CancelRequest) -> None:
        found = self.registry.cancel(request.process_id, request.secret_key)
        logger.debug("cancel request for backend %d from %s (%s)", request.process_id,
                     self.peer, "matched" if found else "no match")
        if self.on_cancel is not None:
            try:
                self.on_cancel(request.process_id, request.secret_key)
            except Exception:
                logger.exception("on_cancel callback failed")

    def cancel_query(self) -> bool:
        task = self._query_task
        if task is None or task.done():
            return False
        self._cancel_requested = True
        task.cancel()
        return True

    # -- authentication -------------------------------------------------------------

    async def _authenticate(self, startup: StartupMessage) -> StoredUser:
        self.state = ServerState.AUTHENTICATING
        name = startup.params.get("user", "")
        if not name:
            raise ServerError("no PostgreSQL user name specified in startup packet",
                              sqlstate="28000")
        shown = clip(name)  # the startup packet may carry a 10,000-byte name
        user = self.credentials.lookup(name)
        method = self.config.auth_method
        if method in CERT_METHODS:
            self._check_certificate(name, shown)
            if method == "cert":
                if user is None:
                    raise ServerError(f'role "{shown}" does not exist', sqlstate="28000")
                return user
            method = "scram-sha-256"
        if method == "trust":
            if user is None:
                raise ServerError(f'role "{shown}" does not exist', sqlstate="28000")
            return user
        if method == "md5" and user is not None and user.md5_hash is None:
            method = "scram-sha-256"  # as PostgreSQL does for a SCRAM-only user under md5
        if method == "scram-sha-256":
            ok = await self._auth_scram(name, user)
        elif method == "md5":
            ok = await self._auth_md5(user)
        else:
            ok = await self._auth_password(name, user)
        if not ok or user is None:
            raise AuthenticationFailed(f'password authentication failed for user "{shown}"')
        return user

    def _check_certificate(self, name: str, shown: str) -> None:
        """For ``cert`` and ``scram+cert``: the connection is TLS, the client sent a
        certificate the CA signed (the handshake verified it), and its common name is the
        user name asked for (PostgreSQL's clientcert=verify-full)."""
        if not self.tls:
            raise ServerError(
                "connection requires TLS with a client certificate",
                sqlstate="28000",
                hint="connect with sslmode=verify-full (or require), sslcert and sslkey")
        ssl_object = self.stream.writer.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if not cert:
            raise ServerError("connection requires a valid client certificate",
                              sqlstate="28000", hint="connect with sslcert and sslkey")
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
        if len(names) != 1 or names[0] != name:
            logger.info("%s: certificate common name %s does not match user %r", self.peer,
                        ", ".join(repr(clip(n)) for n in names) or "(none)", clip(name))
            raise ServerError(f'certificate authentication failed for user "{shown}"',
                              sqlstate="28000")

    async def _auth_response(self) -> AuthenticationResponse:
        message = await self.stream.recv()
        if isinstance(message, AuthenticationResponse):
            return message
        if isinstance(message, Terminate):
            self.stream.broken = ConnectionFailed("client ended the authentication")
            raise self.stream.broken
        raise ProtocolViolation(
            f"expected password response, got message type {type(message).__name__}")

    async def _auth_scram(self, name: str, user: StoredUser | None) -> bool:
        verifier = None
        if user is not None and user.scram_verifier is not None:
            try:
                verifier = ScramVerifier.parse(user.scram_verifier)
            except ValueError:
                logger.warning("user %r has an invalid SCRAM verifier", name)
        exchange = ScramServerExchange(verifier, name)  # a mock when verifier is None
        await self.stream.send(AuthenticationSASL((SCRAM_MECHANISM,)))
        initial = (await self._auth_response()).to_sasl_initial()
        if initial.mechanism != SCRAM_MECHANISM:
            raise ProtocolViolation(
                "client selected an invalid SASL authentication mechanism",
                detail=f"Mechanism {clip(initial.mechanism)!r}; this server offers "
                       f"{SCRAM_MECHANISM}.")
        if initial.data is None:
            raise ProtocolViolation("malformed SCRAM message: empty client-first message")
        await self.stream.send(AuthenticationSASLContinue(exchange.client_first(initial.data)))
        final = exchange.client_final((await self._auth_response()).to_sasl_response().data)
        if final is None:
            return False
        self.stream.write(AuthenticationSASLFinal(final))
        return True

    async def _auth_md5(self, user: StoredUser | None) -> bool:
        salt = secrets.token_bytes(4)
        await self.stream.send(AuthenticationMD5Password(salt))
        response = (await self._auth_response()).to_password().password
        return user is not None and check_md5_response(user.md5_hash, salt, response)

    async def _auth_password(self, name: str, user: StoredUser | None) -> bool:
        await self.stream.send(AuthenticationCleartextPassword())
        password = (await self._auth_response()).to_password().password
        if user is None:
            return False
        # PBKDF2 with the verifier's iteration count: off the event loop.
        return await asyncio.to_thread(check_password, password,
                                       scram_verifier=user.scram_verifier,
                                       md5_hash=user.md5_hash, user=name)

    async def _ready(self, startup: StartupMessage, user: StoredUser, pid: int,
                     secret: int) -> None:
        params = startup.params
        application_name = params.get("application_name", "")
        self.session = Session(self.stream, user=user, database=params.get("database") or
                               user.name, application_name=application_name,
                               parameters=params, backend_pid=pid, peer=self.peer,
                               tls=self.tls)
        status = dict(self.config.parameters)
        status["server_version"] = self.config.server_version
        status["application_name"] = application_name
        status.setdefault("session_authorization", user.name)
        self.stream.decoder.max_message_size = self.config.max_message_size
        self.stream.decoder.max_query_size = self.config.max_query_size
        self.stream.write(AuthenticationOk(),
                          *(ParameterStatus(k, v) for k, v in status.items()),
                          BackendKeyData(pid, secret), ReadyForQuery())
        await self.stream.drain()
        self.state = ServerState.IDLE
        logger.debug("%s authenticated as %r from %s", self.peer, user.name,
                     "TLS" if self.tls else "plain TCP")

    # -- commands -------------------------------------------------------------------

    async def _command_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.config.idle_timeout or None):  # 0: off
                    message = await self.stream.recv()
            except TimeoutError:
                logger.info("%s: idle-session timeout", self.peer)
                await self._fatal(ErrorResponse.build(
                    "57P05", "terminating connection due to idle-session timeout",
                    severity="FATAL"))
                return
            if isinstance(message, Terminate):
                return
            if self.state is ServerState.SKIP_TO_SYNC:
                if isinstance(message, Sync):
                    self.state = ServerState.IDLE
                    await self.stream.send(ReadyForQuery())
                continue
            await self._dispatch(message)
            if self.stream.broken is not None:
                raise self.stream.broken

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Query):
            await self._run_query(message.sql)
        elif isinstance(message, Sync):
            await self.stream.send(ReadyForQuery())
        elif isinstance(message, Flush):
            await self.stream.drain()
        elif isinstance(message, ExtendedQueryMessage):
            if message.kind is FrontendType.FUNCTION_CALL:
                await self.stream.send(ErrorResponse.build(
                    FeatureNotSupported.sqlstate, "function call protocol is not supported"),
                    ReadyForQuery())
                return
            self.state = ServerState.SKIP_TO_SYNC
            await self.stream.send(ErrorResponse.build(
                FeatureNotSupported.sqlstate, "extended query protocol is not supported",
                hint="Use the simple query protocol (psql, or psycopg with "
                     "ClientCursor or execute() without parameters)."))
        elif isinstance(message, CopyData | CopyDone | CopyFail):
            pass  # the tail of a COPY that failed on our side: dropped, as PostgreSQL does
        else:
            raise ProtocolViolation(f"unexpected message {type(message).__name__} "
                                    "outside of authentication")

    async def _run_query(self, sql: str) -> None:
        assert self.session is not None
        if _is_empty_query(sql):
            await self.stream.send(EmptyQueryResponse(), ReadyForQuery())
            return
        self.state = ServerState.QUERY
        session = self.session
        session._begin(sql)
        self._cancel_requested = False

        # The handler runs in this connection's own task (no task per query: a round trip
        # costs less); a CancelRequest cancels this task while ``_query_task`` is set, and
        # the cancellation is taken back here.
        task = asyncio.current_task()
        assert task is not None
        self._query_task = task
        self._timed_out = False
        self._watch_statement(task, time.monotonic())
        self._client_left = False
        self._watch_client(task)
        error: ErrorResponse | None = None
        try:
            await self.handler(session, sql)
        except asyncio.CancelledError:
            if not (self._cancel_requested or self._timed_out or self._client_left) \
                    or task.cancelling() > 1:
                raise
            task.uncancel()
            if self._client_left:
                self.stream.broken = ConnectionFailed(
                    f"client {self.peer} closed the connection during a command")
            error = ErrorResponse.build("57014", "canceling statement due to statement timeout"
                                        if self._timed_out else
                                        "canceling statement due to user request")
        except ZenithError as exc:
            error = _error_from(exc, "ERROR")
        except Exception:
            if self.stream.broken is None:
                # Only the command word: arguments may carry URIs with passwords.
                logger.exception("internal error in query handler for %r command",
                                 (sql.split(None, 1) or [""])[0][:64])
            error = ErrorResponse.build("XX000", "internal error")
        finally:
            self._query_task = None
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            if self._client_watch is not None:
                self._client_watch.cancel()
                self._client_watch = None
        if self.stream.broken is not None:
            raise self.stream.broken  # the client is gone or broke the protocol
        if error is not None:
            session._abort()
            self.stream.write(error)
        else:
            await session._finish(_default_tag(sql))
        self.stream.write(ReadyForQuery())
        await self.stream.drain()
        self.state = ServerState.IDLE

    def _watch_client(self, task: asyncio.Task[None]) -> None:
        """Every CLIENT_CHECK_INTERVAL seconds while a command runs: a client that closed
        its side (end of stream, or a reset) cancels the command, as PostgreSQL's
        client_connection_check_interval does, so its worker thread stops instead of
        running on for nobody."""
        loop = asyncio.get_running_loop()
        reader, transport = self.stream.reader, self.stream.writer.transport

        def check() -> None:
            if self._query_task is not task:
                return
            # StreamReader records the end of stream when it arrives, read or not.
            if transport.is_closing() or reader.at_eof() or getattr(reader, "_eof", False):
                logger.info("%s: client left during a command; cancelling it", self.peer)
                self._client_left = True
                task.cancel()
                return
            self._client_watch = loop.call_later(CLIENT_CHECK_INTERVAL, check)

        self._client_watch = loop.call_later(CLIENT_CHECK_INTERVAL, check)

    def _watch_statement(self, task: asyncio.Task[None], started: float) -> None:
        """Cancel ``task`` once nothing was read or sent for ``statement_timeout``
        seconds: a command that reports progress (or streams data) runs as long as it
        needs; a stuck one does not hold the connection forever."""
        limit = self.config.statement_timeout
        if limit is None:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self._query_task is not task:
                return
            silent = time.monotonic() - max(started, self.stream.last_activity)
            if silent >= limit:
                logger.info("%s: statement timeout after %.0f s of silence", self.peer, silent)
                self._timed_out = True
                task.cancel()
                return
            self._watchdog = loop.call_later(limit - silent, check)

        self._watchdog = loop.call_later(limit, check)


def _error_from(exc: ZenithError, severity: str) -> ErrorResponse:
    # No password ever leaves in an error, whatever the handler put in it; and no field is
    # longer than MAX_ERROR_FIELD (masked first: a cut could hide a URI from the mask).
    return ErrorResponse.build(
        exc.sqlstate, clip(mask_text(exc.message), MAX_ERROR_FIELD), severity=severity,
        detail=clip(mask_text(exc.detail), MAX_ERROR_FIELD) if exc.detail else exc.detail,
        hint=clip(mask_text(exc.hint), MAX_ERROR_FIELD) if exc.hint else exc.hint)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                           config: ServerConfig, credentials: Credentials,
                           handler: QueryHandler,
                           on_cancel: Callable[[int, int], None] | None = None,
                           cancel_registry: CancelRegistry | None = None,
                           slots: ConnectionSlots | None = None) -> None:
    """Serve one client connection to its end; always closes ``writer``.

    ``on_cancel(pid, secret)`` is told of every CancelRequest; ``cancel_registry`` (shared
    by the connections of one server) lets such a request cancel the matching
    connection's running query; ``slots`` (shared likewise) counts them for the
    connection limits.
    """
    conn = _Connection(reader, writer, config, credentials, handler,
                       cancel_registry or CancelRegistry(), on_cancel,
                       slots or ConnectionSlots())
    try:
        await conn.run()
    except Exception:
        logger.exception("unexpected error serving %s", conn.peer)
        await conn.stream.close()


_SERVER_TASKS: weakref.WeakKeyDictionary[asyncio.Server, set[asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary())


async def start_server(host: str | None, port: int, *, config: ServerConfig,
                       credentials: Credentials, handler: QueryHandler,
                       on_cancel: Callable[[int, int], None] | None = None,
                       backlog: int = 512, cancel_registry: CancelRegistry | None = None,
                       slots: ConnectionSlots | None = None) -> asyncio.Server:
    """Listen on ``host:port`` (port 0: any free port, see ``server.sockets``).
    Servers on several addresses share one ``cancel_registry`` and one ``slots`` (so
    ``max_connections`` counts them all)."""
    registry = cancel_registry or CancelRegistry()
    slots = slots or ConnectionSlots()
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await serve_connection(reader, writer, config=config, credentials=credentials,
                                   handler=handler, on_cancel=on_cancel,
                                   cancel_registry=registry, slots=slots)
        except asyncio.CancelledError:
            # close_server() ended the connection. Ending the task normally matters:
            # asyncio 3.11 logs a cancelled client_connected_cb task as an error.
            pass
        finally:
            if task is not None:
                tasks.discard(task)

    server = await asyncio.start_server(on_connect, host, port, backlog=backlog)
    _SERVER_TASKS[server] = tasks
    return server


async def close_server(server: asyncio.Server, *, grace: float = 1.0) -> None:
    """Stop listening, give open connections ``grace`` seconds, then cancel them."""
    server.close()
    tasks = set(_SERVER_TASKS.get(server, ()))
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)
    await server.wait_closed()
