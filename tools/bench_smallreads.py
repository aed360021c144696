#!/usr/bin/env python3
"""Small random reads of a plain archive, against QEMU's own exports of the raw image, in one
run (issue 17: "small reads as fast as QEMU's own export").

Needs root (FUSE), qemu-storage-daemon, qemu-nbd and Debian's python3-libnbd:

    python3 tools/bench_smallreads.py [--size-gib 2] [--rounds 5] [--reads 1000]
                                      [--workdir /var/tmp/vmafs-bench-smallreads] [--keep]

One image (data and hole stripes of 64 MiB, as bench_mount.py) and its plain `.vma` are served
side by side: `vmafs mount` against a qemu-storage-daemon FUSE export of the image, and
`vmafs serve` against `qemu-nbd --read-only` of the image (a libnbd client, one connection,
one request at a time). Each round measures every pair, candidate and baseline interleaved
(their order alternates from round to round), at the same random 4 KiB-aligned offsets in
data:

  * cold: the backing file's pages (the archive, the image) are evicted first, one file with
    POSIX_FADV_DONTNEED (never drop_caches: others on the machine keep their warm caches);
  * warm: the backing file is in the page cache; what is left is each server's own cost.

The FUSE file's own page cache is evicted before each pass (so every read reaches the
daemon) and read with POSIX_FADV_RANDOM (4 KiB requests, no read-ahead). Latencies are the
median of a pass; ratios are taken within a round, and the median ratio over rounds is
reported with its range. Targets: vmafs/baseline <= 1.0 (mount vs qsd, serve vs qemu-nbd),
cold and warm. A final JSON line holds every round. Where a cold read's time goes (the whole
64 KiB cluster read to check its checksum) is measured by tools/bench_blocksums.py.

The floor is measured in the same rounds: "pread.image" and "pread.archive" are this
process's own 4 KiB preads of the image at the same offsets and of the archive where those
blocks are stored (Archive.stream_offset), cold or warm as the pass: what the disk and the
page cache cost before any server adds its share.

--tree NAME=DIR (repeatable) also serves the archive with the vmafs of another source tree
(e.g. a `git worktree` of an older commit): "mount@NAME"/"serve@NAME", measured in the same
rounds, so a change's gain is a ratio within one run too.

`vmafs create` writes a block-summed archive (format/index.py): a 4 KiB read reads its block
and the cluster's sums. --unsummed also serves the same image as an archive without block
sums (every read checks its whole 64 KiB cluster, as before them): "mount0"/"serve0", measured
in the same rounds, so the gain is a ratio within a run too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchlib import evict, make_half_data_image

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
STRIPE = 64 * MiB
DISK = "disk-drive-scsi0.raw"
SYSTEM_PYTHON = "/usr/bin/python3"   # Debian's python3-libnbd lives there

# One libnbd connection; reads offsets from stdin ("N SEED" lines), answers the median (µs).
NBD_CLIENT = r'''
import nbd, random, statistics, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size, stripe = h.get_size(), int(sys.argv[2])
for line in sys.stdin:
    n, seed = map(int, line.split())
    rnd = random.Random(seed)
    times = []
    for _ in range(n):
        while True:
            off = rnd.randrange(0, size // 4096) * 4096
            if (off // stripe) % 2 == 0:
                break
        t = time.perf_counter()
        h.pread(4096, off)
        times.append(time.perf_counter() - t)
    print(statistics.median(times) * 1e6, flush=True)
'''


def env(tree: Path = ROOT) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def vmafs(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmafs", *args]


def warm(path: Path) -> None:
    """Read a file's data into the page cache (holes of a sparse image cost nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, off, os.SEEK_HOLE), size)
            while off < end:
                off += len(os.pread(fd, min(8 * MiB, end - off), off))
    finally:
        os.close(fd)


