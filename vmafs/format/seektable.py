"""Codec for the seek table of the zstd seekable format (pure: bytes in, objects out).

The table is the last frame of a seekable ``.zst`` file: a skippable frame
``0x184D2A5E | Frame_Size | entries | footer`` whose 9-byte footer
``Number_Of_Frames u32 | Descriptor u8 | 0x8F92EAB1`` ends the file, so a reader
finds it from the tail.  Each entry gives one frame's compressed and decompressed
size (plus an optional XXH64-low-32 checksum, which we parse but never write).
See facebook/zstd ``contrib/seekable_format`` v0.1.0.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmafs.errors import ContainerError

if TYPE_CHECKING:  # annotations only: numpy.typing is ~0.5 ms of every reader's start
    import numpy.typing as npt

SKIPPABLE_MAGIC = 0x184D2A5E
"""The one skippable-frame magic the reference reader accepts for the seek table."""
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER_SIZE = 9
SKIPPABLE_HEADER_SIZE = 8
MAX_FRAMES = 0x8000000
"""ZSTD_SEEKABLE_MAXFRAMES."""
MAX_FRAME_DECOMPRESSED_SIZE = 0x80000000
"""ZSTD_SEEKABLE_MAX_FRAME_DECOMPRESSED_SIZE (zstd >= 1.5.x; older readers: 1 GiB)."""
U32_MAX = 0xFFFFFFFF
ENTRY_SIZE = 8
ENTRY_SIZE_CHECKSUMS = 12

_FOOTER = struct.Struct("<IBI")
_SKIP_HEADER = struct.Struct("<II")
_CHECKSUM_FLAG = 0x80
_RESERVED_BITS = 0x7C


def _table_frame_size(num_frames: int, checksums: bool) -> int:
    return (
        SKIPPABLE_HEADER_SIZE
        + num_frames * (ENTRY_SIZE_CHECKSUMS if checksums else ENTRY_SIZE)
        + FOOTER_SIZE
    )


def _check_entry(compressed: int, decompressed: int) -> None:
    if not 0 < compressed <= U32_MAX:
        raise ValueError(f"frame compressed size {compressed} out of range 1..{U32_MAX}")
    if not 0 <= decompressed <= MAX_FRAME_DECOMPRESSED_SIZE:
        raise ValueError(
            f"frame decompressed size {decompressed} out of range 0..{MAX_FRAME_DECOMPRESSED_SIZE}"
        )


def _pack_table(pairs: bytes, num_frames: int) -> bytes:
    """Wrap little-endian ``(compressed, decompressed)`` u32 pairs into the table frame."""
    if num_frames > MAX_FRAMES:
        raise ValueError(f"{num_frames} frames exceed the seekable format's {MAX_FRAMES}")
    size = _table_frame_size(num_frames, False)
    return b"".join(
        (
            _SKIP_HEADER.pack(SKIPPABLE_MAGIC, size - SKIPPABLE_HEADER_SIZE),
            pairs,
            _FOOTER.pack(num_frames, 0, SEEKABLE_MAGIC),
        )
    )


def encode_seek_table(entries: Sequence[tuple[int, int]]) -> bytes:
    """The whole seek-table frame for frames of ``(compressed, decompressed)`` sizes.

    Checksum flag 0: every data frame already carries zstd's own content checksum.
    """
    flat = array("I")
    for compressed, decompressed in entries:
        _check_entry(compressed, decompressed)
        flat.append(compressed)
        flat.append(decompressed)
    if sys.byteorder != "little":
        flat.byteswap()
    return _pack_table(flat.tobytes(), len(entries))


class SeekTableBuilder:
    """Collects frame sizes compactly (8 bytes per frame) while a file is written."""

    def __init__(self) -> None:
        self._flat = array("I")

    def add(self, compressed: int, decompressed: int) -> None:
        _check_entry(compressed, decompressed)
        if len(self._flat) // 2 >= MAX_FRAMES:
            raise ValueError(f"more than {MAX_FRAMES} frames")
        self._flat.append(compressed)
        self._flat.append(decompressed)

    def __len__(self) -> int:
        return len(self._flat) // 2

    def to_bytes(self) -> bytes:
        flat = self._flat
        if sys.byteorder != "little":
            flat = array("I", flat)
            flat.byteswap()
        return _pack_table(flat.tobytes(), len(self))


@dataclass(frozen=True)
class SeekTableFooter:
    """What the last 9 bytes say: how many frames, and so how many bytes the table takes."""

    num_frames: int
    checksums: bool

    @property
    def table_size(self) -> int:
        """Size of the whole seek-table skippable frame, header and footer included."""
        return _table_frame_size(self.num_frames, self.checksums)


def parse_seek_table_footer(tail: bytes) -> SeekTableFooter:
    """Parse the footer from (at least) the file's last 9 bytes."""
    if len(tail) < FOOTER_SIZE:
        raise ContainerError(f"seek table footer needs {FOOTER_SIZE} bytes, file has {len(tail)}")
    num_frames, descriptor, magic = _FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
    if magic != SEEKABLE_MAGIC:
        raise ContainerError(
            f"no zstd seek table: last 4 bytes are {magic:#010x}, not {SEEKABLE_MAGIC:#x}"
        )
    if descriptor & _RESERVED_BITS:
        raise ContainerError(f"seek table descriptor {descriptor:#04x} has reserved bits set")
    if num_frames > MAX_FRAMES:
        raise ContainerError(
            f"seek table lists {num_frames} frames, more than the limit {MAX_FRAMES}")
    return SeekTableFooter(num_frames, bool(descriptor & _CHECKSUM_FLAG))


