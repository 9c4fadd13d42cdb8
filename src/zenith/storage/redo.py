"""The redo registry: how a delta record is applied on top of the value before it.

A delta's payload starts with one byte naming its redo type; the rest is that type's body.
Layers above storage register their own types (the PostgreSQL layer registers one that
clears visibility-map bits); storage ships the generic byte-range patch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Final

from zenith.errors import InvalidArgument

RedoFn = Callable[[bytes | None, bytes], bytes | None]
"""``fn(previous value or None, delta body) -> new value (None: the key has no value)``."""

PATCH: Final = 1  # generic byte-range patch
MAX_VALUE: Final = 64 * 1024 * 1024

_REGISTRY: dict[int, RedoFn] = {}
_PATCH_HEADER: Final = struct.Struct(">II")


def register(delta_type: int, fn: RedoFn) -> None:
    """Register the redo function for ``delta_type`` (1..255). Re-registering is refused."""
    if not 0 < delta_type < 256:
        raise InvalidArgument(f"delta type {delta_type} is not in 1..255")
    existing = _REGISTRY.get(delta_type)
    if existing is not None and existing is not fn:
        raise InvalidArgument(f"delta type {delta_type} is already registered")
    _REGISTRY[delta_type] = fn


def is_known(payload: bytes) -> bool:
    return bool(payload) and payload[0] in _REGISTRY


def apply_delta(base: bytes | None, payload: bytes) -> bytes | None:
    """Apply one delta record's payload to ``base``."""
    if not payload:
        raise InvalidArgument("empty delta payload")
    fn = _REGISTRY.get(payload[0])
    if fn is None:
        raise InvalidArgument(f"no redo function registered for delta type {payload[0]}")
    return fn(base, payload[1:])


def make_patch(changes: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode a byte-range patch delta: each ``(offset, data)`` overwrites bytes at offset."""
    parts = [bytes([PATCH])]
    for offset, data in changes:
        if offset < 0 or offset + len(data) > MAX_VALUE:
            raise InvalidArgument(f"patch range at {offset} is out of bounds")
        parts.append(_PATCH_HEADER.pack(offset, len(data)))
        parts.append(data)
    return b"".join(parts)


def _apply_patch(base: bytes | None, body: bytes) -> bytes:
    value = bytearray(base or b"")
    pos = 0
    while pos < len(body):
        if pos + _PATCH_HEADER.size > len(body):
            raise InvalidArgument("truncated patch delta")
        offset, length = _PATCH_HEADER.unpack_from(body, pos)
        pos += _PATCH_HEADER.size
        if pos + length > len(body):
            raise InvalidArgument("truncated patch delta")
        end = offset + length
        if end > MAX_VALUE:
            raise InvalidArgument(f"patch range ends at {end}, beyond {MAX_VALUE}")
        if end > len(value):
            value.extend(bytes(end - len(value)))
        value[offset:end] = body[pos : pos + length]
        pos += length
    return bytes(value)


register(PATCH, _apply_patch)
