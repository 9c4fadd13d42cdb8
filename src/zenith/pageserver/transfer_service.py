"""Push and pull commands: the local ``perform_*`` ones the CLI calls, and the
pageserver-to-pageserver ``branch_*`` ones they run on the remote side.

The local pageserver always connects OUT to the remote one (so pulling works from behind
NAT): ``perform_push`` runs ``branch_push`` there and sends; ``perform_pull`` runs
``branch_pull`` there and receives. Either way the same :func:`send_branch` and
:func:`receive_branch` run on the two ends. Incoming transfers lock their destination name
and the timelines they may write (``TransferLocks``): transfers to unrelated branches run
concurrently, two to one timeline one after the other. A peer silent for longer than
``transfer_timeout`` (config.toml, 60 s by default) is dropped. Connections out to a
remote are TLS with certificate and host name checks unless its URI names an ``sslmode``
(:func:`~zenith.pgwire.conninfo.parse_origin_uri`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from zenith.bucket.gc import GcResult, gc_bucket
from zenith.bucket.layout import S3Location, is_s3_uri, parse_s3_uri
from zenith.bucket.pull import pull_from_bucket
from zenith.bucket.push import push_to_bucket
from zenith.bucket.state import BucketView
from zenith.bucket.store import Bucket
from zenith.errors import (
    ConnectionFailed,
    FeatureNotSupported,
    InvalidArgument,
    PeerTimeout,
    PermissionDenied,
    ProtocolViolation,
    PushRejected,
    ZenithError,
)
from zenith.lsn import Lsn
from zenith.pageserver.config import RepoConfig
from zenith.pageserver.page_service import BRANCH_COLUMNS, branch_rows, command, expect_args
from zenith.pageserver.quoting import command_text
from zenith.pageserver.retention import Window
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import LongJob, job_of
from zenith.pgwire.client import (
    ClientCopyStream,
    Connection,
    connect,
    mask_uri,
    parse_origin_uri,
)
from zenith.pgwire.server import Session
from zenith.pgwire.session import CopyStream
from zenith.storage import validate_branch_name
from zenith.transfer.messages import Progress, TransferArgs, TransferResult, parse_flags
from zenith.transfer.plan import Depth
from zenith.transfer.receiver import receive_branch
from zenith.transfer.sender import send_branch

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

RESULT_COLUMNS: Final = ["branch", "remote", *TransferResult.COLUMNS]
CONNECT_TIMEOUT: Final = 10.0
PROGRESS_EVERY: Final = 0.25  # seconds between progress notices
#: Where bucket transfers keep segments on their way (in the repository's directory).
SCRATCH: Final = "scratch"


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
        await self.session.send_notice(s.to_notice())

    async def __aenter__(self) -> _Reporter:
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _connect_remote(uri: str) -> Connection:
    """Connect to an origin: TLS with verify-full unless its URI says otherwise."""
    info = parse_origin_uri(uri)
    where = f"{info.host}:{info.port}"
    try:
        return await connect(info, timeout=CONNECT_TIMEOUT)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"cannot reach remote {where}: {exc.message}",
                               hint=exc.hint) from exc
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
    info = parse_origin_uri(uri)
    where = f"{info.host}:{info.port}"
    conn = await _connect_remote(uri)
    try:
        stream = await _remote_copy(conn, where, words)
        async with _naming_remote(verb):
            yield stream
            await stream.finish()
    finally:
        await conn.close()


@command("perform_push", TransferArgs.PERFORM_USAGE,
         "push a local branch to the pageserver or bucket at uri")
async def _perform_push(server: Pageserver, session: Session, args: list[str]) -> None:
    require(session.user, Role.ADMIN, "start a push")
    a = TransferArgs.parse_perform(args)
    validate_branch_name(a.remote_branch)
    if is_s3_uri(a.uri):
        await _push_to_bucket(server, session, a)
        return
    server.config.check_wire_files(a.uri)
    timeline = server.repo.resolve(a.branch)
    chain = server.repo.ancestry(timeline.timeline_id)
    if a.since is not None:
        _depth(server, a.remote_branch, a.since)  # refused here if malformed
    words = ["branch_push", a.remote_branch, *a.flag_words()]
    async with _remote_stream(a.uri, "push", words) as stream, _Reporter(session) as reporter, \
            _long_job(server, session) as job:
        result = await send_branch(stream, server.repo, chain, progress=reporter.update,
                                   timeout=server.config.transfer_timeout, offload=job.run)
        await reporter.flush()
    await _send_result(session, a.branch, f"{mask_uri(a.uri)} {a.remote_branch}", result)


@command("perform_pull", TransferArgs.PERFORM_USAGE,
         "pull a branch of the pageserver or bucket at uri into a local branch")
async def _perform_pull(server: Pageserver, session: Session, args: list[str]) -> None:
    require(session.user, Role.ADMIN, "start a pull")
    a = TransferArgs.parse_perform(args)
    validate_branch_name(a.branch)
    _refuse_followed(server, a.branch)
    if is_s3_uri(a.uri):
        await _pull_from_bucket(server, session, a)
        return
    server.config.check_wire_files(a.uri)
    depth = _depth(server, a.branch, a.since)
    async with _remote_stream(a.uri, "pull", ["branch_pull", a.remote_branch]) as stream, \
            _Reporter(session) as reporter, _long_job(server, session) as job:
        result = await receive_branch(
            stream, server.repo, a.branch, pushing=False, force=a.force, dry_run=a.dry_run,
            progress=reporter.update, timeout=server.config.transfer_timeout,
            locks=server.transfer_locks, offload=job.run, depth=depth,
            principal=f"origin {parse_origin_uri(a.uri).address}")
        await reporter.flush()
    await _send_result(session, a.branch, f"{mask_uri(a.uri)} {a.remote_branch}", result)


async def open_bucket(server: Pageserver, session: Session, uri: str) -> Bucket:
    """The bucket of origin ``uri`` (see :func:`bucket_location`), its calls bounded by
    ``transfer_timeout`` as a peer's silence is."""
    loc = bucket_location(server, uri)
    return await job_of(server, session.user).run(
        functools.partial(Bucket, loc, timeout=server.config.transfer_timeout))


