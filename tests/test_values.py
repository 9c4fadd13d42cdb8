"""Lsn and TimelineId: PostgreSQL's text forms, ordering, arithmetic and bad input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zenith.ids import TimelineId
from zenith.lsn import Lsn


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
        ("0/16b3748", 0x16B3748),
        ("00000000/00000001", 1),
    ],
)
def test_lsn_parse(text: str, value: int) -> None:
    assert Lsn.parse(text) == value


def test_lsn_format_matches_postgresql() -> None:
    # pg_lsn output: upper-case hex, no leading zeros, both halves.
    assert str(Lsn((0x16 << 32) | 0xB374D848)) == "16/B374D848"
    assert str(Lsn(0x16B3748)) == "0/16B3748"
    assert str(Lsn(0)) == "0/0"
    assert f"{Lsn(0x10)}" == "0/10"
    assert repr(Lsn(1)) == "Lsn('0/1')"


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_lsn_round_trip(value: int) -> None:
    assert Lsn.parse(str(Lsn(value))) == value


@pytest.mark.parametrize(
    "text",
    ["", "0", "/", "0/", "/0", "1/2/3", "G/0", "123456789/0", "0/123456789", "-1/0", "0x1/0"],
)
def test_lsn_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        Lsn.parse(text)


def test_lsn_range_and_arithmetic() -> None:
    with pytest.raises(ValueError):
        Lsn(-1)
    with pytest.raises(ValueError):
        Lsn(1 << 64)
    with pytest.raises(TypeError):
        Lsn("0/1")  # type: ignore[arg-type]
    a, b = Lsn.parse("0/100"), Lsn.parse("0/180")
    assert a < b and b - a == 0x80
    assert isinstance(a + 8, Lsn) and a + 8 == 0x108
    assert isinstance(b - 8, Lsn) and not isinstance(b - a, Lsn)
    assert sorted([b, a]) == [a, b]


def test_timeline_id() -> None:
    tid = TimelineId.generate()
    text = str(tid)
    assert len(text) == 32 and text == text.lower()
    assert TimelineId.parse(text) == tid
    assert TimelineId.parse(text.upper()) == tid
    assert TimelineId.generate() != tid
    for bad in ["", "abc", "g" * 32, "0" * 31, "0" * 33]:
        with pytest.raises(ValueError, match="invalid timeline id"):
            TimelineId.parse(bad)
    with pytest.raises(ValueError):
        TimelineId(b"short")
