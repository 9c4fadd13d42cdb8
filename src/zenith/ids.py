"""Identifiers: timeline ids (128-bit random, printed as 32 lowercase hex characters)."""

from __future__ import annotations

import os
import re
from typing import Final

_HEX32: Final = re.compile(r"[0-9a-fA-F]{32}")


class TimelineId(bytes):
    """A 16-byte timeline id. Equal ids on two pageservers mean the same history."""

    __slots__ = ()

    def __new__(cls, raw: bytes) -> TimelineId:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise TypeError(f"a timeline id is 16 bytes, not {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) != 16:
            raise ValueError(f"a timeline id is 16 bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    @classmethod
    def generate(cls) -> TimelineId:
        return cls(os.urandom(16))

    @classmethod
    def parse(cls, text: str) -> TimelineId:
        if not isinstance(text, str):
            raise TypeError(f"a timeline id is parsed from str, not {type(text).__name__}")
        if _HEX32.fullmatch(text.strip()) is None:
            raise ValueError(f"invalid timeline id {text!r}: expected 32 hex characters")
        return cls(bytes.fromhex(text.strip()))

    @staticmethod
    def looks_like(text: str) -> bool:
        """True when ``text`` has the shape of a timeline id (used to tell ids from names)."""
        return _HEX32.fullmatch(text) is not None

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"TimelineId('{self.hex()}')"
