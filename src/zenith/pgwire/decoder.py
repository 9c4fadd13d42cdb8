"""The incremental decoder of PostgreSQL v3 messages (sans I/O).

:class:`Decoder` is fed chunks of bytes exactly as they come off a socket, in any split,
and hands back the complete messages of :mod:`zenith.pgwire.messages`. Two properties keep
a hostile peer harmless:

* every length prefix is checked (at least 4, at most a configurable maximum, exact for
  fixed-size messages, a known type byte) as soon as its header has arrived, before the
  body is buffered, so a header claiming 2 GiB fails at once instead of making us wait for,
  or allocate, 2 GiB;
* every body is parsed with bounds checks and must be consumed exactly; any mismatch is a
  :class:`~zenith.errors.ProtocolViolation` (SQLSTATE 08P01);
* once the server sets ``max_query_size`` (after sign-in) every message is bounded by it
  or by a small constant, but CopyData while a COPY IN/BOTH is open (``copy_in``); CopyData
  outside one (the tail of a COPY that failed on the server's side) is discarded as it
  arrives, never buffered.

A connection starts in the *startup* phase, where frontend packets have no type byte
(StartupMessage, SSLRequest, GSSENCRequest, CancelRequest); the decoder of frontend
messages switches to typed messages by itself after a StartupMessage. Message type bytes
mean different things in each direction (``D`` is DataRow from a backend but Describe from
a frontend), so a decoder is built for one :class:`~zenith.pgwire.messages.Sender`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from zenith.errors import ProtocolViolation, QueryTooLong
from zenith.pgwire.messages import (
    CANCEL_REQUEST_CODE,
    DEFAULT_MAX_MESSAGE_SIZE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_SIZE,
    SSL_REQUEST_CODE,
    AuthCode,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationResponse,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendType,
    BodyReader,
    CancelRequest,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    CopyResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    ExtendedQueryMessage,
    FieldDescription,
    Flush,
    FrontendType,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    OtherBackendMessage,
    ParameterStatus,
    Query,
    ReadyForQuery,
    RowDescription,
    Sender,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    TransactionStatus,
)

_U32 = struct.Struct("!I")


def _decode_startup(data: bytes) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    body = BodyReader(data, "startup packet")
    code = body.int32()
    if code == SSL_REQUEST_CODE:
        body.end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        body.end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        message = CancelRequest(body.int32(), body.int32())
        body.end()
        return message
    if code >> 16 != 3:
        # Another protocol's layout: keep only the version so the server can refuse it.
        return StartupMessage((), code)
    pairs: list[tuple[str, str]] = []
    while True:
        name = body.cstr()
        if not name:
            break
        pairs.append((name, body.cstr()))
    body.end()
    return StartupMessage(tuple(pairs), code)



# ---------------------------------------------------------------------------------------
# Body decoders, one per type byte and direction


def _empty(factory: Callable[[], Message]) -> Callable[[BodyReader], Message]:
    def decode(body: BodyReader) -> Message:
        body.end()
        return factory()

    return decode


def _one_cstr(factory: Callable[[str], Message]) -> Callable[[BodyReader], Message]:
    def decode(body: BodyReader) -> Message:
        value = body.cstr()
        body.end()
        return factory(value)

    return decode


def _decode_authentication(body: BodyReader) -> Message:
    code = body.int32()
    if code == AuthCode.OK:
        body.end()
        return AuthenticationOk()
    if code == AuthCode.CLEARTEXT_PASSWORD:
        body.end()
        return AuthenticationCleartextPassword()
    if code == AuthCode.MD5_PASSWORD:
        salt = body.take(4)
        body.end()
        return AuthenticationMD5Password(salt)
    if code == AuthCode.SASL:
        mechanisms = []
        while (name := body.cstr()) != "":
            mechanisms.append(name)
        body.end()
        return AuthenticationSASL(tuple(mechanisms))
    if code == AuthCode.SASL_CONTINUE:
        return AuthenticationSASLContinue(body.rest())
    if code == AuthCode.SASL_FINAL:
        return AuthenticationSASLFinal(body.rest())
    return AuthenticationOther(code, body.rest())


def _decode_fields(body: BodyReader) -> tuple[tuple[str, str], ...]:
    fields = []
    while (code := body.byte()) != 0:
        fields.append((chr(code), body.cstr()))  # chr() of a byte: latin-1, as encode()
    body.end()
    return tuple(fields)


def _decode_row_description(body: BodyReader) -> Message:
    count = body.int16()
    if count < 0:
        raise ProtocolViolation("invalid RowDescription message: negative field count")
    fields = []
    for _ in range(count):
        name = body.cstr()
        table_oid, column, type_oid, size, modifier, fmt = struct.unpack(
            "!IhIhih", body.take(18))
        fields.append(FieldDescription(name, type_oid, table_oid, column, size, modifier, fmt))
    body.end()
    return RowDescription(tuple(fields))


def _decode_data_row(body: BodyReader) -> Message:
    count = body.int16()
    if count < 0:
        raise ProtocolViolation("invalid DataRow message: negative column count")
    values: list[bytes | None] = []
    for _ in range(count):
        length = body.int32()
        values.append(None if length == -1 else body.take(length))
    body.end()
    return DataRow(tuple(values))


def _decode_copy_response(cls: type[CopyResponse]) -> Callable[[BodyReader], Message]:
    def decode(body: BodyReader) -> Message:
        fmt = body.byte()
        count = body.int16()
        if count < 0:
            raise ProtocolViolation("invalid copy response: negative column count")
        formats = tuple(body.int16() for _ in range(count))
        body.end()
        return cls(fmt, formats)  # type: ignore[return-value]

    return decode


def _decode_negotiate(body: BodyReader) -> Message:
    newest = body.int32()
    count = body.int32()
    if count < 0:
        raise ProtocolViolation("invalid NegotiateProtocolVersion: negative option count")
    options = tuple(body.cstr() for _ in range(count))
    body.end()
    return NegotiateProtocolVersion(newest, options)


def _decode_ready(body: BodyReader) -> Message:
    raw = body.take(1)
    body.end()
    try:
        return ReadyForQuery(TransactionStatus(raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolViolation(f"invalid ReadyForQuery status {raw!r}") from exc


def _decode_key_data(body: BodyReader) -> Message:
    message = BackendKeyData(body.int32(), body.int32())
    body.end()
    return message


def _extended(kind: FrontendType) -> Callable[[BodyReader], Message]:
    return lambda body: ExtendedQueryMessage(kind, body.rest())


def _other(kind: BackendType) -> Callable[[BodyReader], Message]:
    return lambda body: OtherBackendMessage(kind, body.rest())


def _parameter_status(body: BodyReader) -> Message:
    message = ParameterStatus(body.cstr(), body.cstr())
    body.end()
    return message


_FRONTEND_DECODERS: Final[Mapping[int, Callable[[BodyReader], Message]]] = {
    FrontendType.QUERY: _one_cstr(Query),
    FrontendType.TERMINATE: _empty(Terminate),
    FrontendType.PASSWORD: lambda body: AuthenticationResponse(body.rest()),
    FrontendType.COPY_DATA: lambda body: CopyData(body.rest()),
    FrontendType.COPY_DONE: _empty(CopyDone),
    FrontendType.COPY_FAIL: _one_cstr(CopyFail),
    FrontendType.SYNC: _empty(Sync),
    FrontendType.FLUSH: _empty(Flush),
    **{kind: _extended(kind) for kind in (
        FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE, FrontendType.EXECUTE,
        FrontendType.CLOSE, FrontendType.FUNCTION_CALL)},
}

_BACKEND_DECODERS: Final[Mapping[int, Callable[[BodyReader], Message]]] = {
    BackendType.AUTHENTICATION: _decode_authentication,
    BackendType.PARAMETER_STATUS: _parameter_status,
    BackendType.BACKEND_KEY_DATA: _decode_key_data,
    BackendType.READY_FOR_QUERY: _decode_ready,
    BackendType.ROW_DESCRIPTION: _decode_row_description,
    BackendType.DATA_ROW: _decode_data_row,
    BackendType.COMMAND_COMPLETE: _one_cstr(CommandComplete),
    BackendType.EMPTY_QUERY_RESPONSE: _empty(EmptyQueryResponse),
    BackendType.ERROR_RESPONSE: lambda body: ErrorResponse(_decode_fields(body)),
    BackendType.NOTICE_RESPONSE: lambda body: NoticeResponse(_decode_fields(body)),
    BackendType.COPY_IN_RESPONSE: _decode_copy_response(CopyInResponse),
    BackendType.COPY_OUT_RESPONSE: _decode_copy_response(CopyOutResponse),
    BackendType.COPY_BOTH_RESPONSE: _decode_copy_response(CopyBothResponse),
    BackendType.COPY_DATA: lambda body: CopyData(body.rest()),
    BackendType.COPY_DONE: _empty(CopyDone),
    BackendType.NEGOTIATE_PROTOCOL_VERSION: _decode_negotiate,
    **{kind: _other(kind) for kind in (
        BackendType.NOTIFICATION_RESPONSE, BackendType.PARSE_COMPLETE,
        BackendType.BIND_COMPLETE, BackendType.CLOSE_COMPLETE, BackendType.NO_DATA,
        BackendType.PARAMETER_DESCRIPTION, BackendType.PORTAL_SUSPENDED,
        BackendType.FUNCTION_CALL_RESPONSE)},
}

# Messages whose length is fixed by the protocol: anything else is a violation.
_FIXED_LENGTH: Final[Mapping[Sender, Mapping[int, int]]] = {
    Sender.FRONTEND: {FrontendType.TERMINATE: 4, FrontendType.COPY_DONE: 4,
                      FrontendType.SYNC: 4, FrontendType.FLUSH: 4},
    Sender.BACKEND: {BackendType.READY_FOR_QUERY: 5, BackendType.BACKEND_KEY_DATA: 12,
                     BackendType.COPY_DONE: 4, BackendType.EMPTY_QUERY_RESPONSE: 4},
}


_QUERY: Final = ord("Q")
_COPY_DATA: Final = ord("d")
#: After sign-in, messages that carry a query's text or its parameters: bounded by
#: ``max_query_size`` (54000); any other but CopyData by SMALL_MESSAGE_SIZE (08P01).
_QUERY_SIZED: Final = frozenset((FrontendType.QUERY, FrontendType.PARSE, FrontendType.BIND))
SMALL_MESSAGE_SIZE: Final = 65535


def _type_name(code: int) -> str:
    return repr(chr(code)) if 32 < code < 127 else str(code)


class Decoder:
    """Incremental decoder of the messages sent by one side of a connection.

    ``feed()`` appends bytes and checks the header of the next message at once;
    ``next()`` returns the next complete message or ``None`` when more bytes are needed.
    Both raise :class:`ProtocolViolation` on malformed input; the decoder is then unusable
    (the connection must be closed). ``max_message_size`` may be changed between messages
    (the server keeps it small until the client has authenticated). ``max_query_size``
    (frontend decoders, ``None``: no limit beyond ``max_message_size``; the server sets it
    at sign-in) bounds Query, Parse and Bind messages (:class:`QueryTooLong`, from the
    header) and puts every other message under ``SMALL_MESSAGE_SIZE`` -- but CopyData:
    while ``copy_in`` is true (the server is in COPY IN/BOTH) a CopyData may take
    ``max_message_size``; while it is false the CopyData messages are skipped, their bytes
    dropped as they arrive and nothing returned for them.
    """

    def __init__(self, sender: Sender, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_startup_size: int = MAX_STARTUP_PACKET_SIZE):
        self.sender = sender
        self.max_message_size = max_message_size
        self.max_startup_size = max_startup_size
        self.max_query_size: int | None = None
        #: True while the server reads COPY data (frontend decoders, after sign-in).
        self.copy_in = False
        self._skip = 0  # bytes still to drop of a skipped CopyData
        #: True while untyped startup packets are expected (frontend decoders only).
        self.in_startup = sender is Sender.FRONTEND
        self._decoders = _FRONTEND_DECODERS if sender is Sender.FRONTEND else _BACKEND_DECODERS
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = memoryview(data)[dropped:]
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        self._drop_skipped()

    def _skipped(self, code: int | None) -> bool:
        return code == _COPY_DATA and self.max_query_size is not None and not self.copy_in \
            and self.sender is Sender.FRONTEND

    def _drop_skipped(self) -> None:
        """Check the next header; drop what has arrived of CopyData messages outside COPY
        (the rest of such a message is dropped by feed() as it comes)."""
        while (header := self._header()) is not None and self._skipped(header[0]):
            size = header[1]
            avail = len(self._buf) - self._pos
            self._pos += min(size, avail)
            if avail < size:
                self._skip = size - avail
                del self._buf[: self._pos]
                self._pos = 0
                return

    def _header(self) -> tuple[int | None, int] | None:
        """Validate the next message's header if it has arrived: (type byte, total size)."""
        avail = len(self._buf) - self._pos
        if self.in_startup:
            if avail < 4:
                return None
            length = _U32.unpack_from(self._buf, self._pos)[0]
            if length < 8 or length > self.max_startup_size:
                raise ProtocolViolation(f"invalid length of startup packet: {length}")
            return None, length
        if avail < 5:
            return None
        code = self._buf[self._pos]
        length = _U32.unpack_from(self._buf, self._pos + 1)[0]
        if code not in self._decoders:
            raise ProtocolViolation(
                f"invalid {self.sender.value} message type {_type_name(code)}")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        if length > self.max_message_size - 1:
            raise ProtocolViolation(
                f"message of type {_type_name(code)} is too large: {length} bytes claimed, "
                f"limit {self.max_message_size}")
        if self.max_query_size is not None and self.sender is Sender.FRONTEND:
            self._check_signed_in(code, length)
        fixed = _FIXED_LENGTH[self.sender].get(code)
        if fixed is not None and length != fixed:
            raise ProtocolViolation(
                f"invalid length {length} for message type {_type_name(code)}")
        return code, length + 1

    def _check_signed_in(self, code: int, length: int) -> None:
        """The bounds after sign-in, from the header (``max_query_size`` is set)."""
        assert self.max_query_size is not None
        if code == _QUERY:
            if length - 5 > self.max_query_size:
                raise QueryTooLong(
                    f"query text is too long: {length - 5} bytes, limit {self.max_query_size}",
                    hint="the server sets it (max_query_size); COPY data is not limited by it")
        elif code in _QUERY_SIZED:
            if length - 4 > self.max_query_size:
                raise QueryTooLong(
                    f"message of type {_type_name(code)} is too long: {length - 4} bytes, "
                    f"limit {self.max_query_size}", hint="the server sets it (max_query_size)")
        elif code != _COPY_DATA and length - 4 > SMALL_MESSAGE_SIZE:
            raise ProtocolViolation(
                f"message of type {_type_name(code)} is too large: {length} bytes claimed, "
                f"limit {SMALL_MESSAGE_SIZE}")

    def next(self) -> Message | None:
        if self._skip:
            return None
        self._drop_skipped()
        if self._skip:
            return None
        header = self._header()
        if header is None:
            return None
        code, size = header
        if len(self._buf) - self._pos < size:
            return None
        start = self._pos
        self._pos += size
        if code is None:
            message: Message = _decode_startup(bytes(self._buf[start + 4 : start + size]))
            if isinstance(message, StartupMessage):
                self.in_startup = False
            return message
        with memoryview(self._buf) as view:  # one copy of the body, not two
            raw = bytes(view[start + 5 : start + size])
        body = BodyReader(raw, _type_name(code))
        return self._decoders[code](body)

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next()) is not None:
            yield message


