"""Trusted connections out (issue 11, item 2): what the client does against hostile or
impersonating servers, over real sockets on 127.0.0.1.

A fake server (raw bytes and the repo's own message codec, on a thread of its own) answers
SSLRequest with ``N`` and asks for a cleartext password, an MD5 one, or breaks SCRAM; in
every case the password -- and its MD5 forms -- never leave the client, and the client
says why. TLS: ``verify-full`` (the default for origins) against certificates made with
the ``openssl`` command line for the wrong host name, by an unknown CA, and by the right
CA; ``sslrootcert=system``. End to end: ``zenith pull main evil`` against a hostile origin,
and the warning of ``zenith origin add``.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fixtures import PageserverProc
from zenith.errors import AuthenticationFailed, ConnectionFailed, InvalidArgument, ProtocolViolation
from zenith.pgwire.auth import SCRAM_MAX_ITERATIONS, make_md5_hash, md5_client_response
from zenith.pgwire.client import connect, parse_origin_uri, parse_uri
from zenith.pgwire.conninfo import (
    allowed_auth,
    certificate_verified,
    parse_local_uri,
    parse_require_auth,
)
from zenith.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    ReadyForQuery,
)

from .conftest import PASSWORD, USER, ServerFactory

SSL_REQUEST_CODE = 80877103
SECRET = "Tr0ub4dor&3-never-leaves"
SALT = b"\x01\x02\x03\x04"


def forbidden_forms(user: str, password: str) -> list[bytes]:
    """The password and everything a server could replay or crack offline as easily."""
    stored = make_md5_hash(user, password)
    return [password.encode(), stored.encode(), stored[3:].encode(),
            md5_client_response(user, password, SALT).encode()]


# ---------------------------------------------------------------------------------------
# A fake server


class FakeConn:
    """One connection to the fake server, after SSLRequest and the startup packet."""

    def __init__(self, sock: socket.socket, received: bytearray):
        self.sock = sock
        self.received = received

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            self.received += chunk
            out += chunk
        return out

    def send(self, *messages: object) -> None:
        self.sock.sendall(b"".join(m.encode() for m in messages))  # type: ignore[attr-defined]

    def read_typed(self) -> tuple[bytes, bytes]:
        kind = self.recv_exact(1)
        (length,) = struct.unpack("!i", self.recv_exact(4))
        return kind, self.recv_exact(length - 4)


Script = Callable[[FakeConn], None]


class FakeServer:
    """Accepts connections on 127.0.0.1, answers SSLRequest with ``N``, reads the startup
    packet and runs ``script``; records every byte received on every connection."""

    def __init__(self, script: Script):
        self.script = script
        self.received = bytearray()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = FakeConn(sock, self.received)
        sock.settimeout(10)
        with sock, contextlib.suppress(OSError, EOFError):
            (length,) = struct.unpack("!i", conn.recv_exact(4))
            body = conn.recv_exact(length - 4)
            if struct.unpack("!i", body[:4])[0] == SSL_REQUEST_CODE:
                sock.sendall(b"N")
                (length,) = struct.unpack("!i", conn.recv_exact(4))
                conn.recv_exact(length - 4)
            self.script(conn)
            while self._drain(conn):
                pass

    @staticmethod
    def _drain(conn: FakeConn) -> bool:
        chunk = conn.sock.recv(65536)
        conn.received += chunk
        return bool(chunk)

    def close(self) -> None:
        self.listener.close()

    def uri(self, query: str = "sslmode=prefer", user: str = USER,
            password: str = SECRET) -> str:
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@127.0.0.1:{self.port}/db?{query}")

    def assert_no_secret(self, user: str = USER, password: str = SECRET) -> None:
        time.sleep(0.1)  # let the server thread record the last bytes
        for form in forbidden_forms(user, password):
            assert form not in self.received, (form, bytes(self.received))


@pytest.fixture
def fake_server() -> Iterator[Callable[[Script], FakeServer]]:
    servers: list[FakeServer] = []

    def start(script: Script) -> FakeServer:
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ask_cleartext(conn: FakeConn) -> None:
    conn.send(AuthenticationCleartextPassword())
    with contextlib.suppress(EOFError, OSError):
        conn.read_typed()  # the password, if the client sent it
    conn.send(AuthenticationOk(), ReadyForQuery())


def ask_md5(conn: FakeConn) -> None:
    conn.send(AuthenticationMD5Password(SALT))
    with contextlib.suppress(EOFError, OSError):
        conn.read_typed()
    conn.send(AuthenticationOk(), ReadyForQuery())


def trust(conn: FakeConn) -> None:
    conn.send(AuthenticationOk(), ReadyForQuery())


@dataclass
class ScramScript:
    """A SCRAM exchange that goes wrong in the way ``ending`` says."""

    ending: str  # "ok-early", "wrong-signature", "final-first"
    iterations: int = 4096

    def __call__(self, conn: FakeConn) -> None:
        conn.send(AuthenticationSASL(("SCRAM-SHA-256",)))
        _, body = conn.read_typed()
        if self.ending == "final-first":
            conn.send(AuthenticationSASLFinal(b"v=" + base64.b64encode(bytes(32))))
            return
        match = re.search(rb"r=([^,]+)", body)
        assert match is not None
        nonce = match.group(1) + b"fakeservernonce"
        salt = base64.b64encode(b"saltsaltsaltsalt")
        conn.send(AuthenticationSASLContinue(
            b"r=" + nonce + b",s=" + salt + b",i=" + str(self.iterations).encode()))
        conn.read_typed()  # the client-final message
        if self.ending == "ok-early":
            conn.send(AuthenticationOk(), ReadyForQuery())
        else:
            conn.send(AuthenticationSASLFinal(b"v=" + base64.b64encode(bytes(32))),
                      AuthenticationOk(), ReadyForQuery())


# ---------------------------------------------------------------------------------------
# Passwords without TLS


async def test_harness_sees_a_password_that_is_allowed(
        fake_server: Callable[[Script], FakeServer]) -> None:
    """The control: with require_auth=password the fake server does receive it."""
    server = fake_server(ask_cleartext)
    async with await connect(server.uri("sslmode=prefer&require_auth=password")):
        pass
    time.sleep(0.1)
    assert SECRET.encode() in server.received


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
async def test_cleartext_request_without_tls_is_refused(
        fake_server: Callable[[Script], FakeServer], sslmode: str) -> None:
    server = fake_server(ask_cleartext)
    with pytest.raises(AuthenticationFailed) as info:
        await connect(server.uri(f"sslmode={sslmode}"))
    assert "requested a cleartext password over a connection without TLS" in str(info.value)
    assert "require_auth=password" in (info.value.hint or "")
    server.assert_no_secret()


async def test_allow_falls_back_to_tls_and_is_refused(
        fake_server: Callable[[Script], FakeServer]) -> None:
    """sslmode=allow: refused without TLS, then the retry with TLS is declined."""
    server = fake_server(ask_cleartext)
    with pytest.raises(ConnectionFailed, match="does not support SSL"):
        await connect(server.uri("sslmode=allow"))
    server.assert_no_secret()


async def test_md5_request_without_tls_is_refused(
        fake_server: Callable[[Script], FakeServer]) -> None:
    server = fake_server(ask_md5)
    with pytest.raises(AuthenticationFailed, match="requested an MD5 password over a "
                                                   "connection without TLS"):
        await connect(server.uri("sslmode=prefer"))
    server.assert_no_secret()


@pytest.mark.parametrize(("require_auth", "script", "asked"), [
    ("scram-sha-256", ask_md5, "an MD5 password"),
    ("md5", ask_cleartext, "a cleartext password"),
    ("!password", ask_cleartext, "a cleartext password"),
    ("scram-sha-256", trust, "no authentication"),
])
async def test_require_auth_refuses_before_sending(
        fake_server: Callable[[Script], FakeServer], require_auth: str, script: Script,
        asked: str) -> None:
    server = fake_server(script)
    with pytest.raises(AuthenticationFailed) as info:
        await connect(server.uri(f"sslmode=disable&require_auth={quote(require_auth)}"))
    assert f'requirement "{require_auth}" failed' in info.value.message
    assert f"requested {asked}" in info.value.message
    server.assert_no_secret()


async def test_origin_default_refuses_a_server_without_tls(
        fake_server: Callable[[Script], FakeServer]) -> None:
    server = fake_server(ask_cleartext)
    info = parse_origin_uri(server.uri("sslrootcert=system"))
    assert info.sslmode == "verify-full"
    with pytest.raises(ConnectionFailed, match="does not support SSL"):
        await connect(info)
    server.assert_no_secret()


# ---------------------------------------------------------------------------------------
# SCRAM


@pytest.mark.parametrize(("script", "error", "match"), [
    (ScramScript("ok-early"), AuthenticationFailed, "without proving that it knows"),
    (ScramScript("wrong-signature"), AuthenticationFailed, "SCRAM signature is wrong"),
    (ScramScript("final-first"), ProtocolViolation, "out of order"),
    (ScramScript("ok-early", iterations=SCRAM_MAX_ITERATIONS + 1), AuthenticationFailed,
     "iteration count from the server refused"),
    (ScramScript("ok-early", iterations=10**40), AuthenticationFailed,
     "iteration count from the server refused"),
])
async def test_broken_scram_is_refused(fake_server: Callable[[Script], FakeServer],
                                       script: ScramScript, error: type[Exception],
                                       match: str) -> None:
    server = fake_server(script)
    started = time.monotonic()
    with pytest.raises(error, match=match):
        await connect(server.uri("sslmode=disable"))
    assert time.monotonic() - started < 5
    server.assert_no_secret()
    if script.iterations > SCRAM_MAX_ITERATIONS:
        assert b"c=biws" not in server.received  # no client-final: no PBKDF2 run at all


# ---------------------------------------------------------------------------------------
# TLS: certificates made with the openssl command line


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    good: tuple[Path, Path]  # for 127.0.0.1 and localhost, signed by ca
    wrong_host: tuple[Path, Path]  # for wrong.example, signed by ca


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_leaf(d: Path, name: str, san: str, serial: int) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(serial), "-days", "2", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other")
    good = _make_leaf(d, "good", "DNS:localhost,IP:127.0.0.1", 2)
    wrong = _make_leaf(d, "wrong", "DNS:wrong.example", 3)
    return Pki(d / "ca.crt", d / "other.crt", good, wrong)


def _server_context(pair: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pair)
    return context


def _origin(port: int, query: str) -> str:
    return (f"postgresql://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:"
            f"{port}/testdb" + (f"?{query}" if query else ""))


async def test_verify_full_accepts_the_right_ca(pg_server: ServerFactory, pki: Pki) -> None:
    server = await pg_server(ssl_context=_server_context(pki.good))
    info = parse_origin_uri(_origin(server.port, f"sslrootcert={pki.ca}"))
    assert info.sslmode == "verify-full"
    async with await connect(info) as conn:
        assert (await conn.simple_query("echo")).rows[0][3] == "on"


@pytest.mark.parametrize("case", ["wrong-host", "unknown-ca", "no-root-file"])
async def test_verify_full_refuses(pg_server: ServerFactory, pki: Pki, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    pair = pki.wrong_host if case == "wrong-host" else pki.good
    server = await pg_server(ssl_context=_server_context(pair))
    root = {"wrong-host": pki.ca, "unknown-ca": pki.other_ca,
            "no-root-file": None}[case]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    info = parse_origin_uri(_origin(server.port, f"sslrootcert={root}" if root else ""))
    with pytest.raises(ConnectionFailed) as refused:
        await connect(info)
    text = str(refused.value) + (refused.value.hint or "")
    expected = {"wrong-host": "certificate verify failed", "unknown-ca":
                "certificate verify failed", "no-root-file": "sslrootcert=system"}[case]
    assert expected in text


async def test_sslrootcert_system(pg_server: ServerFactory, pki: Pki,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``system`` is the OS trust store (which the test CA is not in; SSL_CERT_FILE
    points OpenSSL's default store at it) and implies verify-full."""
    info = parse_uri(_origin(1, "sslrootcert=system"))
    assert info.sslmode == "verify-full"
    with pytest.raises(InvalidArgument, match='weak sslmode "require"'):
        parse_uri(_origin(1, "sslrootcert=system&sslmode=require"))
    server = await pg_server(ssl_context=_server_context(pki.good))
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
    with pytest.raises(ConnectionFailed, match="certificate verify failed"):
        await connect(_origin(server.port, "sslrootcert=system"))
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    async with await connect(_origin(server.port, "sslrootcert=system")) as conn:
        assert (await conn.simple_query("echo")).rows[0][3] == "on"


