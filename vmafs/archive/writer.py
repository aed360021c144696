"""The archive writer: cluster data in any order in, a VMA stream with a trailing index out.

It never seeks and holds at most one extent plus the partially written clusters, so it can feed a
pipe or a compressor. Every cluster is emitted exactly once; clusters never written (or zeroed)
become zero slots at the end, then the index and the footer follow as null extents. Checks are
over block sums (format/index.py), hashed a whole write at a time as it comes (which blocks are
zero is read from them too); a plain archive carries each extent's sums in null extents right
after it, so memory stays one extent's worth.

Which clusters were seen is kept in ClusterSets, not in arrays over whole devices: a 16 TiB sparse
disk (2^28 clusters) costs memory for what was written, and finish() walks the zero slots in
chunks, building their extent headers with numpy (md5 per header is the only per-extent work).
"""

from __future__ import annotations

import functools
import hashlib
import struct
import time
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vmafs.archive import walk_cache
from vmafs.archive.clusterset import ClusterSet
from vmafs.container.zstd_output import Output, PlainOutput
from vmafs.errors import FormatError
from vmafs.format import index, vma
from vmafs.format.names import display

CLUSTER = vma.CLUSTER_SIZE
SLOTS = vma.SLOTS_PER_EXTENT
ZERO_CHUNK = 1 << 18  # zero slots per numpy step in finish(): ~10 MB of temporaries
_ZERO_SUM = index.checksum(bytes(vma.BLOCK_SIZE))  # a zero block's sum
_CLUSTER_SUMS = struct.Struct(f"<{vma.BLOCKS_PER_CLUSTER}I")  # one cluster's block sums


@dataclass(frozen=True)
class DeviceSpec:
    """A device of the archive: its name and size in bytes."""

    name: str
    size: int


class _PartialCluster:
    """A cluster written in pieces; complete once its covered bytes reach its length."""

    __slots__ = ("data", "ranges", "length")

    def __init__(self, length: int) -> None:
        self.data = bytearray(CLUSTER)
        self.ranges: list[tuple[int, int]] = []
        self.length = length

    def add(self, start: int, chunk: bytes | memoryview) -> bool:
        self.data[start:start + len(chunk)] = chunk
        merged = []
        lo, hi = start, start + len(chunk)
        for a, b in self.ranges:
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self.ranges = merged
        return len(merged) == 1 and merged[0] == (0, self.length)


