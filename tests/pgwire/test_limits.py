"""The server's limits at the pgwire level (docs/limits.md): statement timeout counted from
the last traffic, idle timeout, connection slots. The live-pageserver campaign is
tests/pageserver/test_hostile_limits.py."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from zenith.errors import (
    ConnectionFailed,
    InvalidArgument,
    LimitExceeded,
    ProtocolViolation,
    QueryTooLong,
    ServerError,
    TooManyConnections,
)
from zenith.pgwire.client import connect
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import (
    CopyData,
    ErrorResponse,
    Query,
    ReadyForQuery,
    Sender,
    StartupMessage,
)
from zenith.pgwire.server import ConnectionSlots, ServerConfig, StoredUser

from .conftest import USER, ServerFactory


async def test_statement_timeout_cancels_a_silent_command(pg_server: ServerFactory) -> None:
    server = await pg_server(statement_timeout=0.5)
    async with await connect(server.uri()) as conn:
        start = time.monotonic()
        with pytest.raises(ServerError, match="canceling statement due to statement timeout") \
                as info:
            await conn.simple_query("sleep 30")
        assert info.value.sqlstate == "57014"
        assert 0.45 < time.monotonic() - start < 3
        assert (await conn.simple_query("echo")).rows[0][0] == USER  # still usable


async def test_traffic_keeps_a_long_command_alive(pg_server: ServerFactory) -> None:
    server = await pg_server(statement_timeout=0.5)
    async with await connect(server.uri()) as conn:
        async with await conn.copy_both("copyboth") as stream:
            for _ in range(8):  # 1.6 s in all, never 0.5 s without traffic
                await stream.write(b"ab")
                await asyncio.sleep(0.2)
            await stream.done()
            echoed = b"".join([chunk async for chunk in stream])
        assert echoed == b"AB" * 8


async def test_query_size_limit(pg_server: ServerFactory) -> None:
    server = await pg_server(max_query_size=2048)
    async with await connect(server.uri()) as conn:
        assert (await conn.simple_query("echo " + "x" * 2000)).rows[0][2] == "x" * 2000
    async with await connect(server.uri()) as conn:
        with pytest.raises(LimitExceeded, match="query text is too long: 2101 bytes"):
            await conn.simple_query("echo " + "x" * 2096)


def test_connection_slots() -> None:
    config = ServerConfig(max_connections=5, max_connections_per_user=2,
                          reserved_connections=1)
    slots = ConnectionSlots()
    read, admin = StoredUser("r", "read"), StoredUser("a", "admin")
    for _ in range(2):
        slots.open(config)
        slots.sign_in(config, read)
    slots.open(config)
    with pytest.raises(TooManyConnections, match='too many connections for role "r"'):
        slots.sign_in(config, read)
    slots.close(None)
    for _ in range(3):  # admins: no per-user limit, and the reserved slot
        slots.open(config)
        slots.sign_in(config, admin)
    with pytest.raises(TooManyConnections, match="sorry, too many clients already"):
        slots.open(config)
    slots.close(admin)
    slots.open(config)
    with pytest.raises(TooManyConnections, match="reserved"):
        slots.sign_in(config, StoredUser("other", "push"))
    slots.close(None)
    for _ in range(2):
        slots.close(read)
    for _ in range(2):
        slots.close(admin)
    assert (slots.total, slots.per_user) == (0, {})


# -- every message after sign-in is bounded (docs/limits.md) --------------------------------


def _signed_in_decoder() -> Decoder:
    decoder = Decoder(Sender.FRONTEND)
    decoder.in_startup = False
    decoder.max_query_size = 2048  # as the server sets it at sign-in
    return decoder


@pytest.mark.parametrize(("kind", "error", "match"), [
    (b"Q", QueryTooLong, "query text is too long"),
    (b"P", QueryTooLong, "message of type 'P' is too long: 3000000 bytes, limit 2048"),
    (b"B", QueryTooLong, "message of type 'B' is too long"),
    (b"D", ProtocolViolation, "too large: 3000004 bytes claimed, limit 65535"),
    (b"E", ProtocolViolation, "too large"),
    (b"f", ProtocolViolation, "too large"),  # CopyFail
    (b"p", ProtocolViolation, "too large"),
])
def test_messages_after_sign_in_refused_from_the_header(
        kind: bytes, error: type[ProtocolViolation], match: str) -> None:
    decoder = _signed_in_decoder()
    with pytest.raises(error, match=match):
        decoder.feed(kind + struct.pack("!I", 3_000_004) + b"x" * 100)
    assert decoder.buffered < 200  # nothing of the body waited for


def test_copy_data_outside_copy_is_dropped_unbuffered() -> None:
    decoder = _signed_in_decoder()
    size = 50 * 1024 * 1024
    decoder.feed(b"d" + struct.pack("!I", size + 4))
    sent, chunk = 0, b"z" * 256 * 1024
    while sent < size:
        part = chunk[: size - sent]
        decoder.feed(part)
        sent += len(part)
        assert decoder.next() is None
        assert decoder.buffered == 0  # dropped as it came
    decoder.feed(Query("status").encode() + b"d" + struct.pack("!I", 7) + b"abc")
    assert decoder.next() == Query("status")
    assert decoder.next() is None and decoder.buffered == 0
    # In COPY IN/BOTH the same message is data, up to max_message_size.
    decoder.copy_in = True
    big = b"y" * (5 * 1024 * 1024)
    decoder.feed(CopyData(big).encode())
    assert decoder.next() == CopyData(big)


async def test_big_copy_data_only_in_copy(pg_server: ServerFactory) -> None:
    server = await pg_server(max_query_size=2048)
    async with await connect(server.uri()) as conn:
        big = b"q" * (5 * 1024 * 1024)
        async with await conn.copy_in("copyin") as stream:
            await stream.write(big)
            await stream.write(big)
        # The tail of a COPY the server failed (larger than any other message may be)
        # is dropped without a FATAL: the connection stays usable.
        with pytest.raises(InvalidArgument, match="rejected the stream"):
            async with await conn.copy_both("copyboth_fail") as both:
                for _ in range(4):
                    await both.write(big)
                await both.done()
                async for _chunk in both:
                    pass
        assert (await conn.simple_query("echo")).rows[0][0] == USER
        # A CopyData outside COPY, sent raw: dropped as it arrives.
        stream = conn._stream  # type: ignore[attr-defined]
        stream.write_copy_data(big)
        await stream.drain()
        assert (await conn.simple_query("echo after")).rows[0][2] == "after"


async def _raw_message_answer(server_uri: str, raw: bytes) -> ErrorResponse:
    conn = await connect(server_uri)
    stream = conn._stream  # type: ignore[attr-defined]
    try:
        stream.write_raw(raw)
        await stream.drain()
        answer = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(answer, ErrorResponse)
        with pytest.raises(ConnectionFailed):  # FATAL: the connection is closed
            await asyncio.wait_for(stream.recv(), 10)
        return answer
    finally:
        await conn.close()


async def test_parse_and_bind_over_the_cap(pg_server: ServerFactory) -> None:
    server = await pg_server(max_query_size=2048)
    for kind in (b"P", b"B"):
        answer = await _raw_message_answer(
            server.uri(), kind + struct.pack("!I", 60 * 1024 * 1024) + b"\0" * 1000)
        assert (answer.severity, answer.code) == ("FATAL", "54000")
        assert "limit 2048" in answer.message
    # Under the cap: the usual 0A000, and the connection stays usable.
    async with await connect(server.uri()) as conn:
        stream = conn._stream  # type: ignore[attr-defined]
        stream.write_raw(b"P" + struct.pack("!I", 4 + 1000) + b"\0" * 1000
                         + b"S" + struct.pack("!I", 4))
        await stream.drain()
        answer = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(answer, ErrorResponse) and answer.code == "0A000"
        assert isinstance(await asyncio.wait_for(stream.recv(), 10), ReadyForQuery)
        assert (await conn.simple_query("echo")).rows[0][0] == USER


async def test_sasl_mechanism_echoed_truncated(pg_server: ServerFactory) -> None:
    server = await pg_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(StartupMessage((("user", USER),)).encode())
        mechanism = b"M" * 60_000
        body = mechanism + b"\0" + struct.pack("!i", -1)
        writer.write(b"p" + struct.pack("!I", 4 + len(body)) + body)
        await writer.drain()
        decoder = Decoder(Sender.BACKEND)
        messages: list[object] = []
        while not any(isinstance(m, ErrorResponse) for m in messages):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            decoder.feed(data)
            messages += list(decoder)
        error = next(m for m in messages if isinstance(m, ErrorResponse))
        assert error.code == "08P01" and "invalid SASL authentication mechanism" in error.message
        assert error.detail is not None and "MMMM" in error.detail
        assert len(error.detail) < 400
    finally:
        writer.close()


async def test_long_user_name_echoed_truncated(pg_server: ServerFactory) -> None:
    server = await pg_server(auth_method="trust")
    with pytest.raises(ServerError) as info:
        await connect(server.uri(user="u" * 9000, password=None))
    assert 'role "uuu' in info.value.message and len(info.value.message) < 400


async def test_idle_timeout_zero_is_off(pg_server: ServerFactory) -> None:
    server = await pg_server(idle_timeout=0)
    async with await connect(server.uri()) as conn:
        await asyncio.sleep(1.5)
        assert (await conn.simple_query("echo")).rows[0][0] == USER
