"""``zenith export``: write a branch's PostgreSQL data directory at an LSN, from the local
pageserver or straight from an origin, ready for the stock ``postgres`` to start on."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import pwd
import queue
import shutil
import stat
import tarfile
import threading
from pathlib import Path
from typing import Final

import click

from zenith.bucket.layout import is_s3_uri
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


#: Largest pax extended header or GNU long name/link member zenith lets tarfile read (it
#: reads them whole into memory), and most extension headers before one member.
MAX_TAR_HEADER: Final = 64 * 1024
_MAX_EXTENSIONS: Final = 8
_EXTENSIONS: Final = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                      tarfile.SOLARIS_XHDTYPE)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them, a pax header or GNU long name over
    :data:`MAX_TAR_HEADER`, more than :data:`_MAX_EXTENSIONS` of them in a row (each nests
    a call), pax global headers (they pile up for the whole archive) and old GNU sparse
    members (their extension blocks are read in a loop)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        shown = repr(self.name[:200])
        if self.type == tarfile.XGLTYPE:
            raise UnsafeTar(f"refused tar member {shown}: a pax global header")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeTar(f"refused tar member {shown}: a sparse file (only regular files "
                            "and directories are accepted)")
        if self.type not in _EXTENSIONS:
            return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]
        if self.size > MAX_TAR_HEADER:
            raise UnsafeTar(f"refused tar member {shown}: an extended header of {self.size} "
                            f"bytes (at most {MAX_TAR_HEADER})")
        depth: int = getattr(tarfile_, "_zenith_depth", 0)
        if depth >= _MAX_EXTENSIONS:
            raise UnsafeTar(f"refused tar member {shown}: more than {_MAX_EXTENSIONS} "
                            "extended headers in a row")
        setattr(tarfile_, "_zenith_depth", depth + 1)  # noqa: B010 - not a TarFile field
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]
        finally:
            setattr(tarfile_, "_zenith_depth", depth)  # noqa: B010


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _unpack(tar: tarfile.TarFile, root_fd: int) -> None:
    """Write each member under the directory open as ``root_fd`` by zenith's own rules,
    whatever the Python patch level's tarfile filters do: regular files and directories
    only, relative normalized paths, files 0600 and directories 0700, exactly the
    announced size written. Nothing is resolved by path: each component is opened
    ``O_NOFOLLOW`` relative to its parent's descriptor and must be a directory this
    function created (its device and inode recorded), and each file is created
    ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to its directory's descriptor."""
    root = os.fstat(root_fd)
    made: set[tuple[int, int]] = {(root.st_dev, root.st_ino)}
    last: tuple[tuple[str, ...], int] | None = None  # the last directory opened

    def open_dir(parts: tuple[str, ...], member: str) -> int:
        """A new descriptor of the directory ``parts``, made where missing."""
        fd = os.dup(root_fd)
        try:
            for i, name in enumerate(parts):
                shown = "/".join(parts[:i + 1])[:200]
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        raise UnsafeTar(f"refused tar member {member!r}: {shown!r} appeared "
                                        "while it was being made") from None
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    info = os.fstat(child)
                    made.add((info.st_dev, info.st_ino))
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise UnsafeTar(f"refused tar member {member!r}: {shown!r} is not a "
                                        "directory") from None
                    raise
                os.close(fd)
                fd = child
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) not in made:
                    raise UnsafeTar(f"refused tar member {member!r}: {shown!r} is a "
                                    "directory this export did not create")
            return fd
        except BaseException:
            os.close(fd)
            raise

    try:
        while (member := tar.next()) is not None:
            tar.members.clear()  # type: ignore[attr-defined]  # else it keeps every header
            parts = tuple(_member_path(member))
            shown = member.name[:200]
            if member.isdir():
                os.close(open_dir(parts, shown))
                continue
            if last is None or last[0] != parts[:-1]:
                if last is not None:
                    os.close(last[1])
                    last = None
                last = (parts[:-1], open_dir(parts[:-1], shown))
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o600, dir_fd=last[1])
            except FileExistsError:
                raise UnsafeTar(f"refused tar member {shown!r}: it appears twice") from None
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                left = member.size
                while left > 0:
                    block = source.read(min(left, 1 << 20))
                    if not block:
                        raise UnsafeTar(f"tar member {shown!r} ends before its "
                                        f"announced {member.size} bytes")
                    out.write(block)
                    left -= len(block)
    finally:
        if last is not None:
            os.close(last[1])


