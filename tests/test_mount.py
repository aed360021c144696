"""`vmafs mount` / `vmafs umount` against real FUSE, real archives (made by `vmafs create`) and
real readers: cat, dd, losetup + mount, qemu-img, QEMU booting from the mount."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import fuse_missing

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1 << 20
CLUSTER = 65536


pytestmark = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))


# -- helpers -----------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def vmafs(*args: str | os.PathLike[str], timeout: float = 120,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "vmafs", *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"vmafs {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def mount_entry(path: Path) -> list[str] | None:
    """The mountinfo fields for a mount at path (topmost), or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                found = fields
    return found


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def daemon_pids(mnt: Path) -> list[int]:
    """Processes serving this mount point (vmafs mount ... MNT)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vmafs" in argv and b"mount" in argv and os.fsencode(str(mnt)) in argv:
            pids.append(int(entry))
    return pids


def wait_until(cond: object, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def mounted(archive: Path, mnt: Path, *args: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    proc = vmafs("mount", *args, archive, mnt)
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mnt)
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            pids = daemon_pids(mnt)
            r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            for pid in pids:
                wait_until(lambda pid=pid: pid_gone(pid), what="daemon exit")


def sha256_file(path: Path, bufsize: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- source images and archives ----------------------------------------------------------------

DISK0_SIZE = 24 * MiB + 3 * 512           # not a multiple of the cluster size
DISK1_SIZE = 4 * MiB


def _write_disk0(path: Path) -> None:
    """Random clusters, partial clusters (single 4 KiB blocks, odd bytes), written zeros, holes
    and a partial last cluster."""
    rnd = random.Random(42)
    with open(path, "wb") as f:
        f.truncate(DISK0_SIZE)
        f.seek(0)
        f.write(rnd.randbytes(3 * MiB))                     # dense start
        for _ in range(60):                                 # scattered 4 KiB blocks
            f.seek(rnd.randrange(4 * MiB, 20 * MiB) // 4096 * 4096)
            f.write(rnd.randbytes(4096))
        f.seek(9 * MiB + 12345)
        f.write(b"vmafs odd write" * 3)                     # odd offset, odd length
        f.seek(12 * MiB)
        f.write(bytes(2 * MiB))                             # written zeros
        f.seek(DISK0_SIZE - 70000)
        f.write(rnd.randbytes(70000))                       # through the partial last cluster


@dataclass(frozen=True)
class Source:
    disk0: Path
    disk1: Path
    conf: Path
    plain: Path
    zstd: Path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    d = tmp_path_factory.mktemp("mount-src")
    disk0, disk1 = d / "disk0.raw", d / "disk1.raw"
    _write_disk0(disk0)
    disk1.write_bytes(random.Random(7).randbytes(DISK1_SIZE))
    conf = d / "qemu-server.conf"
    conf.write_text("boot: order=scsi0\nscsi0: local:vm-100-disk-0,size=24M\n")
    plain, zstd = d / "vm.vma", d / "vm.vma.zst"
    for out in (plain, zstd):
        vmafs("create", "-q", "-o", out, "-c", conf, f"drive-scsi0={disk0}",
              f"drive-virtio1={disk1}", check=True)
    return Source(disk0, disk1, conf, plain, zstd)


@pytest.fixture(params=["plain", "zstd"])
def archive(request: pytest.FixtureRequest, source: Source) -> Path:
    return source.plain if request.param == "plain" else source.zstd


# -- pure parts --------------------------------------------------------------------------------

def test_names_are_sanitised_and_unique() -> None:
    from vmafs.archive.reader import Device
    from vmafs.mount.fs import layout

    devices = [Device(2, "drive-scsi0", 10), Device(1, "../../etc", 5),
               Device(3, "drive-scsi0", 7), Device(4, "a\0b/c", 1)]
    configs = {"qemu-server.conf": b"x", "..": b"y", "": b"z", "disk-drive-scsi0.raw": b"w",
               "sub/dir": b"v", "qemu-server.conf\n": b"u"}
    entries = layout(devices, configs)
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    for name in names:
        assert b"/" not in name and b"\0" not in name and name not in (b".", b"..", b"")
        assert len(name) <= 255
    by_dev = {e.dev_id: e for e in entries if e.dev_id}
    assert by_dev[1].name == b"disk-.._.._etc.raw"
    assert by_dev[2].name == b"disk-drive-scsi0.raw"
    assert by_dev[3].name == b"disk-drive-scsi0~2.raw"
    assert by_dev[4].name == b"disk-a_b_c.raw"
    assert [e.inode for e in entries] == [2, 3, 4, 5, 1024, 1025, 1026, 1027, 1028, 1029]
    # same archive, same inode numbers and names
    assert layout(devices, configs) == entries


def test_mount_options() -> None:
    from vmafs.errors import VmafsError
    from vmafs.mount.options import parse_mountinfo, parse_options

    opts = parse_options(["allow_other,uid=1000", "gid=5,noatime"])
    assert {"allow_other", "noatime", "ro", "default_permissions", "fsname=vmafs",
            "subtype=vmafs"} <= opts.fuse
    assert (opts.uid, opts.gid) == (1000, 5)
    assert "allow_other" not in parse_options([]).fuse
    assert parse_options(["ro,direct_io"]).direct_io and not opts.direct_io
    assert "direct_io" not in parse_options(["direct_io"]).fuse  # ours, not libfuse's
    for bad in ("rw", "uid=x", "fsname=foo", "max_read=4096"):
        with pytest.raises(VmafsError):
            parse_options([bad])
    info = parse_mountinfo(
        "42 27 0:39 / /tmp/a\\040b ro,nosuid - fuse.vmafs vmafs ro,user_id=0\n")
    assert info[0].mountpoint == "/tmp/a b" and info[0].device == "0:39"
    assert info[0].fstype == "fuse.vmafs"


def test_lean_wait_hooks_pyfuse3_only_with_its_fd() -> None:
    """The plain mount's request wait replaces pyfuse3's private hook (fuse_wait.py) only
    when the hook exists and one new /dev/fuse fd is found, and puts it back on leaving; a
    pyfuse3 without the hook fails here, not silently in the daemon."""
    import pyfuse3

    from vmafs.mount.fuse_wait import fuse_fds, lean_wait

    original = pyfuse3._wait_fuse_readable
    before = fuse_fds()
    with lean_wait(pyfuse3, before) as lean:  # no new fd: pyfuse3 waits its own way
        assert not lean and pyfuse3._wait_fuse_readable is original
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        assert fuse_fds() - before == {fd}
        with lean_wait(pyfuse3, before) as lean:
            assert lean and pyfuse3._wait_fuse_readable is not original
        assert pyfuse3._wait_fuse_readable is original
    finally:
        os.close(fd)


# -- what the mount shows ----------------------------------------------------------------------

def test_listing_and_stat(source: Source, archive: Path, tmp_path: Path) -> None:
    from vmafs.archive.reader import Archive

    with Archive.open(str(archive)) as a:
        ctime = a.ctime
    with mounted(archive, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == sorted(
            ["disk-drive-scsi0.raw", "disk-drive-virtio1.raw", "qemu-server.conf"])
        root = os.stat(mnt)
        assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
        for name, size in (("disk-drive-scsi0.raw", DISK0_SIZE),
                           ("disk-drive-virtio1.raw", DISK1_SIZE),
                           ("qemu-server.conf", source.conf.stat().st_size)):
            st = os.stat(mnt / name)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
            assert st.st_size == size
            assert st.st_mtime == st.st_ctime == ctime
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        # inode numbers are stable: same as on a second mount of the same archive
        inodes = {n: os.stat(mnt / n).st_ino for n in os.listdir(mnt)}
        assert (mnt / "qemu-server.conf").read_bytes() == source.conf.read_bytes()
        with pytest.raises(OSError) as exc:
            os.open(mnt / "disk-drive-scsi0.raw", os.O_RDWR)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(OSError):
            (mnt / "new-file").write_bytes(b"x")
        assert os.statvfs(mnt).f_namemax == 255
        fields = mount_entry(mnt)
        assert fields is not None
        sep = fields.index("-")
        # the mount names its archive as its source, as `mount` and `df` show it
        assert fields[sep + 1] == "fuse.vmafs" and fields[sep + 2] == str(archive)
        assert "ro" in fields[5].split(",")
        assert "allow_other" not in fields[sep + 3]
    with mounted(archive, tmp_path / "mnt2") as mnt:
        assert {n: os.stat(mnt / n).st_ino for n in os.listdir(mnt)} == inodes


def test_big_directory_and_sparse_sizes(tmp_path: Path) -> None:
    """readdir resumes at the right offset over many entries; st_blocks shows sparseness."""
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output

    configs = [(f"cfg-{i:03d}-{'x' * 80}.conf", b"%d\n" % i) for i in range(150)]
    archive = tmp_path / "many.vma"
    size = 1 << 34                                  # 16 GiB, one cluster of data
    with open_output(str(archive)) as out:
        w = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], configs)
        w.write(1, 5 * MiB, b"\x01" * CLUSTER)
        w.finish()
    with mounted(archive, tmp_path / "mnt") as mnt:
        names = os.listdir(mnt)
        assert len(names) == len(set(names)) == 151
        assert sorted(names) == sorted(["disk-drive-scsi0.raw", *(n for n, _ in configs)])
        for name, data in configs[::37]:
            assert (mnt / name).read_bytes() == data
        st = os.stat(mnt / "disk-drive-scsi0.raw")
        assert st.st_size == size and st.st_blocks * 512 == CLUSTER
        with open(mnt / "disk-drive-scsi0.raw", "rb") as f:
            f.seek(5 * MiB - 10)
            assert f.read(20) == bytes(10) + b"\x01" * 10


def test_sequential_reads_match(source: Source, archive: Path, tmp_path: Path) -> None:
    want0, want1 = sha256_file(source.disk0), sha256_file(source.disk1)
    with mounted(archive, tmp_path / "mnt") as mnt:
        disk0 = mnt / "disk-drive-scsi0.raw"
        cat = subprocess.run(f"cat '{disk0}' | sha256sum", shell=True, capture_output=True,
                             text=True, check=True)
        assert cat.stdout.split()[0] == want0
        for args in (["bs=1M"], ["bs=64k", "iflag=direct"], ["bs=4096"], ["bs=1000"]):
            dd = subprocess.run(f"dd if='{disk0}' {' '.join(args)} status=none | sha256sum",
                                shell=True, capture_output=True, text=True, check=True)
            assert dd.stdout.split()[0] == want0, args
        assert sha256_file(mnt / "disk-drive-virtio1.raw") == want1
        assert sha256_file(disk0, bufsize=3 * MiB + 17) == want0


def test_random_reads_match(source: Source, archive: Path, tmp_path: Path) -> None:
    rnd = random.Random(1234)
    expected = source.disk0.read_bytes()
    with mounted(archive, tmp_path / "mnt") as mnt:
        path = mnt / "disk-drive-scsi0.raw"
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(400):
                size = rnd.choice([1, 511, 4096, 65536, 65537, 200_000, 1 << 20, 3 << 20])
                off = rnd.randrange(0, DISK0_SIZE + 10_000)
                assert os.pread(fd, size, off) == expected[off:off + size], (off, size)
            # around the end of the device
            for off in (DISK0_SIZE - 1, DISK0_SIZE, DISK0_SIZE + 1, DISK0_SIZE - CLUSTER - 3):
                assert os.pread(fd, 2 * CLUSTER, off) == expected[off:off + 2 * CLUSTER]
            # MAP_SHARED mmap works (no direct_io)
            with mmap.mmap(fd, DISK0_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                for _ in range(50):
                    off = rnd.randrange(0, DISK0_SIZE - 5000)
                    assert m[off:off + 5000] == expected[off:off + 5000]
        finally:
            os.close(fd)
        # O_DIRECT readers bypass the page cache and still get the right bytes
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 20)
            for _ in range(30):
                off = rnd.randrange(0, DISK0_SIZE // 4096 - 256) * 4096
                n = os.preadv(dfd, [buf], off)
                assert buf[:n] == expected[off:off + n]
        finally:
            os.close(dfd)


def test_direct_io_mount(source: Source, archive: Path, tmp_path: Path) -> None:
    """-o direct_io: reads of any size and offset bypass the page cache and stay exact;
    MAP_SHARED mmap of a disk is refused cleanly (or works); configs still map."""
    rnd = random.Random(99)
    expected = source.disk0.read_bytes()
    with mounted(archive, tmp_path / "mnt", "-o", "direct_io") as mnt:
        disk0 = mnt / "disk-drive-scsi0.raw"
        for bs in ("1M", "4M", "4096", "1000"):
            dd = subprocess.run(f"dd if='{disk0}' bs={bs} status=none | sha256sum", shell=True,
                                capture_output=True, text=True, check=True)
            assert dd.stdout.split()[0] == sha256_file(source.disk0), bs
        fd = os.open(disk0, os.O_RDONLY)
        try:
            for _ in range(200):
                size = rnd.choice([1, 4096, 65537, 1 << 20, 3 << 20])
                off = rnd.randrange(0, DISK0_SIZE + 10_000)
                assert os.pread(fd, size, off) == expected[off:off + size], (off, size)
            try:  # refused unless libfuse >= 3.16 and the kernel allow mmap with direct_io
                with mmap.mmap(fd, DISK0_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                    assert m[:3 * CLUSTER] == expected[:3 * CLUSTER]
            except OSError as exc:
                assert exc.errno == errno.ENODEV
            with mmap.mmap(fd, DISK0_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
                assert m[CLUSTER - 100:3 * CLUSTER] == expected[CLUSTER - 100:3 * CLUSTER]
        finally:
            os.close(fd)
        assert sha256_file(mnt / "disk-drive-virtio1.raw") == sha256_file(source.disk1)
        with open(mnt / "qemu-server.conf", "rb") as f, \
                mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == (mnt / "qemu-server.conf").read_bytes()


def test_parallel_readers(source: Source, archive: Path, tmp_path: Path) -> None:
    """4 dd at different offsets and a qemu-img convert, all at once."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    expected = source.disk0.read_bytes()
    with mounted(archive, tmp_path / "mnt") as mnt:
        path = mnt / "disk-drive-scsi0.raw"
        procs = []
        for i, skip in enumerate((0, 5, 11, 17)):
            out = tmp_path / f"part{i}"
            procs.append((skip, out, subprocess.Popen(
                ["dd", f"if={path}", f"of={out}", "bs=256k", f"skip={skip * 4}", "count=24",
                 "status=none"])))
        conv = subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(path),
                                 str(tmp_path / "conv.raw")])
        for skip, out, p in procs:
            assert p.wait(timeout=120) == 0
            assert out.read_bytes() == expected[skip * MiB:skip * MiB + 6 * MiB]
        assert conv.wait(timeout=120) == 0
        assert sha256_file(tmp_path / "conv.raw") == sha256_file(source.disk0)


