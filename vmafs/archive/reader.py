"""Random access to an archive's disks: the index (trailing, or built by walking the extent
headers of a Proxmox archive) maps each cluster to its stored blocks in the stream."""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vmafs.container.streams import detect_container
from vmafs.errors import ChecksumError, FormatError, IncompleteError, NotSeekableError
from vmafs.format import index, vma

CLUSTER = vma.CLUSTER_SIZE
ZEROS = bytes(4 * 1024 * 1024)
ZERO_VIEW = memoryview(ZEROS)
_POPCOUNT: list[int] = vma.POPCOUNT16.tolist()


class StreamSource(Protocol):
    """The archive's VMA stream, readable at any offset."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class PlainSource:
    """An uncompressed .vma file.

    A reader that goes through the stream in order gets the next PREFETCH bytes requested
    ahead (POSIX_FADV_WILLNEED), so the disk works while the data already read is served. With
    `drop_behind`, what such a reader has passed is dropped from the page cache: when the mount
    serves it through the page cache, a second cached copy would only double the memory used
    (and filling fresh pages is what costs most in a streaming read).
    """

    PREFETCH = 8 << 20

    def __init__(self, fd: int, *, drop_behind: bool = False) -> None:
        self.fd = fd
        self.drop_behind = drop_behind
        self._size = os.fstat(fd).st_size
        self._next = 0  # where a sequential reader reads next
        self._ahead = 0  # end of what was already requested ahead
        self._behind = 0  # where the sequential reader's run started, or was dropped up to

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        end = offset + length
        sequential = abs(offset - self._next) <= CLUSTER
        if sequential and end + self.PREFETCH // 2 > self._ahead:
            start = max(end, self._ahead)
            self._ahead = end + self.PREFETCH
            os.posix_fadvise(self.fd, start, self._ahead - start, os.POSIX_FADV_WILLNEED)
        self._next = end
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        if not sequential:
            self._behind = offset
        elif self.drop_behind and offset > self._behind:
            # whole pages only: the page holding `offset` may still be needed by this read
            os.posix_fadvise(self.fd, self._behind, offset - self._behind,
                             os.POSIX_FADV_DONTNEED)
            self._behind = offset
        return data

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Device:
    dev_id: int
    name: str
    size: int


class _DeviceMap:
    """Sorted stored clusters of one device: cluster -> (mask, data offset, checksum).

    `known` is set only for a damaged archive read by walking: the clusters seen before the
    damage. A cluster neither stored nor known may have been lost, so it must not read as zeros.
    """

    __slots__ = ("clusters", "masks", "offsets", "checksums", "known")

    def __init__(self, clusters: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                 checksums: np.ndarray | None, known: np.ndarray | None = None) -> None:
        self.known = known
        order = np.argsort(clusters, kind="stable")
        self.clusters = clusters[order]
        if len(self.clusters) > 1 and (np.diff(self.clusters.astype(np.int64)) == 0).any():
            raise FormatError("the archive holds a cluster twice")
        self.masks = masks[order]
        self.offsets = offsets[order]
        self.checksums = checksums[order] if checksums is not None else None


class Archive:
    """An archive opened for random reads; thread-safe (reads use pread only)."""

    def __init__(self, source: StreamSource, header: vma.Header, table: index.IndexTable,
                 *, indexed: bool, compressed: bool, warnings: list[str],
                 known: dict[int, np.ndarray] | None = None) -> None:
        self.source = source
        self.header = header
        self.uuid = uuidlib.UUID(bytes=header.uuid)
        self.ctime = header.ctime
        self.devices = [Device(d.dev_id, d.name, d.size) for d in header.devices]
        self.configs = dict(header.configs)
        self.indexed = indexed  # True when a trailing index (with data checksums) was found
        self.compressed = compressed
        self.warnings = warnings
        self._maps: dict[int, _DeviceMap] = {}
        sizes = {d.dev_id: d.clusters for d in header.devices}
        for dev_id in sizes:
            rows = table.dev_ids == dev_id
            clusters = table.clusters[rows]
            if len(clusters) and int(clusters.max()) >= sizes[dev_id]:
                raise FormatError(f"index places data beyond the end of device {dev_id}")
            self._maps[dev_id] = _DeviceMap(
                clusters, table.masks[rows], table.offsets[rows],
                table.checksums[rows] if table.checksums is not None else None,
                known.get(dev_id) if known is not None else None)
        if table.checksums is not None and len(table.offsets):
            ends = table.offsets + vma.POPCOUNT16[table.masks].astype(np.uint64) * vma.BLOCK_SIZE
            if int(ends.max()) > source.size:
                raise IncompleteError("index points past the end of the archive")
        self._sizes = {d.dev_id: d.size for d in header.devices}

    @classmethod
    def open(cls, path: str, *, drop_behind: bool = False) -> Archive:
        """Open for random reads; `drop_behind` as in PlainSource (plain archives only)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            kind = detect_container(os.pread(fd, 16, 0))
            source: StreamSource
            if kind == "vma":
                source = PlainSource(fd, drop_behind=drop_behind)
            elif kind == "zstd":
                from vmafs.container.zstd_source import (
                    SeekableZstdSource,  # zstandard: only if needed
                )
                source = SeekableZstdSource(fd, name=path)
            else:
                raise NotSeekableError(
                    f"{path}: a {kind} archive can only be read start to end; make it "
                    f"mountable with: vmafs convert {path} OUT.vma.zst"
                )
        except BaseException:
            os.close(fd)
            raise
        try:
            archive = cls._load(source, compressed=kind != "vma")
        except BaseException:
            source.close()
            raise
        if archive.indexed and hasattr(source, "prefix_reads"):
            # Every cluster read is checked against the index, so small reads may stop
            # decompressing a frame before its end (where zstd checks the frame's checksum).
            source.prefix_reads = True
        return archive

    @classmethod
    def _load(cls, source: StreamSource, *, compressed: bool) -> Archive:
        prefix = source.pread(0, vma.HEADER_FIXED_SIZE)
        header_size = vma.header_size_of(prefix)
        header = vma.decode_header(prefix + source.pread(vma.HEADER_FIXED_SIZE,
                                                         header_size - vma.HEADER_FIXED_SIZE))
        warnings: list[str] = []
        table = _read_trailing_index(source, header)
        if table is not None:
            return cls(source, header, table, indexed=True, compressed=compressed,
                       warnings=warnings)
        table, known = _walk_extents(source, header, warnings)
        return cls(source, header, table, indexed=False, compressed=compressed,
                   warnings=warnings, known=known)

    def device(self, dev_id: int) -> Device:
        for dev in self.devices:
            if dev.dev_id == dev_id:
                return dev
        raise KeyError(dev_id)

    def read(self, dev_id: int, offset: int, length: int) -> bytes | memoryview:
        """Device bytes [offset, offset+length) as a bytes-like object, clipped at the end.

        Clusters adjacent on the device and in the stream are fetched with one pread; whole
        clusters are not copied again, holes are views of a shared zero buffer. The few index
        rows a read touches become Python lists first: numpy scalars cost more than the lookup.
        """
        size = self._sizes[dev_id]
        end = min(offset + length, size)
        if offset >= end:
            return b""
        dmap = self._maps[dev_id]
        lo, hi = self._span(dmap, dev_id, offset, end)
        if lo == hi:  # a hole: no stored cluster touched
            return _zeros(end - offset)
        clusters = dmap.clusters[lo:hi].tolist()
        masks = dmap.masks[lo:hi].tolist()
        offsets = dmap.offsets[lo:hi].tolist()
        sums = dmap.checksums[lo:hi].tolist() if dmap.checksums is not None else None
        parts: list[bytes | memoryview] = []
        pos = offset
        i, n = 0, len(clusters)
        while i < n:
            j, data, views = self._fetch_run(clusters, masks, offsets, sums, i, dev_id)
            start = clusters[i] * CLUSTER
            if start > pos:
                parts.append(_zeros(start - pos))
                pos = start
            if views is None:  # whole clusters back to back: the device range is the buffer
                stop = min((clusters[j - 1] + 1) * CLUSTER, end)
                parts.append(data[pos - start:stop - start])
                pos = stop
            else:
                for k in range(i, j):
                    start = clusters[k] * CLUSTER
                    stop = min(start + CLUSTER, end)
                    parts.append(views[k - i][pos - start:stop - start])
                    pos = stop
            i = j
        if pos < end:
            parts.append(_zeros(end - pos))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch_run(self, clusters: list[int], masks: list[int], offsets: list[int],
                   sums: list[int] | None, i: int, dev_id: int
                   ) -> tuple[int, memoryview, list[memoryview] | None]:
        """Read stored clusters i.. that follow each other on the device and in the stream
        with one pread, and check each one's checksum. Returns the end index, the data, and
        per-cluster views unless every cluster is whole (then the data is the device range)."""
        nbytes = [_POPCOUNT[masks[i]] * vma.BLOCK_SIZE]
        j = i + 1
        while (j < len(clusters) and clusters[j] == clusters[j - 1] + 1
               and offsets[j] == offsets[j - 1] + nbytes[-1]):
            nbytes.append(_POPCOUNT[masks[j]] * vma.BLOCK_SIZE)
            j += 1
        first = offsets[i]
        total = sum(nbytes)
        data = memoryview(self.source.pread(first, total))
        if len(data) != total:
            raise IncompleteError(f"cluster {clusters[j - 1]} of "
                                  f"{self.device(dev_id).name} is cut off")
        views: list[memoryview] = []
        whole = True
        pos = 0
        for k in range(i, j):
            stored = data[pos:pos + nbytes[k - i]]
            if sums is not None and index.checksum(stored) != sums[k]:
                raise ChecksumError(
                    f"data checksum mismatch in cluster {clusters[k]} of "
                    f"{self.device(dev_id).name} (stream offset {first + pos})")
            pos += len(stored)
            mask = masks[k]
            whole = whole and mask == vma.FULL_MASK
            views.append(stored if mask == vma.FULL_MASK
                         else memoryview(vma.expand_blocks(stored, mask)))
        return j, data, None if whole else views

    def is_hole(self, dev_id: int, offset: int, length: int) -> bool:
        """True if [offset, offset+length) holds no stored data (it reads as zeros)."""
        end = min(offset + length, self._sizes[dev_id])
        if offset >= end:
            return True
        lo, hi = self._span(self._maps[dev_id], dev_id, offset, end)
        return lo == hi

    def stored_bytes(self, dev_id: int) -> int:
        """Bytes of data the archive stores for a device (what `du` of its image shows)."""
        masks = self._maps[dev_id].masks
        return int(vma.POPCOUNT16[masks].sum(dtype=np.int64)) * vma.BLOCK_SIZE

    def _span(self, dmap: _DeviceMap, dev_id: int, offset: int, end: int) -> tuple[int, int]:
        """Index range of the stored clusters in [offset, end), after the damage check.

        Searched with uint32 keys: a Python int would make numpy convert the whole column on
        every call (milliseconds per read at 1 TiB).
        """
        first = offset // CLUSTER
        last = (end - 1) // CLUSTER
        if dmap.known is not None and not dmap.known[first:last + 1].all():
            lost = first + int(np.flatnonzero(~dmap.known[first:last + 1])[0])
            raise IncompleteError(f"cluster {lost} of {self.device(dev_id).name} lies past "
                                  "the damaged part of the archive")
        return (int(dmap.clusters.searchsorted(np.uint32(first))),
                int(dmap.clusters.searchsorted(np.uint32(last), side="right")))

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zeros(n: int) -> bytes | memoryview:
    return ZERO_VIEW[:n] if n <= len(ZEROS) else bytes(n)


