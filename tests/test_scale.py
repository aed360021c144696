"""Memory follows the file, not what it claims: archives claiming 2^44- and 2^48-byte devices, and
a real sparse disk of terabytes, through every command, each in a fresh process whose peak RSS
(the child's own VmHWM) must stay under 256 MiB.

The 16 TiB round trip takes minutes; it is tools/bench_scale.py, which imports round_trip from
here. Here the same path runs at 2 TiB.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from archive_helpers import MemOutput
from conftest import ROOT, assert_one_line_error, fuse_missing

from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.format import index, vma

MiB = 1 << 20
TiB = 1 << 40
CLUSTER = vma.CLUSTER_SIZE
RSS_LIMIT = 256 * MiB
UUID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


# -- running a command in a fresh, measured process ----------------------------------------------

@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    maxrss: int  # bytes
    seconds: float

    def assert_clean(self, *, rss_limit: int = RSS_LIMIT, max_lines: int = 1) -> None:
        """Success, or one line of error (verify: a line per problem, at most max_lines);
        never a traceback; memory bounded."""
        assert "Traceback" not in self.stderr, self.stderr
        if self.rc and max_lines == 1:
            assert_one_line_error(self.rc, self.stderr)
        elif self.rc:
            lines = [line for line in self.stderr.splitlines() if line.strip()]
            assert 1 <= len(lines) <= max_lines, self.stderr
        assert self.rc >= 0, f"killed by signal {-self.rc}: {self.stderr}"
        assert self.maxrss < rss_limit, f"peak RSS {self.maxrss / MiB:.0f} MiB"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


# The child reports its own high-water mark (VmHWM) when it exits. ru_maxrss from wait4 would also
# count the parent it was forked from (pytest, hundreds of MiB late in a run) before its exec.
REPORT_HWM = """
import atexit, os
def _report_hwm():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["VMAFS_TEST_HWM"], "w") as out:
        out.write(kib)
atexit.register(_report_hwm)
"""
HWM_PROBE = REPORT_HWM + """
import runpy, sys
sys.argv = ["vmafs", *sys.argv[1:]]
runpy.run_module("vmafs", run_name="__main__", alter_sys=True)
"""


def vmafs_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-c", HWM_PROBE, *map(str, args)]


def _peak(hwm: Path, usage_maxrss: int) -> int:
    """Bytes: the child's own VmHWM if it reported one, else what wait4 said."""
    try:
        return int(hwm.read_text()) * 1024
    except (OSError, ValueError):
        return usage_maxrss * 1024


