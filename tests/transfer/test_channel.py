"""The silence-bounded reads and writes a transfer runs on."""

from __future__ import annotations

import asyncio

import pytest

from zenith.errors import PeerTimeout
from zenith.transfer.channel import read_raw, write_raw


class _Pending:
    """A channel whose read and write wait on futures the test settles."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.incoming: asyncio.Future[bytes | None] = loop.create_future()
        self.written: asyncio.Future[None] = loop.create_future()
        self.aborted: list[str] = []

    async def read(self) -> bytes | None:
        return await self.incoming

    async def write(self, data: bytes) -> None:
        await self.written

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)


@pytest.mark.asyncio
async def test_cancel_arriving_with_data_is_not_lost() -> None:
    """A reader cancelled in the same loop turn as its data arrives ends cancelled: it must
    not return the data and go on to wait a whole silence timeout for the next message
    (the sender cancels its ACK reader this way when a range fails)."""
    channel = _Pending()
    task = asyncio.create_task(read_raw(channel, 30.0))
    await asyncio.sleep(0)  # the read is waiting
    channel.incoming.set_result(b"ack")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)


@pytest.mark.asyncio
async def test_silence_bounds() -> None:
    channel = _Pending()
    with pytest.raises(PeerTimeout, match=r"sent nothing for 0\.05 s"):
        await read_raw(channel, 0.05)
    with pytest.raises(PeerTimeout, match=r"read nothing for 0\.05 s"):
        await write_raw(channel, b"x", 0.05)
    assert channel.aborted == ["the peer read nothing for 0.05 s; transfer dropped"]
