"""The WAL position type.

An LSN is a 64-bit byte position in PostgreSQL's write-ahead log. It is printed the way
PostgreSQL prints it (``pg_current_wal_lsn()``): the high and low 32 bits in upper-case
hex without leading zeros, separated by a slash (``16/B374D848``).
"""

from __future__ import annotations

import re
from typing import Final

_LSN_TEXT: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
MAX_LSN_VALUE: Final = (1 << 64) - 1


class Lsn(int):
    """An immutable WAL position. Behaves as an ``int`` for ordering and arithmetic."""

    __slots__ = ()

    def __new__(cls, value: int | Lsn = 0) -> Lsn:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"an LSN is built from an int, not {type(value).__name__}")
        if not 0 <= value <= MAX_LSN_VALUE:
            raise ValueError(f"LSN {value} is out of range (0 .. 2^64-1)")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse ``HI/LO`` as PostgreSQL prints it (either case of hex digits)."""
        if not isinstance(text, str):
            raise TypeError(f"an LSN is parsed from str, not {type(text).__name__}")
        match = _LSN_TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"invalid LSN {text!r}: expected two hex numbers of at most 8 digits "
                "separated by '/', as in 16/B374D848"
            )
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    def __str__(self) -> str:
        return f"{int(self) >> 32:X}/{int(self) & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)

    def __add__(self, other: int) -> Lsn:
        return Lsn(int(self) + int(other))

    def __radd__(self, other: int) -> Lsn:
        return Lsn(int(other) + int(self))

    def __sub__(self, other: int) -> int:
        """Distance between two LSNs (an int), or an LSN moved back by an int."""
        result = int(self) - int(other)
        if isinstance(other, Lsn):
            return result
        return Lsn(result)

    @property
    def segment_offset(self) -> int:
        """Offset within a 16 MiB WAL segment (PostgreSQL's default segment size)."""
        return int(self) % (16 * 1024 * 1024)


INVALID_LSN: Final = Lsn(0)
