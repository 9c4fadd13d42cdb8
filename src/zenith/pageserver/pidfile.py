"""``pageserver.pid``: which pageserver process serves a repository.

The file is locked (``flock``) for the life of the process, which is how ``zenith start``
and a second ``zenith pageserver`` know that one is already running, even after a crash
left the file behind. Kept apart from the daemon so the CLI reads it without importing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from zenith.errors import InvalidState


class AlreadyRunning(InvalidState):
    pass


class PidFile:
    """``pageserver.pid``: ``<pid>\\n<listen>\\n``, locked while the process lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self, listen: str) -> None:
        f = open(self.path, "a+", encoding="ascii",  # noqa: SIM115 - held for the lifetime
                 opener=lambda path, flags: os.open(path, flags, 0o600))
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            pid = running_pid(self.path)
            raise AlreadyRunning(
                f"a pageserver is already running on this repository (pid {pid})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n{listen}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._file.close()
            self._file = None


def running_pid(path: Path) -> int | None:
    """The pid of the pageserver holding the pid file's lock, or None if none does."""
    try:
        f = open(path, encoding="ascii")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            first = f.readline().strip()
            return int(first) if first.isdigit() else -1
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie that nobody reaps has finished): what a stop
    waits for after the pid file is released."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
