"""Connection parameters the way libpq reads them: URIs, ``PGPASSWORD`` and ``~/.pgpass``.

Users hand zenith the same ``postgresql://user:pass@host:port/db?sslmode=...`` URIs they give
psql, so :func:`parse_uri` follows libpq's ``conninfo_uri_parse`` rules: ``postgresql://`` or
``postgres://``; user info up to the first ``@`` before any ``/``; IPv6 hosts in brackets;
percent-decoding everywhere (``+`` is not a space, ``%00`` is refused); query parameters
override the parts before them. Unlike libpq it reads no ``PGHOST``-style defaults: an empty
host is ``localhost`` and an empty port 5432, so a URI means the same thing everywhere.
Only the password falls back to the environment (:func:`lookup_password`).

Passwords never reach a log: ``ConnInfo``'s repr, :meth:`ConnInfo.masked` and
:func:`mask_uri` show them as ``***``; :func:`mask_text` masks free text in linear time
and at most :data:`MASK_LIMIT` characters of it (it runs on what unauthenticated clients
send). Unencoded whitespace, quotes and control characters are refused in a URI.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote

from zenith.errors import InvalidArgument

logger = logging.getLogger(__name__)

SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_PORT: Final = 5432
DEFAULT_HOST: Final = "localhost"
#: The sslmode of connections to origins (other pageservers) when their URI names none.
ORIGIN_SSLMODE: Final = "verify-full"
#: ``require_auth`` methods (libpq 16); gss and sspi are accepted and never offered.
AUTH_REQUIREMENTS: Final = ("password", "md5", "scram-sha-256", "gss", "sspi", "none")
#: What the CLI allows its own pageserver, by the repository's ``auth_method`` (``zenith
#: init --auth-method``): only the method the pageserver was configured with, so that an
#: impostor bound on its port gets neither a cleartext password nor a way round SCRAM's
#: server signature (see :func:`parse_local_uri`).
LOCAL_REQUIRE_AUTH: Final[Mapping[str, str]] = {
    "scram-sha-256": "scram-sha-256", "md5": "md5", "trust": "none", "cert": "none",
    "scram+cert": "scram-sha-256"}
#: The most text one :func:`mask_text` / :func:`mask_uri` call masks; the rest is cut off
#: (with :data:`MASK_TRUNCATED`), so that masking any input costs bounded time.
MASK_LIMIT: Final = 64 * 1024
MASK_TRUNCATED: Final = "... [{} characters cut]"

_SCHEMES: Final = ("postgresql://", "postgres://")
_SUPPORTED: Final = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "sslmode", "sslrootcert",
    "sslcert", "sslkey", "connect_timeout", "application_name", "fallback_application_name",
    "options", "ssl", "require_auth",
})
# libpq keywords that change nothing for zenith's use, accepted so that URIs written for
# psql keep working.
_IGNORED: Final = frozenset({
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "sslcompression", "sslsni", "gssencmode", "channel_binding",
    "target_session_attrs", "load_balance_hosts", "client_encoding", "sslpassword",
    "sslcrl", "sslcrldir", "ssl_min_protocol_version", "ssl_max_protocol_version",
})


@dataclass(frozen=True)
class ConnInfo:
    """Where and how to connect. ``None`` means "not given" (see :func:`lookup_password`
    for the password; the user defaults to ``PGUSER`` or the OS user, the database to the
    user, when connecting)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    dbname: str | None = None
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    connect_timeout: float | None = None
    application_name: str | None = None
    options: str | None = None
    #: Numeric address to connect to instead of resolving ``host`` (libpq's hostaddr).
    hostaddr: str | None = None
    #: libpq 16's ``require_auth``: the authentication methods the server may ask for
    #: (see :func:`allowed_auth`); ``None`` is zenith's default policy.
    require_auth: str | None = None

    def __post_init__(self) -> None:
        if self.sslmode not in SSL_MODES:
            raise InvalidArgument(f'invalid sslmode value: "{self.sslmode}"',
                                  hint=f"Use one of {', '.join(SSL_MODES)}.")
        if self.sslrootcert == "system" and self.sslmode != "verify-full":
            raise InvalidArgument(
                f'weak sslmode "{self.sslmode}" may not be used with sslrootcert=system',
                hint='Use sslmode=verify-full (the default with sslrootcert=system).')
        if self.require_auth is not None:
            parse_require_auth(self.require_auth)
        if not 1 <= self.port <= 65535:
            raise InvalidArgument(f'invalid port number: "{self.port}"')

    def __repr__(self) -> str:
        return f"ConnInfo({self.masked()!r})"

    @property
    def address(self) -> str:
        """``host:port`` as error messages show it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def with_password(self, password: str | None) -> ConnInfo:
        return replace(self, password=password)

    def to_uri(self, *, mask_password: bool = False) -> str:
        """The URI for these parameters (``parse_uri(info.to_uri()) == info``)."""
        userinfo = ""
        if self.user is not None or self.password is not None:
            userinfo = _quote(self.user or "")
            if self.password is not None:
                userinfo += ":" + ("***" if mask_password else _quote(self.password))
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else _quote(self.host)
        uri = f"postgresql://{userinfo}{host}:{self.port}"
        if self.dbname is not None:
            uri += "/" + _quote(self.dbname)
        params = []
        defaults = ConnInfo()
        for name in ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout",
                     "application_name", "options", "hostaddr", "require_auth"):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                params.append(f"{name}={_quote(str(value))}")
        if params:
            uri += "?" + "&".join(params)
        return uri

    def masked(self) -> str:
        """The URI with the password shown as ``***`` (for logs and ``origin list``)."""
        return self.to_uri(mask_password=True)


def _quote(text: str) -> str:
    return quote(text, safe="")


_USERINFO: Final = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>.*)$", re.S)


# key=value pairs in a URI query or a libpq keyword/value string (``host=a password='x y'``);
# the value may be single-quoted (with backslash escapes) as libpq allows. Linear time on any
# input (it runs on what unauthenticated clients send, in every error): a key starts only at
# a token boundary (the lookbehind), and every quantifier is possessive, so no position is
# scanned again after a failed attempt.
_PARAM: Final = re.compile(
    r"(?<![^\s=&?'\"])(?P<key>[^\s=&?'\"]++)(?P<eq>\s*+=\s*+)"
    r"(?P<value>'(?:[^'\\]|\\.)*+'?|[^\s&]*+)", re.S)


def _loose_decode(text: str) -> str:
    """Percent-decoding that never fails (for masking text that may not parse)."""
    return unquote(text, errors="replace")


def _secret_key(key: str) -> bool:
    """Whether a parameter name (percent-encoded or not) names a secret: ``password``,
    ``sslpassword``, ``pass%77ord`` and case variants all do."""
    name = _loose_decode(key).strip().lower()
    return "password" in name or name in ("pass", "passwd", "pwd")


def _mask_params(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if not _secret_key(m.group("key")):
            return m.group(0)
        return m.group("key") + m.group("eq") + "***"

    return _PARAM.sub(repl, text)


def _cap(text: str) -> str:
    """``text`` cut to :data:`MASK_LIMIT` characters (with a marker saying how many more)."""
    if len(text) <= MASK_LIMIT:
        return text
    return text[:MASK_LIMIT] + MASK_TRUNCATED.format(len(text) - MASK_LIMIT)


def _userinfo_end(rest: str) -> int:
    """Where the user info of a URI's ``rest`` (after the scheme) ends: the index of its
    ``@``, or -1. As libpq: the ``@`` before the host, i.e. before the first ``/`` or ``?``
    (the last such one, so an unencoded ``@`` in a password stays in it). Without one, a
    password holding an unencoded ``?`` or ``/`` may end at a later ``@``: libpq's own rule
    (the first ``@`` before any ``/``), else the last ``@`` before the query."""
    end = _find_any(rest, "/?")
    at = rest.rfind("@", 0, end)
    if at >= 0 or ":" not in rest[:end]:
        return at
    slash = rest.find("/")
    at = rest.find("@", 0, slash if slash >= 0 else len(rest))
    if at >= 0:
        return at
    query = rest.find("?", end)
    return rest.rfind("@", 0, query if query >= 0 else len(rest))


def mask_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``; works on text that does not parse.

    Masked: the userinfo password (``postgresql://user:***@host``, also when it holds an
    unencoded ``@``, ``/`` or ``?``), a "port" that is not a number (``postgresql://user:pw``
    without ``@`` is a password to a reader), every parameter whose decoded name is a
    password (``?password=``, ``?pass%77ord=``, ``?sslpassword=``) anywhere after the user
    info, and the same in libpq's keyword/value form (``host=a password=***``), which zenith
    does not accept but may find in an error message. At most :data:`MASK_LIMIT`
    characters are kept.
    """
    uri = _cap(uri)
    match = _USERINFO.match(uri)
    if match is None:
        return _mask_params(uri)
    scheme, rest = match.group("scheme"), match.group("rest")
    at = _userinfo_end(rest)
    if at >= 0:
        user, sep, _password = rest[:at].partition(":")
        return (scheme + _mask_params(user) + (":***" if sep else "") + "@"
                + _mask_params(rest[at + 1:]))
    end = _find_any(rest, "/?")
    authority, tail = rest[:end], rest[end:]
    if not authority.startswith("["):
        host, sep, port = authority.partition(":")
        if sep and not port.isdigit():  # not a port: maybe "user:password" without '@'
            authority = host + ":***"
    return scheme + authority + _mask_params(tail)


