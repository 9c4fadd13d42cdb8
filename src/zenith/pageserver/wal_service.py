"""Branches that follow a real PostgreSQL: ``import``, ``wait``, ``detach``, and the
background task that streams WAL into each attached branch.

``import <branch> <uri>`` checks the source (PostgreSQL 15, ``wal_level`` replica or
logical, ``wal_consistency_checking=all``), creates a physical replication slot, takes a
base backup into a new timeline, starts following the source and returns once the branch
is readable: its WAL ingested up to the backup's end LSN, with a progress NOTICE each
second meanwhile. (The source writes that WAL itself when the backup ends: an
XLOG_BACKUP_END record, then a forced WAL switch, both flushed, so an idle source does not
hold it back.) Following is START_REPLICATION on the slot
from the branch's ``last_record_lsn``, records decoded and ingested in batches, standby
status updates after each batch so the source can recycle WAL, reconnection with backoff
after either side restarts. Attachments live in ``config.toml`` (``[sources.<branch>]``),
so a restarted pageserver resumes following. Ingest and the base-backup import run in the
``wal`` worker pool (``workers.py``), which readers' long work never fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from zenith.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    NotFound,
    ZenithError,
)
from zenith.ids import TimelineId
from zenith.lsn import INVALID_LSN, Lsn
from zenith.pageserver.page_service import command, expect_args, lsn_arg, still_working
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import workers_of
from zenith.pgwire.conninfo import mask_text, mask_uri
from zenith.pgwire.server import Session, clip
from zenith.postgres.import_basebackup import import_base_backup
from zenith.postgres.keys import RelTag
from zenith.postgres.replication import connect_replication
from zenith.postgres.waldecoder import WalStreamDecoder
from zenith.postgres.walingest import MissingPageImage, WalIngest
from zenith.storage import validate_branch_name

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

log = logging.getLogger("zenith.walreceiver")

FLUSH_EVERY: Final = 0.2  # seconds between batches (and status updates) while WAL flows
#: ... while catching up (more WAL already queued): batches then fill up to
#: ``walingest.BATCH_RECORDS``, fewer and larger commits (docs/ingest.md, "Catch-up speed").
CATCH_UP_FLUSH_EVERY: Final = 1.0
BACKOFF: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
#: ``import``: seconds it waits by default for the branch to become readable, seconds
#: between its progress notices, and failed stream attempts in a row without progress
#: after which it gives up waiting (the follower keeps retrying).
IMPORT_TIMEOUT: Final = 600.0
PROGRESS_EVERY: Final = 1.0
IMPORT_FAILURES: Final = 3
#: ``wait``: seconds it waits by default.
WAIT_TIMEOUT: Final = 60.0


@dataclass
class Follower:
    """One attached branch and the task streaming its source's WAL."""

    branch: str
    timeline_id: TimelineId
    uri: str
    slot: str
    pg_timeline: int
    task: asyncio.Task[None] | None = None
    source_lsn: Lsn = INVALID_LSN  # the source's WAL end, from its messages
    error: str | None = None  # the last error, while reconnecting
    failures: int = 0  # stream attempts that failed, ever
    connected: bool = False
    stopping: bool = False
    #: Ingest refused the WAL (e.g. a page change without its image): retrying cannot
    #: help, so the follower stops and says why until the branch is detached.
    stopped: str | None = None
    #: Relation sizes from the import, for the first stream (later ones read storage).
    rel_sizes: dict[RelTag, int] | None = None


def _save_source(server: Pageserver, f: Follower) -> None:
    import tomlkit

    with server.config.updating() as doc:
        if "sources" not in doc:
            doc.add(tomlkit.nl())
            doc.add("sources", tomlkit.table(is_super_table=True))
        entry = tomlkit.table()
        entry.add("uri", f.uri)
        entry.add("slot", f.slot)
        entry.add("timeline_id", str(f.timeline_id))
        entry.add("pg_timeline", str(f.pg_timeline))
        doc["sources"][f.branch] = entry


def _forget_source(server: Pageserver, branch: str) -> None:
    with server.config.updating() as doc:
        if "sources" in doc and branch in doc["sources"]:
            del doc["sources"][branch]


def resume_followers(server: Pageserver) -> None:
    """Start following every source recorded in config.toml (at pageserver start)."""
    for branch, entry in server.config.sources().items():
        try:
            f = Follower(branch, TimelineId.parse(entry["timeline_id"]), entry["uri"],
                         entry["slot"], int(entry.get("pg_timeline", "1")))
        except (KeyError, ValueError) as exc:
            log.error("config.toml: source of branch %s is malformed: %s", branch,
                      mask_text(str(exc)))
            continue
        _start(server, f)


