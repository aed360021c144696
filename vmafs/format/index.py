"""Pure codec of vmafs's trailing extent index and the footer that locates it.

Proxmox's reader accepts nothing after the last extent except more extents, so the index travels
in null extents (vma.encode_null_extents) at the end of the stream, and the very last extent is a
footer saying where the index starts. A reader finds everything from the last 512 bytes.

The index is columnar so it loads with a handful of numpy calls, whatever its size:
  header    magic "VMAFSIX1", version u32, flags u32, n_extents u64, n_slots u64
  extents   offset u64 [n_extents], stored slots u16 [n_extents]   (extents holding data, in order)
  slots     cluster u32, mask u16, dev_id u8, check u32 [n_slots]  (stored clusters, slot order)
Zero clusters are not listed. A slot's data offset follows from its extent's offset and the
popcounts of the masks before it; `checksum` covers the cluster's stored blocks. About 11 bytes
per stored cluster and 10 per data extent, all little-endian. The footer carries the index's
checksum. The checksum is XXH3-64's low 32 bits: fast enough (tens of GB/s) to check every read.

The footer (one null extent's 413 payload bytes, little-endian):
  magic "VMAFSFT1", version u32 (1), index offset u64, index length u64, index checksum u32,
  then typed fields: type u16, length u16, value, ... up to a type 0 (or the payload's end);
  every byte after them is zero. A reader skips a field type it does not know, unless the
  type has bit 15 set (critical: it must not read the archive without understanding it).
  Type 1, the header digest: SHA-256 of what the archive header says (vma.header_digest:
  uuid, ctime, every device's id, name and size, every config's name and data), so a header
  rewritten and resealed (its md5 is unkeyed) no longer matches its index. Old archives have
  no fields (zeros) and read as before; old readers read only the first 32 bytes.
  Type 0x8002 (critical, empty), block sums, and type 2 (empty), sums carried: see below.
  Other types 3..0x7fff and critical ones are free: a keyed MAC or signature over the index
  and this footer's fields (the header digest included, so the header and its chain record)
  is meant to be one of them.

Block sums (field 0x8002; every archive written since vmafs had it): every stored 4 KiB
block has a 32-bit sum, `checksum(block)`, and a cluster's index check is defined as
`checksum(its stored blocks' sums, LE u32, in stored order)` instead of checksum(data), in
every container, so an archive's content digest (format/chain.py) is the same plain or
compressed. Sums carried (field 2, with 0x8002; plain archives): right after each data
extent, that extent's sums (4 bytes a stored block, in stream order) travel in null extents,
ceil(4 * blocks / 413) of them, zero-padded, nothing else. So a small read finds them from
the index alone (the extent's end) and reads just its blocks plus its cluster's sums; a
whole-cluster read needs no sums (it hashes its blocks' sums from the data). A zstd archive
does not carry them (a read decompresses a whole frame anyway; `zstd -d` of it is a plain
archive without them, which reads whole clusters). An archive without 0x8002 reads as
before; an older vmafs refuses one with it (critical). Proxmox's reader skips the sums'
null extents as it skips the index's.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from vmafs.errors import ChecksumError, FormatError
from vmafs.format import vma

INDEX_MAGIC = b"VMAFSIX1"
FOOTER_MAGIC = b"VMAFSFT1"
INDEX_VERSION = 1
_INDEX_HEAD = struct.Struct("<8sIIQQ")
_FOOTER = struct.Struct("<8sIQQI")
_FIELD = struct.Struct("<HH")
FIELD_HEADER_DIGEST = 1
FIELD_CRITICAL = 0x8000
FIELD_BLOCK_SUMS = 0x8002  # critical: the index's checks are over block sums (see above)
FIELD_SUMS_CARRIED = 2  # the sums follow each data extent (see above)
SUM_SIZE = 4  # bytes of one block's sum
# Index limits, checked before allocating: one slot per cluster of 254 devices of 256 TiB.
MAX_SLOTS = 1 << 40
MAX_INDEX_BYTES = 1 << 36
MAX_STREAM_OFFSET = 1 << 60  # offsets must stay far from int64 overflow in any arithmetic


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The 32-bit checksum of stored cluster data and of the index itself."""
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


