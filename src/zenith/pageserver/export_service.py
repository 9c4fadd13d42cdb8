"""``fullbackup``: a branch's PostgreSQL data directory at an LSN, as a tar over CopyOut.

``zenith export`` reads it from the local pageserver or straight from an origin and writes
the directory; :mod:`zenith.postgres.export` builds it (pg_control and WAL start included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from zenith.pageserver.page_service import command, expect_args, split_at
from zenith.pageserver.users import Role, require
from zenith.pgwire.server import Session
from zenith.postgres.export import export_entries, tar_chunks

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver


@command("fullbackup", "<branch-or-timeline>[@<lsn>]",
         "the PostgreSQL data directory at lsn (default: last record LSN), as a tar (CopyOut)")
async def _fullbackup(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.READ, "read")
    name, lsn = split_at(args[0])
    tl = server.repo.resolve(name)
    at = tl.last_record_lsn if lsn is None else lsn
    # Validation happens here, before CopyOut starts, so a bad LSN is a plain ErrorResponse.
    chunks: Iterator[bytes] = tar_chunks(export_entries(server.repo, tl.timeline_id, at))
    first = await asyncio.to_thread(next, chunks, b"")
    copy = await session.copy_out()
    chunk: bytes = first
    sent = 0
    while chunk:
        await copy.write(chunk)
        sent += len(chunk)
        chunk = await asyncio.to_thread(next, chunks, b"")
    await copy.done()
    await session.send_command_complete(f"COPY {sent}")