def bucket_location(server: Pageserver, uri: str) -> S3Location:
    """A bucket origin named by a client: only one of this repository's origins (the
    pageserver signs its requests with its own AWS credentials, so a client may not
    point them at an endpoint of its choosing)."""
    loc = parse_s3_uri(uri)
    if uri not in RepoConfig.load(server.config.path).origins().values():  # as now written
        raise PermissionDenied(
            "an s3:// URI must be one of this repository's origins",
            hint="add it first: zenith origin add NAME s3://BUCKET/PREFIX?endpoint=...")
    return loc


async def _push_to_bucket(server: Pageserver, session: Session, a: TransferArgs) -> None:
    bucket = await open_bucket(server, session, a.uri)
    timeline = server.repo.resolve(a.branch)
    chain = server.repo.ancestry(timeline.timeline_id)
    # A bucket has no history window of its own: all history unless --since says.
    depth = _depth(server, a.remote_branch, a.since) if a.since is not None else None
    async with _Reporter(session) as reporter, _long_job(server, session) as job:
        result = await job.run(functools.partial(
            push_to_bucket, server.repo, bucket, chain, a.remote_branch, force=a.force,
            dry_run=a.dry_run, depth=depth, progress=reporter.update,
            scratch=server.config.path / SCRATCH,
            segment_bytes=server.config.bucket_segment_bytes))
        await reporter.flush()
    await _send_result(session, a.branch, f"{bucket.loc} {a.remote_branch}", result)


async def _pull_from_bucket(server: Pageserver, session: Session, a: TransferArgs) -> None:
    bucket = await open_bucket(server, session, a.uri)
    if a.since is not None:
        raise FeatureNotSupported(
            "--since is not supported when pulling from a bucket: it sends all the history "
            "it holds", hint="pull without --since (push --since makes a shallow copy there)")
    async with _Reporter(session) as reporter, _long_job(server, session) as job:
        result = await pull_from_bucket(
            server.repo, bucket, a.remote_branch, a.branch, force=a.force, dry_run=a.dry_run,
            progress=reporter.update, timeout=server.config.transfer_timeout,
            locks=server.transfer_locks, offload=job.run, scratch=server.config.path / SCRATCH)
        await reporter.flush()
    await _send_result(session, a.branch, f"{bucket.loc} {a.remote_branch}", result)


@command("perform_list", "<uri>", "the branches of the pageserver or bucket at uri")
async def _perform_list(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.ADMIN, "list an origin's branches")
    uri = args[0]
    if is_s3_uri(uri):
        bucket = await open_bucket(server, session, uri)

        def listed() -> list[list[str | None]]:
            return branch_rows(BucketView(bucket).list_branches())

        rows = await job_of(server, session.user).run(listed)
    else:
        server.config.check_wire_files(uri)
        info = parse_origin_uri(uri)
        conn = await _connect_remote(uri)
        try:
            answer = await conn.simple_query("branch_list")
        except ZenithError as exc:
            raise type(exc)(f"remote {info.address}: {exc.message}", detail=exc.detail,
                            hint=exc.hint) from exc
        finally:
            await conn.close()
        if answer.columns != BRANCH_COLUMNS:
            raise ProtocolViolation(f"remote {info.address} answered branch_list with "
                                    "other columns")
        rows = answer.rows
    await session.send_rows(BRANCH_COLUMNS, rows, f"SELECT {len(rows)}")