try:  # the optional C accelerator, built by `pip install` (setup.py): the same values as the
    # Python below (tests/test_block_sums.py proves it), hashed with the GIL released, so a
    # second thread runs meanwhile
    from vmafs.format import _blocksums as _native
except ImportError:  # not built: the Python below
    _native = None  # type: ignore[assignment]


def block_sums(*parts: bytes | bytearray | memoryview) -> bytes:
    """The sums (LE u32, `checksum` of each) of the 4 KiB blocks of the parts, in order (a
    part's short last block is summed as it is): a writer passes an extent's clusters at once.
    A part that is not C-contiguous is summed as its bytes in C order (tobytes())."""
    if _native is not None:
        return _native.block_sums(*parts)
    return _block_sums(*parts)


def summed_check(stored: bytes | bytearray | memoryview) -> int:
    """A cluster's index check in a block-summed archive, from its stored blocks."""
    return checksum(block_sums(stored))


def checks(data: bytes | bytearray | memoryview, ends: Sequence[int] | np.ndarray, *,
           summed: bool = False) -> bytes:
    """The index check (LE u32) of each piece of data, pieces back to back from 0, the i-th
    ending at ends[i]: `checksum` of its bytes, or with summed, `summed_check` of it. One call
    an extent (its clusters, or the sums carried for them), not one a cluster."""
    if _native is not None:
        return _native.checks(data, ends, summed)
    return _checks(data, ends, summed)


def _bytes_of(part: bytes | bytearray | memoryview) -> memoryview:
    """A buffer's bytes in C order: itself if C-contiguous, else a copy."""
    view = memoryview(part)
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _block_sums(*parts: bytes | bytearray | memoryview) -> bytes:
    """block_sums without the accelerator: one hash call a block."""
    digest = xxhash.xxh3_64_intdigest
    step = vma.BLOCK_SIZE
    views = [_bytes_of(p) for p in parts]
    sums = [digest(v[at:at + step]) & 0xFFFFFFFF for v in views for at in range(0, len(v), step)]
    return struct.pack(f"<{len(sums)}I", *sums)


def _checks(data: bytes | bytearray | memoryview, ends: Sequence[int] | np.ndarray,
            summed: bool) -> bytes:
    """checks without the accelerator."""
    view = _bytes_of(data)
    out = []
    start = 0
    for end in [int(e) for e in ends]:
        if not start <= end <= len(view):
            raise ValueError("ends must be non-decreasing and within the data")
        piece = view[start:end]
        out.append(checksum(_block_sums(piece) if summed else piece))
        start = end
    return struct.pack(f"<{len(out)}I", *out)


