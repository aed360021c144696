"""Seek table codec: round trips, the real vector, and rejection of every damaged field."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmafs.errors import FormatError
from vmafs.format.seektable import (
    MAX_FRAME_DECOMPRESSED_SIZE,
    MAX_FRAMES,
    SEEKABLE_MAGIC,
    SKIPPABLE_MAGIC,
    SeekTableBuilder,
    check_seek_table_header,
    decode_entries,
    decode_seek_table,
    encode_seek_table,
    parse_seek_table_footer,
)

VECTORS = Path(__file__).resolve().parent / "vectors"
SEEKABLE = VECTORS / "spec" / "two-disks.seekable.vma.zst"

ENTRIES = [(100, 12800), (50, 0), (4000, 201216), (20, 512), (300, 8704)]


def _decode(entries: list[tuple[int, int]]) -> tuple[bytes, int]:
    table = encode_seek_table(entries)
    return table, sum(c for c, _ in entries) + len(table)


def test_layout_is_byte_exact() -> None:
    table = encode_seek_table([(10, 20), (30, 40)])
    assert table == (
        struct.pack("<II", SKIPPABLE_MAGIC, 2 * 8 + 9)
        + struct.pack("<IIII", 10, 20, 30, 40)
        + struct.pack("<IBI", 2, 0, SEEKABLE_MAGIC)
    )


def test_round_trip_and_lookup() -> None:
    table, size = _decode(ENTRIES)
    st_ = decode_seek_table(table, size)
    assert st_.num_frames == 5
    assert st_.entries() == ENTRIES
    assert st_.decompressed_size == 12800 + 201216 + 512 + 8704
    assert st_.compressed_size == 4470
    assert st_.file_size == size
    assert st_.table_size == len(table)
    assert st_.frame_for(0) == 0
    assert st_.frame_for(12799) == 0
    assert st_.frame_for(12800) == 2  # the empty frame 1 is never returned
    assert st_.frame_for(214015) == 2
    assert st_.frame_for(214016) == 3
    assert st_.frame_for(st_.decompressed_size - 1) == 4
    assert st_.compressed_range(2) == (150, 4150)
    assert st_.decompressed_range(3) == (214016, 214528)
    with pytest.raises(IndexError):
        st_.frame_for(st_.decompressed_size)
    with pytest.raises(IndexError):
        st_.frame_for(-1)


def test_builder_matches_encoder() -> None:
    builder = SeekTableBuilder()
    for c, d in ENTRIES:
        builder.add(c, d)
    assert len(builder) == len(ENTRIES)
    assert builder.to_bytes() == encode_seek_table(ENTRIES)


def test_empty_table() -> None:
    table, size = _decode([])
    st_ = decode_seek_table(table, size)
    assert st_.num_frames == 0 and st_.decompressed_size == 0
    with pytest.raises(IndexError):
        st_.frame_for(0)


def test_reads_table_written_by_another_tool() -> None:
    data = SEEKABLE.read_bytes()
    footer = parse_seek_table_footer(data[-9:])
    st_ = decode_seek_table(data[-footer.table_size :], len(data))
    assert st_.decompressed_size == (VECTORS / "spec" / "two-disks.vma").stat().st_size
    assert st_.file_size == len(data)
    assert encode_seek_table(st_.entries()) == data[-footer.table_size :]


def test_checksum_flag_entries() -> None:
    entries = [(10, 20, 0xDEADBEEF), (30, 40, 7)]
    body = b"".join(struct.pack("<III", *e) for e in entries)
    table = (
        struct.pack("<II", SKIPPABLE_MAGIC, len(body) + 9)
        + body
        + struct.pack("<IBI", 2, 0x80, SEEKABLE_MAGIC)
    )
    footer = parse_seek_table_footer(table)
    assert footer.checksums and footer.table_size == len(table)
    st_ = decode_seek_table(table, 40 + len(table))
    assert st_.entries() == [(10, 20), (30, 40)]
    assert st_.checksums is not None and st_.checksums.tolist() == [0xDEADBEEF, 7]


@pytest.mark.parametrize(
    "entry", [(0, 1), (-1, 1), (1 << 32, 1), (1, -1), (1, MAX_FRAME_DECOMPRESSED_SIZE + 1)]
)
def test_encoder_rejects_bad_entries(entry: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        encode_seek_table([entry])
    with pytest.raises(ValueError):
        SeekTableBuilder().add(*entry)


# -- corruption of each field ----------------------------------------------------------


def _corrupt(offset: int, value: bytes) -> tuple[bytes, int]:
    table, size = _decode(ENTRIES)
    table = table[:offset] + value + table[offset + len(value) :]
    return table, size


N = len(ENTRIES)
FOOTER_AT = 8 + 8 * N


@pytest.mark.parametrize(
    ("what", "offset", "value", "message"),
    [
        ("skippable magic 0x184D2A50", 0, struct.pack("<I", 0x184D2A50), "frame magic"),
        ("skippable magic garbage", 0, b"\0\0\0\0", "frame magic"),
        ("Frame_Size + 1", 4, struct.pack("<I", 8 * N + 10), "Frame_Size"),
        ("Frame_Size - 1", 4, struct.pack("<I", 8 * N + 8), "Frame_Size"),
        ("compressed size + 1", 8, struct.pack("<I", 101), "add up to"),
        ("compressed size 0", 8, struct.pack("<I", 0), "compressed size 0"),
        ("last compressed size - 1", 8 + 8 * (N - 1), struct.pack("<I", 299), "add up to"),
        ("decompressed size too big", 12, struct.pack("<I", 0x80000001), "exceeds"),
        ("Number_Of_Frames + 1", FOOTER_AT, struct.pack("<I", N + 1), "needs"),
        ("Number_Of_Frames - 1", FOOTER_AT, struct.pack("<I", N - 1), "frame magic"),
        ("Number_Of_Frames huge", FOOTER_AT, struct.pack("<I", MAX_FRAMES + 1), "limit"),
        ("seekable magic", FOOTER_AT + 5, struct.pack("<I", SEEKABLE_MAGIC ^ 1), "last 4 bytes"),
    ]
    + [
        (f"descriptor reserved bit {bit}", FOOTER_AT + 4, bytes([1 << bit]), "reserved")
        for bit in range(2, 7)
    ],
)
def test_corrupted_field_is_rejected(what: str, offset: int, value: bytes, message: str) -> None:
    table, size = _corrupt(offset, value)
    with pytest.raises(FormatError, match=message):
        decode_seek_table(table, size)


def test_descriptor_unused_bits_are_ignored() -> None:
    table, size = _corrupt(FOOTER_AT + 4, b"\x03")
    assert decode_seek_table(table, size).entries() == ENTRIES


def test_wrong_file_size_is_rejected() -> None:
    table, size = _decode(ENTRIES)
    for wrong in (size - 1, size + 1, len(table) - 1):
        with pytest.raises(FormatError):
            decode_seek_table(table, wrong)


def test_short_inputs_are_rejected() -> None:
    table, size = _decode(ENTRIES)
    with pytest.raises(FormatError):
        parse_seek_table_footer(table[-8:])
    with pytest.raises(FormatError):
        decode_seek_table(table[-20:], size)


# -- property ----------------------------------------------------------------------------

entry_st = st.tuples(st.integers(1, 0xFFFFFFFF), st.integers(0, MAX_FRAME_DECOMPRESSED_SIZE))


@settings(max_examples=200, deadline=None)
@given(st.lists(entry_st, max_size=40), st.data())
def test_codec_round_trip_property(entries: list[tuple[int, int]], data: st.DataObject) -> None:
    table = encode_seek_table(entries)
    file_size = sum(c for c, _ in entries) + len(table)
    footer = parse_seek_table_footer(table[-9:])
    assert footer.num_frames == len(entries) and footer.table_size == len(table)
    st_ = decode_seek_table(b"prefix" + table, file_size)
    assert st_.entries() == entries
    total = sum(d for _, d in entries)
    assert st_.decompressed_size == total
    if total:
        offset = data.draw(st.integers(0, total - 1))
        index = st_.frame_for(offset)
        start, end = st_.decompressed_range(index)
        assert start <= offset < end
        # The first frame, in order, that holds the offset: every earlier frame ends before it.
        assert all(s_ <= offset for s_ in st_.d_offsets[: index + 1].tolist())


@settings(max_examples=200, deadline=None)
@given(st.lists(entry_st, min_size=1, max_size=10), st.data())
def test_any_single_byte_change_is_rejected_or_harmless(
    entries: list[tuple[int, int]], data: st.DataObject
) -> None:
    table = encode_seek_table(entries)
    file_size = sum(c for c, _ in entries) + len(table)
    pos = data.draw(st.integers(0, len(table) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(table)
    bad[pos] ^= flip
    try:
        st_ = decode_seek_table(bytes(bad), file_size)
    except FormatError:
        return
    # Accepted: then the change was in a decompressed size or in the unused descriptor bits.
    descriptor_at = len(table) - 5
    if pos == descriptor_at:
        assert flip & ~3 == 0
    else:
        assert 8 <= pos < descriptor_at - 4 and (pos - 8) % 8 >= 4
    assert st_.compressed_size == file_size - len(table)


def test_entries_piece_by_piece() -> None:
    """What a reader going through the table in pieces gets is what the whole decoder gets."""
    table, size = _decode(ENTRIES)
    footer = parse_seek_table_footer(table)
    check_seek_table_header(table[:8], footer)
    area = table[8:-9]
    assert decode_entries(area, False) == ENTRIES
    assert decode_entries(area[:20], False) == ENTRIES[:2]  # a partial entry is left out
    with_sums = b"".join(struct.pack("<III", c, d, 7) for c, d in ENTRIES)
    assert decode_entries(with_sums, True) == ENTRIES
    bad = bytearray(table)
    bad[4] ^= 1
    with pytest.raises(FormatError, match="Frame_Size"):
        check_seek_table_header(bytes(bad[:8]), footer)
    bad = bytearray(table)
    bad[0] ^= 1
    with pytest.raises(FormatError, match="magic"):
        check_seek_table_header(bytes(bad[:8]), footer)
    assert decode_seek_table(table, size).entries() == ENTRIES