def _read_trailing_index(source: StreamSource, header: vma.Header) -> index.IndexTable | None:
    """The index from the last extent's footer, or None if this archive has none."""
    footer_offset = source.size - vma.EXTENT_HEADER_SIZE
    if footer_offset < header.header_size:
        return None
    raw = source.pread(footer_offset, vma.EXTENT_HEADER_SIZE)
    try:
        ext = vma.decode_extent_header(raw, header.uuid)
    except FormatError:
        return None
    if ext.slots or ext.block_count:
        return None
    footer = index.decode_footer(vma.null_extent_payload(raw))
    if footer is None:
        return None
    span = index.index_extent_span(footer, footer_offset)
    raw_index = source.pread(footer.index_offset, span)
    payloads = []
    for pos in range(0, span, vma.EXTENT_HEADER_SIZE):
        head = raw_index[pos:pos + vma.EXTENT_HEADER_SIZE]
        vma.decode_extent_header(head, header.uuid)
        payloads.append(vma.null_extent_payload(head))
    return index.decode_index(index.check_index_blob(b"".join(payloads), footer))


def _walk_extents(source: StreamSource, header: vma.Header, warnings: list[str]
                  ) -> tuple[index.IndexTable, dict[int, np.ndarray] | None]:
    """Index a Proxmox archive by reading each extent header (one 512-byte read per extent).

    Also returns, only if the walk stopped at damage, which clusters it saw per device.
    """
    seen = {d.dev_id: np.zeros(d.clusters, bool) for d in header.devices}
    damaged = False
    ext_offsets: list[int] = []
    ext_counts: list[int] = []
    dev_ids: list[int] = []
    clusters: list[int] = []
    masks: list[int] = []
    offset = header.header_size
    while offset < source.size:
        raw = source.pread(offset, vma.EXTENT_HEADER_SIZE)
        try:
            ext = vma.decode_extent_header(raw, header.uuid)
            if offset + ext.size > source.size:
                raise IncompleteError("archive is truncated")
            blocks = sum(int(vma.POPCOUNT16[m]) for _, _, m in ext.slots)
            if blocks != ext.block_count:
                raise FormatError("vma extent error - missing blocks")
        except FormatError as exc:
            warnings.append(f"damaged at offset {offset}: {exc}; clusters not seen before it "
                            "cannot be read")
            damaged = True
            break
        for d, c, _ in ext.slots:
            if d in seen and c < len(seen[d]):
                seen[d][c] = True
        # every stored slot counts for data offsets, even one of a device we do not show
        stored = [(d, c, m) for d, c, m in ext.slots if m]
        if stored:
            ext_offsets.append(offset)
            ext_counts.append(len(stored))
            for d, c, m in stored:
                dev_ids.append(d)
                clusters.append(c)
                masks.append(m)
        offset += ext.size
    masks_arr = np.array(masks, np.uint16)
    offsets = index.data_offsets(np.array(ext_offsets, np.uint64),
                                 np.array(ext_counts, np.uint16), masks_arr)
    table = index.IndexTable(np.array(dev_ids, np.uint8), np.array(clusters, np.uint32),
                             masks_arr, offsets, None)
    return table, (seen if damaged else None)