def test_qemu_img_convert_and_compare(source: Source, archive: Path, tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    with mounted(archive, tmp_path / "mnt") as mnt:
        out = tmp_path / "copy.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                        str(mnt / "disk-drive-scsi0.raw"), str(out)], check=True)
        subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out),
                        str(source.disk0)], check=True, capture_output=True)
        subprocess.run(["qemu-img", "compare", "-F", "raw", "-f", "raw",
                        str(mnt / "disk-drive-virtio1.raw"), str(source.disk1)], check=True,
                       capture_output=True)


# -- archives from elsewhere, and archives that cannot be mounted -------------------------------

def _proxmox_manifest() -> dict[str, dict[str, object]]:
    return json.loads((VECTORS / "proxmox" / "MANIFEST.json").read_text())


@pytest.mark.parametrize("name", ["sample-2disks.vma", "sample-1disk-nocfg.vma",
                                  "sample-odd-size-1000b.vma", "sample-legacy-positional.vma"])
def test_proxmox_archives(name: str, tmp_path: Path) -> None:
    manifest = _proxmox_manifest()[name]
    with mounted(VECTORS / "proxmox" / name, tmp_path / "mnt") as mnt:
        want = {f"disk-{dev}.raw": info for dev, info in manifest["devices"].items()}
        want.update(manifest["configs"])
        assert sorted(os.listdir(mnt)) == sorted(want)
        for fname, info in want.items():
            assert os.stat(mnt / fname).st_size == info["size"]
            assert sha256_file(mnt / fname) == info["sha256"], fname