async def test_over_verified_tls_every_method_is_allowed(pg_server: ServerFactory,
                                                         pki: Pki) -> None:
    server = await pg_server(ssl_context=_server_context(pki.good), auth_method="password")
    async with await connect(_origin(server.port, f"sslmode=verify-full&sslrootcert={pki.ca}")):
        pass


@pytest.mark.parametrize("method", ["password", "md5"])
@pytest.mark.parametrize("query", ["sslmode=require", "sslmode=prefer", "sslmode=allow"])
async def test_over_unverified_tls_cleartext_and_md5_are_refused(
        pg_server: ServerFactory, pki: Pki, method: str, query: str) -> None:
    """TLS that checks no certificate may be an impostor's: it does not count."""
    server = await pg_server(ssl_context=_server_context(pki.good), auth_method=method)
    with pytest.raises((AuthenticationFailed, ConnectionFailed)) as info:
        await connect(_origin(server.port, query))
    assert "without TLS that verified its certificate" in str(info.value) or (
        query == "sslmode=allow" and "password authentication failed" not in str(info.value))
    asked = "a cleartext password" if method == "password" else "an MD5 password"
    if query != "sslmode=allow":
        assert f"requested {asked}" in str(info.value)
    # a root certificate makes require verified; require_auth allows it explicitly
    async with await connect(_origin(server.port, f"sslmode=require&sslrootcert={pki.ca}")):
        pass
    async with await connect(_origin(server.port, f"{query}&require_auth={method}")):
        pass


