"""An extent streamed from a store is written from its columns (copier.extent_runs, what
extract's write-behind does with a remote or piped archive): the same files as write_extent
writes from one object a slot, whatever the slots (partly stored clusters, gaps, several
devices, one not extracted, a device ending inside its last cluster). Writes around the page
cache (copier.DirectFds) put the same bytes where buffered writes do, whatever the memory's
and the file's alignment."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from vmafs.archive.copier import DIRECT_ALIGN, DirectFds, WriteBehind, write_extent
from vmafs.archive.scan import stored_clusters
from vmafs.archive.walk import Extent
from vmafs.format import vma


def _extent(rnd: random.Random, next_cluster: dict[int, int]) -> tuple[Extent, memoryview]:
    dev_ids, clusters, masks = [], [], []
    for _ in range(rnd.randrange(1, vma.SLOTS_PER_EXTENT + 1)):
        dev = rnd.choice((1, 2, 3))
        next_cluster[dev] += rnd.choice((1, 1, 1, 1, 1, 1, 2, 5))
        if next_cluster[dev] > 200:  # each cluster once, as the rules have it
            continue
        mask = rnd.choice((vma.FULL_MASK, vma.FULL_MASK, 0, rnd.randrange(1, 1 << 16)))
        dev_ids.append(dev)
        clusters.append(next_cluster[dev])
        masks.append(mask)
    blocks = sum(vma.POPCOUNT16_LIST[m] for m in masks)
    data = memoryview(rnd.randbytes(blocks * vma.BLOCK_SIZE))
    return Extent(0, blocks, np.array(dev_ids, np.uint8), np.array(clusters, np.uint32),
                  np.array(masks, np.uint16), bytes(512)), data


@pytest.mark.parametrize("seed", range(6))
def test_an_extent_from_its_columns_writes_what_its_slots_do(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    # device 2 ends inside its cluster 200 (the last one), device 3 is not extracted
    sizes = {1: 201 * vma.CLUSTER_SIZE, 2: 200 * vma.CLUSTER_SIZE + 3 * vma.BLOCK_SIZE + 100}
    files: dict[str, dict[int, int]] = {}
    for side in ("slots", "columns"):
        files[side] = {}
        for dev, size in sizes.items():
            fd = os.open(tmp_path / f"{side}-{dev}", os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, size)
            files[side][dev] = fd
    behind = WriteBehind(files["columns"], sizes)
    try:
        written = 0
        next_cluster = {1: -1, 2: 150, 3: -1}
        for _ in range(6):
            ext, data = _extent(rnd, next_cluster)
            written += write_extent(files["slots"], list(stored_clusters(ext, data)), sizes)
            behind.put_extent(ext, data)
        behind.finish()
        assert written == behind._written
    finally:
        behind.close()
        for fds in files.values():
            for fd in fds.values():
                os.close(fd)
    for dev in sizes:
        got = (tmp_path / f"columns-{dev}").read_bytes()
        assert got == (tmp_path / f"slots-{dev}").read_bytes()


def _aligned(data: bytes, skew: int) -> memoryview:
    """data in memory that starts `skew` bytes past a page."""
    raw = np.empty(len(data) + 2 * DIRECT_ALIGN, np.uint8)
    at = -raw.ctypes.data % DIRECT_ALIGN + skew
    raw[at:at + len(data)] = np.frombuffer(data, np.uint8)
    return memoryview(raw.data[at:at + len(data)]).cast("B")


def test_direct_writes_put_what_buffered_writes_do(tmp_path: Path) -> None:
    rnd = random.Random(7)
    size = 40 * DIRECT_ALIGN + 1234  # a file ending inside a page
    jobs: list[tuple[list[tuple[int, int]], int]] = [  # (views: (length, skew)), offset)
        ([(8 * DIRECT_ALIGN, 0)], 0),                         # aligned memory
        ([(4 * DIRECT_ALIGN, 16)], 8 * DIRECT_ALIGN),          # not: buffered
        ([(DIRECT_ALIGN, 0), (2 * DIRECT_ALIGN, 100), (DIRECT_ALIGN, 0)], 12 * DIRECT_ALIGN),
        ([(3 * DIRECT_ALIGN + 5, 0), (DIRECT_ALIGN, 0)], 20 * DIRECT_ALIGN),  # a view ends
        # inside a page: what follows is written buffered
        ([(7 * DIRECT_ALIGN, 0)], 30 * DIRECT_ALIGN + 512),   # an unaligned offset
        ([(2 * DIRECT_ALIGN + 1234, 8)], 38 * DIRECT_ALIGN),  # the file's tail
    ]
    want = bytearray(size)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        with DirectFds([fd]) as direct:
            assert fd in direct.direct  # ext4 or the like: O_DIRECT taken
            for views, offset in jobs:
                datas = [rnd.randbytes(n) for n, _ in views]
                direct.pwritev(fd, [_aligned(d, skew) for d, (_, skew)
                                    in zip(datas, views, strict=True)], offset)
                joined = b"".join(datas)
                want[offset:offset + len(joined)] = joined
        assert os.pread(fd, size + 1, 0) == bytes(want)
    finally:
        os.close(fd)


def test_no_direct_writes_on_tmpfs() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    fd = os.open("/dev/shm", os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        with DirectFds([fd]) as direct:  # its data lives in the page cache anyway
            assert not direct.direct
            direct.pwritev(fd, [memoryview(b"x" * DIRECT_ALIGN)], 0)
        assert os.pread(fd, 10, 0) == b"x" * 10
    finally:
        os.close(fd)
