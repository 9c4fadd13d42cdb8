"""``zenith export``: write a branch's PostgreSQL data directory at an LSN, from the local
pageserver or straight from an origin, ready for the stock ``postgres`` to start on."""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import queue
import shutil
import stat
import tarfile
import threading
from pathlib import Path

import click

from zenith.cli.context import Repo, pass_repo
from zenith.errors import ConnectionFailed, InvalidArgument, ZenithError
from zenith.pageserver.quoting import command_text
from zenith.pgwire.client import (
    ConnInfo,
    Notice,
    connect,
    parse_local_uri,
    parse_origin_uri,
)


class _ChunkReader(io.RawIOBase):
    """A read-only file over chunks handed in through a queue (None ends it), so tarfile
    can extract while the stream is still arriving."""

    def __init__(self, chunks: queue.Queue[bytes | None]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf and not self._eof:
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._buf = chunk
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class UnsafeTar(InvalidArgument):
    """A tar member zenith will not write (from a broken or hostile origin)."""


def _member_path(member: tarfile.TarInfo) -> list[str]:
    """The member's path as components inside the target, or :class:`UnsafeTar`."""
    name = member.name
    shown = repr(name[:200])
    if "\0" in name:
        raise UnsafeTar(f"refused tar member {shown}: NUL in its name")
    if name.startswith("/"):
        raise UnsafeTar(f"refused tar member {shown}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeTar(f"refused tar member {shown}: '..' in its path")
    if not (member.isfile() or member.isdir()) or member.issparse():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
                else "a device" if member.ischr() or member.isblk()
                else "a FIFO" if member.isfifo() else "a sparse file" if member.issparse()
                else f"of type {member.type!r}")
        raise UnsafeTar(f"refused tar member {shown}: {kind} (only regular files and "
                        "directories are accepted)")
    if not parts and not member.isdir():
        raise UnsafeTar(f"refused tar member {shown}: empty path")
    return parts


def _unpack(tar: tarfile.TarFile, target: Path) -> None:
    """Write each member under ``target`` by zenith's own rules, whatever the Python patch
    level's tarfile filters do: regular files and directories only, relative normalized
    paths, nothing followed (every path component is one this function created), files
    0600 and directories 0700, exactly the announced size written."""
    made: set[tuple[str, ...]] = {()}
    root = os.path.realpath(target)

    def make_dirs(parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts) + 1):
            if parts[:i] in made:
                continue
            path = os.path.join(root, *parts[:i])
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                info = os.lstat(path)
                if not stat.S_ISDIR(info.st_mode):
                    raise UnsafeTar(f"refused tar member {'/'.join(parts)!r}: "
                                    f"{'/'.join(parts[:i])!r} is not a directory") from None
            made.add(parts[:i])

    for member in tar:
        parts = tuple(_member_path(member))
        if member.isdir():
            make_dirs(parts)
            continue
        make_dirs(parts[:-1])
        path = os.path.join(root, *parts)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise UnsafeTar(f"refused tar member {member.name[:200]!r}: it appears twice")\
                from None
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            left = member.size
            while left > 0:
                block = source.read(min(left, 1 << 20))
                if not block:
                    raise UnsafeTar(f"tar member {member.name[:200]!r} ends before its "
                                    f"announced {member.size} bytes")
                out.write(block)
                left -= len(block)


def _extract(chunks: queue.Queue[bytes | None], target: Path, failed: threading.Event) -> None:
    try:
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), 1 << 20),
                          mode="r|") as tar:
            _unpack(tar, target)
    except BaseException:
        failed.set()
        while chunks.get() is not None:  # let the producer finish
            pass
        raise


async def _export(uri: ConnInfo, target_spec: str, target: Path, keep_config: bool) -> int:
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    failed = threading.Event()
    try:
        conn = await connect(uri, timeout=10.0)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"cannot reach the pageserver: {exc.message}") from exc
    total = 0
    async with conn:
        conn.on_notice = _say
        words = ("fullbackup", target_spec) + (("keep_config",) if keep_config else ())
        stream = await conn.copy_out(command_text(*words))
        extractor = asyncio.create_task(asyncio.to_thread(_extract, chunks, target, failed))
        try:
            while (chunk := await stream.read()) is not None:
                total += len(chunk)
                if not failed.is_set():
                    await asyncio.to_thread(chunks.put, chunk)
        finally:
            await asyncio.to_thread(chunks.put, None)
            await extractor
    return total


