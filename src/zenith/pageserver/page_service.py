"""The pageserver's commands: a dispatch table from command word to handler.

Every simple-query string a client sends is either a statement that standard clients send
around their work (``SET``, ``BEGIN``, ``COMMIT``, ...), answered as a no-op with the tag
PostgreSQL would send, or one of the commands below. Arguments are separated by
whitespace and may be quoted as a POSIX shell quotes them (split in linear time, in a
worker thread for a long command); a trailing ``;`` is ignored. ``docs/protocol.md``
documents each command and its answer; a handler checks the caller's role before it acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from zenith import __version__
from zenith.errors import InvalidState, LimitExceeded, SyntaxError_, UnknownBranch, ZenithError
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.pageserver.users import Role, require
from zenith.pageserver.workers import WORKER_COLUMNS, job_of, short, workers_of
from zenith.pgwire.server import ECHO_LIMIT, Session, clip
from zenith.postgres.keys import DEFAULTTABLESPACE_OID, RelTag, rel_block_key
from zenith.storage import KEY_SIZE, BranchInfo, Record, RecordKind, TimelineInfo

if TYPE_CHECKING:
    from zenith.pageserver.daemon import Pageserver

Handler = Callable[["Pageserver", Session, list[str]], Awaitable[None]]

BRANCH_COLUMNS: Final = [
    "name",
    "timeline_id",
    "ancestor_timeline_id",
    "ancestor_lsn",
    "last_record_lsn",
]

#: Statements standard clients send on their own, answered with PostgreSQL's tags.
_NOOPS: Final = [
    (re.compile(r"set\b", re.I), "SET"),
    (re.compile(r"reset\b", re.I), "RESET"),
    (re.compile(r"begin\b", re.I), "BEGIN"),
    (re.compile(r"start\s+transaction\b", re.I), "START TRANSACTION"),
    (re.compile(r"(commit|end)\b", re.I), "COMMIT"),
    (re.compile(r"(rollback|abort)\b", re.I), "ROLLBACK"),
]

_NOOP_STARTS: Final = ("set", "reset", "begin", "start", "commit", "end", "rollb", "abort")
_QUOTING: Final = frozenset("'\"\\")
#: Pieces of a shell word outside double quotes: plain characters, a '...' string,
#: whitespace between words, a backslash escape, the opening of a "..." string; and inside
#: one. Quantifiers are possessive (no backtracking) and each match is one step of a
#: left-to-right scan, so splitting is linear in the text (shlex's is quadratic on a long
#: word) and, run in a thread, lets the event loop take the GIL between steps.
_PIECE: Final = re.compile(r"""([^\s'"\\]++)|'([^']*+)'|(\s++)|\\(.)|(")""", re.S)
_DQ_PIECE: Final = re.compile(r"""([^"\\]++)|\\(.)|(")""", re.S)
#: get_page reads a page on the event loop when at most this many deltas apply (each
#: about 20 µs); a longer chain goes to a worker thread.
INLINE_DELTAS: Final = 16
#: Commands longer than this are split in a worker thread.
_SPLIT_IN_THREAD: Final = 64 * 1024
#: Seconds between the progress NOTICEs of a long silent step (at most half the
#: statement timeout, which they keep from cutting the command).
STILL_WORKING_EVERY: Final = 30.0


def split_words(text: str, *, in_thread: bool = False) -> list[str]:
    """Split a command line as ``shlex.split`` does (POSIX mode, no comments) -- what
    :func:`zenith.pageserver.quoting.command_text` writes -- in linear time: '...' is
    literal, in "..." a backslash escapes only ``\\`` and ``"``, outside quotes it escapes
    any character. :class:`SyntaxError_` for an unclosed quote or a trailing backslash.
    ``in_thread``: hand the GIL over every few thousand pieces, so that the event loop
    thread waits for it far less than the interpreter's 5 ms switch interval."""
    words: list[str] = []
    steps = 0
    current: list[str] = []
    in_word = False
    pos = 0
    while pos < len(text):
        steps += 1
        if in_thread and not steps % 2048:
            time.sleep(0)
        match = _PIECE.match(text, pos)
        if match is None:
            what = "no escaped character" if text[pos] == "\\" else "no closing quotation"
            raise SyntaxError_(f"cannot parse command: {what}")
        pos = match.end()
        plain, single, space, escaped, _ = match.groups()
        if space is not None:
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
            continue
        in_word = True
        if plain is not None:
            current.append(plain)
        elif single is not None:
            current.append(single)
        elif escaped is not None:
            current.append(escaped)
        else:
            pos = _double_quoted(text, pos, current, in_thread)
    if in_word:
        words.append("".join(current))
    return words


def _split(text: str, *, in_thread: bool = False) -> list[str]:
    if not any(c in text for c in _QUOTING):  # str's own search: fast on long texts
        return text.split()  # the common case
    return split_words(text, in_thread=in_thread)


def _double_quoted(text: str, pos: int, out: list[str], in_thread: bool) -> int:
    """Append the body of the "..." string starting at ``pos``; returns the position after
    its closing quote."""
    steps = 0
    while True:
        steps += 1
        if in_thread and not steps % 2048:
            time.sleep(0)
        match = _DQ_PIECE.match(text, pos)
        if match is None:
            raise SyntaxError_("cannot parse command: no closing quotation")
        pos = match.end()
        chars, escaped, close = match.groups()
        if close is not None:
            return pos
        if chars is not None:
            out.append(chars)
        else:
            out.append(escaped if escaped in '"\\' else "\\" + escaped)


@dataclass(frozen=True)
class Command:
    handler: Handler
    usage: str
    summary: str


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, summary: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(fn, f"{name} {usage}".strip(), summary)
        return fn

    return register


async def dispatch(server: Pageserver, session: Session, query: str) -> None:
    """Run one simple-query string. Raises :class:`ZenithError` for the client to see."""
    text = query.strip().rstrip(";").strip()
    if text[:5].lower().startswith(_NOOP_STARTS):
        for pattern, tag in _NOOPS:
            if pattern.match(text):
                await session.send_command_complete(tag)
                return
    if len(text) < _SPLIT_IN_THREAD:
        words = _split(text)
    else:
        words = await short(server).run(_split, text, in_thread=True)
    if not words:
        await session.send_command_complete("")
        return
    name = words[0].lower()
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise SyntaxError_(
            f'unknown command "{clip(words[0])}"',
            hint="commands: " + ", ".join(sorted(COMMANDS)),
        )
    try:
        try:
            await cmd.handler(server, session, words[1:])
        except _Usage as exc:
            raise SyntaxError_(f"{exc}", hint=f"usage: {cmd.usage}") from None
    except ZenithError as exc:
        _clip_echoes(exc, words[1:])
        raise


def _clip_echoes(exc: ZenithError, args: list[str]) -> None:
    """Cut every long argument an error quotes (a branch name in "does not exist", a
    value in "invalid ...": raised here or in storage) to ECHO_LIMIT characters, so an
    error carries at most a few hundred bytes of what the client sent."""
    forms: set[str] = set()
    for arg in args:
        if len(arg) > ECHO_LIMIT:
            # As written, as repr() shows it, and the NAME of NAME@LSN.
            forms.update(f for f in (arg, repr(arg)[1:-1], arg.partition("@")[0])
                         if len(f) > ECHO_LIMIT)
    if not forms:
        return
    for field in ("message", "detail", "hint"):
        text = getattr(exc, field)
        if text:
            for form in sorted(forms, key=len, reverse=True):
                if form in text:
                    text = text.replace(form, clip(form))
            setattr(exc, field, text)


@contextlib.asynccontextmanager
async def still_working(server: Pageserver, session: Session, what: str
                        ) -> AsyncIterator[None]:
    """A NOTICE every STILL_WORKING_EVERY seconds (or half the statement timeout, if
    shorter) while the body runs: progress the client sees, and traffic that keeps the
    statement timeout from cutting a long step that has nothing else to say."""
    start = time.monotonic()
    limit = server.config.statement_timeout
    every = min(STILL_WORKING_EVERY, limit / 2) if limit else STILL_WORKING_EVERY

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            await session.send_notice(f"{what}: {time.monotonic() - start:.0f} s")

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class _Usage(Exception):
    """Bad arguments for a command; turned into a 42601 with the command's usage."""


def expect_args(args: list[str], least: int, most: int) -> list[str]:
    if not least <= len(args) <= most:
        raise _Usage(f"expected {least}..{most} arguments, got {len(args)}" if least != most
                     else f"expected {least} argument{'s' if least != 1 else ''}, got {len(args)}")
    return args


def lsn_arg(text: str) -> Lsn:
    try:
        return Lsn.parse(text)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _int(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _Usage(f"{what} must be an integer, got {clip(text, 40)!r}") from None
    if not low <= value <= high:
        raise _Usage(f"{what} must be in {low}..{high}, got {value}")
    return value


def split_at(text: str) -> tuple[str, Lsn | None]:
    """``NAME[@LSN]`` to its parts."""
    name, sep, lsn = text.partition("@")
    if not name or (sep and not lsn):
        raise _Usage(f"expected NAME[@LSN], got {clip(text)!r}")
    return name, lsn_arg(lsn) if sep else None


def timeline_row(name: str | None, tl: TimelineInfo) -> list[str | None]:
    return [
        name,
        str(tl.timeline_id),
        str(tl.ancestor_id) if tl.ancestor_id else None,
        str(tl.ancestor_lsn) if tl.ancestor_lsn is not None else None,
        str(tl.last_record_lsn),
    ]


def branch_rows(branches: Sequence[BranchInfo]) -> list[list[str | None]]:
    return [timeline_row(b.name, b.timeline) for b in branches]


# -- commands -------------------------------------------------------------------------------


@command("status", "", "server version, repository id, listen address")
async def _status(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    uptime = f"{time.monotonic() - server.started:.0f}"
    await session.send_rows(
        ["server_version", "repository_id", "listen_address", "uptime_seconds", "user", "role"],
        [[f"zenith {__version__}", server.repo.repository_id, server.listen, uptime,
          session.user.name, session.user.role]],
        "SELECT 1",
    )


@command("branch_list", "", "one row per branch")
async def _branch_list(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    rows = branch_rows(server.repo.list_branches())
    await session.send_rows(BRANCH_COLUMNS, rows, f"SELECT {len(rows)}")


@command("workers", "", "worker pools (threads, busy, queued) and users' long jobs")
async def _workers(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    require(session.user, Role.ADMIN, "see the worker pools")
    rows = workers_of(server).rows()
    await session.send_rows(WORKER_COLUMNS, rows, f"SELECT {len(rows)}")


@command("timeline_list", "", "every timeline, named or not, with its branch names")
async def _timeline_list(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    names: dict[TimelineId, list[str]] = {}
    for b in server.repo.list_branches():
        names.setdefault(b.timeline.timeline_id, []).append(b.name)
    rows = [
        [*timeline_row(None, t)[1:], str(t.min_readable_lsn),
         ",".join(names.get(t.timeline_id, [])), "true" if t.received else "false",
         str(t.pending.lsn) if t.pending else None, str(t.pending.count) if t.pending else "0"]
        for t in server.repo.list_timelines()
    ]
    await session.send_rows(
        [*BRANCH_COLUMNS[1:], "min_readable_lsn", "branches", "received", "pending_lsn",
         "pending_records"], rows, f"SELECT {len(rows)}"
    )


@command("branch_create", "<name> [<branch-or-timeline>[@<lsn>]]", "create a branch")
async def _branch_create(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 2)
    require(session.user, Role.ADMIN, "create branches")
    source, lsn = split_at(args[1]) if len(args) == 2 else (None, None)
    info = await short(server).run(server.repo.create_branch, args[0], source, lsn)
    await session.send_rows(BRANCH_COLUMNS, branch_rows([info]), "SELECT 1")


@command("branch_delete", "<name>", "remove a branch name (data others depend on is kept)")
async def _branch_delete(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.ADMIN, "delete branches")
    await short(server).run(server.repo.delete_branch, args[0])
    await session.send_command_complete("BRANCH_DELETE")


@command("timeline_delete", "<timeline_id>",
         "delete an unnamed timeline without descendants, with its records")
async def _timeline_delete(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.ADMIN, "delete timelines")
    if not TimelineId.looks_like(args[0]):
        raise SyntaxError_(f"expected a timeline id (32 hex digits), got {clip(args[0], 40)!r}")
    # Deleting a long timeline's records takes a while: progress keeps the connection.
    async with still_working(server, session, "deleting the timeline's records"), \
            job_of(server, session.user) as job:
        await job.run(server.repo.delete_timeline, TimelineId.parse(args[0]))
    await session.send_command_complete("TIMELINE_DELETE")


@command("get_page", "<branch-or-timeline> <lsn> <key-hex>", "a key's value at an LSN")
async def _get_page(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 3, 3)
    lsn = lsn_arg(args[1])
    try:
        key = bytes.fromhex(args[2])
    except ValueError:
        raise _Usage(f"key must be {KEY_SIZE} bytes in hex, got {args[2]!r:.60}") from None
    if len(key) != KEY_SIZE:
        raise _Usage(f"key must be {KEY_SIZE} bytes in hex, got {len(key)} bytes")
    # A page with a few deltas on its image (compact versions keep at most 15) is read on
    # the event loop: a thread hop costs more than the read (GetPage is the hot path).
    # A longer chain means redo, which must not stall the loop: in the short pool, which
    # whole-state work (digest, export) never fills.
    try:
        try:
            value = server.repo.get_value_of(args[0], key, lsn, max_deltas=INLINE_DELTAS)
        except LimitExceeded:
            value = await short(server).run(server.repo.get_value_of, args[0], key, lsn,
                                            max_deltas=server.config.max_delta_chain)
    except LimitExceeded as exc:
        raise LimitExceeded(exc.message, hint="the bound is max_delta_chain in the "
                            "pageserver's config.toml") from None
    await session.send_rows(["page"], [[value]], "SELECT 1")


@command("digest", "<branch-or-timeline>[@<lsn>]", "hash of the whole state at an LSN")
async def _digest(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    name, lsn = split_at(args[0])
    tl = server.repo.resolve(name)
    at = tl.last_record_lsn if lsn is None else lsn
    # Hashing a large state takes minutes and sends nothing: progress keeps the
    # statement timeout from cutting it (`zenith digest` waits an hour). A long job: a
    # reader's digests wait for its own earlier ones, and stop when the command ends.
    async with still_working(server, session, f"digest of {clip(name)} at {at}"), \
            job_of(server, session.user) as job:
        digest = await job.run(server.repo.digest, tl.timeline_id, at, cancel=job.cancel)
    await session.send_rows(
        ["name", "timeline_id", "lsn", "digest"], [[name, str(tl.timeline_id), str(at), digest]],
        "SELECT 1",
    )


@command(
    "generate",
    "<branch> <pages> <rounds> [<seed>] [<page-size>] [one_lsn]",
    "write deterministic synthetic page history (round r rewrites every page)",
)
async def _generate(server: Pageserver, session: Session, args: list[str]) -> None:
    one_lsn = len(args) == 6 and args[5].lower() == "one_lsn"
    if one_lsn:
        args = args[:5]
    expect_args(args, 3, 5)
    require(session.user, Role.ADMIN, "generate history")
    pages = _int(args[1], "pages", 1, 1 << 24)
    rounds = _int(args[2], "rounds", 1, 1 << 20)
    seed = _int(args[3], "seed", 0, 1 << 62) if len(args) > 3 else 0
    page_size = _int(args[4], "page size", 16, 1 << 20) if len(args) > 4 else 8192
    repo = server.repo
    if TimelineId.looks_like(args[0]):
        tl = repo.resolve(args[0])
        if tl.received:
            raise InvalidState(
                f"timeline {tl.timeline_id} was received from another pageserver, which "
                "writes it; write to a branch instead (it forks a timeline of its own)"
            )
    else:
        try:
            # One writer per timeline: a received branch forks a child timeline first.
            tl = await short(server).run(repo.branch_for_writing, args[0])
        except UnknownBranch:
            tl = (await short(server).run(repo.create_branch, args[0])).timeline
    start = tl.last_record_lsn
    total = 0
    for r in range(rounds):
        # One round of 2^24 pages takes long: progress within it too.
        async with still_working(server, session, f"round {r + 1}/{rounds}"), \
                job_of(server, session.user) as job:
            written = await job.run(
                generate_round, server, tl.timeline_id, pages, seed, r, page_size, one_lsn
            )
        total += written
        await session.send_notice(f"round {r + 1}/{rounds}: {total} records")
    end = repo.get_timeline(tl.timeline_id).last_record_lsn
    await session.send_rows(
        ["name", "timeline_id", "start_lsn", "last_record_lsn", "records"],
        [[args[0], str(tl.timeline_id), str(start), str(end), str(total)]],
        "SELECT 1",
    )


SYNTHETIC_REL: Final = RelTag(DEFAULTTABLESPACE_OID, 5, 16384)
_GEN_BATCH: Final = 1024


def synthetic_page(seed: int, round_no: int, blkno: int, lsn: int, page_size: int) -> bytes:
    """Page ``blkno`` as round ``round_no`` writes it: its LSN, then seeded bytes."""
    rng = random.Random((seed << 40) ^ (round_no << 24) ^ blkno)
    header = lsn.to_bytes(8, "big") + blkno.to_bytes(4, "big") + round_no.to_bytes(4, "big")
    return (header + rng.randbytes(page_size - len(header)))[:page_size]


def generate_round(
    server: Pageserver, tid: TimelineId, pages: int, seed: int, round_no: int, page_size: int,
    one_lsn: bool = False,
) -> int:
    """Rewrite every page once, at growing LSNs after the timeline's last record (or all
    at one LSN, as a base-backup import writes a cluster)."""
    repo = server.repo
    base = int(repo.get_timeline(tid).last_record_lsn)
    step = page_size + 64  # as if each page were one WAL record with a full-page image

    def lsn_of(blk: int) -> int:
        return base + (pages if one_lsn else blk + 1) * step

    def page(blk: int) -> Record:
        return Record(rel_block_key(SYNTHETIC_REL, blk), Lsn(lsn_of(blk)), RecordKind.IMAGE,
                      synthetic_page(seed, round_no, blk, lsn_of(blk), page_size))

    if one_lsn:  # one streamed batch: the LSN is published whole or not at all
        repo.put_records(tid, (page(blk) for blk in range(pages)))
        return pages
    for first in range(0, pages, _GEN_BATCH):
        repo.put_records(tid, [page(blk) for blk in range(first, min(pages, first + _GEN_BATCH))])
    return pages



@command("user_add", "<name> <admin|push|read> <scram-verifier>|- [<md5-hash>]",
         "add a user by its password verifier (never the password); - : no password "
         "(client certificate only)")
async def _user_add(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 3, 4)
    require(session.user, Role.ADMIN, "manage users")
    role = Role.parse(args[1])
    # An MD5 hash is as good as the password to an attacker: keep it only when this
    # pageserver authenticates with md5; otherwise only the SCRAM verifier is stored.
    md5 = args[3] if len(args) > 3 and server.config.auth_method == "md5" else None
    verifier = None if args[2] == "-" else args[2]
    user = await short(server).run(server.users.add, args[0], role, verifier, md5)
    await session.send_rows(["name", "role"], [[user.name, user.role]], "SELECT 1")


@command("user_list", "", "users and their roles")
async def _user_list(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 0, 0)
    require(session.user, Role.ADMIN, "list users")
    rows = [[u.name, u.role] for u in server.users.list()]
    await session.send_rows(["name", "role"], rows, f"SELECT {len(rows)}")


@command("user_remove", "<name>", "remove a user")
async def _user_remove(server: Pageserver, session: Session, args: list[str]) -> None:
    expect_args(args, 1, 1)
    require(session.user, Role.ADMIN, "manage users")
    await short(server).run(server.users.remove, args[0])
    await session.send_command_complete("USER_REMOVE")
