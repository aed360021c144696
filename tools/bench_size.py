#!/usr/bin/env python3
"""Seekable `.vma.zst` size, create speed and random reads against vzdump's one-stream zstd -3.

Builds two real disk images (cached in --workdir):

* ``usr``: a 1.5 GiB ext4 file system made with ``mkfs.ext4 -d`` from this machine's /usr
  (bin, sbin, include, lib/x86_64-linux-gnu: binaries, libraries, headers);
* ``db``: a 1 GiB ext4 file system holding a SQLite database of many small, repetitive records
  (orders with customers, cities, products, timestamps) and its indexes.

Baselines, in the same run as every variant: vzdump's way, ``vmafs create -o - | zstd -3``
(one stream, one compression thread: vzdump's default; its size is 1.000 and its wall time the
speed baseline the issue names) and the same with ``zstd -T2 -3`` (both cores; zstd's
multi-threaded format, same bytes here), each variant flanked by one of each.  Every variant
(``default``: what ``vmafs create`` does unasked; or frame size x level x zstd parameters x
threads) is written by ``vmafs create`` in a child process (the real create path: image reads,
checksums, index) and reported as

* size: archive bytes / vzdump-way bytes (goal <= 1.01);
* speed: the pipeline's wall time / create's, against ``zstd -3`` and ``zstd -T2 -3``
  (goal >= 1.2 against ``zstd -3``), and the CPU seconds;
* rand4k: cold 4 KiB reads at random offsets of the image's data (non-zero blocks) through
  ``vmafs mount``, every variant mounted at once and read at the same offsets in turn, the
  archive's and the mounted disk's pages evicted before each read (posix_fadvise, never
  drop_caches: the machine is shared): median and p90 ms (goal <= 1.5 ms), and the mount
  daemon's CPU time per read (all its threads, from /proc: it grows far less with the
  machine's load than the latency does) — with --mount;
  ``--tree DIR`` mounts the first variant's archive by another checkout too (e.g. ``git
  archive`` of an older commit), read in the same turns: the per-read ratio is printed.

``--stages`` instead mounts the default ``.vma.zst`` of each image with a daemon that stamps
(time.perf_counter_ns, one clock with this process) each FUSE read's way through it, and prints
the medians of one cold 4 KiB read's stages: the kernel and the loop to the read handler, the
handler to its worker call, the worker's wake-up, the worker (disk and decoding), its answer
back to the loop, the reply to the reader; and the FUSE requests (count, bytes) a read made.

Wall times swing on a shared 2-core machine, so runs are interleaved for --rounds rounds and
the median of the per-round ratios is shown; --nice -10 keeps other users' jobs from dominating
the latencies.  The last lines are the curve (size vs read latency vs speed) per image and the
default's verdict against the goals.

    python3 tools/bench_size.py [--images usr,db] [--rounds 2] [--mount] [--reads 300] [--nice -10]
                                [--variants default,F:L[:opts],...] [--workdir DIR] [--tree DIR]
                                [--stages]

A variant is ``default`` or ``FRAME_KIB:LEVEL`` plus options joined by ``:``: ``tN`` threads,
``ldm``, ``nocheck`` (frames without content checksums, as ``zstd --no-check``), ``wN`` window
log, ``sN`` strategy, ``hN``/``cN``/``mN`` hash/chain/search logs,
``nN`` min match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import evict  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
DISK = "disk-drive-scsi0.raw"
USR_PARTS = ("bin", "sbin", "include", "lib/x86_64-linux-gnu")
DEFAULT_VARIANTS = "default,1536:4,2048:3,1280:4,1024:3"
GOAL_SIZE, GOAL_SPEED, GOAL_READ_MS = 1.01, 1.2, 1.5  # issue 17

# A child that runs `vmafs create` with the zstd output made as the variant says.
CREATE_CHILD = r"""
import json, sys
from vmafs.container import output, zstd_output
spec = json.loads(sys.argv[1])
def make(target, compressed, level, threads, frame_size=None):
    if not compressed:
        return zstd_output.PlainOutput(target)
    return zstd_output.SeekableZstdOutput(
        target, frame_size=spec["frame"], level=spec["level"],
        threads=spec.get("threads", threads), params=spec.get("params") or None)
if spec.get("frame"):
    output._make = make
