#!/usr/bin/env python3
"""Opening an increment from S3: requests and time of Archive.open (its index confirmed against
the extent headers: an increment is confirmed at every open), fresh process each time.

    python3 tools/bench_s3_open.py [--size 4G] [--rounds 3] [--tree DIR]

Starts its own Ceph RADOS Gateway (tests/rgw.py) unless AWS_ENDPOINT_URL is set. Increments of
a disk of SIZE, plain and seekable zstd:
- scattered: 10 % of its 64 KiB clusters changed at random (extents of 59 clusters, block sums
  between them);
- small: one cluster in every 64 (the same extents, their clusters far apart);
- whole: the disk copied whole with 1 % data (an increment written with --full-if-needed: long
  runs of zero slots).
With --tree, the same opens from another checkout's code, interleaved (A B A B ...).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchlib import parse_size, s3_bench_bucket  # noqa: E402

from vmafs.archive.chain import link_to  # noqa: E402
from vmafs.archive.reader import Archive  # noqa: E402
from vmafs.archive.writer import ArchiveWriter, DeviceSpec  # noqa: E402
from vmafs.container.output import open_output  # noqa: E402
from vmafs.format import chain  # noqa: E402

C = 65536
NAME = "drive-scsi0"

OPEN = """
import sys, time, tempfile, os
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # nothing remembered: confirmed each time
from vmafs.store import ranged
made = []
init = ranged.RangedObject.__init__
def counting(self, *a, **k):
    init(self, *a, **k)
    made.append(self)
ranged.RangedObject.__init__ = counting
from vmafs.archive.reader import Archive
t0 = time.perf_counter()
Archive.open(sys.argv[1], layer=True).close()
print(f"{time.perf_counter() - t0:.4f} {sum(o.requests for o in made)}")
"""


def write(path: Path, size: int, clusters: list[int], parent: Path | None,
          whole: bool = False) -> None:
    configs = [("qemu-server.conf", b"cores: 1\n")]
    if parent is not None:
        with Archive.open(str(parent), layer=True) as p:
            configs.append((chain.CONFIG_NAME, chain.encode(chain.ChainRecord(link_to(p)))))
    rnd = random.Random(7)
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec(NAME, size)], configs,
                          incremental=[] if parent is None or whole else [1])
        for c in clusters:
            w.write(1, c * C, rnd.randbytes(C))
        w.finish()


def open_once(url: str, tree: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", OPEN, url], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default=None, help="another checkout to compare with")
    args = ap.parse_args()
    size = parse_size(args.size)
    gw, client, bucket = s3_bench_bucket("open", 4 << 30)
    trees = [("this", ROOT)] + ([("tree", Path(args.tree).resolve())] if args.tree else [])
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-open-") as tmp:
            d = Path(tmp)
            n = size // C
            rnd = random.Random(1)
            shapes = {"scattered": sorted(rnd.sample(range(n), n // 10)),
                      "small": list(range(0, n, 64)),
                      "whole": sorted(rnd.sample(range(n), n // 100))}
            for suffix in (".vma", ".vma.zst"):
                base = d / f"base{suffix}"
                write(base, size, [], None)
                for shape, clusters in shapes.items():
                    inc = d / f"{shape}{suffix}"
                    write(inc, size, clusters, base, whole=shape == "whole")
                    key = inc.name
                    client.upload_file(str(inc), bucket, key)  # type: ignore[attr-defined]
                    url = f"s3://{bucket}/{key}"
                    got: dict[str, list[tuple[float, int]]] = {t: [] for t, _ in trees}
                    for _ in range(args.rounds):
                        for label, tree in trees:
                            got[label].append(open_once(url, tree))
                    line = [f"{suffix:8} {shape:9} {inc.stat().st_size / 2**20:7.1f} MiB:"]
                    for label, runs in got.items():
                        line.append(f"{label} {statistics.median(t for t, _ in runs):.3f} s "
                                    f"{statistics.median(r for _, r in runs):.0f} requests")
                    print("  ".join(line), f"| load {os.getloadavg()[0]:.1f}", flush=True)
                    inc.unlink()
    finally:
        if gw is not None:
            gw.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
