"""Password verifiers and both sides of SCRAM-SHA-256 and MD5 authentication.

Passwords are never stored in clear: a user has a SCRAM verifier in PostgreSQL's text
format (``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, as in
``pg_authid.rolpassword``) and/or an MD5 hash (``"md5" + md5(password + user)``).

The SCRAM exchange (RFC 5802/7677, as PostgreSQL's ``auth-scram.c`` runs it) and the
verifiers are written here with ``hashlib``; only SASLprep of a non-ASCII password borrows
``scramp``'s. Two reasons: libpq sends an *empty* user name in its client-first message
(PostgreSQL takes the user from the startup packet) and ``scramp``'s server refuses such a
message; and importing ``scramp`` costs every ``zenith`` command a tenth of a second. The
server exchange also
runs as a *mock* for an unknown user -- a salt derived from the user name and a per-process
secret, and a proof that can never match -- so that a client cannot tell an unknown user
from a wrong password, as in PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from zenith.errors import AuthenticationFailed, ProtocolViolation

SCRAM_MECHANISM: Final = "SCRAM-SHA-256"
SCRAM_ITERATIONS: Final = 4096
#: The most PBKDF2 iterations a client computes for a server (PostgreSQL makes 4096 by
#: default, and its scram_iterations may be raised): enough for sources with a raised
#: count, while a hostile server cannot make a connection attempt cost more than about a
#: second of CPU (in a worker thread, off the event loop). The least is 1, PostgreSQL's
#: minimum: a fake server may ask for it (it only makes the client proof it receives
#: cheaper to attack offline; the connection still needs the server's signature).
SCRAM_MAX_ITERATIONS: Final = 1_000_000

# Mock salts must be stable for a user name (a client probing twice sees the same salt) and
# unpredictable, like PostgreSQL's mock_auth_nonce.
_MOCK_SECRET: Final = secrets.token_bytes(32)


@dataclass(frozen=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse PostgreSQL's text form; ``ValueError`` when it is not one."""
        try:
            method, rest = text.split("$", 1)
            iter_salt, keys = rest.split("$", 1)
            iterations_text, salt_b64 = iter_salt.split(":", 1)
            stored_b64, server_b64 = keys.split(":", 1)
            verifier = cls(
                int(iterations_text),
                base64.b64decode(salt_b64, validate=True),
                base64.b64decode(stored_b64, validate=True),
                base64.b64decode(server_b64, validate=True),
            )
        except (ValueError, binascii.Error) as exc:
            raise ValueError("not a SCRAM-SHA-256 verifier") from exc
        if (method != SCRAM_MECHANISM or verifier.iterations < 1 or not verifier.salt
                or len(verifier.stored_key) != 32 or len(verifier.server_key) != 32):
            raise ValueError("not a SCRAM-SHA-256 verifier")
        return verifier

    def __str__(self) -> str:
        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode("ascii")

        return (f"{SCRAM_MECHANISM}${self.iterations}:{b64(self.salt)}"
                f"${b64(self.stored_key)}:{b64(self.server_key)}")


def prepare_password(password: str) -> bytes:
    """SASLprep (RFC 4013) as PostgreSQL applies it: a password that is not valid under it
    is used as it is. ASCII passwords pass unchanged, so ``scramp``'s implementation (and
    its imports) are loaded only for the others."""
    if password.isascii() and password.isprintable():
        return password.encode("ascii")
    from scramp.utils import saslprep

    try:
        return str(saslprep(password)).encode("utf-8")
    except Exception:  # scramp raises ScramException for prohibited characters
        return password.encode("utf-8")


def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)


