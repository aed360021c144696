"""What the benchmarks in tools/ share: evicting files from the page cache one by one (others
benchmark on the same machine: never drop_caches), and the half-data test image."""

from __future__ import annotations

import os
import random
from pathlib import Path

MiB = 1 << 20


def evict(*paths: Path | str) -> None:
    """Drop these files' pages from the page cache (a FUSE file's too); others' stay warm."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_half_data_image(path: Path, size: int, stripe: int) -> None:
    """Half random data, half holes, in alternating stripes (kept if already there)."""
    if path.exists() and path.stat().st_size == size:
        return
    rnd = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, 2 * stripe):
            for off in range(start, min(start + stripe, size), 4 * MiB):
                f.seek(off)
                f.write(rnd.randbytes(min(4 * MiB, start + stripe - off, size - off)))
