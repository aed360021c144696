"""An index's extents against the stream: the chain they form (pure arithmetic on the index),
and each data extent's header against the slots the index gives it.

locate.confirm_index makes both checks for every extent at open, and checks every data-less
extent between them. A full archive in a store (S3, a URL) is opened with the chain and the
slot rules checked on the index alone: reading every header is a request each (seconds, and
most of the object, for a few GiB). Its data extents are then confirmed lazily (LazyExtents):
before a read returns a cluster, the header of the extent that holds it has been read and
found to list exactly the index's slots. So an index that contradicts the extent headers
(clusters swapped, moved, resized) never makes a store's archive serve one cluster's bytes as
another's, and a mount is ready after the open's two requests.

What a store's archive does not read are the data-less extents between the data extents: a
cluster the index does not list reads as zeros on the index's word (its checksum holds). Only
an index forged with the archive's uuid and a recomputed checksum can leave out a cluster the
stream holds; whoever can do that can as well rewrite data and checksums (README: the checksums
are unkeyed). verify checks everything, from any store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmafs.archive import problems
from vmafs.archive.rules import ClusterRules
from vmafs.archive.walk import Extent, decode_extent
from vmafs.container.source import ByteSource
from vmafs.errors import FormatError
from vmafs.format import index, vma

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

HEAD = vma.EXTENT_HEADER_SIZE


def unusable(why: str, offset: int, kind: str = problems.INDEX) -> problems.ArchiveError:
    """The one error of an index the stream contradicts."""
    return problems.error(kind, f"vmafs index not usable: {why}", offset=offset)


@dataclass
class ExtentChain:
    """Where the index's data extents lie: extent i starts at starts[i] and holds blocks[i]
    blocks and the rows first_row[i]..; gap i (gap_starts[i]..gap_ends[i]) is what lies
    before extent i (the last one: up to the index), data-less extents only."""

    starts: np.ndarray
    blocks: np.ndarray
    first_row: np.ndarray
    gap_starts: np.ndarray
    gap_ends: np.ndarray


def extent_chain(header: vma.Header, table: index.IndexTable, index_offset: int
                 ) -> ExtentChain:
    """The index's extents as a chain from the header to the index, without overlap, each
    gap a whole number of 512-byte extents; else the index is unusable."""
    starts = table.ext_offsets.astype(np.int64)
    counts = table.ext_counts.astype(np.int64)
    first_row = np.cumsum(counts) - counts
    popcounts = vma.POPCOUNT16[table.masks].astype(np.int64)
    blocks = (np.add.reduceat(popcounts, first_row) if len(first_row)
              else np.zeros(0, np.int64))
    ends = starts + HEAD + blocks * vma.BLOCK_SIZE
    gap_starts = np.concatenate(([header.header_size], ends))
    gap_ends = np.concatenate((starts, [index_offset]))
    bad = (gap_ends < gap_starts) | ((gap_ends - gap_starts) % HEAD != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise unusable("the index's extents do not form the archive's extent chain",
                       int(gap_starts[i]))
    return ExtentChain(starts, blocks, first_row, gap_starts, gap_ends)


def check_extent(raw: bytes | memoryview, uuid: bytes, table: index.IndexTable,
                 chain: ExtentChain, i: int) -> Extent:
    """Extent i's header (its 512 bytes RAW): a valid extent of this archive listing exactly
    the index's slots for it, with the block count they need."""
    offset = int(chain.starts[i])
    try:
        ext = decode_extent(raw, uuid, offset)
    except FormatError as exc:
        raise unusable(f"the extent it lists at offset {offset} is not valid ({exc})",
                       offset) from None
    stored = ext.masks != 0
    a = int(chain.first_row[i])
    b = a + int(table.ext_counts[i])
    if (ext.block_count != int(chain.blocks[i])
            or not np.array_equal(ext.dev_ids[stored], table.dev_ids[a:b])
            or not np.array_equal(ext.clusters[stored], table.clusters[a:b])
            or not np.array_equal(ext.masks[stored], table.masks[a:b])):
        raise unusable(f"it does not match the extent header at offset {offset}", offset)
    return ext


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
POOL_THREADS = 4  # header requests in flight beside the data requests they guard


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:  # imported here: a verify or a local open never needs the pool
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="vmafs-extents")
        return _POOL


class LazyExtents:
    """A store's full archive: each data extent confirmed (check_extent) the first time a
    read needs it. Thread-safe: two reads of one new extent may both check it, with the same
    verdict."""

    def __init__(self, source: ByteSource, header: vma.Header, table: index.IndexTable,
                 index_offset: int) -> None:
        self.source = source
        self.uuid = header.uuid
        self.table = table
        self.chain = extent_chain(header, table, index_offset)
        # the index's slots keep every rule: known devices, in range, no mask bit past the
        # end, each cluster once (what needs no request)
        ClusterRules(header).check(table.dev_ids, table.clusters, table.masks,
                                   np.zeros(len(table.dev_ids), np.int64))
        self.done = bytearray(len(self.chain.starts))
        # a seekable zstd file's frame of a stream offset (None: a plain object)
        self.frame_of: Callable[[int], int] | None = getattr(source, "frame_of", None)

    def read(self, offset: int, length: int) -> memoryview:
        """Stream bytes [offset, offset+length) of one extent's data, once that extent is
        confirmed. A read that starts where the extent's data does (a reader in order) takes
        the header in the same request; one whose header is in the same zstd frame reads it
        after the data, from the frame's prefix the data's read decoded; any other asks for
        it beside the data, so it waits for one round trip, not two."""
        i = int(self.chain.starts.searchsorted(offset, side="right")) - 1
        if i < 0 or self.done[i]:
            return memoryview(self.source.pread(offset, length))
        at = int(self.chain.starts[i])
        if at + HEAD == offset:
            both = memoryview(self.source.pread(at, HEAD + length))
            self._check(i, both[:HEAD])
            return both[HEAD:]
        if self.frame_of is not None and self.frame_of(at) == self.frame_of(offset):
            data = memoryview(self.source.pread(offset, length))
            self._confirm(i)  # from the prefix of the frame just decoded for the data
            return data
        confirming = _pool().submit(self._confirm, i)
        data = memoryview(self.source.pread(offset, length))
        confirming.result()
        return data

    def confirm_all(self) -> None:
        """Every data extent (a reader of whole devices needs them all)."""
        for fut in [_pool().submit(self._confirm, i)
                    for i in range(len(self.done)) if not self.done[i]]:
            fut.result()

    def _confirm(self, i: int) -> None:
        self._check(i, self.source.pread(int(self.chain.starts[i]), HEAD))

    def _check(self, i: int, raw: bytes | memoryview) -> None:
        check_extent(raw, self.uuid, self.table, self.chain, i)
        self.done[i] = 1
