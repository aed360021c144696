"""Random access to an archive's disks: the one model that the mount (and later serve) reads
through. It opens in one of two modes, which every consumer sees the same way:

- "indexed": a trailing vmafs index, trusted only after locate.py's cross-checks against the
  stream; every cluster read is checked against its checksum (EIO on a mismatch). In a
  block-summed archive (format/index.py) a read of part of a cluster reads only its blocks
  and the cluster's block sums, and checks both; sums that fail the index fall back to
  reading the whole cluster, which then decides, as every other reading path does;
- "walked": an archive without an index (Proxmox's), indexed by walking its extent headers with
  every rule verify applies; there are no data checksums to check.
Anything else is refused at open: an archive verify would reject for its structure (damage,
truncation, missing or repeated clusters, an index that is present but damaged or contradicts
the stream) never mounts, so the mount serves no byte extract would not write.
"""

from __future__ import annotations

import bisect
import copy
import functools
import itertools
import threading
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vmafs.archive import locate, problems, stored, walk_cache
from vmafs.archive.clusterset import ClusterSet
from vmafs.archive.extent_check import LazyExtents
from vmafs.archive.walk import index_by_walking
from vmafs.container.source import ByteSource, open_source
from vmafs.errors import VmafsError
from vmafs.format import chain, index, vma
from vmafs.format.names import display, format_ctime
from vmafs.lru import ByteLRU

CLUSTER = vma.CLUSTER_SIZE
# Written, not bytes(n): calloc's untouched pages all map the kernel's zero page, which the
# fast path of pinning a FUSE reply's pages refuses, so every hole a mount answered took the
# slow one (mmap lock, a VMA lookup a page: ~4 % of an S3 mount's main thread, perf)
ZEROS = bytes(bytearray(4 * 1024 * 1024))
ZERO_VIEW = memoryview(ZEROS)
_POPCOUNT = vma.POPCOUNT16_LIST
MAX_LAYERS = 256           # archives a stack holds: each row's layer number is one byte
_UINT32_MAX = (1 << 32) - 1  # cluster numbers are uint32 in the rows
NEAR = CLUSTER  # block sums this close after the blocks come in the same read (further,
# and PlainSource would take the second read for a sequential reader's and read ahead)


@dataclass(frozen=True)
class Device:
    """A disk of an opened archive: its id in the stream, its name and size in bytes."""

    dev_id: int
    name: str
    size: int


SUMS_CACHE_BYTES = 8 << 20  # ~2200 extents' sums: 8 GiB of data
# The sums of the data extents read lately, for every archive of the process together (a chain
# of many layers shares one budget). It trusts nothing: each read checks the sums it takes
# against its index.
_SUMS_CACHE: ByteLRU[tuple[int, int]] = ByteLRU(SUMS_CACHE_BYTES)
_SUMS_KEYS = itertools.count()