from vmafs.cli import main
sys.exit(main(sys.argv[2:]))
"""


def env(tree: Path = ROOT) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def vmafs(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmafs", *args]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# A child that runs `vmafs mount -f` with each FUSE read stamped on its way (--stages): handler
# in/out, worker call put/start/end/back; the stamps are written as JSON to argv[1] at exit.
STAGES_CHILD = r"""
import atexit, json, runpy, sys, time
from vmafs.archive import serving
from vmafs.mount import fs
stamp, recs, where = time.perf_counter_ns, [], sys.argv[1]
atexit.register(lambda: json.dump(recs, open(where, "w")))
read, run = fs.VmaFS.read, serving._Workers.run
async def traced_read(self, fh, off, size):
    rec = {"in": stamp(), "size": size}
    recs.append(rec)
    try:
        return await read(self, fh, off, size)
    finally:
        rec["out"] = stamp()
async def traced_run(self, fn):
    rec = recs[-1] if recs else {}
    def call():
        rec["start"] = stamp()
        try:
            return fn()
        finally:
            rec["end"] = stamp()
    rec["put"] = stamp()
    try:
        return await run(self, call)
    finally:
        rec["back"] = stamp()
fs.VmaFS.read, serving._Workers.run = traced_read, traced_run
sys.argv = ["vmafs", *sys.argv[2:]]
runpy.run_module("vmafs", run_name="__main__", alter_sys=True)
"""
STAGES = (("kernel+loop to handler", "t0", "in"), ("handler to worker call", "in", "put"),
          ("worker wake-up", "put", "start"), ("worker (disk, decoding)", "start", "end"),
          ("answer to the loop", "end", "back"), ("loop to reply", "back", "out"),
          ("reply to the reader", "out", "t1"), ("total", "t0", "t1"))


# --- images --------------------------------------------------------------------------------


def build_usr_image(path: Path, size: int = 3 * GiB // 2) -> None:
    """An ext4 image of /usr's binaries, libraries and headers (hard-linked staging tree)."""
    stage = path.with_suffix(".stage")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for part in USR_PARTS:
        dest = stage / "usr" / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        # hard links when /usr is on the same file system, copies otherwise
        cp = subprocess.run(["cp", "-al", f"/usr/{part}", str(dest)], capture_output=True)
        if cp.returncode:
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["cp", "-a", f"/usr/{part}", str(dest)], check=True)
    make_ext4(path, size, stage)
    shutil.rmtree(stage, ignore_errors=True)


def build_db_image(path: Path, size: int = GiB, db_bytes: int = 640 * MiB) -> None:
    """An ext4 image holding one SQLite database of small repetitive records and indexes."""
    stage = path.with_suffix(".stage")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "var" / "lib" / "shop").mkdir(parents=True)
    db = stage / "var" / "lib" / "shop" / "shop.db"
    rnd = random.Random(5)
    first = ["anna", "ben", "carla", "dario", "eva", "felix", "greta", "hugo", "ines", "jonas",
             "klara", "luca", "mia", "noah", "olga", "paul", "rosa", "sven", "tina", "uwe"]
    last = ["meier", "schmidt", "schulz", "fischer", "weber", "wagner", "becker", "hoffmann",
            "koch", "richter", "klein", "wolf", "neumann", "schwarz", "braun", "zimmermann"]
    cities = ["berlin", "hamburg", "munich", "cologne", "frankfurt", "stuttgart", "leipzig",
              "dresden", "bremen", "hanover", "nuremberg", "essen", "bonn", "kiel", "ulm"]
    products = [f"{a} {b}" for a in ("red", "blue", "steel", "oak", "smart", "mini", "pro")
                for b in ("chair", "lamp", "desk", "kettle", "phone case", "backpack", "mug")]
    statuses = ["new", "paid", "shipped", "delivered", "returned", "cancelled"]
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
                "city TEXT, created TEXT)")
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, product TEXT, "
                "quantity INTEGER, price REAL, status TEXT, ordered TEXT, note TEXT)")
    customers = []
    for i in range(200_000):
        f, la = rnd.choice(first), rnd.choice(last)
        customers.append((i, f"{f.title()} {la.title()}", f"{f}.{la}{i % 997}@example.com",
                          rnd.choice(cities), f"20{rnd.randint(15, 24)}-{rnd.randint(1, 12):02d}"
                          f"-{rnd.randint(1, 28):02d}"))
    con.executemany("INSERT INTO customers VALUES (?,?,?,?,?)", customers)
    notes = ["", "", "", "gift wrap", "leave at the door", "call before delivery",
             "invoice to company address", "express"]
    order_id = 0
    while db.stat().st_size < db_bytes * 2 // 3:
        rows = []
        for _ in range(100_000):
            order_id += 1
            ts = 1_600_000_000 + order_id * 37 + rnd.randint(0, 30)
            rows.append((order_id, rnd.randrange(200_000), rnd.choice(products),
                         rnd.randint(1, 5), round(rnd.uniform(2, 300), 2),
                         rnd.choice(statuses), time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.gmtime(ts)),
                         rnd.choice(notes)))
        con.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?,?,?)", rows)
        con.commit()
    con.execute("CREATE INDEX orders_customer ON orders (customer, ordered)")
    con.execute("CREATE INDEX orders_status ON orders (status, product)")
    con.commit()
    con.close()
    make_ext4(path, size, stage)
    shutil.rmtree(stage, ignore_errors=True)