def measured(argv: list[str], *, timeout: float = 300, cwd: Path | None = None) -> Run:
    """Run argv to its end and measure its peak RSS (see HWM_PROBE)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp, "hwm")
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=dict(_env(), VMAFS_TEST_HWM=str(hwm)), cwd=cwd or ROOT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise AssertionError(f"{argv} did not end within {timeout} s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), _peak(hwm, usage.ru_maxrss), seconds)


def vmafs(*args: str | os.PathLike[str], timeout: float = 300) -> Run:
    return measured(vmafs_argv(*args), timeout=timeout)


# -- archives that claim more than they hold ------------------------------------------------------

def header_only(devices: list[tuple[str, int]], null_extent: bool) -> bytes:
    head = vma.encode_header(UUID, 1700000000, devices, [("qemu-server.conf", b"cores: 1\n")])
    return head + (vma.encode_null_extents(UUID, b"") if null_extent else b"")


def scattered(devices: list[tuple[str, int]], indexed: bool) -> bytes:
    """Data clusters spread over each whole claimed device (each on its own 2^16-cluster page,
    the first and the last cluster among them), and optionally a vmafs index + footer for them:
    what a forged archive that skips its zero slots looks like."""
    buf = bytearray(header_only(devices, null_extent=False))
    builder = index.IndexBuilder()
    for dev_id, (_, size) in enumerate(devices, start=1):
        clusters = -(-size // CLUSTER)
        step = max(1, clusters // vma.SLOTS_PER_EXTENT)
        picks = sorted({0, clusters - 1, *list(range(step, clusters - 1, step))[:57]})
        slots, payloads, stored = [], [], []
        for i, cluster in enumerate(picks):
            block = bytes([i + 1]) * vma.BLOCK_SIZE
            slots.append((dev_id, cluster, 0x0001))
            payloads.append(block)
            stored.append((dev_id, cluster, 0x0001, index.checksum(block)))
        builder.add_extent(len(buf), stored)
        buf += vma.encode_extent_header(UUID, slots, len(payloads))
        buf += b"".join(payloads)
    if indexed:
        blob = builder.encode()
        index_offset = len(buf)
        buf += vma.encode_null_extents(UUID, blob)
        footer = index.Footer(index_offset, len(blob), index.checksum(blob))
        buf += vma.encode_null_extents(UUID, index.encode_footer(footer))
    return bytes(buf)


def names(count: int) -> list[str]:
    return [f"drive-scsi{i}" for i in range(count)]


CLAIMS = {
    "one-2^44": [("drive-scsi0", 1 << 44)],
    "one-2^48": [("drive-scsi0", 1 << 48)],
    "three-2^48": [(n, 1 << 48) for n in names(3)],
    "mixed": [("drive-scsi0", 1 << 44), ("drive-virtio1", (1 << 48) - 512),
              ("drive-sata2", (1 << 44) + 4096)],
    "254-2^48": [(n, 1 << 48) for n in names(vma.MAX_DEV_ID)],
}
KINDS = ["header", "header+null", "scattered", "scattered+index"]


def make_claim(directory: Path, claim: str, kind: str) -> Path:
    devices = CLAIMS[claim]
    if kind.startswith("header"):
        data = header_only(devices, null_extent=kind == "header+null")
    else:
        data = scattered(devices, indexed=kind == "scattered+index")
    path = directory / f"{claim}-{kind}.vma"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("claims")
    for claim in CLAIMS:
        for kind in KINDS:
            if claim == "254-2^48" and kind.startswith("scattered"):
                continue  # 254 data extents add nothing the three-device case does not test
            make_claim(directory, claim, kind)
    return directory


CASES = [(c, k) for c in CLAIMS for k in KINDS if not (c == "254-2^48" and k != "header")]


@pytest.mark.parametrize(("claim", "kind"), CASES)
@pytest.mark.parametrize("command", ["verify", "list", "extract", "convert"])
def test_claimed_sizes_cost_nothing(claims: Path, tmp_path: Path, claim: str, kind: str,
                                   command: str) -> None:
    archive = claims / f"{claim}-{kind}.vma"
    args: list[str | Path] = [command, archive]
    if command == "extract":
        args += ["-q", tmp_path / "out"]
    elif command == "convert":
        args += ["-q", tmp_path / "out.vma.zst"]
    run = vmafs(*args, timeout=120)
    # verify reports every problem, a line each: here one missing range per device
    run.assert_clean(max_lines=len(CLAIMS[claim]) + 2 if command == "verify" else 1)
    if command == "verify" or command == "convert":
        # every one of these lacks clusters: verify and convert must say so
        assert run.rc != 0
    if command == "list":
        assert run.rc == 0, run.stderr
        assert run.stdout.count("DEV:") == len(CLAIMS[claim])
    if command == "convert":
        assert not (tmp_path / "out.vma.zst").exists()


_OPEN_SCRIPT = REPORT_HWM + """
import sys
from vmafs.archive.reader import Archive
from vmafs.errors import VmafsError
try:
    archive = Archive.open(sys.argv[1])
except VmafsError as exc:
    print("refused:", exc)
    sys.exit(0)
