#!/usr/bin/env python3
"""extract and restore (raw, qcow2) of a local archive against `qemu-img convert -t writeback`
of the original image, to the same file system, interleaved rounds, medians.

    python3 tools/bench_restore.py [--size-gib 4] [--rounds 5] [--dir /var/tmp/NAME]
                                   [--before PATH]

Image: SIZE, half random data and half holes in alternating 64 MiB stripes
(benchlib.make_half_data_image), archived once as .vma and .vma.zst. Same durability on both
sides: `qemu-img convert -t writeback` flushes its output when it closes it (its default
cache mode, unsafe, does not), and vmafs fsyncs its files before renaming them into place.
Every run starts after a `sync` with the archive and the image in the page cache (read once
before), so the disk's write speed and the copy are what is compared. The order of the kinds
rotates each round (the first write after the previous files' deletion pays for their
discards), and the trees' turns swap every other round. Each run's CPU time (user + system)
is shown too: on a machine others load, it says what a run costs more steadily than its wall
time. --before PATH: also time the vmafs
tree at PATH (e.g. a `git archive` of an older commit), as "before" figures from the same
rounds. Prints each round, the medians, the ratios (qemu-img's time / vmafs's: higher is
better, the goal is >= 1.2) and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import make_half_data_image, timed

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp/vmafs-bench-restore")
    ap.add_argument("--before", default=None, metavar="PATH",
                    help="a vmafs tree to time beside this one")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="more vmafs trees to time beside this one (repeatable)")
    ap.add_argument("--kinds", default="extract,extract-zst,restore-raw,restore-qcow2")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.raw"
    make_half_data_image(image, int(args.size_gib * (1 << 30)), 64 * MiB)
    trees = {"": str(ROOT)}
    if args.before:
        trees["before:"] = args.before
    for item in args.tree:
        name, _, path = item.partition("=")
        trees[f"{name}:"] = path
    for suffix in (".vma", ".vma.zst"):
        archive = work / f"a{suffix}"
        if not archive.exists():
            vmafs(str(ROOT), "create", "-q", "-o", str(archive), f"drive-scsi0={image}")
    for path in (image, work / "a.vma", work / "a.vma.zst"):  # in the page cache
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    out = work / "out"
    argv = {
        "extract": ["extract", "-q", str(work / "a.vma"), str(out)],
        "extract-zst": ["extract", "-q", str(work / "a.vma.zst"), str(out)],
        "restore-raw": ["restore", "-q", "--format", "raw", "--to", str(out),
                        str(work / "a.vma")],
        "restore-qcow2": ["restore", "-q", "--to", str(out), str(work / "a.vma")],
    }
    kinds = ["qemu-img"] + [f"{tag}{k}" for k in args.kinds.split(",") for tag in trees]
    rounds: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            row: dict[str, float] = {}
            # the trees' turns swap every other round: whichever runs right after the other
            # kind's big write pays for it (a qcow2 restore after a raw one: 3x the CPU)
            tags = list(trees) if r % 2 == 0 else list(reversed(trees))
            order = ["qemu-img"] + [f"{tag}{k}" for k in args.kinds.split(",") for tag in tags]
            for kind in order[r % len(order):] + order[:r % len(order)]:
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                if kind == "qemu-img":
                    out.mkdir()
                    row[kind], row[f"cpu.{kind}"] = timed(
                        ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "raw",
                         str(image), str(out / "disk.raw")], None)
                else:
                    tag, _, what = kind.rpartition(":")
                    tree = trees[f"{tag}:" if tag else ""]
                    row[kind], row[f"cpu.{kind}"] = timed(
                        [sys.executable, "-m", "vmafs", *argv[what]], tree)
            shutil.rmtree(out, ignore_errors=True)
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {row[k]:.2f}s (cpu {row['cpu.' + k]:.2f})"
                                                 for k in kinds), flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(row[k] for row in rounds) for k in kinds}
    load = os.getloadavg()
    print(f"\nmedians of {args.rounds} rounds, {args.size_gib:g} GiB half-data disk "
          f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}):")
    for kind in kinds:
        ratios = [row["qemu-img"] / row[kind] for row in rounds]
        goal = "" if kind == "qemu-img" else (
            f"  ratio qemu-img/this {statistics.median(ratios):.2f} (goal >= 1.2: "
            f"{'PASS' if statistics.median(ratios) >= 1.2 else 'MISS'})")
        cpu = statistics.median(row[f"cpu.{kind}"] for row in rounds)
        print(f"  {kind:22} {med[kind]:6.2f}s  cpu {cpu:5.2f}s{goal}")
    return 0


def vmafs(tree: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "vmafs", *args], check=True, cwd=tree,
                   env={**os.environ, "PYTHONPATH": tree})


if __name__ == "__main__":
    sys.exit(main())