def make_ext4(path: Path, size: int, root: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(tmp)], check=True)
    tmp.rename(path)


BUILDERS = {"usr": build_usr_image, "db": build_db_image}


def image(work: Path, name: str) -> Path:
    path = work / f"{name}.raw"
    if not path.exists():
        t = time.perf_counter()
        BUILDERS[name](path)
        print(f"built {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


# --- variants ------------------------------------------------------------------------------

OPTIONS = {"w": "window_log", "s": "strategy", "h": "hash_log", "c": "chain_log",
           "m": "search_log", "n": "min_match"}


def parse_variant(text: str) -> dict[str, object]:
    """``FRAME_KIB:LEVEL[:opt]...`` as the child's spec (see the module docstring)."""
    if text == "default":
        return {"name": text, "params": {}}
    frame, level, *opts = text.split(":")
    spec: dict[str, object] = {"name": text, "frame": int(frame) << 10, "level": int(level)}
    params: dict[str, int] = {}
    for opt in opts:
        if opt == "ldm":
            params["enable_ldm"] = 1
        elif opt == "nocheck":  # frames without zstd's content checksum (zstd --no-check)
            params["write_checksum"] = 0
        elif opt[0] == "t":
            spec["threads"] = int(opt[1:])
        elif opt[0] in OPTIONS:
            params[OPTIONS[opt[0]]] = int(opt[1:])
        else:
            raise SystemExit(f"bench_size: unknown variant option {opt!r} in {text!r}")
    spec["params"] = params
    return spec


def timed(argv: list[str], **kw: object) -> tuple[float, float]:
    """Wall and CPU seconds (children's user + system) of one command run to completion."""
    os.sync()
    t, c = time.perf_counter(), children_cpu()
    subprocess.run(argv, check=True, env=env(), **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t, children_cpu() - c


def vzdump_way(img: Path, out: Path, threads: int) -> tuple[float, float]:
    """`vmafs create -o - | zstd [-T2] -3 > out`, then fsync (create syncs its archive too)."""
    out.unlink(missing_ok=True)
    cmd = (f"{sys.executable} -m vmafs create -q -o - drive-scsi0={img} "
           f"| zstd -q -T{threads} -3 -c > {out} && sync {out}")
    return timed(["bash", "-o", "pipefail", "-c", cmd])


def create_variant(img: Path, out: Path, spec: dict[str, object]) -> tuple[float, float]:
    out.unlink(missing_ok=True)
    return timed([sys.executable, "-c", CREATE_CHILD, json.dumps(spec), "create", "-q",
                  "-o", str(out), f"drive-scsi0={img}"])


def data_offsets(img: Path, n: int, seed: int) -> list[int]:
    """``n`` random 4 KiB-aligned offsets of non-zero blocks of the image (stored data)."""
    rnd = random.Random(seed)
    size = img.stat().st_size
    found: list[int] = []
    zero = bytes(4096)
    with open(img, "rb") as f:
        while len(found) < n:
            off = rnd.randrange(size // 4096) * 4096
            f.seek(off)
            if f.read(4096) != zero:
                found.append(off)
    return found


def daemon_cpu(pid: int) -> float:
    """CPU seconds the threads of process ``pid`` have run (schedstat, ns resolution; a
    thread that ended takes its share along: a mount's threads live as long as it reads)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def wait_mounted(archive: Path, mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    """Back once the mount daemon shows the disk (a hang guard of 60 s)."""
    deadline = time.monotonic() + 60
    while not (mnt / DISK).exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{archive} did not get mounted")
        time.sleep(0.02)


@contextmanager
def mounted(archive: Path, mnt: Path, tree: Path = ROOT,
            pids: dict[Path, int] | None = None) -> Iterator[Path]:
    """The mounted disk of ``archive``; ``pids`` gets the mount daemon's pid by mountpoint."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(vmafs("mount", "-f", str(archive), str(mnt)), env=env(tree),
                            cwd="/")  # not this checkout's vmafs when tree is another
    try:
        wait_mounted(archive, mnt, proc)
        if pids is not None:
            pids[mnt] = proc.pid
        yield mnt / DISK
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)


def cold_reads(archives: dict[str, Path], work: Path, offsets: list[int],
               trees: dict[str, Path] | None = None
               ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Latency of 4 KiB preads through a mount of each archive, all mounted at once and read
    in turn at the same offsets (rotating who goes first), the archive's and the disk's pages
    evicted before each; ``trees``: the checkout that mounts an archive, by name (this one's
    by default). Also each mount daemon's CPU seconds per read."""
    times: dict[str, list[float]] = {name: [] for name in archives}
    pids: dict[Path, int] = {}
    with ExitStack() as stack:
        fds, disks = {}, {}
        for i, (name, archive) in enumerate(archives.items()):
            tree = (trees or {}).get(name, ROOT)
            disks[name] = stack.enter_context(mounted(archive, work / f"mnt{i}", tree, pids))
            fds[name] = os.open(disks[name], os.O_RDONLY)
            stack.callback(os.close, fds[name])
            os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_RANDOM)
        names = list(archives)
        pid = {name: pids[disks[name].parent] for name in names}
        cpu0 = {name: daemon_cpu(pid[name]) for name in names}
        for k, off in enumerate(offsets):
            for name in names[k % len(names):] + names[:k % len(names)]:
                evict(archives[name])
                os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                os.pread(fds[name], 4096, off)
                times[name].append(time.perf_counter() - t)
        cpu = {name: (daemon_cpu(pid[name]) - cpu0[name]) / max(1, len(offsets))
               for name in names}
    return times, cpu


def stages(work: Path, name: str, reads: int) -> None:
    """--stages: where one cold 4 KiB read through a mount of the default .vma.zst goes."""
    img = image(work, name)
    archive, mnt, out = (work / f"{name}.stages.vma.zst", work / "mnt-stages",
                         work / "stages.json")
    subprocess.run(vmafs("create", "-q", "-o", str(archive), f"drive-scsi0={img}"), check=True,
                   env=env())
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", STAGES_CHILD, str(out), "mount", "-f",
                             str(archive), str(mnt)], env=env(), cwd="/")
    clock: list[tuple[int, int]] = []
    try:
        wait_mounted(archive, mnt, proc)
        time.sleep(1)  # the block sums' preload, if any, done
        fd = os.open(mnt / DISK, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            cpu0 = daemon_cpu(proc.pid)
            for off in data_offsets(img, reads, seed=5):
                evict(archive)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter_ns()
                os.pread(fd, 4096, off)
                clock.append((t0, time.perf_counter_ns()))
            cpu = (daemon_cpu(proc.pid) - cpu0) / reads
        finally:
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)
        archive.unlink(missing_ok=True)
    recs = json.loads(out.read_text())
    out.unlink()
    per: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
    requests: list[tuple[int, int]] = []
    for t0, t1 in clock:
        mine = [r for r in recs if t0 <= r["in"] <= t1]
        requests.append((len(mine), sum(r["size"] for r in mine)))
        if len(mine) == 1 and "start" in mine[0]:
            at = dict(mine[0], t0=t0, t1=t1)
            for label, a, b in STAGES:
                per[label].append((at[b] - at[a]) / 1e3)
    counts = sorted(set(requests))
    print(f"\n== {name}: one cold 4 KiB read through a mount of the default .vma.zst, "
          f"{reads} reads, load average {os.getloadavg()[0]:.1f}; FUSE requests a read "
          f"(count, bytes): {counts[:6]}; daemon CPU {cpu * 1e3:.2f} ms a read")
    for label, values in per.items():
        if values:
            print(f"{label:>26}: p50 {statistics.median(values):8.1f} us, "
                  f"p90 {pct(values, 0.9):8.1f} us")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def bench_image(work: Path, name: str, variants: list[dict[str, object]], rounds: int,
                reads: int, mount: bool, tree: Path | None = None) -> list[dict[str, object]]:
    """Every variant between a `zstd -3` and a `zstd -T2 -3` pipeline run, round by round;
    with ``tree``, the first variant's archive is also mounted by that checkout and read in
    the same turns."""
    img = image(work, name)
    refs = {t: work / f"{name}.vzdump-T{t}.vma.zst" for t in (1, 2)}
    # the stored stream alone in one zstd -3 stream (no pipe): what frames cost
    plain = work / f"{name}.plain.vma"
    if not plain.exists():
        subprocess.run(vmafs("create", "-q", "-o", str(plain), f"drive-scsi0={img}"),
                       check=True, env=env())
    one = len(subprocess.run(["zstd", "-q", "-3", "-c", str(plain)], check=True,
                             capture_output=True).stdout)
    print(f"\n== {name}: image {img.stat().st_size / GiB:.2f} GiB, VMA stream "
          f"{plain.stat().st_size / 1e6:.1f} MB, one-stream zstd -3 {one / 1e6:.1f} MB",
          flush=True)
    offsets = data_offsets(img, reads, seed=11) if mount else []
    names = [str(v["name"]) for v in variants]
    keys = ("size", "size2", "speed1", "speed2", "cpu1", "cpu2", "wall", "cpu", "lat",
            "read_cpu")
    rows: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    base: dict[str, list[float]] = {k: [] for k in ("wall1", "wall2", "cpu1", "cpu2", "bytes1",
                                                     "bytes2")}
    archives = {n: work / f"{name}.{i}.vma.zst" for i, n in enumerate(names)}
    other = f"{names[0]}@tree"
    other_lat: list[float] = []
    other_cpu: list[float] = []
    for r in range(rounds):
        for spec in variants:
            # flanked by both pipelines: wall times drift within a minute
            first, second = (1, 2) if r % 2 == 0 else (2, 1)
            got = {first: vzdump_way(img, refs[first], first)}
            n = str(spec["name"])
            wall, cpu = create_variant(img, archives[n], spec)
            got[second] = vzdump_way(img, refs[second], second)
            row = rows[n]
            for t in (1, 2):
                base[f"wall{t}"].append(got[t][0])
                base[f"cpu{t}"].append(got[t][1])
                base[f"bytes{t}"].append(refs[t].stat().st_size)
                row[f"speed{t}"].append(got[t][0] / wall)
                row[f"cpu{t}"].append(got[t][1] / cpu)
            size = archives[n].stat().st_size
            row["size"].append(size / refs[1].stat().st_size)
            row["size2"].append(size / refs[2].stat().st_size)
            row["wall"].append(wall)
            row["cpu"].append(cpu)
            print(f"round {r + 1} {name} {n:>16}: size {row['size'][-1]:.4f}  speed "
                  f"{row['speed1'][-1]:.2f}x zstd -3, {row['speed2'][-1]:.2f}x -T2 ({wall:.1f} s "
                  f"vs {got[1][0]:.1f} / {got[2][0]:.1f} s; CPU {cpu:.1f} vs {got[1][1]:.1f} / "
                  f"{got[2][1]:.1f} s)", flush=True)
        if mount:
            per = len(offsets) // rounds
            reading = dict(archives)
            if tree is not None:
                reading[other] = archives[names[0]]
            lat, read_cpu = cold_reads(reading, work, offsets[r * per:(r + 1) * per],
                                       {other: tree} if tree is not None else None)
            for n, values in lat.items():
                (other_lat if n == other else rows[n]["lat"]).extend(values)
                (other_cpu if n == other else rows[n]["read_cpu"]).append(read_cpu[n])
            print(f"round {r + 1} {name} rand4k p50 ms (daemon CPU ms a read): " + ", ".join(
                f"{n} {statistics.median(v) * 1e3:.2f} ({read_cpu[n] * 1e3:.2f})"
                for n, v in lat.items()) + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    for path in (*refs.values(), *archives.values()):
        path.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in base.items()}
    print(f"\n{name}: vzdump's way, vmafs create -o - | zstd -3 = 1.000: {med['bytes1'] / 1e6:.1f}"
          f" MB, {med['wall1']:.1f} s wall, {med['cpu1']:.1f} s CPU; with zstd -T2 -3: "
          f"{med['bytes2'] / med['bytes1']:.4f} the size, {med['wall2']:.1f} s wall, "
          f"{med['cpu2']:.1f} s CPU; one-stream zstd -3 of the stored stream alone "
          f"{one / med['bytes1']:.4f}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':>16} {'size':>7} {'vs -T2':>7} {'speed':>6} {'vs -T2':>6} {'CPU-speed':>9}"
          f" {'wall s':>7} {'CPU s':>6} {'4K p50 ms':>9} {'p90':>6} {'CPU ms':>6}")
    table = []
    for n in names:
        row = rows[n]
        entry: dict[str, object] = {"image": name, "variant": n, "rounds": rounds}
        entry.update({k: statistics.median(row[k]) for k in keys if row[k]})
        shown = f"{'-':>9} {'-':>6} {'-':>6}"
        if row["lat"]:
            entry["rand4k_p50_ms"] = statistics.median(row["lat"]) * 1e3
            entry["rand4k_p90_ms"] = pct(row["lat"], 0.9) * 1e3
            entry["rand4k_cpu_ms"] = statistics.median(row["read_cpu"]) * 1e3
            shown = (f"{entry['rand4k_p50_ms']:>9.2f} {entry['rand4k_p90_ms']:>6.2f} "
                     f"{entry['rand4k_cpu_ms']:>6.2f}")
        entry.pop("lat", None)
        entry.pop("read_cpu", None)
        if n == names[0] and other_lat:
            entry["tree_rand4k_p50_ms"] = statistics.median(other_lat) * 1e3
            entry["tree_rand4k_p90_ms"] = pct(other_lat, 0.9) * 1e3
            entry["tree_rand4k_cpu_ms"] = statistics.median(other_cpu) * 1e3
            entry["tree_read_ratio"] = statistics.median(
                a / b for a, b in zip(row["lat"], other_lat, strict=True))
        print(f"{n:>16} {entry['size']:>7.4f} {entry['size2']:>7.4f} {entry['speed1']:>5.2f}x "
              f"{entry['speed2']:>5.2f}x {entry['cpu1']:>8.2f}x {entry['wall']:>7.1f} "
              f"{entry['cpu']:>6.1f} {shown}", flush=True)
        table.append(entry)
    if other_lat:
        head = table[0]
        print(f"{names[0]} mounted by {tree}: 4K p50 {head['tree_rand4k_p50_ms']:.2f} ms, p90 "
              f"{head['tree_rand4k_p90_ms']:.2f}, daemon CPU {head['tree_rand4k_cpu_ms']:.2f} "
              f"ms a read; this checkout's time / its, per read (same offsets, same turns), "
              f"median {head['tree_read_ratio']:.3f}", flush=True)
    return table


