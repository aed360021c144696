#!/usr/bin/env python3
"""Guest write latency during a live backup whose archive is on the image's own disk.

One guest (latency mode: a timed 4 KiB O_DIRECT write at a random offset of its disk every
5 ms) runs throughout; backups of its disk are taken one after another, the variants
interleaved round by round (order rotated), with idle windows (no backup) between them as the
same-run baseline.  Per variant: the guest's median / p99 / max write latency during the backups
(pooled over the rounds, and the median of the per-round figures) and the backup's throughput
(device bytes / the job's seconds).  Ratios are against the first variant, measured in the same
run.  Issue 17's targets: median <= 5 ms, p99 <= 30 ms, throughput kept.

A variant is a set of knobs applied to a `vmafs backup` process before it starts (module
constants and BackupOptions fields; `legacy` puts back the writeback of commit 8b49d35: an
unpaced sync_file_range kick every 64 MiB; `{"tree": DIR}` runs the vmafs of another tree,
e.g. `git archive REV | tar -x -C DIR`, to measure a change against what it changes).
`--trace` also prints, per backup, when the slow writes happened next to the device's
in-flight requests and the writer's fsync.

Every round starts from the same state: the image's second half a hole again (the guest's
probes, 4 KiB at random offsets, land there too: the backups had more and more to copy), nothing
dirty (sync), the file system's online discard of the last archive done (the disk's discard
counter still for 0.5 s), the image's page cache dropped. The machine's other I/O is not ours
to stop: compare the no-backup figures.

Usage: python tools/bench_guest_latency.py [--size-gib 2] [--rounds 4] [--variants a,b,...]
       [--old TREE] [--workdir DIR] [--json] [--trace]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import evict, make_front_half_image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import guestimage as gi  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20

VARIANTS: dict[str, dict[str, Any]] = {
    # the output as of 8b49d35: sync_file_range(WRITE) of the whole file every 64 MiB
    "legacy": {"writeback": "legacy", "wake_room": 1 << 40},
    # the current code, whatever its defaults are
    "current": {},
    # no writeback of ours: the kernel's flusher and the final fsync
    "nokick": {"writeback": "none"},
    # paced writeback with explicit windows (see vmafs/container/output.py)
    "paced8x2": {"pace": [8 * MiB, 2]},
    "paced4x4": {"pace": [4 * MiB, 4]},
    "paced16x2": {"pace": [16 * MiB, 2]},
    "paced2x4": {"pace": [2 * MiB, 4]},
    "ahead16": {"pace": [8 * MiB, 2, 16 * MiB]},  # the writer waits for the disk: ~in step
    "ahead256": {"pace": [8 * MiB, 2, 256 * MiB]},
    # the sink's queue: wakes at half empty (as before) with the current writeback
    "wakehalf": {"wake_room": 1 << 40},
    # QEMU's copy workers (x-perf max-workers), with the current output
    "workers1": {"opts": {"max_workers": 1}},
    "workers2": {"opts": {"max_workers": 2}},
    "workers8": {"opts": {"max_workers": 8}},
    # the sink -> writer queue
    "queue16": {"opts": {"queue_bytes": 16 * MiB}},
    "queue256": {"opts": {"queue_bytes": 256 * MiB}},
    # the archive on another device (tmpfs): what the backup costs the guest without the
    # archive's own writes at the disk
    "shm": {"dir": "/dev/shm"},
    # x-perf max-chunk (QEMU's default for an NBD target: 1 MiB per copy request)
    "chunk256k": {"max_chunk": 256 << 10},
    "legacy256k": {"writeback": "legacy", "wake_room": 1 << 40, "max_chunk": 256 << 10},
    "zst256k": {"suffix": ".vma.zst", "max_chunk": 256 << 10},
    "chunk64k": {"max_chunk": 64 << 10},
    "chunk128k": {"max_chunk": 128 << 10},
    "chunk512k": {"max_chunk": 512 << 10},
    "w8c128k": {"opts": {"max_workers": 8}, "max_chunk": 128 << 10},
    "w8c256k": {"opts": {"max_workers": 8}, "max_chunk": 256 << 10},
    "w2c256k": {"opts": {"max_workers": 2}, "max_chunk": 256 << 10},
    # the writer thread's CPU priority (and its zstd and writeback threads')
    "nice5": {"nice_writer": 5},
    "nice10": {"nice_writer": 10},
    # .vma.zst (level 3, 2 threads)
    "zst": {"suffix": ".vma.zst"},
    # the GIL switch interval while the backup runs (vmafs/backup/switching.py: 0.5 ms;
    # Python's default is 5 ms)
    "switch5": {"switch": 0.005},
    "switch05": {"switch": 0.0005},
    "switch1": {"switch": 0.001},
    "c256s1": {"max_chunk": 256 << 10, "switch": 0.001},
    # no backup: CPU load alone (1 or 2 spinning processes for 4 s)
    "hog1": {"hog": 1, "seconds": 4},
    "hog2": {"hog": 2, "seconds": 4},
    "zstnice5": {"suffix": ".vma.zst", "nice_writer": 5},
}

# Runs in the `vmafs backup` process: applies the knobs, records trace events, runs the CLI.
DRIVER = r'''
import dataclasses, json, os, sys, time
knobs = json.loads(sys.argv[1])
trace = knobs.get("trace")
def event(name):
    if trace:
        with open(trace, "a") as f:
            f.write(f"{time.monotonic():.6f} {name}\n")
import vmafs.container.output as out
wb = knobs.get("writeback")
if wb == "legacy":
    class LegacyWritebackFile:
        def __init__(self, raw, **_):
            self.raw, self.written, self._next = raw, 0, 64 << 20
        def write(self, data, /):
            n = self.raw.write(data) or 0
            self.written += n
            if self.written >= self._next:
                self._next = self.written + (64 << 20)
                out.start_writeback(self.raw.fileno())
            return n
        def flush(self):
            pass
        def close(self):
            pass
        stop = close
    out.WritebackFile = LegacyWritebackFile
elif wb == "none":
    class PlainFile:
        def __init__(self, raw, **_):
            self.raw = raw
        def write(self, data, /):
            return self.raw.write(data) or 0
        def flush(self):
            pass
        def close(self):
            pass
        stop = close
    out.WritebackFile = PlainFile
if "pace" in knobs:  # fixed steps: [STEP, WINDOW] or [STEP, WINDOW, AHEAD]
    out.PACE_STEP, out.PACE_WINDOW, *ahead = knobs["pace"]
    out.PACE_MIN_STEP = out.PACE_STEP
    if ahead:
        out.PACE_AHEAD = ahead[0]
if "pace_latency" in knobs:  # adaptive steps: the device time the archive may keep queued
    out.PACE_LATENCY = knobs["pace_latency"]
if "wake_room" in knobs:
    import vmafs.backup.pipe as pipe
    pipe.WAKE_ROOM = knobs["wake_room"]
commit = out.TempFile.commit
def traced_commit(self, *a, **kw):
    event("commit-start")
    try:
        return commit(self, *a, **kw)
    finally:
        event("commit-end")
out.TempFile.commit = traced_commit
import vmafs.backup.live as live
init = live.Backup.__init__
def patched_init(self, opts, *a, **kw):
    init(self, dataclasses.replace(opts, **knobs.get("opts", {})), *a, **kw)
live.Backup.__init__ = patched_init
if "switch" in knobs:  # the GIL's switch interval (the sink waits for it while the writer runs)
    import vmafs.backup.switching as switching
    switching.SWITCH_INTERVAL = knobs["switch"]
    sys.setswitchinterval(knobs["switch"])
if "max_chunk" in knobs:  # x-perf max-chunk, laid into the transaction's backup actions
    import vmafs.backup.qmp as qmp
    execute_all = qmp.Qmp.execute_all
    async def patched_execute_all(self, calls, *a, **kw):
        for cmd, args in calls:
            if cmd == "transaction":
                for act in args["actions"]:
                    if act["type"] == "blockdev-backup":
                        act["data"].setdefault("x-perf", {})["max-chunk"] = knobs["max_chunk"]
        return await execute_all(self, calls, *a, **kw)
    qmp.Qmp.execute_all = patched_execute_all
if "nice_writer" in knobs:  # the writer thread and the threads it starts (zstd, writeback)
    import vmafs.backup.writer_thread as wt
    wmain = wt.WriterThread._main
    def niced_main(self):
        import threading
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), knobs["nice_writer"])
        wmain(self)
    wt.WriterThread._main = niced_main
if trace:  # how long the sink waited for room in the pipe
    import inspect
    import vmafs.backup.pipe as pipe
    put = pipe.Pipe.put
    waits = []
    def waited(t):
        d = time.monotonic() - t
        if d > 0.002:
            waits.append(d)
            event(f"putwait:{d:.4f}")
    advance = getattr(out, "Pacer", None) and out.Pacer.advance
    if advance:
        def timed_advance(self, written):
            t = time.monotonic()
            try:
                return advance(self, written)
            finally:
                d = time.monotonic() - t
                if d > 0.002:
                    event(f"pacewait:{d:.4f}")
        out.Pacer.advance = timed_advance
    steps = {}
    if hasattr(out.Pacer, "step"):  # the adaptive pacer's step sizes
        pstep = out.Pacer.step
        def counted_step(self):
            n = pstep(self)
            steps[n] = steps.get(n, 0) + 1
            return n
        out.Pacer.step = counted_step
    if inspect.iscoroutinefunction(put):  # a tree from before the sinks' threads
        async def timed_put(self, item, nbytes):
            t = time.monotonic()
            await put(self, item, nbytes)
            waited(t)
    else:
        def timed_put(self, item, nbytes):
            t = time.monotonic()
            put(self, item, nbytes)
            waited(t)
    pipe.Pipe.put = timed_put
    sizes = {}
    sink_write = pipe.DiskSink.write
    if inspect.iscoroutinefunction(sink_write):
        async def counted_write(self, offset, data):
            sizes[len(data)] = sizes.get(len(data), 0) + 1
            await sink_write(self, offset, data)
    else:
        def counted_write(self, offset, data):
            sizes[len(data)] = sizes.get(len(data), 0) + 1
            sink_write(self, offset, data)
    pipe.DiskSink.write = counted_write
event("start")
from vmafs.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    if trace:
        event(f"put-waits:{len(waits)}:{sum(waits):.3f}s:max{max(waits, default=0):.3f}s")
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        event("writes:" + "/".join(f"{n}x{k >> 10}K" for k, n in top))
        if steps:
            event("pace-steps:" + "/".join(f"{n}x{k >> 10}K" for k, n in sorted(steps.items())))
    t = os.times()
    event(f"cpu:{t.user + t.system:.2f}s")
    event("end")
sys.exit(rc)
'''


def env(tree: Path = ROOT) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def stats(lat: list[float]) -> dict[str, float]:
    return {"median": statistics.median(lat), "p99": pct(lat, 99), "max": max(lat),
            "n": len(lat)}


SYS_PREFIXES = ("pgscan_direct", "pgscan_kswapd", "allocstall_", "compact_stall",
                "pgsteal_direct")


class Recorder:
    """Stamps the guest's latency lines and the disk's in-flight requests with host time."""

    def __init__(self, serial: Path, disk: str) -> None:
        self.serial = serial
        self.disk = disk
        self.lines: list[tuple[float, float]] = []  # (host time, latency ms)
        self.disk_samples: list[tuple[float, int, int]] = []  # (time, in flight, sectors written)
        self.sys_samples: list[tuple[float, dict[str, int]]] = []  # (time, SYS_KEYS' values)
        self._stop = threading.Event()
        self._pos = len(serial.read_bytes())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _diskstat(self) -> tuple[int, int, int]:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == self.disk:
                return int(f[11]), int(f[9]), int(f[16]) if len(f) > 16 else 0
        return 0, 0, 0

    def _sample(self, now: float) -> None:
        """The disk's in-flight requests, the page cache's dirty and writeback pages and the
        kernel's reclaim counters, every ~5 ms (0.1 ms of reading /proc)."""
        inflight, written, discarded = self._diskstat()
        self.disk_samples.append((now, inflight, written))
        vals = {"discard_sectors": discarded}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback", "MemFree"):
                vals[key] = int(rest.split()[0])
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, val = line.partition(" ")
            if key.startswith(SYS_PREFIXES):
                vals[key] = int(val)
        self.sys_samples.append((now, vals))

    def _run(self) -> None:
        buf = b""
        with open(self.serial, "rb") as f:
            f.seek(self._pos)
            while not self._stop.is_set():
                chunk = f.read()
                now = time.monotonic()
                if chunk:
                    buf += chunk
                    *full, buf = buf.split(b"\n")
                    for line in full:
                        m = re.match(rb"VMAFS-LAT (\d+)", line)
                        if m:
                            self.lines.append((now, int(m.group(1)) / 1000))
                self._sample(now)
                time.sleep(0.005)

    def between(self, t0: float, t1: float) -> list[float]:
        return [ms for t, ms in self.lines if t0 <= t < t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def settle(disk: str, limit: float = 15.0) -> float:
    """Wait until the disk has no discards going on (the file system's online discard of the
    last round's deleted archive runs after its journal commit, in the background, and
    competes with the next round: GBs of it were seen in the idle window and in the first
    second of a backup); seconds waited. Others' discards are waited for too, up to limit."""
    def discarded() -> int:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == disk and len(f) > 16:
                return int(f[16])
        return 0
    t0 = time.monotonic()
    last, quiet_since = discarded(), t0
    while time.monotonic() - t0 < limit:
        time.sleep(0.05)
        now, cur = time.monotonic(), discarded()
        if cur != last:
            last, quiet_since = cur, now
        elif now - quiet_since >= 0.5:
            break
    return time.monotonic() - t0


def root_disk(path: Path) -> str:
    dev = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    return name


HOG = ("import sys, time\nend = time.monotonic() + float(sys.argv[1])\n"
       "while time.monotonic() < end: pass")


def run_hog(knobs: dict[str, Any]) -> dict[str, Any]:
    """No backup: N processes spinning on the CPU for a while (what CPU load alone does)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", HOG, str(knobs["seconds"])])
             for _ in range(knobs["hog"])]
    for p in procs:
        p.wait()
    t1 = time.monotonic()
    return {"t0": t0, "t1": t1, "seconds": t1 - t0, "device_bytes": 0, "wall": t1 - t0}


def run_backup(vm: gi.QemuVM, work: Path, knobs: dict[str, Any], trace: Path | None
               ) -> dict[str, Any]:
    if "hog" in knobs:
        return run_hog(knobs)
    out = Path(knobs.get("dir", work)) / f"lat-{os.getpid()}{knobs.get('suffix', '.vma')}"
    out.unlink(missing_ok=True)
    knobs = dict(knobs)
    if trace is not None:
        trace.unlink(missing_ok=True)
        knobs["trace"] = str(trace)
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    tree = Path(knobs.get("tree", ROOT))  # another tree's vmafs (`git archive REV`), same knobs
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(knobs), "backup", "--qmp",
                           str(vm.qmp_path), "-o", str(out), "-q", "--json"],
                          cwd=tree, env=env(tree), check=False, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"backup failed ({knobs}): {proc.stderr.strip()}")
    t1 = time.monotonic()
    summary = json.loads(proc.stdout)
    out.unlink()
    return {"t0": t0, "t1": t1, "seconds": summary["seconds"],
            "device_bytes": summary["device_bytes"], "wall": t1 - t0}


def show_trace(rec: Recorder, b: dict[str, Any], trace: Path) -> None:
    """The backup's events, then per 0.25 s from its start: the guest's slowest write, the
    disk's peak in-flight requests and MiB written, the page cache's peak Dirty and Writeback,
    and what the kernel's reclaim and the file system's discards did in that quarter second."""
    t0 = b["t0"]
    events = []
    if trace.exists():
        for line in trace.read_text().splitlines():
            t, name = line.split()
            events.append((float(t) - t0, name))
    marks = [(t, n) for t, n in events if not n.startswith(("putwait", "pacewait"))]
    print("    events: " + ", ".join(f"{n}@{t:.2f}" for t, n in marks))
    for kind in ("putwait", "pacewait"):
        waits = [(t, float(n.split(":")[1])) for t, n in events if n.startswith(kind)]
        if waits:
            print(f"    {kind} > 5 ms (end s: ms): " + ", ".join(
                f"{t:.2f}:{d * 1000:.0f}" for t, d in waits if d > 0.005))
    pre = [v for t, v in rec.sys_samples if t0 - 2.5 <= t < t0]
    span = [v for t, v in rec.sys_samples if t0 <= t < b["t1"]]
    if pre and span:
        def delta(vals: list[dict[str, int]], pre_key: str) -> int:
            return sum(vals[-1].get(k, 0) - vals[0].get(k, 0) for k in vals[0]
                       if k.startswith(pre_key))
        for label, vals in (("idle 2.5 s before", pre), ("backup", span)):
            print(f"    {label}: pgscan_direct {delta(vals, 'pgscan_direct')}, pgscan_kswapd "
                  f"{delta(vals, 'pgscan_kswapd')}, allocstall {delta(vals, 'allocstall_')}, "
                  f"compact_stall {delta(vals, 'compact_stall')}, discarded "
                  f"{delta(vals, 'discard_sectors') * 512 / MiB:.0f} MiB, Dirty at start "
                  f"{vals[0].get('Dirty', 0) >> 10} MiB, MemFree min "
                  f"{min(v.get('MemFree', 0) for v in vals) >> 10} MiB")
    quarter = 0.25
    rows = int((b["t1"] - t0) / quarter) + 1
    print("      t s | guest max ms (>20) | in flight | wr MiB | Dirty / Wb MiB | "
          "pgscan dir/ksw | allocst | discard MiB")
    for i in range(rows):
        a, z = t0 + i * quarter, t0 + (i + 1) * quarter
        lat = [ms for t, ms in rec.lines if a <= t < z]
        dsk = [(q, w) for t, q, w in rec.disk_samples if a <= t < z]
        sysv = [v for t, v in rec.sys_samples if a <= t < z]
        if not dsk or not sysv:
            continue

        def d(key: str, vals: list[dict[str, int]] = sysv) -> int:
            return sum(vals[-1].get(k, 0) - vals[0].get(k, 0) for k in vals[0]
                       if k.startswith(key))
        print(f"    {i * quarter:5.2f} | {max(lat, default=0):6.1f} ({sum(x > 20 for x in lat)})"
              f"         | {max(q for q, _ in dsk):9d} | "
              f"{(dsk[-1][1] - dsk[0][1]) * 512 / MiB:6.0f}"
              f" | {max(v.get('Dirty', 0) for v in sysv) >> 10:5d} / "
              f"{max(v.get('Writeback', 0) for v in sysv) >> 10:4d}   | "
              f"{d('pgscan_direct'):6d} / {d('pgscan_kswapd'):6d} | {d('allocstall_'):7d} | "
              f"{d('discard_sectors') * 512 / MiB:5.0f}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets (inline JSON knobs have commas of their own)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and not depth:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variants", default="legacy,current",
                    help=f"comma-separated, the first is the baseline; from {', '.join(VARIANTS)}"
                    "; or NAME=JSON for knobs given inline")
    ap.add_argument("--old", type=Path, default=None,
                    help="also run the vmafs of this tree (a `git worktree add` of the commit "
                    "before, its C extension built), as the first variant 'old'")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--idle-s", type=float, default=2.0, help="idle window before each backup")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    variants: dict[str, dict[str, Any]] = {}
    if args.old is not None:
        variants["old"] = {"tree": str(args.old.resolve())}
    for spec in _split_top(args.variants):
        name, sep, js = spec.partition("=")
        variants[name] = json.loads(js) if sep else VARIANTS[name]
    names = list(variants)

    guest = gi.build_guest()
    work = Path(tempfile.mkdtemp(prefix="vmafs-bench-lat-", dir=args.workdir))
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    idle: list[float] = []
    try:
        size = int(args.size_gib * GiB) // MiB * MiB
        img = work / "disk.raw"
        make_front_half_image(img, size)
        disk = root_disk(work)
        append = guest.cmdline("latency", count=10_000_000, interval_ms=5, seed=7)
        with gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=append,
                       disks=[gi.Disk(img, fmt="raw", cache="none")]) as vm:
            vm.wait_for("VMAFS-READY", timeout=120)
            rec = Recorder(vm.serial_log, disk)
            try:
                time.sleep(2)
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        # the same start for every round: the disk's second half a hole
                        # again (the guest's random writes fill it: a backup had ever more
                        # data to copy, 1.8 s in round 1, 3.7 s in round 6), nothing of ours
                        # dirty, the last archive's discards done, the image's page cache
                        # dropped (QEMU reads it O_DIRECT; it was written through the cache)
                        subprocess.run(["fallocate", "--punch-hole", "--offset", str(size // 2),
                                        "--length", str(size - size // 2), str(img)],
                                       check=True)
                        subprocess.run(["sync"], check=True)
                        settle(disk)
                        evict(img)
                        t = time.monotonic()
                        time.sleep(args.idle_s)
                        idle += rec.between(t, time.monotonic())
                        trace = work / "trace.txt" if args.trace else None
                        b = run_backup(vm, work, variants[name], trace)
                        time.sleep(0.3)  # the guest's last lines
                        b["lat"] = rec.between(b["t0"], b["t1"])
                        results[name].append(b)
                        s = stats(b["lat"])
                        print(f"round {r + 1} {name:>10}: median {s['median']:5.1f} ms  p99 "
                              f"{s['p99']:6.1f} ms  max {s['max']:6.1f} ms  n {s['n']:4d}  "
                              f"backup {b['seconds']:.2f} s "
                              f"({b['device_bytes'] / b['seconds'] / MiB:.0f} MiB/s)",
                              file=sys.stderr, flush=True)
                        if trace is not None:
                            show_trace(rec, b, trace)
            finally:
                rec.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report: dict[str, Any] = {"disk_bytes": size, "rounds": args.rounds, "idle": stats(idle),
                              "variants": {}}
    for name in names:
        runs = results[name]
        pooled = stats([ms for b in runs for ms in b["lat"]])
        per = [stats(b["lat"]) for b in runs]
        rate = statistics.median(b["device_bytes"] / b["seconds"] for b in runs) or 1.0
        report["variants"][name] = {
            "knobs": variants[name], "pooled": pooled,
            "median_of_rounds": {k: statistics.median(p[k] for p in per)
                                 for k in ("median", "p99", "max")},
            "rounds": [{"median": p["median"], "p99": p["p99"], "max": p["max"],
                        "seconds": b["seconds"]} for p, b in zip(per, runs, strict=True)],
            "rate_mib_s": rate / MiB,
            "seconds": statistics.median(b["seconds"] for b in runs),
        }
    base = report["variants"][names[0]]
    for v in report["variants"].values():
        v["rate_ratio"] = v["rate_mib_s"] / base["rate_mib_s"]
        v["p99_ratio"] = v["pooled"]["p99"] / base["pooled"]["p99"]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    i = report["idle"]
    print(f"disk {size / GiB:.1f} GiB, archive on the image's disk, {args.rounds} rounds "
          f"interleaved; no backup: median {i['median']:.1f} ms, p99 {i['p99']:.1f} ms, "
          f"max {i['max']:.1f} ms (n {i['n']})")
    print(f"{'variant':>10} | pooled median / p99 / max ms | round-median p99 | backup MiB/s"
          f" (x {names[0]}) | p99 x {names[0]} | targets (med<=5, p99<=30)")
    for name, v in report["variants"].items():
        p, m = v["pooled"], v["median_of_rounds"]
        ok = "PASS" if p["median"] <= 5 and p["p99"] <= 30 else "MISS"
        print(f"{name:>10} | {p['median']:5.1f} / {p['p99']:6.1f} / {p['max']:6.1f}     |"
              f" {m['p99']:6.1f}           | {v['rate_mib_s']:6.0f} ({v['rate_ratio']:.2f})"
              f"       | {v['p99_ratio']:.2f}      | {ok}")
    print("per round, p99 ms (backup s):")
    for name, v in report["variants"].items():
        print(f"{name:>10} | " + "  ".join(f"{r['p99']:5.1f} ({r['seconds']:.2f})"
                                           for r in v["rounds"]))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
