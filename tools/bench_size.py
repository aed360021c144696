#!/usr/bin/env python3
"""Seekable `.vma.zst` size against vzdump's one-stream `zstd -3`: the trade-off curve.

Builds two real disk images (cached in --workdir):

* ``usr``: a 1.5 GiB ext4 file system made with ``mkfs.ext4 -d`` from this machine's /usr
  (bin, sbin, include, lib/x86_64-linux-gnu: binaries, libraries, headers);
* ``db``: a 1 GiB ext4 file system holding a SQLite database of many small, repetitive records
  (orders with customers, cities, products, timestamps) and its indexes.

For each image the plain VMA stream is written once (``vmafs create -o -``).  Baselines, in the
same run as every variant: vzdump's way, ``vmafs create -o - | zstd -T2 -3`` (one stream: its
size is 1.000, its wall time the speed baseline), and the one-stream ``zstd -3`` of the stored
stream alone.  Then every variant (frame size x level x zstd parameters x threads) is
written by ``vmafs create`` in a child process (the real create path: image reads, checksums,
index) and reported as

* size: archive bytes / vzdump-way bytes (goal <= 1.01);
* speed: vzdump-way wall time / create wall time, and the CPU seconds (goal >= 1.2);
* rand4k: cold 4 KiB reads at random offsets of the image's data (non-zero blocks) through
  ``vmafs mount``, every variant mounted at once and read at the same offsets in turn, the page
  cache dropped before each read: median and p90 ms (goal <= 1.5 ms) — only with --mount.

CPU-speed (vzdump's CPU seconds / create's) is the steadier speed column on a busy machine.

Wall times swing on a shared 2-core machine, so runs are interleaved (baseline, variant,
baseline, ...) for --rounds rounds and the median of the per-round ratios is shown; --nice -10
keeps other users' jobs from dominating the latencies.

    python3 tools/bench_size.py [--images usr,db] [--rounds 2] [--mount] [--reads 300] [--nice -10]
                                [--variants F:L[:opts],...] [--workdir /var/tmp/vmafs-bench-size]

A variant is ``FRAME_KIB:LEVEL`` plus options joined by ``:``: ``tN`` threads, ``ldm``,
``wN`` window log, ``sN`` strategy, ``hN``/``cN``/``mN`` hash/chain/search logs.
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

MiB = 1 << 20
GiB = 1 << 30
DISK = "disk-drive-scsi0.raw"
USR_PARTS = ("bin", "sbin", "include", "lib/x86_64-linux-gnu")
DEFAULT_VARIANTS = (  # 512:3 was the default before, 3072:3 is the default now
    "512:3,1024:3,2048:3,2560:3,3072:3,2048:3:c17,2048:3:c18,2048:4,1024:5"
)

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
output._make = make
from vmafs.cli import main
sys.exit(main(sys.argv[2:]))
"""


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def vmafs(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmafs", *args]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    frame, level, *opts = text.split(":")
    spec: dict[str, object] = {"name": text, "frame": int(frame) << 10, "level": int(level)}
    params: dict[str, int] = {}
    for opt in opts:
        if opt == "ldm":
            params["enable_ldm"] = 1
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


def vzdump_way(img: Path, out: Path) -> tuple[float, float]:
    """`vmafs create -o - | zstd -T2 -3 > out`, then fsync (create syncs its archive too)."""
    out.unlink(missing_ok=True)
    cmd = (f"{sys.executable} -m vmafs create -q -o - drive-scsi0={img} "
           f"| zstd -q -T2 -3 -c > {out} && sync {out}")
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


@contextmanager
def mounted(archive: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(vmafs("mount", "-f", str(archive), str(mnt)), env=env())
    try:
        deadline = time.monotonic() + 60
        while not (mnt / DISK).exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{archive} did not get mounted")
            time.sleep(0.02)
        yield mnt / DISK
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)


def cold_reads(archives: dict[str, Path], work: Path, offsets: list[int]
               ) -> dict[str, list[float]]:
    """Latency of 4 KiB preads through a mount of each archive, all mounted at once and read
    in turn at the same offsets (rotating who goes first), page cache dropped before each."""
    times: dict[str, list[float]] = {name: [] for name in archives}
    with ExitStack() as stack:
        fds = {}
        for i, (name, archive) in enumerate(archives.items()):
            disk = stack.enter_context(mounted(archive, work / f"mnt{i}"))
            fds[name] = os.open(disk, os.O_RDONLY)
            stack.callback(os.close, fds[name])
            os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_RANDOM)
        names = list(archives)
        for k, off in enumerate(offsets):
            for name in names[k % len(names):] + names[:k % len(names)]:
                drop_caches()
                t = time.perf_counter()
                os.pread(fds[name], 4096, off)
                times[name].append(time.perf_counter() - t)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def bench_image(work: Path, name: str, variants: list[dict[str, object]], rounds: int,
                reads: int, mount: bool) -> list[dict[str, object]]:
    """Every variant against vzdump's way, interleaved round by round."""
    img = image(work, name)
    ref_path = work / f"{name}.vzdump.vma.zst"
    # the stored stream alone in one zstd -3 stream (no pipe): what frames cost
    plain = work / f"{name}.plain.vma"
    if not plain.exists():
        subprocess.run(vmafs("create", "-q", "-o", str(plain), f"drive-scsi0={img}"),
                       check=True, env=env())
    one = len(subprocess.run(["zstd", "-q", "-T2", "-3", "-c", str(plain)], check=True,
                             capture_output=True).stdout)
    print(f"\n== {name}: image {img.stat().st_size / GiB:.2f} GiB, VMA stream "
          f"{plain.stat().st_size / 1e6:.1f} MB, one-stream zstd -3 {one / 1e6:.1f} MB",
          flush=True)
    offsets = data_offsets(img, reads, seed=11) if mount else []
    names = [str(v["name"]) for v in variants]
    rows: dict[str, dict[str, list[float]]] = {
        n: {"size": [], "speed": [], "cpu": [], "cpu_ratio": [], "wall": [], "lat": []}
        for n in names}
    base: dict[str, list[float]] = {"wall": [], "cpu": [], "bytes": []}
    archives = {n: work / f"{name}.{i}.vma.zst" for i, n in enumerate(names)}
    for r in range(rounds):
        for spec in variants:
            # a baseline right before each variant: wall times drift within a minute
            b_wall, b_cpu = vzdump_way(img, ref_path)
            ref_bytes = ref_path.stat().st_size
            base["wall"].append(b_wall)
            base["cpu"].append(b_cpu)
            base["bytes"].append(ref_bytes)
            n = str(spec["name"])
            wall, cpu = create_variant(img, archives[n], spec)
            row = rows[n]
            row["size"].append(archives[n].stat().st_size / ref_bytes)
            row["speed"].append(b_wall / wall)
            row["cpu_ratio"].append(b_cpu / cpu)
            row["wall"].append(wall)
            row["cpu"].append(cpu)
            print(f"round {r + 1} {name} {n:>16}: size {row['size'][-1]:.4f}  "
                  f"speed {row['speed'][-1]:.2f}x ({wall:.1f} s vs {b_wall:.1f} s; "
                  f"CPU {cpu:.1f} vs {b_cpu:.1f} s)", flush=True)
        if mount:
            per = len(offsets) // rounds
            got = cold_reads(archives, work, offsets[r * per:(r + 1) * per])
            for n, lat in got.items():
                rows[n]["lat"].extend(lat)
            print(f"round {r + 1} {name} rand4k p50 ms: " + ", ".join(
                f"{n} {statistics.median(lat) * 1e3:.2f}" for n, lat in got.items()), flush=True)
    for path in (ref_path, *archives.values()):
        path.unlink(missing_ok=True)
    print(f"\n{name}: vzdump's way (vmafs create -o - | zstd -T2 -3) = 1.000: "
          f"{statistics.median(base['bytes']) / 1e6:.1f} MB, "
          f"{statistics.median(base['wall']):.1f} s wall, "
          f"{statistics.median(base['cpu']):.1f} s CPU; one-stream zstd -3 of the stored "
          f"stream alone {one / statistics.median(base['bytes']):.4f}")
    print(f"{'variant':>16} {'size':>7} {'speed':>6} {'CPU-speed':>9} {'wall s':>7} {'CPU s':>6} "
          f"{'4K p50 ms':>9} {'p90':>6}")
    table = []
    for n in names:
        row = rows[n]
        entry: dict[str, object] = {
            "image": name, "variant": n, "size": statistics.median(row["size"]),
            "speed": statistics.median(row["speed"]),
            "cpu_speed": statistics.median(row["cpu_ratio"]),
            "wall": statistics.median(row["wall"]), "cpu": statistics.median(row["cpu"])}
        shown = f"{'-':>9} {'-':>6}"
        if row["lat"]:
            entry["rand4k_p50_ms"] = statistics.median(row["lat"]) * 1e3
            entry["rand4k_p90_ms"] = pct(row["lat"], 0.9) * 1e3
            shown = f"{entry['rand4k_p50_ms']:>9.2f} {entry['rand4k_p90_ms']:>6.2f}"
        print(f"{n:>16} {entry['size']:>7.4f} {entry['speed']:>5.2f}x "
              f"{entry['cpu_speed']:>8.2f}x {entry['wall']:>7.1f} {entry['cpu']:>6.1f} {shown}",
              flush=True)
        table.append(entry)
    return table


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
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_size: needs root (mkfs -d ownership, drop_caches, FUSE)", file=sys.stderr)
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
    variants = [parse_variant(v) for v in args.variants.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds, "
          f"each variant right after its own baseline run", flush=True)
    results = []
    for name in names:
        results += bench_image(work, name, variants, args.rounds, args.reads, args.mount)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