def make_scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """A SCRAM-SHA-256 verifier for ``password`` (SASLprep'd, random 16-byte salt as
    PostgreSQL makes them)."""
    salt = secrets.token_bytes(16)
    salted = _salted(password, salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return str(ScramVerifier(iterations, salt, stored_key, server_key))


def make_md5_hash(user: str, password: str) -> str:
    """The MD5 hash PostgreSQL stores: ``"md5" + md5(password + user)`` in hex."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_response(stored_hash: str, salt: bytes) -> str:
    """What a client answers to AuthenticationMD5Password, from the stored hash."""
    if not stored_hash.startswith("md5") or len(stored_hash) != 35:
        raise ValueError("not an MD5 password hash")
    return "md5" + hashlib.md5(stored_hash[3:].encode("ascii") + salt).hexdigest()


def md5_client_response(user: str, password: str, salt: bytes) -> str:
    return md5_response(make_md5_hash(user, password), salt)


def check_md5_response(stored_hash: str | None, salt: bytes, response: str) -> bool:
    if stored_hash is None:
        return False
    try:
        expected = md5_response(stored_hash, salt)
    except ValueError:
        return False
    return hmac.compare_digest(expected.encode(), response.encode("utf-8", "replace"))


def check_password(password: str, *, scram_verifier: str | None, md5_hash: str | None,
                   user: str) -> bool:
    """Check a cleartext password against whichever verifier the user has."""
    if scram_verifier is not None:
        try:
            verifier = ScramVerifier.parse(scram_verifier)
        except ValueError:
            return False
        salted = _salted(password, verifier.salt, verifier.iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key)
    if md5_hash is not None:
        return hmac.compare_digest(make_md5_hash(user, password).encode(), md5_hash.encode())
    return False


@dataclass(frozen=True)
class StoredUser:
    """A user as the server knows it. ``md5_hash`` is ``"md5" + md5(password + name)``
    hex (PostgreSQL's format); either verifier may be missing."""

    name: str
    role: str
    scram_verifier: str | None = None
    md5_hash: str | None = None

    @classmethod
    def from_password(cls, name: str, password: str, role: str, *,
                      md5: bool = True) -> StoredUser:
        """Both verifiers for ``password`` (the MD5 one unless ``md5=False``)."""
        return cls(name, role, make_scram_verifier(password),
                   make_md5_hash(name, password) if md5 else None)

    def __repr__(self) -> str:  # verifiers are secrets too: keep them out of logs
        return f"StoredUser(name={self.name!r}, role={self.role!r})"


class Credentials(Protocol):
    """Where the server looks users up (the pageserver backs it with its repository)."""

    def lookup(self, user: str) -> StoredUser | None: ...


class InMemoryCredentials:
    """A fixed set of users: for tests and embedding."""

    def __init__(self, users: Iterable[StoredUser] = ()):
        self._users = {u.name: u for u in users}

    def add(self, user: StoredUser) -> None:
        self._users[user.name] = user

    def lookup(self, user: str) -> StoredUser | None:
        return self._users.get(user)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isascii() or not part[0].isalpha():
            raise ProtocolViolation(f"malformed SCRAM message: bad attribute in {what}",
                                    detail=f"Attribute {part[:16]!r}")
        attrs.append((part[0], part[2:]))
    return attrs


class ScramServerExchange:
    """One SCRAM-SHA-256 exchange (without channel binding) on the server side.

    ``verifier`` is ``None`` for an unknown user or a user without a SCRAM verifier: the
    exchange then runs as a mock and ``client_final`` always reports failure.
    Malformed client messages raise :class:`ProtocolViolation`.
    """

    def __init__(self, verifier: ScramVerifier | None, user: str):
        if verifier is None:
            mock = hashlib.sha256(_MOCK_SECRET + user.encode("utf-8")).digest()
            verifier = ScramVerifier(SCRAM_ITERATIONS, mock[:16], mock[16:] * 2, mock[16:] * 2)
            self._mock = True
        else:
            self._mock = False
        self._verifier = verifier
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def client_first(self, data: bytes) -> bytes:
        """Take the client-first message, return the server-first message."""
        text = _decode(data, "client-first")
        cbind_flag, sep, rest = text.partition(",")
        if not sep:
            raise ProtocolViolation("malformed SCRAM message: no GS2 header")
        if cbind_flag.startswith("p="):
            raise ProtocolViolation(
                "malformed SCRAM message: channel binding is not supported by this server",
                hint="Connect with channel_binding=prefer or disable.")
        if cbind_flag not in ("n", "y"):
            raise ProtocolViolation(f"malformed SCRAM message: bad GS2 flag {cbind_flag!r}")
        authzid, sep, bare = rest.partition(",")
        if not sep or authzid:
            raise ProtocolViolation("malformed SCRAM message: authorization identity unsupported")
        self._gs2_header = f"{cbind_flag},,"
        attrs = _attributes(bare, "client-first")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ProtocolViolation("malformed SCRAM message: expected user name and nonce")
        if any(key == "m" for key, _ in attrs):
            raise ProtocolViolation("malformed SCRAM message: extensions are not supported")
        client_nonce = attrs[1][1]
        if not client_nonce or not all(0x21 <= ord(c) <= 0x7E for c in client_nonce):
            raise ProtocolViolation("malformed SCRAM message: invalid client nonce")
        # The user name inside SCRAM is ignored: the startup packet's user is authoritative.
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(secrets.token_bytes(18))
        self._server_first = (f"r={self._nonce},s={_b64(self._verifier.salt)},"
                              f"i={self._verifier.iterations}")
        return self._server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes | None:
        """Take the client-final message; the server-final message if the proof is right,
        ``None`` if authentication failed."""
        if not self._server_first:
            raise ProtocolViolation("SCRAM client-final message before client-first")
        text = _decode(data, "client-final")
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ProtocolViolation("malformed SCRAM message: no proof")
        attrs = _attributes(without_proof, "client-final")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ProtocolViolation("malformed SCRAM message: expected channel binding, nonce")
        try:
            cbind = base64.b64decode(attrs[0][1], validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except binascii.Error as exc:
            raise ProtocolViolation("malformed SCRAM message: invalid base64") from exc
        if cbind != self._gs2_header.encode("ascii"):
            raise ProtocolViolation("SCRAM channel binding check failed")
        if attrs[1][1] != self._nonce:
            raise ProtocolViolation("SCRAM nonce mismatch")
        if len(proof) != 32:
            raise ProtocolViolation("malformed SCRAM message: invalid proof length")
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        client_signature = hmac.digest(self._verifier.stored_key, auth_bytes, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._verifier.stored_key)
        if self._mock or not ok:
            return None
        server_signature = hmac.digest(self._verifier.server_key, auth_bytes, "sha256")
        return f"v={_b64(server_signature)}".encode("ascii")


class ScramClientExchange:
    """The client side of SCRAM-SHA-256 without channel binding (RFC 5802/7677), as libpq
    runs it: an empty user name in the client-first message (the startup packet names the
    user). Raises :class:`AuthenticationFailed` when the server misbehaves, asks for more
    than :data:`SCRAM_MAX_ITERATIONS`, or cannot prove that it knows the verifier.
    ``client_final`` runs PBKDF2: callers on an event loop run it in a thread."""

    def __init__(self, password: str):
        self._password = password
        self._nonce = _b64(secrets.token_bytes(18))
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode("ascii")

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8")
        attrs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
        nonce, salt_b64, iterations_text = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce) or not salt_b64:
            raise AuthenticationFailed("invalid SCRAM server-first message (nonce or salt)")
        if (not iterations_text.isascii() or not iterations_text.isdigit()
                or len(iterations_text) > 12
                or not 0 < int(iterations_text) <= SCRAM_MAX_ITERATIONS):
            raise AuthenticationFailed(
                f"SCRAM iteration count from the server refused: {iterations_text[:20]!r} "
                f"(at most {SCRAM_MAX_ITERATIONS:,})")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except binascii.Error as exc:
            raise AuthenticationFailed("invalid SCRAM salt from the server") from exc
        salted = _salted(self._password, salt, int(iterations_text))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = hmac.digest(
            hmac.digest(salted, b"Server Key", "sha256"), auth, "sha256")
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def check_server_final(self, server_final: bytes) -> None:
        text = server_final.decode("utf-8")
        if text.startswith("e="):
            raise AuthenticationFailed(f"SCRAM authentication failed: {text[2:]}")
        if not text.startswith("v=") or not self._server_signature:
            raise AuthenticationFailed("invalid SCRAM server-final message")
        try:
            signature = base64.b64decode(text[2:], validate=True)
        except binascii.Error as exc:
            raise AuthenticationFailed("invalid SCRAM server signature") from exc
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationFailed("the server's SCRAM signature is wrong: it does not "
                                       "know this user's verifier")


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"malformed SCRAM message: {what} is not UTF-8") from exc