with archive:
    for dev in range(1, len(archive.devices) + 1):
        size = archive.devices[dev - 1].size
        for offset in (0, size // 2, size - 4096):
            try:
                archive.read(dev, offset, 4096)
            except VmafsError as exc:
                print("read refused:", exc)
print("opened")
"""


@pytest.mark.parametrize(("claim", "kind"), CASES)
def test_claimed_sizes_open_in_the_archive_model(claims: Path, claim: str, kind: str) -> None:
    """Archive.open (what mount uses), and reads across each claimed device."""
    run = measured([sys.executable, "-c", _OPEN_SCRIPT, str(claims / f"{claim}-{kind}.vma")],
                   timeout=120)
    run.assert_clean()
    assert run.rc == 0 and run.stdout.strip(), run.stderr


def _is_mounted(path: Path) -> bool:
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class Daemon:
    """`vmafs mount -f` in the background, reaped with wait4 (never Popen.poll, which would
    reap it first and lose its rusage)."""

    def __init__(self, archive: Path, mnt: Path, err: IO[bytes]) -> None:
        self.mnt = mnt
        self.err = err
        self.start = time.monotonic()
        self.hwm = Path(tempfile.mkdtemp(prefix="vmafs-hwm-"), "hwm")
        self.proc = subprocess.Popen(vmafs_argv("mount", archive, mnt, "-f"),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, env=dict(_env(), VMAFS_TEST_HWM=str(self.hwm)),
                                     cwd=ROOT)
        self.result: Run | None = None

    def reap(self, block: bool) -> bool:
        """True once the daemon has ended (and result is set)."""
        if self.result is None:
            pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
            if not pid:
                return False
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.err.seek(0)
            self.result = Run(self.proc.returncode, "", self.err.read().decode(errors="replace"),
                              _peak(self.hwm, usage.ru_maxrss), time.monotonic() - self.start)
            shutil.rmtree(self.hwm.parent, ignore_errors=True)
        return True

    def wait_ready(self, timeout: float) -> bool:
        """True once mounted, False if the command ended first (it refused the archive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _is_mounted(self.mnt):
                return True
            if self.reap(block=False):
                return False
            time.sleep(0.05)
        raise AssertionError("mount neither ready nor ended")

    def stop(self) -> Run:
        """Unmount, wait for the daemon (killed after 30 s) and say how it ended."""
        if _is_mounted(self.mnt):
            done = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if done.returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        deadline = time.monotonic() + 30
        while not self.reap(block=False):
            if time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGKILL)
                self.reap(block=True)
                break
            time.sleep(0.05)
        assert self.result is not None
        return self.result


@contextlib.contextmanager
def foreground_mount(archive: Path, mnt: Path) -> Iterator[Daemon]:
    mnt.mkdir(exist_ok=True)
    with tempfile.TemporaryFile() as err:
        daemon = Daemon(archive, mnt, err)
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
@pytest.mark.parametrize(("claim", "kind"), [("one-2^48", "header"), ("three-2^48", "scattered"),
                                             ("mixed", "scattered+index")])
def test_claimed_sizes_mount(claims: Path, tmp_path: Path, claim: str, kind: str) -> None:
    """The mount daemon refuses the archive in one line, or serves it (reads give bytes or EIO)
    in bounded memory."""
    archive = claims / f"{claim}-{kind}.vma"
    mnt = tmp_path / "mnt"
    with foreground_mount(archive, mnt) as daemon:
        served = daemon.wait_ready(60)
        if served:
            for entry in sorted(os.listdir(mnt)):
                if not entry.endswith(".raw"):
                    continue
                fd = os.open(mnt / entry, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    for offset in (0, size // 2, size - 4096):
                        with contextlib.suppress(OSError):
                            os.pread(fd, 4096, offset)
                finally:
                    os.close(fd)
    run = daemon.stop()
    print(f"mount {'served' if served else 'refused'}: rc {run.rc}, "
          f"peak RSS {run.maxrss / MiB:.0f} MiB: {run.stderr.strip()[:200]}")
    if served:
        assert "Traceback" not in run.stderr, run.stderr
        assert run.maxrss < RSS_LIMIT, f"peak RSS {run.maxrss / MiB:.0f} MiB"
    else:
        run.assert_clean()


# -- a real sparse disk of terabytes -----------------------------------------------------------

def sparse_dir(base: Path, size: int) -> Path:
    """A directory whose filesystem holds a sparse file of size (ext4 stops just short of
    16 TiB; tmpfs does not): base if it can, else a fresh directory in /dev/shm, else skip."""
    if _holds(base, size):
        return base
    if os.path.isdir("/dev/shm"):
        shm = Path(tempfile.mkdtemp(prefix="vmafs-scale-", dir="/dev/shm"))
        if _holds(shm, size):
            return shm
        shutil.rmtree(shm, ignore_errors=True)
    pytest.skip(f"no filesystem here holds a sparse file of {size} bytes")


def _holds(directory: Path, size: int) -> bool:
    probe = directory / "probe.raw"
    try:
        with open(probe, "wb") as f:
            f.truncate(size)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


DATA_AT = [0, 3 * MiB + 512, 1 << 33, 5 * (1 << 36) + 12345 * CLUSTER + 4096]


def write_sparse_disk(path: Path, size: int) -> dict[int, bytes]:
    """A few MiB of data at a few offsets (one mid-cluster, one at the very end)."""
    regions = {}
    for i, offset in enumerate([*DATA_AT, size - 2 * MiB - 1000]):
        if offset + 2 * MiB > size:
            continue
        regions[offset] = os.urandom(MiB) + bytes([i + 1]) * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in regions.items():
            f.seek(offset)
            f.write(data)
    return regions


def check_extracted(path: Path, size: int, regions: dict[int, bytes]) -> None:
    assert path.stat().st_size == size
    with open(path, "rb") as f:
        for offset, data in regions.items():
            f.seek(offset)
            assert f.read(len(data)) == data
            f.seek(max(0, offset - 4096))
            before = f.read(min(offset, 4096))
            assert before == bytes(len(before))
        f.seek(size // 3)  # the middle of a hole
        assert f.read(CLUSTER) == bytes(CLUSTER)
    # extract keeps holes: the output has about the data's blocks, not terabytes
    assert path.stat().st_blocks * 512 < 64 * MiB


def round_trip(tmp_path: Path, size: int, archive_name: str) -> dict[str, Run]:
    """create -> verify -> extract of a sparse disk, each step in a fresh measured process."""
    work = sparse_dir(tmp_path, size)
    disk = work / "disk.raw"
    archive = tmp_path / archive_name
    try:
        regions = write_sparse_disk(disk, size)
        runs = {"create": vmafs("create", "-q", "-o", archive, f"drive-scsi0={disk}",
                                timeout=1800)}
    finally:
        with contextlib.suppress(OSError):
            disk.unlink()
    runs["create"].assert_clean()
    assert runs["create"].rc == 0, runs["create"].stderr
    runs["verify"] = vmafs("verify", archive, timeout=3600)
    runs["verify"].assert_clean()
    assert runs["verify"].rc == 0, runs["verify"].stderr
    out = work / "x"
    try:
        runs["extract"] = vmafs("extract", "-q", archive, out, timeout=3600)
        runs["extract"].assert_clean()
        assert runs["extract"].rc == 0, runs["extract"].stderr
        check_extracted(out / "disk-drive-scsi0.raw", size, regions)
    finally:
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
    if fuse_missing() is None:
        runs["mount"] = mount_and_compare(archive, tmp_path / "mnt", size, regions)
    return runs


def mount_and_compare(archive: Path, mnt: Path, size: int, regions: dict[int, bytes]) -> Run:
    """Mount, read every data region and a hole through FUSE, unmount: the daemon's run."""
    with foreground_mount(archive, mnt) as daemon:
        assert daemon.wait_ready(600), daemon.stop().stderr
        disk = mnt / "disk-drive-scsi0.raw"
        assert disk.stat().st_size == size
        with open(disk, "rb") as f:
            for offset, data in regions.items():
                f.seek(offset)
                assert f.read(len(data)) == data
            f.seek(size // 3)
            assert f.read(CLUSTER) == bytes(CLUSTER)
    run = daemon.stop()
    assert "Traceback" not in run.stderr, run.stderr
    assert run.maxrss < RSS_LIMIT, f"mount: peak RSS {run.maxrss / MiB:.0f} MiB"
    return run


def test_sparse_2tib_disk_round_trip(tmp_path: Path) -> None:
    """A 2 TiB sparse disk (2^25 clusters, 570 k zero-slot extents) backs up, verifies,
    extracts and mounts in bounded memory, its data where it was: anything costing 8 bytes per
    cluster is over the limit (16 TiB: tools/bench_scale.py)."""
    size = 2 * TiB - 4096
    runs = round_trip(tmp_path, size, "disk.vma.zst")
    for name, run in runs.items():
        print(f"{name}: {run.seconds:.1f} s, peak RSS {run.maxrss / MiB:.0f} MiB")


def test_writer_tail_of_a_16tib_device_in_process() -> None:
    """The writer's own memory for a 16 TiB sparse device, without the zero-slot stream: the
    cluster sets hold pages of what was written, nothing per cluster of the device."""
    import tracemalloc

    class Sink(MemOutput):
        def write(self, chunk: bytes | bytearray | memoryview) -> int:
            return len(chunk)

    tracemalloc.start()
    try:
        writer = ArchiveWriter(Sink(), [DeviceSpec("drive-scsi0", 16 * TiB),
                                        DeviceSpec("drive-scsi1", 1 << 48)], uuid=UUID, ctime=0)
        for offset in DATA_AT:
            writer.write(1, offset - offset % CLUSTER, bytes(2 * CLUSTER))
            writer.write(2, (1 << 48) - offset - 2 * CLUSTER, bytes(2 * CLUSTER))
        writer.write_zeroes(1, 8 * TiB, 4 * TiB)
        writer.write_zeroes(2, 1 << 47, 1 << 46)
        current = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # a whole zeroed page is one dict entry: 64 TiB zeroed is 16 k of them, ~1.5 MiB
    assert current < 4 * MiB
