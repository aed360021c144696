#!/usr/bin/env python3
"""Choose the seekable-zstd frame size: random 4 KiB read latency vs ratio vs throughput.

Builds a VMA-like stream (512-byte extent headers, then 64 KiB clusters whose 4 KiB
blocks are half random, half text-like or zero), writes it with SeekableZstdOutput
for each frame size, and measures

* compression throughput and ratio (2 threads, level 3), against ``zstd -T2 -3``
  of the same stream, run in the same process for a fair comparison;
* random 4 KiB reads with the frame cache off (each read decompresses one frame);
* sequential 128 KiB reads through the cache (what a FUSE reader does).

Figures (256 MiB, 2000 reads; 2 cores shared with other jobs, load ~5, so CPU time
is the steadier column; whole-stream ``zstd -T2 -3`` ratio 1.6622):

    frame   ratio  vs zstd  4K read CPU mean/p50/p99 ms  comp MB/CPU-s  seq MB/CPU-s
    256Ki  1.6335  -1.73%   0.20 / 0.18 / 0.54             322            1005
    512Ki  1.6482  -0.84%   0.41 / 0.38 / 1.04             231             898
      1Mi  1.6576  -0.28%   0.85 / 0.80 / 1.88             258             712
      2Mi  1.6637  +0.09%   1.87 / 1.76 / 3.76             205             785
      4Mi  1.6666  +0.27%   3.60 / 3.37 / 6.79             169             643

512 KiB was the default until tools/bench_size.py measured real file system images against
vzdump's one-stream pipeline (then 3 MiB, 2 MiB; now 1.5 MiB at level 4: see DEFAULT_FRAME_SIZE
and bench_size's curve, the one benchmark of size, create speed and cold reads); this synthetic
stream isolates the CPU costs.  The CPU column above understates a cold read through the mount:
the frame must first come off the disk, at 0.4-1 GB/s on this VM.  With 1 MiB frames a
random 4 KiB read through `vmafs mount` took 1.4-1.8 ms (goal <= 1.5 ms), with 512 KiB
1.0-1.3 ms (the reader decompresses only the frame's prefix up to the read), for 0.6% of
ratio on mixed data and +0.05% of size on random data.  Frames are only as small as the
extents the writer hands over, so the writer cuts extents at the frame size.

Usage: python tools/bench_zstd.py [--size MIB] [--reads N] [--sizes 256,512,1024,...]
                                  [--decoders]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmafs.container.zstd_output import SeekableZstdOutput  # noqa: E402
from vmafs.container.zstd_source import SeekableZstdSource  # noqa: E402

CLUSTER = 65536
BLOCK = 4096


def make_words(rng: np.random.Generator) -> np.ndarray:
    """A vocabulary of 4096 8-byte "words" (letters, then spaces or a newline)."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    words = np.full((4096, 8), ord(" "), dtype=np.uint8)
    lengths = rng.integers(2, 8, size=4096)
    for i, n in enumerate(lengths):
        words[i, :n] = letters[np.minimum(rng.geometric(0.18, size=n) - 1, 25)]
    words[rng.random(4096) < 0.05, 7] = ord("\n")
    return words