def _start(server: Pageserver, f: Follower) -> None:
    server.followers[f.branch] = f
    f.task = asyncio.create_task(_follow(server, f), name=f"walreceiver {f.branch}")


async def stop_followers(server: Pageserver) -> None:
    """Stop every follower, and let an ingest step still in its thread finish (a stopped
    follower's task no longer waits for it) before the server closes the repository."""
    for f in list(server.followers.values()):
        await _stop(f)
    await workers_of(server).idle(workers_of(server).wal, 30.0)


async def _stop(f: Follower) -> None:
    f.stopping = True
    if f.task is not None:
        f.task.cancel()
        with contextlib.suppress(BaseException):
            await f.task


async def _follow(server: Pageserver, f: Follower) -> None:
    """Stream and ingest until stopped; reconnect after any failure, with backoff."""
    failures = 0
    while not f.stopping:
        try:
            await _stream_once(server, f)
            failures = 0
        except asyncio.CancelledError:
            raise
        except MissingPageImage as exc:
            f.connected, f.error, f.stopped = False, exc.message, exc.message
            log.error("branch %s: ingest stopped: %s", f.branch, exc.message)
            return
        except Exception as exc:
            f.connected = False
            f.error = mask_text(exc.message if isinstance(exc, ZenithError) else repr(exc))
            f.failures += 1
            delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
            failures += 1
            log.warning("branch %s: WAL stream from %s failed (%s); retrying in %.1f s",
                        f.branch, mask_uri(f.uri), f.error, delay)
            await asyncio.sleep(delay)


async def _stream_once(server: Pageserver, f: Follower) -> None:
    repo = server.repo
    start = repo.get_timeline(f.timeline_id).last_record_lsn
    wal = workers_of(server).wal
    ingest = await wal.run(WalIngest, repo, f.timeline_id, f.rel_sizes)
    f.rel_sizes = None
    decoder = WalStreamDecoder(start)
    async with await connect_replication(f.uri, application_name="zenith") as conn:
        stream = await conn.start_replication(f.slot, start, f.pg_timeline)
        f.connected, f.error = True, None
        log.info("branch %s: streaming WAL from %s at %s", f.branch, mask_uri(f.uri), start)
        # A reader task owns the stream (and answers keepalives); this loop ingests what
        # it queued and flushes on a clock, so a quiet source still gets status updates.
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=64)

        async def reader() -> None:
            try:
                while (item := await stream.read()) is not None:
                    await chunks.put(item[1])
                await chunks.put(None)
            except Exception as exc:  # handed to the ingest loop
                await chunks.put(exc)

        task = asyncio.create_task(reader())
        try:
            last_flush = time.monotonic()
            while True:
                data: bytes | BaseException | None = b""
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(chunks.get(), FLUSH_EVERY)
                if data is None:
                    raise InvalidState("the source ended the WAL stream")
                if isinstance(data, BaseException):
                    raise data
                if data:
                    # Take every chunk already queued: one thread hop for all of them (the
                    # source sends many small messages when it commits often).
                    batch = [data]
                    while not chunks.empty() and len(batch) < 256:
                        more = chunks.get_nowait()
                        if not isinstance(more, bytes):
                            chunks.put_nowait(more)  # the end or an error: next round
                            break
                        batch.append(more)
                    try:
                        await wal.run(_ingest_chunks, decoder, ingest, batch)
                    except MissingPageImage:
                        # Keep everything before the refused record: the branch ends there.
                        await wal.run(ingest.flush)
                        raise
                f.source_lsn = max(f.source_lsn, stream.server_wal_end)
                now = time.monotonic()
                every = FLUSH_EVERY if chunks.empty() else CATCH_UP_FLUSH_EVERY
                if now - last_flush >= every:
                    last_flush = now
                    await wal.run(ingest.flush)
                    done = repo.get_timeline(f.timeline_id).last_record_lsn
                    await stream.send_status(done, done, done)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _ingest_chunks(decoder: WalStreamDecoder, ingest: WalIngest, batch: list[bytes]) -> None:
    """Decode and ingest chunks of WAL (in a worker thread: ingest may write a batch)."""
    ingest_stream(decoder, ingest, batch)


