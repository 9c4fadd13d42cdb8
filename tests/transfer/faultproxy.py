"""A TCP proxy between two pageservers that injects faults into a transfer's stream
(DESIGN §9; the idea of asyncpg's TCPFuzzingProxy): the production code has no test
switches, the faults come from outside.

It follows the PostgreSQL protocol from client to server (untyped startup messages, then
typed ones) and counts the CopyData messages that carry a DATA frame of the transfer.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass

from zenith.transfer.messages import FrameType

_UNTYPED_CODES = (80877103, 80877104, 80877102)  # SSLRequest, GSSENCRequest, CancelRequest


@dataclass
class Faults:
    corrupt_data_frame: int = 0  # flip a byte of the N-th DATA frame (1-based)
    cut_after_data_frames: int = 0  # close both sides after N DATA frames went through


class FaultProxy:
    """``with FaultProxy(target_port, Faults(...)) as proxy:`` — connect to ``proxy.port``."""

    def __init__(self, target_port: int, faults: Faults) -> None:
        self.target_port = target_port
        self.faults = faults
        self.data_frames = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def down() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        back = asyncio.create_task(down())
        try:
            await self._forward(reader, up_writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            writer.close()
            back.cancel()

    async def _forward(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        started = False
        while True:
            if not started:  # untyped: length, then a code or the protocol version
                head = await reader.readexactly(8)
                length, code = struct.unpack(">II", head)
                message = head + await reader.readexactly(length - 8)
                started = code not in _UNTYPED_CODES
            else:
                head = await reader.readexactly(5)
                length = struct.unpack(">I", head[1:])[0]
                message = bytearray(head + await reader.readexactly(length - 4))
                if head[:1] == b"d" and len(message) > 5 and message[5] == FrameType.DATA:
                    self.data_frames += 1
                    if self.data_frames == self.faults.corrupt_data_frame:
                        message[-1] ^= 0xFF
                    if self.data_frames == self.faults.cut_after_data_frames + 1 and \
                            self.faults.cut_after_data_frames:
                        return
                message = bytes(message)
            up.write(message)
            await up.drain()
