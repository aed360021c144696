#!/usr/bin/env python3
"""Benchmark `vmafs verify` on both cores against itself on one core, in the same run.

Archives (made once by `vmafs create`): a plain .vma of a SIZE raw image that is half random
data, half holes (64 MiB stripes), a plain .vma of a fully random SIZE image, and a .vma.zst
of the half-random image; each read into the page cache (`cat archive > /dev/null`, timed: the
I/O floor) right before it is verified, and again before the in-process scans (the share still
cached after them is checked with fincore: a busy machine's memory use evicts files). Each
round runs `vmafs verify -q` of every archive pinned to one core (`taskset -c 0`) and
unpinned, in alternating order; medians over the rounds. A verify of a one-cluster archive,
measured the same way, is the fixed cost (start-up, imports), so the ratio on stored data is
printed beside the whole command's; and each round also scans each archive in one process,
--reps times on one core and on both, alternating (ABBA): the stored data's ratio without
start-up, as the ratio of the medians and as the median of the side-by-side pairs' ratios
(steadier: one disturbance moves one pair). The load average is printed: above 1, other
processes had part of the second core; the bench runs at --nice -10 (if allowed) so that
they take less of it; with --realtime the in-process scans run SCHED_FIFO, ahead of them.
--baseline REV also runs the vmafs of an older commit (git archive, its C accelerator built)
the same way, in the same rounds. Every tree's modules are byte-compiled first, as an install
has them (with PYTHONDONTWRITEBYTECODE set, a tree's changed modules were compiled again in
every start-up, which the fixed cost then counted: a fresh baseline tree compiled them all).

Usage: tools/bench_verify.py [--size 2G] [--rounds 7] [--reps 4] [--nice -10] [--realtime]
                             [--dir D] [--keep] [--baseline REV] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchlib import parse_size, timed

STRIPE = 64 << 20
TARGET = 1.6  # issue 17: verify of a plain archive >= 1.6x one core
DECODERS = 2  # vmafs/container/streams.py: threads decoding a .vma.zst's frames


def make_image(path: str, size: int, *, dense: bool) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        step = STRIPE if dense else 2 * STRIPE
        for start in range(0, size, step):
            f.seek(start)
            for at in range(start, min(start + STRIPE, size), 8 << 20):
                f.write(os.urandom(min(8 << 20, size - at)))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], tree: str = ROOT) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command, `python -m vmafs` from tree."""
    return timed(cmd, tree, quiet=True)


SPLIT = """
import os, sys, threading, time
from vmafs.archive.scan import read_header, scan_stream
from vmafs.container.streams import open_stream
tick = os.sysconf("SC_CLK_TCK")
cores = os.sched_getaffinity(0)
def workers():  # CPU of the frame decoders, still alive until the stream closes
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith("vmafs-unzstd") and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total
walls = {True: [], False: []}
first = sys.argv[2] == "pinned first"
for rep in range(int(sys.argv[3])):  # ABBA: each order as often, a drift cancels
    for pinned in ((first, not first) if rep % 2 == 0 else (not first, first)):
        os.sched_setaffinity(0, {min(cores)} if pinned else cores)
        wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
        with open_stream(sys.argv[1]) as s:
            scan_stream(s, header=read_header(s))
            decoders = workers()
        walls[pinned].append(time.perf_counter() - wall)
        if not pinned:
            split = (time.process_time() - cpu, time.thread_time() - main, decoders)
print(*split, *walls[True], *walls[False])
"""


def cpu_split(path: str, tree: str = ROOT, pinned_first: bool = True, reps: int = 1,
              realtime: bool = False) -> tuple[float, float, float, list[float], list[float]]:
    """(CPU seconds of one in-process scan on both cores, of them in the main thread, in the
    frame decoders of a .vma.zst; the wall seconds of reps scans on one core and of reps on
    both, in the same process, alternating, the order asked first): the CPU not in those
    threads is the reader thread's; contention on a busy machine stretches wall times,
    hardly the CPU. The walls are the stored data's alone: no start-up, no imports.
    realtime: the scans run SCHED_FIFO (chrt), ahead of every other process."""
    out = subprocess.run([*(["chrt", "-f", "1"] if realtime else []), sys.executable, "-c",
                          SPLIT, path,
                          "pinned first" if pinned_first else "both first", str(reps)],
                         cwd=tree, env={**os.environ, "PYTHONPATH": tree}, check=True,
                         capture_output=True, text=True).stdout.split()
    walls = [float(x) for x in out[3:]]
    return float(out[0]), float(out[1]), float(out[2]), walls[:reps], walls[reps:]


