#!/usr/bin/env python3
"""Benchmark `vmafs restore --live` against `vmafs extract` of the same archive, in one run.

    python3 tools/bench_live_restore.py [--dense-gib 4] [--data-mib 1024] [--sparse-tib 1]
                                        [--rounds 2] [--workdir /var/tmp/vmafs-bench-live]

Two archives (seekable .vma.zst, made by `vmafs create`): a --dense-gib disk holding
--data-mib of random data in 32 MiB stripes spread over it, and a --sparse-tib disk with
64 MiB of data at its start and holes after. For each, every round:

  * first_read: from the start of `vmafs restore --live` to the end of the first 64 KiB read
    of the disk by QEMU (started as soon as vmafs prints its -drive arguments, with -S, and
    reading through `qemu-io` on a second monitor): what a guest waits before its first
    disk read is served. Target: < 2 s whatever the disk's size.
  * stream: from the start of `vmafs restore --live` to its exit 0 (every cluster in the
    targets, backing dropped), against `vmafs extract` of the same archive into the same file
    system; ratio = extract seconds / live seconds (target >= 0.7).

The best of the rounds is reported, then one JSON line. The page cache is warm (the archive is
read once before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
STRIPE = 32 * MiB


def vmafs(*args: str | os.PathLike[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmafs", *map(str, args)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, **kw)


def make_archive(work: Path, name: str, size: int, data: int, spread: bool) -> Path:
    archive = work / f"{name}.vma.zst"
    if archive.exists():
        return archive
    disk = work / f"{name}.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
        stripes = max(1, data // STRIPE)
        period = size // stripes if spread else STRIPE
        for i in range(stripes):
            f.seek(i * period)
            for _ in range(STRIPE // MiB):
                f.write(os.urandom(MiB))
    p = vmafs("create", "-q", "-o", archive, f"drive-virtio0={disk}")
    if p.wait():
        sys.exit("vmafs create failed")
    disk.unlink()
    return archive


class Qmp:
    """A tiny synchronous QMP client (the bench's own monitor; vmafs holds the other)."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{cmd}: {reply['error']['desc']}")


def live_round(work: Path, archive: Path, read_at: int, full: bool = True
               ) -> tuple[float, float | None]:
    out = work / "live"
    shutil.rmtree(out, ignore_errors=True)
    mon = work / "vmafs.qmp"
    bench_mon = work / "bench.qmp"
    t0 = time.monotonic()
    proc = vmafs("restore", "--live", "-q", archive, "--to", out, "--qmp", mon,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "-drive" not in line:
        sys.exit(f"vmafs restore --live: {line}{proc.stderr.read() if proc.stderr else ''}")
    target = out / "disk-drive-virtio0.qcow2"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
         "-qmp", f"unix:{mon},server=on,wait=off",
         "-qmp", f"unix:{bench_mon},server=on,wait=off",
         "-drive", f"file={target},format=qcow2,if=none,id=drive-virtio0",
         "-device", "virtio-blk-pci,drive=drive-virtio0"])
    try:
        q = Qmp(bench_mon)
        q.execute("human-monitor-command",
                  **{"command-line": f"qemu-io drive-virtio0 \"read {read_at} 64k\""})
        first = time.monotonic() - t0
        if not full:
            return first, None
        if proc.wait(timeout=3600):
            sys.exit(f"vmafs restore --live failed: {proc.stderr.read() if proc.stderr else ''}")
        stream = time.monotonic() - t0
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            q.execute("quit")
    finally:
        qemu.kill()
        qemu.wait()
        proc.kill()
        proc.wait()
    return first, stream


def extract_round(work: Path, archive: Path) -> float:
    out = work / "extract"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    if vmafs("extract", "-q", archive, out).wait():
        sys.exit("vmafs extract failed")
    seconds = time.monotonic() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense-gib", type=int, default=4)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--sparse-tib", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-sparse-stream", dest="sparse_stream", action="store_false",
                    help="only the first read of the sparse disk, not its whole stream")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmafs-bench-live"))
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    cases = {
        f"dense-{a.dense_gib}g": (make_archive(a.workdir, f"dense-{a.dense_gib}g",
                                               a.dense_gib * GiB, a.data_mib * MiB, True),
                                  a.dense_gib * GiB // 2),
        f"sparse-{a.sparse_tib}t": (make_archive(a.workdir, f"sparse-{a.sparse_tib}t",
                                                 a.sparse_tib << 40, 64 * MiB, False),
                                    MiB),
    }
    report: dict[str, Any] = {}
    for name, (archive, read_at) in cases.items():
        full = name.startswith("dense") or a.sparse_stream
        with open(archive, "rb") as f:       # warm the page cache
            while f.read(16 * MiB):
                pass
        best: dict[str, float] = {}
        for _ in range(a.rounds):
            first, stream = live_round(a.workdir, archive, read_at, full)
            best["first_read_s"] = min(best.get("first_read_s", first), first)
            if stream is not None:
                extract = extract_round(a.workdir, archive)
                for key, value in (("live_s", stream), ("extract_s", extract)):
                    best[key] = min(best.get(key, value), value)
        line = f"{name}: first read {best['first_read_s']:.2f} s (target < 2)"
        if "live_s" in best:
            best["ratio_extract_over_live"] = best["extract_s"] / best["live_s"]
            line += (f", live restore {best['live_s']:.2f} s, extract {best['extract_s']:.2f}"
                     f" s, ratio {best['ratio_extract_over_live']:.2f} (target >= 0.7)")
        report[name] = {k: round(v, 3) for k, v in best.items()}
        print(line, flush=True)
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