async def test_a_raised_scram_iteration_count_is_accepted(
        fake_server: Callable[[Script], FakeServer]) -> None:
    """A PostgreSQL source with scram_iterations raised is not refused for it (up to
    SCRAM_MAX_ITERATIONS): the exchange goes on to the server signature, which this fake
    server cannot give."""
    assert SCRAM_MAX_ITERATIONS == 1_000_000
    server = fake_server(ScramScript("wrong-signature", iterations=200_000))
    with pytest.raises(AuthenticationFailed, match="SCRAM signature is wrong"):
        await connect(server.uri("sslmode=disable"))
    server.assert_no_secret()


# ---------------------------------------------------------------------------------------
# Parsing


def test_require_auth_parsing() -> None:
    assert parse_require_auth("md5,password") == {"md5", "password"}
    assert "md5" not in parse_require_auth("!md5") and "password" in parse_require_auth("!md5")
    with pytest.raises(InvalidArgument, match="cannot be mixed"):
        parse_require_auth("md5,!password")
    with pytest.raises(InvalidArgument, match="invalid require_auth method"):
        parse_uri("postgresql://h/?require_auth=plain")
    info = parse_uri("postgresql://h/?require_auth=scram-sha-256")
    assert parse_uri(info.to_uri()) == info
    assert allowed_auth(parse_uri("postgresql://h/"), tls=False) == {"scram-sha-256", "none"}
    assert "password" in allowed_auth(parse_uri("postgresql://h/"), tls=True)
    assert parse_uri("postgresql://h/").sslmode == "prefer"  # not an origin
    assert parse_origin_uri("postgresql://h/?sslmode=disable").sslmode == "disable"
    for method, allowed in (("scram-sha-256", {"scram-sha-256"}), ("md5", {"md5"}),
                            ("trust", {"none"})):
        local = parse_local_uri("postgresql://u:p@127.0.0.1:5/zenith", auth_method=method)
        assert local.sslmode == "prefer"
        assert allowed_auth(local, tls=False) == allowed_auth(local, tls=True) == allowed
    with pytest.raises(InvalidArgument, match="unknown auth_method"):
        parse_local_uri("postgresql://u:p@127.0.0.1:5/zenith", auth_method="password")
    explicit = parse_local_uri("postgresql://u:p@h:5/z?require_auth=md5", auth_method="trust")
    assert allowed_auth(explicit, tls=False) == {"md5"}
    assert certificate_verified(parse_uri("postgresql://h/?sslmode=verify-ca"))
    assert certificate_verified(parse_uri("postgresql://h/?sslmode=require&sslrootcert=x"))
    assert not certificate_verified(parse_uri("postgresql://h/?sslmode=require"))
    assert not certificate_verified(parse_uri("postgresql://h/?sslmode=prefer"))


