"""zstd frame structure (pure: bytes in, objects out), without decompressing anything.

The one place vmafs reads zstd framing (RFC 8878 §3.1): frame headers (Frame_Content_Size,
window, dictionary id, checksum flag), block headers and skippable frames.  The forward
decoder feeds it every input byte to know whether the input ended exactly at a frame
boundary (python-zstandard ends quietly inside a frame); the random-access reader walks one
seek-table entry with a few small reads (block payloads are skipped, never read) to prove
the entry holds exactly the one frame the table says, before decompressing any of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmafs.errors import ContainerError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK_SIZE_MAX = 128 << 10
"""Block_Maximum_Size's upper bound: no block holds or regenerates more."""
SKIPPABLE_HEADER_SIZE = 8

_MAGIC, _SKIP_SIZE, _FHD, _FH_REST, _BLOCK = range(5)
_FCS_BYTES = (0, 2, 4, 8)
_DICT_BYTES = (0, 1, 2, 4)


def is_skippable_magic(head: bytes | bytearray | memoryview) -> bool:
    """Skippable frames start with any of 0x184D2A50..0x184D2A5F (little-endian)."""
    return len(head) >= 4 and head[0] & 0xF0 == 0x50 and bytes(head[1:4]) == b"\x2a\x4d\x18"