class ArchiveWriter:
    """Turns writes of device data into VMA extents; synchronous, use from one thread."""

    def __init__(
        self,
        out: Output,
        devices: Sequence[DeviceSpec],
        configs: Sequence[tuple[str, bytes]] = (),
        *,
        uuid: bytes | None = None,
        ctime: int | None = None,
        extent_bytes: int | None = None,
        progress: Callable[[int], None] | None = None,
        incremental: Collection[int] = (),
        block_sums: bool = True,
        carry_sums: bool | None = None,
    ) -> None:
        self.out = out
        # block_sums False: data checksums, as vmafs wrote before block sums. The sums are
        # carried only where a small read can read a few blocks: not inside zstd frames.
        self.block_sums = block_sums
        self.carry_sums = block_sums and (isinstance(out, PlainOutput) if carry_sums is None
                                          else carry_sums)
        # Devices (ids) of an incremental archive whose clusters never written get no slot:
        # they are the parent's. Others (all, in a full archive) get zero slots.
        self.incremental = frozenset(incremental)
        self.devices = list(devices)
        self.uuid = uuid if uuid is not None else uuidlib.uuid4().bytes
        self.ctime = int(time.time()) if ctime is None else ctime
        limit = extent_bytes or out.extent_bytes
        self._extent_blocks = max(vma.BLOCKS_PER_CLUSTER,
                                  min(limit // vma.BLOCK_SIZE,
                                      vma.SLOTS_PER_EXTENT * vma.BLOCKS_PER_CLUSTER))
        self._progress = progress
        self._raw_header = header = vma.encode_header(self.uuid, self.ctime,
                                   [(d.name, d.size) for d in self.devices], configs)
        # of the header as every reader decodes it, for the footer (format/index.py)
        self._header_digest = vma.header_digest(vma.decode_header(header))
        # touched: written, zeroed or begun (a second write of any is a duplicate); zeroed: by
        # write_zeroes. Zero slots at the end: the untouched and the zeroed clusters. Whole
        # clusters written (the hot path) touch only one set.
        self._touched = [ClusterSet(-(-d.size // CLUSTER)) for d in self.devices]
        self._zeroed = [ClusterSet(-(-d.size // CLUSTER)) for d in self.devices]
        self._zero_template = _zero_extent_template(self.uuid)
        self._partial: dict[tuple[int, int], _PartialCluster] = {}
        self._slots: list[tuple[int, int, int]] = []
        self._chunks: list[bytes | memoryview] = []
        self._sums: list[memoryview | None] = []  # each chunk's block sums, if known
        self._stored: list[tuple[int, int, int, int]] = []  # check 0 until flushed (sums)
        self._blocks = 0
        self._index = index.IndexBuilder()
        self.position = 0  # bytes of stream emitted so far
        self.finished = False
        self._emit(header)
        # A frame of its own (zstd): opening decompresses only the header, and damaged data
        # never keeps an archive from opening, whatever the frame size.
        self.out.end_frame()

    # --- input ----------------------------------------------------------------------------------

    def write(self, dev_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Device bytes at offset; whole clusters go straight out, pieces wait for the rest.

        The writer keeps a reference to data until its extent is written (no copy on the hot
        path): hand over a buffer and do not change it afterwards.
        """
        size = self._check_range(dev_id, offset, len(data))
        view = memoryview(data).cast("B")
        first_full, last_full = _whole_clusters(offset, offset + len(view), size)
        if first_full >= last_full:
            self._write_pieces(dev_id, offset, view)
            return
        head = first_full * CLUSTER - offset
        tail_start = min(last_full * CLUSTER, size) - offset
        if head:
            self._write_pieces(dev_id, offset, view[:head])
        self._write_clusters(dev_id, first_full, view[head:tail_start], size)
        if tail_start < len(view):
            self._write_pieces(dev_id, offset + tail_start, view[tail_start:])

    def write_zeroes(self, dev_id: int, offset: int, length: int) -> None:
        """Zeros cost nothing now: whole clusters become zero slots at finish()."""
        size = self._check_range(dev_id, offset, length)
        end = offset + length
        first, last = _whole_clusters(offset, end, size)
        if first >= last:
            self._write_pieces(dev_id, offset, memoryview(bytes(length)))
            return
        self._claim(dev_id, first, last)
        self._zeroed[dev_id - 1].add_range(first, last)
        self._report(min(last * CLUSTER, size) - first * CLUSTER)
        if offset < first * CLUSTER:
            self._write_pieces(dev_id, offset, memoryview(bytes(first * CLUSTER - offset)))
        if last * CLUSTER < end:
            self._write_pieces(dev_id, last * CLUSTER, memoryview(bytes(end - last * CLUSTER)))

    def write_stored(self, dev_id: int, cluster: int, mask: int, payload: bytes | memoryview,
                     check: int | None) -> None:
        """A cluster as an archive stores it: its non-zero blocks (mask) and their data
        checksum if known (None: worked out here), already checked by the caller (a merge
        copies clusters without expanding them). In a block-summed archive the check is
        worked out from the blocks' sums."""
        size = self._check_range(dev_id, cluster * CLUSTER, 0)
        if not self._touched[dev_id - 1].add(cluster):
            self._duplicate(dev_id, cluster)
        self._mask(dev_id, cluster, mask)
        self._add_stored(dev_id, cluster, mask, payload, min(CLUSTER, size - cluster * CLUSTER),
                         check)

    def finish(self) -> None:
        """Emit the rest: pieces, zero slots for every cluster not yet emitted, index, footer."""
        if self.finished:
            raise RuntimeError("archive already finished")
        for (dev_id, cluster), part in sorted(self._partial.items()):
            self._add_cluster(dev_id, cluster, memoryview(part.data)[:part.length], part.length)
        self._partial.clear()
        for dev_id, touched in enumerate(self._touched, start=1):
            if dev_id in self.incremental:
                self._add_zero_clusters(
                    dev_id, self._zeroed[dev_id - 1].iter_present(ZERO_CHUNK))
                continue
            untouched = touched.missing_count()
            if untouched:
                last = touched.limit - 1
                tail = touched.limit * CLUSTER - self.devices[dev_id - 1].size
                self._report(untouched * CLUSTER - (0 if last in touched else tail))
            self._add_zero_clusters(dev_id, self._zero_slots(dev_id))
        self._flush_extent()
        if not self.devices:
            self._emit(vma.encode_extent_header(self.uuid, [], 0))  # like vma create
        blob = self._index.encode()
        self.out.end_frame()
        index_offset = self.position
        self._emit(vma.encode_null_extents(self.uuid, blob))
        self.out.end_frame()
        footer = index.Footer(index_offset, len(blob), index.checksum(blob), self._header_digest,
                              self.block_sums, self.carry_sums)
        self._emit(vma.encode_null_extents(self.uuid, index.encode_footer(footer)))
        self.finished = True
        if not self.incremental:  # what opening it would check holds by construction
            self.out.on_commit = functools.partial(
                walk_cache.remember_written, self._raw_header + index.encode_footer(footer))

    # --- internals ------------------------------------------------------------------------------

    def _check_range(self, dev_id: int, offset: int, length: int) -> int:
        if self.finished:
            raise RuntimeError("archive already finished")
        if not 1 <= dev_id <= len(self.devices):
            raise FormatError(f"unknown device id {dev_id}")
        size = self.devices[dev_id - 1].size
        if offset < 0 or length < 0 or offset + length > size:
            raise FormatError(f"write of {length} bytes at {offset} is outside device "
                              f"{self.devices[dev_id - 1].name} ({size} bytes)")
        return size

    def _duplicate(self, dev_id: int, cluster: int) -> None:
        raise FormatError(f"cluster {cluster} of {self.devices[dev_id - 1].name} written twice")

    def _claim(self, dev_id: int, first: int, last: int) -> None:
        """Mark clusters [first, last) touched; any touched before is a duplicate."""
        touched = self._touched[dev_id - 1]
        if last - first == 1:  # one cluster (QEMU's backup job writes 64 KiB): one step
            if not touched.add(first):
                self._duplicate(dev_id, first)
            return
        dup = touched.first_present(first, last)
        if dup is not None:
            self._duplicate(dev_id, dup)
        touched.add_range(first, last)

    def _write_clusters(self, dev_id: int, first: int, view: memoryview, size: int) -> None:
        """Whole clusters (the last may be the device's short tail): their masks from the block
        sums the archive stores anyway (one C pass over the data, not two)."""
        count = -(-len(view) // CLUSTER)
        self._claim(dev_id, first, first + count)
        if len(view) % CLUSTER:
            padded = bytearray(count * CLUSTER)
            padded[:len(view)] = view
            view = memoryview(padded)
        block_sums = index.block_sums(view)
        if count == 1:  # an incremental's scattered copies: no arrays to slice
            if _ZERO_SUM not in _CLUSTER_SUMS.unpack(block_sums):  # no block can be zero
                mask, one_sums = vma.FULL_MASK, memoryview(block_sums)
            else:
                masks, kept, _ = _masks_and_sums(view, block_sums)
                mask, one_sums = int(masks[0]), kept.data
            mask = self._mask(dev_id, first, mask)
            blocks = view if mask == vma.FULL_MASK else vma.stored_blocks(view, mask)
            self._add_stored(dev_id, first, mask, blocks, min(CLUSTER, size - first * CLUSTER),
                             sums=one_sums)
            return
        masks, sums, starts = _masks_and_sums(view, block_sums)
        compact: np.ndarray | None = None
        if not (masks == vma.FULL_MASK).all():
            bits = (masks[:, None] >> np.arange(16, dtype=np.uint16)) & 1
            compact = np.frombuffer(view, np.uint8).reshape(-1, vma.BLOCK_SIZE)[
                bits.ravel().astype(bool)]
        for i in range(count):
            cluster = first + i
            length = min(CLUSTER, size - cluster * CLUSTER)
            mask = self._mask(dev_id, cluster, int(masks[i]))
            if compact is None:
                payload: bytes | memoryview = view[i * CLUSTER:(i + 1) * CLUSTER]
            else:
                stored = compact[starts[i]:starts[i + 1]]
                # an empty (zero-cluster) slice cannot be cast: numpy gives it a 0 in its shape
                payload = stored.data.cast("B") if len(stored) else b""
            self._add_stored(dev_id, cluster, mask, payload, length,
                             sums=sums[starts[i]:starts[i + 1]].data)

    def _write_pieces(self, dev_id: int, offset: int, view: memoryview) -> None:
        size = self.devices[dev_id - 1].size
        touched = self._touched[dev_id - 1]
        pos = 0
        while pos < len(view):
            cluster, start = divmod(offset + pos, CLUSTER)
            n = min(CLUSTER - start, len(view) - pos)
            key = (dev_id, cluster)
            part = self._partial.get(key)
            if part is None:
                if not touched.add(cluster):
                    self._duplicate(dev_id, cluster)
                part = self._partial[key] = _PartialCluster(min(CLUSTER, size - cluster * CLUSTER))
            if part.add(start, view[pos:pos + n]):
                del self._partial[key]
                self._add_cluster(dev_id, cluster, memoryview(part.data)[:part.length], part.length)
            pos += n

    def _add_cluster(self, dev_id: int, cluster: int, data: memoryview, length: int) -> None:
        full = bytes(data).ljust(CLUSTER, b"\0")
        mask = self._mask(dev_id, cluster, int(vma.cluster_masks(full)[0]))
        self._add_stored(dev_id, cluster, mask, vma.stored_blocks(full, mask), length)

    def _mask(self, dev_id: int, cluster: int, mask: int) -> int:
        """A cluster's mask, if VMA can store it: data in a block that starts in the partial
        last sector of a device whose size is not a multiple of 512 cannot be (vma.end_mask),
        and is refused rather than dropped. (Past the size itself the data is zero padding.)"""
        dev = self.devices[dev_id - 1]
        if (cluster + 1) * CLUSTER >= dev.size and mask & ~vma.end_mask(dev.size, cluster):
            raise FormatError(f"device {display(dev.name)}: data in its last partial sector "
                              f"(size {dev.size} is not a multiple of 512), which VMA cannot "
                              "store: Proxmox's reader counts whole sectors")
        return mask

    def _add_stored(self, dev_id: int, cluster: int, mask: int,
                    payload: bytes | memoryview, length: int, check: int | None = None,
                    sums: memoryview | None = None) -> None:
        """`sums`: the block sums of payload, if known (else worked out at _flush_extent)."""
        nblocks = len(payload) // vma.BLOCK_SIZE
        if len(self._slots) == vma.SLOTS_PER_EXTENT or self._blocks + nblocks > self._extent_blocks:
            self._flush_extent()
        self._slots.append((dev_id, cluster, mask))
        if mask:
            self._chunks.append(payload)
            self._sums.append(sums)
            if self.block_sums:
                check = 0  # from the extent's block sums, at _flush_extent
            elif check is None:
                check = index.checksum(payload)
            self._stored.append((dev_id, cluster, mask, check))
            self._blocks += nblocks
        self._report(length)

    def _zero_slots(self, dev_id: int) -> Iterator[np.ndarray]:
        """The clusters that go out as zero slots, ascending, in chunks of at most ZERO_CHUNK:
        never touched, or zeroed (the two are disjoint)."""
        touched, zeroed = self._touched[dev_id - 1], self._zeroed[dev_id - 1]
        if not len(zeroed):
            yield from touched.iter_missing(ZERO_CHUNK)
            return
        for lo in range(0, touched.limit, ZERO_CHUNK):
            hi = min(lo + ZERO_CHUNK, touched.limit)
            parts = [*touched.iter_missing(ZERO_CHUNK, lo, hi),
                     *zeroed.iter_present(ZERO_CHUNK, lo, hi)]
            if len(parts) > 1:
                yield np.sort(np.concatenate(parts))
            elif parts:
                yield parts[0]

    def _add_zero_clusters(self, dev_id: int, chunks: Iterator[np.ndarray]) -> None:
        """Zero slots for clusters in ascending chunks: first they fill the open extent (if
        any), then go out in 59-slot extents, the last one short (a 16 TiB empty disk is 4.5 M
        extents). The grouping runs across chunks, as if all came at once."""
        fill = SLOTS - len(self._slots) if self._slots else 0
        carry = np.zeros(0, np.int64)
        for chunk in chunks:
            if fill:
                head, chunk = chunk[:fill], chunk[fill:]
                self._slots.extend((dev_id, c, 0) for c in head.tolist())
                fill -= len(head)
                if fill:
                    continue
                self._flush_extent()
            if len(carry):
                chunk = np.concatenate((carry, chunk))
            whole = len(chunk) - len(chunk) % SLOTS
            self._emit_zero_extents(dev_id, chunk[:whole])
            carry = chunk[whole:]
        if fill and len(self._slots) > SLOTS - fill:
            self._flush_extent()  # fewer zero slots than the open extent had room for
        self._emit_zero_extents(dev_id, carry)

    def _emit_zero_extents(self, dev_id: int, clusters: np.ndarray) -> None:
        """Extent headers of zero slots only, 59 a header (the last padded with empty slots):
        built as one numpy array, sealed by an md5 each, each written as one extent."""
        count = -(-len(clusters) // SLOTS)
        if not count:
            return
        infos = np.zeros(count * SLOTS, ">u8")
        infos[:len(clusters)] = (np.uint64(dev_id) << np.uint64(32)) | clusters.astype(np.uint64)
        heads = np.empty((count, vma.EXTENT_HEADER_SIZE), np.uint8)
        heads[:, :_SLOTS_AT] = self._zero_template
        heads[:, _SLOTS_AT:] = infos.view(np.uint8).reshape(count, -1)
        flat = heads.data.cast("B")
        md5 = hashlib.md5
        size = vma.EXTENT_HEADER_SIZE
        digests = b"".join([md5(flat[at:at + size]).digest()
                            for at in range(0, count * size, size)])
        heads[:, _MD5_AT:_SLOTS_AT] = np.frombuffer(digests, np.uint8).reshape(count, 16)
        data = heads.tobytes()
        del heads, flat
        # one write per extent, as before: a zstd output cuts frames only between writes
        write = self.out.write
        for at in range(0, len(data), size):
            write(data[at:at + size])
        self.position += len(data)

    def _flush_extent(self) -> None:
        if not self._slots:
            return
        head = vma.encode_extent_header(self.uuid, self._slots, self._blocks)
        parts = [head, *self._chunks]
        if self.block_sums and self._blocks:
            known = self._sums
            sums = (b"".join(known) if None not in known  # type: ignore[arg-type]
                    else index.block_sums(*self._chunks))
            ends = np.cumsum([vma.POPCOUNT16_LIST[mask] * index.SUM_SIZE
                              for _, _, mask, _ in self._stored])
            checks = np.frombuffer(index.checks(sums, ends), "<u4").tolist()  # one call
            self._stored = [(dev_id, cluster, mask, check) for (dev_id, cluster, mask, _), check
                            in zip(self._stored, checks, strict=True)]
            if self.carry_sums:
                parts.append(vma.encode_null_extents(self.uuid, sums))
        self._index.add_extent(self.position, self._stored)
        # an output that takes the pieces as they are saves joining them (a copy of every byte)
        write_parts = getattr(self.out, "write_parts", None)
        if write_parts is not None:
            self.position += write_parts(parts)
        else:
            self._emit(b"".join(parts))
        self._slots, self._chunks, self._stored, self._blocks = [], [], [], 0
        self._sums = []

    def _report(self, nbytes: int) -> None:
        if self._progress and nbytes:
            self._progress(nbytes)

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.position += len(data)


_MD5_AT, _SLOTS_AT = 24, 40  # where an extent header's md5 and slots begin


def _masks_and_sums(view: memoryview, block_sums: bytes
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole clusters' block masks (vma.cluster_masks's), the sums of their non-zero blocks in
    order, and where each cluster's sums start (one more entry: the end), from the block sums
    of VIEW: a block is zero if its sum is a zero block's and its bytes are all zero (looked at
    for those blocks alone, so a sum that collides never drops data)."""
    sums = np.frombuffer(block_sums, "<u4").reshape(-1, vma.BLOCKS_PER_CLUSTER)
    zero = sums == _ZERO_SUM
    if zero.any():
        at = np.flatnonzero(zero)
        words = np.frombuffer(view, np.uint64).reshape(-1, vma.BLOCK_SIZE // 8)
        zero.flat[at[words[at].any(axis=1)]] = False
        kept = sums[~zero]
    else:
        kept = sums.ravel()
    masks = np.packbits(~zero, axis=1, bitorder="little").view("<u2").ravel()
    starts = np.zeros(len(masks) + 1, np.int64)
    np.cumsum(vma.POPCOUNT16[masks], out=starts[1:])
    return masks, kept, starts


def _zero_extent_template(uuid: bytes) -> np.ndarray:
    """The first 40 bytes of every zero-slot extent header (md5 still zero)."""
    head = np.frombuffer(vma.seal_extent(uuid, 0, bytes(SLOTS * 8)), np.uint8)[:_SLOTS_AT].copy()
    head[_MD5_AT:_SLOTS_AT] = 0
    return head


def _whole_clusters(offset: int, end: int, size: int) -> tuple[int, int]:
    """[first, last) clusters that [offset, end) covers whole; the device's short tail counts."""
    last = -(-size // CLUSTER) if end == size else end // CLUSTER
    return -(-offset // CLUSTER), last