def _spec_manifest() -> dict[str, dict[str, object]]:
    return json.loads((VECTORS / "spec" / "MANIFEST.json").read_text())["samples"]


@pytest.mark.parametrize("name", ["two-disks.vma", "two-disks.seekable.vma.zst",
                                  "two-disks-59.vma", "two-disks-extra-config.vma",
                                  "two-disks-null-extent-trailer.vma",
                                  "two-disks-reserved-bytes.vma", "oddsize.vma", "diskless.vma",
                                  "diskless-header-only.vma", "vmstate.vma"])
def test_spec_archives(name: str, tmp_path: Path) -> None:
    """Archives written from the format notes (out of order, interleaved, odd sizes, legacy)."""
    samples = _spec_manifest()
    manifest = samples[name.replace(".seekable.vma.zst", ".vma")]
    with mounted(VECTORS / "spec" / name, tmp_path / "mnt") as mnt:
        # a legacy vmstate stream is RAM state, not a disk: the reader does not show it
        want = {f"disk-{d['name']}.raw": (d["size"], d["sha256"]) for d in manifest["devices"]
                if d["name"] != "vmstate"}
        assert sorted(os.listdir(mnt)) == sorted([*want, *manifest["configs"]])
        for fname, (size, digest) in want.items():
            assert os.stat(mnt / fname).st_size == size
            assert sha256_file(mnt / fname) == digest, fname
        for fname, digest in manifest["configs"].items():
            assert sha256_file(mnt / fname) == digest, fname