PYTHON_ONLY = """
import os, sys, threading, time
import vmafs.archive.walk as walk
from vmafs.archive.scan import read_header, scan_stream
from vmafs.container.streams import open_stream
def marked(fd, buf, offset, ends, bounds, state, data_out, summed_out, limit=0):
    # every piece taken (at most limit, if > 0) and marked whole, nothing read or hashed
    # (the checks stay 0)
    pieces = len(bounds) - 1
    done = 0
    while int(state[0]) < pieces and (limit <= 0 or done < limit):
        k = int(state[0])
        state[0] = k + 1
        first, stop = int(bounds[k]), int(bounds[k + 1])
        state[1 + 2 * k] = int(ends[stop - 1]) - (int(ends[first - 1]) if first else 0)
        done += 1
    return done
if hasattr(walk, "_read_pieces_now"):
    walk._read_pieces_now = marked
reader = []  # the CPU seconds of the walk's reader thread, when it ends
run = threading.Thread.run
def timed_run(self):
    try:
        run(self)
    finally:
        reader.append(time.thread_time())
threading.Thread.run = timed_run
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
best = (float("inf"), 0.0, 0.0)
for _ in range(int(sys.argv[2])):
    wall, main = time.perf_counter(), time.thread_time()
    reader.clear()
    with open_stream(sys.argv[1]) as s:
        scan_stream(s, header=read_header(s))
    best = min(best, (time.perf_counter() - wall, time.thread_time() - main, sum(reader)))
print(*best)
"""


def python_only(path: str, tree: str = ROOT, reps: int = 5) -> tuple[float, float, float]:
    """Best wall seconds of in-process scans on one core with nothing read or hashed (the C
    read_pieces replaced by one that marks each piece read), and the CPU seconds of that
    scan's main thread and of its reader thread: the Python both threads run with the GIL
    held, which two cores cannot share; less sensitive to others' load than the ratios.
    NaNs for a tree without read_pieces."""
    out = subprocess.run([sys.executable, "-c", PYTHON_ONLY, path, str(reps)], cwd=tree,
                         env={**os.environ, "PYTHONPATH": tree}, capture_output=True,
                         text=True)
    if out.returncode or len(out.stdout.split()) != 3:
        return float("nan"), float("nan"), float("nan")
    wall, main, reader = (float(x) for x in out.stdout.split())
    return wall, main, reader


def build_accelerator(rev: str, tree: str) -> None:
    """The C accelerator of an older commit, built in its tree as setup.sh builds this one's:
    without it the baseline would hash in Python, a baseline no user runs."""
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{rev}:setup.py"],
                      capture_output=True).returncode:
        return  # from before the accelerator
    subprocess.run(f"git -C {ROOT} archive {rev} setup.py | tar -x -C {tree}", shell=True,
                   check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                    "--build-temp", os.path.join(tree, "build")], cwd=tree, check=True,
                   capture_output=True)