def window_size(descriptor: int) -> int:
    """Window_Size from a Window_Descriptor byte (RFC 8878 §3.1.1.1.2)."""
    log = 10 + (descriptor >> 3)
    base = 1 << log
    return base + (base >> 3) * (descriptor & 7)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A zstd frame header (magic included)."""

    size: int
    content_size: int | None
    window_size: int
    dict_id: int
    checksum: bool


def frame_header_size(fhd: int, at: int = 0) -> int:
    """Bytes of the whole header (magic included) from its Frame_Header_Descriptor byte."""
    if fhd & 0x08:
        raise ContainerError(f"zstd stream: reserved bit set in frame header at offset {at}")
    single_segment = fhd & 0x20
    fcs_bytes = _FCS_BYTES[fhd >> 6] or (1 if single_segment else 0)
    return 5 + (0 if single_segment else 1) + _DICT_BYTES[fhd & 3] + fcs_bytes


def decode_frame_header(hdr: bytes | bytearray | memoryview, at: int = 0) -> FrameHeader:
    """Parse a whole frame header (``frame_header_size`` bytes from the magic on)."""
    fhd = hdr[4]
    size = frame_header_size(fhd, at)
    if len(hdr) < size:
        raise ValueError(f"frame header needs {size} bytes, got {len(hdr)}")
    pos = 5
    window = 0
    if not fhd & 0x20:
        window = window_size(hdr[5])
        pos = 6
    n = _DICT_BYTES[fhd & 3]
    dict_id = int.from_bytes(hdr[pos : pos + n], "little")
    pos += n
    content_size: int | None = None
    if pos < size:
        content_size = int.from_bytes(hdr[pos:size], "little")
        if size - pos == 2:
            content_size += 256
    if fhd & 0x20:
        window = content_size or 0
    return FrameHeader(size, content_size, window, dict_id, bool(fhd & 0x04))


def decode_block_header(hdr: bytes | bytearray | memoryview, at: int = 0) -> tuple[bool, int, int]:
    """``(last, type, Block_Size)`` of a 3-byte block header; types 0 raw, 1 RLE, 2 compressed."""
    value = hdr[0] | hdr[1] << 8 | hdr[2] << 16
    kind, size = (value >> 1) & 3, value >> 3
    if kind == 3:
        raise ContainerError(f"zstd stream: reserved block type at offset {at}")
    if size > BLOCK_SIZE_MAX:
        raise ContainerError(f"zstd stream: block of {size} bytes at offset {at}")
    return bool(value & 1), kind, size


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """One complete frame as its headers describe it."""

    start: int
    """Offset of its magic number in the input."""
    size: int
    """Compressed bytes: header, blocks and checksum (payload and header for skippable)."""
    skippable: bool
    content_size: int | None = None
    """Frame_Content_Size, or None when the header does not give it (and for skippable)."""
    window_size: int = 0
    """Bytes of history a decoder must keep (the content size for single-segment frames)."""
    dict_id: int = 0
    checksum: bool = False
    blocks: int = 0
    min_output: int = 0
    """Bytes the raw and RLE blocks regenerate (exact); compressed blocks add 0 to 128 KiB each."""
    max_output: int = 0
    """Upper bound of what the frame can regenerate."""

    @property
    def end(self) -> int:
        return self.start + self.size


class ZstdFrameParser:
    """Incremental zstd frame walker for a stream: feed it the input in pieces of any size.

    Each completed frame is passed to ``on_frame`` (skippable frames included).  Costs
    one small header parse per block; block payloads are only counted.
    """

    def __init__(self, on_frame: Callable[[FrameInfo], None] | None = None) -> None:
        self._on_frame = on_frame
        self._state = _MAGIC
        self._need = 4
        self._hdr = bytearray()
        self._skip = 0
        self.offset = 0
        """Bytes consumed so far."""
        self.frames = 0
        """Complete frames (skippable ones included) seen so far."""
        self._frame = _FrameTally(0)

    @property
    def at_boundary(self) -> bool:
        """True when the input so far ends exactly after a complete frame (or is empty)."""
        return self._state == _MAGIC and not self._hdr and not self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        end = len(view)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                pos += n
                self._skip -= n
                self.offset += n
                if not self._skip and self._state == _MAGIC:
                    self._complete()
                continue
            need = self._need - len(self._hdr)
            take = min(need, end - pos)
            self._hdr += view[pos : pos + take]
            pos += take
            self.offset += take
            if take == need:
                hdr = bytes(self._hdr)
                self._hdr.clear()
                self._header(hdr, self.offset - len(hdr))

    def _complete(self) -> None:
        info = self._frame.info(self.offset)
        self.frames += 1
        self._frame = _FrameTally(self.offset)
        if self._on_frame is not None:
            self._on_frame(info)

    def _header(self, hdr: bytes, at: int) -> None:
        state = self._state
        if state == _MAGIC:
            if hdr == ZSTD_MAGIC:
                self._state, self._need = _FHD, 1
            elif is_skippable_magic(hdr):
                self._frame.skippable = True
                self._state, self._need = _SKIP_SIZE, 4
            else:
                raise ContainerError(f"zstd stream: unknown frame magic {hdr.hex()} at offset {at}")
        elif state == _SKIP_SIZE:
            self._skip = int.from_bytes(hdr, "little")
            self._state, self._need = _MAGIC, 4
            if not self._skip:
                self._complete()
        elif state == _FHD:
            self._fhd = hdr[0]
            self._state, self._need = _FH_REST, frame_header_size(hdr[0], at - 4) - 5
        elif state == _FH_REST:
            self._frame.header = decode_frame_header(ZSTD_MAGIC + bytes([self._fhd]) + hdr)
            self._state, self._need = _BLOCK, 3
        else:
            last, kind, size = decode_block_header(hdr, at)
            self._skip = self._frame.block(last, kind, size)
            if last:
                self._state, self._need = _MAGIC, 4
                if not self._skip:
                    self._complete()

    def finish(self) -> None:
        """Raise ContainerError unless the input ended right after a complete frame."""
        if not self.at_boundary:
            raise ContainerError(
                f"zstd stream truncated: input ends inside a frame at {self.offset}")
        if not self.frames:
            raise ContainerError("zstd stream holds no frame")


class _FrameTally:
    """What the walkers learn about the frame they are in."""

    __slots__ = ("start", "skippable", "header", "blocks", "min_out", "max_out")

    def __init__(self, start: int) -> None:
        self.start = start
        self.skippable = False
        self.header: FrameHeader | None = None
        self.blocks = 0
        self.min_out = 0
        self.max_out = 0

    def block(self, last: bool, kind: int, size: int) -> int:
        """Count a block; returns the bytes that follow its header (its checksum if last)."""
        self.blocks += 1
        if kind == 2:
            self.max_out += BLOCK_SIZE_MAX
        else:
            self.min_out += size
            self.max_out += size
        after = 1 if kind == 1 else size
        if last and self.header is not None and self.header.checksum:
            after += 4
        return after

    def info(self, end: int) -> FrameInfo:
        h = self.header
        return FrameInfo(
            start=self.start,
            size=end - self.start,
            skippable=self.skippable,
            content_size=h.content_size if h is not None else None,
            window_size=h.window_size if h is not None else 0,
            dict_id=h.dict_id if h is not None else 0,
            checksum=h.checksum if h is not None else False,
            blocks=self.blocks,
            min_output=self.min_out,
            max_output=self.max_out,
        )


def walk_frame(
    read: Callable[[int, int], bytes | bytearray | memoryview],
    start: int,
    end: int,
    *,
    max_blocks: int,
) -> tuple[FrameInfo | None, int]:
    """Walk the one frame at ``start`` through ``read(offset, length)``, reading only its
    headers (payloads are skipped, never read): a few small reads, one per block.

    Returns the frame and its end, or ``(None, offset reached)`` if it does not end by ``end``
    (or ``read`` returns short).  A frame with more than ``max_blocks`` blocks raises
    FormatError: each costs a read.
    """
    head = read(start, min(18, end - start))  # the longest frame header
    if len(head) < 8:
        return None, start + len(head)
    tally = _FrameTally(start)
    if is_skippable_magic(head):
        tally.skippable = True
        pos = start + 8 + int.from_bytes(head[4:8], "little")
        return (tally.info(pos), pos) if pos <= end else (None, end)
    if bytes(head[:4]) != ZSTD_MAGIC:
        raise ContainerError(f"zstd stream: unknown frame magic {bytes(head[:4]).hex()} at {start}")
    size = frame_header_size(head[4], start)
    if len(head) < size:
        return None, start + len(head)
    tally.header = decode_frame_header(head, start)
    pos = start + size
    block = tally.block
    while pos + 3 <= end:  # the hot loop of a first read of a frame: ~1 us a block
        hdr = read(pos, 3)
        if len(hdr) < 3:
            break
        last, kind, bsize = decode_block_header(hdr, pos)
        pos += 3 + block(last, kind, bsize)
        if last:
            return (tally.info(pos), pos) if pos <= end else (None, end)
        if tally.blocks >= max_blocks:
            raise ContainerError(f"zstd frame at {start} has more than {max_blocks} blocks")
    return None, min(pos, end)


def entry_mismatch(info: FrameInfo, c_size: int, d_size: int) -> str | None:
    """Why a frame does not match a seek-table entry of ``(c_size, d_size)``, or None.

    A skippable frame matches an entry of 0 decompressed bytes; a frame without a content
    size matches on its compressed size alone (its output is checked when decompressed).
    """
    if info.size != c_size:
        return f"the frame at {info.start} takes {info.size} bytes, the entry {c_size}"
    if info.skippable:
        if d_size:
            return f"the frame at {info.start} is skippable, the entry lists {d_size} bytes"
        return None
    if info.content_size is not None and info.content_size != d_size:
        return (
            f"the frame at {info.start} holds {info.content_size} bytes, the entry {d_size}"
        )
    if info.min_output > d_size or info.max_output < d_size:
        return f"the blocks of the frame at {info.start} cannot hold the entry's {d_size} bytes"
    return None
