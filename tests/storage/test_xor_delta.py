"""The XOR delta (redo type XOR_ZSTD): a page version stored as the compressed XOR with
the version before it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith.errors import InvalidArgument
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, open_repository
from zenith.storage.redo import XOR_ZSTD, apply_delta, make_xor_delta


@settings(max_examples=200, deadline=None)
@given(base=st.binary(min_size=1, max_size=9000), edits=st.lists(
    st.tuples(st.integers(0, 8999), st.binary(min_size=1, max_size=64)), max_size=8))
def test_round_trip(base: bytes, edits: list[tuple[int, bytes]]) -> None:
    new = bytearray(base)
    for at, data in edits:
        at %= len(base)
        new[at:at + len(data)] = data[: len(base) - at]
    new_bytes = bytes(new)
    delta = make_xor_delta(base, new_bytes)
    if delta is None:  # not worth it: at most half the size, or lengths differ
        return
    assert delta[0] == XOR_ZSTD and len(delta) <= len(new_bytes) // 2
    assert apply_delta(base, delta) == new_bytes


def test_small_for_a_page_changed_in_places_and_refused_otherwise() -> None:
    page = os.urandom(3000) + bytes(5192)
    changed = bytearray(page)
    changed[100:140] = os.urandom(40)
    delta = make_xor_delta(page, bytes(changed))
    assert delta is not None and len(delta) < 200
    assert make_xor_delta(page, os.urandom(8192)) is None  # nothing in common
    assert make_xor_delta(page, page[:-1]) is None  # another length
    with pytest.raises(InvalidArgument):
        apply_delta(None, delta)
    with pytest.raises(InvalidArgument):
        apply_delta(page, bytes([XOR_ZSTD]) + b"not zstd")
    with pytest.raises(InvalidArgument):
        apply_delta(page[:4096], delta)


def test_stored_and_read_and_collected(tmp_path: Path) -> None:
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        key = bytes(18)
        versions = [os.urandom(1000) + bytes(7192)]
        records = [Record(key, Lsn(0x100), RecordKind.IMAGE, versions[0])]
        for i in range(1, 10):
            page = bytearray(versions[-1])
            page[i * 50:i * 50 + 8] = os.urandom(8)
            delta = make_xor_delta(versions[-1], bytes(page))
            assert delta is not None
            versions.append(bytes(page))
            records.append(Record(key, Lsn(0x100 + 8 * i), RecordKind.DELTA, delta))
        repo.put_records(tid, records)
        for i, v in enumerate(versions):
            assert repo.get_value(tid, key, Lsn(0x100 + 8 * i)) == v
        stored, _ = repo.space(tid)
        assert stored < 8192 + 9 * 200
        repo.gc(tid, Lsn(0x100 + 8 * 9))
        assert repo.get_value(tid, key, Lsn(0x100 + 8 * 9)) == versions[-1]
    finally:
        repo.close()


def test_encoder_against_the_plain_values(tmp_path: Path) -> None:
    """Random versions of a few keys through the encoder into a repository: every
    version reads back exactly; whole images at least every IMAGE_EVERY versions; a
    forgotten key (tombstone, an unknown delta) gets a whole image next."""
    import random

    from zenith.storage.encode import IMAGE_EVERY, VersionEncoder
    from zenith.storage.redo import make_patch

    rng = random.Random(7)
    enc = VersionEncoder(max_bytes=3 * 8192)  # remembers 3 pages: LRU evictions happen
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        keys = [bytes(17) + bytes([k]) for k in range(5)]
        truth: dict[tuple[bytes, int], bytes | None] = {}
        current: dict[bytes, bytes | None] = dict.fromkeys(keys)
        lsn = 0x100
        stored_kinds: dict[bytes, list[RecordKind]] = {k: [] for k in keys}
        for _batch in range(40):
            batch = []
            for _ in range(10):
                lsn += 8
                key = rng.choice(keys)
                roll = rng.random()
                if roll < 0.75 or current[key] is None:
                    page = bytearray(current[key] or os.urandom(8192))
                    at = rng.randrange(8000)
                    page[at:at + 16] = os.urandom(16)
                    rec = Record(key, Lsn(lsn), RecordKind.IMAGE, bytes(page))
                    current[key] = bytes(page)
                elif roll < 0.9:
                    patch = make_patch([(rng.randrange(8000), b"pp")])
                    rec = Record(key, Lsn(lsn), RecordKind.DELTA, patch)
                    current[key] = apply_delta(current[key], patch)
                else:
                    rec = Record(key, Lsn(lsn), RecordKind.TOMBSTONE)
                    current[key] = None
                batch.append(rec)
                truth[(key, lsn)] = current[key]
            encoded = enc.encode(batch)
            for rec in encoded:
                stored_kinds[rec.key].append(rec.kind)
            repo.put_records(tid, encoded)
        for (key, at), value in truth.items():
            assert repo.get_value(tid, key, Lsn(at)) == value, (key.hex(), hex(at))
        for kinds in stored_kinds.values():
            run = 0
            for kind in kinds:
                run = run + 1 if kind is RecordKind.DELTA else 0
                assert run < IMAGE_EVERY
        assert enc.encoded > 50 and enc.saved > 50 * 4096
    finally:
        repo.close()


def test_compressed_images_read_collect_and_travel_as_images(tmp_path: Path) -> None:
    """ZIMAGE: the encoder stores a compressible whole image compressed; every reader gets
    the value, GC treats it as an image (nothing before it is needed), a DATA frame and a
    shallow base carry it as stored; an incompressible image stays as it is."""
    from zenith.storage.encode import VersionEncoder
    from zenith.storage.redo import pack_image, unpack_image
    from zenith.transfer.frames import decode_records, encode_records

    page = os.urandom(1500) + bytes(6692)  # compresses to about a fifth
    noise = os.urandom(8192)
    assert pack_image(noise) is None
    with pytest.raises(InvalidArgument, match="corrupt compressed image"):
        unpack_image(b"not zstd")
    encoder = VersionEncoder()
    k1, k2 = bytes(17) + b"\x01", bytes(17) + b"\x02"
    first = encoder.encode([Record(k1, Lsn(0x100), RecordKind.IMAGE, page),
                            Record(k2, Lsn(0x100), RecordKind.IMAGE, noise)])
    assert [r.kind for r in first] == [RecordKind.ZIMAGE, RecordKind.IMAGE]
    assert len(first[0].payload) < len(page) // 4 and encoder.packed == 1
    changed = bytearray(page)
    changed[10:20] = os.urandom(10)
    second = encoder.encode([Record(k1, Lsn(0x200), RecordKind.IMAGE, bytes(changed))])
    assert second[0].kind is RecordKind.DELTA  # an XOR on the value, not on its packing
    assert decode_records(encode_records(first)) == first

    repo = open_repository(tmp_path / "r.db", durable=False)
    other = open_repository(tmp_path / "o.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        repo.put_records(tid, [Record(k1, Lsn(0x80), RecordKind.IMAGE, noise)])
        repo.put_records(tid, first)
        repo.put_records(tid, second)
        assert repo.get_value(tid, k1, Lsn(0x100)) == page
        assert repo.get_value(tid, k1, Lsn(0x200)) == bytes(changed)
        assert dict(repo.materialize(tid, Lsn(0x200))) == {k1: bytes(changed), k2: noise}
        # The compressed image at 0x100 is k1's base at the horizon: 0x80 goes.
        assert repo.gc(tid, Lsn(0x200)).records_removed == 1
        assert repo.get_value(tid, k1, Lsn(0x200)) == bytes(changed)
        base = list(repo.base_records(tid, Lsn(0x200)))
        assert [(r.key, r.kind) for r in base] == [
            (k1, RecordKind.ZIMAGE), (k1, RecordKind.DELTA), (k2, RecordKind.IMAGE)]
        copy = repo.get_timeline(tid).timeline_id
        other.create_shallow_timeline(copy, None, Lsn(0x200))
        other.put_base(copy, base)
        other.finish_base(copy, repo.history_hash(tid, Lsn(0x200)))
        assert other.digest(copy, Lsn(0x200)) == repo.digest(tid, Lsn(0x200))
    finally:
        repo.close()
        other.close()


def test_a_compressed_value_that_declares_too_much_is_refused_when_stored(
        tmp_path: Path) -> None:
    """zstd allocates what a frame declares, whatever bound the caller gives: a ZIMAGE or
    an XOR delta is checked on its declared size, and a bomb never gets stored."""
    import zstandard

    from zenith.storage.redo import MAX_VALUE, unpack_image

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(MAX_VALUE + 1))
    assert len(bomb) < 100_000
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8192))
    repo = open_repository(tmp_path / "r.db", durable=False)
    try:
        tid = repo.create_branch("main").timeline.timeline_id
        for payload, fragment in ((bomb, "more than 64 MiB"), (b"not zstd", "corrupt"),
                                  (sizeless, "declares no size")):
            with pytest.raises(InvalidArgument, match=fragment):
                repo.put_records(tid, [Record(bytes(18), Lsn(0x100), RecordKind.ZIMAGE,
                                              payload)])
            with pytest.raises(InvalidArgument, match=fragment):
                unpack_image(payload)
        assert repo.get_timeline(tid).last_record_lsn == Lsn(0)  # nothing stored
        page = bytes(8192)
        big = bytes([XOR_ZSTD]) + zstandard.ZstdCompressor().compress(bytes(2 * 8192))
        with pytest.raises(InvalidArgument, match="another size"):
            apply_delta(page, big)
    finally:
        repo.close()
