#!/usr/bin/env python3
"""Where the wall time of one `vmafs backup` goes: a timeline per run, in milliseconds from the
moment the command was started (fork+exec included), with the same run's `qemu-img convert`
of the image as the baseline (ratio = convert / backup, the issue's >= 0.8 at 2 and 4 GiB).

Each backup runs as its own process (as a user runs it) through a small wrapper that wraps, by
patching attributes only, the QMP round trips, the backup's phases, the guard's start, PREV's
read (in its thread), the first and last NBD write QEMU sent, the first and last write the
archive writer stored, its finish(), the paced writeback's last steps and the archive's fsync
and rename; nothing of vmafs is changed.  The hooks are installed when the command itself has
imported vmafs.backup.live (a post-import hook), so the imports happen where they do in a
plain run and overlap what they overlap there; they cost a few microseconds per QMP command
and per NBD write.  Rounds alternate backup and convert (other work on the machine shifts
both alike); medians over --rounds.  Page cache: the image's pages are evicted before every
timed run (posix_fadvise DONTNEED on that one file; never drop_caches), QEMU reads it with
cache=none anyway.  The convert reads the image with -U while the (idle) VM runs.

Besides the median run's timeline, per tree and kind: the fixed cost (wall time outside the
jobs), the jobs' own time (QEMU's copy, as vmafs waits for it) and the process's CPU until the
jobs started (its threads; a forked child's apart): on a machine with a core to spare, that
CPU is the start-up's critical path, steadier than its wall time on a loaded one.

--baseline DIR also runs the vmafs of another tree (e.g. `git archive REV | tar -x -C DIR`) in
the same rounds, interleaved, so that a change is measured against what it changes.
--bytecode lets Python write (in a private directory) and use .pyc files: an installed vmafs
has them; a checkout run with PYTHONDONTWRITEBYTECODE=1 compiles every module at every start.

--like-bench-incremental is part 1 of tools/bench_incremental.py (its image: 2 MiB of random
data every 4 MiB; 2 % of the clusters written through QEMU between the full and the
incremental), with the archive the incremental reads evicted (that file only) instead of
drop_caches.

Usage: python3 tools/backup_timeline.py [--size-gib 2] [--rounds 5] [--incremental]
                                        [--like-bench-incremental] [--baseline DIR] [--bytecode]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import evict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GiB, MiB = 1 << 30, 1 << 20

# Runs inside the backup's process: hooks, then vmafs's own main().
WRAPPER = r"""
import os, sys, time, json, functools
T0 = float(os.environ["VMAFS_T0"])
EV = []
def mark(what, t=None):
    EV.append((what, ((time.monotonic() if t is None else t) - T0) * 1000))
mark("python up (site done)")
import atexit, threading
THREADS = []  # (thread name, its CPU ms) of every thread that ended, then the main thread's
_thread_run = threading.Thread.run
def _counted_run(self):
    try:
        _thread_run(self)
    finally:
        THREADS.append((self.name, time.thread_time() * 1000))
threading.Thread.run = _counted_run
atexit.register(lambda: (mark("exit"), THREADS.append(("main", time.thread_time() * 1000)),
                         open(os.environ["VMAFS_TL"], "w").write(json.dumps(
                             EV + [["thread CPU", THREADS]]))))
import vmafs.cli
mark("vmafs.cli imported")
import vmafs.backup.prev as prev_mod  # imports nothing heavy (the command imports it first)
_main = prev_mod.PrevReader._main
def _prev_main(self):
    t = time.monotonic()
    try:
        return _main(self)
    finally:
        mark("PREV read (its thread)", t); mark("/PREV read (its thread)")
