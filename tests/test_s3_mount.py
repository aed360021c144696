"""Mounting and serving (NBD) archives that live in S3 (a real RADOS Gateway): the disk reads
back exactly (cat, qemu-img convert, a loop-mounted ext4 file system, qemu-img from the NBD
export); a mount that loses the gateway answers EIO and reads correctly again once it is back,
never wrong bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import fuse_missing
from test_mount import PART_OFFSET, PART_SIZE, _losetup_available, _partitioned_ext4, mounted
from test_mount import vmafs as vmafs_cmd
from test_s3 import make_image

MiB = 1 << 20
pytestmark = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env


def test_mount_from_s3_reads_exactly(s3: S3Env, tmp_path: Path) -> None:
    import subprocess

    image = tmp_path / "disk.raw"
    data = make_image(image, 24 * MiB, seed=3)
    for suffix in (".vma", ".vma.zst"):
        url = s3.url(f"m/a{suffix}")
        vmafs_cmd("create", "-q", "-o", url, f"drive-scsi0={image}", check=True)
        with mounted(url, tmp_path / f"mnt{suffix}") as mnt:  # type: ignore[arg-type]
            disk = mnt / "disk-drive-scsi0.raw"
            assert disk.stat().st_size == len(data)
            assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(data).digest()
            out = tmp_path / f"copy{suffix}.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk),
                            str(out)], check=True)
            subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out),
                            str(image)], check=True, capture_output=True)


def test_loop_mounted_file_system_from_s3(s3: S3Env, tmp_path: Path) -> None:
    import subprocess

    why = _losetup_available()
    if why:
        pytest.skip(why)
    rnd = random.Random(9)
    files = {"etc/hostname": b"from-s3\n", "data/blob.bin": rnd.randbytes(2 * MiB + 7)}
    image = tmp_path / "part.raw"
    _partitioned_ext4(image, files, tmp_path)
    url = s3.url("fs/part.vma.zst")
    vmafs_cmd("create", "-q", "-o", url, f"drive-sata0={image}", check=True)
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()
    with mounted(url, tmp_path / "mnt") as mnt:  # type: ignore[arg-type]
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


@pytest.mark.parametrize("suffix", [".vma", ".vma.zst"])
def test_mount_survives_the_gateway_going_away(s3: S3Env, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               suffix: str) -> None:
    """Reads while the gateway is down fail with EIO (quickly: few attempts); once it is back
    the same reads return the right bytes."""
    image = tmp_path / "disk.raw"
    data = make_image(image, 160 * MiB, seed=4)  # more than the reads keep (7 x 8 MiB)
    url = s3.url(f"gone/a{suffix}")
    vmafs_cmd("create", "-q", "-o", url, f"drive-scsi0={image}", check=True)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with mounted(url, tmp_path / "mnt") as mnt:  # type: ignore[arg-type]
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, MiB, 0) == data[:MiB]
            s3.gw.stop_gateway()
            try:
                at = 120 * MiB + 4096  # data (even MiBs), far from what was read ahead
                t0 = time.monotonic()
                with pytest.raises(OSError) as failed:
                    os.pread(fd, 4096, at)
                assert failed.value.errno == errno.EIO
                assert time.monotonic() - t0 < 30
            finally:
                s3.gw.start_gateway()
            assert os.pread(fd, 4096, at) == data[at:at + 4096]
            assert os.pread(fd, 2 * MiB, 8 * MiB) == data[8 * MiB:10 * MiB]
        finally:
            os.close(fd)


def test_serve_from_s3(s3: S3Env, tmp_path: Path) -> None:
    import shutil

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    from test_serve import _compare, served

    image = tmp_path / "disk.raw"
    make_image(image, 16 * MiB, seed=6)
    url = s3.url("nbd/a.vma.zst")
    vmafs_cmd("create", "-q", "-o", url, f"drive-scsi0={image}", check=True)
    with served(url, tmp_path / "nbd.sock") as server:  # type: ignore[arg-type]
        _compare(server.url("drive-scsi0"), image, tmp_path)
