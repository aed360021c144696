"""Every stored cluster of one device, in cluster order, read ahead by worker threads: the
source of merge (and of a chain's extract and whole reads). Planning is numpy, reading
(`pread`, and zstd decompression inside a compressed layer's pread) runs in a small thread
pool, so it overlaps the consumer (the archive writer) and uses the second core; every
layer's reads of the windows ahead are issued together. (No WILLNEED hints: each layer is
read in order, which the kernel's own readahead follows; hints only cost syscalls.)

What the caller sees is exactly the one-thread reader's: the same clusters, each checked
against its checksum, and the same first error (a read's errors are raised when its window
is reached, reads in the order that reader made them, then mismatches in cluster order).
Memory is bounded: reads in flight never pass AHEAD_BYTES beyond the window being yielded.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vmafs.archive import problems
from vmafs.container.source import ByteSource
from vmafs.format import index, vma

WINDOW = 256           # stored clusters (up to 16 MiB) yielded per window
GAP = 1 << 20          # stream bytes one read takes in rather than seek over
SPAN = 16 << 20        # longest single read
AHEAD_BYTES = 96 << 20  # bytes of reads in flight ahead of the window being yielded
PLAN_WINDOWS = 64      # windows planned at once (bounded temporaries for a 1 TiB disk)
THREADS = 2            # readers: zstandard and pread release the GIL

Mismatch = Callable[[int, int], problems.ArchiveError]
"""(cluster, stream offset) -> the checksum error to raise."""


@dataclass(frozen=True, slots=True)
class _Read:
    """One pread of a layer: [first, first + length), holding rows (window-relative)."""

    layer: int
    first: int
    length: int
    rows: list[int]
    at: list[int]      # each row's offset into the read
    sizes: list[int]   # each row's stored bytes


def _plan(lo: int, hi: int, layers: np.ndarray, offsets: np.ndarray,
          nbytes: np.ndarray) -> list[list[_Read]]:
    """The reads of the windows of rows [lo, hi) (lo a window's start), window by window:
    per layer (ascending), its rows by stream offset, runs less than GAP apart read together,
    a run cut where it passes SPAN (counted from the layer's first row in the window).
    A few numpy passes over all the windows at once: per window and layer they cost more
    than the reads."""
    n = hi - lo
    win = np.arange(n) // WINDOW
    order = np.lexsort((offsets[lo:hi], layers[lo:hi], win))  # stable: as one sort per layer
    w, lay = win[order], layers[lo:hi][order]
    starts = offsets[lo:hi][order].astype(np.int64)
    sizes = nbytes[lo:hi][order]
    ends = starts + sizes
    new = np.ones(n, bool)  # a (window, layer) begins
    new[1:] = (w[1:] != w[:-1]) | (lay[1:] != lay[:-1])
    base = starts[np.maximum.accumulate(np.where(new, np.arange(n), 0))]
    cut = new.copy()
    cut[1:] |= ((starts[1:] - ends[:-1] > GAP)
                | ((ends[1:] - base[1:]) // SPAN != (ends[:-1] - base[1:]) // SPAN))
    heads = np.flatnonzero(cut)
    tails = np.append(heads[1:], n)
    firsts = starts[heads]
    group = np.cumsum(cut) - 1
    rows = (order - w * WINDOW).tolist()
    at = (starts - firsts[group]).tolist()
    sizes_l = sizes.tolist()
    plans: list[list[_Read]] = [[] for _ in range(int(win[-1]) + 1)]
    for a, b, first, last, window, layer in zip(heads.tolist(), tails.tolist(), firsts.tolist(),
                                                ends[tails - 1].tolist(), w[heads].tolist(),
                                                lay[heads].tolist(), strict=True):
        plans[window].append(_Read(layer, first, last - first, rows[a:b], at[a:b],
                                   sizes_l[a:b]))
    return plans


def _fetch(sources: Sequence[ByteSource], reads: list[_Read]) -> list[memoryview]:
    """Run in a worker: a window's reads in order (a zstd layer's through pread_stream, which
    keeps its frames apart from its cache); the first short one raises. Nothing else: the
    worker spends its time where the GIL is released (pread, zstd)."""
    got = []
    for read in reads:
        source = sources[read.layer]
        pread = getattr(source, "pread_stream", source.pread)
        data = memoryview(pread(read.first, read.length))
        if len(data) != read.length:
            raise problems.error(problems.TRUNCATED, "a cluster is cut off at stream "
                                 f"offset {read.first}", offset=read.first)
        got.append(data)
    return got


def iter_stored(sources: Sequence[ByteSource], clusters: np.ndarray, masks: np.ndarray,
                offsets: np.ndarray, checksums: np.ndarray | None, layers: np.ndarray | None,
                mismatch: Mismatch, summed: Sequence[bool] = (False,)
                ) -> Iterator[tuple[int, int, memoryview, int | None]]:
    """(cluster, mask, stored blocks, data checksum) of every row, in row (cluster) order,
    each checked the way its layer's index checks (`summed[layer]`: the checksum of its
    blocks' sums, and then no data checksum is given: None).

    `offsets` are byte offsets into `sources[layers[row]]` (layer 0 when `layers` is None);
    `checksums` None: nothing to compare (a walked archive), the checksum is still given.
    """
    count = len(clusters)
    if not count:
        return
    nbytes = vma.POPCOUNT16[masks].astype(np.int64) * vma.BLOCK_SIZE
    lays = layers if layers is not None else np.zeros(count, np.uint8)
    windows = range(0, count, WINDOW)
    pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="vmafs-read")
    queued: list[tuple[int, list[_Read], concurrent.futures.Future[list[memoryview]]]] = []
    ahead = 0  # bytes of reads queued for windows after the one being yielded
    nxt = 0    # the next window to queue
    plans: list[list[_Read]] = []  # of windows nxt..

    def fill() -> None:
        nonlocal ahead, nxt, plans
        while nxt < len(windows) and (len(queued) < 2 or ahead < AHEAD_BYTES):
            lo = windows[nxt]
            if not plans:
                plans = _plan(lo, min(lo + PLAN_WINDOWS * WINDOW, count), lays, offsets,
                              nbytes)
            reads = plans.pop(0)
            queued.append((lo, reads, pool.submit(_fetch, sources, reads)))
            ahead += sum(r.length for r in reads)
            nxt += 1

    try:
        fill()
        while queued:
            lo, reads, future = queued.pop(0)
            ahead -= sum(r.length for r in reads)
            hi = min(lo + WINDOW, count)
            got: list[memoryview | None] = [None] * (hi - lo)
            for read, buf in zip(reads, future.result(), strict=True):
                for row, at, n in zip(read.rows, read.at, read.sizes, strict=True):
                    got[row] = buf[at:at + n]
            del reads, future
            fill()  # the next reads start before this window is handed out
            expected = (checksums[lo:hi].tolist() if checksums is not None
                        else [None] * (hi - lo))
            window = zip(got, clusters[lo:hi].tolist(), masks[lo:hi].tolist(), expected,
                         lays[lo:hi].tolist(), strict=True)
            for k, (data, cluster, mask, want, layer) in enumerate(window):
                assert data is not None
                if summed[layer]:
                    if index.summed_check(data) != want:
                        raise mismatch(cluster, int(offsets[lo + k]))
                    yield cluster, mask, data, None
                    continue
                check = index.checksum(data)
                if want is not None and check != want:
                    raise mismatch(cluster, int(offsets[lo + k]))
                yield cluster, mask, data, check
    finally:
        for _, _, future in queued:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