@command("origin_gc", "<uri> <grace-seconds> [dry_run]",
         "remove what no ref of the bucket at uri reaches, older than the grace period")
async def _origin_gc(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 2, 3)
    require(session.user, Role.ADMIN, "collect a bucket's garbage")
    if len(args) == 3 and args[2].lower() != "dry_run":
        raise InvalidArgument(f"expected dry_run after the grace period, got {args[2]!r:.40}")
    if not is_s3_uri(args[0]):
        raise InvalidArgument("origin gc is for bucket origins (a pageserver collects its "
                              "own garbage: zenith gc there)")
    try:
        grace = float(args[1])
    except ValueError:
        raise InvalidArgument(f"invalid grace period {args[1]!r:.40}") from None
    if not 0 <= grace <= 10 * 365 * 86400:
        raise InvalidArgument("the grace period is seconds in [0, 10 years]")
    bucket = await open_bucket(server, session, args[0])
    result = await job_of(server, session.user).run(
        functools.partial(gc_bucket, bucket, grace=grace, dry_run=len(args) == 3))
    await session.send_rows(list(GcResult.COLUMNS), [result.to_row()], "SELECT 1")


@command("branch_push", "<branch> [force] [dry_run] [since=LSN|WINDOW|all]",
         "(between pageservers) receive a push into branch over CopyBoth")
async def _branch_push(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 4)
    require(session.user, Role.PUSH, "push")
    name = validate_branch_name(args[0])
    force, dry_run, since = parse_flags(args[1:])
    depth = _depth(server, name, since)
    _refuse_followed(server, name)
    copy = await session.copy_both()
    timeout = server.config.transfer_timeout
    async with _long_job(server, session) as job:
        await receive_branch(copy, server.repo, name, pushing=True, force=force,
                             dry_run=dry_run, timeout=timeout, locks=server.transfer_locks,
                             offload=job.run, depth=depth, principal=f"user {session.user.name}")
    await _end_copy(copy, timeout, ours_first=False)


@command("branch_pull", "<branch>", "(between pageservers) send a branch over CopyBoth")
async def _branch_pull(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.READ, "pull")
    timeline = server.repo.resolve(args[0])
    chain = server.repo.ancestry(timeline.timeline_id)
    copy = await session.copy_both()
    timeout = server.config.transfer_timeout
    async with _long_job(server, session) as job:
        await send_branch(copy, server.repo, chain, timeout=timeout, offload=job.run)
    await _end_copy(copy, timeout, ours_first=True)


def _depth(server: Pageserver, branch: str, since: str | None) -> Depth | None:
    """How much history a new copy of ``branch`` gets here: ``since`` (an LSN, a window,
    or "all"), by default the branch's history window (DESIGN §12: a shallow copy never
    holds less than its window needs, and a user may ask for more or less)."""
    if since is None:
        default, table = server.config.pitr
        window = table.get(branch, default)
        explicit = False
    elif since == "all":
        return None
    elif "/" in since:
        try:
            return Depth(since, lsn=Lsn.parse(since), explicit=True)
        except ValueError:
            raise InvalidArgument(f"invalid LSN {since!r:.40} for since") from None
    else:
        window = Window.parse(since)
        explicit = True
    if window.seconds is None and window.distance is None:
        return None  # forever: all of it
    return Depth(window.text, distance=window.distance, seconds=window.seconds,
                 explicit=explicit)


def _long_job(server: Pageserver, session: Session) -> LongJob:
    """A transfer is one long job of its user: its storage steps run in the long worker
    pool, and a non-admin user's transfers share its cap with its digests and exports."""
    return job_of(server, session.user)


async def _end_copy(copy: CopyStream, timeout: float, *, ours_first: bool) -> None:
    """End the CopyBoth exchange (CopyDone both ways); a peer that takes no part in it for
    ``timeout`` seconds is dropped."""

    async def drain_peer() -> None:
        while await copy.read() is not None:
            pass

    try:
        async with asyncio.timeout(timeout):
            if ours_first:
                await copy.done()
            await drain_peer()
            if not ours_first:
                await copy.done()
    except TimeoutError:
        copy.abort(f"the peer did not end the transfer within {timeout:g} s")
        raise PeerTimeout(f"the peer did not end the transfer within {timeout:g} s") from None