@pytest.mark.parametrize("name", ["sample-2disks.vma.zst", "sample-2disks.vma.gz",
                                  "sample-2disks.vma.lzo"])
def test_refuses_stream_only_archives(name: str, tmp_path: Path) -> None:
    _proxmox_manifest()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    line = one_line_error(vmafs("mount", VECTORS / "proxmox" / name, mnt))
    assert "convert" in line
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_mount_errors(source: Source, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert "nope.vma" in one_line_error(vmafs("mount", tmp_path / "nope.vma", mnt))
    assert "not a directory" in one_line_error(vmafs("mount", source.plain, source.conf))
    assert "rw" in one_line_error(vmafs("mount", "-o", "rw", source.plain, mnt))
    garbage = tmp_path / "garbage.vma"
    garbage.write_bytes(b"this is no archive" * 100)
    one_line_error(vmafs("mount", garbage, mnt))
    assert "not mounted" in one_line_error(vmafs("umount", mnt))
    assert not is_mounted(mnt)


def test_damaged_cluster_reads_eio(source: Source, archive: Path, tmp_path: Path) -> None:
    """A cluster whose stored data fails its checksum reads as EIO, the rest reads fine."""
    data = bytearray(archive.read_bytes())
    disk0 = source.disk0.read_bytes()
    # The dense start of disk0 is random, stored as whole clusters (zstd keeps incompressible
    # data as raw blocks): find a piece of cluster 20 in the file and flip a byte of it.
    needle = disk0[20 * CLUSTER + 900:20 * CLUSTER + 1100]
    pos = data.find(needle)
    assert pos > 0
    data[pos + 100] ^= 0xFF
    bad = tmp_path / archive.name.replace("vm.", "bad.")
    bad.write_bytes(bytes(data))
    log = tmp_path / "mount.log"
    plain = archive.suffix == ".vma"
    with mounted(bad, tmp_path / "mnt", "--log", str(log)) as mnt:
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, CLUSTER)
        try:
            with pytest.raises(OSError) as exc:
                os.preadv(fd, [buf], 20 * CLUSTER)
            assert exc.value.errno == errno.EIO
            # a plain archive loses just that cluster; zstd loses the frame holding it
            for cluster in (0, 19, 21, 100, 300) if plain else (100, 300):
                n = os.preadv(fd, [buf], cluster * CLUSTER)
                assert buf[:n] == disk0[cluster * CLUSTER:cluster * CLUSTER + n]
        finally:
            os.close(fd)
        # a buffered sequential reader gets right bytes up to the damage, then EIO
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            pos = 0
            with pytest.raises(OSError) as exc:
                while chunk := os.read(fd, CLUSTER):
                    assert chunk == disk0[pos:pos + len(chunk)]
                    pos += len(chunk)
            assert exc.value.errno == errno.EIO
            assert pos == 20 * CLUSTER if plain else 20 * CLUSTER - 2 * MiB <= pos <= 20 * CLUSTER
        finally:
            os.close(fd)
        assert sha256_file(mnt / "disk-drive-virtio1.raw") == sha256_file(source.disk1)
    text = log.read_text()
    assert "disk-drive-scsi0.raw" in text and "EIO" in text