class _Sums:
    """Where a block-summed archive's sums are: each data extent's start and data end, where
    its sums begin (16 bytes a data extent, 0.3 a cluster). The sums read lately are kept in
    _SUMS_CACHE: a small read of a cluster near one read before (a booting guest, a file
    system's metadata) then needs no second disk read."""

    __slots__ = ("starts", "ends", "key", "_starts", "_ends")

    def __init__(self, table: index.IndexTable) -> None:
        self.starts = _aligned(table.ext_offsets.astype(np.uint64))
        self.ends = index.extent_ends(table.ext_counts, table.masks, table.offsets)
        self.key = next(_SUMS_KEYS)  # this archive's entries in the cache
        self._starts, self._ends = _scalars(self.starts), _scalars(self.ends)

    def locate(self, data_offset: int) -> tuple[int, int, int, int]:
        """(extent number, where its sums begin, its blocks, its blocks before data_offset)
        of the data extent holding data_offset."""
        e = bisect.bisect_right(self._starts, data_offset) - 1
        start, end = self._starts[e] + vma.EXTENT_HEADER_SIZE, self._ends[e]
        return e, end, (end - start) // vma.BLOCK_SIZE, (data_offset - start) // vma.BLOCK_SIZE

    def get(self, extent: int) -> bytes | None:
        return _SUMS_CACHE.get((self.key, extent))

    def preload(self, source: ByteSource, stop: threading.Event, budget: int) -> int:
        """Read the sums of the extents, first to last, into the cache until BUDGET bytes of
        sums are loaded or STOP is set; returns the bytes loaded. Each run is read as a small
        read would read it (and trusted no more: every read checks what it takes)."""
        loaded = 0
        step = 64  # runs asked for at once: a disk answers many requests together
        for lo in range(0, len(self.starts), step):
            runs = []
            for e in range(lo, min(lo + step, len(self.starts))):
                start = int(self.starts[e]) + vma.EXTENT_HEADER_SIZE
                end = int(self.ends[e])
                blocks = (end - start) // vma.BLOCK_SIZE
                if loaded + blocks * index.SUM_SIZE > budget:
                    break
                loaded += blocks * index.SUM_SIZE
                runs.append((e, end, index.sums_extents(blocks) * vma.EXTENT_HEADER_SIZE))
            for _, at, span in runs:
                source.will_need([at], span)
            for e, at, span in runs:
                if stop.is_set():
                    return loaded
                if self.get(e) is None:
                    raw = source.pread(at, span)
                    if len(raw) == span:
                        self.put(e, vma.null_payloads(raw))
            if len(runs) < step:
                break
        return loaded

    def put(self, extent: int, sums: bytes) -> None:
        _SUMS_CACHE.put((self.key, extent), sums)


class _DeviceMap:
    """Sorted stored clusters of one device: cluster -> (mask, data offset, checksum).

    Offsets are bytes, or 512-byte sectors from sector_base (a walked archive: 4 bytes a
    cluster instead of 8). `layers` (a chain) says which archive of the chain each row is in.
    """

    __slots__ = ("clusters", "masks", "offsets", "checksums", "sector_base", "layers", "rows")

    def __init__(self, clusters: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                 checksums: np.ndarray | None, sector_base: int | None,
                 layers: np.ndarray | None = None) -> None:
        if len(clusters) > 1 and not (clusters[1:] > clusters[:-1]).all():
            order = np.argsort(clusters, kind="stable")
            clusters, masks, offsets = clusters[order], masks[order], offsets[order]
            checksums = checksums[order] if checksums is not None else None
            layers = layers[order] if layers is not None else None
        # Columns of an index are views into its bytes, not always aligned; numpy would copy a
        # misaligned column on every search (milliseconds a read at 1 TiB): align them once.
        self.clusters = _aligned(clusters)
        self.masks = _aligned(masks)
        self.offsets = _aligned(offsets)
        self.checksums = _aligned(checksums) if checksums is not None else None
        self.sector_base = sector_base
        self.layers = layers
        self.rows = _Rows(self)

    def byte_offsets(self, lo: int, hi: int) -> list[int]:
        got: list[int] = self.offsets[lo:hi].tolist()
        if self.sector_base is None:
            return got
        return [self.sector_base + (s << 9) for s in got]

    def all_byte_offsets(self) -> np.ndarray:
        if self.sector_base is None:
            return self.offsets.astype(np.uint64)
        return np.uint64(self.sector_base) + (self.offsets.astype(np.uint64) << np.uint64(9))


class _Rows:
    """A device map's columns as memoryviews: one row's values as Python ints, and a
    binary search of the clusters, cost a fraction of numpy's scalar paths (a small read
    looks up one row: ~0.1 µs an item and ~0.7 a search less). No copies."""

    __slots__ = ("clusters", "masks", "offsets", "checksums", "layers")

    def __init__(self, dmap: _DeviceMap) -> None:
        self.clusters = _scalars(dmap.clusters)
        self.masks = _scalars(dmap.masks)
        self.offsets = _scalars(dmap.offsets)
        self.checksums = None if dmap.checksums is None else _scalars(dmap.checksums)
        self.layers = None if dmap.layers is None else _scalars(dmap.layers)

    def find(self, cluster: int) -> int:
        """The row of a stored cluster, or -1."""
        row = bisect.bisect_left(self.clusters, cluster)
        return row if row < len(self.clusters) and self.clusters[row] == cluster else -1


