#!/usr/bin/env python3
"""vmafs against S3, with baselines measured in the same run against the same gateway.

    python3 tools/bench_s3.py [--size 4G] [--only upload,extract,mount] [--rounds 3]

Starts its own Ceph RADOS Gateway (tests/rgw.py) unless AWS_ENDPOINT_URL is set. A disk of
SIZE, half data (random MiBs between holes), archived plain (.vma) and seekable zstd (.vma.zst):

- upload: `vmafs create -o s3://…` against boto3's own multipart upload (upload_file, its
  default TransferConfig: 8 MiB parts, 10 threads) of the same archive made locally;

- extract from S3 against one full GET of the object read to nowhere, and a serial reader
  that GETs the object range by range (4 MiB) one after another;
- mount from S3: a sequential read of the disk against the full GET; the median of cold random
  4 KiB reads (READS a round, a fresh mount each) against the median of single 64 KiB ranged
  GETs, one after each read; mount ready (time, requests) for a 1 TiB sparse archive.

Every baseline runs as its own Python process, as vmafs does (interpreter and boto3 start
included on both sides). Other work may share the machine: each figure is the median of
ROUNDS rounds, vmafs and its baselines interleaved in every round (sync before each run).
With --tree, extract and the mount's sequential read run from that checkout too, interleaved,
the two trees' turns swapped every other round: a change measured against what it changes, in
one run. With AWS_ENDPOINT_URL set, the
gateway's CPU is counted if GATEWAY_PIDS (its processes' ids, space-separated) is set too.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchlib import make_half_data_image, parse_size, s3_bench_bucket  # noqa: E402

MiB = 1 << 20


CPU: list[float] = [0.0, 0.0]
"""The last command's CPU seconds (user + system, its threads included), and the gateway's
meanwhile (its processes', when this script started it): the client and the gateway share
the cores, so CPU per GiB says what a run costs more steadily than its wall time."""
GATEWAY_PIDS: list[int] = []


def _gateway_cpu() -> float:
    ticks = 0
    for pid in GATEWAY_PIDS:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _timed(argv: list[str], env: dict[str, str] | None, cwd: Path = ROOT
           ) -> tuple[float, int, str]:
    """Wall time, exit status and stderr of one command; its CPU (and the gateway's) in CPU."""
    subprocess.run(["sync"], check=False)
    gw0 = _gateway_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    CPU[:] = [usage.ru_utime + usage.ru_stime, _gateway_cpu() - gw0]
    return wall, os.waitstatus_to_exitcode(status), err


def vmafs(*args: str, check: bool = True, tree: Path = ROOT) -> float:
    wall, code, err = _timed([sys.executable, "-m", "vmafs", *args],
                             {**os.environ, "PYTHONPATH": str(tree)}, tree)
    if check and code != 0:
        raise SystemExit(f"vmafs {' '.join(args)} failed: {err}")
    return wall


def python(code: str, *args: str) -> float:
    """A baseline as its own process, as vmafs runs: interpreter and boto3 start included."""
    wall, status, err = _timed([sys.executable, "-c", code, *args], None)
    if status != 0:
        raise SystemExit(f"baseline failed: {err}")
    return wall


FULL_GET = """
import sys, boto3
body = boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"]
while body.read(1 << 20):
    pass
"""

SERIAL = """
import sys, boto3
c, bucket, key, size = boto3.client("s3"), sys.argv[1], sys.argv[2], int(sys.argv[3])
for at in range(0, size, 4 << 20):
    c.get_object(Bucket=bucket, Key=key,
                 Range=f"bytes={at}-{min(at + (4 << 20), size) - 1}")["Body"].read()
"""

UPLOAD = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
boto3.client("s3").upload_file(sys.argv[1], sys.argv[2], sys.argv[3], Config=TransferConfig())
"""


def full_get(client: object, bucket: str, key: str) -> float:
    return python(FULL_GET, bucket, key)


def serial_ranges(client: object, bucket: str, key: str, size: int) -> float:
    return python(SERIAL, bucket, key, str(size))


def ranged_64k_median(client: object, bucket: str, key: str, size: int, n: int = 50) -> float:
    times = []
    for _ in range(n):
        at = random.randrange(0, size - 65536)
        t0 = time.perf_counter()
        client.get_object(Bucket=bucket, Key=key,  # type: ignore[attr-defined]
                          Range=f"bytes={at}-{at + 65535}")["Body"].read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G", help="disk size (K/M/G suffix)")
    ap.add_argument("--only", default="upload,extract,mount")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per figure, vmafs and baselines interleaved (medians)")
    ap.add_argument("--frame-size", default=None, metavar="KIB",
                    help="zstd frame size for the .vma.zst archives (vmafs's default if not "
                         "given; 512 keeps a cold random read from S3 near one small GET)")
    ap.add_argument("--reads", type=int, default=200,
                    help="cold random 4 KiB reads through the mount per round")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--tree", default=None, type=Path,
                    help="another checkout whose extract and mount run interleaved too")
    ap.add_argument("--out", default=None,
                    help="where extract writes (default: the scratch directory, on a disk as "
                         "a user's would be: extract writes around the page cache there, "
                         "O_DIRECT; /dev/shm measures the network path with buffered writes)")
    args = ap.parse_args()
    size = parse_size(args.size)
    only = set(args.only.split(","))

    # before the gateway starts: a bad --dir must not leave one running
    scratch = Path(tempfile.mkdtemp(prefix="vmafs-bench-s3-", dir=args.dir))
    gw, client, bucket = s3_bench_bucket("bench", max(8 << 30, 6 * size))
    if gw is not None:
        GATEWAY_PIDS.extend(p.pid for p in gw.procs.values())  # type: ignore[attr-defined]
    else:
        GATEWAY_PIDS.extend(int(p) for p in os.environ.get("GATEWAY_PIDS", "").split())
    trees = [("vmafs", ROOT)] + ([("tree", args.tree.resolve())] if args.tree else [])
    for _, tree in trees:  # bytecode as an install has it: with PYTHONDONTWRITEBYTECODE set,
        # a module changed since (or a fresh checkout) was compiled again by every run
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "vmafs")],
                       stdout=subprocess.DEVNULL, check=True)
    results: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        results.append(line)

    try:
        disk = scratch / "disk.raw"
        make_half_data_image(disk, size, MiB)  # random: nothing compresses
        report(f"disk {size / 2**30:.2f} GiB, half data; gateway {os.environ['AWS_ENDPOINT_URL']}")
        for suffix in (".vma", ".vma.zst"):
            key = f"a{suffix}"
            local = scratch / f"local{suffix}"
            framing = ["--frame-size", args.frame_size] if args.frame_size and suffix != ".vma" \
                else []
            vmafs("create", *framing, "-o", str(local), f"drive-scsi0={disk}")
            stored = local.stat().st_size
            if "upload" in only or not any(o in only for o in ("extract", "mount")):
                ours, boto = [], []
                for _ in range(args.rounds):
                    client.delete_object(Bucket=bucket, Key=key)
                    ours.append(vmafs("create", *framing, "-o", f"s3://{bucket}/{key}",
                                      f"drive-scsi0={disk}"))
                    boto.append(python(UPLOAD, str(local), bucket, "baseline" + suffix))
                    client.delete_object(Bucket=bucket, Key="baseline" + suffix)
                t_ours, t_boto = statistics.median(ours), statistics.median(boto)
                report(f"{suffix:8} upload: vmafs create -o s3:// {stored / MiB / t_ours:7.1f} "
                       f"MiB/s (archive bytes) | boto3 upload_file {stored / MiB / t_boto:7.1f} "
                       f"MiB/s | ratio {t_boto / t_ours:.2f} (need >= 0.8)")
            else:
                client.upload_file(str(local), bucket, key)
            local.unlink()
            if "extract" in only:
                gets, serials = [], []
                exts: dict[str, list[float]] = {label: [] for label, _ in trees}
                cpu: dict[str, list[list[float]]] = {"get": [], **{k: [] for k in exts}}
                for r in range(args.rounds):
                    gets.append(full_get(client, bucket, key))
                    cpu["get"].append(list(CPU))
                    for label, tree in turns(trees, r):
                        out = Path(tempfile.mkdtemp(prefix="vmafs-bench-x-",
                                                    dir=args.out or scratch))
                        exts[label].append(vmafs("extract", f"s3://{bucket}/{key}",
                                                 str(out / "x"), tree=tree))
                        cpu[label].append(list(CPU))
                        subprocess.run(["rm", "-rf", str(out)], check=True)
                    serials.append(serial_ranges(client, bucket, key, stored))
                t_get, t_serial = statistics.median(gets), statistics.median(serials)
                gib = stored / (1 << 30)
                per = {k: [statistics.median(r[i] for r in v) / gib for i in (0, 1)]
                       for k, v in cpu.items()}
                for label, _ in trees:
                    t_ext = statistics.median(exts[label])
                    report(f"{suffix:8} extract ({label}) {stored / MiB / t_ext:7.1f} MiB/s | "
                           f"full GET {stored / MiB / t_get:7.1f} | serial 4 MiB ranges "
                           f"{stored / MiB / t_serial:7.1f} | ratio to GET {t_get / t_ext:.2f} "
                           f"(>= 0.8), to serial {t_serial / t_ext:.2f} (>= 1.5)")
                    gateway = (f" | gateway's {per[label][1]:.2f} (GET: {per['get'][1]:.2f})"
                               if GATEWAY_PIDS else "")
                    report(f"{'':8} CPU s per GiB stored: extract ({label}) {per[label][0]:.2f}"
                           f" | full GET {per['get'][0]:.2f}{gateway}")
                report(f"{'':8} load {os.getloadavg()[0]:.1f}")
            if "mount" in only:
                bench_mount(client, bucket, key, stored, size, scratch, report, args.rounds,
                            trees, args.reads)
            client.delete_object(Bucket=bucket, Key=key)
        if "mount" in only:
            bench_ready(bucket, scratch, report)
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
        if gw is not None:
            gw.stop()
    return 0


def turns(trees: list[tuple[str, Path]], r: int) -> list[tuple[str, Path]]:
    """The trees in round ``r``'s order: swapped every other round, since the run right after
    the full GET pays for it (the old tree first: 1.96 vs 1.32 CPU-s/GiB for the same extract,
    daemon CPU 6.0 vs 4.0 s for the same mount)."""
    return trees if r % 2 == 0 else trees[::-1]


def bench_mount(client: object, bucket: str, key: str, stored: int, size: int, scratch: Path,
                report: Callable[[str], None], rounds: int,
                trees: list[tuple[str, Path]], reads: int) -> None:
    mnt = scratch / "mnt"
    mnt.mkdir(exist_ok=True)
    gets: list[float] = []
    seqs: dict[str, list[float]] = {label: [] for label, _ in trees}
    daemon_cpu: dict[str, list[float]] = {label: [] for label, _ in trees}
    for r in range(rounds):  # a fresh mount each round: nothing in the page cache
        gets.append(full_get(client, bucket, key))
        for label, tree in turns(trees, r):
            vmafs("mount", f"s3://{bucket}/{key}", str(mnt), tree=tree)
            try:
                pid = _mount_pid(mnt)
                t0 = time.perf_counter()
                with open(mnt / "disk-drive-scsi0.raw", "rb", buffering=0) as f:
                    while f.read(MiB):
                        pass
                seqs[label].append(time.perf_counter() - t0)
                daemon_cpu[label].append(_cpu_of(pid))
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    t_get = statistics.median(gets)
    for label, _ in trees:
        t_seq = statistics.median(seqs[label])
        report(f"  mount ({label}) sequential read {size / MiB / t_seq:7.1f} MiB/s of disk "
               f"({stored / MiB / t_seq:7.1f} MiB/s of archive) | full GET "
               f"{stored / MiB / t_get:7.1f} MiB/s | ratio {t_get / t_seq:.2f} (>= 0.5) | "
               f"daemon CPU {statistics.median(daemon_cpu[label]):.2f} s | load "
               f"{os.getloadavg()[0]:.1f}")
    ours: dict[str, list[float]] = {label: [] for label, _ in trees}
    base: dict[str, list[float]] = {label: [] for label, _ in trees}
    for r in range(rounds):  # a fresh mount each round; each read beside a 64 KiB GET
        for label, tree in turns(trees, r):
            vmafs("mount", f"s3://{bucket}/{key}", str(mnt), tree=tree)
            try:
                mine, theirs = [], []
                fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
                try:
                    for _ in range(reads):
                        at = random.randrange(0, size // (2 * MiB)) * 2 * MiB  # a data MiB
                        at += random.randrange(0, MiB // 4096) * 4096
                        t0 = time.perf_counter()
                        os.posix_fadvise(fd, at, 4096, os.POSIX_FADV_DONTNEED)
                        os.pread(fd, 4096, at)
                        mine.append(time.perf_counter() - t0)
                        theirs.append(ranged_64k_median(client, bucket, key, stored, n=1))
                finally:
                    os.close(fd)
                ours[label].append(statistics.median(mine))
                base[label].append(statistics.median(theirs))
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    for label, _ in trees:
        ratio = statistics.median(o / b for o, b in zip(ours[label], base[label], strict=True))
        report(f"  mount ({label}) random 4 KiB cold read median "
               f"{statistics.median(ours[label]) * 1e3:.2f} ms | one 64 KiB ranged GET "
               f"{statistics.median(base[label]) * 1e3:.2f} ms | ratio {ratio:.2f} (<= 2) | "
               f"{reads} reads x {rounds} rounds, interleaved | load {os.getloadavg()[0]:.1f}")


def _mount_pid(mnt: Path) -> int:
    """The mount daemon's pid (the process whose fuse device serves mnt)."""
    out = subprocess.run(["pgrep", "-f", f"vmafs mount .* {mnt}$"], capture_output=True,
                         text=True, check=False).stdout.split()
    return int(out[0]) if out else 0


def _cpu_of(pid: int) -> float:
    """A running process's CPU seconds so far (user + system)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_ready(bucket: str, scratch: Path, report: Callable[[str], None]) -> None:
    """A 1 TiB sparse disk (a few MiB of data), archived to S3; how soon a mount is ready."""
    sparse = scratch / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)
        for at in (0, 1 << 39, (1 << 40) - MiB):
            f.seek(at)
            f.write(os.urandom(MiB))
    from vmafs.archive.reader import Archive
    from vmafs.store import ranged

    made: list[ranged.RangedObject] = []
    init = ranged.RangedObject.__init__

    def counting(self: ranged.RangedObject, *a: object, **k: object) -> None:
        init(self, *a, **k)  # type: ignore[arg-type]
        made.append(self)

    suffix = ".vma.zst"
    key = f"sparse{suffix}"
    vmafs("create", "-o", f"s3://{bucket}/{key}", f"drive-scsi0={sparse}")
    mnt = scratch / "mnt"
    t = vmafs("mount", f"s3://{bucket}/{key}", str(mnt))
    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    ranged.RangedObject.__init__ = counting  # type: ignore[method-assign]
    t0 = time.perf_counter()
    Archive.open(f"s3://{bucket}/{key}").close()
    t_open = time.perf_counter() - t0
    ranged.RangedObject.__init__ = init  # type: ignore[method-assign]
    report(f"{suffix:8} 1 TiB sparse: mount ready {t:.2f} s (whole command, interpreter "
           f"start included) | archive open {t_open:.3f} s, {made[0].requests} requests")


if __name__ == "__main__":
    sys.exit(main())