def test_unindexed_damaged_archive_is_refused(tmp_path: Path) -> None:
    """A Proxmox-style archive cut off mid-extent (what an interrupted vzdump leaves) is not
    mounted: verify rejects it, so the mount serves none of it, and says where it breaks."""
    whole = (VECTORS / "spec" / "two-disks.vma").read_bytes()
    bad = tmp_path / "truncated-last-extent.vma"
    bad.write_bytes(whole[:len(whole) - 1000])  # the last extent loses its end
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = vmafs("mount", bad, mnt)
    assert proc.returncode != 0
    assert "truncated" in proc.stderr and "offset" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not is_mounted(mnt)


# -- real software on top of the mount ---------------------------------------------------------

PART_OFFSET = MiB
PART_SIZE = 40 * MiB


def _partitioned_ext4(path: Path, files: dict[str, bytes], work: Path) -> None:
    tree = work / "tree"
    for name, content in files.items():
        p = tree / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    with open(path, "wb") as f:
        f.truncate(PART_OFFSET + PART_SIZE + MiB)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, text=True,
                   input=f"label: dos\nstart={PART_OFFSET // 512}, size={PART_SIZE // 512}, "
                         f"type=83\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={PART_OFFSET}", "-d", str(tree),
                    str(path), f"{PART_SIZE // 1024}k"], check=True, capture_output=True)


