"""PlainSource's page-cache handling, checked with fincore (util-linux) on a real file; the
archive model's small reads against the image they came from."""

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


def test_small_reads_and_stream_offsets_match_the_image(tmp_path: Path) -> None:
    """A block-summed archive's small reads (one row looked up, its blocks and sums read and
    checked) give the image's bytes at any offset and length inside a cluster, and
    stream_offset points at each stored 4 KiB block (None where the image has zeros)."""
    import random

    from conftest import run_vmafs

    from vmafs.archive.reader import Archive

    rnd = random.Random(7)
    image = bytearray(8 * MiB)
    for block in range(0, len(image) // 4096):
        if rnd.random() < 0.6:  # partly stored clusters: some of their blocks are zeros
            image[block * 4096:(block + 1) * 4096] = rnd.randbytes(4096)
    (tmp_path / "disk.raw").write_bytes(image)
    archive = tmp_path / "a.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", archive,
                           f"drive-scsi0={tmp_path / 'disk.raw'}")
    assert rc == 0, err
    with Archive.open(str(archive)) as model:
        assert model.block_sums
        dev_id = model.devices[0].dev_id
        for block in range(0, len(image) // 4096):
            at = model.stream_offset(dev_id, block * 4096 + rnd.randrange(4096))
            want = bytes(image[block * 4096:(block + 1) * 4096])
            if at is None:
                assert want == bytes(4096)
            else:
                assert bytes(model.source.pread(at, 4096)) == want
        for _ in range(2000):
            offset = rnd.randrange(len(image))
            length = rnd.randrange(1, 65536 - offset % 65536 + 1)
            assert bytes(model.read(dev_id, offset, length)) == image[offset:offset + length]