def _extract(chunks: queue.Queue[bytes | None], target_fd: int,
             failed: threading.Event) -> None:
    try:
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), 1 << 20),
                          mode="r|", tarinfo=_BoundedTarInfo) as tar:
            _unpack(tar, target_fd)
    except BaseException:
        failed.set()
        while chunks.get() is not None:  # let the producer finish
            pass
        raise


async def _export(uri: ConnInfo, command: tuple[str, ...], target_fd: int,
                  keep_config: bool) -> int:
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    failed = threading.Event()
    try:
        conn = await connect(uri, timeout=10.0)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"cannot reach the pageserver: {exc.message}") from exc
    total = 0
    async with conn:
        conn.on_notice = _say
        words = command + (("keep_config",) if keep_config else ())
        stream = await conn.copy_out(command_text(*words))
        extractor = asyncio.create_task(asyncio.to_thread(_extract, chunks, target_fd, failed))
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
    """Refuse an ``--owner`` export when a directory above the target (after resolving
    symbolic links) is owned by the target user, or is writable by group or others without
    the sticky bit: that user could swap entries for links while root hands the files over.
    The target itself is checked when it is opened (:func:`open_target`)."""
    if uid == os.geteuid():
        return  # giving files to oneself changes nothing
    if directory.is_symlink():
        raise InvalidArgument(f"--owner: target directory {directory} is a symbolic link",
                              hint="give the real directory")
    hint = (f"export into a directory that {owner} does not own and cannot write to (nor "
            "under one), e.g. one made by root with mktemp -d")
    for place in Path(os.path.realpath(directory)).parents:
        try:
            info = os.stat(place)
        except FileNotFoundError:
            continue  # made below by root
        if info.st_uid == uid:
            raise InvalidArgument(
                f"--owner: {place} is owned by {owner}, who could redirect the files "
                "while they are handed over", hint=hint)
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise InvalidArgument(
                f"--owner: {place} is writable by its group or by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}, no sticky bit), who could redirect the "
                "files while they are handed over", hint=hint)


def open_target(directory: Path, *, owner: str | None) -> tuple[int, int, str, bool]:
    """Open (or make) the export's target directory; returns a descriptor of it, one of
    its parent, its name in the parent and whether this call made it. The missing
    directories on the way are made one by one with ``mkdir`` relative to their parent's
    descriptor (one that appears meanwhile is refused, never adopted). An existing target
    must be empty and owned by the invoking user, and with ``--owner`` (for another user)
    writable by no one else; a symbolic link is never followed there."""
    real = Path(os.path.realpath(directory))
    missing: list[str] = []
    base = real
    while not base.exists() and base != base.parent:
        missing.insert(0, base.name)
        base = base.parent
    name = missing[-1] if missing else real.name
    fd = os.open(base if missing else real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(missing):
            try:
                os.mkdir(part, 0o700 if i == len(missing) - 1 else 0o755, dir_fd=fd)
            except FileExistsError:
                raise InvalidArgument(f"{base.joinpath(*missing[:i + 1])} appeared while the "
                                      "export was creating it; refused") from None
            if i < len(missing) - 1:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        try:
            target = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise InvalidArgument(f"target directory {directory} is not a directory "
                                      "(or became a symbolic link)") from None
            raise
    except BaseException:
        os.close(fd)
        raise
    try:
        info = os.fstat(target)
        if not missing:
            if info.st_uid != os.geteuid():
                try:
                    who = pwd.getpwuid(info.st_uid).pw_name
                except KeyError:
                    who = f"uid {info.st_uid}"
                raise InvalidArgument(
                    f"{'--owner: ' if owner else ''}target directory {directory} is owned by "
                    f"{who}, who could change it while the export writes there",
                    hint="give a new directory, or an empty one of your own")
            if owner is not None and info.st_mode & 0o022:
                raise InvalidArgument(
                    f"--owner: target directory {directory} is writable by its group or by "
                    f"others (mode {stat.S_IMODE(info.st_mode):04o})",
                    hint="give a new directory, or an empty one only you can write to")
            if os.listdir(target):
                raise InvalidArgument(f"target directory {directory} is not empty")
    except BaseException:
        os.close(target)
        os.close(fd)
        raise
    return target, fd, name, bool(missing)


def _empty(dir_fd: int) -> None:
    """Remove everything in the directory open as ``dir_fd``, following no link."""
    for name in os.listdir(dir_fd):
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)


