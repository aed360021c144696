#!/usr/bin/env python3
"""Cold random 4 KiB reads of a .vma.zst (or, with --plain, a .vma too) through `vmafs mount`
from S3, against one ranged GET of 64 KiB, in the same rounds against the same gateway (issue
16: median <= 2x).

    python3 tools/bench_s3_random.py [--size 1G] [--reads 60] [--rounds 3] [--plain]
                                     [--frame-size KIB]... [--before TREE]

Starts its own Ceph RADOS Gateway (tests/rgw.py) unless AWS_ENDPOINT_URL is set. A disk of
SIZE, half data (random MiBs between holes, as tools/bench_s3.py), archived as .vma.zst once
per --frame-size (vmafs's default if none given) and uploaded. Each round mounts every archive
afresh (and with --before TREE, the same archive by that vmafs tree too) and reads READS random
4 KiB blocks of data MiBs, each evicted first (POSIX_FADV_DONTNEED), as bench_s3.py does; a
64 KiB ranged GET of the object at a random offset follows every read (boto3, one client, its
connection kept), so both see the same gateway load. Printed: medians per round and overall,
the ratio, and what one such read costs in process (a fresh open each, nothing cached): GET
requests past the open, MiB fetched and seconds (the mount's daemon cannot be counted from here).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchlib import make_half_data_image, parse_size, s3_bench_bucket  # noqa: E402

MiB = 1 << 20


def vmafs(tree: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vmafs", *args], cwd=tree,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if proc.returncode != 0:
        raise SystemExit(f"vmafs {' '.join(args)} failed: {proc.stderr}")


def offsets(size: int, n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(0, size // (2 * MiB)) * 2 * MiB + rnd.randrange(0, MiB // 4096) * 4096
            for _ in range(n)]


def in_process_requests(location: str, at: list[int]) -> tuple[float, float, float]:
    """(requests, MiB fetched, seconds) per read of these offsets through this tree's reader,
    each a fresh frame (new Archive per read: nothing cached)."""
    from vmafs.archive.chain import open_chain
    from vmafs.store import ranged

    counted = {"bytes": 0}
    orig = ranged.RangedObject._get

    def get(self: ranged.RangedObject, start: int, end: int) -> bytes:
        counted["bytes"] += end - start
        return orig(self, start, end)

    ranged.RangedObject._get = get  # type: ignore[method-assign]
    reqs, secs = [], []
    fetched = 0
    try:
        for off in at:
            with open_chain(location) as archive:
                dev = archive.devices[0]
                objs = [getattr(s, "_raw", None) or getattr(s, "obj", s) for s in archive.sources]
                counted["bytes"] = 0
                before = sum(o.requests for o in objs if hasattr(o, "requests"))
                t0 = time.perf_counter()
                archive.read(dev.dev_id, off, 4096)
                secs.append(time.perf_counter() - t0)
                reqs.append(sum(o.requests for o in objs if hasattr(o, "requests")) - before)
                fetched += counted["bytes"]
    finally:
        ranged.RangedObject._get = orig  # type: ignore[method-assign]
    return statistics.median(reqs), fetched / len(at) / MiB, statistics.median(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--reads", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frame-size", action="append", default=[], metavar="KIB")
    ap.add_argument("--plain", action="store_true", help="a plain .vma too (its first read "
                    "in an extent checks the extent's header: a request beside the data's)")
    ap.add_argument("--before", type=Path, metavar="TREE",
                    help="also mount with this vmafs tree (git archive REV vmafs | tar -x)")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    size = parse_size(args.size)

    gw, client, bucket = s3_bench_bucket("benchrand", max(4 << 30, 3 * size))
    scratch = Path(tempfile.mkdtemp(prefix="vmafs-bench-s3r-", dir=args.dir))
    mounts: list[Path] = []
    try:
        disk = scratch / "disk.raw"
        make_half_data_image(disk, size, MiB)  # random: nothing compresses
        frames = args.frame_size or [""]
        keys = {}
        for fs in ["plain"] * args.plain + frames:
            key = "a.vma" if fs == "plain" else f"a{fs or 'default'}.vma.zst"
            local = scratch / key
            vmafs(ROOT, "create", *(["--frame-size", fs] if fs not in ("", "plain") else []),
                  "-o", str(local), f"drive-scsi0={disk}")
            client.upload_file(str(local), bucket, key)
            keys[fs or "default"] = (key, local.stat().st_size)
            local.unlink()
        disk.unlink()
        trees = {"": ROOT} | ({"before ": args.before.resolve()} if args.before else {})
        variants = [(f"{t}{fs}", tree, key, stored) for fs, (key, stored) in keys.items()
                    for t, tree in trees.items()]
        ours: dict[str, list[float]] = {v[0]: [] for v in variants}
        base: dict[str, list[float]] = {v[0]: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, tree, key, stored in order:
                mnt = scratch / f"mnt-{len(mounts)}"
                mnt.mkdir()
                mounts.append(mnt)
                vmafs(tree, "mount", f"s3://{bucket}/{key}", str(mnt))
                fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
                rnd = random.Random(r * 1000 + len(mounts))
                try:
                    mine, theirs = [], []
                    for off in offsets(size, args.reads, r * 7919 + len(mounts)):
                        t0 = time.perf_counter()
                        os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_DONTNEED)
                        os.pread(fd, 4096, off)
                        mine.append(time.perf_counter() - t0)
                        at = rnd.randrange(0, stored - 65536)
                        t0 = time.perf_counter()
                        client.get_object(Bucket=bucket, Key=key,
                                          Range=f"bytes={at}-{at + 65535}")["Body"].read()
                        theirs.append(time.perf_counter() - t0)
                finally:
                    os.close(fd)
                    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                    mnt.rmdir()
                    mounts.remove(mnt)
                ours[name].append(statistics.median(mine))
                base[name].append(statistics.median(theirs))
                print(f"round {r + 1} {name or 'this tree'}: read {ours[name][-1] * 1e3:.2f} ms,"
                      f" 64 KiB GET {base[name][-1] * 1e3:.2f} ms", flush=True)
        print(f"\ncold random 4 KiB reads through the mount from S3 ({size / MiB:.0f} "
              f"MiB disk, {args.reads} reads x {args.rounds} rounds; load average "
              f"{os.getloadavg()[0]:.1f})")
        print(f"{'variant':24} {'read ms':>8} {'GET64K ms':>9} {'ratio':>6}  target <= 2")
        for name, *_ in variants:
            ratio = statistics.median(o / b for o, b in zip(ours[name], base[name], strict=True))
            print(f"{name or 'this tree':24} {statistics.median(ours[name]) * 1e3:8.2f} "
                  f"{statistics.median(base[name]) * 1e3:9.2f} {ratio:6.2f}  "
                  f"{'PASS' if ratio <= 2 else 'MISS'}")
        for fs, (key, _) in keys.items():
            reqs, mib, secs = in_process_requests(f"s3://{bucket}/{key}",
                                                  offsets(size, 10, 4242))
            what = fs if fs == "plain" else f"frame size {fs}"
            print(f"in process, {what}: {reqs} GETs a read (median), "
                  f"{mib:.2f} MiB fetched a read (mean), {secs * 1e3:.2f} ms (median)")
    finally:
        for mnt in mounts:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        if gw is not None:
            gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
