"""PostgreSQL v3 wire-protocol messages: a codec with no I/O in it.

Server and client share this one module. Each message is a frozen dataclass with an
``encode()`` method that returns its bytes on the wire; a :class:`Decoder` is fed chunks of
bytes exactly as they come off a socket (in any split) and hands back complete messages.
Nothing here (nor in ``decoder.py``) reads or writes a socket, so the codec is unit-tested
and fuzzed without one; ``server.py`` and ``client.py`` only drive it from asyncio streams.

The incremental :class:`~zenith.pgwire.decoder.Decoder` lives in ``decoder.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, StrEnum
from typing import Final, TypeAlias

from zenith.errors import ProtocolViolation

PROTOCOL_VERSION_3_0: Final = 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

#: PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET_SIZE: Final = 10000
#: Default ceiling for one typed message (header included).
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024

TYPE_OID_BYTEA: Final = 17
TYPE_OID_TEXT: Final = 25

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")


class Sender(Enum):
    """Which side of the connection sent the bytes a decoder is fed."""

    FRONTEND = "frontend"
    BACKEND = "backend"


class FrontendType(IntEnum):
    """Type bytes of typed messages sent by a frontend (client)."""

    QUERY = ord("Q")
    TERMINATE = ord("X")
    PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    PARSE = ord("P")
    BIND = ord("B")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    SYNC = ord("S")
    FLUSH = ord("H")
    CLOSE = ord("C")
    FUNCTION_CALL = ord("F")


class BackendType(IntEnum):
    """Type bytes of typed messages sent by a backend (server)."""

    AUTHENTICATION = ord("R")
    PARAMETER_STATUS = ord("S")
    BACKEND_KEY_DATA = ord("K")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")
    DATA_ROW = ord("D")
    COMMAND_COMPLETE = ord("C")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    NOTICE_RESPONSE = ord("N")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    NOTIFICATION_RESPONSE = ord("A")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    PARSE_COMPLETE = ord("1")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    NO_DATA = ord("n")
    PARAMETER_DESCRIPTION = ord("t")
    PORTAL_SUSPENDED = ord("s")
    FUNCTION_CALL_RESPONSE = ord("V")


class AuthCode(IntEnum):
    """The int32 that follows the 'R' type byte."""

    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    SCM_CREDENTIAL = 6
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class TransactionStatus(StrEnum):
    """The status byte of ReadyForQuery."""

    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


# ---------------------------------------------------------------------------------------
# Encoding helpers


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise ValueError(f"a protocol string cannot contain a NUL character: {text!r}")
    return raw + b"\0"


def _typed(code: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(bytes((code,)), len(payload) + 4) + payload


def _untyped(payload: bytes) -> bytes:
    return _U32.pack(len(payload) + 4) + payload


# ---------------------------------------------------------------------------------------
# Decoding helper: a bounds-checked cursor over one message body (used by decoder.py)


class BodyReader:
    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str):
        self._data = data
        self._pos = 0
        self._what = what

    def _fail(self, why: str) -> ProtocolViolation:
        return ProtocolViolation(f"invalid {self._what} message: {why}")

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise self._fail("truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def int16(self) -> int:
        value: int = _I16.unpack(self.take(2))[0]
        return value

    def int32(self) -> int:
        value: int = _I32.unpack(self.take(4))[0]
        return value

    def byte(self) -> int:
        return self.take(1)[0]

    def cstr(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise self._fail("unterminated string")
        raw = self._data[self._pos : end]
        self._pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail("invalid UTF-8 in string") from exc

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self._fail(f"{len(self._data) - self._pos} unexpected trailing bytes")


# ---------------------------------------------------------------------------------------
# Startup-phase (untyped) frontend messages


@dataclass(frozen=True)
class StartupMessage:
    """The first packet of a session. ``parameters`` keeps the wire order of the pairs."""

    parameters: tuple[tuple[str, str], ...] = ()
    protocol_version: int = PROTOCOL_VERSION_3_0

    @classmethod
    def build(cls, parameters: Mapping[str, str]) -> StartupMessage:
        return cls(tuple(parameters.items()))

    @property
    def params(self) -> dict[str, str]:
        return dict(self.parameters)

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol_version)
        body += b"".join(_cstr(k) + _cstr(v) for k, v in self.parameters) + b"\0"
        return _untyped(body)


@dataclass(frozen=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _untyped(_I32.pack(SSL_REQUEST_CODE))


@dataclass(frozen=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _untyped(_I32.pack(GSSENC_REQUEST_CODE))


@dataclass(frozen=True)
class CancelRequest:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return _untyped(_I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(self.process_id)
                        + _I32.pack(self.secret_key))


# ---------------------------------------------------------------------------------------
# Typed frontend messages


@dataclass(frozen=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return _typed(FrontendType.QUERY, _cstr(self.sql))


@dataclass(frozen=True)
class Terminate:
    def encode(self) -> bytes:
        return _typed(FrontendType.TERMINATE)


@dataclass(frozen=True)
class AuthenticationResponse:
    """A 'p' message as decoded: its meaning depends on what the server asked for, so the
    server interprets it with one of the ``to_*`` methods."""

    payload: bytes

    def encode(self) -> bytes:
        return _typed(FrontendType.PASSWORD, self.payload)

    def to_password(self) -> PasswordMessage:
        body = BodyReader(self.payload, "password")
        message = PasswordMessage(body.cstr())
        body.end()
        return message

    def to_sasl_initial(self) -> SASLInitialResponse:
        body = BodyReader(self.payload, "SASL initial response")
        mechanism = body.cstr()
        length = body.int32()
        data = None if length == -1 else body.take(length)
        body.end()
        return SASLInitialResponse(mechanism, data)

    def to_sasl_response(self) -> SASLResponse:
        return SASLResponse(self.payload)


@dataclass(frozen=True)
class PasswordMessage:
    """Cleartext password, or ``"md5" + hex digest``."""

    password: str

    def encode(self) -> bytes:
        return _typed(FrontendType.PASSWORD, _cstr(self.password))


@dataclass(frozen=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        length = -1 if self.data is None else len(self.data)
        tail = _I32.pack(length) + (self.data or b"")
        return _typed(FrontendType.PASSWORD, _cstr(self.mechanism) + tail)


@dataclass(frozen=True)
class SASLResponse:
    data: bytes

    def encode(self) -> bytes:
        return _typed(FrontendType.PASSWORD, self.data)


@dataclass(frozen=True)
class CopyData:
    """Sent by both sides."""

    data: bytes

    def encode(self) -> bytes:
        return _typed(FrontendType.COPY_DATA, self.data)


@dataclass(frozen=True)
class CopyDone:
    """Sent by both sides."""

    def encode(self) -> bytes:
        return _typed(FrontendType.COPY_DONE)


@dataclass(frozen=True)
class CopyFail:
    message: str

    def encode(self) -> bytes:
        return _typed(FrontendType.COPY_FAIL, _cstr(self.message))


@dataclass(frozen=True)
class Sync:
    def encode(self) -> bytes:
        return _typed(FrontendType.SYNC)


@dataclass(frozen=True)
class Flush:
    def encode(self) -> bytes:
        return _typed(FrontendType.FLUSH)


@dataclass(frozen=True)
class ExtendedQueryMessage:
    """Parse, Bind, Describe, Execute, Close or FunctionCall: recognised, not interpreted
    (zenith speaks the simple query protocol only), so that the server can refuse them."""

    kind: FrontendType
    payload: bytes = b""

    def encode(self) -> bytes:
        return _typed(self.kind, self.payload)


# ---------------------------------------------------------------------------------------
# Backend messages


@dataclass(frozen=True)
class AuthenticationOk:
    def encode(self) -> bytes:
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.OK))


@dataclass(frozen=True)
class AuthenticationCleartextPassword:
    def encode(self) -> bytes:
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.CLEARTEXT_PASSWORD))


@dataclass(frozen=True)
class AuthenticationMD5Password:
    salt: bytes

    def encode(self) -> bytes:
        if len(self.salt) != 4:
            raise ValueError("an MD5 salt is 4 bytes")
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.MD5_PASSWORD) + self.salt)


@dataclass(frozen=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        names = b"".join(_cstr(m) for m in self.mechanisms) + b"\0"
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.SASL) + names)


@dataclass(frozen=True)
class AuthenticationSASLContinue:
    data: bytes

    def encode(self) -> bytes:
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.SASL_CONTINUE) + self.data)


@dataclass(frozen=True)
class AuthenticationSASLFinal:
    data: bytes

    def encode(self) -> bytes:
        return _typed(BackendType.AUTHENTICATION, _I32.pack(AuthCode.SASL_FINAL) + self.data)


@dataclass(frozen=True)
class AuthenticationOther:
    """A method zenith does not implement (Kerberos, GSS, SSPI, ...), kept for the error."""

    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return _typed(BackendType.AUTHENTICATION, _I32.pack(self.code) + self.data)


@dataclass(frozen=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return _typed(BackendType.PARAMETER_STATUS, _cstr(self.name) + _cstr(self.value))


@dataclass(frozen=True)
class BackendKeyData:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        body = _I32.pack(self.process_id) + _I32.pack(self.secret_key)
        return _typed(BackendType.BACKEND_KEY_DATA, body)


@dataclass(frozen=True)
class ReadyForQuery:
    status: TransactionStatus = TransactionStatus.IDLE

    def encode(self) -> bytes:
        return _typed(BackendType.READY_FOR_QUERY, self.status.encode("ascii"))


@dataclass(frozen=True)
class FieldDescription:
    name: str
    type_oid: int = TYPE_OID_TEXT
    table_oid: int = 0
    column_number: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format_code: int = 0  # 0 text, 1 binary


@dataclass(frozen=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        parts = [struct.pack("!h", len(self.fields))]
        for f in self.fields:
            parts.append(_cstr(f.name))
            parts.append(struct.pack("!IhIhih", f.table_oid, f.column_number, f.type_oid,
                                     f.type_size, f.type_modifier, f.format_code))
        return _typed(BackendType.ROW_DESCRIPTION, b"".join(parts))


@dataclass(frozen=True)
class DataRow:
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.values))]
        for value in self.values:
            if value is None:
                parts.append(_I32.pack(-1))
            else:
                parts.append(_I32.pack(len(value)))
                parts.append(value)
        return _typed(BackendType.DATA_ROW, b"".join(parts))


@dataclass(frozen=True)
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return _typed(BackendType.COMMAND_COMPLETE, _cstr(self.tag))


@dataclass(frozen=True)
class EmptyQueryResponse:
    def encode(self) -> bytes:
        return _typed(BackendType.EMPTY_QUERY_RESPONSE)


class _FieldsMessage:
    """ErrorResponse and NoticeResponse: a list of (field code, text) pairs."""

    fields: tuple[tuple[str, str], ...]
    _type: BackendType

    def get(self, code: str, default: str | None = None) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return default

    @property
    def severity(self) -> str:
        return self.get("V") or self.get("S") or "ERROR"

    @property
    def code(self) -> str:
        return self.get("C") or "XX000"

    @property
    def message(self) -> str:
        return self.get("M") or ""

    @property
    def detail(self) -> str | None:
        return self.get("D")

    @property
    def hint(self) -> str | None:
        return self.get("H")

    def encode(self) -> bytes:
        body = b"".join(k.encode("latin-1") + _cstr(v) for k, v in self.fields) + b"\0"
        return _typed(self._type, body)


def _build_fields(severity: str, code: str, message: str, detail: str | None,
                  hint: str | None) -> tuple[tuple[str, str], ...]:
    def clean(text: str) -> str:
        return text.replace("\0", "\\0")

    fields = [("S", severity), ("V", severity), ("C", code), ("M", clean(message))]
    if detail is not None:
        fields.append(("D", clean(detail)))
    if hint is not None:
        fields.append(("H", clean(hint)))
    return tuple(fields)


@dataclass(frozen=True)
class ErrorResponse(_FieldsMessage):
    fields: tuple[tuple[str, str], ...]
    _type = BackendType.ERROR_RESPONSE

    @classmethod
    def build(cls, code: str, message: str, *, severity: str = "ERROR",
              detail: str | None = None, hint: str | None = None) -> ErrorResponse:
        return cls(_build_fields(severity, code, message, detail, hint))


@dataclass(frozen=True)
class NoticeResponse(_FieldsMessage):
    fields: tuple[tuple[str, str], ...]
    _type = BackendType.NOTICE_RESPONSE

    @classmethod
    def build(cls, message: str, *, severity: str = "NOTICE", code: str = "00000",
              detail: str | None = None, hint: str | None = None) -> NoticeResponse:
        return cls(_build_fields(severity, code, message, detail, hint))


@dataclass(frozen=True)
class CopyResponse:
    format_code: int = 0
    column_formats: tuple[int, ...] = ()
    _type = BackendType.COPY_BOTH_RESPONSE

    def encode(self) -> bytes:
        body = struct.pack("!Bh", self.format_code, len(self.column_formats))
        body += b"".join(_I16.pack(f) for f in self.column_formats)
        return _typed(self._type, body)


@dataclass(frozen=True)
class CopyInResponse(CopyResponse):
    _type = BackendType.COPY_IN_RESPONSE


@dataclass(frozen=True)
class CopyOutResponse(CopyResponse):
    _type = BackendType.COPY_OUT_RESPONSE


@dataclass(frozen=True)
class CopyBothResponse(CopyResponse):
    _type = BackendType.COPY_BOTH_RESPONSE


@dataclass(frozen=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized))
        body += b"".join(_cstr(o) for o in self.unrecognized)
        return _typed(BackendType.NEGOTIATE_PROTOCOL_VERSION, body)


@dataclass(frozen=True)
class OtherBackendMessage:
    """A backend message the client has no use for (NotificationResponse, ParseComplete,
    ...): decoded only far enough to skip or report it."""

    kind: BackendType
    payload: bytes = b""

    def encode(self) -> bytes:
        return _typed(self.kind, self.payload)


FrontendMessage: TypeAlias = (
    StartupMessage | SSLRequest | GSSENCRequest | CancelRequest | Query | Terminate
    | AuthenticationResponse | PasswordMessage | SASLInitialResponse | SASLResponse
    | CopyData | CopyDone | CopyFail | Sync | Flush | ExtendedQueryMessage
)
BackendMessage: TypeAlias = (
    AuthenticationOk | AuthenticationCleartextPassword | AuthenticationMD5Password
    | AuthenticationSASL | AuthenticationSASLContinue | AuthenticationSASLFinal
    | AuthenticationOther | ParameterStatus | BackendKeyData | ReadyForQuery | RowDescription
    | DataRow | CommandComplete | EmptyQueryResponse | ErrorResponse | NoticeResponse
    | CopyInResponse | CopyOutResponse | CopyBothResponse | CopyData | CopyDone
    | NegotiateProtocolVersion | OtherBackendMessage
)
Message: TypeAlias = FrontendMessage | BackendMessage


def encode_all(messages: Sequence[Message]) -> bytes:
    """The bytes of several messages, in order (one write instead of many)."""
    return b"".join(m.encode() for m in messages)
