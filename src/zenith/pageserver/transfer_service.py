"""Push and pull commands: the local ``perform_*`` ones the CLI calls, and the
pageserver-to-pageserver ``branch_*`` ones they run on the remote side.

The local pageserver always connects OUT to the remote one (so pulling works from behind
NAT): ``perform_push`` runs ``branch_push`` there and sends; ``perform_pull`` runs
``branch_pull`` there and receives. Either way the same :func:`send_branch` and
:func:`receive_branch` run on the two ends. Incoming transfers are serialised per
pageserver by one lock: a second one waits for the first to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from zenith.errors import ConnectionFailed, InvalidArgument, PushRejected, ZenithError
from zenith.pageserver.page_service import command, expect_args
from zenith.pageserver.quoting import command_text, flag_words
from zenith.pageserver.users import Role, require
from zenith.pgwire.client import ClientCopyStream, Connection, connect, mask_uri, parse_uri
from zenith.pgwire.server import Session
from zenith.storage import validate_branch_name
from zenith.transfer import Progress, TransferResult, receive_branch, send_branch

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

RESULT_COLUMNS: Final = [
    "status", "message", "branch", "remote", "timeline_id", "old_timeline_id", "old_lsn",
    "new_lsn", "records", "bytes", "seconds", "dry_run",
]
CONNECT_TIMEOUT: Final = 10.0
PROGRESS_EVERY: Final = 0.25  # seconds between progress notices
_FLAGS: Final = ("force", "dry_run")


def _flags(words: list[str]) -> tuple[bool, bool]:
    unknown = [w for w in words if w.lower() not in _FLAGS]
    if unknown:
        raise InvalidArgument(f"unknown option {unknown[0]!r}: expected force or dry_run")
    lowered = {w.lower() for w in words}
    return "force" in lowered, "dry_run" in lowered


async def _send_result(session: Session, branch: str, remote: str, r: TransferResult) -> None:
    row = {"branch": branch, "remote": remote, **r.to_row()}
    await session.send_rows(RESULT_COLUMNS, [[row[c] for c in RESULT_COLUMNS]], "SELECT 1")


class _Reporter:
    """Sends the transfer's progress as NOTICEs, at most every PROGRESS_EVERY seconds:
    ``progress bytes=DONE/TOTAL records=DONE/TOTAL lsn=ACKED``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.state: Progress | None = None
        self.sent: tuple[int, int] | None = None
        self.task: asyncio.Task[None] | None = None

    def update(self, state: Progress) -> None:
        self.state = state

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            await self.flush()

    async def flush(self) -> None:
        s = self.state
        if s is None or (s.bytes_done, s.records_done) == self.sent:
            return
        self.sent = (s.bytes_done, s.records_done)
        await self.session.send_notice(
            f"progress bytes={s.bytes_done}/{s.bytes_total} "
            f"records={s.records_done}/{s.records_total} lsn={s.acked_lsn}"
        )

    async def __aenter__(self) -> _Reporter:
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _connect_remote(uri: str) -> Connection:
    info = parse_uri(uri)
    where = f"{info.host}:{info.port}"
    try:
        return await connect(info, timeout=CONNECT_TIMEOUT)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"cannot reach remote {where}: {exc.message}") from exc
    except ZenithError as exc:
        raise type(exc)(f"remote {where}: {exc.message}", detail=exc.detail,
                        hint=exc.hint) from exc


@contextlib.asynccontextmanager
async def _naming_remote(verb: str) -> AsyncIterator[None]:
    """Errors from the remote side or the connection name the remote and say what is kept."""
    try:
        yield
    except ConnectionFailed as exc:
        raise ConnectionFailed(
            f"{verb} interrupted: {exc.message}",
            hint=f"the destination kept everything acknowledged; {verb} again to continue",
        ) from exc


async def _remote_copy(conn: Connection, where: str, words: list[str]) -> ClientCopyStream:
    try:
        return await conn.copy_both(command_text(*words))
    except ZenithError as exc:
        raise type(exc)(f"remote {where}: {exc.message}", detail=exc.detail,
                        hint=exc.hint) from exc


def _refuse_followed(server: Pageserver, name: str) -> None:
    """One writer per timeline: a branch that follows a PostgreSQL source takes no pushes
    or pulls."""
    if name in server.followers:
        raise PushRejected(
            f'rejected: branch "{name}" follows a PostgreSQL source and accepts no pushes',
            hint=f"push to another branch name, or `zenith detach {name}` first",
        )


@contextlib.asynccontextmanager
async def _remote_stream(uri: str, verb: str, words: list[str]) -> AsyncIterator[ClientCopyStream]:
    """Connect to the remote pageserver, run ``words`` there (a CopyBoth command), and
    yield the stream; finished and closed on the way out. Errors name the remote."""
    info = parse_uri(uri)
    where = f"{info.host}:{info.port}"
    conn = await _connect_remote(uri)
    try:
        stream = await _remote_copy(conn, where, words)
        async with _naming_remote(verb):
            yield stream
            await stream.finish()
    finally:
        await conn.close()


@command("perform_push", "<branch> <uri> <remote_branch> [force] [dry_run]",
         "push a local branch to the pageserver at uri")
async def _perform_push(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 3, 5)
    require(session.user, Role.ADMIN, "start a push")
    branch, uri, remote_branch = args[0], args[1], validate_branch_name(args[2])
    force, dry_run = _flags(args[3:])
    timeline = server.repo.resolve(branch)
    chain = server.repo.ancestry(timeline.timeline_id)
    words = ["branch_push", remote_branch, *flag_words(force, dry_run)]
    async with _remote_stream(uri, "push", words) as stream, _Reporter(session) as reporter:
        result = await send_branch(stream, server.repo, timeline, chain=chain,
                                   progress=reporter.update)
        await reporter.flush()
    await _send_result(session, branch, f"{mask_uri(uri)} {remote_branch}", result)


@command("perform_pull", "<branch> <uri> <remote_branch> [force] [dry_run]",
         "pull a branch of the pageserver at uri into a local branch")
async def _perform_pull(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 3, 5)
    require(session.user, Role.ADMIN, "start a pull")
    branch, uri, remote_branch = validate_branch_name(args[0]), args[1], args[2]
    force, dry_run = _flags(args[3:])
    _refuse_followed(server, branch)
    async with _remote_stream(uri, "pull", ["branch_pull", remote_branch]) as stream, \
            server.receive_lock, _Reporter(session) as reporter:
        result = await receive_branch(stream, server.repo, branch, pushing=False,
                                      force=force, dry_run=dry_run, progress=reporter.update)
        await reporter.flush()
    await _send_result(session, branch, f"{mask_uri(uri)} {remote_branch}", result)


@command("branch_push", "<branch> [force] [dry_run]",
         "(between pageservers) receive a push into branch over CopyBoth")
async def _branch_push(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 3)
    require(session.user, Role.PUSH, "push")
    name = validate_branch_name(args[0])
    force, dry_run = _flags(args[1:])
    _refuse_followed(server, name)
    async with server.receive_lock:
        copy = await session.copy_both()
        await receive_branch(copy, server.repo, name, pushing=True, force=force,
                             dry_run=dry_run)
        while await copy.read() is not None:
            pass
        await copy.done()


@command("branch_pull", "<branch>", "(between pageservers) send a branch over CopyBoth")
async def _branch_pull(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.READ, "pull")
    timeline = server.repo.resolve(args[0])
    chain = server.repo.ancestry(timeline.timeline_id)
    copy = await session.copy_both()
    await send_branch(copy, server.repo, timeline, chain=chain)
    await copy.done()
    while await copy.read() is not None:
        pass
