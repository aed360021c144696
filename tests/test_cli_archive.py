"""The archive commands end to end, as real subprocesses: create (raw, qcow2, vmdk; plain, zstd
and stdout), list, config, verify, extract, convert, and the one-line errors users can cause.

Every archive made here is read back three ways: `vmafs extract`, Archive.read at random
offsets, and dissect.archive (plain .vma directly; .vma.zst after the real `zstd -d`). The plain
stream is walked extent by extent to check that every cluster appears exactly once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from archive_helpers import assert_every_cluster_once, dissect_read, sha256, walk_vma
from conftest import VECTORS, assert_one_line_error, run_vmafs

from vmafs.archive.reader import Archive

CLUSTER = 65536
HAVE_QEMU_IMG = shutil.which("qemu-img") is not None
HAVE_ZSTD = shutil.which("zstd") is not None
needs_qemu_img = pytest.mark.skipif(not HAVE_QEMU_IMG, reason="qemu-img not installed")


@dataclass
class Source:
    devname: str
    path: Path
    fmt: str | None  # passed as format=FMT: when set
    content: bytes  # what the guest sees, QEMU's virtual size long


def write_sparse(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    content = bytearray(size)
    for off, data in pieces.items():
        content[off:off + len(data)] = data
    return bytes(content)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    d = tmp_path_factory.mktemp("src")
    rng = random.Random(42)
    out: dict[str, Source] = {}
    # sparse: 8 MiB with scattered blocks, a 17-byte write mid-block, a cluster-straddling write
    sparse = write_sparse(d / "sparse.raw", 8 << 20, {
        3 * 4096: rng.randbytes(4096), 40 * CLUSTER + 1000: rng.randbytes(17),
        77 * CLUSTER - 100: rng.randbytes(300), (8 << 20) - 4096: rng.randbytes(4096)})
    out["sparse"] = Source("drive-scsi0", d / "sparse.raw", None, sparse)
    # random, partial last cluster (a multiple of 512, not of 64 KiB)
    rnd = rng.randbytes(3 * CLUSTER + 5 * 512)
    (d / "random.raw").write_bytes(rnd)
    out["random"] = Source("drive-scsi1", d / "random.raw", None, rnd)
    # an odd 1000-byte raw file: QEMU sees 1024 bytes
    odd = rng.randbytes(1000)
    (d / "odd.raw").write_bytes(odd)
    out["odd"] = Source("drive-sata0", d / "odd.raw", "raw", odd + bytes(24))
    if HAVE_QEMU_IMG:
        # qcow2 and vmdk made from a raw image by qemu-img convert
        base = write_sparse(d / "q.raw", 2 << 20, {
            0: rng.randbytes(CLUSTER), 5 * CLUSTER + 4096: rng.randbytes(8192),
            (2 << 20) - 512: rng.randbytes(512)})
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(d / "q.raw"), str(d / "disk.qcow2"))
        out["qcow2"] = Source("drive-virtio0", d / "disk.qcow2", None, base)
        qemu_img("convert", "-f", "raw", "-O", "vmdk", str(d / "q.raw"), str(d / "disk.vmdk"))
        out["vmdk"] = Source("drive-ide0", d / "disk.vmdk", "vmdk", base)
        # an empty qcow2 (qemu-img create): all zero slots
        qemu_img("create", "-f", "qcow2", str(d / "empty.qcow2"), "3M")
        out["empty"] = Source("drive-efidisk0", d / "empty.qcow2", "qcow2", bytes(3 << 20))
    (d / "qemu-server.conf").write_text("boot: order=scsi0\ncores: 2\nmemory: 2048\n")
    (d / "qemu-server.fw").write_bytes(b"[OPTIONS]\nenable: 1\n")
    return out


def drive_args(srcs: list[Source]) -> list[str]:
    return [(f"format={s.fmt}:" if s.fmt else "") + f"{s.devname}={s.path}" for s in srcs]


def check_extract(archive: Path, out_dir: Path, srcs: list[Source],
                  configs: dict[str, bytes]) -> None:
    rc, _, err = run_vmafs("extract", "-q", archive, out_dir)
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == sorted(
        [f"disk-{s.devname}.raw" for s in srcs] + list(configs))
    for s in srcs:
        assert (out_dir / f"disk-{s.devname}.raw").read_bytes() == s.content, s.devname
    for name, data in configs.items():
        assert (out_dir / name).read_bytes() == data


def check_random_reads(archive: Path, srcs: list[Source], configs: dict[str, bytes]) -> None:
    rng = random.Random(7)
    with Archive.open(str(archive)) as a:
        assert a.indexed
        assert [(d.name, d.size) for d in a.devices] == [(s.devname, len(s.content))
                                                         for s in srcs]
        assert dict(a.configs) == configs
        for dev, s in zip(a.devices, srcs, strict=True):
            assert a.read(dev.dev_id, 0, dev.size) == s.content
            for _ in range(25):
                off = rng.randrange(dev.size)
                n = rng.choice([1, 512, 4096, CLUSTER, rng.randrange(1, 300000)])
                assert a.read(dev.dev_id, off, n) == s.content[off:off + n]


def check_plain_stream(path: Path, srcs: list[Source], configs: dict[str, bytes]) -> None:
    walk = walk_vma(path.read_bytes())
    assert_every_cluster_once(walk)
    assert [walk.devices[i] for i in sorted(walk.devices)] == [
        (s.devname, len(s.content)) for s in srcs]
    for i, s in enumerate(srcs, start=1):
        assert bytes(walk.images[i]) == s.content
    assert walk.configs == configs
    images, got_configs = dissect_read(path)
    assert got_configs == configs
    for s in srcs:
        assert images[s.devname] == s.content


@pytest.mark.parametrize("suffix", [".vma", ".vma.zst"])
@pytest.mark.parametrize("which", [
    ("sparse", "random", "odd"),
    pytest.param(("qcow2", "vmdk", "empty", "random"), marks=needs_qemu_img),
])
def test_create_round_trip(which: tuple[str, ...], suffix: str, sources: dict[str, Source],
                           tmp_path: Path) -> None:
    srcs = [sources[k] for k in which]
    conf_dir = sources["sparse"].path.parent
    configs = {"qemu-server.conf": (conf_dir / "qemu-server.conf").read_bytes(),
               "qemu-server.fw": (conf_dir / "qemu-server.fw").read_bytes()}
    archive = tmp_path / f"vzdump-qemu-100-2026_01_01-00_00_00{suffix}"
    rc, out, err = run_vmafs("create", "-q", "--json", "-o", archive,
                             "-c", conf_dir / "qemu-server.conf",
                             "-c", conf_dir / "qemu-server.fw", *drive_args(srcs))
    assert rc == 0, err
    assert json.loads(out)["devices"][0]["name"] == srcs[0].devname
    assert os.listdir(tmp_path) == [archive.name]  # no .part left
    rc, out, err = run_vmafs("verify", archive)
    assert rc == 0, err
    assert b"data checksums and header digest verified" in out
    rc, out, err = run_vmafs("list", archive)
    assert rc == 0, err
    assert [x for x in out.decode().splitlines() if x.startswith("DEV:")] == [
        f"DEV: dev_id={i} size: {len(s.content)} devname: {s.devname}"
        for i, s in enumerate(srcs, start=1)]
    check_extract(archive, tmp_path / "x", srcs, configs)
    check_random_reads(archive, srcs, configs)
    if suffix == ".vma":
        check_plain_stream(archive, srcs, configs)
    elif HAVE_ZSTD:
        plain = tmp_path / "plain.vma"
        subprocess.run(["zstd", "-q", "-d", "-o", str(plain), str(archive)], check=True)
        check_plain_stream(plain, srcs, configs)


def test_stdout_stream_to_verify_stdin(sources: dict[str, Source], tmp_path: Path) -> None:
    """`create -o -` writes a plain stream to stdout; `verify -` and `extract -` read stdin."""
    srcs = [sources["sparse"], sources["random"]]
    rc, stream, err = run_vmafs("create", "-q", "-o", "-", *drive_args(srcs))
    assert rc == 0, err
    assert stream[:4] == b"VMA\0"
    walk = walk_vma(stream)
    assert_every_cluster_once(walk)
    rc, out, err = run_vmafs("verify", "-", input=stream)
    assert rc == 0, err
    assert b"OK" in out
    rc, _, err = run_vmafs("extract", "-q", "-", tmp_path / "x", input=stream)
    assert rc == 0, err
    for s in srcs:
        assert (tmp_path / "x" / f"disk-{s.devname}.raw").read_bytes() == s.content
    rc, out, err = run_vmafs("list", "-", input=stream)
    assert rc == 0 and b"drive-scsi1" in out
    rc, _, err = run_vmafs("convert", "-q", "-", tmp_path / "c.vma.zst", input=stream)
    assert rc == 0, err
    with Archive.open(str(tmp_path / "c.vma.zst")) as a:
        assert [a.read(d.dev_id, 0, d.size) for d in a.devices] == [s.content for s in srcs]
    # a damaged stream on stdin is reported like a file
    bad = bytearray(stream)
    bad[-600] ^= 1
    rc, _, err = run_vmafs("verify", "-", input=bytes(bad))
    assert_one_line_error(rc, err)


def test_extract_selected_drive_and_force(sources: dict[str, Source], tmp_path: Path) -> None:
    srcs = [sources["sparse"], sources["random"]]
    archive = tmp_path / "a.vma"
    assert run_vmafs("create", "-q", "-o", archive, *drive_args(srcs))[0] == 0
    out_dir = tmp_path / "x"
    rc, _, err = run_vmafs("extract", "-q", "-d", "drive-scsi1", archive, out_dir)
    assert rc == 0, err
    assert os.listdir(out_dir) == ["disk-drive-scsi1.raw"]
    # extracting again over existing files: refused without --force, nothing changed
    target = out_dir / "disk-drive-scsi1.raw"
    target.write_bytes(b"mine")
    rc, _, err = run_vmafs("extract", "-q", archive, out_dir)
    assert_one_line_error(rc, err, "exists", "--force")
    assert target.read_bytes() == b"mine"
    assert os.listdir(out_dir) == ["disk-drive-scsi1.raw"]
    rc, _, err = run_vmafs("extract", "-q", "--force", archive, out_dir)
    assert rc == 0, err
    assert target.read_bytes() == sources["random"].content
    assert sorted(os.listdir(out_dir)) == ["disk-drive-scsi0.raw", "disk-drive-scsi1.raw"]
    rc, _, err = run_vmafs("extract", "-q", "-d", "drive-nope", archive, tmp_path / "y")
    assert_one_line_error(rc, err, "drive-nope")


def test_extract_is_sparse(sources: dict[str, Source], tmp_path: Path) -> None:
    archive = tmp_path / "a.vma"
    assert run_vmafs("create", "-q", "-o", archive, drive_args([sources["sparse"]])[0])[0] == 0
    rc, _, err = run_vmafs("extract", "-q", archive, tmp_path / "x")
    assert rc == 0, err
    st = (tmp_path / "x" / "disk-drive-scsi0.raw").stat()
    assert st.st_size == 8 << 20
    assert st.st_blocks * 512 < 1 << 20  # holes stay holes


def test_config_command(sources: dict[str, Source], tmp_path: Path) -> None:
    conf = sources["sparse"].path.parent / "qemu-server.conf"
    archive = tmp_path / "a.vma"
    assert run_vmafs("create", "-q", "-o", archive, "-c", conf,
                     drive_args([sources["odd"]])[0])[0] == 0
    rc, out, err = run_vmafs("config", archive)
    assert rc == 0, err
    assert out == conf.read_bytes()
    rc, _, err = run_vmafs("config", archive, "qemu-server.fw")
    assert_one_line_error(rc, err, "qemu-server.fw")


@pytest.mark.parametrize(("name", "suffix"), [("sample-2disks.vma.zst", ".vma.zst"),
                                              ("sample-2disks.vma.lzo", ".vma")])
def test_convert_proxmox_archive(name: str, suffix: str, proxmox_manifest: dict,
                                 tmp_path: Path) -> None:
    """A vzdump archive becomes an indexed, randomly readable one with the same content."""
    entry = proxmox_manifest["sample-2disks.vma"]
    out = tmp_path / f"converted{suffix}"
    rc, _, err = run_vmafs("convert", "-q", VECTORS / "proxmox" / name, out)
    assert rc == 0, err
    rc, _, err = run_vmafs("verify", out)
    assert rc == 0, err
    with Archive.open(str(out)) as a:
        assert a.indexed
        for dev in a.devices:
            assert sha256(a.read(dev.dev_id, 0, dev.size)) == \
                entry["devices"][dev.name]["sha256"]
        assert {n: sha256(c) for n, c in a.configs} == {
            n: c["sha256"] for n, c in entry["configs"].items()}
    if suffix == ".vma":
        walk = walk_vma(out.read_bytes())
        assert_every_cluster_once(walk)



# --- errors a user can cause --------------------------------------------------------------------


def assert_nothing_written(folder: Path, name: str) -> None:
    leftovers = [p for p in os.listdir(folder) if p.startswith(name)]
    assert leftovers == [], leftovers


def test_create_errors(sources: dict[str, Source], tmp_path: Path) -> None:
    good = drive_args([sources["odd"]])[0]
    out = tmp_path / "out.vma"
    cases: list[tuple[list[str], list[str]]] = [
        (["drive-scsi0=/nonexistent/disk.raw"], ["/nonexistent/disk.raw"]),
        (["drive scsi0=" + str(sources["odd"].path)], ["drive scsi0"]),
        (["drive/scsi0=" + str(sources["odd"].path)], ["drive/scsi0"]),
        (["vmstate=" + str(sources["odd"].path)], ["vmstate"]),
        ([good, good], ["once"]),
        (["drive-scsi0"], ["DEVNAME=IMAGE"]),
    ]
    for drives, fragments in cases:
        rc, _, err = run_vmafs("create", "-q", "-o", out, *drives)
        assert_one_line_error(rc, err, *fragments)
        assert_nothing_written(tmp_path, "out.vma")


@needs_qemu_img
def test_create_unreadable_format(sources: dict[str, Source], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk image\n")
    out = tmp_path / "out.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", out, f"format=qcow2:drive-scsi0={text}")
    assert_one_line_error(rc, err, str(text))
    assert_nothing_written(tmp_path, "out.vma")
    rc, _, err = run_vmafs("create", "-q", "-o", out, f"format=nosuchfmt:drive-scsi0={text}")
    assert_one_line_error(rc, err, str(text))
    assert_nothing_written(tmp_path, "out.vma")


def test_create_config_errors(sources: dict[str, Source], tmp_path: Path) -> None:
    good = drive_args([sources["odd"]])[0]
    out = tmp_path / "out.vma"
    big = tmp_path / "big.conf"
    big.write_bytes(b"x" * 65536)
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", big, good)
    assert_one_line_error(rc, err, "65535")
    assert_nothing_written(tmp_path, "out.vma")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "qemu-server.conf").write_text("a")
    (tmp_path / "qemu-server.conf").write_text("b")
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", tmp_path / "a" / "qemu-server.conf",
                           "-c", tmp_path / "qemu-server.conf", good)
    assert_one_line_error(rc, err, "qemu-server.conf")
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", tmp_path / "missing.conf", good)
    assert_one_line_error(rc, err, "missing.conf")
    assert_nothing_written(tmp_path, "out.vma")
    # exactly 65535 bytes is allowed
    big.write_bytes(b"x" * 65535)
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", big, good)
    assert rc == 0, err


def test_create_output_errors(sources: dict[str, Source], tmp_path: Path) -> None:
    good = drive_args([sources["odd"]])[0]
    rc, _, err = run_vmafs("create", "-q", "-o", tmp_path / "nodir" / "out.vma", good)
    assert_one_line_error(rc, err, "nodir")
    assert not (tmp_path / "nodir").exists()
    rc, _, err = run_vmafs("create", "-q", "-o", tmp_path / "out.tar", good)
    assert_one_line_error(rc, err, ".vma")
    assert os.listdir(tmp_path) == []


def test_extract_output_dir_errors(sources: dict[str, Source], tmp_path: Path) -> None:
    archive = tmp_path / "a.vma"
    assert run_vmafs("create", "-q", "-o", archive, drive_args([sources["odd"]])[0])[0] == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_vmafs("extract", "-q", archive, blocker / "sub")
    assert_one_line_error(rc, err)
    rc, _, err = run_vmafs("extract", "-q", tmp_path / "missing.vma", tmp_path / "x")
    assert_one_line_error(rc, err, "missing.vma")
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


@pytest.mark.parametrize("command", ["list", "config", "verify"])
def test_reading_commands_on_missing_or_junk(command: str, tmp_path: Path) -> None:
    rc, _, err = run_vmafs(command, tmp_path / "missing.vma")
    assert_one_line_error(rc, err, "missing.vma")
    junk = tmp_path / "junk.vma"
    junk.write_bytes(os.urandom(5000))
    rc, _, err = run_vmafs(command, junk)
    assert_one_line_error(rc, err)
    empty = tmp_path / "empty.vma"
    empty.write_bytes(b"")
    rc, _, err = run_vmafs(command, empty)
    assert_one_line_error(rc, err)
