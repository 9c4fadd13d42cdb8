"""The repository: timelines, branches, LSN-versioned records and GetPage@LSN.

Import the value types and :func:`open_repository` from here; the engine behind it is an
implementation detail (today a SQLite index beside one append-only data file per timeline;
see ``sqlite.py`` and ``datafile.py``).
"""

from __future__ import annotations

import os

from zenith.storage.api import (
    KEY_SIZE,
    BranchInfo,
    Cursor,
    Record,
    RecordKind,
    Repository,
    TimelineInfo,
    WriteResult,
    checked_record,
    validate_branch_name,
)
from zenith.storage.compaction import CompactResult
from zenith.storage.datafile import CorruptDataFile
from zenith.storage.gc import GcResult
from zenith.storage.sqlite import SqliteRepository

__all__ = [
    "KEY_SIZE",
    "BranchInfo",
    "CompactResult",
    "CorruptDataFile",
    "Cursor",
    "GcResult",
    "Record",
    "RecordKind",
    "Repository",
    "SqliteRepository",
    "TimelineInfo",
    "WriteResult",
    "checked_record",
    "open_repository",
    "validate_branch_name",
]


def open_repository(path: str | os.PathLike[str], *, durable: bool = True) -> SqliteRepository:
    """Open (creating if needed) the repository database at ``path``; the timelines' data
    files live in the directory ``<path>.d`` beside it."""
    return SqliteRepository(path, durable=durable)