def offsets(size: int, n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    got: list[int] = []
    while len(got) < n:
        off = rnd.randrange(0, size // 4096) * 4096
        if (off // STRIPE) % 2 == 0:
            got.append(off)
    return got


def preads(path: Path, offs: list[int], *, evict: bool = False) -> float:
    """Median latency (µs) of 4 KiB preads of a file at these offsets (the floor; a FUSE file
    with evict: its own page cache dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if evict:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        times = []
        for off in offs:
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return statistics.median(times) * 1e6


def open_model(archive: Path) -> Any:
    """The archive opened by this tree's reader (for Archive.stream_offset)."""
    sys.path.insert(0, str(ROOT))
    from vmafs.archive.reader import Archive

    return Archive.open(str(archive))


def stored_at(model: Any, offs: list[int]) -> list[int]:
    """Where the archive stores the blocks at these device offsets (its first device)."""
    dev_id = model.devices[0].dev_id
    got = [model.stream_offset(dev_id, off) for off in offs]
    assert None not in got, "the offsets are in data"
    return got


class NBDClient:
    """A libnbd client (Debian's python3) on one connection, kept open between passes."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", NBD_CLIENT, url, str(STRIPE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reads(self, n: int, seed: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n} {seed}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not come up")


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@contextmanager
def process(argv: list[str], ready: object, what: str, tree: Path = ROOT
            ) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env(tree), cwd=tree)  # -m puts the cwd first
    try:
        wait_for(ready, what)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def vmafs_mount(archive: Path, mnt: Path, tree: Path = ROOT) -> Iterator[None]:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(vmafs("mount", "-f", str(archive), str(mnt)), env=env(tree),
                            cwd=tree)  # `python -m` imports from the cwd first
    try:
        wait_for(lambda: mounted(mnt), "vmafs mount")
        yield
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=30)


def write_unsummed(image: Path, out: Path) -> None:
    """The image as an archive without block sums, as vmafs wrote them before (whole-cluster
    checks): the writer's API with block_sums=False; zero runs cost nothing."""
    sys.path.insert(0, str(ROOT))
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.zstd_output import PlainOutput

    size = image.stat().st_size
    chunk = 4 * MiB
    with open(image, "rb") as src, open(out, "xb") as f:
        output = PlainOutput(f)
        writer = ArchiveWriter(output, [DeviceSpec("drive-scsi0", size)], block_sums=False)
        off = 0
        while off < size:  # the data runs only (SEEK_DATA): holes are zero slots at finish
            try:
                off = os.lseek(src.fileno(), off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(src.fileno(), off, os.SEEK_HOLE)
            start = off // chunk * chunk
            for at in range(start, min(-(-end // chunk) * chunk, size), chunk):
                data = os.pread(src.fileno(), min(chunk, size - at), at)
                if data.count(0) != len(data):
                    writer.write(1, at, data)
            off = max(end, -(-end // chunk) * chunk)
        writer.finish()
        output.close()


def qsd_argv(image: Path, target: Path) -> list[str]:
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image},read-only=on,"
                          "cache.direct=off",
            "--blockdev", "driver=raw,node-name=raw0,file=file0,read-only=on",
            "--export", f"type=fuse,id=exp0,node-name=raw0,mountpoint={target},writable=off"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=1000, help="4 KiB reads per pass")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmafs-bench-smallreads"))
    ap.add_argument("--only", choices=("fuse", "nbd"), help="measure one pair only")
    ap.add_argument("--keep", action="store_true", help="keep the image and the archive")
    ap.add_argument("--unsummed", action="store_true",
                    help="also an archive without block sums (mount0, serve0)")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="also mount and serve with another source tree's vmafs "
                         "(mount@NAME, serve@NAME)")
    args = ap.parse_args()
    trees: dict[str, Path] = {}
    for item in args.tree:
        name, sep, path = item.partition("=")
        if not sep or not name or not (Path(path) / "vmafs").is_dir():
            ap.error(f"--tree {item!r}: give NAME=DIR, DIR a source tree with vmafs/")
        trees[name] = Path(path).resolve()
    if os.geteuid() != 0:
        print("bench_smallreads: needs root (FUSE)", file=sys.stderr)
        return 2
    work: Path = args.workdir.resolve()  # the servers run in their tree's directory
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB) // MiB * MiB
    image, archive = work / "image.raw", work / "image.vma"
    make_half_data_image(image, size, STRIPE)
    if not archive.exists():
        subprocess.run(vmafs("create", "-q", "-o", str(archive), f"drive-scsi0={image}"),
                       check=True, env=env())
    old = work / "image-unsummed.vma"
    if args.unsummed and not old.exists():
        write_unsummed(image, old)
    backing = {"qsd": image, "mount": archive, "qemu-nbd": image, "serve": archive,
               "mount0": old, "serve0": old, "pread.image": image, "pread.archive": archive}
    for name in trees:
        backing[f"mount@{name}"] = backing[f"serve@{name}"] = archive
    pairs = {"fuse": ("mount", "qsd"), "nbd": ("serve", "qemu-nbd")}
    # more candidates of a pair, measured in the same rounds, each as a ratio to the baseline
    extra = {"fuse": ["mount0"] * args.unsummed + [f"mount@{n}" for n in trees],
             "nbd": ["serve0"] * args.unsummed + [f"serve@{n}" for n in trees]}
    if args.only:
        pairs = {args.only: pairs[args.only]}
    rounds: list[dict[str, float]] = []
    with ExitStack() as stack:
        files: dict[str, Path] = {}
        clients: dict[str, NBDClient] = {}
        if "fuse" in pairs:
            qsd = work / "qsd-export.raw"
            qsd.touch()
            stack.enter_context(process(qsd_argv(image, qsd), lambda: mounted(qsd), "qsd"))
            stack.enter_context(vmafs_mount(archive, work / "mnt"))
            files = {"qsd": qsd, "mount": work / "mnt" / DISK}
            if args.unsummed:
                stack.enter_context(vmafs_mount(old, work / "mnt0"))
                files["mount0"] = work / "mnt0" / DISK
            for name, tree in trees.items():
                stack.enter_context(vmafs_mount(archive, work / f"mnt@{name}", tree))
                files[f"mount@{name}"] = work / f"mnt@{name}" / DISK
        if "nbd" in pairs:
            qsock, vsock = work / "qemu-nbd.sock", work / "serve.sock"
            for sock in (qsock, vsock):
                sock.unlink(missing_ok=True)
            stack.enter_context(process(
                ["qemu-nbd", "--read-only", "-f", "raw", "-t", "-k", str(qsock), str(image)],
                qsock.exists, "qemu-nbd"))
            stack.enter_context(process(vmafs("serve", "-f", "--socket", str(vsock),
                                              str(archive)), vsock.exists, "vmafs serve"))
            socks = [("qemu-nbd", qsock), ("serve", vsock)]
            if args.unsummed:
                osock = work / "serve0.sock"
                osock.unlink(missing_ok=True)
                stack.enter_context(process(vmafs("serve", "-f", "--socket", str(osock),
                                                  str(old)), osock.exists, "vmafs serve"))
                socks.append(("serve0", osock))
            for name, tree in trees.items():
                tsock = work / f"serve@{name}.sock"
                tsock.unlink(missing_ok=True)
                stack.enter_context(process(vmafs("serve", "-f", "--socket", str(tsock),
                                                  str(archive)), tsock.exists, "vmafs serve",
                                            tree))
                socks.append((f"serve@{name}", tsock))
            for name, sock in socks:
                url = f"nbd+unix:///{'' if name == 'qemu-nbd' else 'drive-scsi0'}?socket={sock}"
                clients[name] = client = NBDClient(url)
                stack.callback(client.close)

        model = stack.enter_context(open_model(archive))

        def measure(name: str, cold: bool, seed: int) -> float:
            if cold:
                evict(backing[name])
            else:
                warm(backing[name])
            if name == "pread.image":
                return preads(image, offsets(size, args.reads, seed))
            if name == "pread.archive":
                return preads(archive, stored_at(model, offsets(size, args.reads, seed)))
            if name in files:
                return preads(files[name], offsets(size, args.reads, seed), evict=True)
            return clients[name].reads(args.reads, seed)

        for r in range(args.rounds):
            row: dict[str, float] = {}
            for pair, (ours, theirs) in pairs.items():
                for state in ("cold", "warm"):
                    names = (ours, theirs, *extra[pair])
                    if pair == next(iter(pairs)):  # the floor, once a round
                        names = (*names, "pread.image", "pread.archive")
                    order = names if r % 2 == 0 else names[::-1]
                    for name in order:
                        row[f"{name}.{state}"] = measure(name, state == "cold", 100 + r)
                    for name in (ours, *extra[pair]):
                        label = {"mount0": "unsummed", "serve0": "unsummed"}.get(name, name)
                        key = (f"ratio.{pair}.{state}" if name == ours
                               else f"ratio.{pair}.{label}.{state}")
                        row[key] = row[f"{name}.{state}"] / row[f"{theirs}.{state}"]
            print(f"round {r + 1}: " + "  ".join(f"{k} {v:.2f}" if k.startswith("ratio")
                                                 else f"{k} {v:.0f} µs"
                                                 for k, v in row.items()), flush=True)
            rounds.append(row)
    print(f"--- medians over {args.rounds} rounds [min - max]; latencies in µs")
    print(f"trees: this one {ROOT}" + "".join(f", {n} {p}" for n, p in trees.items()))
    med = {}
    for key in rounds[0]:
        values = [row[key] for row in rounds]
        med[key] = statistics.median(values)
        print(f"{key:24s} {med[key]:9.2f}  [{min(values):.2f} - {max(values):.2f}]")
    for pair, (ours, theirs) in pairs.items():
        for state in ("cold", "warm"):
            ratio = med[f"ratio.{pair}.{state}"]
            print(f"{'PASS' if ratio <= 1.0 else 'MISS'}  {state} random 4 KiB, {ours} <= "
                  f"{theirs}: {ratio:.2f}x")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    if not args.keep:
        old.unlink(missing_ok=True)
    print(json.dumps({"medians": med, "rounds": rounds}, sort_keys=True))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
