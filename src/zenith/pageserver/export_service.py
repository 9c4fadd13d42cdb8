"""``fullbackup``: a branch's PostgreSQL data directory at an LSN, as a tar over CopyOut.

``zenith export`` reads it from the local pageserver or straight from an origin and writes
the directory; :mod:`zenith.postgres.export` builds it (pg_control and WAL start included).
Settings that would make the copy act for its source (archiving, standby, synchronous
standbys) are turned off unless the trailing word ``keep_config`` is given; a NOTICE before
the COPY names those it turned off. The tar is made in the long worker pool, as one long
job of the user (``workers.py``): a reader's exports and digests share its cap, and a
cancelled export stops at its next chunk.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from zenith.bucket.pull import pull_from_bucket
from zenith.errors import SyntaxError_
from zenith.pageserver.page_service import command, expect_args, split_at
from zenith.pageserver.transfer_service import SCRATCH, open_bucket
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import job_of
from zenith.pgwire.server import Session
from zenith.postgres.export import disabled_settings, export_entries, tar_chunks
from zenith.storage import open_repository

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver
    from zenith.pageserver.workers import LongJob


@command("fullbackup", "<branch-or-timeline>[@<lsn>] [keep_config]",
         "the PostgreSQL data directory at lsn (default: last record LSN), as a tar (CopyOut); "
         "archiving, standby and synchronous-standby settings turned off unless keep_config")
async def _fullbackup(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 2)
    if len(args) == 2 and args[1].lower() != "keep_config":
        raise SyntaxError_(f"expected keep_config after the branch, got {args[1]!r}",
                           hint="usage: fullbackup <branch-or-timeline>[@<lsn>] [keep_config]")
    keep_config = len(args) == 2
    require(session.user, Role.READ, "read")
    name, lsn = split_at(args[0])
    tl = server.repo.resolve(name)
    at = tl.last_record_lsn if lsn is None else lsn
    # Validation happens here, before CopyOut starts, so a bad LSN is a plain ErrorResponse.
    chunks: Iterator[bytes] = tar_chunks(
        export_entries(server.repo, tl.timeline_id, at, keep_config=keep_config))
    # Held against GC for the whole export (its pages are read in many steps).
    with server.repo.hold(tl.timeline_id, at):
        async with job_of(server, session.user) as job:
            await _send_tar(session, job, chunks, None if keep_config else
                            await job.run(disabled_settings, server.repo, tl.timeline_id, at))


@command("bucket_fullbackup", "<uri> <branch>[@<lsn>] [keep_config]",
         "fullbackup of a branch of the bucket at uri (one of the origins), read into a "
         "scratch repository first")
async def _bucket_fullbackup(server: Pageserver, session: Session, args: list[str]) -> None:
    """A bucket runs no code: the branch is pulled (all the checks of a pull) into a
    scratch repository in the repository's directory, exported from there, then removed."""
    expect_args(args, 2, 3)
    if len(args) == 3 and args[2].lower() != "keep_config":
        raise SyntaxError_(f"expected keep_config after the branch, got {args[2]!r}")
    keep_config = len(args) == 3
    require(session.user, Role.ADMIN, "export from a bucket")
    bucket = await open_bucket(server, session, args[0])
    name, lsn = split_at(args[1])
    scratch = server.config.path / SCRATCH
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="export-", dir=scratch))
    repo = None
    try:
        repo = open_repository(where / "repo.db", durable=False)
        async with job_of(server, session.user) as job:
            pulled = await pull_from_bucket(repo, bucket, name, name, offload=job.run,
                                            timeout=server.config.transfer_timeout,
                                            scratch=where)
            await session.send_notice(
                f"read {name} from {bucket.loc} ({pulled.records} records, "
                f"{pulled.bytes / 1048576:.1f} MiB) into a scratch repository")
            tl = repo.resolve(name)
            at = tl.last_record_lsn if lsn is None else lsn
            chunks = tar_chunks(export_entries(repo, tl.timeline_id, at,
                                               keep_config=keep_config))
            await _send_tar(session, job, chunks, None if keep_config else
                            await job.run(disabled_settings, repo, tl.timeline_id, at))
    finally:
        if repo is not None:
            repo.close()
        shutil.rmtree(where, ignore_errors=True)


async def _send_tar(session: Session, job: LongJob, chunks: Iterator[bytes],
                    off: list[str] | None) -> None:
    if off:
        await session.send_notice(
            f"disabled {', '.join(off)}",
            detail="the export's configuration has them commented out "
                   "(postgresql.conf) or removed (postgresql.auto.conf), so that a copy "
                   "started next to its source neither archives into the source's "
                   "archive, nor acts as its standby, nor waits for its synchronous "
                   "standbys",
            hint="the keep_config argument (zenith export --keep-config) keeps them")
    first = await job.run(next, chunks, b"")
    copy = await session.copy_out()
    chunk: bytes = first
    sent = 0
    while chunk:
        await copy.write(chunk)
        sent += len(chunk)
        chunk = await job.run(next, chunks, b"")
    await copy.done()
    await session.send_command_complete(f"COPY {sent}")