def sums_extents(blocks: int) -> int:
    """Null extents that carry the sums of an extent of `blocks` stored blocks."""
    return -(-blocks * SUM_SIZE // vma.NULL_PAYLOAD_SIZE)


SUMS_REFUSED = (INDEX_MAGIC, FOOTER_MAGIC)
"""What the null extents after a data extent may not start with to be its sums: a trailing
index there (an archive without sums whose last data extent is followed by its index)."""


def carried_checks(headers: bytes | bytearray | memoryview | np.ndarray, blocks: int,
                   ends: np.ndarray) -> bytes | None:
    """The index checks (LE u32) of a data extent's stored clusters, from the block sums
    carried after it (sums carried): `headers`, the 512-byte headers of the null extents
    that follow it, hold its `blocks` sums (cluster i's data ends at ends[i], int64, in its
    data) and zeros after them. None if they do not have that shape: fewer headers than
    sums_extents(blocks), a nonzero byte after the sums, or a trailing index there. The
    headers' md5 and dev_ids are the walk's to check. One C call when the accelerator is
    built (tests/test_block_sums.py proves the two equal)."""
    if _native is not None:
        return _native.carried_checks(headers, blocks, ends, SUMS_REFUSED)
    return _carried_checks(headers, blocks, ends)


def _carried_checks(headers: bytes | bytearray | memoryview | np.ndarray, blocks: int,
                    ends: np.ndarray) -> bytes | None:
    """carried_checks without the accelerator."""
    if blocks < 0:
        raise ValueError("blocks out of range")
    ends = np.asarray(ends, np.int64)
    if len(ends) and (ends[0] < 0 or ends[-1] > blocks * vma.BLOCK_SIZE
                      or (np.diff(ends) < 0).any()):
        raise ValueError("ends must be non-decreasing and within the data")
    n = sums_extents(blocks)
    flat = _bytes_of(headers.data if isinstance(headers, np.ndarray) else headers)
    if len(flat) < n * vma.EXTENT_HEADER_SIZE:
        return None
    carried = vma.gather_null_payloads(flat[:n * vma.EXTENT_HEADER_SIZE])
    size = blocks * SUM_SIZE
    if carried[size:] != bytes(len(carried) - size) or carried.startswith(SUMS_REFUSED):
        return None
    return _checks(carried, ends // (vma.BLOCK_SIZE // SUM_SIZE), False)


def extent_ends(ext_counts: np.ndarray, masks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stream offset where each data extent's data ends (where its block sums start), from
    its last row: one step an extent, not a pass over every row."""
    if not len(ext_counts):
        return np.zeros(0, np.uint64)
    last = np.cumsum(ext_counts.astype(np.int64)) - 1
    return (offsets[last].astype(np.uint64)
            + vma.POPCOUNT16[masks[last]].astype(np.uint64) * np.uint64(vma.BLOCK_SIZE))


@dataclass(frozen=True)
class Footer:
    """The index footer: where the extent index lies in the stream and how it is checked."""

    index_offset: int  # stream offset of the first index null extent
    index_length: int  # bytes of index payload
    index_checksum: int
    header_digest: bytes | None = None  # vma.header_digest of the archive; None: not carried
    block_sums: bool = False  # the checks are over block sums
    sums_carried: bool = False  # the sums follow each data extent (with block_sums)


class IndexBuilder:
    """Collects extents and stored clusters as a writer emits them; cheap per cluster."""

    def __init__(self) -> None:
        self.ext_offsets = array("Q")
        self.ext_counts = array("H")
        self.clusters = array("I")
        self.masks = array("H")
        self.dev_ids = array("B")
        self.checksums = array("I")

    def add_extent(self, offset: int, slots: list[tuple[int, int, int, int]]) -> None:
        """slots: (dev_id, cluster, mask, checksum) of its stored clusters, in slot order."""
        if not slots:
            return
        self.ext_offsets.append(offset)
        self.ext_counts.append(len(slots))
        for dev_id, cluster, mask, check in slots:
            self.dev_ids.append(dev_id)
            self.clusters.append(cluster)
            self.masks.append(mask)
            self.checksums.append(check)

    def encode(self) -> bytes:
        head = _INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, 0, len(self.ext_offsets),
                                len(self.clusters))
        parts = [head]
        for arr in (self.ext_offsets, self.ext_counts, self.clusters, self.masks,
                    self.dev_ids, self.checksums):
            if arr.itemsize > 1 and np.little_endian is False:  # pragma: no cover
                arr = array(arr.typecode, arr)
                arr.byteswap()
            parts.append(arr.tobytes())
        return b"".join(parts)


@dataclass
class IndexTable:
    """A decoded index: one row per stored cluster, with absolute data offsets."""

    dev_ids: np.ndarray  # uint8
    clusters: np.ndarray  # uint32
    masks: np.ndarray  # uint16
    offsets: np.ndarray  # uint64, stream offset of the cluster's first stored block
    checksums: np.ndarray | None  # uint32, None for archives indexed by walking (no checksums)
    ext_offsets: np.ndarray  # uint64, stream offset of each data extent, in stream order
    ext_counts: np.ndarray  # uint16, rows of each data extent (its stored slots, in order)
    sector_base: int | None = None  # if set, offsets are 512-byte sectors from here


def decode_index(blob: bytes) -> IndexTable:
    if len(blob) < _INDEX_HEAD.size:
        raise FormatError("index too short")
    magic, version, _flags, n_ext, n_slots = _INDEX_HEAD.unpack_from(blob)
    if magic != INDEX_MAGIC:
        raise FormatError("bad index magic")
    if version != INDEX_VERSION:
        raise FormatError(f"unsupported index version {version}")
    expected = _INDEX_HEAD.size + n_ext * 10 + n_slots * 11
    if n_slots > MAX_SLOTS or n_ext > n_slots or expected != len(blob):
        raise FormatError("index sizes do not add up")
    pos = _INDEX_HEAD.size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(blob, dtype, count, pos)
        pos += arr.nbytes
        return arr

    ext_offsets = take("<u8", n_ext)
    ext_counts = take("<u2", n_ext)
    clusters = take("<u4", n_slots)
    masks = take("<u2", n_slots)
    dev_ids = take("u1", n_slots)
    checksums = take("<u4", n_slots)
    if int(ext_counts.sum(dtype=np.uint64)) != n_slots or (ext_counts == 0).any():
        raise FormatError("index extent counts do not match its slots")
    if (ext_counts > vma.SLOTS_PER_EXTENT).any() or (masks == 0).any() or (dev_ids == 0).any():
        raise FormatError("index holds impossible slots")
    if n_ext and int(ext_offsets.max()) >= MAX_STREAM_OFFSET:
        raise FormatError("index places an extent at an impossible offset")
    return IndexTable(dev_ids, clusters, masks, data_offsets(ext_offsets, ext_counts, masks),
                      checksums, ext_offsets, ext_counts)


def data_offsets(ext_offsets: np.ndarray, ext_counts: np.ndarray, masks: np.ndarray, *,
                 sector_base: int | None = None) -> np.ndarray:
    """Stream offset of each slot's data: its extent's data start plus earlier slots' blocks.

    With sector_base, in 512-byte sectors from sector_base, as uint32 when they fit (every
    extent starts a multiple of 512 bytes after the header): 4 bytes a cluster instead of 8.
    Worked out a chunk of extents at a time, so temporaries stay small at any size.
    """
    counts = ext_counts.astype(np.int64)
    first = np.cumsum(counts) - counts
    total = int(counts.sum())
    if sector_base is None:
        out = np.empty(total, np.uint64)
    else:
        last = int(ext_offsets[-1]) - sector_base if len(ext_offsets) else 0
        fits = (last + vma.MAX_EXTENT_SIZE) // 512 < 1 << 32
        out = np.empty(total, np.uint32 if fits else np.uint64)
    step = 4096  # extents: at most 241,664 slots of int64 temporaries
    for e0 in range(0, len(counts), step):
        e1 = min(e0 + step, len(counts))
        lo = int(first[e0])
        hi = int(first[e1 - 1] + counts[e1 - 1])
        blocks = vma.POPCOUNT16[masks[lo:hi]].astype(np.int64)
        before = np.cumsum(blocks)
        before -= blocks  # blocks stored before each slot of the chunk
        starts = ext_offsets[e0:e1].astype(np.int64) + vma.EXTENT_HEADER_SIZE
        starts -= before[first[e0:e1] - lo] * vma.BLOCK_SIZE
        before *= vma.BLOCK_SIZE
        before += np.repeat(starts, counts[e0:e1])
        if sector_base is not None:
            before -= sector_base
            before //= 512
        out[lo:hi] = before
    return out


def encode_footer(footer: Footer) -> bytes:
    out = _FOOTER.pack(FOOTER_MAGIC, INDEX_VERSION, footer.index_offset,
                       footer.index_length, footer.index_checksum)
    if footer.header_digest is not None:
        out += _FIELD.pack(FIELD_HEADER_DIGEST, len(footer.header_digest)) + footer.header_digest
    if footer.block_sums:
        out += _FIELD.pack(FIELD_BLOCK_SUMS, 0)
    if footer.sums_carried:
        out += _FIELD.pack(FIELD_SUMS_CARRIED, 0)
    return out


def decode_footer(payload: bytes) -> Footer | None:
    """The footer from a null extent's payload, or None if that extent is not our footer."""
    if payload[:8] != FOOTER_MAGIC:
        return None
    _, version, offset, length, crc = _FOOTER.unpack_from(payload)
    if version != INDEX_VERSION:
        raise FormatError(f"unsupported index version {version}")
    if length > MAX_INDEX_BYTES:
        raise FormatError("index length is impossible")
    digest = None
    summed = carried = False
    fields = _footer_fields(payload[_FOOTER.size:vma.NULL_PAYLOAD_SIZE])
    for kind, value in fields:
        if kind == FIELD_HEADER_DIGEST:
            if len(value) != 32 or digest is not None:
                raise FormatError("footer: bad header digest field")
            digest = value
        elif kind == FIELD_BLOCK_SUMS:
            if value or summed:
                raise FormatError("footer: bad block sums field")
            summed = True
        elif kind == FIELD_SUMS_CARRIED:
            if value or carried:
                raise FormatError("footer: bad sums carried field")
            carried = True
        elif kind & FIELD_CRITICAL:
            raise FormatError(f"footer: field type {kind:#06x} is not known to this vmafs")
    if carried and not summed:
        raise FormatError("footer: sums carried without block sums")
    return Footer(offset, length, crc, digest, summed, carried)


def _footer_fields(area: bytes) -> list[tuple[int, bytes]]:
    """The typed fields after the fixed footer, strictly: they end at type 0 or the area's
    end, and everything after them is zero."""
    fields = []
    pos = 0
    while pos + _FIELD.size <= len(area):
        kind, size = _FIELD.unpack_from(area, pos)
        if kind == 0:
            break
        pos += _FIELD.size
        if pos + size > len(area):
            raise FormatError("footer: a field runs past the footer")
        fields.append((kind, bytes(area[pos:pos + size])))
        pos += size
    if any(area[pos:]):
        raise FormatError("footer: bytes after its fields")
    return fields


def check_header_digest(footer: Footer, header: vma.Header) -> bool:
    """True if the footer carries a header digest and it is this header's; False if it
    carries none (an archive from before it, or a Proxmox one converted by an old vmafs)."""
    if footer.header_digest is None:
        return False
    if footer.header_digest != vma.header_digest(header):
        raise ChecksumError("the archive header (configs, device names or sizes) does not "
                            "match the header digest in its vmafs index")
    return True


def index_extent_span(footer: Footer, footer_offset: int) -> int:
    """Bytes of null extents the index occupies; checked against the footer's position."""
    n_extents = max(1, -(-footer.index_length // vma.NULL_PAYLOAD_SIZE))
    span = n_extents * vma.EXTENT_HEADER_SIZE
    if footer.index_offset + span != footer_offset:
        raise FormatError("index position in the footer does not match the archive")
    return span


def check_index_blob(blob: bytes, footer: Footer) -> bytes:
    blob = blob[:footer.index_length]
    if len(blob) != footer.index_length:
        raise FormatError("index is truncated")
    if checksum(blob) != footer.index_checksum:
        raise ChecksumError("index checksum mismatch")
    return blob