_EMBEDDED_URI: Final = re.compile(r"postgres(?:ql)?://[^\s\"'<>]*", re.I)


def mask_text(text: str) -> str:
    """Free text (a log line, an error message) with the password of every URI it holds
    and every ``password=...`` parameter shown as ``***``; linear time, and at most
    :data:`MASK_LIMIT` characters are kept (the rest is cut, with a marker)."""
    masked = _EMBEDDED_URI.sub(lambda m: mask_uri(m.group(0)), _cap(text))
    return _mask_params(masked)


class MaskSecrets(logging.Filter):
    """A logging filter (put it on a handler) that masks passwords in every record, its
    arguments and its traceback, whichever logger wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it
            return True
        record.msg, record.args = mask_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        return True


def _decode(text: str, what: str, *, secret: bool = False) -> str:
    shown = "***" if secret else text
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            out += char.encode("utf-8")
            i += 1
            continue
        digits = text[i + 1 : i + 3]
        if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise InvalidArgument(f'invalid percent-encoded token in {what}: "{shown}"')
        if digits == "00":
            raise InvalidArgument(f'forbidden value %00 in percent-encoded {what}: "{shown}"')
        out.append(int(digits, 16))
        i += 3
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f'percent-encoded {what} is not UTF-8: "{shown}"') from exc


def _find_any(text: str, chars: str) -> int:
    positions = [p for p in (text.find(c) for c in chars) if p >= 0]
    return min(positions) if positions else len(text)


# Characters a URI never holds unencoded (RFC 3986), which zenith refuses: whitespace,
# quotes, angle brackets and control characters. Text that holds them ends a URI embedded
# in a message (see _EMBEDDED_URI), so a password holding them could not be masked there.
_UNSAFE: Final = re.compile(r"[\s\"'<>\x00-\x1f\x7f]")
_BAD_PORT: Final = ("invalid port number (percent-encode '/', '@', ':' in the password: "
                    "%2F, %40, %3A)")


def _describe(char: str) -> str:
    if char.isspace():
        return "whitespace"
    if char in "\"'":
        return "quote"
    if char in "<>":
        return f'"{char}"'
    return f"control character U+{ord(char):04X}"


def parse_require_auth(text: str) -> frozenset[str]:
    """The methods a ``require_auth`` value allows, as libpq 16 reads it: a comma list of
    methods (``password``, ``md5``, ``scram-sha-256``, ``gss``, ``sspi``, ``none`` for no
    authentication at all), or a list of ``!method`` that allows everything else."""
    items = [item.strip() for item in text.split(",")]
    negated = [item.startswith("!") for item in items]
    if any(negated) and not all(negated):
        raise InvalidArgument(f'invalid require_auth value "{text}": negative and positive '
                              "methods cannot be mixed")
    names = [item[1:] if neg else item for item, neg in zip(items, negated, strict=True)]
    for name in names:
        if name not in AUTH_REQUIREMENTS:
            raise InvalidArgument(f'invalid require_auth method: "{name}"',
                                  hint=f"Use {', '.join(AUTH_REQUIREMENTS)}, or !method.")
    if all(negated):
        return frozenset(AUTH_REQUIREMENTS) - frozenset(names)
    return frozenset(names)


def certificate_verified(info: ConnInfo) -> bool:
    """Whether a TLS connection with ``info`` checks the server's certificate: verify-ca,
    verify-full, or require with an ``sslrootcert`` (as libpq)."""
    return info.sslmode in ("verify-ca", "verify-full") or (
        info.sslmode == "require" and info.sslrootcert is not None)


def allowed_auth(info: ConnInfo, *, tls: bool) -> frozenset[str]:
    """The authentication methods the client lets the server use: ``require_auth`` when
    given; else all of them over TLS that verified the server's certificate (``tls`` is
    true only then: see :func:`certificate_verified`), and otherwise only SCRAM and none --
    a password is never sent in clear or as MD5 to a server whose certificate was not
    checked (without TLS, or with sslmode=require/prefer/allow and no root certificate,
    where anyone in the middle could read it) unless the URI says so."""
    if info.require_auth is not None:
        return parse_require_auth(info.require_auth)
    if tls:
        return frozenset(AUTH_REQUIREMENTS)
    return frozenset({"scram-sha-256", "none"})


def parse_origin_uri(uri: str) -> ConnInfo:
    """An origin's URI (another pageserver): as :func:`parse_uri`, but without an
    ``sslmode`` it is :data:`ORIGIN_SSLMODE` (TLS with certificate and host name checks)."""
    return parse_uri(uri, default_sslmode=ORIGIN_SSLMODE)


def parse_local_uri(uri: str, *, auth_method: str) -> ConnInfo:
    """The CLI's URI for its own pageserver: as :func:`parse_uri` (``sslmode=prefer``),
    allowing only the method the repository's pageserver is configured with
    (``auth_method``, set by ``zenith init --auth-method``) unless the URI has a
    ``require_auth``: ``scram-sha-256`` requires SCRAM (an impostor bound on the port cannot
    produce the server signature, and learns nothing usable), ``md5`` requires MD5 (an
    impostor gets an MD5 response to its own salt, never the password: the CLI's password
    is 192 random bits, and the response is good for that salt only), ``trust`` requires
    none (a password is never sent). Cleartext is never allowed."""
    info = parse_uri(uri)
    if info.require_auth is None:
        if auth_method not in LOCAL_REQUIRE_AUTH:
            raise InvalidArgument(f"unknown auth_method {auth_method!r} for the local "
                                  f"pageserver: one of {', '.join(LOCAL_REQUIRE_AUTH)}")
        info = replace(info, require_auth=LOCAL_REQUIRE_AUTH[auth_method])
    return info


def parse_uri(uri: str, *, default_sslmode: str = "prefer") -> ConnInfo:
    """Parse a ``postgresql://`` / ``postgres://`` URI as libpq does (``sslmode`` is
    ``default_sslmode`` when the URI has none, ``verify-full`` with
    ``sslrootcert=system``).

    Unlike libpq, unencoded whitespace, quotes, ``<``, ``>`` and control characters are
    refused (they are never part of a URI, and would end it in a message where it could
    not be masked whole). Raises :class:`InvalidArgument` naming what is wrong (the
    password never appears; neither does a bad port, which may be a password).
    """
    if not isinstance(uri, str):
        raise InvalidArgument(f"a connection URI is a string, not {type(uri).__name__}")
    bad = _UNSAFE.search(uri)
    # Only the part before such a character is shown: what follows may be the rest of a
    # password that masking cannot tell from the text around it.
    shown = mask_uri(uri) if bad is None else mask_uri(uri[:bad.start()]) + "..."
    for scheme in _SCHEMES:
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            break
    else:
        raise InvalidArgument(
            f'invalid connection URI "{shown}": it must start with postgresql:// '
            "or postgres://")
    if bad is not None:
        raise InvalidArgument(
            f'invalid connection URI "{shown}": unencoded {_describe(bad.group(0))} at '
            f"position {bad.start()}",
            hint="Percent-encode it (a space is %20, a quote %27 or %22).")
    values: dict[str, str] = {}

    # user info: up to the first '@' that comes before any '/'
    end = _find_any(rest, "@/")
    if end < len(rest) and rest[end] == "@":
        user, sep, password = rest[:end].partition(":")
        if user:
            values["user"] = _decode(user, "user name")
        if sep:
            values["password"] = _decode(password, "password", secret=True)
        rest = rest[end + 1 :]

    # host: bracketed IPv6, or up to ':', '/', '?'
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise InvalidArgument(f'missing "]" in IPv6 host address in URI "{mask_uri(uri)}"')
        host = rest[1:close]
        if not host:
            raise InvalidArgument(f'IPv6 host address may not be empty in URI "{mask_uri(uri)}"')
        rest = rest[close + 1 :]
        if rest and rest[0] not in ":/?":
            raise InvalidArgument(
                f'unexpected character "{rest[0]}" after IPv6 host address in URI '
                f'"{mask_uri(uri)}" (expected ":", "/" or "?")')
        values["host"] = _decode(host, "host")
    else:
        end = _find_any(rest, ":/?,")
        if end:
            values["host"] = _decode(rest[:end], "host")
        rest = rest[end:]
    if rest.startswith(":"):
        end = _find_any(rest, "/?,")
        if end > 1:
            values["port"] = _decode(rest[1:end], "port", secret=True)
        rest = rest[end:]
    if rest.startswith(","):
        raise InvalidArgument(f'multiple hosts are not supported: "{mask_uri(uri)}"')
    if rest.startswith("/"):
        end = _find_any(rest, "?")
        if end > 1:
            values["dbname"] = _decode(rest[1:end], "database name")
        rest = rest[end:]
    if rest.startswith("?"):
        _parse_query(rest[1:], values, uri)
    if "sslmode" not in values:
        values["sslmode"] = ("verify-full" if values.get("sslrootcert") == "system"
                             else default_sslmode)
    return _build(values)


def _parse_query(query: str, values: dict[str, str], uri: str) -> None:
    parts = query.split("&")
    if parts and parts[-1] == "":
        parts.pop()  # a trailing '&' is harmless, as in libpq
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidArgument(f'missing key/value separator "=" in URI query parameter: '
                                  f'"{mask_uri(part)}"')
        if "=" in value:
            raise InvalidArgument(f'extra key/value separator "=" in URI query parameter: '
                                  f'"{key}"')
        key = _decode(key, "query parameter name")
        value = _decode(value, f"value of {key}", secret=_secret_key(key))
        if key == "ssl":
            if value != "true":
                raise InvalidArgument(f'invalid value "{value}" for ssl: only "true"')
            key, value = "sslmode", "require"
        if key in _IGNORED:
            continue
        if key not in _SUPPORTED:
            raise InvalidArgument(f'invalid URI query parameter: "{key}"',
                                  hint="Supported: " + ", ".join(sorted(_SUPPORTED)) + ".")
        if key == "fallback_application_name":
            values.setdefault("application_name", value)
            continue
        values[key] = value


def _build(values: Mapping[str, str]) -> ConnInfo:
    kwargs: dict[str, object] = {}
    port_text = values.get("port")
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            # Not echoed: "user:password" without '@' (or a password holding an unencoded
            # '/') reads as host "user" and port "password".
            raise InvalidArgument(_BAD_PORT)
        kwargs["port"] = int(port_text)
    timeout_text = values.get("connect_timeout")
    if timeout_text is not None:
        try:
            timeout = int(timeout_text)
        except ValueError:
            raise InvalidArgument(
                f'invalid integer value "{timeout_text}" for connection option '
                '"connect_timeout"') from None
        # As libpq: zero or negative waits forever, and less than 2 seconds means 2.
        kwargs["connect_timeout"] = None if timeout <= 0 else float(max(timeout, 2))
    for key in ("host", "user", "password", "dbname", "sslmode", "sslrootcert", "sslcert",
                "sslkey", "application_name", "options", "hostaddr", "require_auth"):
        if key in values:
            kwargs[key] = values[key]
    if kwargs.get("host") == "":
        del kwargs["host"]
    return ConnInfo(**kwargs)  # type: ignore[arg-type]


def add_password(uri: str, password: str) -> str:
    """``uri`` with ``password`` added as a ``password=`` query parameter (which libpq lets
    override the parts before it), for ``--password-stdin``. A URI that already carries a
    password is refused: the password must come from one place."""
    if not password:
        raise InvalidArgument("the password read from standard input is empty")
    if parse_uri(uri).password is not None:
        raise InvalidArgument(f'the URI "{mask_uri(uri)}" already holds a password',
                              hint="give the password either in the URI or on standard "
                                   "input, not both")
    sep = "&" if "?" in uri else "?"
    return f"{uri}{sep}password={_quote(password)}"


#: URI parameters that name files.
FILE_PARAMETERS: Final = ("sslrootcert", "sslcert", "sslkey")


def map_file_parameters(uri: str, change: Callable[[str, str], str]) -> str:
    """``uri`` with each ``sslrootcert``/``sslcert``/``sslkey`` file (not
    ``sslrootcert=system``) replaced by ``change(parameter, path)``."""
    parse_uri(uri)  # refuses what is not a URI, with the reason
    head, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = []
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        name = unquote(key)
        path = unquote(value)
        if eq and name in FILE_PARAMETERS and path and path != "system":
            part = f"{key}={_quote(change(name, path))}"
        parts.append(part)
    return f"{head}?{'&'.join(parts)}"


def absolute_file_parameters(uri: str, base: Path) -> str:
    """``uri`` with relative ``sslrootcert``/``sslcert``/``sslkey`` paths made absolute
    against ``base``: an origin's URI is used by the pageserver process, whose working
    directory is not the one the user typed it in."""
    return map_file_parameters(
        uri, lambda _name, path: path if os.path.isabs(path) else str(base / path))


def file_parameters(info: ConnInfo) -> list[str]:
    """The files a connection with ``info`` opens by name (``sslrootcert=system`` is not
    one)."""
    return [f for f in (info.sslrootcert, info.sslcert, info.sslkey) if f and f != "system"]


# ---------------------------------------------------------------------------------------
# Passwords from the environment


@dataclass(frozen=True)
class PgpassEntry:
    """One line of a password file; ``None`` is the ``*`` wildcard."""

    host: str | None
    port: str | None
    dbname: str | None
    user: str | None
    password: str = field(repr=False)

    def matches(self, host: str, port: str, dbname: str, user: str) -> bool:
        return all(want is None or want == have for want, have in (
            (self.host, host), (self.port, port), (self.dbname, dbname), (self.user, user)))


def _split_pgpass_line(line: str) -> list[tuple[str, bool]]:
    """Fields split at unescaped ':', as (text, was the bare wildcard '*')."""
    fields: list[tuple[str, bool]] = []
    current: list[str] = []
    escaped_any = False
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\" and i + 1 < len(line):
            current.append(line[i + 1])
            escaped_any = True
            i += 2
            continue
        if char == ":":
            text = "".join(current)
            fields.append((text, text == "*" and not escaped_any))
            current, escaped_any = [], False
        else:
            current.append(char)
        i += 1
    text = "".join(current)
    fields.append((text, text == "*" and not escaped_any))
    return fields


def parse_pgpass(text: str) -> list[PgpassEntry]:
    """Parse ``hostname:port:database:username:password`` lines (libpq's format: ``#``
    comments, ``*`` wildcards in the first four fields, ``\\:`` and ``\\\\`` escapes)."""
    entries = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        fields = _split_pgpass_line(line)
        if len(fields) < 5:
            continue  # malformed lines are skipped, as libpq does
        keys = [None if wild else text for text, wild in fields[:4]]
        entries.append(PgpassEntry(keys[0], keys[1], keys[2], keys[3], fields[4][0]))
    return entries


def read_pgpass(path: str | os.PathLike[str]) -> list[PgpassEntry]:
    """The entries of a password file; none if it is missing, not a regular file, or
    readable by group or others (libpq ignores such a file too, with a warning)."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISREG(info.st_mode):
        logger.warning('password file "%s" is not a plain file', path)
        return []
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning('password file "%s" has group or world access; permissions should be '
                       "u=rw (0600) or less", path)
        return []
    try:
        return parse_pgpass(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []


def default_pgpass_path(env: Mapping[str, str] | None = None) -> Path | None:
    """``PGPASSFILE``, else ``~/.pgpass``; ``None`` without a home directory."""
    env = os.environ if env is None else env
    if env.get("PGPASSFILE"):
        return Path(env["PGPASSFILE"])
    try:
        return Path.home() / ".pgpass"
    except RuntimeError:
        return None


def lookup_password(info: ConnInfo, user: str, dbname: str,
                    env: Mapping[str, str] | None = None) -> str | None:
    """The password libpq would use: the URI's, else ``PGPASSWORD``, else the first
    matching line of ``PGPASSFILE`` or ``~/.pgpass``."""
    if info.password is not None:
        return info.password
    env = os.environ if env is None else env
    if env.get("PGPASSWORD"):
        return env["PGPASSWORD"]
    host = info.host
    if host.startswith("/"):
        host = DEFAULT_HOST  # a Unix socket matches "localhost", as in libpq
    path = default_pgpass_path(env)
    for entry in read_pgpass(path) if path is not None else ():
        if entry.matches(host, str(info.port), dbname, user):
            return entry.password
    return None