prev_mod.PrevReader._main = _prev_main
def hook_imports():
    # Runs once vmafs.backup.live has been imported by the command itself (a post-import
    # hook), so the imports overlap what they overlap in a plain run.
    import vmafs.backup.live as live, vmafs.backup.qmp as qmp, vmafs.container.output as out
    import vmafs.backup.pipe as pipe
    mark("backup stack imported")
    def span(name, fn):
        @functools.wraps(fn)
        async def w(*a, **k):
            t = time.monotonic()
            try:
                return await fn(*a, **k)
            finally:
                mark(name, t); mark("/" + name)
        return w
    def sspan(name, fn):
        @functools.wraps(fn)
        def w(*a, **k):
            t = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                mark(name, t); mark("/" + name)
        return w
    ex = qmp.Qmp.execute
    @functools.wraps(ex)
    async def execute(self, command, arguments=None, **k):
        t = time.monotonic()
        try:
            return await ex(self, command, arguments, **k)
        finally:
            mark("qmp " + command, t); mark("/qmp " + command)
    if not hasattr(qmp.Qmp, "execute_all"):  # else execute() goes through execute_all()
        qmp.Qmp.execute = execute
    oq = qmp.open_qmp
    import contextlib
    @contextlib.asynccontextmanager
    async def open_qmp(*a, **k):
        t = time.monotonic()
        async with oq(*a, **k) as q:
            mark("qmp connect+greeting+capabilities", t); mark("/qmp connect+greeting+capabilities")
            yield q
        mark("qmp disconnected")
    qmp.open_qmp = open_qmp
    live.open_qmp = open_qmp
    import inspect
    for m in ("_preflight", "_start_writer", "_start_nbd", "_writer_ready", "_add_nodes",
              "_start_jobs", "_wait_jobs", "_teardown", "_commit", "_settle_bitmaps",
              "_clean_leftovers", "_read_prev", "_plan_incremental"):
        if hasattr(live.Backup, m):
            fn = getattr(live.Backup, m)
            wrap = span if inspect.iscoroutinefunction(fn) else sspan
            setattr(live.Backup, m, wrap("phase " + m, fn))
    if hasattr(qmp.Qmp, "execute_all"):
        ea = qmp.Qmp.execute_all
        @functools.wraps(ea)
        async def execute_all(self, calls, **k):
            t = time.monotonic()
            name = "qmp " + "+".join(c for c, _ in calls)
            try:
                return await ea(self, calls, **k)
            finally:
                mark(name, t); mark("/" + name)
        qmp.Qmp.execute_all = execute_all
    live.Guard.__init__ = sspan("spawn guard", live.Guard.__init__)
    out.TempFile.commit = sspan("fsync+rename", out.TempFile.commit)
    import vmafs.archive.writer as aw
    aw.ArchiveWriter.finish = sspan("writer finish()", aw.ArchiveWriter.finish)
    if hasattr(out, "Pacer"):
        out.Pacer.finish = sspan("pacer finish (the rest to disk)", out.Pacer.finish)
    stored = []
    aw_write = aw.ArchiveWriter.write
    def writer_write(self, *a, **k):
        try:
            return aw_write(self, *a, **k)
        finally:
            if not stored:
                stored.append(0.0)
                mark("writer: first write stored")
            stored[0] = time.monotonic()
    aw.ArchiveWriter.write = writer_write
    atexit.register(lambda: stored and mark("writer: last write stored", stored[0]))
    sink_write = pipe.DiskSink.write
    seen = []
    def note():
        now = time.monotonic()
        if not seen:
            mark("first NBD write", now)
        seen[:] = [now]
    if inspect.iscoroutinefunction(sink_write):  # a tree from before the sinks' threads
        async def write(self, offset, data):
            note()
            return await sink_write(self, offset, data)
    else:
        def write(self, offset, data):
            note()
            return sink_write(self, offset, data)
    pipe.DiskSink.write = write
    atexit.register(lambda: seen and mark("last NBD write", seen[0]))
    zeroes_seen = []
    sink_zeroes = pipe.DiskSink.write_zeroes
    if not inspect.iscoroutinefunction(sink_zeroes):  # QEMU's zero requests, apart
        def write_zeroes(self, offset, length):
            if not zeroes_seen:
                zeroes_seen.append(0.0)
                mark("first NBD write-zeroes")
            zeroes_seen[0] = time.monotonic()
            return sink_zeroes(self, offset, length)
        pipe.DiskSink.write_zeroes = write_zeroes
        atexit.register(lambda: zeroes_seen and mark("last NBD write-zeroes", zeroes_seen[0]))
    import resource
    def cpu_mark(where):
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        mark(f"CPU at {where}: self {(me.ru_utime + me.ru_stime) * 1000:.0f} ms, reaped "
             f"children {(kids.ru_utime + kids.ru_stime) * 1000:.0f} ms")
    sj = live.Backup._start_jobs
    @functools.wraps(sj)
    async def start_jobs(self, *a, **k):
        try:
            return await sj(self, *a, **k)
        finally:
            cpu_mark("jobs started")
    live.Backup._start_jobs = start_jobs
    orun = live.run_backup
    async def run_backup(job):
        mark("trio.run started")
        return await orun(job)
    live.run_backup = run_backup
