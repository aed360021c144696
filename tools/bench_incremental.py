#!/usr/bin/env python3
"""Benchmark incremental backups, deep chains and `vmafs merge` against baselines measured in
the same run (ratios, not absolutes; nothing here asserts on time).

Needs root (FUSE) and the test guest (tests/guestimage.py).  One 4 GiB raw disk,
half random data (the first 2 MiB of every 4 MiB), half holes; "2 %" below is 2 % of its 64 KiB
clusters (1311), picked at random over the whole disk (holes included, as a guest writes).

1. live (idle guest, -drive raw cache=none disk): `vmafs backup` full, then 2 % of the clusters
   written through QEMU's block layer (HMP `qemu-io write -P`, pipelined on one QMP
   connection), then `vmafs backup --incremental`; what a round wrote is put back into the
   image before the next full (restore_image), so every full backs up the same disk.
   Targets: incremental time <= 1/10 of the full's, incremental bytes written <= 1/20 of the
   full's.  --runs rounds of full +
   incremental; before each backup the image and the archives it reads are evicted from the
   page cache (never drop_caches: others measure on the same machine, and a backup started a
   day after its PREV finds the Python modules it runs in the cache, not PREV).  Times are the
   wall time of the command; shown too: the time the command reports itself ("seconds" of
   --json), the `vmafs backup --help` time (the interpreter and the imports every backup
   pays first), and the CPU time (user + system) of each backup's process, steadier than its
   wall time on a machine others load.
2. a 30-deep chain (the full of `vmafs create` + 29 incrementals written with ArchiveWriter, each
   2 % random clusters of fresh random data): mount ready (from starting `vmafs mount` until it
   returned and the disk file could be stat'ed) < 1 s, cold (the archives evicted) and warm;
   baseline the single full archive.  Random 4 KiB reads (-o direct_io, same offsets) through the
   chain's mount vs the merged archive's (same content): median latency within 1.2x, with the
   archives' page cache cold (evicted) and hot.  The chain's mount daemon VmHWM < 128 MiB.
3. `vmafs merge` of that chain into a .vma vs `vmafs create` of the raw image into a .vma, inputs
   evicted before every run, --runs runs each, alternating: device bytes/s >= 0.8x.
   The merged disk holds more data than the original image (the increments also wrote into its
   holes), so for information also: `vmafs create` of the chain's final content (the merged
   archive extracted once), which writes the same archive as the merge.

Every figure is the median over its runs (each run shown).  Work files go under --workdir
(default /var/tmp/vmafs-bench-incr), removed at the end unless --keep.

With --only-merge, part 3 alone for plain and for zstd layers (each merged into its own
container, against create into it), and --before TREE times an older vmafs's merge in the same
rounds.  With --only-live, part 1 alone, and --before TREE runs an older vmafs's full and
incremental in the same rounds (the trees alternate, their order rotated each round), so that
a change is measured against what it changes.  --bytecode lets Python write and use .pyc
files (in a private directory, never in the tree), as an installed vmafs has them; without
it a checkout run with PYTHONDONTWRITEBYTECODE=1 compiles every module it imports at every
start.

Usage: python3 tools/bench_incremental.py [--runs 3] [--rounds 3] [--random-reads 3000]
                                          [--workdir DIR] [--keep] [--json]
       python3 tools/bench_incremental.py --only-merge [--runs 5] [--before TREE]
       python3 tools/bench_incremental.py --only-live [--runs 7] [--before TREE] [--bytecode]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import guestimage as gi  # noqa: E402
from benchlib import evict  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLUSTER = 64 * KiB
RUN, PERIOD = 2 * MiB, 4 * MiB      # data runs of the image: RUN bytes at every PERIOD
CHANGE = 0.02                       # fraction of the clusters one increment changes
DEPTH = 30                          # archives in the chain: the full + DEPTH - 1 increments
DEVNAME = "drive-scsi0"
DISK = f"disk-{DEVNAME}.raw"        # the disk's file in a mount of the chain / merged archive
QEMU_IO_BATCH = 64                  # HMP commands in flight on the QMP connection


# -- helpers -------------------------------------------------------------------------------------

BYTECODE = False  # --bytecode: .pyc files in a private directory, as an installed vmafs has


def env(tree: Path = ROOT) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    made = dict(os.environ, PYTHONPATH=path)
    if BYTECODE:  # never in the shared tree
        made.pop("PYTHONDONTWRITEBYTECODE", None)
        made["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "vmafs-bi-pycache")
    return made


def vmafs(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmafs", *args]


def run_vmafs(*args: str, tree: Path = ROOT) -> tuple[float, str]:
    """Wall seconds of one vmafs command (of `tree`'s vmafs), and its stdout."""
    elapsed, _, stdout = run_vmafs_cpu(*args, tree=tree)
    return elapsed, stdout


def run_vmafs_cpu(*args: str, tree: Path = ROOT) -> tuple[float, float, str]:
    """Wall seconds of one vmafs command, the CPU seconds (user + system) of its process and
    the children it waited for, and its stdout. On a machine others load, the CPU time is the
    steadier figure: the wall time of a command that needs the CPU follows the load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(vmafs(*args), cwd=tree, env=env(tree), capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise RuntimeError(f"vmafs {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, res.stdout


def say(msg: str) -> None:
    print(msg, flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values)


def runs_str(values: list[float], fmt: str = "{:.2f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in values) + "]"


def make_image(path: Path, size: int) -> None:
    """RUN bytes of random data at the start of every PERIOD, holes elsewhere."""
    rng = np.random.default_rng(42)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, PERIOD):
            f.seek(off)
            f.write(rng.bytes(min(RUN, size - off)))


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def restore_image(img: Path, pristine: Path, clusters: list[int]) -> None:
    """Put back what earlier rounds wrote into the image (a cluster of a data run from the
    pristine copy, one in a hole punched out again), so that every round's full backs up the
    disk make_image made. Without it the full grew round after round by the written clusters
    that fell into holes (2 GiB of data, +2 % x 64 KiB x half per backup pair: 2052 -> 2585 MiB
    over 8 rounds of two trees), and so did its time: the median ratio then depended on
    --runs. The VM is idle and reads its disk with cache=none; the image is evicted before
    every backup anyway."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    with open(img, "r+b") as dst, open(pristine, "rb") as src:
        for cluster in sorted(set(clusters)):
            off = cluster * CLUSTER
            if off % PERIOD < RUN:
                os.pwrite(dst.fileno(), os.pread(src.fileno(), CLUSTER, off), off)
            elif libc.fallocate(dst.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                off, CLUSTER) != 0:
                raise OSError(ctypes.get_errno(), f"punching a hole into {img}")
        os.fsync(dst.fileno())


def changed_clusters(rng: np.random.Generator, size: int) -> np.ndarray:
    n = size // CLUSTER
    return np.sort(rng.choice(n, size=max(1, round(n * CHANGE)), replace=False))


# -- 1. live full + incremental --------------------------------------------------------------------

def qemu_io_writes(vm: gi.QemuVM, drive: str, clusters: np.ndarray, byte: int) -> float:
    """`qemu-io DRIVE "write -P BYTE OFF 64k"` for every cluster, QEMU_IO_BATCH commands
    pipelined on one QMP connection (closed before returning: QEMU serves one client)."""
    t = time.perf_counter()
    with gi._JsonLines(vm.qmp_path, 60) as conn:
        if "QMP" not in conn.recv():
            raise RuntimeError("no QMP greeting")
        conn.call({"execute": "qmp_capabilities"})
        todo = [int(c) * CLUSTER for c in clusters]
        for start in range(0, len(todo), QEMU_IO_BATCH):
            batch = todo[start:start + QEMU_IO_BATCH]
            for off in batch:
                conn.send({"execute": "human-monitor-command", "arguments": {
                    "command-line": f'qemu-io {drive} "write -P {byte} {off} {CLUSTER}"'}})
            got = 0
            while got < len(batch):
                reply = conn.recv()
                if "event" in reply:
                    continue
                got += 1
                text = reply.get("return")
                if "error" in reply or (text and "wrote" not in text):
                    raise RuntimeError(f"qemu-io write failed: {reply}")
    return time.perf_counter() - t


def live_backup(vm: gi.QemuVM, out: Path, evicted: list[Path], *extra: str,
                tree: Path = ROOT) -> dict[str, Any]:
    """One `vmafs backup` with `evicted` (the image, the archives it reads) evicted first, after
    a sync (so no earlier write-out is in its time)."""
    evict(*evicted)
    os.sync()
    wall, cpu, stdout = run_vmafs_cpu("backup", "--qmp", str(vm.qmp_path), "-o", str(out),
                                      "-q", "--json", *extra, tree=tree)
    summary = json.loads(stdout)
    return {"wall_s": wall, "cpu_s": cpu, "inner_s": summary["seconds"],
            "file_bytes": out.stat().st_size,
            "bytes_out": summary.get("archive_bytes"), "data_bytes": summary.get("copied_bytes"),
            "incremental": summary["incremental"]}


def part_live(guest: gi.Guest, img: Path, work: Path, size: int, runs: int,
              trees: dict[str, Path] | None = None) -> dict[str, Any]:
    """Rounds of full + 2 % written + incremental, for each tree (in rotated order)."""
    trees = trees or {"this": ROOT}
    rng = np.random.default_rng(2024)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    pristine = work / "pristine.raw"  # what restore_image puts back
    subprocess.run(["cp", "--sparse=always", str(img), str(pristine)], check=True)
    written: list[int] = []           # clusters written since the image was last restored
    disk = gi.Disk(img, fmt="raw", cache="none")
    t = time.perf_counter()
    with gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline("idle"),
                   disks=[disk]) as vm:
        vm.wait_for("VMAFS-READY", timeout=180)
        say(f"  VM booted in {time.perf_counter() - t:.1f} s")
        if BYTECODE:  # one untimed run of each tree writes its .pyc files
            for tree in trees.values():
                run_vmafs("backup", "--help", tree=tree)
        for r in range(runs):
            names = list(trees)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                tree = trees[name]
                full, inc = work / f"live-full{r}.vma", work / f"live-inc{r}.vma"
                startup = run_vmafs("backup", "--help", tree=tree)[0]
                restore_image(img, pristine, written)
                written.clear()
                f = live_backup(vm, full, [img], tree=tree)
                clusters = changed_clusters(rng, size)
                w = qemu_io_writes(vm, disk.drive_id, clusters, 0x41 + r)
                written.extend(clusters.tolist())
                i = live_backup(vm, inc, [img, full], "--incremental", str(full), tree=tree)
                assert not f["incremental"] and i["incremental"], (f, i)
                rounds[name].append({"full": f, "inc": i, "changed_clusters": len(clusters),
                                     "qemu_io_s": w, "startup_s": startup,
                                     "load": os.getloadavg()[0]})
                say(f"  run {r + 1} {name}: full {f['wall_s']:.2f} s ({f['inner_s']:.2f} s "
                    f"inside, CPU {f['cpu_s']:.2f} s), {f['file_bytes'] / MiB:.0f} MiB; "
                    f"{len(clusters)} clusters written by qemu-io in {w:.1f} s; incremental "
                    f"{i['wall_s']:.2f} s ({i['inner_s']:.2f} s inside, CPU {i['cpu_s']:.2f} s), "
                    f"{i['file_bytes'] / MiB:.1f} MiB; "
                    f"= {i['wall_s'] / f['wall_s']:.3f} of the full; load "
                    f"{os.getloadavg()[0]:.1f}")
                full.unlink()
                inc.unlink()
    return {"rounds": rounds["this"], "trees": rounds}


