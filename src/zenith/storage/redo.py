"""The redo registry: how a delta record is applied on top of the value before it.

A delta's payload starts with one byte naming its redo type; the rest is that type's body.
Layers above storage register their own types (the PostgreSQL layer registers one that
clears visibility-map bits); storage ships the generic byte-range patch.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

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


#: A whole new value of the same length as the one before, stored as the zstd-compressed
#: XOR of the two: a page image that changed in a few places costs tens of bytes instead
#: of 8 KiB (docs/storage.md, "Compact page versions").
XOR_ZSTD: Final = 128  # storage's own types besides PATCH: 128..255
_zstd_local = threading.local()


def _zstd() -> tuple[Any, Any]:
    """This thread's zstd compressor and decompressor (neither is thread-safe)."""
    pair = getattr(_zstd_local, "pair", None)
    if pair is None:
        import zstandard

        pair = _zstd_local.pair = (
            zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False),
            zstandard.ZstdDecompressor())
    return pair  # type: ignore[no-any-return,unused-ignore]


def pack_image(value: bytes) -> bytes | None:
    """A compressed image (``RecordKind.ZIMAGE``) of ``value``, or None when it would not
    save at least a quarter (store the image as it is then)."""
    body: bytes = _zstd()[0].compress(value)
    return body if len(body) <= len(value) * 3 // 4 else None


def _declared_size(payload: bytes, what: str) -> int:
    """The content size a zstd frame declares. zstd allocates what a frame declares
    whatever ``max_output_size`` says, so every bound is checked on this first; a frame
    without one (or not a frame) is refused."""
    try:
        import zstandard

        size = int(zstandard.frame_content_size(payload))
    except Exception as exc:  # zstd.ZstdError: not a zstd frame
        raise InvalidArgument(f"corrupt {what}: {exc}") from None
    if size < 0:
        raise InvalidArgument(f"corrupt {what}: its frame declares no size")
    return size


def check_image(payload: bytes) -> None:
    """Refuse a ``ZIMAGE`` payload that is no zstd frame or declares more than 64 MiB
    (checked when stored, so a peer cannot leave a bomb for later readers)."""
    if _declared_size(payload, "compressed image") > MAX_VALUE:
        raise InvalidArgument("a compressed image declares more than 64 MiB")


def unpack_image(payload: bytes) -> bytes:
    """The value a ``ZIMAGE`` record holds (at most 64 MiB)."""
    check_image(payload)
    try:
        value: bytes = _zstd()[1].decompress(payload, max_output_size=MAX_VALUE)
    except Exception as exc:  # zstd.ZstdError: corrupt
        raise InvalidArgument(f"corrupt compressed image: {exc}") from None
    return value


def make_xor_delta(base: bytes, new: bytes) -> bytes | None:
    """A delta that turns ``base`` into ``new`` (same length), or None when it would not
    be at most half the size of ``new`` (store the image then)."""
    if len(base) != len(new) or not new:
        return None
    diff = (int.from_bytes(base, "little") ^ int.from_bytes(new, "little")).to_bytes(
        len(new), "little")
    body: bytes = _zstd()[0].compress(diff)
    if 1 + len(body) > len(new) // 2:
        return None
    return bytes([XOR_ZSTD]) + body


def _apply_xor(base: bytes | None, body: bytes) -> bytes:
    if base is None:
        raise InvalidArgument("an XOR delta needs the value before it")
    if _declared_size(body, "XOR delta") != len(base):
        raise InvalidArgument(f"XOR delta for a value of another size than {len(base)}")
    try:
        diff = _zstd()[1].decompress(body, max_output_size=len(base))
    except Exception as exc:  # zstd.ZstdError: a corrupt delta
        raise InvalidArgument(f"corrupt XOR delta: {exc}") from None
    if len(diff) != len(base):
        raise InvalidArgument(f"XOR delta of {len(diff)} bytes for a value of {len(base)}")
    return (int.from_bytes(base, "little") ^ int.from_bytes(diff, "little")).to_bytes(
        len(base), "little")


register(XOR_ZSTD, _apply_xor)
