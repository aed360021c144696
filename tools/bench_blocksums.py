#!/usr/bin/env python3
"""What finer checksums would buy a small random read (issue 17), measured before any format
change: a 4 KiB read of an indexed archive today reads and hashes its whole 64 KiB cluster.

    python3 tools/bench_blocksums.py ARCHIVE.vma [--rounds 5] [--reads 400]

Builds, beside a plain archive, what a new index version would carry (a 32-bit XXH3 of every
stored 4 KiB block, in index row order, in 4 KiB "sum pages" of 1024 sums, each page checked by
a 32-bit sum kept in memory with the index) in a side file on the same file system, then
measures cold random 4 KiB reads in data (both files evicted with POSIX_FADV_DONTNEED before
each pass, one after the other, the same offsets), every read checked:

  * today:      Archive.read (the whole cluster read, its checksum checked);
  * serial:     the 4 KiB block, then its sum page (a lazily loaded table, cold);
  * parallel:   the sum page asked for first (POSIX_FADV_WILLNEED), then both read: the two
                disk reads overlap;
  * ..., sum page cold: each read's sum page evicted first (a disk far larger than the part
                read: every read needs a page of sums from disk);
  * resident:   the sums already in memory (a small disk, or pages read before);
  * raw 4 KiB:  one unchecked 4 KiB pread of the archive: the floor.

Also prints the warm cost of each path, the CPU cost of hashing 16 x 4 KiB vs 64 KiB, and what
the table costs at 1 TiB of stored data (bytes on disk, bytes loaded at open).
Assumes full clusters (what `vmafs create` of a random image writes); partial clusters would
index their sums by the popcount of the mask bits below the block.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import evict

from vmafs.archive.reader import Archive  # noqa: E402

BLOCK = 4096
CLUSTER = 65536
PER_CLUSTER = CLUSTER // BLOCK
PAGE = 4096
SUMS_PER_PAGE = PAGE // 4
TIB = 1 << 40


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


class BlockSums:
    """The prototype read path: a 4 KiB block checked against its own sum."""

    def __init__(self, archive: Archive, path: Path, sums_path: Path) -> None:
        dmap = archive._maps[1]  # noqa: SLF001 - a prototype of the model's own read path
        if not (dmap.masks == 0xFFFF).all():
            raise SystemExit("bench_blocksums: needs an archive of full clusters")
        self.clusters = dmap.clusters
        self.offsets = dmap.all_byte_offsets().astype(np.int64)
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        if not sums_path.exists():
            self._build(sums_path)
        self.sfd = os.open(sums_path, os.O_RDONLY)
        os.posix_fadvise(self.sfd, 0, 0, os.POSIX_FADV_RANDOM)
        table = np.fromfile(sums_path, "<u4")
        pages = table.view(np.uint8).reshape(-1, PAGE)
        self.page_sums = [checksum(p.tobytes()) for p in pages]  # in memory with the index
        self.resident = table                           # the "resident" variant
        self.cache: dict[int, np.ndarray] = {}

    def _build(self, sums_path: Path) -> None:
        n = len(self.clusters)
        sums = np.zeros(-(-n * PER_CLUSTER // SUMS_PER_PAGE) * SUMS_PER_PAGE, "<u4")
        for row in range(n):
            data = os.pread(self.fd, CLUSTER, int(self.offsets[row]))
            mv = memoryview(data)
            sums[row * PER_CLUSTER:(row + 1) * PER_CLUSTER] = [
                checksum(mv[b * BLOCK:(b + 1) * BLOCK]) for b in range(PER_CLUSTER)]
        sums.tofile(sums_path)

    def _locate(self, offset: int) -> tuple[int, int]:
        row = int(self.clusters.searchsorted(np.uint32(offset // CLUSTER)))
        block = (offset % CLUSTER) // BLOCK
        return row * PER_CLUSTER + block, int(self.offsets[row]) + block * BLOCK

    def forget(self, offset: int) -> None:
        """Evict the sum page a read used: a disk much larger than the reads' reach."""
        page = self._locate(offset)[0] // SUMS_PER_PAGE
        os.posix_fadvise(self.sfd, page * PAGE, PAGE, os.POSIX_FADV_DONTNEED)

    def read(self, offset: int, *, parallel: bool, resident: bool = False) -> bytes:
        index, at = self._locate(offset)
        page = index // SUMS_PER_PAGE
        if resident:
            want = int(self.resident[index])
        else:
            if parallel:
                os.posix_fadvise(self.sfd, page * PAGE, PAGE, os.POSIX_FADV_WILLNEED)
            data = os.pread(self.fd, BLOCK, at)
            raw = os.pread(self.sfd, PAGE, page * PAGE)
            if checksum(raw) != self.page_sums[page]:
                raise ValueError("sum page damaged")
            want = int.from_bytes(raw[(index % SUMS_PER_PAGE) * 4:][:4], "little")
            if checksum(data) != want:
                raise ValueError("block damaged")
            return data
        data = os.pread(self.fd, BLOCK, at)
        if checksum(data) != want:
            raise ValueError("block damaged")
        return data