import importlib.abc, importlib.machinery
class _PostImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vmafs.backup.live":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            sys.modules[name] = module
            hook_imports()
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _PostImport())
sys.argv = ["vmafs", *sys.argv[1:]]
mark("main()")
rc = vmafs.cli.main()
mark("main() returned")
sys.exit(rc)
"""


BYTECODE = False
PLAIN = False  # --plain: `python -m vmafs`, no wrapper


def env(tree: Path = ROOT, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    made = dict(os.environ, PYTHONPATH=path, **extra)
    if BYTECODE:  # .pyc files in a private directory, never in the shared tree
        made.pop("PYTHONDONTWRITEBYTECODE", None)
        made["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "vmafs-tl-pycache")
    return made


def make_image(path: Path, size: int) -> None:
    """First half pseudo-random (incompressible), second half a hole, as bench_backup's."""
    with open(path, "wb") as f:
        f.truncate(size)
        block = os.urandom(16 * MiB)
        for off in range(0, size // 2, 16 * MiB):
            f.write(block[: min(16 * MiB, size // 2 - off)])
            block = block[1:] + block[:1]  # not dedupable by the page, cheap


def timed_backup(tree: Path, qmp: Path, out: Path, work: Path, *extra: str
                 ) -> tuple[float, list[Any]]:
    tl = work / "tl.json"
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    runner = ["-m", "vmafs"] if PLAIN else ["-c", WRAPPER]
    subprocess.run([sys.executable, *runner, "backup", "--qmp", str(qmp), "-o", str(out),
                    "-q", *extra], check=True, cwd=tree,
                   env=env(tree, VMAFS_T0=repr(t0), VMAFS_TL=str(tl)))
    wall = time.monotonic() - t0
    if PLAIN:
        return wall, [["process reaped", wall * 1000]]
    return wall, json.loads(tl.read_text()) + [["process reaped", wall * 1000]]


def timed_convert(img: Path, work: Path) -> float:
    dst = work / "copy.raw"
    dst.unlink(missing_ok=True)
    evict(img)
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(dst)], check=True)
    wall = time.monotonic() - t0
    dst.unlink()
    return wall


def thread_cpu(events: list[Any]) -> dict[str, float]:
    """CPU ms of each kind of thread of one run (threads of one name summed; 'Trio thread N'
    as 'trio threads'): which thread's work an improvement must cut."""
    got: dict[str, float] = {}
    for what, value in events:
        if what == "thread CPU":
            for name, ms in value:
                kind = "trio threads" if name.startswith("Trio thread") else name
                got[kind] = got.get(kind, 0.0) + ms
    return got


def _spans(events: list[Any]) -> list[tuple[float, float, str]]:
    """(start ms, end ms, name) of every timed span of a run."""
    opened: dict[str, float] = {}
    spans = []
    for what, ms in events:
        if what == "thread CPU":
            continue
        if what.startswith("/"):
            spans.append((opened.pop(what[1:], ms), ms, what[1:]))
        else:
            opened[what] = ms
    return spans


def show(events: list[Any]) -> None:
    opened: dict[str, float] = {}
    for what, ms in events:
        if what == "thread CPU":
            continue
        if what.startswith("/"):
            start = opened.pop(what[1:], ms)
            print(f"  {start:8.1f} .. {ms:8.1f}  ({ms - start:7.1f})  {what[1:]}")
        elif what.startswith(("qmp ", "phase ", "spawn", "fsync", "PREV")):
            opened[what] = ms
        else:
            print(f"  {ms:8.1f}              {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--incremental", action="store_true",
                    help="also time an incremental after each full (nothing changed: its "
                         "fixed cost alone)")
    ap.add_argument("--like-bench-incremental", action="store_true",
                    help="bench_incremental's image, 2 %% changed before each incremental")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another tree's vmafs, run in the same rounds")
    ap.add_argument("--bytecode", action="store_true", help="let Python use .pyc files")
    ap.add_argument("--plain", action="store_true",
                    help="wall times only, of `python -m vmafs` itself (no hooks at all)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    like = args.like_bench_incremental
    args.incremental = args.incremental or like
    global BYTECODE, PLAIN
    BYTECODE, PLAIN = args.bytecode, args.plain
    import guestimage as gi

    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    guest = gi.build_guest()
    work = Path(tempfile.mkdtemp(prefix="vmafs-tl-", dir=args.workdir))
    try:
        size = int(args.size_gib * GiB) // MiB * MiB
        img = work / "disk.raw"
        if like:
            import bench_incremental as bi
            import numpy as np
            size = size // bi.PERIOD * bi.PERIOD
            bi.make_image(img, size)
            rng = np.random.default_rng(2024)
            pristine = work / "pristine.raw"  # bi.restore_image: every full the same disk
            subprocess.run(["cp", "--sparse=always", str(img), str(pristine)], check=True)
            written: list[int] = []
        else:
            make_image(img, size)
        disk = gi.Disk(img, fmt="raw", cache="none")
        converts: list[float] = []
        runs: dict[tuple[str, str], list[tuple[float, list[Any]]]] = {}
        with gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline("idle"),
                       disks=[disk]) as vm:
            vm.wait_for("VMAFS-READY", timeout=180)
            if BYTECODE:  # one untimed run each, which writes the .pyc files
                for tree in trees.values():
                    timed_backup(tree, vm.qmp_path, work / "w.vma", work)
                    (work / "w.vma").unlink()
            for r in range(args.rounds):
                converts.append(timed_convert(img, work))
                line = [f"round {r + 1}: qemu-img convert {converts[-1]:.3f} s"]
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    out = work / "b.vma"
                    if like:
                        bi.restore_image(img, pristine, written)
                        written.clear()
                    runs.setdefault((name, "full"), []).append(
                        timed_backup(tree, vm.qmp_path, out, work))
                    line.append(f"{name} full {runs[name, 'full'][-1][0]:.3f} s")
                    if args.incremental:
                        inc = work / "i.vma"
                        if like:
                            clusters = bi.changed_clusters(rng, size)
                            bi.qemu_io_writes(vm, disk.drive_id, clusters, 0x41 + r)
                            written.extend(clusters.tolist())
                            evict(out)
                        runs.setdefault((name, "incremental"), []).append(
                            timed_backup(tree, vm.qmp_path, inc, work, "--incremental",
                                         str(out)))
                        line.append(f"inc {runs[name, 'incremental'][-1][0]:.3f} s")
                        inc.unlink()
                    out.unlink()
                print(", ".join(line), flush=True)
        conv = statistics.median(converts)
        for (name, kind), got in runs.items():
            walls = [w for w, _ in got]
            med_t = statistics.median(walls)
            pick = min(range(len(walls)), key=lambda i: abs(walls[i] - med_t))
            print(f"\n{name}, {kind}: median {med_t:.3f} s over {len(walls)}; the run "
                  "nearest the median, ms from the start of the command:")
            show(got[pick][1])
        print("\nfixed cost (wall time outside the backup jobs: start-up, imports, set-up, "
              "teardown, commit, exit), median, ms:")
        for (name, kind), got in runs.items():
            fixed = [w * 1000 - sum(ms - start for start, ms, what in _spans(ev)
                                    if what == "phase _wait_jobs") for w, ev in got]
            print(f"  {name:8} {kind:11}: {statistics.median(fixed):7.1f}  "
                  f"(runs: {', '.join(f'{f:.0f}' for f in fixed)})")
        print("\nthe backup jobs (phase _wait_jobs: QEMU's copy), median, ms:")
        for (name, kind), got in runs.items():
            jobs = [sum(ms - start for start, ms, what in _spans(ev) if what == "phase _wait_jobs")
                    for _, ev in got]
            print(f"  {name:8} {kind:11}: {statistics.median(jobs):7.1f}  "
                  f"(runs: {', '.join(f'{j:.0f}' for j in jobs)})")
        print("\nCPU (user + system) of the process (its threads) until the jobs started, the "
              "critical path of the start-up when the machine has a core to spare; a reaped "
              "child's (PREV's reader) apart, median, ms:")
        for (name, kind), got in runs.items():
            cpu = [[float(w) for w in what.split() if w.replace(".", "").isdigit()]
                   for _, ev in got for what, _ in ev if what.startswith("CPU at jobs started")]
            if cpu:
                print(f"  {name:8} {kind:11}: self {statistics.median(c[0] for c in cpu):6.1f}, "
                      f"children {statistics.median(c[1] for c in cpu):6.1f}  (self: "
                      f"{', '.join(f'{c[0]:.0f}' for c in cpu)})")
        print("\nCPU (user + system) of each thread of the process over the whole run (those that "
              "ended before it: PREV's reader, the NBD connections, the writer, the paced "
              "writeback; 'main' includes the interpreter's start and the imports), median, ms:")
        for (name, kind), got in runs.items():
            per = [thread_cpu(ev) for _, ev in got]
            kinds = sorted({k for p in per for k in p}, key=lambda k: -statistics.median(
                p.get(k, 0.0) for p in per))
            print(f"  {name:8} {kind:11}: " + ", ".join(
                f"{k} {statistics.median(p.get(k, 0.0) for p in per):.0f}" for k in kinds))
        print(f"\ndisk {size / GiB:.1f} GiB; qemu-img convert median {conv:.3f} s")
        for name in trees:
            full = statistics.median(w for w, _ in runs[name, "full"])
            text = f"  {name:8}: full {full:.3f} s, convert/full {conv / full:.2f} (>= 0.8)"
            if args.incremental:
                inc = statistics.median(w for w, _ in runs[name, "incremental"])
                what = "2 % changed" if like else "nothing changed"
                text += f"; incremental ({what}) {inc:.3f} s = {inc / full:.3f} of full"
            print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