def _losetup_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("losetup", "sfdisk", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def test_file_level_restore(tmp_path: Path) -> None:
    """losetup -r -o OFFSET on the mounted disk, mount the ext4 partition, read files back."""
    why = _losetup_available()
    if why:
        pytest.skip(why)
    rnd = random.Random(5)
    files = {"etc/hostname": b"restored\n", "data/blob.bin": rnd.randbytes(3 * MiB + 123),
             "data/small.txt": b"x" * 5000, "empty": b""}
    image = tmp_path / "part.raw"
    _partitioned_ext4(image, files, tmp_path)
    archive = tmp_path / "part.vma.zst"
    vmafs("create", "-q", "-o", archive, f"drive-sata0={image}", check=True)
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    with mounted(archive, tmp_path / "mnt") as mnt:
        loop = subprocess.run(
            ["losetup", "-r", "-f", "--show", "-o", str(PART_OFFSET), "--sizelimit",
             str(PART_SIZE), str(mnt / "disk-drive-sata0.raw")],
            check=True, capture_output=True, text=True).stdout.strip()
        try:
            subprocess.run(["mount", "-o", "ro", "-t", "ext4", loop, str(fsmnt)], check=True)
            try:
                for name, content in files.items():
                    assert (fsmnt / name).read_bytes() == content, name
            finally:
                subprocess.run(["umount", str(fsmnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)


def test_boot_from_mount(tmp_path: Path) -> None:
    """QEMU (TCG) boots the backed-up disk from the mount: snapshot=on, and a qcow2 overlay."""
    import guestimage

    try:
        boot = guestimage.build_boot_disk()
    except guestimage.GuestUnavailable as exc:
        pytest.skip(str(exc))
    archives = {"plain": tmp_path / "boot.vma", "zstd": tmp_path / "boot.vma.zst"}
    for out in archives.values():
        vmafs("create", "-q", "-o", out, f"drive-virtio0={boot}", check=True)
    with mounted(archives["plain"], tmp_path / "mnt-plain") as mnt:
        disk = mnt / "disk-drive-virtio0.raw"
        with guestimage.QemuVM(disks=[guestimage.Disk(disk, fmt="raw", snapshot=True,
                                                      bootindex=0)]) as vm:
            vm.wait_for(guestimage.BOOT_MARKER, timeout=240)
    with mounted(archives["zstd"], tmp_path / "mnt-zstd") as mnt:
        disk = mnt / "disk-drive-virtio0.raw"
        overlay = tmp_path / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk),
                        str(overlay)], check=True)
        with guestimage.QemuVM(disks=[guestimage.Disk(overlay, fmt="qcow2", bootindex=0)]) as vm:
            vm.wait_for(guestimage.BOOT_MARKER, timeout=240)