def data_offsets(archive: Archive, n: int, seed: int) -> list[int]:
    clusters = archive._maps[1].clusters  # noqa: SLF001
    rnd = random.Random(seed)
    return [int(clusters[rnd.randrange(len(clusters))]) * CLUSTER + rnd.randrange(16) * BLOCK
            for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=400)
    args = ap.parse_args()
    path: Path = args.archive
    sums_path = path.with_name(path.name + ".blocksums")
    archive = Archive.open(str(path))
    proto = BlockSums(archive, path, sums_path)
    raw_fd = proto.fd
    paths: dict[str, Callable[[int], object]] = {
        "today (64 KiB + check)": lambda o: archive.read(1, o, BLOCK),
        "block sums, serial": lambda o: proto.read(o, parallel=False),
        "block sums, parallel": lambda o: proto.read(o, parallel=True),
        "serial, sum page cold": lambda o: proto.read(o, parallel=False),
        "parallel, sum page cold": lambda o: proto.read(o, parallel=True),
        "block sums, resident": lambda o: proto.read(o, parallel=False, resident=True),
        "raw 4 KiB (unchecked)": lambda o: os.pread(raw_fd, BLOCK, proto._locate(o)[1]),
    }
    cold: dict[str, list[float]] = {k: [] for k in paths}
    warm: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(args.rounds):
        names = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in names:
            offs = data_offsets(archive, args.reads, 1000 + r)
            evict(path)
            evict(sums_path)
            times = []
            for off in offs:
                if "page cold" in name:
                    proto.forget(off)
                t = time.perf_counter()
                paths[name](off)
                times.append(time.perf_counter() - t)
            cold[name].append(statistics.median(times) * 1e6)
            t = time.perf_counter()
            for off in offs:  # now warm: the same blocks again
                paths[name](off)
            warm[name].append((time.perf_counter() - t) / len(offs) * 1e6)
    print(f"{'path':26s} {'cold µs':>8s} {'warm µs':>8s}  (medians of {args.rounds} rounds; "
          "cold per-pass medians [min-max])")
    base = statistics.median(cold["today (64 KiB + check)"])
    for name in paths:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        print(f"{name:26s} {c:8.0f} {w:8.1f}  [{min(cold[name]):.0f}-{max(cold[name]):.0f}] "
              f"{c / base:.2f}x today")
    buf = os.urandom(CLUSTER)
    mv = memoryview(buf)
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        checksum(buf)
    one = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        blocks = [mv[b * BLOCK:(b + 1) * BLOCK] for b in range(PER_CLUSTER)]
        for block in blocks:
            checksum(block)
    sixteen = (time.perf_counter() - t) / n * 1e6
    print(f"hash a 64 KiB cluster: {one:.2f} µs whole, {sixteen:.2f} µs as 16 blocks "
          f"(+{(sixteen - one) * 16384 / 1e6:.3f} s per GiB written, one core)")
    clusters = TIB // CLUSTER
    print(f"at 1 TiB stored: today's index ~{clusters * 11 / 2**20:.0f} MiB (11 B a cluster); "
          f"block sums {clusters * PER_CLUSTER * 4 / 2**20:.0f} MiB on disk (0.1 % of data, "
          f"read lazily, a 4 KiB page per 4 MiB of data); page sums loaded at open "
          f"{clusters * PER_CLUSTER // SUMS_PER_PAGE * 4 / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
