"""Reading a VMA stream from start to end, for verify, extract, convert and list.

Works on any input (a pipe, gzip, lzo, one-frame zstd): it only ever reads forward. The rules
themselves are pure: vma.py checks each header, ClusterCheck checks the slots of every extent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from vmafs.errors import FormatError, IncompleteError
from vmafs.format import index, vma


@dataclass(frozen=True)
class StreamExtent:
    offset: int  # stream offset of the extent header
    header: vma.ExtentHeader
    raw_header: bytes
    data: memoryview  # valid until the next extent is read: the buffer is reused


@dataclass(frozen=True)
class StoredCluster:
    """One used slot of an extent, with a view of its stored blocks."""

    dev_id: int
    cluster: int
    mask: int
    offset: int  # stream offset of its first stored block
    data: memoryview


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at end of stream."""
    data = stream.read(n)
    if data is None:
        raise FormatError("input would block")
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_into(stream: BinaryIO, view: memoryview) -> int:
    """Fill view; fewer bytes only at end of stream."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def read_header(stream: BinaryIO) -> vma.Header:
    prefix = read_exact(stream, vma.HEADER_FIXED_SIZE)
    size = vma.header_size_of(prefix)
    rest = read_exact(stream, size - vma.HEADER_FIXED_SIZE)
    if len(rest) != size - vma.HEADER_FIXED_SIZE:
        raise IncompleteError("can't read vma header data")
    return vma.decode_header(prefix + rest)


def iter_extents(stream: BinaryIO, header: vma.Header) -> Iterator[StreamExtent]:
    """Each extent in order; the stream may only end at an extent boundary."""
    offset = header.header_size
    buffer = memoryview(bytearray(vma.MAX_EXTENT_SIZE))
    while True:
        raw = read_exact(stream, vma.EXTENT_HEADER_SIZE)
        if not raw:
            return
        if len(raw) < vma.EXTENT_HEADER_SIZE:
            raise IncompleteError(f"read short extent ({len(raw)} bytes) at offset {offset}")
        try:
            ext = vma.decode_extent_header(raw, header.uuid)
        except FormatError as exc:
            raise FormatError(f"{exc} at offset {offset}") from None
        need = ext.block_count * vma.BLOCK_SIZE
        data = buffer[:need]
        got = read_into(stream, data)
        if got != need:
            raise IncompleteError(
                f"short vma extent ({vma.EXTENT_HEADER_SIZE + got} < "
                f"{vma.EXTENT_HEADER_SIZE + need}) at offset {offset}: archive is truncated"
            )
        yield StreamExtent(offset, ext, raw, data)
        offset += vma.EXTENT_HEADER_SIZE + need


def stored_clusters(ext: StreamExtent) -> Iterator[StoredCluster]:
    """The used slots of an extent with their data; block_count must match the masks exactly."""
    view = ext.data
    pos = 0
    base = ext.offset + vma.EXTENT_HEADER_SIZE
    for dev_id, cluster, mask in ext.header.slots:
        n = int(vma.POPCOUNT16[mask]) * vma.BLOCK_SIZE
        if pos + n > len(view):
            raise FormatError(f"short vma extent - too many blocks at offset {ext.offset}")
        yield StoredCluster(dev_id, cluster, mask, base + pos, view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise FormatError(f"vma extent error - missing blocks at offset {ext.offset}")


class ClusterCheck:
    """Proxmox's per-slot rules plus completeness: every cluster exactly once, in range."""

    def __init__(self, header: vma.Header) -> None:
        self.header = header
        self.devices = {d.dev_id: d for d in header.devices}
        self.seen = {d.dev_id: np.zeros(d.clusters, bool) for d in header.devices}
        self.vmstate_next = 0

    def check(self, slot: StoredCluster) -> None:
        dev = self.devices.get(slot.dev_id)
        if dev is None:
            vmstate = self.header.vmstate
            if vmstate is not None and slot.dev_id == vmstate.dev_id:
                if slot.cluster != self.vmstate_next:
                    raise FormatError("found out of order vmstate data")
                self.vmstate_next += 1
                return
            raise FormatError(f"got wrong dev id {slot.dev_id}")
        seen = self.seen[dev.dev_id]
        if slot.cluster >= len(seen):
            capacity = -(-len(seen) // 64) * 64
            if slot.mask == 0 and slot.cluster < capacity:
                return  # Proxmox accepts zero slots inside its bitmap's rounding
            if slot.mask == 0:
                raise FormatError(f"cluster {slot.cluster} beyond the end of stream {dev.name}")
            raise FormatError("got wrong block address - write beyond end "
                              f"(cluster {slot.cluster} of stream {dev.name})")
        if seen[slot.cluster]:
            raise FormatError(f"found duplicated cluster {slot.cluster} for stream {dev.name}")
        seen[slot.cluster] = True
        if slot.mask & ~vma.end_mask(dev.size, slot.cluster):
            raise FormatError("got wrong block address - write beyond end "
                              f"(cluster {slot.cluster} of stream {dev.name})")

    def missing(self) -> list[str]:
        problems = []
        for dev_id, seen in self.seen.items():
            absent = np.flatnonzero(~seen)
            if len(absent):
                name = self.devices[dev_id].name
                problems.append(f"detected missing cluster {int(absent[0])} for stream {name}"
                                + (f" ({len(absent)} clusters missing)" if len(absent) > 1 else ""))
        return problems


class TrailerCheck:
    """Collects the null extents at the end of a stream and checks our index against the data."""

    def __init__(self) -> None:
        self.index = index.IndexBuilder()
        self.null_run: list[tuple[int, bytes]] = []  # (offset, payload) of trailing null extents
        self.last_offset = 0

    def add_extent(self, ext: StreamExtent, stored: list[StoredCluster]) -> None:
        self.last_offset = ext.offset
        if not ext.header.slots:
            self.null_run.append((ext.offset, vma.null_extent_payload(ext.raw_header)))
            return
        self.null_run = []
        self.index.add_extent(ext.offset, [
            (s.dev_id, s.cluster, s.mask, index.checksum(s.data)) for s in stored if s.mask
        ])

    def verify(self) -> tuple[bool, list[str]]:
        """(has_index, problems): the trailing index must list exactly what the data holds."""
        if not self.null_run:
            return False, []
        footer_offset, footer_payload = self.null_run[-1]
        footer = index.decode_footer(footer_payload)
        if footer is None:
            if any(p.startswith(index.INDEX_MAGIC) for _, p in self.null_run):
                # our index is there but its footer (the last extent) is not: cut short
                return True, ["trailing index has no footer: the archive is truncated"]
            return False, []
        try:
            index.index_extent_span(footer, footer_offset)
            blob = b"".join(p for off, p in self.null_run[:-1] if off >= footer.index_offset)
            table = index.decode_index(index.check_index_blob(blob, footer))
        except FormatError as exc:
            return True, [f"trailing index: {exc}"]
        seen = index.decode_index(self.index.encode())
        for name in ("dev_ids", "clusters", "masks", "offsets"):
            if not np.array_equal(getattr(seen, name), getattr(table, name)):
                return True, [f"trailing index does not match the data ({name} differ)"]
        assert seen.checksums is not None and table.checksums is not None
        bad = np.flatnonzero(seen.checksums != table.checksums)
        return True, [
            f"data checksum mismatch in cluster {int(seen.clusters[i])} of device "
            f"{int(seen.dev_ids[i])} (stream offset {int(seen.offsets[i])})"
            for i in bad[:10]
        ] + ([f"... and {len(bad) - 10} more bad clusters"] if len(bad) > 10 else [])


@dataclass
class ScanResult:
    header: vma.Header
    extents: int = 0
    stored_bytes: int = 0
    stream_bytes: int = 0
    has_index: bool = False
    problems: list[str] = field(default_factory=list)


def scan_stream(
    stream: BinaryIO,
    on_extent: Callable[[list[StoredCluster]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    header: vma.Header | None = None,
) -> ScanResult:
    """Read a whole archive, checking every rule; on_extent sees each extent's checked slots.

    A broken extent raises FormatError (nothing after it can be trusted); missing clusters and
    a trailing index that disagrees with the data are collected in ScanResult.problems.
    Pass the header if it was already read from this stream (stdin cannot be opened twice).
    """
    if header is None:
        header = read_header(stream)
    result = ScanResult(header)
    clusters = ClusterCheck(header)
    trailer = TrailerCheck()
    sizes = {d.dev_id: d.size for d in header.devices}
    end = header.header_size
    for ext in iter_extents(stream, header):
        stored = list(stored_clusters(ext))
        done = 0
        for slot in stored:
            clusters.check(slot)
            size = sizes.get(slot.dev_id)
            if size is not None:
                done += min(vma.CLUSTER_SIZE, size - slot.cluster * vma.CLUSTER_SIZE)
        if on_extent is not None:
            on_extent(stored)
        trailer.add_extent(ext, stored)
        result.extents += 1
        result.stored_bytes += len(ext.data)
        end = ext.offset + vma.EXTENT_HEADER_SIZE + len(ext.data)
        if progress is not None and done:
            progress(done)
    result.stream_bytes = end
    result.problems.extend(clusters.missing())
    result.has_index, index_problems = trailer.verify()
    result.problems.extend(index_problems)
    return result
