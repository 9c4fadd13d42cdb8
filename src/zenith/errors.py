"""One error root for the whole project.

Every error zenith raises on purpose derives from :class:`ZenithError` and carries the
SQLSTATE that the pageserver sends in its ErrorResponse. The client side maps an
ErrorResponse's SQLSTATE back to the same class with :func:`error_from_sqlstate`, so a
``PushRejected`` raised on a remote pageserver is a ``PushRejected`` in the CLI.
"""

from __future__ import annotations

from typing import ClassVar


class ZenithError(Exception):
    """Root of zenith's errors. ``sqlstate`` is the PostgreSQL error code sent on the wire."""

    sqlstate: ClassVar[str] = "XX000"  # internal_error

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class InvalidArgument(ZenithError):
    """A value of the wrong shape: an LSN, id, key, name or record that cannot be used."""

    sqlstate = "22023"  # invalid_parameter_value


class SyntaxError_(ZenithError):
    """A command that cannot be parsed, or an unknown command."""

    sqlstate = "42601"  # syntax_error


class NotFound(ZenithError):
    """A branch, timeline, user or origin that does not exist."""

    sqlstate = "42704"  # undefined_object


class UnknownBranch(NotFound):
    pass


class UnknownTimeline(NotFound):
    pass


class AlreadyExists(ZenithError):
    sqlstate = "42710"  # duplicate_object


class ObjectInUse(ZenithError):
    """Something else depends on the object (a branch's timeline has descendants, ...)."""

    sqlstate = "55006"  # object_in_use


class InvalidState(ZenithError):
    """The object is not in a state that allows the operation (e.g. history is immutable)."""

    sqlstate = "55000"  # object_not_in_prerequisite_state


class LsnOutOfRange(InvalidState):
    """An LSN before a timeline's start or beyond its ``last_record_lsn``."""


class HistoryImmutable(InvalidState):
    """A record at or below ``last_record_lsn``: recorded history never changes."""


class PushRejected(InvalidState):
    """A push or pull that would lose history (remote ahead, diverged) or is not allowed."""


class TransferAborted(ZenithError):
    """A stream that failed its integrity checks (CRC, counts, digest)."""

    sqlstate = "XX001"  # data_corrupted


class HistoryMismatch(TransferAborted):
    """Records whose history hash is not the one claimed for them."""


class PeerTimeout(TransferAborted):
    """The other end of a transfer went silent for longer than the configured timeout."""

    sqlstate = "57P05"  # idle_session_timeout: the nearest PostgreSQL has


class AuthenticationFailed(ZenithError):
    sqlstate = "28P01"  # invalid_password


class PermissionDenied(ZenithError):
    sqlstate = "42501"  # insufficient_privilege


class FeatureNotSupported(ZenithError):
    sqlstate = "0A000"


class ProtocolViolation(ZenithError):
    sqlstate = "08P01"


class LimitExceeded(ZenithError):
    """A configured bound was reached: query text size, delta-chain length, ..."""

    sqlstate = "54000"  # program_limit_exceeded


class QueryTooLong(ProtocolViolation):
    """A Query message over the configured size: refused from its header, before its text
    is read, and the connection is closed."""

    sqlstate = "54000"  # program_limit_exceeded


class TooManyConnections(ZenithError):
    """No connection slot for this client (in total, for its user, or only admins left)."""

    sqlstate = "53300"  # too_many_connections


class ConnectionFailed(ZenithError):
    """The peer could not be reached, or the connection was lost."""

    sqlstate = "08006"  # connection_failure


class Cancelled(ZenithError):
    """Work stopped because its command was cancelled (client gone, CancelRequest, statement
    timeout): raised in the worker thread, which then frees its slot. Not registered for
    decoding: a 57014 from a server stays a plain ServerError."""

    sqlstate = "57014"  # query_canceled


class ServerError(ZenithError):
    """An ErrorResponse whose SQLSTATE has no class of its own here."""

    def __init__(self, message: str, *, sqlstate: str = "XX000", **kw: str | None):
        super().__init__(message, **kw)
        self.sqlstate = sqlstate  # type: ignore[misc]


_BY_SQLSTATE: dict[str, type[ZenithError]] = {}


def _register() -> None:
    # The most general class for a code wins; subclasses sharing a code are refined by name.
    for cls in (
        ZenithError,
        InvalidArgument,
        SyntaxError_,
        NotFound,
        AlreadyExists,
        ObjectInUse,
        InvalidState,
        TransferAborted,
        PeerTimeout,
        AuthenticationFailed,
        PermissionDenied,
        FeatureNotSupported,
        ProtocolViolation,
        ConnectionFailed,
        LimitExceeded,
        TooManyConnections,
    ):
        _BY_SQLSTATE.setdefault(cls.sqlstate, cls)


_register()


def error_from_sqlstate(
    sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> ZenithError:
    """Rebuild the error a server sent as an ErrorResponse."""
    cls = _BY_SQLSTATE.get(sqlstate)
    if cls is None:
        return ServerError(message, sqlstate=sqlstate, detail=detail, hint=hint)
    return cls(message, detail=detail, hint=hint)
