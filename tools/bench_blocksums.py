#!/usr/bin/env python3
"""What block sums (format/index.py) buy a small random read, in-process, against the same
image written without them (issue 17). No FUSE, no NBD: the reader's own cost.

    python3 tools/bench_blocksums.py [--size-gib 2] [--rounds 5] [--reads 400]
                                     [--workdir /var/tmp/vmafs-bench-blocksums] [--tib] [--keep]

One half-data image (64 MiB stripes, as the other benchmarks), written twice: `vmafs create`
(block sums) and the writer without them (every read checks its whole 64 KiB cluster). Each
round measures, interleaved (order alternating), cold random 4 KiB reads in data at the same
offsets: both archives' pages evicted first (POSIX_FADV_DONTNEED, never drop_caches):

  * unsummed:           Archive.read of an archive without sums (64 KiB read + check);
  * summed, sums cached: the extent's sums in the reader's cache (a read near an earlier one):
                        one 4 KiB disk read;
  * summed, sums cold:  the reader's sums cache emptied before each read: the block and the
                        extent's sums (asked for first), two disk reads at once;
  * raw 4 KiB:          one unchecked pread of the block: the floor.

Then the same reads warm (in the page cache). Medians per pass, median over rounds, ratio to
unsummed. Also the archives' sizes (sums overhead) and, with --tib, a 1 TiB sparse disk
(1 GiB of data) both ways: archive and index size, first open (confirming the index, the
sums extents' headers included) and cached open.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_smallreads import write_unsummed
from benchlib import evict, make_half_data_image

from vmafs.archive import reader  # noqa: E402
from vmafs.archive.reader import Archive  # noqa: E402
from vmafs.format import index, vma  # noqa: E402

BLOCK = 4096
CLUSTER = 65536
MiB = 1 << 20
GiB = 1 << 30
STRIPE = 64 * MiB


def data_offsets(archive: Archive, n: int, seed: int) -> list[int]:
    clusters = archive._maps[1].clusters  # noqa: SLF001 - the rows say where data is
    rnd = random.Random(seed)
    return [int(clusters[rnd.randrange(len(clusters))]) * CLUSTER + rnd.randrange(16) * BLOCK
            for _ in range(n)]


def create(image: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", str(out),
                    f"drive-scsi0={image}"], check=True)
    return time.perf_counter() - t


def index_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = index.decode_footer(vma.null_extent_payload(f.read(512)))
    assert footer is not None
    return footer.index_length


def open_times(path: Path) -> tuple[float, float]:
    """(first open: the index confirmed against the stream, cold; an open after it)."""
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "vmafs"
    shutil.rmtree(cache, ignore_errors=True)
    evict(path)
    t = time.perf_counter()
    Archive.open(str(path)).close()
    first = time.perf_counter() - t
    t = time.perf_counter()
    Archive.open(str(path)).close()
    return first, time.perf_counter() - t


def tib(work: Path) -> None:
    image = work / "tib.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 40)
        rnd = random.Random(5)
        for k in range(16):  # 1 GiB of data in 16 places
            f.seek(k * (1 << 36))
            for _ in range(16):
                f.write(rnd.randbytes(4 * MiB))
    new, old = work / "tib.vma", work / "tib-unsummed.vma"
    for p in (new, old):
        p.unlink(missing_ok=True)
    create(image, new)
    write_unsummed(image, old)
    print("1 TiB sparse disk, 1 GiB of data:")
    for name, path in (("summed", new), ("unsummed", old)):
        first, again = open_times(path)
        print(f"  {name:9s} archive {path.stat().st_size / MiB:8.1f} MiB, index "
              f"{index_bytes(path) / 1024:6.0f} KiB, first open {first:.2f} s, "
              f"then {again * 1e3:.0f} ms")
    for p in (image, new, old):
        p.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmafs-bench-blocksums"))
    ap.add_argument("--tib", action="store_true", help="also a 1 TiB sparse disk: open times")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_CACHE_HOME", str(work / "xdg-cache"))
    size = int(args.size_gib * GiB) // MiB * MiB
    image, new, old = work / "image.raw", work / "image.vma", work / "image-unsummed.vma"
    make_half_data_image(image, size, STRIPE)
    if not new.exists():
        create(image, new)
    if not old.exists():
        write_unsummed(image, old)
    print(f"archive sizes: summed {new.stat().st_size} B, unsummed {old.stat().st_size} B: "
          f"+{(new.stat().st_size / old.stat().st_size - 1) * 100:.3f} %")
    summed, unsummed = Archive.open(str(new)), Archive.open(str(old))
    fd = os.open(new, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    dmap = summed._maps[1]  # noqa: SLF001

    def raw(off: int) -> object:
        row = int(dmap.clusters.searchsorted(off // CLUSTER))
        return os.pread(fd, BLOCK, int(dmap.offsets[row]) + off % CLUSTER)

    cache = reader._SUMS_CACHE  # noqa: SLF001 - emptied for "sums cold"

    def cold_sums(off: int) -> object:
        cache.clear()
        return summed.read(1, off, BLOCK)

    paths: dict[str, Callable[[int], object]] = {
        "unsummed (64 KiB+check)": lambda o: unsummed.read(1, o, BLOCK),
        "summed, sums cached": lambda o: summed.read(1, o, BLOCK),
        "summed, sums cold": cold_sums,
        "raw 4 KiB (unchecked)": raw,
    }
    cold: dict[str, list[float]] = {k: [] for k in paths}
    warm: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(args.rounds):
        offs = data_offsets(summed, args.reads, 1000 + r)
        for off in offs:  # the sums of every extent these reads touch, in the cache
            summed.read(1, off, BLOCK)
        names = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in names:
            evict(new)
            evict(old)
            times = []
            for off in offs:
                t = time.perf_counter()
                paths[name](off)
                times.append(time.perf_counter() - t)
            cold[name].append(statistics.median(times) * 1e6)
            t = time.perf_counter()
            for off in offs:  # now warm: the same blocks again
                paths[name](off)
            warm[name].append((time.perf_counter() - t) / len(offs) * 1e6)
    base = statistics.median(cold["unsummed (64 KiB+check)"])
    wbase = statistics.median(warm["unsummed (64 KiB+check)"])
    print(f"{'path':26s} {'cold µs':>8s} {'warm µs':>8s}  (medians of {args.rounds} rounds; "
          "cold per-pass medians [min-max])")
    for name in paths:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        print(f"{name:26s} {c:8.0f} {w:8.1f}  [{min(cold[name]):.0f}-{max(cold[name]):.0f}] "
              f"cold {c / base:.2f}x, warm {w / wbase:.2f}x unsummed")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    summed.close()
    unsummed.close()
    os.close(fd)
    if args.tib:
        tib(work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