def verdict(entry: dict[str, object]) -> str:
    """One line: the variant against issue 17's goals."""
    size, speed = float(entry["size"]), float(entry["speed1"])  # type: ignore[arg-type]
    parts = [f"size {size:.4f} ({'PASS' if size <= GOAL_SIZE else 'MISS'} <= {GOAL_SIZE})",
             f"speed {speed:.2f}x zstd -3 ({'PASS' if speed >= GOAL_SPEED else 'MISS'} >= "
             f"{GOAL_SPEED}), {float(entry['speed2']):.2f}x zstd -T2 -3"]  # type: ignore[arg-type]
    if "rand4k_p50_ms" in entry:
        p50 = float(entry["rand4k_p50_ms"])  # type: ignore[arg-type]
        parts.append(f"cold 4 KiB read p50 {p50:.2f} ms "
                     f"({'PASS' if p50 <= GOAL_READ_MS else 'MISS'} <= {GOAL_READ_MS})")
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="usr,db")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmafs-bench-size"))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mount", action="store_true", help="also cold 4 KiB reads through a mount")
    ap.add_argument("--reads", type=int, default=300, help="cold reads per variant (all rounds)")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness of this run and its children (e.g. -10 on a busy machine)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--stages", action="store_true",
                    help="where one cold 4 KiB read through a mount goes (default .vma.zst)")
    ap.add_argument("--tree", type=Path, metavar="DIR",
                    help="with --mount, also read the first variant's archive through a mount "
                         "by this checkout (e.g. a git archive of the last release), same turns")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_size: needs root (mkfs -d ownership, FUSE)", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    names = args.images.split(",")
    for name in names:
        image(work, name)
    if args.build_only:
        return 0
    if args.stages:
        for name in names:
            stages(work, name, args.reads)
        return 0
    variants = [parse_variant(v) for v in args.variants.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds, "
          f"each variant between a zstd -3 and a zstd -T2 -3 pipeline run", flush=True)
    results = []
    for name in names:
        results += bench_image(work, name, variants, args.rounds, args.reads, args.mount,
                               args.tree.resolve() if args.tree else None)
    print("\nagainst issue 17's goals (medians of the rounds, baselines in the same rounds):")
    for entry in results:
        print(f"  {entry['image']:>4} {entry['variant']:>16}: {verdict(entry)}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