def resident(path: str) -> float:
    """The share of the file in the page cache (util-linux fincore; 1.0 without it)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", path],
                         capture_output=True, text=True)
    if out.returncode or not out.stdout.split():
        return 1.0
    res, size = (int(x) for x in out.stdout.split()[:2])
    return res / size if size else 1.0


def warm(path: str) -> float:
    """Read the whole file into the page cache; the wall time of `cat` (the I/O floor)."""
    return run(["cat", path])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the archives in --dir")
    ap.add_argument("--baseline", metavar="REV", help="also time the vmafs of this commit")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="also time the vmafs in DIR (e.g. `git archive REV vmafs | tar -x`)")
    ap.add_argument("--reps", type=int, default=4,
                    help="in-process scans on one core and on both, a round and archive")
    ap.add_argument("--nice", type=int, default=-10,
                    help="run at this niceness (root may lower it; 0: as started): a busy "
                         "machine's other processes then take less of the cores measured")
    ap.add_argument("--realtime", action="store_true",
                    help="run the in-process scans SCHED_FIFO (root): steady ratios on a busy "
                         "machine, but each scan (~0.1-0.5 s) takes the cores from all others")
    args = ap.parse_args()
    if args.nice:
        with contextlib.suppress(OSError):  # not allowed: as started (printed below)
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    size = parse_size(args.size)
    work = args.dir or tempfile.mkdtemp(prefix="vmafs-bench-verify-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    vmafs = [sys.executable, "-m", "vmafs"]
    archives = {
        "plain, half data": ("half.raw", "half.vma", False),
        "plain, dense": ("dense.raw", "dense.vma", True),
        "zstd, half data": ("half.raw", "half.vma.zst", False),
        "fixed cost": ("tiny.raw", "tiny.vma", True),
    }
    try:
        for image, archive, dense in archives.values():
            image_path, archive_path = os.path.join(work, image), os.path.join(work, archive)
            if args.keep and os.path.exists(archive_path):
                continue
            if not os.path.exists(image_path):
                make_image(image_path, 1 << 16 if image == "tiny.raw" else size, dense=dense)
            subprocess.run([*vmafs, "create", "-q", "-o", archive_path,
                            f"drive-scsi0={image_path}"], check=True)
        if not args.keep:
            for image in {a[0] for a in archives.values()}:
                os.unlink(os.path.join(work, image))
        trees = {"": ROOT}
        if args.baseline:
            base = os.path.join(work, "baseline")
            shutil.rmtree(base, ignore_errors=True)
            os.makedirs(base)
            subprocess.run(f"git -C {ROOT} archive {args.baseline} vmafs | tar -x -C {base}",
                           shell=True, check=True)
            build_accelerator(args.baseline, base)
            trees[f"{args.baseline}: "] = base
        if args.baseline_tree:
            trees[f"{args.baseline_tree}: "] = os.path.abspath(args.baseline_tree)
        for tree in trees.values():  # as installed: bytecode cached (PYTHONDONTWRITEBYTECODE
            # would have each run compile every module changed since its .pyc, in its start-up)
            subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tree, "vmafs")],
                           check=True, capture_output=True)
        subprocess.run(["sync"], check=True)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        split: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = {}
        load = os.getloadavg()[0]
        floor: dict[str, list[float]] = {}
        cached: dict[str, list[float]] = {}  # the share in the page cache after its runs
        serial: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # python_only
        for r in range(args.rounds):
            for name, (_, archive, _) in archives.items():
                path = os.path.join(work, archive)
                floor.setdefault(name, []).append(warm(path))
                modes = [(f"{tag}{mode}", prefix, tree) for tag, tree in trees.items()
                         for mode, prefix in (("one core", ["taskset", "-c", "0"]),
                                              ("both cores", []))]
                for mode, prefix, tree in modes if r % 2 == 0 else modes[::-1]:
                    times.setdefault((name, mode), []).append(
                        run([*prefix, *vmafs, "verify", "-q", path], tree))
                cached.setdefault(name, []).append(resident(path))
                warm(path)
                for tag, tree in trees.items():
                    split.setdefault((name, tag), []).append(
                        cpu_split(path, tree, r % 2 == 0, args.reps, args.realtime))
                    if name.startswith("plain"):
                        serial.setdefault((name, tag), []).append(python_only(path, tree))
                cached[name].append(resident(path))
        med = {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for key, v in times.items()}
        fixed1, fixed2 = med["fixed cost", "one core"][0], med["fixed cost", "both cores"][0]
        print(f"vmafs verify, medians of {args.rounds} interleaved rounds, archives in the page "
              f"cache ({os.cpu_count()} cores; load average {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end: above 1, the second core was not all "
              f"ours and the ratios understate; niceness {os.getpriority(os.PRIO_PROCESS, 0)})")
        print(f"{'archive':18} {'MiB':>6} {'cat':>7} {'1 core':>7} {'2 cores':>7} "
              f"{'cpu 1c':>7} {'cpu 2c':>7} {'ratio':>6} {'data only':>9}")
        for name, (_, archive, _) in archives.items():
            mib = os.path.getsize(os.path.join(work, archive)) / (1 << 20)
            (one, cpu1), (two, cpu2) = med[name, "one core"], med[name, "both cores"]
            ratio = one / two
            data = ((one - fixed1) / (two - fixed2) if name != "fixed cost" and two > fixed2
                    else float("nan"))
            print(f"{name:18} {mib:6.0f} {statistics.median(floor[name]):6.3f}s {one:6.3f}s "
                  f"{two:6.3f}s {cpu1:6.3f}s {cpu2:6.3f}s {ratio:5.2f}x {data:8.2f}x")
        low = {name: min(v) for name, v in cached.items() if min(v) < 0.999}
        if low:  # others' memory use evicted part of an archive: some reads went to the disk
            print("NOT all in the page cache after its runs (lowest share seen): "
                  + ", ".join(f"{name} {share:.1%}" for name, share in low.items()))
        one, two = med["plain, half data", "one core"][0], med["plain, half data", "both cores"][0]
        verdict = "PASS" if one / two >= TARGET else "MISS"
        data = (one - fixed1) / (two - fixed2)
        print(f"plain archive, both cores vs one: {one / two:.2f}x whole command ({verdict}), "
              f"{data:.2f}x on stored data ({'PASS' if data >= TARGET else 'MISS'}); "
              f"target >= {TARGET}x")
        best = {key: min(w for w, _ in v) for key, v in times.items()}
        b1, b2 = best["fixed cost", "one core"], best["fixed cost", "both cores"]
        print("best of the rounds (the least disturbed by other processes):")
        for name in list(archives)[:3]:
            one, two = best[name, "one core"], best[name, "both cores"]
            print(f"  {name:18} 1 core {one:6.3f}s 2 cores {two:6.3f}s ratio {one / two:5.2f}x "
                  f"on stored data {(one - b1) / (two - b2):5.2f}x")
        print("\nCPU of one in-process scan on both cores, medians: the main thread checks and "
              "hashes,\nthe reader thread reads (a .vma.zst's frames: worker threads decode "
              "them); the total over the busiest\nthread (the decoders' share split over them) "
              "bounds what two cores can give")
        for tag in trees:
            for name in list(archives)[:3]:
                total = statistics.median(t[0] for t in split[name, tag])
                main_cpu = statistics.median(t[1] for t in split[name, tag])
                dec = statistics.median(t[2] for t in split[name, tag])
                reader = total - main_cpu - dec
                busiest = max(main_cpu, reader, dec / DECODERS)
                print(f"{tag or 'this tree: '}{name:18} total {total:6.3f}s main "
                      f"{main_cpu:6.3f}s reader {reader:6.3f}s decoders {dec:6.3f}s bound "
                      f"{min(2.0, total / busiest):5.2f}x")
        print(f"\nthe stored data alone: {args.reps} in-process scans on one core and "
              f"{args.reps} on both a round, in one process{' (SCHED_FIFO)' * args.realtime},"
              "\nalternating (ABBA); wall seconds: "
              "medians over all rounds (best), the ratio of those medians, and the median\n"
              "(quartiles) of the ratios of scans run side by side: a disturbance moves one "
              "pair, not the median")
        for tag in trees:
            for name in list(archives)[:3]:
                ones = [w for t in split[name, tag] for w in t[3]]
                twos = [w for t in split[name, tag] for w in t[4]]
                m1, m2 = statistics.median(ones), statistics.median(twos)
                q1, q2, q3 = statistics.quantiles([a / b for a, b in zip(ones, twos,
                                                                          strict=True)], n=4)
                mark = f" ({'PASS' if m1 / m2 >= TARGET else 'MISS'})" if name.startswith(
                    "plain") else ""
                print(f"{tag or 'this tree: '}{name:18} 1 core {m1:6.3f}s ({min(ones):5.3f}) "
                      f"2 cores {m2:6.3f}s ({min(twos):5.3f}) ratio {m1 / m2:5.2f}x{mark} "
                      f"pairs {q2:4.2f}x ({q1:4.2f}-{q3:4.2f}) best {min(ones) / min(twos):4.2f}x")
        print("\nthe Python alone (GIL held; nothing read or hashed): one in-process scan on "
              "one core, best of 5 a round;\nmedian over the rounds (best), milliseconds and "
              "per data extent of 3.7 MiB, and of the best, the CPU\nof the main thread (checks) "
              "and of the reader thread (the walk)")
        for tag in trees:
            for name in [n for n in archives if n.startswith("plain")]:
                runs = serial[name, tag]
                walls = [w for w, _, _ in runs]
                wall, main_cpu, reader_cpu = min(runs)
                per = os.path.getsize(os.path.join(work, archives[name][1])) / (59 << 16)
                print(f"{tag or 'this tree: '}{name:18} {statistics.median(walls) * 1e3:7.1f} ms "
                      f"({wall * 1e3:5.1f}), {wall / per * 1e6:5.0f} us an extent: main "
                      f"{main_cpu / per * 1e6:4.0f} us, reader {reader_cpu / per * 1e6:4.0f} us")
        for tag in list(trees)[1:]:
            print(f"\nthe same, vmafs of {tag[:-2]} (same rounds): seconds, and this tree's "
                  "speed-up over it")
            print(f"{'archive':18} {'1 core':>7} {'2 cores':>7} {'cpu 1c':>7} {'cpu 2c':>7} "
                  f"{'ratio':>6} {'1c now':>7} {'2c now':>7}")
            for name in archives:
                one, cpu1 = med[name, f"{tag}one core"]
                two, cpu2 = med[name, f"{tag}both cores"]
                print(f"{name:18} {one:6.3f}s {two:6.3f}s {cpu1:6.3f}s {cpu2:6.3f}s "
                      f"{one / two:5.2f}x {one / med[name, 'one core'][0]:6.2f}x "
                      f"{two / med[name, 'both cores'][0]:6.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