@dataclass(frozen=True, eq=False)
class SeekTable:
    """Validated table with cumulative offsets (``num_frames + 1`` entries each, int64).

    Frame ``i`` occupies ``[c_offsets[i], c_offsets[i+1])`` of the file and
    ``[d_offsets[i], d_offsets[i+1])`` of the decompressed stream.
    """

    c_offsets: npt.NDArray[np.int64]
    d_offsets: npt.NDArray[np.int64]
    checksums: npt.NDArray[np.uint32] | None
    table_size: int

    @property
    def num_frames(self) -> int:
        return len(self.c_offsets) - 1

    @property
    def compressed_size(self) -> int:
        """Bytes of frames before the table."""
        return int(self.c_offsets[-1])

    @property
    def decompressed_size(self) -> int:
        return int(self.d_offsets[-1])

    @property
    def file_size(self) -> int:
        return self.compressed_size + self.table_size

    def frame_for(self, offset: int) -> int:
        """Index of the frame holding decompressed byte ``offset`` (never an empty frame)."""
        if not 0 <= offset < self.decompressed_size:
            raise IndexError(
                f"offset {offset} outside the stream of {self.decompressed_size} bytes"
            )
        return int(np.searchsorted(self.d_offsets, offset, side="right")) - 1

    def decompressed_range(self, index: int) -> tuple[int, int]:
        return int(self.d_offsets[index]), int(self.d_offsets[index + 1])

    def compressed_range(self, index: int) -> tuple[int, int]:
        return int(self.c_offsets[index]), int(self.c_offsets[index + 1])

    def entries(self) -> list[tuple[int, int]]:
        """``(compressed, decompressed)`` per frame, as given to :func:`encode_seek_table`."""
        return list(
            zip(np.diff(self.c_offsets).tolist(), np.diff(self.d_offsets).tolist(), strict=True)
        )


def check_seek_table_header(head: bytes, footer: SeekTableFooter) -> None:
    """Check the table frame's first 8 bytes (skippable magic, Frame_Size) against its footer."""
    magic, frame_size = _SKIP_HEADER.unpack_from(head, 0)
    if magic != SKIPPABLE_MAGIC:
        raise ContainerError(
            f"seek table frame magic is {magic:#010x}, expected {SKIPPABLE_MAGIC:#x}")
    if frame_size != footer.table_size - SKIPPABLE_HEADER_SIZE:
        raise ContainerError(
            f"seek table Frame_Size is {frame_size}, expected "
            f"{footer.table_size - SKIPPABLE_HEADER_SIZE} for {footer.num_frames} frames"
        )


def decode_entries(data: bytes, checksums: bool) -> list[tuple[int, int]]:
    """``(compressed, decompressed)`` of whole entries in a piece of the entries area.

    For readers that go through a table piece by piece instead of holding all of it.
    """
    width = ENTRY_SIZE_CHECKSUMS if checksums else ENTRY_SIZE
    fmt = struct.Struct("<III" if checksums else "<II")
    usable = len(data) - len(data) % width
    return [(e[0], e[1]) for e in fmt.iter_unpack(data[:usable])]


def decode_seek_table(table: bytes, file_size: int) -> SeekTable:
    """Validate the whole seek-table frame (the last ``footer.table_size`` bytes of the file).

    ``file_size`` is the size of the whole file: the listed frames must fill exactly
    everything before the table, as the reference reader and pyzstd require.
    """
    footer = parse_seek_table_footer(table)
    size = footer.table_size
    if file_size < size:
        raise ContainerError(
            f"seek table of {footer.num_frames} frames needs {size} bytes, file has {file_size}"
        )
    if len(table) < size:
        raise ContainerError(f"seek table needs {size} bytes, got {len(table)}")
    table = table[len(table) - size :]
    check_seek_table_header(table, footer)
    width = 3 if footer.checksums else 2
    fields = np.frombuffer(
        table, dtype="<u4", count=footer.num_frames * width, offset=SKIPPABLE_HEADER_SIZE
    ).reshape(footer.num_frames, width)
    compressed = fields[:, 0].astype(np.int64)
    decompressed = fields[:, 1].astype(np.int64)
    if footer.num_frames:
        if int(compressed.min()) == 0:
            bad = int(np.argmin(compressed))
            raise ContainerError(f"seek table entry {bad}: compressed size 0")
        if int(decompressed.max()) > MAX_FRAME_DECOMPRESSED_SIZE:
            bad = int(np.argmax(decompressed))
            raise ContainerError(
                f"seek table entry {bad}: decompressed size {int(decompressed[bad])} exceeds "
                f"{MAX_FRAME_DECOMPRESSED_SIZE}"
            )
    c_offsets = np.zeros(footer.num_frames + 1, dtype=np.int64)
    np.cumsum(compressed, out=c_offsets[1:])
    d_offsets = np.zeros(footer.num_frames + 1, dtype=np.int64)
    np.cumsum(decompressed, out=d_offsets[1:])
    if int(c_offsets[-1]) != file_size - size:
        raise ContainerError(
            f"seek table frames add up to {int(c_offsets[-1])} bytes, but {file_size - size} "
            "bytes precede the table"
        )
    checksums = fields[:, 2].astype(np.uint32) if footer.checksums else None
    return SeekTable(c_offsets, d_offsets, checksums, size)
