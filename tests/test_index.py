"""vmafs.format.index, the pure codec of the trailing extent index and its footer."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmafs.errors import ChecksumError, FormatError
from vmafs.format import index, vma

UUID = bytes(range(16))

slot = st.tuples(st.integers(1, 254), st.integers(0, 2**32 - 1), st.integers(1, 0xFFFF),
                 st.integers(0, 2**32 - 1))
extents = st.lists(st.lists(slot, min_size=0, max_size=59), max_size=12)


def build(ext_slots: list[list[tuple[int, int, int, int]]]) -> tuple[index.IndexBuilder, list]:
    """Extents laid out like a writer would: each offset past the previous extent's data."""
    builder = index.IndexBuilder()
    pos = 12800
    expected = []  # (dev_id, cluster, mask, crc, data offset)
    for slots in ext_slots:
        builder.add_extent(pos, slots)
        data = pos + 512
        for dev_id, cluster, mask, crc in slots:
            expected.append((dev_id, cluster, mask, crc, data))
            data += 4096 * bin(mask).count("1")
        pos = data
    return builder, expected


@settings(max_examples=80, deadline=None)
@given(ext_slots=extents)
def test_index_round_trip(ext_slots: list[list[tuple[int, int, int, int]]]) -> None:
    builder, expected = build(ext_slots)
    blob = builder.encode()
    n_ext = sum(1 for s in ext_slots if s)
    assert len(blob) == 32 + 10 * n_ext + 11 * len(expected)  # ~11 bytes per stored cluster
    table = index.decode_index(blob)
    got = list(zip(table.dev_ids.tolist(), table.clusters.tolist(), table.masks.tolist(),
                   table.checksums.tolist() if table.checksums is not None else [],
                   table.offsets.tolist(), strict=True))
    assert got == expected


def test_empty_index() -> None:
    table = index.decode_index(index.IndexBuilder().encode())
    assert len(table.clusters) == 0 and len(table.offsets) == 0


def test_data_offsets_vs_naive() -> None:
    rng = random.Random(7)
    counts = [rng.randint(1, 59) for _ in range(50)]
    masks = np.array([rng.randint(1, 0xFFFF) for _ in range(sum(counts))], np.uint16)
    ext_offsets = np.array(sorted(rng.sample(range(0, 10**12, 4096), len(counts))), np.uint64)
    got = index.data_offsets(ext_offsets, np.array(counts, np.uint16), masks).tolist()
    naive = []
    i = 0
    for off, n in zip(ext_offsets.tolist(), counts, strict=True):
        pos = off + 512
        for _ in range(n):
            naive.append(pos)
            pos += 4096 * bin(int(masks[i])).count("1")
            i += 1
    assert got == naive


@settings(max_examples=50, deadline=None)
@given(offset=st.integers(0, 2**63), length=st.integers(0, index.MAX_INDEX_BYTES),
       crc=st.integers(0, 2**32 - 1))
def test_footer_round_trip(offset: int, length: int, crc: int) -> None:
    footer = index.Footer(offset, length, crc)
    raw = index.encode_footer(footer)
    assert len(raw) <= vma.NULL_PAYLOAD_SIZE
    # it travels in one null extent
    ext = vma.encode_null_extents(UUID, raw)
    assert len(ext) == 512
    assert index.decode_footer(vma.null_extent_payload(ext)) == footer


def test_footer_rejections() -> None:
    assert index.decode_footer(bytes(413)) is None  # some other null extent
    raw = bytearray(index.encode_footer(index.Footer(1, 2, 3)))
    struct.pack_into("<I", raw, 8, 9)
    with pytest.raises(FormatError, match="unsupported index version 9"):
        index.decode_footer(bytes(raw))
    with pytest.raises(FormatError, match="impossible"):
        index.decode_footer(index.encode_footer(index.Footer(1, index.MAX_INDEX_BYTES + 1, 3)))


def test_index_extent_span() -> None:
    footer = index.Footer(10000, 413 * 2 + 1, 0)  # 3 null extents
    assert index.index_extent_span(footer, 10000 + 3 * 512) == 1536
    with pytest.raises(FormatError, match="does not match"):
        index.index_extent_span(footer, 10000 + 2 * 512)
    assert index.index_extent_span(index.Footer(0, 0, 0), 512) == 512  # empty index: 1 extent


def test_check_index_blob() -> None:
    builder, _ = build([[(1, 0, 0xFFFF, 5)]])
    blob = builder.encode()
    footer = index.Footer(0, len(blob), index.checksum(blob))
    padded = blob + bytes(413 - len(blob))
    assert index.check_index_blob(padded, footer) == blob
    with pytest.raises(FormatError, match="truncated"):
        index.check_index_blob(blob[:-1], footer)
    bad = bytearray(blob)
    bad[-1] ^= 0x10
    with pytest.raises(ChecksumError, match="index checksum mismatch"):
        index.check_index_blob(bytes(bad), footer)


def test_decode_index_rejections() -> None:
    builder, _ = build([[(1, 0, 0xFFFF, 5), (2, 3, 1, 6)], [(1, 1, 3, 7)]])
    blob = builder.encode()
    with pytest.raises(FormatError, match="too short"):
        index.decode_index(blob[:10])
    with pytest.raises(FormatError, match="bad index magic"):
        index.decode_index(b"X" + blob[1:])
    with pytest.raises(FormatError, match="unsupported index version"):
        index.decode_index(blob[:8] + struct.pack("<I", 2) + blob[12:])
    with pytest.raises(FormatError, match="do not add up"):
        index.decode_index(blob[:-1])
    with pytest.raises(FormatError, match="do not add up"):
        index.decode_index(blob + b"\0")
    # extent counts that disagree with the slot count
    head = struct.Struct("<8sIIQQ")
    ext_counts_at = head.size + 8 * 2
    bad = bytearray(blob)
    struct.pack_into("<H", bad, ext_counts_at, 1)
    with pytest.raises(FormatError, match="extent counts"):
        index.decode_index(bytes(bad))
    # a mask of 0 (zero clusters are never listed) or a dev_id of 0 is impossible
    masks_at = head.size + 10 * 2 + 4 * 3
    bad = bytearray(blob)
    struct.pack_into("<H", bad, masks_at, 0)
    with pytest.raises(FormatError, match="impossible"):
        index.decode_index(bytes(bad))
    dev_at = masks_at + 2 * 3
    bad = bytearray(blob)
    bad[dev_at] = 0
    with pytest.raises(FormatError, match="impossible"):
        index.decode_index(bytes(bad))


def test_builder_skips_extents_without_stored_clusters() -> None:
    builder = index.IndexBuilder()
    builder.add_extent(12800, [])
    builder.add_extent(13312, [(1, 0, 1, 0)])
    table = index.decode_index(builder.encode())
    assert table.offsets.tolist() == [13312 + 512]
