"""Hostile input against a live server: garbage, truncated and oversized packets before and
after authentication. The server must answer with well-formed messages (an 08P01 error when
it can) or close, never crash, never wait for a claimed huge body, and keep serving."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenith.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    FeatureNotSupported,
    ProtocolViolation,
)
from zenith.pgwire.client import connect
from zenith.pgwire.messages import (
    PROTOCOL_VERSION_3_0,
    CopyData,
    CopyDone,
    CopyFail,
    ErrorResponse,
    ExtendedQueryMessage,
    Flush,
    FrontendType,
    GSSENCRequest,
    Query,
    SSLRequest,
    StartupMessage,
    Sync,
)

from .conftest import USER, ThreadedServer, decode_backend, header, recv_all, trust_login

fuzz_settings = settings(max_examples=60, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scram_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer(auth_timeout=3.0)
    yield server
    server.stop()
    assert not server.errors, server.errors


def still_serving(server: ThreadedServer) -> None:
    """A normal session works after whatever the previous one did."""
    with trust_login(server.port) as sock:
        sock.sendall(Query("echo ok").encode())
        data, _ = recv_all_until_ready(sock)
        rows = [m for m in decode_backend(data) if type(m).__name__ == "DataRow"]
        assert rows and rows[0].values[0] == USER.encode()  # type: ignore[union-attr]


def recv_all_until_ready(sock: socket.socket) -> tuple[bytes, bool]:
    """Read up to a ReadyForQuery('I'); (data, whether the server closed first)."""
    data = b""
    sock.settimeout(5)
    while not data.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = sock.recv(65536)
        if not chunk:
            return data, True
        data += chunk
    return data, False


def exchange(port: int, payload: bytes, *, login: bool = False,
             timeout: float = 0.15) -> tuple[bytes, bool]:
    sock = trust_login(port) if login else socket.create_connection(("127.0.0.1", port), 5)
    with sock:
        try:
            sock.sendall(payload)
        except OSError:
            return b"", True  # closed on us mid-send: acceptable
        return recv_all(sock, timeout)


def assert_clean_answer(data: bytes) -> None:
    """Whatever came back is a sequence of well-formed backend messages, possibly
    preceded by single-byte SSL/GSS negotiation answers."""
    while data[:1] in (b"N",) and (len(data) == 1 or data[1:2] in (b"N", b"E", b"")):
        data = data[1:]
    for message in decode_backend(data):
        if isinstance(message, ErrorResponse):
            assert message.code in ("08P01", "0A000", "28000", "57014", "42601", "22023",
                                    "XX000"), message


startup_junk = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, body: struct.pack("!I", n) + body, st.integers(0, 2**32 - 1),
              st.binary(max_size=32)),
    st.builds(lambda code, body: struct.pack("!II", len(body) + 8, code) + body,
              st.sampled_from([PROTOCOL_VERSION_3_0, 80877103, 80877102, 80877104, 1 << 16,
                               (3 << 16) | 7, 0]), st.binary(max_size=48)),
)


@fuzz_settings
@given(st.lists(startup_junk, min_size=1, max_size=3))
def test_garbage_before_startup(trust_server: ThreadedServer, pieces: list[bytes]) -> None:
    data, _closed = exchange(trust_server.port, b"".join(pieces))
    if not data.startswith(b"S"):  # no TLS configured, so never 'S'
        assert_clean_answer(data)


def framed(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!I", len(body) + 4) + body


typed_junk = st.one_of(
    st.binary(max_size=32),
    st.builds(framed, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(lambda kind, n: bytes((kind,)) + struct.pack("!I", n),
              st.integers(0, 255), st.integers(0, 2**32 - 1)),
    st.sampled_from([m.encode() for m in (
        Sync(), Flush(), CopyDone(), CopyData(b"x"), CopyFail("no"), Query("echo"),
        Query(""), Query("fail"), Query("nonsense"),
        ExtendedQueryMessage(FrontendType.PARSE, b"\0echo\0\0\0"),
        ExtendedQueryMessage(FrontendType.FUNCTION_CALL, b"\0\0\0\1"))]),
)


@fuzz_settings
@given(st.lists(typed_junk, min_size=1, max_size=6))
def test_garbage_after_login(trust_server: ThreadedServer, pieces: list[bytes]) -> None:
    data, _closed = exchange(trust_server.port, b"".join(pieces), login=True)
    assert_clean_answer(data)


@fuzz_settings
@given(st.lists(typed_junk, min_size=1, max_size=4))
def test_garbage_during_authentication(scram_server: ThreadedServer,
                                       pieces: list[bytes]) -> None:
    start = StartupMessage.build({"user": USER}).encode()
    data, _closed = exchange(scram_server.port, start + b"".join(pieces))
    assert_clean_answer(data)


def test_servers_survive_the_fuzzing(trust_server: ThreadedServer,
                                     scram_server: ThreadedServer) -> None:
    still_serving(trust_server)
    assert not trust_server.errors and not scram_server.errors


@pytest.mark.parametrize("payload", [
    struct.pack("!I", 2**31) + b"xxxx",  # startup packet claiming 2 GiB
    struct.pack("!I", 10_001),
    SSLRequest().encode() + b"early",  # plaintext injected after the SSLRequest
    GSSENCRequest().encode() + GSSENCRequest().encode(),
    StartupMessage.build({"user": USER}).encode() + header(b"p", 2**31),
    StartupMessage.build({"user": USER}).encode() + header(b"p", 1_000_000),  # pre-auth cap
    StartupMessage.build({"database": "x"}).encode(),  # no user
])
def test_bad_startup_is_refused_at_once(scram_server: ThreadedServer, payload: bytes) -> None:
    started = time.monotonic()
    data, closed = exchange(scram_server.port, payload, timeout=2.0)
    assert closed and time.monotonic() - started < 1.5  # no waiting for the claimed body
    assert_clean_answer(data)
    errors = [m for m in decode_backend(data.lstrip(b"N")) if isinstance(m, ErrorResponse)]
    assert errors and errors[-1].severity == "FATAL"


@pytest.mark.parametrize("payload", [
    header(b"Q", 2**31 - 1),
    header(b"d", 2**32 - 1),
    header(b"Q", 2),
    header(b"\x00", 8),
    header(b"S", 9) + b"12345",
    Query("echo").encode()[:-1] + b"x",  # unterminated string
])
def test_bad_message_after_login_is_refused_at_once(trust_server: ThreadedServer,
                                                    payload: bytes) -> None:
    started = time.monotonic()
    data, closed = exchange(trust_server.port, payload, login=True, timeout=2.0)
    assert closed and time.monotonic() - started < 1.5
    messages = decode_backend(data)
    assert isinstance(messages[-1], ErrorResponse) and messages[-1].code == "08P01"
    assert messages[-1].severity == "FATAL"
    still_serving(trust_server)


def test_gssenc_and_ssl_requests_are_declined(trust_server: ThreadedServer) -> None:
    with socket.create_connection(("127.0.0.1", trust_server.port), 5) as sock:
        sock.sendall(GSSENCRequest().encode())
        assert sock.recv(1) == b"N"
        sock.sendall(SSLRequest().encode())
        assert sock.recv(1) == b"N"
        sock.sendall(StartupMessage.build({"user": USER}).encode())
        data, _ = recv_all_until_ready(sock)
        assert data.startswith(b"R\x00\x00\x00\x08\x00\x00\x00\x00")  # AuthenticationOk


def test_cancel_request_with_unknown_key_just_closes(trust_server: ThreadedServer) -> None:
    from zenith.pgwire.messages import CancelRequest

    data, closed = exchange(trust_server.port, CancelRequest(12345, 678).encode(), timeout=2)
    assert closed and data == b""


def test_tls_handshake_garbage(server_ssl_context: ssl.SSLContext) -> None:
    server = ThreadedServer(ssl_context=server_ssl_context)
    try:
        for junk in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n", b""):
            with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
                sock.sendall(SSLRequest().encode())
                assert sock.recv(1) == b"S"
                if junk:
                    sock.sendall(junk)
                else:
                    sock.shutdown(socket.SHUT_WR)
                _data, closed = recv_all(sock, 3)
                assert closed
    finally:
        server.stop()
    assert not server.errors, server.errors


# -- a hostile server against our client ----------------------------------------------


async def fake_server(answer: bytes) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # SSLRequest or the start of the StartupMessage
        writer.write(answer)
        await writer.drain()
        await reader.read()  # keep the connection open until the client gives up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("sslmode", "answer", "error", "match"), [
    ("require", b"SXXXX", ProtocolViolation, "unencrypted data after SSL response"),
    ("require", b"Q", ProtocolViolation, "invalid response to SSL negotiation"),
    ("disable", header(b"R", 2**31), ProtocolViolation, "too large"),
    ("disable", header(b"Q", 8), ProtocolViolation, "invalid backend message type"),
    ("disable", header(b"R", 8) + struct.pack("!i", 7), FeatureNotSupported,
     "authentication method 7"),
    ("disable", ErrorResponse.build("28P01", "go away", severity="FATAL").encode(),
     AuthenticationFailed, "go away"),
    ("disable", b"", ConnectionFailed, "timeout expired"),
])
async def test_client_against_hostile_server(sslmode: str, answer: bytes,
                                             error: type[Exception], match: str) -> None:
    server, port = await fake_server(answer)
    try:
        with pytest.raises(error, match=match):
            await connect(f"postgresql://u:p@127.0.0.1:{port}/db?sslmode={sslmode}",
                          timeout=1.0)
    finally:
        server.close()
