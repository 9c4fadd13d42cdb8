"""The stream a transfer runs over, read with a silence bound, and the locks that keep two
transfers from writing one timeline at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from zenith.errors import ObjectInUse, PeerTimeout, TransferAborted
from zenith.transfer.frames import decode_frame, encode_message
from zenith.transfer.messages import M, Message


class Channel(Protocol):
    """One CopyBoth stream: CopyData payloads in and out; ``None`` when the peer is done."""

    async def read(self) -> bytes | None: ...

    async def write(self, data: bytes) -> None: ...

    def abort(self, reason: str) -> None:
        """Drop the connection at once (the peer stopped reading)."""


async def read_raw(channel: Channel, timeout: float) -> bytes:
    """The next CopyData payload; the peer's silence beyond ``timeout`` seconds or its end
    of the stream is an error."""
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a result that
        # arrives together with a cancellation and drops the cancellation, so a sender
        # cancelling its ACK reader could then wait out a whole silence timeout.
        async with asyncio.timeout(timeout):
            data = await channel.read()
    except TimeoutError:
        raise PeerTimeout(
            f"the peer sent nothing for {timeout:g} s; transfer dropped",
            hint="everything acknowledged is kept; run the command again to continue",
        ) from None
    if data is None:
        raise TransferAborted("the peer ended the transfer early")
    return data


async def read_message(channel: Channel, cls: type[M], timeout: float) -> M:
    """The next frame, which must be a ``cls`` message (checked decode)."""
    return decode_frame(await read_raw(channel, timeout)).message(cls)


async def write_raw(channel: Channel, data: bytes, timeout: float) -> None:
    """Write one frame; a peer that reads nothing for ``timeout`` seconds (its socket
    buffer stays full) is dropped: the connection is aborted, since it would never take
    an error message either."""
    try:
        async with asyncio.timeout(timeout):
            await channel.write(data)
    except TimeoutError:
        reason = f"the peer read nothing for {timeout:g} s; transfer dropped"
        channel.abort(reason)
        raise PeerTimeout(
            reason, hint="everything acknowledged is kept; run the command again to continue"
        ) from None


async def send(channel: Channel, message: Message, timeout: float) -> None:
    await write_raw(channel, encode_message(message), timeout)


class TransferLocks:
    """Named asyncio locks (``branch:NAME``, ``timeline:ID``), taken in sorted order so two
    transfers never wait on each other in a cycle. Transfers touching disjoint names run
    concurrently; one touching a busy name waits at most ``wait`` seconds."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[str], wait: float) -> AsyncIterator[None]:
        taken: list[str] = []
        try:
            async with asyncio.timeout(wait):
                for key in sorted(set(keys)):
                    lock = self._locks.setdefault(key, asyncio.Lock())
                    await lock.acquire()
                    taken.append(key)
        except TimeoutError:
            self._release(taken)
            busy = sorted(set(keys) - set(taken))[0].replace(":", " ", 1)
            raise ObjectInUse(
                f"another transfer is writing {busy}; waited {wait:g} s",
                hint="try again when it has finished",
            ) from None
        except BaseException:
            self._release(taken)
            raise
        try:
            yield
        finally:
            self._release(taken)

    def _release(self, keys: list[str]) -> None:
        for key in keys:
            lock = self._locks[key]
            lock.release()
            if not lock.locked() and not getattr(lock, "_waiters", None):
                del self._locks[key]