# ---------------------------------------------------------------------------------------
# End to end: the CLI and a pageserver


def test_pull_from_a_hostile_origin_keeps_the_password(
        pageserver: PageserverProc, fake_server: Callable[[Script], FakeServer]) -> None:
    server = fake_server(ask_cleartext)
    for name, query in [("evil", ""), ("evilprefer", "?sslmode=prefer")]:
        uri = f"postgresql://admin:{quote(SECRET, safe='')}@127.0.0.1:{server.port}/z{query}"
        pageserver.cli("origin", "add", name, uri, check=True)
        res = pageserver.cli("pull", "main", name)
        assert res.returncode == 1 and res.stderr.startswith("error: "), res
        assert "Traceback" not in res.stderr and SECRET not in res.stderr + res.stdout
        # verify-full: no root certificate to check against, or no TLS at all
        expected = (("root certificate file", "does not support SSL") if name == "evil" else
                    ("requested a cleartext password over a connection without TLS",))
        assert any(e in res.stderr for e in expected), res.stderr
    assert server.connections >= 2
    server.assert_no_secret(user="admin")


def test_origin_add_warns_without_tls(pageserver: PageserverProc) -> None:
    cases = {
        "postgresql://u:pw@h.example:5/z": None,
        "postgresql://u@h.example:5/z?sslmode=disable": None,  # no password in the URI
        "postgresql://u:pw@h.example:5/z?sslmode=disable": "by SCRAM only",
        "postgresql://u:pw@h.example:5/z?sslmode=prefer&require_auth=password":
            "may be sent in clear",
        "postgresql://u:pw@h.example:5/z?sslmode=allow&require_auth=md5": "sent as MD5",
        "postgresql://u:pw@h.example:5/z?sslmode=require": "does not check the server's",
    }
    for i, (uri, warning) in enumerate(cases.items()):
        res = pageserver.cli("origin", "add", f"o{i}", uri)
        assert res.returncode == 0, res
        assert "pw" not in res.stderr
        if warning is None:
            assert res.stderr == "", res.stderr
        else:
            assert res.stderr.startswith(f"warning: origin o{i}: "), res.stderr
            assert warning in res.stderr, res.stderr


async def test_scram_key_derivation_runs_off_the_event_loop(
        pg_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import zenith.pgwire.client as client_module

    in_threads: list[str] = []
    real_to_thread = asyncio.to_thread

    async def recording_to_thread(func: Callable[..., object], *args: object) -> object:
        in_threads.append(getattr(func, "__name__", ""))
        return await real_to_thread(func, *args)

    monkeypatch.setattr(client_module.asyncio, "to_thread", recording_to_thread)
    server = await pg_server(auth_method="scram-sha-256")
    async with await connect(server.uri()):
        pass
    assert "client_final" in in_threads
