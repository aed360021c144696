"""convert keeps every cluster's meaning: an increment's zero slots (those in extents without
data too, where a zeroed region of more than a few clusters goes) and its chain record survive
every conversion (plain -> zstd, zstd -> plain, a vzdump-style gzip or one-frame zstd of the
stream -> indexed), so the converted layer has the same content digest (its children still
link to it) and the chain reads exactly as before through the model, extract, merge and a real
mount.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import pytest
import zstandard
from conftest import run_vmafs
from test_chain import (
    NO_FUSE,
    C,
    Chain,
    Layer,
    build_chain,
    disk_file,
    extract,
    model_images,
    mounted,
    vm,
)

from vmafs.archive.chain import open_chain
from vmafs.archive.reader import Archive

A, B = "drive-scsi0", "drive-virtio1"
SIZES = {A: 300 * C, B: 140 * C + 1000}


def zeroing_layers() -> list[Layer]:
    """A base, an increment that zeroes long regions (zero-slot extents), one whose second
    disk was copied whole (zero slots for all it did not write), and a last small one."""
    rng = random.Random(13)
    r = rng.randbytes
    return [
        Layer("z0.vma", [A, B], set(), [("write", A, 0, r(300 * C)),
                                        ("write", B, 0, r(SIZES[B]))]),
        Layer("z1.vma.zst", [A, B], {A, B}, [
            ("write", A, 3 * C, r(2 * C)),
            ("zero", A, 10 * C, 128 * C),             # the guest zeroed 8 MiB
            ("zero", B, 139 * C, C + 1000),           # up to B's short tail
            ("zero", B, 0, 70 * C),
        ]),
        Layer("z2.vma", [A, B], {A}, [                # B's bitmap lost: copied whole
            ("write", A, 200 * C, r(C)),
            ("zero", A, 250 * C, 40 * C),
            ("write", B, 5 * C, r(3 * C)),
        ]),
        Layer("z3.vma.zst", [A, B], {A, B}, [
            ("write", A, 20 * C, r(C)),
            ("write", B, 100 * C, r(C)),
        ]),
    ]


@pytest.fixture(scope="module")
def zch(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("zchain"), zeroing_layers(), SIZES)


def digests(path: Path) -> tuple[str, str]:
    with Archive.open(str(path), layer=True) as a:
        return a.digest(), a.identity()


def forms(src: Path, work: Path) -> list[Path]:
    """src's stream in the containers convert reads that Proxmox writes: gzip, one zstd frame."""
    plain = work / f"{src.name}.plain.vma"
    if src.name.endswith(".zst"):
        rc, _, err = vm("convert", "-q", src, plain)
        assert rc == 0, err
    else:
        shutil.copyfile(src, plain)
    data = plain.read_bytes()
    gz = work / f"{src.name}.vzdump.vma.gz"
    gz.write_bytes(gzip.compress(data, 1))
    zst = work / f"{src.name}.vzdump.vma.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=1).compress(data))
    return [gz, zst]


def test_every_conversion_keeps_the_digest(zch: Chain, tmp_path: Path) -> None:
    for src in zch.paths:
        want = digests(src)
        for suffix in (".vma", ".vma.zst"):
            out = tmp_path / f"{src.name}.conv{suffix}"
            rc, _, err = vm("convert", "-q", src, out)
            assert rc == 0, err
            assert digests(out) == want, (src.name, suffix)
        for form in forms(src, tmp_path):
            out = tmp_path / f"{form.name}.indexed.vma.zst"
            rc, _, err = vm("convert", "-q", form, out)
            assert rc == 0, err
            assert digests(out) == want, form.name


@pytest.fixture(scope="module")
def converted(zch: Chain, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chain with every layer converted (plain <-> zstd) by the real command, under the
    original names' stems; the newest."""
    dest = tmp_path_factory.mktemp("conv")
    names = []
    for src in zch.paths:
        name = src.name.replace(".vma.zst", ".x.vma") if src.name.endswith(".zst") \
            else src.name.replace(".vma", ".x.vma.zst")
        rc, _, err = run_vmafs("convert", "-q", src, dest / name)
        assert rc == 0, err
        names.append(name)
    return dest / names[-1]


def test_converted_chain_reads_as_the_original(zch: Chain, converted: Path,
                                               tmp_path: Path) -> None:
    newest = converted
    want = zch.states[-1]
    images, depth = model_images(newest)
    assert depth == 4 and images == want
    assert extract(newest, tmp_path / "x", real=True) == want
    rc, _, err = run_vmafs("verify", "-q", newest)
    assert rc == 0, err
    merged = tmp_path / "merged.vma"
    rc, _, err = run_vmafs("merge", "-q", "-o", merged, newest)
    assert rc == 0, err
    with Archive.open(str(merged)) as m:
        assert {d.name: bytes(m.read(d.dev_id, 0, d.size)) for d in m.devices} == want
    rc, out, err = run_vmafs("list", newest)
    assert rc == 0 and out.count(b"CHAIN: ") == 4, err
    # a middle layer converted alone keeps its child's link
    mixed = zch.copy(tmp_path / "mixed")
    os.unlink(mixed / "z1.vma.zst")
    rc, _, err = vm("convert", "-q", zch.dir / "z1.vma.zst", mixed / "z1.vma")
    assert rc == 0, err
    with open_chain(str(mixed / "z3.vma.zst")) as a:
        assert [os.path.basename(x.path or "") for x in a.layers] == [
            "z0.vma", "z1.vma", "z2.vma", "z3.vma.zst"]
    assert model_images(mixed / "z3.vma.zst") == (want, 4)


@pytest.mark.skipif(NO_FUSE is not None, reason=str(NO_FUSE))
def test_converted_chain_mounts_as_the_original(zch: Chain, converted: Path,
                                                tmp_path: Path) -> None:
    with mounted(converted, tmp_path / "mnt") as mnt:
        for name, size in SIZES.items():
            path = mnt / disk_file(name)
            assert os.stat(path).st_size == size
            assert path.read_bytes() == zch.states[-1][name], name