# -- lifecycle: daemon, unmount, signals --------------------------------------------------------

def test_daemon_and_unmount_commands(source: Source, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    for how in (["vmafs"], ["fusermount3", "-u"], ["umount"]):
        with mounted(source.plain, mnt):
            pids = daemon_pids(mnt)
            assert len(pids) == 1
            if how == ["vmafs"]:
                vmafs("umount", mnt, check=True)
            else:
                subprocess.run([*how, str(mnt)], check=True)
            assert not is_mounted(mnt)
            wait_until(lambda pids=pids: pid_gone(pids[0]), what="daemon exit")


def test_busy_unmount_fails_or_detaches_lazily(source: Source, tmp_path: Path) -> None:
    expected = source.disk0.read_bytes()
    with mounted(source.zstd, tmp_path / "mnt") as mnt:
        (pid,) = daemon_pids(mnt)
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            line = one_line_error(vmafs("umount", mnt))
            assert "busy" in line and "--lazy" in line
            assert is_mounted(mnt) and not pid_gone(pid)
            assert os.pread(fd, 4096, 0) == expected[:4096]
            vmafs("umount", "--lazy", mnt, check=True)
            assert not is_mounted(mnt)
            # the open file keeps working until it is closed
            assert os.pread(fd, MiB, 5 * MiB) == expected[5 * MiB:6 * MiB]
            assert not pid_gone(pid)
        finally:
            os.close(fd)
        wait_until(lambda: pid_gone(pid), what="daemon exit after the last close")


def test_killed_daemon_leaves_clearable_mount(source: Source, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        vmafs("mount", source.plain, mnt, check=True)
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(pid), what="daemon death")
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # kernel-dependent
        assert "fusermount3 -u" in one_line_error(vmafs("mount", source.plain, mnt))
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
        # vmafs umount clears a dead mount too
        vmafs("mount", source.plain, mnt, check=True)
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid_gone(pid), what="daemon death")
        vmafs("umount", mnt, check=True)
        assert not is_mounted(mnt)
    finally:  # never leave a dead mount behind, even when an assertion fails
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(source: Source, tmp_path: Path, signum: int) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vmafs("mount", source.plain, mnt, check=True)
    (pid,) = daemon_pids(mnt)
    os.kill(pid, signum)
    wait_until(lambda: pid_gone(pid), what="daemon exit")
    assert not is_mounted(mnt)


def test_foreground_mode(source: Source, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vmafs", "mount", "-f", str(source.plain),
                             str(mnt)], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: is_mounted(mnt), what="mount")
        assert sha256_file(mnt / "disk-drive-virtio1.raw") == sha256_file(source.disk1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert not is_mounted(mnt)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "mounted" in err and "unmounted" in err


def test_allow_other(source: Source, tmp_path: Path) -> None:
    """Private by default; -o allow_other lets another user read."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="vmafs-allow-"))    # reachable by other users
    base.chmod(0o755)
    try:
        for opts, allowed in (([], False), (["-o", "allow_other"], True)):
            _check_access(source, base / "mnt", opts, allowed, nobody)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_access(source: Source, mnt: Path, opts: list[str], allowed: bool,
                  nobody: list[str]) -> None:
    with mounted(source.plain, mnt, *opts):
        r = subprocess.run([*nobody, "head", "-c", "16", str(mnt / "qemu-server.conf")],
                           capture_output=True)
        assert (r.returncode == 0) == allowed, r.stderr
        if allowed:
            assert r.stdout == source.conf.read_bytes()[:16]
