"""Disk images as input to `vmafs create`: argument parsing, probing with qemu-img, and the
fast path for raw files (read directly, holes skipped). Other formats: qemu_img_feed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import dataclass

from vmafs.archive.writer import ArchiveWriter
from vmafs.errors import VmafsError
from vmafs.format import vma

READ_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ImageSpec:
    """A disk image given to `create`: its drive name, path, format and virtual size."""

    devname: str
    path: str
    format: str
    size: int


def parse_drive(arg: str) -> tuple[str, str, str | None]:
    """'[format=FMT:]DEVNAME=PATH' -> (devname, path, format or None)."""
    fmt = None
    if arg.startswith("format="):
        fmt, sep, arg = arg[len("format="):].partition(":")
        if not sep or not fmt:
            raise VmafsError(f"bad drive argument {arg!r}: expected format=FMT:DEVNAME=IMAGE")
    devname, sep, path = arg.partition("=")
    if not sep or not devname or not path:
        raise VmafsError(f"bad drive argument {arg!r}: expected DEVNAME=IMAGE "
                         "(for example drive-scsi0=disk.qcow2)")
    try:
        vma.check_device_name(devname)
    except vma.FormatError as exc:
        raise VmafsError(str(exc)) from None
    return devname, path, fmt


def probe(devname: str, path: str, fmt: str | None) -> ImageSpec:
    """Format and virtual size, as QEMU sees them."""
    if not os.path.exists(path):
        raise VmafsError(f"{path}: no such image")
    cmd = ["qemu-img", "info", "--output=json", "-U"] + (["-f", fmt] if fmt else []) + [path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise VmafsError("qemu-img not found: install qemu-utils") from None
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unreadable"
        raise VmafsError(f"{path}: cannot read image: {reason.removeprefix('qemu-img: ')}")
    info = json.loads(proc.stdout)
    size = int(info["virtual-size"])
    if size <= 0:
        raise VmafsError(f"{path}: image is empty")
    return ImageSpec(devname, path, info["format"], size)


def copy_raw(writer: ArchiveWriter, dev_id: int, path: str, size: int) -> None:
    """Read the data regions of a raw file (SEEK_DATA/SEEK_HOLE) into the writer."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        file_size = os.fstat(fd).st_size  # QEMU rounds a raw image's size up to 512 bytes
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            # find the hole from the data itself: the cluster start may lie in the hole before it
            hole = min(os.lseek(fd, data_start, os.SEEK_HOLE), size)
            data_start = min(data_start // vma.CLUSTER_SIZE * vma.CLUSTER_SIZE, size)
            hole = min(-(-hole // vma.CLUSTER_SIZE) * vma.CLUSTER_SIZE, size)
            data_start = max(data_start, pos)
            while data_start < hole:
                n = min(READ_CHUNK, hole - data_start)
                chunk = os.pread(fd, n, data_start)
                if len(chunk) != n:
                    if data_start + len(chunk) != file_size:
                        raise VmafsError(f"{path}: image changed size while reading")
                    chunk += bytes(n - len(chunk))  # the tail QEMU adds reads as zeros
                writer.write(dev_id, data_start, chunk)
                data_start += n
            pos = hole
    finally:
        os.close(fd)
