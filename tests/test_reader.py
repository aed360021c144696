"""PlainSource's page-cache handling, checked with fincore (util-linux) on a real file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmafs.container.plain import PlainSource

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None,
                                reason="fincore (util-linux) not installed")


def cached_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def uncached_file(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("drop_behind", [False, True])
def test_sequential_reader_drops_what_it_passed(tmp_path: Path, drop_behind: bool) -> None:
    path = tmp_path / "a.vma"
    size = 48 * MiB
    uncached_file(path, size)
    if cached_bytes(path) > size // 4:
        pytest.skip("this file system keeps the file cached whatever we advise")
    expected = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    source = PlainSource(fd, drop_behind=drop_behind)
    try:
        # 64 KiB clusters behind 512-byte headers: reads are not page aligned
        offset = 0
        while offset < size:
            length = min(MiB + 512, size - offset)
            assert source.pread(offset, length) == expected[offset:offset + length]
            offset += length
        left = cached_bytes(path)
        if drop_behind:
            assert left < 12 * MiB       # the last read and what was requested ahead of it
        else:
            assert left > size // 2
    finally:
        source.close()
