"""Damage a chain's readers never read: a bad cluster in an older archive that a newer one
replaces (with data or zeros). verify says so with a warning naming the archive, device and
cluster and the layer that replaces it, and exits 4 (EXIT_SUPERSEDED_DAMAGE); extract, merge,
list and a real mount agree that the chain's current data is intact: they succeed with exactly
the chain's bytes. Damage in a cluster the chain still reads is exit 3 for verify and an error
for every reader of that cluster; both together are exit 3, the superseded part still a
warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_vmafs
from test_chain import (
    MSIZES,
    NO_FUSE,
    C,
    Chain,
    build_chain,
    disk_file,
    mounted,
    small_layers,
)

from vmafs.archive.reader import Archive
from vmafs.errors import EXIT_DAMAGED, EXIT_SUPERSEDED_DAMAGE

A, B = "drive-scsi0", "drive-virtio1"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("sd"), small_layers(), MSIZES)


def damage(path: Path, images: dict[str, bytes], dev: str, cluster: int) -> None:
    """Flip one byte inside a cluster's stored data (stored whole, so found by its bytes)."""
    data = bytearray(path.read_bytes())
    at = data.find(images[dev][cluster * C:cluster * C + 256])
    assert at > 0 and data.find(images[dev][cluster * C:cluster * C + 256], at + 1) < 0
    data[at + 100] ^= 0x40
    path.write_bytes(data)


def readers_agree(d: Path, want: dict[str, bytes], tmp: Path) -> None:
    """extract, merge, list (the real commands) succeed with the chain's current bytes."""
    newest = d / "n.vma.zst"
    rc, _, err = run_vmafs("extract", "-q", newest, tmp / "x")
    assert rc == 0 and err == "", err
    assert {n: (tmp / "x" / disk_file(n)).read_bytes() for n in MSIZES} == want
    rc, _, err = run_vmafs("merge", "-q", "-o", tmp / "m.vma", newest)
    assert rc == 0 and err == "", err
    with Archive.open(str(tmp / "m.vma")) as m:
        assert {dv.name: bytes(m.read(dv.dev_id, 0, dv.size)) for dv in m.devices} == want
    rc, out, err = run_vmafs("list", newest)
    assert rc == 0 and out.count(b"CHAIN: ") == 3, err


def test_superseded_damage_is_a_warning(small: Chain, tmp_path: Path) -> None:
    d = small.copy(tmp_path / "d")
    damage(d / "p.vma", small.states[0], A, 1)   # k.vma writes cluster 1 again
    damage(d / "p.vma", small.states[0], A, 4)   # k.vma zeroes cluster 4
    damage(d / "k.vma", small.states[1], A, 1)   # n.vma.zst zeroes cluster 1
    rc, out, err = run_vmafs("verify", "-q", d / "n.vma.zst")
    assert rc == EXIT_SUPERSEDED_DAMAGE, err
    lines = err.splitlines()
    assert len(lines) == 3 and out == b"", err
    assert all(ln.startswith("vmafs verify: warning: ancestor ") for ln in lines), err
    assert all("the chain's current data is intact" in ln for ln in lines), err
    assert f"p.vma: data checksum mismatch in cluster 1 of {A}" in lines[0]
    assert "which " + str(d / "k.vma") + " replaces" in lines[0]
    assert f"cluster 4 of {A}" in lines[1] and str(d / "k.vma") + " replaces" in lines[1]
    assert "k.vma: data checksum mismatch in cluster 1" in lines[2]
    assert str(d / "n.vma.zst") + " replaces" in lines[2]
    rc, out, _ = run_vmafs("verify", "-q", "--json", d / "n.vma.zst")
    doc = json.loads(out)
    assert rc == EXIT_SUPERSEDED_DAMAGE and not doc["ok"] and doc["problems"] == []
    assert [(w["device"], w["cluster"]) for w in doc["superseded"]] == [(A, 1), (A, 4),
                                                                         (A, 1)]
    readers_agree(d, small.states[-1], tmp_path)
    # each archive verified alone is damaged: the damage is real, only its reach differs
    rc, _, err = run_vmafs("verify", "-q", d / "p.vma")
    assert rc == EXIT_DAMAGED and "cluster 1 of" in err, err


def test_damage_the_chain_still_reads_is_an_error(small: Chain, tmp_path: Path) -> None:
    d = small.copy(tmp_path / "d")
    damage(d / "p.vma", small.states[0], A, 1)   # superseded
    damage(d / "p.vma", small.states[0], A, 8)   # still read: no newer layer touches 8
    rc, _, err = run_vmafs("verify", "-q", d / "n.vma.zst")
    assert rc == EXIT_DAMAGED, err
    errors = [ln for ln in err.splitlines() if "warning" not in ln]
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(errors) == 1 and f"cluster 8 of {A}" in errors[0], err
    assert len(warnings) == 1 and f"cluster 1 of {A}" in warnings[0], err
    newest = d / "n.vma.zst"
    rc, _, err = run_vmafs("extract", "-q", newest, tmp_path / "x")
    assert rc == EXIT_DAMAGED and "cluster 8" in err, err
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []
    rc, _, err = run_vmafs("merge", "-q", "-o", tmp_path / "m.vma", newest)
    assert rc == EXIT_DAMAGED and "cluster 8" in err, err
    assert not (tmp_path / "m.vma").exists()


@pytest.mark.skipif(NO_FUSE is not None, reason=str(NO_FUSE))
def test_mount_agrees(small: Chain, tmp_path: Path) -> None:
    """A real mount serves the current bytes around superseded damage, and EIO exactly for
    the cluster whose current data is damaged."""
    d = small.copy(tmp_path / "d")
    damage(d / "p.vma", small.states[0], A, 1)
    want = small.states[-1]
    with mounted(d / "n.vma.zst", tmp_path / "mnt") as mnt:
        for name in MSIZES:
            assert (mnt / disk_file(name)).read_bytes() == want[name]
    damage(d / "p.vma", small.states[0], A, 8)
    with mounted(d / "n.vma.zst", tmp_path / "mnt2") as mnt:
        fd = os.open(mnt / disk_file(A), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, C, 0) == want[A][:C]
            assert os.pread(fd, C, C) == want[A][C:2 * C]
            with pytest.raises(OSError) as info:
                os.pread(fd, C, 8 * C)
            assert info.value.errno == 5
        finally:
            os.close(fd)