def _owner_ids(owner: str) -> tuple[int, int]:
    """``--owner``'s user and primary group IDs."""
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise InvalidArgument(f'--owner: no user "{owner}" on this machine') from None
    return entry.pw_uid, entry.pw_gid


def check_owner_target(directory: Path, owner: str, uid: int) -> None:
    """Refuse an ``--owner`` export whose directory, or a directory above it, the target
    user owns (or that is a symbolic link): that user could swap what is inside for links
    while root hands the files over."""
    if uid == os.geteuid():
        return  # giving files to oneself changes nothing
    if directory.is_symlink():
        raise InvalidArgument(f"--owner: target directory {directory} is a symbolic link",
                              hint="give the real directory")
    path = Path(os.path.abspath(directory))
    for place in [path, *path.parents]:
        try:
            info = os.stat(place)
        except FileNotFoundError:
            continue  # created below by root
        if info.st_uid == uid:
            raise InvalidArgument(
                f"--owner: {place} is owned by {owner}, who could redirect the files "
                "while they are handed over",
                hint=f"export into a directory that {owner} does not own (and that is "
                     "not under one), e.g. one made by root")


def give_to(directory: Path, uid: int, gid: int) -> None:
    """Hand everything under ``directory`` (and it) to ``uid:gid`` without following any
    symbolic link: bottom-up through directory descriptors, so each directory is handed
    over only after everything beneath it, and no name is ever resolved through a link."""
    for _root, dirs, files, root_fd in os.fwalk(directory, topdown=False,
                                                follow_symlinks=False):
        for name in [*files, *dirs]:
            os.chown(name, uid, gid, dir_fd=root_fd, follow_symlinks=False)
    os.chown(directory, uid, gid, follow_symlinks=False)


def _say(notice: Notice) -> None:
    """The pageserver's notices, on stderr: which settings it turned off, mainly."""
    if notice.message.startswith("disabled "):
        click.echo(f"{notice.message} (use --keep-config to keep them)", err=True)
    else:
        click.echo(notice.message, err=True)


@click.command("export")
@click.argument("target_spec", metavar="[ORIGIN:]BRANCH[@LSN]")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--owner", help="Give the files to this user (e.g. postgres), as root; never "
              "through a symbolic link, and refused when that user owns the directory or one "
              "above it.")
@click.option("--keep-config", is_flag=True,
              help="Keep archive_mode, archive_command, archive_library, primary_conninfo, "
                   "primary_slot_name, restore_command and synchronous_standby_names as the "
                   "source had them (by default they are turned off).")
@pass_repo
def export(repo: Repo, target_spec: str, directory: Path, owner: str | None,
           keep_config: bool) -> None:
    """Write BRANCH as of LSN (default: its last record LSN) as a PostgreSQL data directory.

    With ORIGIN: read it straight from that pageserver. The directory must be absent or
    empty; `postgres -D DIRECTORY` then starts on it (set a port of your own in
    postgresql.auto.conf: the source's configuration comes along).

    The copy is safe to start next to its source: it runs on the next timeline (the
    source's + 1, with its history file), so its WAL never takes a source segment's name;
    settings that would make it archive into the source's archive, act as a standby or wait
    for the source's synchronous standbys are turned off (and named on stderr) unless
    --keep-config; replication slots are never copied.
    """
    origin, sep, branch_at = target_spec.rpartition(":")
    # An origin is verified as push and pull verify it (TLS, verify-full by default).
    uri = (parse_origin_uri(repo.config.origin(origin)) if sep
           else parse_local_uri(repo.config.local_uri()))
    if not branch_at:
        raise InvalidArgument(f"expected [ORIGIN:]BRANCH[@LSN], got {target_spec!r}")
    ids = _owner_ids(owner) if owner else None
    if owner and ids:
        check_owner_target(directory, owner, ids[0])
    if directory.exists() and any(directory.iterdir()):
        raise InvalidArgument(f"target directory {directory} is not empty")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        total = asyncio.run(_export(uri, branch_at, directory, keep_config))
        if ids is not None:
            give_to(directory, *ids)
    except (ZenithError, OSError, tarfile.TarError) as exc:
        # Nothing half-written stays behind.
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if isinstance(exc, ZenithError):
            raise
        raise InvalidArgument(f"export to {directory} failed: {exc}") from exc
    os.chmod(directory, 0o700)
    click.echo(f"exported {target_spec} to {directory} ({total / 1048576:.1f} MiB)")
