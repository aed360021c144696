"""Random access to an archive's disks: the one model that the mount (and later serve) reads
through. It opens in one of two modes, which every consumer sees the same way:

- "indexed": a trailing vmafs index, trusted only after locate.py's cross-checks against the
  stream; every cluster read is checked against its checksum (EIO on a mismatch);
- "walked": an archive without an index (Proxmox's), indexed by walking its extent headers with
  every rule verify applies; there are no data checksums to check.
Anything else is refused at open: an archive verify would reject for its structure (damage,
truncation, missing or repeated clusters, an index that is present but damaged or contradicts
the stream) never mounts, so the mount serves no byte extract would not write.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

import numpy as np

from vmafs.archive import locate, problems, walk_cache
from vmafs.archive.walk import index_by_walking
from vmafs.container.source import ByteSource, open_source
from vmafs.format import index, vma

CLUSTER = vma.CLUSTER_SIZE
ZEROS = bytes(4 * 1024 * 1024)
ZERO_VIEW = memoryview(ZEROS)
_POPCOUNT = vma.POPCOUNT16_LIST


@dataclass(frozen=True)
class Device:
    dev_id: int
    name: str
    size: int


class _DeviceMap:
    """Sorted stored clusters of one device: cluster -> (mask, data offset, checksum).

    Offsets are bytes, or 512-byte sectors from sector_base (a walked archive: 4 bytes a
    cluster instead of 8).
    """

    __slots__ = ("clusters", "masks", "offsets", "checksums", "sector_base")

    def __init__(self, clusters: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                 checksums: np.ndarray | None, sector_base: int | None) -> None:
        if len(clusters) > 1 and not (clusters[1:] > clusters[:-1]).all():
            order = np.argsort(clusters, kind="stable")
            clusters, masks, offsets = clusters[order], masks[order], offsets[order]
            checksums = checksums[order] if checksums is not None else None
        # Columns of an index are views into its bytes, not always aligned; numpy would copy a
        # misaligned column on every search (milliseconds a read at 1 TiB): align them once.
        self.clusters = _aligned(clusters)
        self.masks = _aligned(masks)
        self.offsets = _aligned(offsets)
        self.checksums = _aligned(checksums) if checksums is not None else None
        self.sector_base = sector_base

    def byte_offsets(self, lo: int, hi: int) -> list[int]:
        got: list[int] = self.offsets[lo:hi].tolist()
        if self.sector_base is None:
            return got
        return [self.sector_base + (s << 9) for s in got]


def _aligned(column: np.ndarray) -> np.ndarray:
    return np.require(column, requirements=("A", "C"))


def _device_maps(table: index.IndexTable, header: vma.Header) -> dict[int, _DeviceMap]:
    """Rows split by device: slices (no copies) when the table lists devices one after
    another, as `vma create` and a walk of its archives do."""
    dev_ids = table.dev_ids
    ordered = len(dev_ids) < 2 or bool((dev_ids[1:] >= dev_ids[:-1]).all())
    maps = {}
    for dev in header.devices:
        rows: slice | np.ndarray
        if ordered:
            rows = slice(int(dev_ids.searchsorted(np.uint8(dev.dev_id))),
                         int(dev_ids.searchsorted(np.uint8(dev.dev_id), side="right")))
        else:
            rows = dev_ids == dev.dev_id
        maps[dev.dev_id] = _DeviceMap(
            table.clusters[rows], table.masks[rows], table.offsets[rows],
            table.checksums[rows] if table.checksums is not None else None, table.sector_base)
    return maps


INDEXED = "indexed"
WALKED = "walked"


class Archive:
    """An archive opened for random reads; thread-safe (reads use pread only)."""

    def __init__(self, source: ByteSource, header: vma.Header, table: index.IndexTable,
                 *, mode: str, compressed: bool) -> None:
        self.source = source
        self.header = header
        self.uuid = uuidlib.UUID(bytes=header.uuid)
        self.ctime = header.ctime
        self.devices = [Device(d.dev_id, d.name, d.size) for d in header.devices]
        self.configs = header.configs  # (name, data) pairs: names may repeat
        self.mode = mode
        self.compressed = compressed
        self._maps = _device_maps(table, header)
        self._sizes = {d.dev_id: d.size for d in header.devices}

    @property
    def indexed(self) -> bool:
        """True when reads are checked against the trailing index's data checksums."""
        return self.mode == INDEXED

    @classmethod
    def open(cls, path: str, *, drop_behind: bool = False) -> Archive:
        """Open for random reads; `drop_behind` as in PlainSource (plain archives only)."""
        source, kind = open_source(path, drop_behind=drop_behind)
        try:
            return cls.load(source, compressed=kind != "vma")
        except BaseException:
            source.close()
            raise

    @classmethod
    def load(cls, source: ByteSource, *, compressed: bool) -> Archive:
        """Read the header, then trust the index (after the cross-checks) or walk."""
        prefix = bytes(source.pread(0, vma.HEADER_FIXED_SIZE))
        header_size = vma.header_size_of(prefix)
        rest = bytes(source.pread(vma.HEADER_FIXED_SIZE, header_size - vma.HEADER_FIXED_SIZE))
        if len(rest) != header_size - vma.HEADER_FIXED_SIZE:
            raise problems.error(problems.TRUNCATED, "can't read vma header data")
        header = vma.decode_header(prefix + rest)
        footer = locate.find_footer(source, header)
        identity = source.identity()
        if footer is None:
            # No data checksums: frames are read whole, so zstd checks each one's checksum.
            key = walk_cache.key_of(identity, prefix + rest) if identity is not None else None
            table = walk_cache.load(key, header) if key is not None else None
            if table is None:
                table = index_by_walking(source, header)
                if key is not None:
                    walk_cache.store(key, table)
            return cls(source, header, table, mode=WALKED, compressed=compressed)
        table = locate.load_index(source, header, footer)
        # Every cluster read is checked against the index, so small reads may stop
        # decompressing a frame before its end (where zstd checks the frame's checksum);
        # confirming the index reads one header per extent, so decompresses only that far.
        source.checked_by_reader = True
        key = (walk_cache.key_of(identity, prefix + rest + index.encode_footer(footer))
               if identity is not None else None)
        if key is None or not walk_cache.confirmed(key):
            source.check_layout()
            extents = locate.confirm_index(source, header, table, footer.index_offset)
            if key is not None:
                walk_cache.remember_confirmed(key, extents)
        return cls(source, header, table, mode=INDEXED, compressed=compressed)

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
        offsets = dmap.byte_offsets(lo, hi)
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
            name = self.device(dev_id).name
            raise problems.error(problems.TRUNCATED, f"cluster {clusters[j - 1]} of {name} is "
                                 "cut off", device=name, cluster=clusters[j - 1], offset=first)
        views: list[memoryview] = []
        whole = True
        pos = 0
        for k in range(i, j):
            stored = data[pos:pos + nbytes[k - i]]
            if sums is not None and index.checksum(stored) != sums[k]:
                name = self.device(dev_id).name
                raise problems.error(
                    problems.CHECKSUM, f"data checksum mismatch in cluster {clusters[k]} of "
                    f"{name} (stream offset {first + pos})", device=name, cluster=clusters[k],
                    offset=first + pos)
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
        """Index range of the stored clusters in [offset, end).

        Searched with uint32 keys: a Python int would make numpy convert the whole column on
        every call (milliseconds per read at 1 TiB).
        """
        first = offset // CLUSTER
        last = (end - 1) // CLUSTER
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