def give_to(directory: Path | int, uid: int, gid: int) -> None:
    """Hand everything under ``directory`` (a path, or a descriptor of it) and it to
    ``uid:gid`` without following any symbolic link: bottom-up through directory
    descriptors, so each directory is handed over only after everything beneath it, and no
    name is ever resolved through a link."""
    top = directory if isinstance(directory, int) else \
        os.open(directory, _DIR_FLAGS)
    try:
        for _root, dirs, files, root_fd in os.fwalk(".", topdown=False,
                                                    follow_symlinks=False, dir_fd=top):
            for name in [*files, *dirs]:
                os.chown(name, uid, gid, dir_fd=root_fd, follow_symlinks=False)
        os.fchown(top, uid, gid)
    finally:
        if not isinstance(directory, int):
            os.close(top)


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
              "above it, or one of them is writable by others (docs/security.md).")
@click.option("--keep-config", is_flag=True,
              help="Keep archive_mode, archive_command, archive_library, primary_conninfo, "
                   "primary_slot_name, restore_command and synchronous_standby_names as the "
                   "source had them (by default they are turned off).")
@pass_repo
def export(repo: Repo, target_spec: str, directory: Path, owner: str | None,
           keep_config: bool) -> None:
    """Write BRANCH as of LSN (default: its last record LSN) as a PostgreSQL data directory.

    With ORIGIN: read it straight from that pageserver; from a bucket origin, the local
    pageserver reads the branch into a scratch repository and exports it from there. The
    directory must be absent or empty; `postgres -D DIRECTORY` then starts on it (set a
    port of your own in postgresql.auto.conf: the source's configuration comes along).

    The copy is safe to start next to its source: it runs on the next timeline (the
    source's + 1, with its history file), so its WAL never takes a source segment's name;
    settings that would make it archive into the source's archive, act as a standby or wait
    for the source's synchronous standbys are turned off (and named on stderr) unless
    --keep-config; replication slots are never copied.
    """
    origin, sep, branch_at = target_spec.rpartition(":")
    if not branch_at:
        raise InvalidArgument(f"expected [ORIGIN:]BRANCH[@LSN], got {target_spec!r}")
    words: tuple[str, ...] = ("fullbackup", branch_at)
    origin_uri = repo.config.origin(origin) if sep else None
    if origin_uri is not None and is_s3_uri(origin_uri):
        # A bucket runs no code: the local pageserver reads it and sends the tar.
        words = ("bucket_fullbackup", origin_uri, branch_at)
        origin_uri = None
    # An origin is verified as push and pull verify it (TLS, verify-full by default).
    uri = (parse_origin_uri(origin_uri) if origin_uri is not None
           else parse_local_uri(repo.config.local_uri(), auth_method=repo.config.auth_method))
    ids = _owner_ids(owner) if owner else None
    if owner and ids:
        check_owner_target(directory, owner, ids[0])
    try:
        target_fd, parent_fd, name, created = open_target(directory, owner=owner)
    except OSError as exc:
        raise InvalidArgument(f"cannot export to {directory}: {exc.strerror}") from None
    try:
        try:
            total = asyncio.run(_export(uri, words, target_fd, keep_config))
            os.fchmod(target_fd, 0o700)
            if ids is not None:
                give_to(target_fd, *ids)
        except (ZenithError, OSError, tarfile.TarError) as exc:
            # Nothing half-written stays behind.
            _empty(target_fd)
            if created:
                os.rmdir(name, dir_fd=parent_fd)
            if isinstance(exc, ZenithError):
                raise
            raise InvalidArgument(f"export to {directory} failed: {exc}") from exc
    finally:
        os.close(target_fd)
        os.close(parent_fd)
    click.echo(f"exported {target_spec} to {directory} ({total / 1048576:.1f} MiB)")
