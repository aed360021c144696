#!/usr/bin/env python3
"""Benchmark `vmafs create/extract/verify` against qemu-img, zstd and cat in the same run.

Image: SIZE bytes (default 4 GiB), alternating 64 MiB of random data and 64 MiB holes.
Prints each timing with its baseline and the ratio the archive issue asks for, then the peak RSS
of create/extract/verify on a large sparse disk. Usage: tools/bench_archive.py [--size 4G] [--dir D]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import parse_size

STRIPE = 64 << 20


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, 2 * STRIPE):
            f.seek(start)
            for _ in range(0, min(STRIPE, size - start), 8 << 20):
                f.write(os.urandom(8 << 20))


def timed(cmd: list[str], *, runs: int = 3, cleanup: str | None = None, **kw: object) -> float:
    """Best of `runs` wall times; each run starts with no dirty pages left by earlier steps."""
    best = float("inf")
    for _ in range(runs):
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cleanup)
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS of one child process (run alone, so RUSAGE_CHILDREN's max is its own)."""
    code = ("import resource,subprocess,sys;subprocess.run(sys.argv[1:],check=True,"
            "stdout=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--sparse-size", default="64G", help="sparse disk for the RSS check")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="vmafs-bench-", dir=args.dir or "/var/tmp")
    vmafs = [sys.executable, "-m", "vmafs"]
    gb = size / 2 / 1e9  # stored (random) data in GB
    try:
        img = os.path.join(work, "disk.raw")
        make_image(img, size)
        subprocess.run(["sync"], check=True)
        rows = []

        def row(what: str, ours: float, base: float, base_name: str, goal: float) -> None:
            ratio = base / ours
            rows.append(f"{what:34} {ours:7.2f}s  {base_name:28} {base:7.2f}s  "
                        f"ratio {ratio:4.2f}x (goal >= {goal}x) {'ok' if ratio >= goal else 'LOW'}")
            print(rows[-1], flush=True)

        copy = os.path.join(work, "copy.raw")
        # -t writeback: flushed at the end, as vmafs does (qemu-img's default "unsafe" skips it)
        t_qemu = timed(["qemu-img", "convert", "-t", "writeback", "-O", "raw", img, copy],
                       cleanup=copy)
        t_unsafe = timed(["qemu-img", "convert", "-O", "raw", img, copy], cleanup=copy)
        os.unlink(copy)
        print(f"qemu-img convert -O raw: {t_qemu:.2f}s flushed (-t writeback), "
              f"{t_unsafe:.2f}s unflushed (its default -t unsafe)")
        t_create = timed(vmafs + ["create", "-q", "-o", os.path.join(work, "a.vma"),
                                  f"drive-scsi0={img}"], cleanup=os.path.join(work, "a.vma"))
        row("create .vma", t_create, t_qemu, "qemu-img convert (flushed)", 0.8)

        t_zstd = timed(["zstd", "-q", "-f", "-T2", "-3", img, "-o", os.path.join(work, "z.zst")])
        t_createz = timed(vmafs + ["create", "-q", "-o", os.path.join(work, "a.vma.zst"),
                                   f"drive-scsi0={img}"], cleanup=os.path.join(work, "a.vma.zst"))
        zsize = os.path.getsize(os.path.join(work, "z.zst"))
        vsize = os.path.getsize(os.path.join(work, "a.vma.zst"))
        row("create .vma.zst", t_createz, t_zstd, "zstd -T2 -3", 1.0)
        print(f"{'':34} size: ours {vsize / 1e6:.1f} MB, zstd {zsize / 1e6:.1f} MB, "
              f"ratio {vsize / zsize:.3f}")

        out = os.path.join(work, "x")
        t_extract = timed(vmafs + ["extract", "-q", os.path.join(work, "a.vma"), out], cleanup=out)
        row("extract .vma", t_extract, t_qemu, "qemu-img convert (flushed)", 0.8)
        t_extractz = timed(vmafs + ["extract", "-q", os.path.join(work, "a.vma.zst"), out],
                           cleanup=out)
        row("extract .vma.zst", t_extractz, t_qemu, "qemu-img convert (flushed)", 0.0)
        shutil.rmtree(out)

        subprocess.run(["cat", os.path.join(work, "a.vma")], stdout=subprocess.DEVNULL,
                       check=True)  # warm the page cache
        t_cat = timed(["cat", os.path.join(work, "a.vma")], stdout=subprocess.DEVNULL)
        t_verify = timed(vmafs + ["verify", "-q", os.path.join(work, "a.vma")],
                         stdout=subprocess.DEVNULL)
        print(f"{'verify .vma (page cache)':34} {t_verify:7.2f}s  {gb / t_verify:.2f} GB/s of "
              f"stored data (goal >= 1 GB/s); cat of the archive {gb / t_cat:.2f} GB/s")

        sparse = os.path.join(work, "sparse.raw")
        with open(sparse, "wb") as f:
            f.truncate(parse_size(args.sparse_size))
            f.write(os.urandom(1 << 20))
        arch = os.path.join(work, "sparse.vma")
        r1 = peak_rss_mib(vmafs + ["create", "-q", "-o", arch, f"drive-scsi0={sparse}"])
        r2 = peak_rss_mib(vmafs + ["verify", "-q", arch])
        r3 = peak_rss_mib(vmafs + ["extract", "-q", arch, os.path.join(work, "sx")])
        print(f"peak RSS, {args.sparse_size} sparse disk: create {r1:.0f} MiB, verify {r2:.0f} "
              f"MiB, extract {r3:.0f} MiB (goal < 256 MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
