"""What the benchmarks in tools/ share: evicting files from the page cache one by one (others
benchmark on the same machine: never drop_caches), the half-data test image, timing a command."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from pathlib import Path

MiB = 1 << 20


def parse_size(text: str) -> int:
    """A size as the benchmarks take it: 4G, 512M, 1.5T, or bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    unit = text[-1].upper()
    return int(float(text[:-1]) * units[unit]) if unit in units else int(text)


def s3_bench_bucket(prefix: str, memory: int) -> tuple[object | None, object, str]:
    """A fresh bucket to measure in: on $AWS_ENDPOINT_URL if set, else on a throwaway Ceph
    RADOS Gateway (tests/rgw.py) given MEMORY bytes, started here; (gateway or None, boto3
    client, bucket). The caller stops the gateway."""
    import boto3

    gw = None
    if "AWS_ENDPOINT_URL" not in os.environ:
        import rgw

        gw = rgw.Gateway(memory=memory).start()
        os.environ.update(gw.env())
    client = boto3.client("s3")
    bucket = f"{prefix}{random.randrange(1 << 30)}"
    client.create_bucket(Bucket=bucket)
    return gw, client, bucket


def evict(*paths: Path | str) -> None:
    """Drop these files' pages from the page cache (a FUSE file's too); others' stay warm.
    Dirty pages are written first: the kernel drops clean ones only."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # a read-only mount may refuse a sync
                os.fdatasync(fd)
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


def make_front_half_image(path: Path, size: int) -> None:
    """First half pseudo-random, second half a hole (the live-backup benchmarks' disk)."""
    import numpy as np

    rnd = np.random.default_rng(42)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(0, size // 2, 64 * MiB):
            f.write(rnd.integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes())
        os.fsync(f.fileno())


def timed(argv: list[str], tree: str | None = None, *, quiet: bool = False
          ) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, its threads included) of one command; with
    tree, run from there with PYTHONPATH=tree (`python -m vmafs` of that tree)."""
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=tree, env=env,
                            stdout=subprocess.DEVNULL if quiet else None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(argv)} exited {code}")
    return wall, usage.ru_utime + usage.ru_stime
