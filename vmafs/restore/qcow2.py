"""A fresh qcow2 image laid out for a disk whose stored clusters are known in advance (pure:
numbers in, bytes out, no I/O).

Why: `restore` (qcow2 is its default format) wrote each image through `qemu-img convert`
reading the archive's NBD export: every byte went through the export's socket and a second
process. The archive's index already says which clusters hold data, and qcow2's 64 KiB
clusters are VMA's, so the image is written here in one pass, as a raw image is: the
metadata first, then each stored cluster by the copy engine at its place in the file.

The layout (qcow2 version 3, 16-bit refcounts, no backing file, no snapshots): the header
in cluster 0, then the L1 table, the refcount table, the refcount blocks, the L2 tables of
the parts of the disk that hold data, then the data clusters in disk order, each referenced
once (refcount 1, QCOW_OFLAG_COPIED). What the archive has as holes is unallocated (reads as
zeros). `qemu-img check` finds it clean (tests/test_restore.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4                               # 16-bit refcounts, qemu's default
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
COPIED = 1 << 63                                 # refcount 1: written in place
MAGIC = 0x514649FB                               # "QFI\xfb"
HEADER_LENGTH = 104                              # version 3's fixed header
_HEADER = struct.Struct(">IIQIIQIIQQIIQQQQII")
SECTOR = 512
L2_BATCH = 64                                    # L2 tables made at once (4 MiB)


def _clusters_for(nbytes: int) -> int:
    return -(-nbytes // CLUSTER)


@dataclass(frozen=True)
class Layout:
    """Where everything of one image goes, in host clusters."""

    size: int                # the disk's size in bytes
    clusters: np.ndarray     # the disk's clusters that hold data, ascending (int64)
    l1_size: int             # L1 entries
    l1_at: int               # host cluster of the L1 table
    refcount_table_at: int
    refcount_table_clusters: int
    refcount_blocks_at: int
    refcount_blocks: int
    l2_at: int               # host cluster of the first L2 table
    l2_tables: np.ndarray    # the L1 indexes that have an L2 table, ascending (int64)
    data_at: int             # host cluster of the first data cluster
    host_clusters: int       # the file's size in clusters

    def file_size(self) -> int:
        return self.host_clusters * CLUSTER

    def data_offset(self, rank: int) -> int:
        """File offset of the rank-th stored cluster (in disk order)."""
        return (self.data_at + rank) * CLUSTER


def layout(size: int, clusters: np.ndarray) -> Layout:
    """The image of a disk of `size` bytes whose clusters `clusters` (ascending) hold data."""
    clusters = np.asarray(clusters, dtype=np.int64)
    if len(clusters) and (clusters[0] < 0 or clusters[-1] * CLUSTER >= size
                          or np.any(np.diff(clusters) <= 0)):
        raise ValueError("stored clusters must be ascending and inside the disk")
    l1_size = _clusters_for(size) and -(-_clusters_for(size) // L2_ENTRIES)
    l1_clusters = max(1, _clusters_for(l1_size * 8))
    l2_tables = np.unique(clusters // L2_ENTRIES)
    fixed = 1 + l1_clusters + len(l2_tables) + len(clusters)
    blocks, table = 1, 1
    while True:  # the refcounts cover themselves too: grow until they do
        total = fixed + table + blocks
        need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
        need_table = max(1, _clusters_for(need_blocks * 8))
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = max(blocks, need_blocks), max(table, need_table)
    l1_at = 1
    refcount_table_at = l1_at + l1_clusters
    refcount_blocks_at = refcount_table_at + table
    l2_at = refcount_blocks_at + blocks
    data_at = l2_at + len(l2_tables)
    return Layout(size, clusters, l1_size, l1_at, refcount_table_at, table,
                  refcount_blocks_at, blocks, l2_at, l2_tables, data_at,
                  data_at + len(clusters))


def header(lay: Layout) -> bytes:
    """The header cluster's bytes: the fixed header and the end of its (no) extensions. The
    size is rounded up to whole sectors, as `qemu-img create` does (QEMU drops a partial last
    sector of a qcow2 image's size)."""
    fields = _HEADER.pack(
        MAGIC, 3, 0, 0, CLUSTER_BITS, -(-lay.size // SECTOR) * SECTOR, 0, lay.l1_size,
        lay.l1_at * CLUSTER, lay.refcount_table_at * CLUSTER, lay.refcount_table_clusters, 0, 0,
        0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
    return fields + bytes(8)  # header extension type 0: the end


def metadata(lay: Layout) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) of everything but the data, a few MiB at a time at most."""
    yield 0, header(lay)
    l1 = np.zeros(lay.l1_size, ">u8")
    l1[lay.l2_tables] = ((lay.l2_at + np.arange(len(lay.l2_tables), dtype=np.uint64))
                         * CLUSTER) | np.uint64(COPIED)
    yield lay.l1_at * CLUSTER, l1.tobytes()
    table = ((lay.refcount_blocks_at + np.arange(lay.refcount_blocks, dtype=np.uint64))
             * CLUSTER).astype(">u8")
    yield lay.refcount_table_at * CLUSTER, table.tobytes()
    for first in range(0, lay.refcount_blocks, L2_BATCH):  # every host cluster: refcount 1
        count = min(L2_BATCH, lay.refcount_blocks - first)
        covered = np.arange(first * REFCOUNTS_PER_BLOCK,
                            (first + count) * REFCOUNTS_PER_BLOCK) < lay.host_clusters
        yield ((lay.refcount_blocks_at + first) * CLUSTER,
               covered.astype(">u2").tobytes())
    ranks = np.arange(len(lay.clusters), dtype=np.uint64)
    bounds = np.searchsorted(lay.clusters, lay.l2_tables * L2_ENTRIES)
    for first in range(0, len(lay.l2_tables), L2_BATCH):
        tables = lay.l2_tables[first:first + L2_BATCH]
        l2 = np.zeros((len(tables), L2_ENTRIES), ">u8")
        lo = int(bounds[first])
        hi = int(bounds[first + len(tables)]) if first + len(tables) < len(bounds) \
            else len(lay.clusters)
        rows = np.searchsorted(tables, lay.clusters[lo:hi] // L2_ENTRIES)
        l2[rows, lay.clusters[lo:hi] % L2_ENTRIES] = \
            ((lay.data_at + ranks[lo:hi]) * CLUSTER) | np.uint64(COPIED)
        yield (lay.l2_at + first) * CLUSTER, l2.tobytes()
