#!/usr/bin/env python3
"""Opening an archive without an index (Proxmox's): time and memory of the extent walk.

The archive is synthesised as a sparse file: a real header and every extent header of a fully
allocated disk (59 full clusters per extent, as `vma create` writes), with the data regions left
as holes, since the walk reads only headers. So a 1 TiB archive costs a few seconds to make.
Each size is opened in a fresh process, cold (page cache dropped, as root), warm, and again with
the walk cache the warm run left (a later mount of the same archive); the baseline is reading the
same extent headers with bare os.pread calls, in the same run.

    tools/bench_walk.py --sizes 64G,1T [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vmafs.format import vma  # noqa: E402

CLUSTER = vma.CLUSTER_SIZE
PER_EXTENT = vma.SLOTS_PER_EXTENT
EXTENT = vma.EXTENT_HEADER_SIZE + PER_EXTENT * CLUSTER
UUID = bytes(range(16))


def make(path: str, size: int) -> int:
    """A sparse Proxmox-style archive of one fully allocated disk; returns its extent count."""
    clusters = size // CLUSTER
    header = vma.encode_header(UUID, 0, [("drive-scsi0", size)])
    with open(path, "wb") as f:
        f.write(header)
        offset = len(header)
        n = 0
        for first in range(0, clusters, PER_EXTENT):
            count = min(PER_EXTENT, clusters - first)
            slots = [(1, c, vma.FULL_MASK) for c in range(first, first + count)]
            f.seek(offset)
            f.write(vma.encode_extent_header(UUID, slots, count * vma.BLOCKS_PER_CLUSTER))
            offset += vma.EXTENT_HEADER_SIZE + count * CLUSTER
            n += 1
        f.truncate(offset)
    return n


CHILD = """
import json, resource, sys, time
t = time.perf_counter()
if sys.argv[2] == "vmafs":
    from vmafs.archive.reader import Archive
    a = Archive.open(sys.argv[1])
    assert a.mode == "walked"
else:
    import os
    fd = os.open(sys.argv[1], os.O_RDONLY)
    size, off, step = os.fstat(fd).st_size, 12800, int(sys.argv[3])
    while off < size:
        os.pread(fd, 512, off)
        off += step
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(path: str, what: str, cold: bool, cache: str) -> dict[str, float]:
    if cold:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass
    out = subprocess.run([sys.executable, "-c", CHILD, path, what, str(EXTENT)],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.join(os.path.dirname(__file__), ".."),
                         env={**os.environ, "XDG_CACHE_HOME": cache})
    result: dict[str, float] = json.loads(out.stdout)
    return result


def parse_size(text: str) -> int:
    units = {"G": 1 << 30, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1].upper()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64G", help="comma-separated disk sizes (G or T)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the archives go")
    args = ap.parse_args()
    caches: dict[str, str] = {}
    print(f"{'size':>6} {'extents':>8} {'mode':>6} {'pread s':>8} {'vmafs s':>8} {'ratio':>6} "
          f"{'RSS MiB':>8}")
    for text in args.sizes.split(","):
        path = os.path.join(args.dir, f"bench-walk-{text}.vma")
        try:
            extents = make(path, parse_size(text))
            caches = {m: tempfile.mkdtemp(prefix="bench-walk-") for m in ("cold", "warm")}
            caches["cached"] = caches["warm"]
            for mode in ("cold", "warm", "cached"):
                base = run(path, "pread", mode == "cold", caches[mode])
                got = run(path, "vmafs", mode == "cold", caches[mode])
                print(f"{text:>6} {extents:>8} {mode:>6} {base['seconds']:8.2f} "
                      f"{got['seconds']:8.2f} {got['seconds'] / base['seconds']:6.1f} "
                      f"{got['rss_mib']:8.0f}")
        finally:
            os.unlink(path)
            for cache in set(caches.values()):
                shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
