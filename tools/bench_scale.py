#!/usr/bin/env python3
"""Benchmark a real sparse disk of terabytes (default 16 TiB) through vmafs, each step in a fresh
process: time and peak RSS (wait4's ru_maxrss) of create, verify, extract and mount, the data
compared at the end; then the writer alone (finish() of a 16 TiB sparse device into a null
output, in this process).

The sparse file needs a filesystem that holds it: ext4 stops 4 KiB short of 16 TiB, so the disk
and the extracted image go to /dev/shm when --dir cannot (only the data regions use memory).
Usage: tools/bench_scale.py [--size 16T] [--dir D] [--archive NAME] [--writer-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from archive_helpers import MemOutput  # noqa: E402
from benchlib import parse_size  # noqa: E402
from test_scale import DATA_AT, RSS_LIMIT, round_trip  # noqa: E402

from vmafs.archive.writer import ArchiveWriter, DeviceSpec  # noqa: E402

MiB = 1 << 20


class NullOutput(MemOutput):
    """Counts the stream, keeps nothing: the writer's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> int:
        self.count += len(chunk)
        return len(chunk)


def bench_writer(size: int) -> None:
    out = NullOutput()
    cpu0 = time.process_time()
    start = time.perf_counter()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], uuid=bytes(16), ctime=0)
    for offset in DATA_AT:
        if offset + 2 * MiB <= size:
            writer.write(1, offset, os.urandom(2 * MiB))
    mid = time.perf_counter()
    writer.finish()
    end = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"writer: {size / (1 << 40):g} TiB sparse, writes {mid - start:.2f} s, finish "
          f"{end - mid:.2f} s ({time.process_time() - cpu0:.2f} s CPU), {out.count / MiB:.0f} MiB "
          f"of stream, peak RSS {rss / MiB:.0f} MiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="16T", help="disk size (default 16T)")
    p.add_argument("--dir", default=None, help="where the archive goes (default: a temp dir)")
    p.add_argument("--archive", default="disk.vma.zst", help="archive name: .vma or .vma.zst")
    p.add_argument("--writer-only", action="store_true", help="only the in-process writer")
    args = p.parse_args()
    size = parse_size(args.size)
    bench_writer(size)
    if args.writer_only:
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-scale-") as tmp:
        start = time.perf_counter()
        runs = round_trip(Path(tmp), size, args.archive)
        archive = Path(tmp) / args.archive
        print(f"round trip of {size / (1 << 40):g} TiB via {args.archive} "
              f"({archive.stat().st_size / MiB:.0f} MiB): {time.perf_counter() - start:.1f} s")
        for name, run in runs.items():
            flag = "" if run.maxrss < RSS_LIMIT else "  OVER 256 MiB"
            print(f"  {name:8} {run.seconds:8.1f} s  peak RSS {run.maxrss / MiB:6.0f} MiB{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