# -- 2. the 30-deep chain -------------------------------------------------------------------------

def build_chain(base: Path, chain_dir: Path, size: int, suffix: str = ".vma") -> float:
    """DEPTH - 1 increments on base, each CHANGE of the clusters, fresh random data (the same
    whatever the suffix: .vma.zst writes the same chain as seekable zstd layers)."""
    from vmafs.archive.chain import link_to
    from vmafs.archive.reader import Archive
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output
    from vmafs.format import chain

    rng = np.random.default_rng(7)
    devices = [DeviceSpec(DEVNAME, size)]
    prev = base
    with Archive.open(str(base), layer=True) as a:
        ctime = a.ctime
    t = time.perf_counter()
    for k in range(1, DEPTH):
        with Archive.open(str(prev), layer=True) as parent:
            record = chain.encode(chain.ChainRecord(parent=link_to(parent)))
        path = chain_dir / f"c{k:02d}{suffix}"
        with open_output(str(path)) as out:
            w = ArchiveWriter(out, devices, [(chain.CONFIG_NAME, record)],
                              ctime=ctime + k, incremental=[1])
            clusters = changed_clusters(rng, size)
            data = rng.bytes(len(clusters) * CLUSTER)
            for j, c in enumerate(clusters.tolist()):
                w.write(1, c * CLUSTER, data[j * CLUSTER:(j + 1) * CLUSTER])
            w.finish()
        prev = path
    return time.perf_counter() - t