def make_stream(size: int, seed: int) -> list[bytes]:
    """Extents of one cluster each: header + 16 blocks, ~50% random, ~40% text, ~10% zero."""
    rng = np.random.default_rng(seed)
    words = make_words(rng)
    zipf = 1.0 / np.arange(1, 4097)
    zipf /= zipf.sum()
    extents = []
    total = 0
    kind = 0
    left = 0
    while total < size:
        blocks = []
        for _ in range(CLUSTER // BLOCK):
            if left == 0:  # runs of 1-64 blocks of one kind, like files on a disk
                kind = int(rng.choice(3, p=[0.5, 0.4, 0.1]))
                left = int(rng.integers(1, 65))
            left -= 1
            if kind == 0:
                blocks.append(rng.bytes(BLOCK))
            elif kind == 1:
                idx = rng.choice(4096, size=BLOCK // 8, p=zipf)
                blocks.append(words[idx].tobytes())
            else:
                blocks.append(bytes(BLOCK))
        header = b"VMAE" + rng.bytes(28) + bytes(480)
        extent = header + b"".join(blocks)
        extents.append(extent)
        total += len(extent)
    return extents


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


def bench_frame_size(
    extents: list[bytes], frame_size: int, reads: int, tmp: Path, seed: int
) -> dict[str, float]:
    """Wall-clock and CPU figures (CPU time is what counts on a busy shared machine)."""
    path = tmp / f"f{frame_size}.vma.zst"
    raw = sum(len(e) for e in extents)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(path, "wb") as f:
        out = SeekableZstdOutput(f, frame_size=frame_size, threads=2, level=3)
        for extent in extents:
            out.write(extent)
        out.close()
    t_comp, c_comp = time.perf_counter() - t0, time.process_time() - c0
    comp = path.stat().st_size

    rng = random.Random(seed)
    wall, cpu = [], []
    with SeekableZstdSource(path, cache_bytes=0) as src:
        nblocks = src.size // BLOCK
        for _ in range(reads):
            off = rng.randrange(nblocks) * BLOCK
            t, c = time.perf_counter(), time.thread_time()
            src.pread(off, BLOCK)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        frames = src.num_frames
    with SeekableZstdSource(path, cache_bytes=64 << 20) as src:
        c = time.thread_time()
        for off in range(0, src.size, 128 << 10):
            src.pread(off, 128 << 10)
        c_seq = time.thread_time() - c
    return {
        "frames": frames,
        "ratio": raw / comp,
        "comp_wall_mbs": raw / t_comp / 1e6,
        "comp_cpu_mbs": raw / c_comp / 1e6,
        "rand_cpu_mean_ms": statistics.fmean(cpu) * 1e3,
        "rand_cpu_p50_ms": _pct(cpu, 0.5) * 1e3,
        "rand_cpu_p99_ms": _pct(cpu, 0.99) * 1e3,
        "rand_wall_p50_ms": _pct(wall, 0.5) * 1e3,
        "seq_cpu_mbs": raw / c_seq / 1e6,
    }


def bench_decoders(plain: Path) -> None:
    """open_stream throughput per container, next to the command-line decompressor."""
    from vmafs.container.streams import open_stream

    raw = plain.stat().st_size
    for ext, comp, decomp in [
        ("zst", ["zstd", "-q", "-T2", "-3", "-c"], ["zstd", "-q", "-d", "-c"]),
        ("gz", ["gzip", "-1", "-c"], ["gzip", "-d", "-c"]),
        ("lzo", ["lzop", "-c"], ["lzop", "-d", "-c"]),
    ]:
        path = plain.with_suffix(".vma." + ext)
        with open(plain, "rb") as src, open(path, "wb") as dst:
            subprocess.run(comp, stdin=src, stdout=dst, check=True)
        t = time.perf_counter()
        with open(path, "rb") as src:
            subprocess.run(decomp, stdin=src, stdout=subprocess.DEVNULL, check=True)
        t_cli = time.perf_counter() - t
        t = time.perf_counter()
        with open_stream(path) as f:
            while f.read(1 << 20):
                pass
        t_py = time.perf_counter() - t
        print(
            f"open_stream .{ext:<3}: {raw / t_py / 1e6:6.0f} MB/s   "
            f"({' '.join(decomp)}: {raw / t_cli / 1e6:.0f} MB/s)"
        )
        path.unlink()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="stream size in MiB")
    parser.add_argument("--reads", type=int, default=2000, help="random 4 KiB reads per size")
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="frame sizes in KiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--decoders", action="store_true", help="also time open_stream for zst, gz and lzo"
    )
    args = parser.parse_args()

    t = time.perf_counter()
    extents = make_stream(args.size << 20, args.seed)
    raw = sum(len(e) for e in extents)
    print(
        f"stream: {raw / 2**20:.0f} MiB in {len(extents)} one-cluster extents "
        f"(built in {time.perf_counter() - t:.1f} s); load average {os.getloadavg()[0]:.1f}"
    )

    # In RAM if possible: measure the CPU cost, not this machine's disk.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench_zstd.", dir=shm) as d:
        tmp = Path(d)
        plain = tmp / "stream.vma"
        with open(plain, "wb") as f:
            for e in extents:
                f.write(e)
        t, c = time.perf_counter(), _children_cpu()
        ref = subprocess.run(
            ["zstd", "-q", "-T2", "-3", "-c", str(plain)], capture_output=True, check=True
        ).stdout
        t_ref, c_ref = time.perf_counter() - t, _children_cpu() - c
        ref_ratio = raw / len(ref)
        print(
            f"zstd -T2 -3 of the whole stream: ratio {ref_ratio:.4f}, "
            f"{raw / t_ref / 1e6:.0f} MB/s wall, {raw / c_ref / 1e6:.0f} MB/s per CPU-second"
        )
        del ref
        if args.decoders:
            bench_decoders(plain)
        plain.unlink()
        print()
        print(
            f"{'frame':>7} {'frames':>6} {'ratio':>7} {'vs zstd':>8} "
            f"{'comp MB/s':>9} {'(per CPU-s)':>11} "
            f"{'4K read CPU mean':>16} {'p50':>6} {'p99':>6} {'wall p50':>8} "
            f"{'seq MB/CPU-s':>12}"
        )
        for kib in (int(s) for s in args.sizes.split(",")):
            r = bench_frame_size(extents, kib << 10, args.reads, tmp, args.seed)
            print(
                f"{kib:>5}Ki {r['frames']:>6.0f} {r['ratio']:>7.4f} "
                f"{(r['ratio'] / ref_ratio - 1) * 100:>+7.2f}% "
                f"{r['comp_wall_mbs']:>9.0f} {r['comp_cpu_mbs']:>11.0f} "
                f"{r['rand_cpu_mean_ms']:>14.3f}ms {r['rand_cpu_p50_ms']:>6.3f} "
                f"{r['rand_cpu_p99_ms']:>6.3f} {r['rand_wall_p50_ms']:>8.3f} "
                f"{r['seq_cpu_mbs']:>12.0f}"
            )
            os.unlink(tmp / f"f{kib << 10}.vma.zst")


if __name__ == "__main__":
    main()
