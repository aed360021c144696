#!/usr/bin/env python3
"""Benchmark opening an increment that copied a sparse disk whole (what `backup
--full-if-needed` writes when a disk's bitmap is gone) against a full archive of the same disk:
time and peak RSS of `vmafs list` and of opening the chain (open_chain), each in a fresh
process, plus the content digest of the increment (what its child's link needs: `list` of a
small child on top of it).

Usage: tools/bench_sparse_increment.py [--size 4T] [--dir D]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_scale import DATA_AT, REPORT_HWM, measured, vmafs_argv  # noqa: E402

from vmafs.archive.chain import link_to  # noqa: E402
from vmafs.archive.reader import Archive  # noqa: E402
from vmafs.archive.writer import ArchiveWriter, DeviceSpec  # noqa: E402
from vmafs.container.output import open_output  # noqa: E402
from vmafs.format import chain  # noqa: E402

MiB = 1 << 20
NAME = "drive-scsi0"

OPEN = REPORT_HWM + """
import sys, time
from vmafs.archive.chain import open_chain
start = time.perf_counter()
with open_chain(sys.argv[1]) as a:
    assert a.read(1, 0, 4096) is not None
    if sys.argv[2] == "digest":
        a.layers[-1].digest()
print(f"{time.perf_counter() - start:.3f}")
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def write(path: Path, size: int, parent: Path | None, ctime: int) -> None:
    configs = [("qemu-server.conf", b"cores: 1\n")]
    if parent is not None:
        with Archive.open(str(parent), layer=True) as p:
            configs.append((chain.CONFIG_NAME, chain.encode(chain.ChainRecord(link_to(p)))))
    with open_output(str(path)) as out:
        # the device is not incremental: copied whole, zero slots for all it does not write
        w = ArchiveWriter(out, [DeviceSpec(NAME, size)], configs, ctime=ctime)
        for offset in DATA_AT:
            if offset + 2 * MiB <= size:
                w.write(1, offset, os.urandom(2 * MiB))
        w.finish()


def child(path: Path, size: int, parent: Path, ctime: int) -> None:
    """A small increment on top: opening it checks its link, so its parent's digest."""
    with Archive.open(str(parent), layer=True) as p:
        configs = [(chain.CONFIG_NAME, chain.encode(chain.ChainRecord(link_to(p))))]
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec(NAME, size)], configs, ctime=ctime, incremental=[1])
        w.write(1, 0, os.urandom(MiB))
        w.finish()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4T")
    p.add_argument("--dir", default=None)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-sparse-inc-") as tmp:
        d = Path(tmp)
        write(d / "full.vma", size, None, 1733050000)
        write(d / "base.vma", size, None, 1733050000)
        write(d / "inc.vma", size, d / "base.vma", 1733053600)
        child(d / "child.vma", size, d / "inc.vma", 1733057200)
        mib = (d / "inc.vma").stat().st_size / MiB
        print(f"{size / (1 << 40):g} TiB sparse disk; archives of {mib:.0f} MiB each")
        rows = [("list full", vmafs_argv("list", d / "full.vma")),
                ("list chain", vmafs_argv("list", d / "inc.vma")),
                ("open full", [sys.executable, "-c", OPEN, str(d / "full.vma"), "-"]),
                ("open chain", [sys.executable, "-c", OPEN, str(d / "inc.vma"), "-"]),
                ("list child", vmafs_argv("list", d / "child.vma")),
                ("open+digest", [sys.executable, "-c", OPEN, str(d / "inc.vma"), "digest"])]
        for what, argv in rows:
            for k in range(args.runs):
                run = measured(argv, timeout=1800)
                assert run.rc == 0, run.stderr
                print(f"  {what:12} run {k + 1}: {run.seconds:7.2f} s  peak RSS "
                      f"{run.maxrss / MiB:6.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
