"""A live chain from a real QEMU whose disk is zeroed in a region between backups (write
zeroes through QEMU's block layer, HMP qemu-io, as test_incremental does for host-side
writes: the dirty bitmap counts them like a guest's), every archive converted to the other
container, then read through extract and a real mount: exactly the disks at the last backup,
the zeroed region as zeros (not the parent's data), and each converted layer keeps its
content digest, so its child still links to it.
"""

from __future__ import annotations

from pathlib import Path

import guestimage as gi
import pytest
from conftest import fuse_missing
from test_backup import Lab, run_vmafs
from test_incremental import (
    PATTERN,
    assert_point_in_time,
    backup,
    dirty_disk_a,
    images,
    mounted_images,
)

from vmafs.archive.chain import open_chain
from vmafs.archive.reader import Archive
from vmafs.format import vma

MiB = 1 << 20
ZEROED = (PATTERN[0] + 4 * MiB, 8 * MiB)  # inside the pattern: 128 clusters


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


def zero_disk_a(lab: Lab, bases: list[bytes]) -> list[bytes]:
    offset, length = ZEROED
    lab.vm.qmp("human-monitor-command", **{
        "command-line": f'qemu-io drive-virtio0 "write -z {offset} {length}"'})
    a = bytearray(bases[0])
    a[offset:offset + length] = bytes(length)
    return [bytes(a), bases[1]]


def zero_clusters(path: Path, first: int, end: int) -> int:
    """Clusters of [first, end) of drive-virtio0 the increment holds as zeros."""
    with Archive.open(str(path), layer=True) as a:
        dev = next(d for d in a.devices if d.name == "drive-virtio0")
        held = a.held(dev.dev_id)
        assert held is not None
        runs = sum(1 for c in range(first, end) if c in held)
        stored = sum(1 for c in range(first, end) if not a.is_hole(dev.dev_id, c * vma.CLUSTER_SIZE,
                                                                       vma.CLUSTER_SIZE))
        return runs - stored


def test_zeroed_region_survives_convert(guest: gi.Guest, tmp_path: Path) -> None:
    lab = Lab(guest, tmp_path)
    bases = lab.sources()
    store = tmp_path / "chain"
    store.mkdir()
    full, i1, i2 = store / "full.vma.zst", store / "i1.vma", store / "i2.vma"
    with lab:
        backup(lab, full)
        bases = dirty_disk_a(lab, bases, 0x5A)
        backup(lab, i1, "--incremental", str(full))
        bases = zero_disk_a(lab, bases)
        backup(lab, i2, "--incremental", str(i1))
    offset, length = ZEROED
    first, end = offset // vma.CLUSTER_SIZE, (offset + length) // vma.CLUSTER_SIZE
    assert zero_clusters(i2, first, end) == end - first  # the zeroing is in the increment
    want = images(i2, tmp_path / "x")
    assert_point_in_time(want, bases)
    assert want[0][offset:offset + length] == bytes(length)
    assert want[0][PATTERN[0]:offset] == b"\x5a" * (offset - PATTERN[0])

    conv = tmp_path / "converted"
    conv.mkdir()
    for src, dst in ((full, "full.vma"), (i1, "i1.vma.zst"), (i2, "i2.vma.zst")):
        res = run_vmafs("convert", "-q", str(src), str(conv / dst))
        assert res.returncode == 0, res.stderr
        with Archive.open(str(src), layer=True) as a, \
                Archive.open(str(conv / dst), layer=True) as b:
            assert b.digest() == a.digest(), dst
    newest = conv / "i2.vma.zst"
    with open_chain(str(newest)) as arc:
        assert [Path(x.path or "").name for x in arc.layers] == ["full.vma", "i1.vma.zst",
                                                                  "i2.vma.zst"]
    assert images(newest, tmp_path / "x-conv") == want
    if fuse_missing() is None:
        assert mounted_images(newest, tmp_path / "m-conv") == want