def _scalars(column: np.ndarray) -> memoryview:
    """A 1-d column as a memoryview whose items are Python ints (native byte order)."""
    native = np.ascontiguousarray(column, dtype=column.dtype.newbyteorder("="))
    return memoryview(native)  # type: ignore[arg-type]


def _rows(dmap: _DeviceMap, first: int, last: int) -> tuple[int, int]:
    """Index range of the stored clusters first..last. Searched with uint32 keys: a Python
    int would make numpy convert the whole column on every call (milliseconds at 1 TiB)."""
    return (int(dmap.clusters.searchsorted(np.uint32(first))),
            int(dmap.clusters.searchsorted(np.uint32(last), side="right")))


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
    """An archive opened for random reads; thread-safe (reads use pread only).

    An incremental archive opens only as a layer (`layer=True`): alone it lacks the clusters
    its parent holds. `chain.open_chain` stacks layers into one Archive (`stack`) whose reads
    come from the newest layer that holds each cluster.
    """

    def __init__(self, source: ByteSource, header: vma.Header, table: index.IndexTable,
                 *, mode: str, compressed: bool,
                 held: dict[int, ClusterSet] | None = None, block_sums: bool = False,
                 sums_carried: bool = False, lazy: LazyExtents | None = None) -> None:
        self.source = source
        self.sources = [source]
        self.header = header
        self.uuid = uuidlib.UUID(bytes=header.uuid)
        self.ctime = header.ctime
        self.devices = [Device(d.dev_id, d.name, d.size) for d in header.devices]
        self.configs = header.configs  # (name, data) pairs: names may repeat
        self.record = chain.find(header.configs)
        self.mode = mode
        self.compressed = compressed
        self.layers: list[Archive] = [self]
        self.path: str | None = None
        self._maps = _device_maps(table, header)
        # per layer (a chain's view has one each): its checks are over block sums; where
        # its block sums are (None: not carried, a read checks whole clusters)
        self._summed: list[bool] = [block_sums]
        self._sums: list[_Sums | None] = [_Sums(table) if sums_carried else None]
        # per layer: its data extents still to be confirmed as reads need them (a store's
        # full archive, extent_check.py), else None
        self._lazy: list[LazyExtents | None] = [lazy]
        self._sizes = {d.dev_id: d.size for d in header.devices}
        self._held = held  # incremental: every cluster it has a slot for, data or zero
        self._digest: str | None = None

    @property
    def indexed(self) -> bool:
        """True when reads are checked against the trailing index's data checksums."""
        return self.mode == INDEXED

    @property
    def incremental(self) -> bool:
        return self.record is not None and self.record.incremental

    @property
    def block_sums(self) -> bool:
        """Its checks are over 4 KiB block sums (format/index.py); a plain archive carries
        them, and a small read reads only its blocks. A chain's view: its newest layer."""
        return self._summed[-1]

    @classmethod
    def open(cls, path: str, *, drop_behind: bool = False, layer: bool = False) -> Archive:
        """Open for random reads; `drop_behind` as in PlainSource (plain archives only);
        `layer`: an incremental archive is acceptable (as a layer of a chain)."""
        source, kind = open_source(path, drop_behind=drop_behind)
        try:
            archive = cls.load(source, compressed=kind != "vma", layer=layer)
        except BaseException:
            source.close()
            raise
        archive.path = path
        return archive

    @classmethod
    def load(cls, source: ByteSource, *, compressed: bool, layer: bool = False) -> Archive:
        """Read the header, then trust the index (after the cross-checks) or walk."""
        header, raw = read_source_header(source)
        record = chain.find(header.configs)
        incremental = record is not None and record.incremental
        if incremental and not layer:
            raise needs_parent(record)
        footer = locate.find_footer(source, header)
        identity = source.identity()
        if footer is None:
            if incremental:
                raise problems.error(problems.INDEX, "incremental archive without its vmafs "
                                     "index (it cannot be read without one)")
            # No data checksums: frames are read whole, so zstd checks each one's checksum.
            key = walk_cache.key_of(identity, raw) if identity is not None else None
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
        # An increment is confirmed at every open: what it holds as zeros is known only from
        # its headers. A full archive's passed check is remembered for the unchanged file.
        # An increment's passed check is remembered with what it holds (its held sets, as
        # runs: a disk copied whole is one), which is known only from its headers.
        key = (walk_cache.key_of(identity, raw + index.encode_footer(footer))
               if identity is not None else None)
        held = (walk_cache.load_held(key, header) if key is not None and incremental
                else None)
        # A full archive in a store (S3, a URL) is not confirmed at open: that reads every
        # extent's header, a request each (seconds and most of the object for a few GiB).
        # Its extent chain and slot rules are checked now, on the index, and each data
        # extent's header the first time a read needs it (extent_check.py); every read is
        # checked against the index's checksums; verify confirms the whole stream.
        remote_full = getattr(source, "remote", False) and not incremental
        lazy = (LazyExtents(source, header, table, footer.index_offset) if remote_full
                else None)
        if not remote_full and (key is None or (held is None if incremental
                                                 else not walk_cache.confirmed(key))):
            source.check_layout()
            extents, rules = locate.confirm_index(source, header, table, footer.index_offset,
                                                  complete=not incremental)
            held = rules.seen if incremental else None
            # a compressed layer's check walked every frame: worth remembering at any size
            worth = max(extents, walk_cache.MIN_EXTENTS) if compressed else extents
            if key is not None and held is not None:
                walk_cache.remember_held(key, held, worth)
            elif key is not None:
                walk_cache.remember_confirmed(key, worth)
        elif not remote_full:
            # proven before for this file unchanged: a frame's first read need not prove it
            trust = getattr(source, "trust_layout", None)
            if trust is not None:
                trust()
        return cls(source, header, table, mode=INDEXED, compressed=compressed, held=held,
                   block_sums=footer.block_sums, sums_carried=footer.sums_carried, lazy=lazy)

    @classmethod
    def stack(cls, layers: list[Archive]) -> Archive:
        """One Archive over a chain, oldest (a full archive) first: each cluster read from
        the newest layer that has a slot for it (a zero slot hides older data). chain.py
        keeps chains within MAX_LAYERS; a longer stack is refused, never numbered wrong."""
        if len(layers) > MAX_LAYERS:
            raise problems.error(problems.CHAIN, f"a chain of {len(layers)} archives is "
                                 f"deeper than {MAX_LAYERS}")
        view = copy.copy(layers[-1])  # its header, devices, configs and record
        view.layers = list(layers)
        view.sources = [a.source for a in layers]
        view._sums = [a._sums[0] for a in layers]
        view._summed = [a._summed[0] for a in layers]
        view._lazy = [a._lazy[0] for a in layers]
        view.compressed = any(a.compressed for a in layers)
        view._maps = {dev.dev_id: _stack_maps(layers, dev.name) for dev in view.devices}
        view._held = None
        view._digest = None
        return view

    def digest(self) -> str:
        """This archive's content digest (format/chain.py): what a child's link records."""
        if len(self.layers) > 1:
            raise ValueError("a chain has no digest of its own; its newest layer has one")
        if self._digest is None:
            contents = []
            for dev in self.devices:
                dmap = self._maps[dev.dev_id]
                zeros = None
                if self._held is not None:
                    held, stored = self._held[dev.dev_id], dmap.clusters
                    zeros = chain.ZeroChunks(len(held) - len(stored),
                                             functools.partial(_zero_chunks, held, stored))
                sums = dmap.checksums if dmap.checksums is not None else np.zeros(
                    len(dmap.clusters), np.uint32)
                contents.append(chain.DeviceContent(dev.name, dev.size, dmap.clusters,
                                                    dmap.masks, sums, zeros))
            self._digest = chain.content_digest(contents)
        return self._digest

    def identity(self) -> str:
        """The digest children link to: a merged archive stands for the one it replaces."""
        if self.record is not None and self.record.stands_for is not None:
            return self.record.stands_for
        return self.digest()

    def held(self, dev_id: int) -> ClusterSet | None:
        """The clusters an incremental layer has slots for (None: a full archive, all)."""
        return self._held[dev_id] if self._held is not None else None

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
        if (end - 1) // CLUSTER == offset // CLUSTER:
            return self._read_in_cluster(dmap, dev_id, offset, end)
        lo, hi = self._span(dmap, offset, end)
        if lo == hi:  # a hole: no stored cluster touched
            return _zeros(end - offset)
        clusters = dmap.clusters[lo:hi].tolist()
        masks = dmap.masks[lo:hi].tolist()
        offsets = dmap.byte_offsets(lo, hi)
        sums = dmap.checksums[lo:hi].tolist() if dmap.checksums is not None else None
        lays = dmap.layers[lo:hi].tolist() if dmap.layers is not None else None
        parts: list[bytes | memoryview] = []
        pos = offset
        i, n = 0, len(clusters)
        while i < n:
            j, data, views = self._fetch_run(clusters, masks, offsets, sums, lays, i, dev_id)
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

    def _read_in_cluster(self, dmap: _DeviceMap, dev_id: int, offset: int, end: int
                         ) -> bytes | memoryview:
        """A read inside one cluster (the small random reads of a mount or an export): one
        search of the clusters and the row's values as Python ints (_Rows), no numpy
        scalars (measured: 35.7 -> 29.5 µs a warm 4 KiB read with one search, then less)."""
        cluster = offset // CLUSTER
        rows = dmap.rows
        row = rows.find(cluster)
        if row < 0:
            return _zeros(end - offset)
        layer = 0 if rows.layers is None else rows.layers[row]
        sums = self._sums[layer]
        # in a store (S3, a URL) a second request costs more than the rest of the cluster
        if (sums is not None and rows.checksums is not None
                and not getattr(self.sources[layer], "remote", False)):
            got = self._read_blocks(dmap, dev_id, row, layer, sums, offset, end)
            if got is not None:
                return got
        _, data, views = self._fetch_run(
            [cluster], [rows.masks[row]], dmap.byte_offsets(row, row + 1),
            None if rows.checksums is None else [rows.checksums[row]],
            None if rows.layers is None else [layer], 0, dev_id)
        base = cluster * CLUSTER
        return (data if views is None else views[0])[offset - base:end - base]

    def _read_blocks(self, dmap: _DeviceMap, dev_id: int, row: int, layer: int, sums: _Sums,
                     offset: int, end: int) -> bytes | memoryview | None:
        """Part of a stored cluster of a block-summed archive: only the blocks the read needs,
        and its extent's sums unless read lately (then both are asked for together, so the
        disk has both at once); each block is checked against its sum and the cluster's sums
        against the index. None: read the whole cluster instead (it covers every stored
        block, or the sums fail the index: damaged sums)."""
        rows = dmap.rows
        mask = rows.masks[row]
        base = offset // CLUSTER * CLUSTER
        j0, j1 = (offset - base) // vma.BLOCK_SIZE, (end - 1 - base) // vma.BLOCK_SIZE + 1
        want = mask & ((1 << j1) - (1 << j0))
        if not want:
            return _zeros(end - offset)
        if want == mask:
            return None  # every stored block: the whole-cluster read checks it as cheaply
        source = self.source if dmap.layers is None else self.sources[layer]
        data_at = (rows.offsets[row] if dmap.sector_base is None
                   else dmap.byte_offsets(row, row + 1)[0])
        extent, sums_at, blocks, first = sums.locate(data_at)
        k0 = _POPCOUNT[mask & ((1 << j0) - 1)]  # stored blocks before the first one wanted
        count = _POPCOUNT[want]
        blocks_at = data_at + k0 * vma.BLOCK_SIZE
        nbytes = count * vma.BLOCK_SIZE
        carried = sums.get(extent)
        if carried is not None:
            data = memoryview(source.pread(blocks_at, nbytes))
        else:
            span = index.sums_extents(blocks) * vma.EXTENT_HEADER_SIZE
            if sums_at - (blocks_at + nbytes) <= NEAR:  # one read covers both
                both = memoryview(source.pread(blocks_at, sums_at + span - blocks_at))
                data, raw = both[:nbytes], both[sums_at - blocks_at:]
            else:
                source.will_need([sums_at], span)
                data = memoryview(source.pread(blocks_at, nbytes))
                raw = memoryview(source.pread(sums_at, span))
            if len(raw) != span:
                return None  # cut off: the whole-cluster read says what is wrong
            carried = vma.null_payloads(raw)
            sums.put(extent, carried)
        if len(data) < nbytes:
            return None
        own = carried[first * index.SUM_SIZE:(first + _POPCOUNT[mask]) * index.SUM_SIZE]
        if index.checksum(own) != rows.checksums[row]:  # type: ignore[index]
            return None
        if index.block_sums(data) != own[k0 * index.SUM_SIZE:(k0 + count) * index.SUM_SIZE]:
            raise self._mismatch(dev_id, rows.clusters[row], data_at)
        if want == (1 << j1) - (1 << j0):  # every block of the read stored: one run
            return data[offset - base - j0 * vma.BLOCK_SIZE:end - base - j0 * vma.BLOCK_SIZE]
        out = bytearray((j1 - j0) * vma.BLOCK_SIZE)
        pos = 0
        for j in range(j0, j1):
            if want >> j & 1:
                at = (j - j0) * vma.BLOCK_SIZE
                out[at:at + vma.BLOCK_SIZE] = data[pos:pos + vma.BLOCK_SIZE]
                pos += vma.BLOCK_SIZE
        start = offset - base - j0 * vma.BLOCK_SIZE
        return memoryview(out)[start:start + end - offset]

    def _fetch_run(self, clusters: list[int], masks: list[int], offsets: list[int],
                   sums: list[int] | None, lays: list[int] | None, i: int, dev_id: int
                   ) -> tuple[int, memoryview, list[memoryview] | None]:
        """Read stored clusters i.. that follow each other on the device and in the stream
        with one pread, and check each one's checksum. Returns the end index, the data, and
        per-cluster views unless every cluster is whole (then the data is the device range)."""
        nbytes = [_POPCOUNT[masks[i]] * vma.BLOCK_SIZE]
        j = i + 1
        while (j < len(clusters) and clusters[j] == clusters[j - 1] + 1
               and offsets[j] == offsets[j - 1] + nbytes[-1]
               and (lays is None or lays[j] == lays[i])):
            nbytes.append(_POPCOUNT[masks[j]] * vma.BLOCK_SIZE)
            j += 1
        first = offsets[i]
        total = sum(nbytes)
        source = self.source if lays is None else self.sources[lays[i]]
        lazy = self._lazy[-1 if lays is None else lays[i]]  # a run is in one extent
        data = (memoryview(source.pread(first, total)) if lazy is None
                else lazy.read(first, total))
        if len(data) != total:
            name = self.device(dev_id).name
            raise problems.error(problems.TRUNCATED, f"cluster {clusters[j - 1]} of "
                                 f"{display(name)} is cut off", device=name,
                                 cluster=clusters[j - 1], offset=first)
        views: list[memoryview] = []
        whole = True
        pos = 0
        check = index.summed_check if self._summed[lays[i] if lays else 0] else index.checksum
        for k in range(i, j):
            stored = data[pos:pos + nbytes[k - i]]
            if sums is not None and check(stored) != sums[k]:
                raise self._mismatch(dev_id, clusters[k], first + pos)
            pos += len(stored)
            mask = masks[k]
            whole = whole and mask == vma.FULL_MASK
            views.append(stored if mask == vma.FULL_MASK
                         else memoryview(vma.expand_blocks(stored, mask)))
        return j, data, None if whole else views

    def iter_stored(self, dev_id: int) -> Iterator[tuple[int, int, memoryview, int | None]]:
        """Every stored cluster of a device in cluster order, as (cluster, mask, stored
        blocks, checksum), each checked. For copying a whole device (merge): worker threads
        read (and decompress) the windows ahead, every layer's rows of a window in as few
        preads as their stream offsets allow (a chain's base is read in long runs even where
        newer layers replace a part); see stored.py."""
        dmap = self._maps[dev_id]
        self.confirm_extents()
        return stored.iter_stored(self.sources, dmap.clusters, dmap.masks,
                                  dmap.all_byte_offsets(), dmap.checksums, dmap.layers,
                                  functools.partial(self._mismatch, dev_id),
                                  self._summed if dmap.checksums is not None else (False,))

    def confirm_extents(self) -> None:
        """Confirm now every data extent a store's archive left to its first read
        (extent_check.py): a reader of whole devices needs them all."""
        for lazy in self._lazy:
            if lazy is not None:
                lazy.confirm_all()

    def _mismatch(self, dev_id: int, cluster: int, offset: int) -> problems.ArchiveError:
        name = self.device(dev_id).name
        return problems.error(problems.CHECKSUM, f"data checksum mismatch in cluster {cluster} "
                              f"of {display(name)} (stream offset {offset})", device=name,
                              cluster=cluster, offset=offset)

    def stream_offset(self, dev_id: int, offset: int) -> int | None:
        """Where the stored 4 KiB block holding device byte OFFSET lies in the (decompressed)
        stream, None if that block is not stored (it reads as zeros): for tools that measure
        the disk under a read (a chain's view: in its layer's stream)."""
        dmap = self._maps[dev_id]
        rows = dmap.rows
        row = rows.find(offset // CLUSTER)
        block = offset % CLUSTER // vma.BLOCK_SIZE
        if row < 0 or not rows.masks[row] >> block & 1:
            return None
        at = dmap.byte_offsets(row, row + 1)[0]
        return at + _POPCOUNT[rows.masks[row] & ((1 << block) - 1)] * vma.BLOCK_SIZE

    def is_hole(self, dev_id: int, offset: int, length: int) -> bool:
        """True if [offset, offset+length) holds no stored data (it reads as zeros)."""
        end = min(offset + length, self._sizes[dev_id])
        if offset >= end:
            return True
        lo, hi = self._span(self._maps[dev_id], offset, end)
        return lo == hi

    def stored_clusters(self, dev_id: int, first: int, last: int) -> np.ndarray:
        """The clusters in [first, last] that hold data (mask non-zero), ascending int64: the
        allocation map a server reports (block status, what to read ahead), from the rows,
        without reading anything. A chain's view gives each cluster's newest row."""
        dmap = self._maps[dev_id]
        first, last = max(first, 0), min(last, _UINT32_MAX)
        if first > last:
            return np.zeros(0, np.int64)
        lo, hi = _rows(dmap, first, last)
        clusters = dmap.clusters[lo:hi]
        return clusters[dmap.masks[lo:hi] != 0].astype(np.int64)

    def stored_bytes(self, dev_id: int) -> int:
        """Bytes of data the archive stores for a device (what `du` of its image shows)."""
        masks = self._maps[dev_id].masks
        return int(vma.POPCOUNT16[masks].sum(dtype=np.int64)) * vma.BLOCK_SIZE

    @staticmethod
    def _span(dmap: _DeviceMap, offset: int, end: int) -> tuple[int, int]:
        """Index range of the stored clusters in device bytes [offset, end)."""
        return _rows(dmap, offset // CLUSTER, (end - 1) // CLUSTER)

    def preload_sums(self, stop: threading.Event) -> None:
        """Load the block sums of a block-summed archive's extents (a chain's newest layers
        first) into the sums cache, up to most of its budget, so that a small read's first
        read of an extent is one disk read, not two: what a mount or an export does in the
        background once it is ready. Stops at STOP, and quietly at any error (the reads that
        need the sums read them)."""
        budget = SUMS_CACHE_BYTES * 3 // 4
        for sums, source in reversed(list(zip(self._sums, self.sources, strict=True))):
            if sums is None or getattr(source, "remote", False) or budget <= 0:
                continue
            try:
                budget -= sums.preload(source, stop, budget)
            except (VmafsError, OSError, ValueError):
                return

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zero_chunks(held: ClusterSet, stored: np.ndarray, chunk: int = 1 << 20
                 ) -> Iterator[np.ndarray]:
    """The clusters an increment holds as zeros (those it has slots for, less the stored
    ones), ascending uint32 pieces of about `chunk` clusters built from the set's runs: the
    content digest hashes them one at a time, never 4 bytes a zero cluster at once."""
    for starts, ends in held.iter_runs():
        # runs longer than a chunk are cut, so every piece stays about chunk long
        lengths = ends - starts
        if (lengths > chunk).any():
            pieces = -(-lengths // chunk)
            first = np.repeat(starts, pieces) + chunk * (
                np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces))
            starts, ends = first, np.minimum(first + chunk, np.repeat(ends, pieces))
            lengths = ends - starts
        total = np.cumsum(lengths)
        cuts = np.searchsorted(total, np.arange(chunk, int(total[-1]), chunk), side="right")
        for group in np.split(np.arange(len(starts)), cuts):
            if not len(group):
                continue
            a, b, n = starts[group], ends[group], lengths[group]
            values = np.arange(int(n.sum()), dtype=np.int64)
            values += np.repeat(a - (np.cumsum(n) - n), n)
            # uint32 keys: an int key would convert the whole column at every step
            lo = int(stored.searchsorted(np.uint32(a[0])))
            hi = len(stored) if b[-1] >= 1 << 32 else int(stored.searchsorted(np.uint32(b[-1])))
            if hi > lo:
                keep = np.ones(len(values), bool)
                keep[np.searchsorted(values, stored[lo:hi].astype(np.int64))] = False
                values = values[keep]
            yield values.astype(np.uint32)


def read_source_header(source: ByteSource) -> tuple[vma.Header, bytes]:
    """The archive header of a stream read at random, and its bytes."""
    prefix = bytes(source.pread(0, vma.HEADER_FIXED_SIZE))
    header_size = vma.header_size_of(prefix)
    rest = bytes(source.pread(vma.HEADER_FIXED_SIZE, header_size - vma.HEADER_FIXED_SIZE))
    if len(rest) != header_size - vma.HEADER_FIXED_SIZE:
        raise problems.error(problems.TRUNCATED, "can't read vma header data")
    return vma.decode_header(prefix + rest), prefix + rest


def _stack_maps(layers: list[Archive], name: str) -> _DeviceMap:
    """One device's rows over a chain: each layer's rows replace the older rows of every
    cluster it has a slot for; rows carry their layer. Offsets become bytes."""
    cols: tuple[np.ndarray, ...] | None = None
    for number, layer in enumerate(layers):
        dev = next(d for d in layer.devices if d.name == name)
        dmap = layer._maps[dev.dev_id]
        if dmap.checksums is None:
            raise problems.error(problems.INDEX, f"{layer.path or layer.uuid}: a chain's "
                                 "archives need their vmafs index (data checksums)")
        new = (dmap.clusters, dmap.masks, dmap.all_byte_offsets(), dmap.checksums,
               np.full(len(dmap.clusters), number, np.uint8))
        held = layer.held(dev.dev_id)
        if cols is None or held is None:
            cols = new
            continue
        keep = ~held.contains_array(cols[0].astype(np.int64))
        cols = tuple(np.concatenate((old[keep], fresh)) for old, fresh in zip(cols, new,
                                                                              strict=True))
    assert cols is not None
    clusters, masks, offsets, sums, lays = cols
    return _DeviceMap(clusters, masks, offsets, sums, None, lays)


def needs_parent(record: chain.ChainRecord | None) -> problems.ArchiveError:
    assert record is not None and record.parent is not None
    parent = record.parent
    return problems.error(problems.MISSING, f"incremental: needs its parent {parent.uuid} "
                          f"(from {format_ctime(parent.ctime)}); vmafs looks for it in the "
                          "same directory, or give it with --base")


def _zeros(n: int) -> bytes | memoryview:
    return ZERO_VIEW[:n] if n <= len(ZEROS) else bytes(n)
