"""``zenith export``: write a branch's PostgreSQL data directory at an LSN, from the local
pageserver or straight from an origin, ready for the stock ``postgres`` to start on."""

from __future__ import annotations

import asyncio
import io
import os
import queue
import shutil
import tarfile
import threading
from pathlib import Path

import click

from zenith.cli.context import Repo, pass_repo
from zenith.errors import ConnectionFailed, InvalidArgument, ZenithError
from zenith.pageserver.quoting import command_text
from zenith.pgwire.client import Notice, connect


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


def _extract(chunks: queue.Queue[bytes | None], target: Path, failed: threading.Event) -> None:
    try:
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), 1 << 20),
                          mode="r|") as tar:
            tar.extractall(target, filter="data")
    except BaseException:
        failed.set()
        while chunks.get() is not None:  # let the producer finish
            pass
        raise


async def _export(uri: str, target_spec: str, target: Path, keep_config: bool) -> int:
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


def _say(notice: Notice) -> None:
    """The pageserver's notices, on stderr: which settings it turned off, mainly."""
    if notice.message.startswith("disabled "):
        click.echo(f"{notice.message} (use --keep-config to keep them)", err=True)
    else:
        click.echo(notice.message, err=True)


@click.command("export")
@click.argument("target_spec", metavar="[ORIGIN:]BRANCH[@LSN]")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--owner", help="Give the files to this user (e.g. postgres), as root.")
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
    uri = repo.config.origin(origin) if sep else repo.config.local_uri()
    if not branch_at:
        raise InvalidArgument(f"expected [ORIGIN:]BRANCH[@LSN], got {target_spec!r}")
    if directory.exists() and any(directory.iterdir()):
        raise InvalidArgument(f"target directory {directory} is not empty")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        total = asyncio.run(_export(uri, branch_at, directory, keep_config))
        if owner:
            for root, dirs, files in os.walk(directory):
                for name in [*dirs, *files]:
                    shutil.chown(os.path.join(root, name), owner, owner)
            shutil.chown(directory, owner, owner)
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