def ingest_stream(decoder: WalStreamDecoder, ingest: WalIngest, chunks: Iterable[bytes]) -> None:
    """Decode and ingest every record in ``chunks``; records short of a full batch stay
    pending (the caller flushes). The follower's catch-up path, also what
    ``benchmarks/catchup_bench.py`` times."""
    poll, add = decoder.poll, ingest.add
    for data in chunks:
        decoder.feed(data)
        while (rec := poll()) is not None:
            add(rec)


# -- commands -----------------------------------------------------------------------------------


@command("import", "<branch> <postgresql-uri> [<timeout-seconds>]",
         "create a branch from a PostgreSQL 15 cluster's base backup and follow its WAL; "
         "returns once the branch is readable (WAL ingested up to the backup's end LSN)")
async def _import(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 2, 3)
    require(session.user, Role.ADMIN, "import")
    branch, uri = validate_branch_name(args[0]), args[1]
    server.config.check_wire_files(uri)
    timeout = _seconds(args[2], 86400.0) if len(args) > 2 else IMPORT_TIMEOUT
    if any(b.name == branch for b in server.repo.list_branches()):
        raise AlreadyExists(f'branch "{branch}" already exists')
    timeline = server.repo.create_timeline()
    slot = f"zenith_{timeline.timeline_id.hex()[:16]}"
    try:
        async with await connect_replication(uri, application_name="zenith") as conn:
            problems = (await conn.source_settings()).problems()
            if problems:
                raise InvalidState(
                    "the source cannot be followed: " + "; ".join(problems),
                    hint="wal_consistency_checking = 'all' makes every page change carry "
                         "its page image; set it in postgresql.conf and reload",
                )
            system = await conn.identify_system()
            await session.send_notice(f"creating replication slot {slot}")
            await conn.create_physical_slot(slot)
            try:
                await session.send_notice("taking a base backup")
                async with still_working(server, session, "taking a base backup"):
                    result = await import_base_backup(
                        server.repo, timeline.timeline_id, conn,
                        executor=workers_of(server).wal)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.drop_slot(slot)
                raise
    except BaseException:
        with contextlib.suppress(Exception):
            server.repo.delete_timeline(timeline.timeline_id)
        raise
    server.repo.set_branch(branch, timeline.timeline_id)
    f = Follower(branch, timeline.timeline_id, uri, slot, result.timeline or system.timeline,
                 rel_sizes=result.rel_sizes)
    _save_source(server, f)
    _start(server, f)
    await _wait_readable(server, session, f, result.end_lsn, timeout)
    await session.send_rows(
        ["name", "timeline_id", "start_lsn", "end_lsn", "records", "bytes", "slot"],
        [[branch, str(timeline.timeline_id), str(result.start_lsn), str(result.end_lsn),
          str(result.records), str(result.bytes), slot]],
        "SELECT 1",
    )


