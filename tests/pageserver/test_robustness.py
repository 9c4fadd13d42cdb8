"""A real pageserver process under many clients, slow clients and hostile bytes."""

from __future__ import annotations

import asyncio
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures import PageserverProc
from zenith.pgwire.client import connect


async def _status(uri: str) -> str:
    async with await connect(uri, timeout=30) as conn:
        res = await conn.simple_query("status")
        await conn.simple_query("branch_list")
        return str(res.rows[0][1])


def test_200_concurrent_connections(pageserver: PageserverProc) -> None:
    async def main() -> list[str]:
        return await asyncio.gather(*(_status(pageserver.uri()) for _ in range(200)))

    ids = asyncio.run(main())
    assert len(ids) == 200 and len(set(ids)) == 1


def test_a_stalled_client_does_not_stall_others(pageserver: PageserverProc) -> None:
    pageserver.cli("generate", "main", "--pages", "2000", check=True)

    async def main() -> None:
        # One client asks for a big answer and never reads it ...
        stalled = await connect(pageserver.uri())
        stalled._stream.write_raw(b"".join(  # type: ignore[attr-defined]
            b"Q" + struct.pack("!I", 4 + len(q) + 1) + q + b"\0"
            for q in [b"digest main"] * 50 + [b"user_list"] * 2000))
        await stalled._stream.drain()  # type: ignore[attr-defined]
        # ... and others are served meanwhile.
        for _ in range(20):
            assert await asyncio.wait_for(_status(pageserver.uri()), 10)
        await stalled.close()

    asyncio.run(main())


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        except OSError:
            return b""


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, rest: struct.pack("!I", n) + rest,
              st.integers(0, 2**32 - 1), st.binary(max_size=32)),
    st.builds(lambda n, rest: struct.pack("!II", n, 196608) + rest,
              st.integers(0, 2**32 - 1), st.binary(max_size=32)),
))
def test_hostile_startup_bytes(pageserver: PageserverProc, data: bytes) -> None:
    _raw(pageserver.port, data)
    assert _raw(pageserver.port, struct.pack("!II", 8, 80877103)) == b"N"  # still answering


def test_still_serving_after_hostility(pageserver: PageserverProc) -> None:
    for junk in [b"\0" * 8, struct.pack("!I", 2**31) + b"x", b"GET / HTTP/1.1\r\n\r\n"]:
        _raw(pageserver.port, junk)
    assert asyncio.run(_status(pageserver.uri()))
