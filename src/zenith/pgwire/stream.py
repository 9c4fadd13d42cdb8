"""The one place where protocol messages meet asyncio streams.

:class:`MessageStream` drives a sans-I/O :class:`~zenith.pgwire.decoder.Decoder` from an
``asyncio.StreamReader`` and writes encoded messages to the ``StreamWriter``; the server and
the client are both built on it. A lost connection (EOF, reset) is reported as
:class:`~zenith.errors.ConnectionFailed` and remembered in ``broken``, so the code above can
tell "my peer went away" from "the operation I ran failed".
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

from zenith.errors import ConnectionFailed, ProtocolViolation
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import FrontendType, Message

READ_CHUNK = 256 * 1024
_COPY_HEADER = struct.Struct("!cI")
_COPY_DATA = bytes((FrontendType.COPY_DATA,))
_BIG = 64 * 1024  # CopyData payloads from this size on are not copied into the queue

StreamFailure = ConnectionFailed | ProtocolViolation


class MessageStream:
    """Messages in and out of one connection. Not safe for concurrent readers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 decoder: Decoder, *, peer_name: str = "peer"):
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.peer_name = peer_name
        #: Set when the connection is unusable: lost, or the peer violated the protocol.
        self.broken: StreamFailure | None = None
        # Messages queued by write() go out together at the next flush()/drain(): one
        # send() per answer instead of one per message (RowDescription, DataRow, ...).
        self._out = bytearray()
        #: ``time.monotonic()`` of the last bytes read or handed to the transport: the
        #: server's statement timeout counts silence in both directions from here.
        self.last_activity = time.monotonic()

    def _lost(self, cause: OSError | None = None) -> ConnectionFailed:
        if cause is None:
            error = ConnectionFailed(f"{self.peer_name} closed the connection unexpectedly")
        else:
            error = ConnectionFailed(f"connection to {self.peer_name} lost: {cause}")
            error.__cause__ = cause
        self.broken = error
        return error

    def abort(self, reason: str) -> None:
        """Drop the connection now, without sending what is queued (a peer that stopped
        reading would never take it): the stream is broken from here on."""
        self.broken = ConnectionFailed(reason)
        self._out.clear()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def recv(self) -> Message:
        """The next message; :class:`ConnectionFailed` on EOF, :class:`ProtocolViolation`
        on malformed input (both leave ``broken`` set)."""
        if self.broken is not None:
            raise self.broken
        while True:
            try:
                message = self.decoder.next()
            except ProtocolViolation as exc:
                self.broken = exc
                raise
            if message is not None:
                return message
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError as exc:
                raise self._lost(exc) from exc
            if not data:
                raise self._lost()
            self.last_activity = time.monotonic()
            try:
                self.decoder.feed(data)
            except ProtocolViolation as exc:
                self.broken = exc
                raise

    async def recv_raw(self, limit: int = READ_CHUNK) -> bytes:
        """Bytes as they arrive, bypassing the decoder (the one-byte SSL answer)."""
        try:
            data = await self.reader.read(limit)
        except OSError as exc:
            raise self._lost(exc) from exc
        if not data:
            raise self._lost()
        return data

    def write(self, *messages: Message) -> None:
        """Queue messages (no waiting); :meth:`drain` or :meth:`send` pushes them out."""
        for message in messages:
            self._out += message.encode()

    def write_raw(self, data: bytes) -> None:
        self._out += data

    def write_copy_data(self, data: bytes | bytearray | memoryview) -> None:
        """A CopyData message; a large payload is handed over without another copy."""
        self._out += _COPY_HEADER.pack(_COPY_DATA, len(data) + 4)
        if len(data) < _BIG:
            self._out += data
        else:
            self.flush()
            self.writer.write(data)

    def flush(self) -> None:
        """Hand what is queued to the transport (which sends without waiting)."""
        if self._out:
            self.writer.write(bytes(self._out))
            self._out.clear()
            self.last_activity = time.monotonic()

    async def drain(self) -> None:
        """Flush, then wait until the transport's buffer is below its high-water mark
        (back-pressure)."""
        if isinstance(self.broken, ConnectionFailed):
            raise self.broken
        self.flush()
        try:
            await self.writer.drain()
        except OSError as exc:
            raise self._lost(exc) from exc

    async def send(self, *messages: Message) -> None:
        self.write(*messages)
        await self.drain()

    async def close(self, timeout: float = 2.0) -> None:
        """Close the transport (after what is queued); never raises."""
        with contextlib.suppress(Exception):
            self.flush()
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), timeout)