def _seconds(text: str, cap: float, *, zero_ok: bool = False) -> float:
    """A timeout argument: a finite number of seconds above 0 (or 0 itself with
    ``zero_ok``; ``nan``, ``inf`` and negative ones are refused with 22023), at most
    ``cap`` (larger ones are cut to it)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if zero_ok and value == 0:
        return 0.0  # also -0
    if not 0 < value < float("inf"):  # also false for nan
        raise InvalidArgument(
            f"timeout must be a finite number of seconds above 0"
            f"{' (or 0: check once)' if zero_ok else ''}, got {text[:40]!r}")
    return min(value, cap)


async def _wait_readable(server: Pageserver, session: Session, f: Follower, target: Lsn,
                         timeout: float) -> None:
    """Return once the just-imported branch has ingested WAL up to ``target`` (its first
    readable LSN), with a progress notice each second. Give up (the branch stays, still
    following) after ``timeout`` seconds, when the follower failed IMPORT_FAILURES times
    in a row without progress, or when it was detached meanwhile."""
    start = time.monotonic()
    next_notice = start
    progress_lsn, progress_failures = INVALID_LSN, f.failures
    while True:
        at = server.repo.get_timeline(f.timeline_id).last_record_lsn
        if at >= target:
            return
        now = time.monotonic()
        if at > progress_lsn:
            progress_lsn, progress_failures = at, f.failures
        hint = (f"the branch stays and keeps following the source: `zenith wait {f.branch} "
                f"{target}` returns once it is readable, `zenith detach {f.branch}` stops "
                "following")
        if f.stopping or server.followers.get(f.branch) is not f:
            raise InvalidState(f'branch "{f.branch}" stopped following its source at {at}, '
                               f"before its first readable LSN {target}")
        if f.stopped:
            raise InvalidState(
                f'branch "{f.branch}" stopped at {at}, before its first readable LSN '
                f"{target}: {f.stopped}", hint=f"`zenith detach {f.branch}` drops its slot")
        if f.failures - progress_failures >= IMPORT_FAILURES:
            raise InvalidState(
                f'branch "{f.branch}" is not readable yet: streaming WAL from the source '
                f"failed {f.failures - progress_failures} times in a row ({f.error}); it is "
                f"at {at}, readable from {target}", hint=hint)
        if now - start >= timeout:
            why = f" (source: {f.error})" if f.error else ""
            raise InvalidState(
                f"timed out after {timeout:g} s waiting for WAL up to {target}: branch "
                f'"{f.branch}" is at {at}{why}', hint=hint)
        if now >= next_notice:
            await session.send_notice(f"waiting for WAL up to {target}: at {at}")
            next_notice = now + PROGRESS_EVERY
        await asyncio.sleep(0.05)


@command("wait", "<branch> <lsn> [<timeout-seconds>]",
         "return once the branch has ingested WAL up to lsn")
async def _wait(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 2, 3)
    lsn = lsn_arg(args[1])
    # The user's timeout as given (0: check once): the progress NOTICEs sent while waiting
    # keep the statement timeout from cutting a longer wait.
    timeout = (_seconds(args[2], float("inf"), zero_ok=True) if len(args) > 2
               else WAIT_TIMEOUT)
    name = clip(args[0])
    deadline = time.monotonic() + timeout
    async with still_working(server, session, f"waiting for {name} to reach {lsn}"):
        while True:
            tl = server.repo.resolve(args[0])
            if tl.last_record_lsn >= lsn:
                break
            f = server.followers.get(args[0])
            if f is not None and f.stopped and f.task is not None and f.task.done():
                raise InvalidState(f"{name} stopped at {tl.last_record_lsn}, before {lsn}: "
                                   f"{f.stopped}")
            if time.monotonic() >= deadline:
                why = f" (source: {f.error})" if f and f.error else ""
                raise InvalidState(
                    f"timed out after {timeout:g} s waiting for {name} to reach {lsn}: it "
                    f"is at {tl.last_record_lsn}{why}"
                )
            await asyncio.sleep(0.02)
    await session.send_rows(["name", "last_record_lsn"], [[args[0], str(tl.last_record_lsn)]],
                            "SELECT 1")


@command("detach", "<branch>", "stop following the branch's source (drops the slot)")
async def _detach(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.ADMIN, "detach")
    f = server.followers.get(args[0])
    if f is None:
        raise NotFound(f'branch "{args[0]}" does not follow a PostgreSQL source')
    await _stop(f)
    dropped = "slot dropped"
    try:
        async with await connect_replication(f.uri) as conn:
            await conn.drop_slot(f.slot, missing_ok=True)
    except ZenithError as exc:
        dropped = f"could not drop slot {f.slot}: {exc.message}"
    del server.followers[f.branch]
    _forget_source(server, f.branch)
    await session.send_rows(["name", "slot", "outcome"], [[f.branch, f.slot, dropped]],
                            "SELECT 1")


@command("source_list", "", "attached branches: source (admins only, password masked), slot, "
         "state, lag")
async def _source_list(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    # The source URI names a host, a replication user and maybe more: admins see it
    # (masked), other roles a NULL in its place (the columns are the same for everyone).
    admin = Role.parse(session.user.role) >= Role.ADMIN
    rows = []
    for f in server.followers.values():
        at = server.repo.get_timeline(f.timeline_id).last_record_lsn
        lag = max(0, int(f.source_lsn) - int(at)) if f.source_lsn else None
        # Why a stream fails names the source's host and user: for admins only, too.
        state = ("streaming" if f.connected
                 else (f"stopped: {f.stopped}" if admin else "stopped") if f.stopped
                 else f"reconnecting: {f.error or 'starting'}" if admin else "reconnecting")
        rows.append([f.branch, mask_uri(f.uri) if admin else None, f.slot, str(at),
                     str(f.source_lsn) if f.source_lsn else None,
                     str(lag) if lag is not None else None, state])
    await session.send_rows(
        ["name", "source", "slot", "last_record_lsn", "source_lsn", "lag_bytes", "state"],
        rows, f"SELECT {len(rows)}")