def find_daemon(mnt: Path) -> int:
    """The pid of the `vmafs mount ... MNT` daemon (the process left after mount returned)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = (Path("/proc") / entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vmafs" in argv and b"mount" in argv and str(mnt).encode() in argv:
            return int(entry)
    raise RuntimeError(f"no mount daemon for {mnt}")


def proc_status(pid: int) -> dict[str, int]:
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) * KiB
    return got


@contextmanager
def mounted(archive: Path, mnt: Path, *options: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run_vmafs("mount", *options, str(archive), str(mnt))
    try:
        yield mnt / DISK
    finally:
        run_vmafs("umount", str(mnt))


def mount_ready(archive: Path, mnt: Path, size: int, cold: bool) -> float:
    mnt.mkdir(exist_ok=True)
    if cold:  # the archive and every archive beside it (its chain)
        evict(*(p for p in archive.parent.iterdir() if p.is_file()))
    t = time.perf_counter()
    res = subprocess.run(vmafs("mount", str(archive), str(mnt)), env=env(), cwd=ROOT,
                         capture_output=True)
    st = os.stat(mnt / DISK) if res.returncode == 0 else None
    elapsed = time.perf_counter() - t
    if st is None:
        raise RuntimeError(f"vmafs mount {archive} failed")
    run_vmafs("umount", str(mnt))
    assert st.st_size == size, st
    return elapsed


def random_reads(path: Path, offsets: list[int]) -> list[float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        times = []
        for off in offsets:
            t = time.perf_counter()
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"short read at {off}")
            times.append(time.perf_counter() - t)
        return times
    finally:
        os.close(fd)


# -- 3. merge vs create ---------------------------------------------------------------------------

def timed_cold(argv: list[str], inputs: list[Path]) -> float:
    return timed_evicted(argv, inputs)


def timed_evicted(argv: list[str], inputs: list[Path], tree: Path | None = None) -> float:
    """Wall seconds of one vmafs command (of `tree`'s vmafs if given) with its inputs
    evicted from the page cache, after a sync (so no earlier write-out is in its time)."""
    evict(*inputs)
    os.sync()
    cmd = vmafs(*argv)
    e = env()
    if tree is not None:
        e = dict(e, PYTHONPATH=str(tree))
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=tree or ROOT, env=e, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"vmafs {' '.join(argv)} failed ({res.returncode}): {res.stderr}")
    return elapsed


def part_merge(work: Path, size: int, runs: int, before: Path | None) -> dict[str, Any]:
    """Part 3 alone, for plain and for zstd layers: `vmafs merge` of the 30-deep chain
    vs `vmafs create` of the raw image into the same container (device bytes/s), inputs
    evicted before every run (no drop_caches: other work on the machine keeps its cache),
    every variant once a round, the order rotated each round. With `before` (a vmafs tree,
    e.g. `git archive REV vmafs | tar -x -C DIR`), its merge runs in the same rounds."""
    img = work / "disk.raw"
    if not img.exists():
        make_image(img, size)
    chains = {}
    for kind, suffix in (("plain", ".vma"), ("zstd", ".vma.zst")):
        d = work / f"chain-{kind}"
        newest = d / f"c{DEPTH - 1:02d}{suffix}"
        if not newest.exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            run_vmafs("create", "-q", "-o", str(d / f"c00{suffix}"), f"{DEVNAME}={img}")
            t = build_chain(d / f"c00{suffix}", d, size, suffix)
            say(f"{kind} chain: {DEPTH} archives built in {t:.1f} s")
        chains[kind] = (sorted(d.iterdir()), newest, suffix)
    out = work / "out"
    out.mkdir(exist_ok=True)
    final = work / "final" / DISK  # the chain's content: what the merge writes, as a raw image
    if not final.exists():
        run_vmafs("extract", "-q", str(chains["plain"][1]), str(final.parent))
    variants: list[tuple[str, list[str], list[Path], Path | None]] = []
    for kind, (files, newest, suffix) in chains.items():
        variants.append((f"create {suffix}", ["create", "-q", "-o", str(out / f"c{suffix}"),
                                              f"{DEVNAME}={img}"], [img], None))
        variants.append((f"create {suffix} of the chain's content",
                         ["create", "-q", "-o", str(out / f"f{suffix}"), f"{DEVNAME}={final}"],
                         [final], None))
        variants.append((f"merge {kind} layers -> {suffix}",
                         ["merge", "-q", "-o", str(out / f"m{suffix}"), str(newest)], files, None))
        if before is not None:
            variants.append((f"merge {kind} layers -> {suffix} (before)",
                             ["merge", "-q", "-o", str(out / f"b{suffix}"), str(newest)],
                             files, before))
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    sizes: dict[str, int] = {}
    for r in range(runs):
        shift = r % len(variants)
        for name, argv, inputs, tree in variants[shift:] + variants[:shift]:
            target = Path(argv[argv.index("-o") + 1])
            target.unlink(missing_ok=True)
            times[name].append(timed_evicted(argv, inputs, tree))
            sizes[name] = target.stat().st_size
            target.unlink()
        say(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    return {"times_s": times, "out_bytes": sizes, "disk_bytes": size, "runs": runs}


def report_merge(res: dict[str, Any]) -> None:
    size, times = res["disk_bytes"], res["times_s"]
    print()
    print(f"=== 3. merge of the {DEPTH}-deep chain vs create of the raw image, "
          f"{size / GiB:.1f} GiB disk, inputs evicted before every run "
          f"(median of {res['runs']}; ratio per round, median) ===")
    for name, ts in times.items():
        print(f"  {name:34s} {runs_str(ts)} s = "
              f"{runs_str([size / t / 1e6 for t in ts], '{:.0f}')} MB/s device bytes; "
              f"output {res['out_bytes'][name] / GiB:.2f} GiB")
    print(f"  {'figure':44s} {'value':>10s} {'baseline':>10s} {'ratio':>6s}  target")
    for name, ts in times.items():
        if not name.startswith("merge"):
            continue
        suffix = name.split("-> ")[1].split(" ")[0]
        base = times[f"create {suffix}"]
        ratio = med([c / m for c, m in zip(base, ts, strict=True)])
        verdict = "PASS" if ratio >= 0.8 else "MISS"
        print(f"  {name + ' / create ' + suffix:44s} {size / med(ts) / 1e6:7.0f} MB/s "
              f"{size / med(base) / 1e6:7.0f} MB/s {ratio:6.3f}  >= 0.800 {verdict}")
        same = times.get(f"create {suffix} of the chain's content")
        if same is not None:  # the same output bytes: the merged disk holds more than the image
            ratio = med([c / m for c, m in zip(same, ts, strict=True)])
            print(f"  {'  (/ create of the same content, info)':44s} "
                  f"{size / med(ts) / 1e6:7.0f} MB/s {size / med(same) / 1e6:7.0f} MB/s "
                  f"{ratio:6.3f}")
        before = times.get(name + " (before)")
        if before is not None:
            ratio = med([b / m for b, m in zip(before, ts, strict=True)])
            print(f"  {'  (speed-up over before, info)':44s} {size / med(ts) / 1e6:7.0f} MB/s "
                  f"{size / med(before) / 1e6:7.0f} MB/s {ratio:6.3f}")


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each backup, create and merge (medians reported)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of mount-ready and random-read measurements")
    ap.add_argument("--random-reads", type=int, default=3000)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmafs-bench-incr"))
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--json", action="store_true", help="also print every number as JSON")
    ap.add_argument("--only-merge", action="store_true",
                    help="part 3 alone, for plain and zstd layers; work files kept and reused "
                         "(remove --workdir to rebuild)")
    ap.add_argument("--only-live", action="store_true",
                    help="part 1 alone: full and incremental live backups")
    ap.add_argument("--before", type=Path, metavar="TREE",
                    help="with --only-merge or --only-live: also time this vmafs tree in the "
                         "same rounds (git archive REV vmafs | tar -x -C TREE)")
    ap.add_argument("--bytecode", action="store_true",
                    help="let Python write and use .pyc files (private directory), as an "
                         "installed vmafs has them")
    args = ap.parse_args()
    global BYTECODE
    BYTECODE = args.bytecode
    if args.only_live:
        if args.runs < 1:
            ap.error("--runs must be at least 1")
        size = int(args.size_gib * GiB) // PERIOD * PERIOD
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
        try:
            img = work / "disk.raw"
            make_image(img, size)
            trees = {"this": ROOT, **({"before": args.before.resolve()} if args.before else {})}
            live = part_live(gi.build_guest(), img, work, size, args.runs, trees)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        report_live(live, size)
        if args.json:
            print(json.dumps(live, sort_keys=True))
        return 0
    if args.only_merge:
        if args.runs < 1:
            ap.error("--runs must be at least 1")
        size = int(args.size_gib * GiB) // PERIOD * PERIOD
        args.workdir.mkdir(parents=True, exist_ok=True)
        merge = part_merge(args.workdir, size, args.runs, args.before)
        report_merge(merge)
        if args.json:
            print(json.dumps(merge, sort_keys=True))
        return 0
    if os.geteuid() != 0:
        print("bench_incremental: needs root (FUSE)", file=sys.stderr)
        return 2
    if args.runs < 1 or args.rounds < 1 or args.random_reads < 1:
        ap.error("--runs, --rounds and --random-reads must be at least 1")
    t_start = time.perf_counter()
    guest = gi.build_guest()
    size = int(args.size_gib * GiB) // PERIOD * PERIOD
    work: Path = args.workdir
    if work.exists():
        shutil.rmtree(work)
    chain_dir, out_dir = work / "chain", work / "out"
    for d in (chain_dir, out_dir):
        d.mkdir(parents=True)
    res: dict[str, Any] = {"disk_bytes": size, "runs": args.runs, "rounds": args.rounds}
    try:
        img = work / "disk.raw"
        t = time.perf_counter()
        make_image(img, size)
        say(f"image: {size / GiB:.1f} GiB, {RUN // MiB} MiB random every {PERIOD // MiB} MiB "
            f"({time.perf_counter() - t:.1f} s)")

        # 3 (baseline, run 1) and the chain's base: vmafs create of the raw image
        base = chain_dir / "c00.vma"
        create_s = [timed_cold(["create", "-q", "-o", str(base), f"{DEVNAME}={img}"], [img])]
        say(f"create run 1: {create_s[0]:.2f} s (the chain's base)")
        t = build_chain(base, chain_dir, size)
        newest = chain_dir / f"c{DEPTH - 1:02d}.vma"
        chain_bytes = sum(p.stat().st_size for p in chain_dir.iterdir())
        say(f"chain: {DEPTH} archives, {chain_bytes / GiB:.2f} GiB, built in {t:.1f} s")
        res["chain_bytes"] = chain_bytes

        # 2a. mount ready: chain newest vs the single full archive, cold and warm
        mnt = work / "mnt"
        ready: dict[str, list[float]] = {k: [] for k in
                                         ("chain_cold", "chain_warm", "full_cold", "full_warm")}
        for r in range(args.rounds):
            for name, arc in (("chain", newest), ("full", base)):
                for temp in ("cold", "warm"):
                    ready[f"{name}_{temp}"].append(mount_ready(arc, mnt, size, temp == "cold"))
            say(f"mount ready round {r + 1}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in ready.items()))
        res["mount_ready_s"] = ready

        # 3. merge vs create, page cache dropped before each, alternating
        # (info: also create of the chain's final content, extracted once: the same output)
        merged = out_dir / "merged.vma"
        final = out_dir / "final" / DISK
        c_out = out_dir / "create.vma"
        merge_s: list[float] = []
        create_final_s: list[float] = []
        for r in range(args.runs):
            if r:
                create_s.append(timed_cold(["create", "-q", "-o", str(c_out),
                                            f"{DEVNAME}={img}"], [img]))
                c_out.unlink()
            merged.unlink(missing_ok=True)
            merge_s.append(timed_cold(["merge", "-q", "-o", str(merged), str(newest)],
                                      sorted(chain_dir.iterdir())))
            if not r:
                run_vmafs("extract", "-q", str(merged), str(final.parent))
            create_final_s.append(timed_cold(["create", "-q", "-o", str(c_out),
                                              f"{DEVNAME}={final}"], [final]))
            res["create_final_out_bytes"] = c_out.stat().st_size
            c_out.unlink()
            say(f"run {r + 1}: create {create_s[r]:.2f} s, merge {merge_s[r]:.2f} s, "
                f"create of the final content {create_final_s[r]:.2f} s")
        shutil.rmtree(final.parent)
        res["create_s"], res["merge_s"] = create_s, merge_s
        res["create_final_s"] = create_final_s
        res["create_out_bytes"] = base.stat().st_size
        res["merge_out_bytes"] = merged.stat().st_size

        # 2b. random 4 KiB reads (-o direct_io) chain vs merged; RSS of the daemons
        reads: dict[str, list[float]] = {k: [] for k in
                                         ("chain_cold", "merged_cold", "chain_hot", "merged_hot")}
        mnt_c, mnt_m = work / "mnt-chain", work / "mnt-merged"
        with mounted(newest, mnt_c, "-o", "direct_io") as f_chain, \
                mounted(merged, mnt_m, "-o", "direct_io") as f_merged:
            pids = {"chain": find_daemon(mnt_c), "merged": find_daemon(mnt_m)}
            after_mount = {k: proc_status(p) for k, p in pids.items()}
            rng = np.random.default_rng(99)
            for r in range(args.rounds):
                offsets = (rng.integers(0, size // 4096, args.random_reads) * 4096).tolist()
                order = [("chain", f_chain), ("merged", f_merged)]
                for name, path in order if r % 2 == 0 else order[::-1]:
                    evict(*chain_dir.iterdir(), merged)
                    reads[f"{name}_cold"].append(med(random_reads(path, offsets)))
                    reads[f"{name}_hot"].append(med(random_reads(path, offsets)))
                say(f"random reads round {r + 1} (median ms): " + ", ".join(
                    f"{k} {v[-1] * 1e3:.3f}" for k, v in reads.items()))
            rss = {k: proc_status(p) for k, p in pids.items()}
        res["rand4k_median_s"] = reads
        res["rss"] = {k: {"after_mount": after_mount[k], "after_reads": rss[k]} for k in rss}

        # 1. live (last: it writes into the image)
        say("live backups (idle guest):")
        res["live"] = part_live(guest, img, work, size, args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t_start
    report(res)
    return 0


def report_live(live: dict[str, Any], size: int) -> None:
    """--only-live: each tree's figures, and this tree's against the other's, per round."""
    trees = live["trees"]
    print(f"\n=== 1. live backup, idle guest, {size / GiB:.1f} GiB raw disk, 2 % clusters "
          "changed, image and PREV evicted before each backup ===")
    ratios = {}
    for name, rounds in trees.items():
        fw = [r["full"]["wall_s"] for r in rounds]
        iw = [r["inc"]["wall_s"] for r in rounds]
        ii = [r["inc"]["inner_s"] for r in rounds]
        su = [r["startup_s"] for r in rounds]
        ratios[name] = [i / f for i, f in zip(iw, fw, strict=True)]
        ratio = med(ratios[name])
        print(f"  {name:6s} full {runs_str(fw)} s, incremental {runs_str(iw)} s "
              f"(inside {runs_str(ii)}), `backup --help` {runs_str(su)} s")
        print(f"  {name:6s} median full {med(fw):.3f} s, incremental {med(iw):.3f} s, "
              f"incremental / full (per round, median) {ratio:.3f} (<= 0.100: "
              f"{'PASS' if ratio <= 0.1 else 'MISS'})")
        fc = [r["full"]["cpu_s"] for r in rounds]
        ic = [r["inc"]["cpu_s"] for r in rounds]
        print(f"  {name:6s} CPU (user + system), median: full {med(fc):.3f} s, incremental "
              f"{med(ic):.3f} s {runs_str(ic, '{:.3f}')}")
    if "before" in trees:
        this, before = trees["this"], trees["before"]
        inc = med([b["inc"]["wall_s"] / t["inc"]["wall_s"] for t, b in zip(this, before,
                                                                          strict=True)])
        full = med([b["full"]["wall_s"] / t["full"]["wall_s"] for t, b in zip(this, before,
                                                                            strict=True)])
        print(f"  before / this, per round, median: incremental {inc:.3f}, full {full:.3f}")
        inc_cpu = med([b["inc"]["cpu_s"] / t["inc"]["cpu_s"] for t, b in zip(this, before,
                                                                            strict=True)])
        full_cpu = med([b["full"]["cpu_s"] / t["full"]["cpu_s"] for t, b in zip(this, before,
                                                                               strict=True)])
        print(f"  before / this, CPU, per round, median: incremental {inc_cpu:.3f}, full "
              f"{full_cpu:.3f}")
    loads = [r["load"] for rounds in trees.values() for r in rounds]
    print(f"  load average during the runs: {min(loads):.1f} .. {max(loads):.1f} "
          f"(median {med(loads):.1f})")


def report(res: dict[str, Any]) -> None:
    size = res["disk_bytes"]
    lines: list[tuple[str, str, str, str, str, bool]] = []  # figure, value, baseline, ratio, target

    def row(figure: str, value: str, baseline: str, ratio: float, target: str,
            ok: bool) -> None:
        lines.append((figure, value, baseline, f"{ratio:.3f}", target, ok))

    live = res["live"]["rounds"]
    fw = [r["full"]["wall_s"] for r in live]
    iw = [r["inc"]["wall_s"] for r in live]
    fi = [r["full"]["inner_s"] for r in live]
    ii = [r["inc"]["inner_s"] for r in live]
    fb = [r["full"]["file_bytes"] for r in live]
    ib = [r["inc"]["file_bytes"] for r in live]
    t_ratio = med([i / f for i, f in zip(iw, fw, strict=True)])
    b_ratio = med([i / f for i, f in zip(ib, fb, strict=True)])
    print()
    print(f"=== 1. live backup, idle guest, {size / GiB:.1f} GiB raw -drive disk, 2 % clusters "
          "changed "
          f"({live[0]['changed_clusters']} x 64 KiB) ===")
    print(f"  full        wall {runs_str(fw)} s  (inside vmafs {runs_str(fi)} s), "
          f"file {runs_str([b / MiB for b in fb], '{:.1f}')} MiB")
    print(f"  incremental wall {runs_str(iw)} s  (inside vmafs {runs_str(ii)} s), "
          f"file {runs_str([b / MiB for b in ib], '{:.1f}')} MiB")
    print(f"  qemu-io writes took {runs_str([r['qemu_io_s'] for r in live])} s; "
          f"`vmafs backup --help` (cold page cache: interpreter and imports) "
          f"{runs_str([r['startup_s'] for r in live])} s")
    row("incremental time / full time", f"{med(iw):.2f} s", f"{med(fw):.2f} s", t_ratio,
        "<= 0.100", t_ratio <= 0.1)
    i_ratio_inner = med([i / f for i, f in zip(ii, fi, strict=True)])
    row("  (same, time inside vmafs, info)", f"{med(ii):.2f} s", f"{med(fi):.2f} s",
        i_ratio_inner, "info", True)
    su = [r["startup_s"] for r in live]
    row("  (`vmafs backup --help`, cold, info)", f"{med(su):.2f} s", f"{med(fw):.2f} s",
        med([s / f for s, f in zip(su, fw, strict=True)]), "info", True)
    row("incremental bytes / full bytes", f"{med(ib) / MiB:.1f} MiB", f"{med(fb) / MiB:.1f} MiB",
        b_ratio, "<= 0.050", b_ratio <= 0.05)

    ready = res["mount_ready_s"]
    reads = res["rand4k_median_s"]
    rss = res["rss"]
    print()
    print(f"=== 2. chain of {DEPTH} (full + {DEPTH - 1} increments of 2 %), "
          f"{res['chain_bytes'] / GiB:.2f} GiB of archives ===")
    for k, v in ready.items():
        print(f"  mount ready {k:11s} {runs_str(v, '{:.3f}')} s")
    for k, v in reads.items():
        print(f"  rand 4 KiB  {k:11s} {runs_str([x * 1e3 for x in v], '{:.3f}')} ms "
              "(median latency of each round)")
    for k, v in rss.items():
        print(f"  daemon {k:7s} after mount: VmRSS {v['after_mount']['VmRSS'] / MiB:.1f} MiB; "
              f"after reads: VmRSS {v['after_reads']['VmRSS'] / MiB:.1f} MiB, "
              f"VmHWM {v['after_reads']['VmHWM'] / MiB:.1f} MiB")
    for temp in ("cold", "warm"):
        c, f = med(ready[f"chain_{temp}"]), med(ready[f"full_{temp}"])
        row(f"mount ready, chain ({temp} cache)", f"{c:.3f} s", f"{f:.3f} s (full)", c / f,
            "< 1 s", c < 1)
    for temp in ("cold", "hot"):
        per_round = [c / m for c, m in zip(reads[f"chain_{temp}"], reads[f"merged_{temp}"],
                                           strict=True)]
        r = med(per_round)
        row(f"rand 4 KiB chain/merged ({temp} page cache)",
            f"{med(reads[f'chain_{temp}']) * 1e3:.3f} ms",
            f"{med(reads[f'merged_{temp}']) * 1e3:.3f} ms", r, "<= 1.200", r <= 1.2)
    hwm = rss["chain"]["after_reads"]["VmHWM"]
    row("chain mount daemon VmHWM", f"{hwm / MiB:.1f} MiB",
        f"{rss['merged']['after_reads']['VmHWM'] / MiB:.1f} MiB (merged)",
        hwm / rss["merged"]["after_reads"]["VmHWM"], "< 128 MiB", hwm < 128 * MiB)

    cs, ms = res["create_s"], res["merge_s"]
    per_run = [c / m for c, m in zip(cs, ms, strict=True)]  # rate ratio = time ratio inverted
    print()
    print("=== 3. merge of the chain vs create of the raw image, both into .vma "
          "(page cache dropped before every run) ===")
    print(f"  create {runs_str(cs)} s = {runs_str([size / s / 1e6 for s in cs], '{:.0f}')} MB/s "
          f"device bytes; output {res['create_out_bytes'] / GiB:.2f} GiB")
    print(f"  merge  {runs_str(ms)} s = {runs_str([size / s / 1e6 for s in ms], '{:.0f}')} MB/s "
          f"device bytes; output {res['merge_out_bytes'] / GiB:.2f} GiB")
    row("merge / create throughput (device B/s)", f"{size / med(ms) / 1e6:.0f} MB/s",
        f"{size / med(cs) / 1e6:.0f} MB/s", med(per_run), ">= 0.800", med(per_run) >= 0.8)
    cf = res["create_final_s"]
    print(f"  create of the merged disk's content (extracted raw image, same output as merge) "
          f"{runs_str(cf)} s = {runs_str([size / s / 1e6 for s in cf], '{:.0f}')} MB/s; output "
          f"{res['create_final_out_bytes'] / GiB:.2f} GiB")
    row("  (merge / create of the same content, info)", f"{size / med(ms) / 1e6:.0f} MB/s",
        f"{size / med(cf) / 1e6:.0f} MB/s", med([c / m for c, m in zip(cf, ms, strict=True)]),
        "info", True)
    out_ratio = med([(res["merge_out_bytes"] / m) / (res["create_out_bytes"] / c)
                     for c, m in zip(cs, ms, strict=True)])
    row("  (same, per output byte, info)", f"{res['merge_out_bytes'] / med(ms) / 1e6:.0f} MB/s",
        f"{res['create_out_bytes'] / med(cs) / 1e6:.0f} MB/s", out_ratio, "info", True)

    print()
    print(f"=== summary (medians of {res['runs']} runs / {res['rounds']} rounds; ratio = "
          "figure / baseline, per run, median) ===")
    w = max(len(x[0]) for x in lines)
    print(f"{'figure':{w}s}  {'value':>12s}  {'baseline':>20s}  {'ratio':>7s}  "
          f"{'target':>10s}  result")
    for figure, value, baseline, ratio, target, ok in lines:
        verdict = "" if target == "info" else ("PASS" if ok else "MISS")
        print(f"{figure:{w}s}  {value:>12s}  {baseline:>20s}  {ratio:>7s}  {target:>10s}  "
              f"{verdict}")
    print(f"total benchmark time {res['total_s']:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f}")
    if "--json" in sys.argv:
        print(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
