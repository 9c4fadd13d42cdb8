"""Our client against our server over real sockets: authentication, TLS, queries, errors,
notices, COPY in all three directions, cancellation, timeouts, concurrency."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from pathlib import Path

import pytest

from zenith.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    FeatureNotSupported,
    InvalidArgument,
    ServerError,
    SyntaxError_,
    ZenithError,
)
from zenith.pgwire.client import Notice, connect, decode_bytea
from zenith.pgwire.conninfo import parse_uri
from zenith.pgwire.messages import (
    ErrorResponse,
    ExtendedQueryMessage,
    FrontendType,
    Query,
    ReadyForQuery,
    StartupMessage,
    Sync,
)
from zenith.pgwire.server import close_server

from .conftest import MD5_ONLY_PASSWORD, MD5_ONLY_USER, PASSWORD, USER, ServerFactory

# Without TLS the client sends a password in clear or as MD5 only when the URI allows it.
REQUIRE_AUTH = {"scram-sha-256": "scram-sha-256", "md5": "md5", "password": "password",
                "trust": "none"}


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password", "trust"])
async def test_authentication_methods(pg_server: ServerFactory, method: str) -> None:
    server = await pg_server(auth_method=method)
    query = f"sslmode=disable&application_name=tester&require_auth={REQUIRE_AUTH[method]}"
    async with await connect(server.uri(query=query)) as conn:
        result = await conn.simple_query("echo hi")
        assert result.columns == ["user", "database", "arg", "tls", "application_name"]
        assert result.rows == [[USER, "testdb", "hi", "off", "tester"]]
        assert result.command_tag == "SELECT 1"
        assert conn.parameters["server_version"] == "15.0 (zenith)"
        assert conn.parameters["application_name"] == "tester"
        assert conn.parameters["client_encoding"] == "UTF8"
        assert conn.backend_key is not None


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
async def test_wrong_password_and_unknown_user_look_the_same(
        pg_server: ServerFactory, method: str) -> None:
    server = await pg_server(auth_method=method)
    query = f"sslmode=disable&require_auth={REQUIRE_AUTH[method]}"
    with pytest.raises(AuthenticationFailed) as wrong:
        await connect(server.uri(password="wrong", query=query))
    with pytest.raises(AuthenticationFailed) as unknown:
        await connect(server.uri(user="nobody", password="wrong", query=query))
    assert wrong.value.message == f'password authentication failed for user "{USER}"'
    assert unknown.value.message == 'password authentication failed for user "nobody"'
    assert wrong.value.sqlstate == "28P01"
    async with await connect(server.uri(query=query)) as conn:  # it still serves others
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_md5_server_falls_back_to_scram_for_scram_only_users(
        pg_server: ServerFactory) -> None:
    server = await pg_server(auth_method="md5")
    async with await connect(server.uri(user=MD5_ONLY_USER, password=MD5_ONLY_PASSWORD,
                                        query="sslmode=disable&require_auth=md5")) as c:
        assert (await c.simple_query("echo")).rows[0][0] == MD5_ONLY_USER
    scram_server = await pg_server(auth_method="scram-sha-256")
    with pytest.raises(AuthenticationFailed):  # an md5-only user cannot do SCRAM
        await connect(scram_server.uri(user=MD5_ONLY_USER, password=MD5_ONLY_PASSWORD))


async def test_trust_refuses_unknown_role(pg_server: ServerFactory) -> None:
    server = await pg_server(auth_method="trust")
    with pytest.raises(ServerError, match='role "nobody" does not exist') as info:
        await connect(server.uri(user="nobody"))
    assert info.value.sqlstate == "28000"


async def test_missing_password(pg_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                tmp_path: Path) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    server = await pg_server()
    with pytest.raises(AuthenticationFailed, match="no password was supplied"):
        await connect(server.uri(password=None))
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    async with await connect(server.uri(password=None)):
        pass


async def test_password_from_pgpass(pg_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    server = await pg_server()
    pgpass = tmp_path / "pgpass"
    escaped = PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    pgpass.write_text(f"127.0.0.1:{server.port}:testdb:{USER}:{escaped}\n")
    pgpass.chmod(0o600)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    async with await connect(server.uri(password=None)):
        pass


async def test_errors_keep_the_connection_usable(pg_server: ServerFactory,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        with pytest.raises(InvalidArgument) as info:
            await conn.simple_query("fail")
        assert (info.value.message, info.value.detail, info.value.hint) == (
            "you asked for it", "some detail", "some hint")
        with pytest.raises(SyntaxError_, match='unknown command "bogus"'):
            await conn.simple_query("bogus")
        with (caplog.at_level(logging.ERROR, logger="zenith.pgwire.server"),
              pytest.raises(ZenithError) as crash):
            await conn.simple_query("crash")
        assert (crash.value.sqlstate, crash.value.message) == ("XX000", "internal error")
        assert "handler bug" in caplog.text  # the traceback is logged, not sent
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_result_shapes(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        empty = await conn.simple_query("  ; ")
        assert empty.command_tag is None and empty.rows == []
        binary = await conn.simple_query("bytes")
        assert binary.column_types == [17, 25]
        assert binary.rows == [["\\x00ff", "x"], [None, None]]
        assert decode_bytea(binary.rows[0][0] or "") == b"\x00\xff"
        many = await conn.simple_query("rows 5000")
        assert len(many.rows) == 5000 and many.rows[-1] == ["4999"]
        for statement, tag in [("BEGIN", "BEGIN"), ("set x = 1", "SET"), ("commit;", "COMMIT")]:
            assert (await conn.simple_query(statement)).command_tag == tag


async def test_notices_arrive_live(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        live: list[Notice] = []
        conn.on_notice = live.append
        result = await conn.simple_query("notice 3")
        assert [n.message for n in result.notices] == ["step 0", "step 1", "step 2"]
        assert live == result.notices and live[0].severity == "NOTICE"
        assert result.command_tag == "NOTICE"


async def test_copy_both_round_trip(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        stream = await conn.copy_both("copyboth")
        sent = [b"abc", b"x" * 3_000_000, b""]
        received = []
        for chunk in sent:
            await stream.write(chunk)
            received.append(await stream.read())
        await stream.done()
        assert await stream.read() is None
        assert received == [c.upper() for c in sent]
        assert stream.result is not None and stream.result.rows == [[str(3_000_003)]]
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_copy_both_server_error(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        stream = await conn.copy_both("copyboth_fail")
        await stream.write(b"segment")
        with pytest.raises(InvalidArgument, match="rejected the stream"):
            await stream.read()
        assert (await conn.simple_query("echo")).rows[0][0] == USER
        with pytest.raises(SyntaxError_):
            await conn.copy_both("nonsense")
        with pytest.raises(Exception, match="did not start copy_both"):
            await conn.copy_both("echo")
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_copy_out_and_in(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        stream = await conn.copy_out("copyout 4")
        lines = [chunk async for chunk in stream]
        assert lines == [f"line {i}\n".encode() for i in range(4)]
        assert stream.result is not None and stream.result.command_tag == "COPY 4"

        stream = await conn.copy_in("copyin")
        for _ in range(10):
            await stream.write(b"0123456789")
        await stream.done()
        assert stream.result is not None and stream.result.command_tag == "COPY 100"

        stream = await conn.copy_in("copyin")
        await stream.write(b"partial")
        await stream.fail("changed my mind")
        assert (await conn.simple_query("echo")).rows[0][0] == USER

        async with await conn.copy_out("copyout 2") as stream:
            pass  # finish() drains the rest
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_simple_query_refuses_copy(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        for command in ("copyin", "copyout 2", "copyboth"):
            with pytest.raises(FeatureNotSupported, match="started a COPY"):
                await conn.simple_query(command)
            assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_cancel_request(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        query = asyncio.create_task(conn.simple_query("sleep 30"))
        await asyncio.sleep(0.2)
        await conn.cancel()
        with pytest.raises(ServerError, match="canceling statement due to user request") as e:
            await asyncio.wait_for(query, 5)
        assert e.value.sqlstate == "57014"
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_operations_are_sequential(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await connect(server.uri()) as conn:
        stream = await conn.copy_out("copyout 1")
        with pytest.raises(RuntimeError, match="in progress"):
            await conn.simple_query("echo")
        await stream.finish()
        await conn.simple_query("echo")
    with pytest.raises(ConnectionFailed, match="closed"):
        await conn.simple_query("echo")


async def test_tls_require(pg_server: ServerFactory, server_ssl_context: ssl.SSLContext,
                           tls_files: tuple[Path, Path]) -> None:
    server = await pg_server(ssl_context=server_ssl_context)
    for mode in ("require", "prefer", "allow"):
        async with await connect(server.uri(query=f"sslmode={mode}")) as conn:
            expected = "off" if mode == "allow" else "on"  # allow tries plain text first
            assert (await conn.simple_query("echo")).rows[0][3] == expected
    cert = tls_files[0]
    async with await connect(server.uri(
            host="localhost", query=f"sslmode=verify-full&sslrootcert={cert}")) as conn:
        assert (await conn.simple_query("echo")).rows[0][3] == "on"
    async with await connect(server.uri(query=f"sslmode=verify-ca&sslrootcert={cert}")):
        pass
    with pytest.raises(ConnectionFailed, match="SSL error"):  # 127.0.0.1 is not in the cert
        await connect(server.uri(query=f"sslmode=verify-full&sslrootcert={cert}"))
    with pytest.raises(ConnectionFailed, match="root certificate file"):
        await connect(server.uri(query="sslmode=verify-ca&sslrootcert=/nonexistent.pem"))


async def test_tls_required_but_not_offered(pg_server: ServerFactory) -> None:
    server = await pg_server()
    with pytest.raises(ConnectionFailed, match="does not support SSL"):
        await connect(server.uri(query="sslmode=require"))
    async with await connect(server.uri(query="sslmode=prefer")) as conn:
        assert (await conn.simple_query("echo")).rows[0][3] == "off"


async def test_unreachable_server() -> None:
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionFailed, match=f"could not connect to 127.0.0.1:{port}"):
        await connect(f"postgresql://u:p@127.0.0.1:{port}/db")


async def test_connect_timeout_covers_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionFailed, match=f"timeout expired connecting to 127.0.0.1:"
                                                   f"{port} after 0.3 s"):
            await connect(f"postgresql://u:p@127.0.0.1:{port}/db", timeout=0.3)
    finally:
        server.close()


async def test_connect_accepts_conninfo(pg_server: ServerFactory) -> None:
    server = await pg_server()
    info = parse_uri(server.uri())
    async with await connect(info) as conn:
        assert conn.info == info


async def test_auth_timeout(pg_server: ServerFactory) -> None:
    server = await pg_server(auth_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(StartupMessage.build({"user": USER}).encode())
    data = await asyncio.wait_for(reader.read(), 5)  # the server gives up and closes
    writer.close()
    assert b"canceling authentication due to timeout" in data


async def test_extended_protocol_gets_an_error_then_resyncs(pg_server: ServerFactory) -> None:
    server = await pg_server(auth_method="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(StartupMessage.build({"user": USER}).encode())
    from zenith.pgwire.decoder import Decoder
    from zenith.pgwire.messages import Sender

    decoder = Decoder(Sender.BACKEND)

    async def until_ready() -> list[object]:
        got: list[object] = []
        while True:
            message = decoder.next()
            if message is None:
                decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
                continue
            got.append(message)
            if isinstance(message, ReadyForQuery):
                return got

    await until_ready()
    writer.write(b"".join(m.encode() for m in [
        ExtendedQueryMessage(FrontendType.PARSE, b"\0echo\0\0\0"),
        ExtendedQueryMessage(FrontendType.BIND, b"\0\0\0\0\0\0\0\0"),
        ExtendedQueryMessage(FrontendType.EXECUTE, b"\0\0\0\0\0"),
        Query("echo"),  # discarded too: it precedes Sync
        Sync(), Query("echo")]))
    first = await until_ready()
    assert [type(m).__name__ for m in first] == ["ErrorResponse", "ReadyForQuery"]
    error = first[0]
    assert isinstance(error, ErrorResponse) and error.code == "0A000"
    assert "extended query protocol is not supported" in error.message
    second = await until_ready()
    assert [type(m).__name__ for m in second] == [
        "RowDescription", "DataRow", "CommandComplete", "ReadyForQuery"]
    writer.write(ExtendedQueryMessage(FrontendType.FUNCTION_CALL, b"\0\0\0\1").encode())
    third = await until_ready()  # FunctionCall is answered at once, no Sync needed
    assert isinstance(third[0], ErrorResponse) and third[0].code == "0A000"
    writer.close()


async def test_unsupported_protocol_version(pg_server: ServerFactory) -> None:
    server = await pg_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(struct.pack("!II", 8, 2 << 16))
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"0A000" in data and b"unsupported frontend protocol 2.0" in data


async def test_minor_protocol_version_is_negotiated(pg_server: ServerFactory) -> None:
    server = await pg_server(auth_method="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(StartupMessage((("user", USER), ("_pq_.extension", "on")),
                                (3 << 16) | 2).encode())
    data = await asyncio.wait_for(reader.readuntil(b"Z\x00\x00\x00\x05I"), 5)
    writer.close()
    assert data.startswith(b"v") and b"_pq_.extension" in data


async def test_many_concurrent_connections(pg_server: ServerFactory) -> None:
    server = await pg_server()

    async def one(i: int) -> str | None:
        async with await connect(server.uri(), timeout=30) as conn:
            return (await conn.simple_query(f"echo {i}")).rows[0][2]

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [str(i) for i in range(200)]


async def test_close_server_ends_open_connections(pg_server: ServerFactory) -> None:
    server = await pg_server()
    idle = await connect(server.uri())
    busy = await connect(server.uri())
    sleeping = asyncio.create_task(busy.simple_query("sleep 30"))
    await asyncio.sleep(0.1)
    await close_server(server.server, grace=0.2)
    with pytest.raises(ConnectionFailed):
        await asyncio.wait_for(sleeping, 5)
    with pytest.raises(ConnectionFailed):
        await idle.simple_query("echo")
    await idle.close()
    await busy.close()
