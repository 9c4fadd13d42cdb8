"""The server's limits at the pgwire level (docs/limits.md): statement timeout counted from
the last traffic, idle timeout, connection slots. The live-pageserver campaign is
tests/pageserver/test_hostile_limits.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from zenith.errors import LimitExceeded, ServerError, TooManyConnections
from zenith.pgwire.client import connect
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
