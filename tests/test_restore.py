"""`vmafs restore`: ready-to-boot images (qcow2 and raw, checked by qemu-img) equal to the
source disks, config files beside them, a chain as of its newest archive, a disk straight onto
a loop device (holes zeroed there), and nothing replaced or overwritten without --force."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_serve import (  # noqa: E402 - the same source disks and chain as serve's tests
    CLUSTER,
    DISK0_SIZE,
    MiB,
    Source,
    _chain,
    source,
    vmafs,
)

__all__ = ["source"]  # a fixture, used by name

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def _restore(*args: str | os.PathLike[str]) -> dict[str, object]:
    proc = vmafs("restore", "--json", "-q", *args)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def _same(image: Path, fmt: str, want: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image), str(want)],
                   check=True, capture_output=True)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)


@pytest.mark.parametrize(("kind", "fmt"), [("plain", "raw"), ("zstd", "qcow2")])
def test_images_equal_the_source(source: Source, kind: str, fmt: str, tmp_path: Path) -> None:
    archive = source.plain if kind == "plain" else source.zstd
    out = tmp_path / "vm"
    doc = _restore(archive, "--to", out, "--format", fmt)
    assert doc["ok"] and doc["output"] == str(out)
    files = sorted(os.listdir(out))
    assert files == sorted([f"disk-drive-scsi0.{fmt}", f"disk-drive-virtio1.{fmt}",
                            "qemu-server.conf"])
    _same(out / f"disk-drive-scsi0.{fmt}", fmt, source.disk0)
    _same(out / f"disk-drive-virtio1.{fmt}", fmt, source.disk1)
    assert (out / "qemu-server.conf").read_text() == "boot: order=scsi0\n"
    # sparse: the 24 MiB disk holds about 5 MiB of data
    assert os.stat(out / f"disk-drive-scsi0.{fmt}").st_blocks * 512 < 8 * MiB
    devices = doc["devices"]
    assert isinstance(devices, list)
    assert [(d["name"], d["device_bytes"], d["file"]) for d in devices] == [
        ("drive-scsi0", DISK0_SIZE, f"disk-drive-scsi0.{fmt}"),
        ("drive-virtio1", 4 * MiB, f"disk-drive-virtio1.{fmt}")]


def test_chain_and_one_disk(tmp_path: Path) -> None:
    newest, disk = _chain(tmp_path)
    want = tmp_path / "want.raw"
    want.write_bytes(disk)
    _restore(newest, "--to", tmp_path / "out", "-d", "drive-scsi0")
    _same(tmp_path / "out" / "disk-drive-scsi0.qcow2", "qcow2", want)


def test_nothing_replaced_without_force(source: Source, tmp_path: Path) -> None:
    out = tmp_path / "vm"
    out.mkdir()
    (out / "disk-drive-virtio1.raw").write_bytes(b"mine")
    proc = vmafs("restore", "--format", "raw", "--to", out, source.plain)
    assert proc.returncode == 1 and "exists (use --force" in proc.stderr
    assert sorted(os.listdir(out)) == ["disk-drive-virtio1.raw"]
    assert (out / "disk-drive-virtio1.raw").read_bytes() == b"mine"
    _restore(source.plain, "--format", "raw", "--to", out, "--force")
    _same(out / "disk-drive-virtio1.raw", "raw", source.disk1)
    for args, code, text in (([source.plain], 2, "--to"),
                             ([source.plain, "--to", out, "-d", "nope"], 1, "no device"),
                             ([source.plain, "--to-device", "drive-scsi0"], 2, "DEVNAME=DEVICE"),
                             ([source.plain, "--to-device", f"drive-scsi0={out}"], 1,
                              "not a block device")):
        proc = vmafs("restore", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and text in lines[0], proc.stderr


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a file of random bytes (an old disk's content), a little larger
    than disk0."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "old-disk.img"
    backing.write_bytes(random.Random(9).randbytes(DISK0_SIZE + 3 * CLUSTER))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_onto_a_block_device(source: Source, loop_device: tuple[str, Path],
                             tmp_path: Path) -> None:
    dev, backing = loop_device
    before = backing.read_bytes()
    proc = vmafs("restore", source.zstd, "--to-device", f"drive-scsi0={dev}")
    assert proc.returncode == 1 and "holds data" in proc.stderr and "--force" in proc.stderr
    assert backing.read_bytes() == before
    proc = vmafs("restore", source.zstd, "--to-device", f"drive-virtio1={dev}", "--force",
                 "--to-device", f"drive-scsi0={dev}")
    assert proc.returncode == 1 and "in use" in proc.stderr, proc.stderr
    doc = _restore(source.zstd, "--to-device", f"drive-scsi0={dev}", "--force")
    devices = doc["devices"]
    assert isinstance(devices, list) and devices[0]["target"] == dev
    after = backing.read_bytes()
    # the disk's bytes, holes zeroed; what lies past the disk's end is left alone
    assert after[:DISK0_SIZE] == source.disk0.read_bytes()
    assert after[DISK0_SIZE:] == before[DISK0_SIZE:]
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    loop = subprocess.run(["losetup", "-f", "--show", str(small)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        proc = vmafs("restore", source.plain, "--to-device", f"drive-scsi0={loop}")
        assert proc.returncode == 1 and "needs" in proc.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_qcow2_of_a_large_sparse_disk_with_partial_clusters(tmp_path: Path) -> None:
    """The qcow2 image restore lays out itself: data in several L2 tables' spans, clusters
    stored in part (zero 4 KiB blocks), the disk's last cluster; clean for qemu-img check,
    equal to the source, and as sparse as the data."""
    size = 1300 * MiB + 5 * 4096  # not a whole cluster: the last one is cut short
    disk = tmp_path / "disk.raw"
    rnd = random.Random(3)
    with open(disk, "wb") as f:
        f.truncate(size)
        for at in (0, 512 * MiB - 3 * CLUSTER, 700 * MiB + 4096, size - 5 * 4096):
            f.seek(at)
            block = bytearray(rnd.randbytes(min(6 * CLUSTER, size - at)))
            block[4096:3 * 4096] = bytes(2 * 4096)  # a partly stored cluster
            f.write(block)
    archive = tmp_path / "a.vma"
    assert vmafs("create", "-q", "-o", archive, f"drive-scsi0={disk}").returncode == 0
    _restore(archive, "--to", tmp_path / "out")
    image = tmp_path / "out" / "disk-drive-scsi0.qcow2"
    _same(image, "qcow2", disk)
    assert os.stat(image).st_blocks * 512 < 4 * MiB


def test_qcow2_layout_of_a_huge_disk_is_clean(tmp_path: Path) -> None:
    """Many L2 tables and several refcount blocks (more than 32768 host clusters): the
    metadata alone, the data clusters left as holes (they read as zeros), is what qemu-img
    check accepts, and qemu-img map finds every cluster where the layout put it."""
    import numpy as np

    from vmafs.restore import qcow2

    size = (1 << 40) + 512
    clusters = np.unique(np.random.default_rng(4).integers(0, size // CLUSTER, 40000))
    lay = qcow2.layout(size, clusters)
    assert lay.refcount_blocks >= 2 and len(lay.l2_tables) > 1000
    image = tmp_path / "huge.qcow2"
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for offset, data in qcow2.metadata(lay):
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, lay.file_size())
    finally:
        os.close(fd)
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == size
    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                                       check=True, capture_output=True, text=True).stdout)
    data = [(m["start"], m["length"], m["offset"]) for m in mapped if m["data"]]
    assert sum(n for _, n, _ in data) == len(clusters) * CLUSTER
    first, _, at = data[0]
    assert first == int(clusters[0]) * CLUSTER and at == lay.data_offset(0)
