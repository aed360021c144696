"""`vmafs info`, `vmafs snapshots` and `vmafs protect` through the real command, on real
archives: vmafs's own (plain, .vma.zst, an incremental chain built with the writer), vzdump's
from tests/vectors/proxmox (plain, one-frame .vma.zst, .vma.gz), a directory with two VMIDs, a
broken chain, an unreadable file and a symlink; protect, then prune's real command keeps it."""

from __future__ import annotations

import json
import os
import shutil
import uuid as uuidlib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, run_vmafs

from vmafs.archive.chain import link_to
from vmafs.archive.naming import protected_marker, vzdump_name
from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.format import chain

C = 65536
DEV = "drive-scsi0"
SIZE = 8 * C
T0 = 1733050000
CONF = ("qemu-server.conf", b"boot: order=scsi0\n")


def write(path: Path, ctime: int, writes: dict[int, bytes], *, parent: Path | None = None,
          configs: tuple[tuple[str, bytes], ...] = (CONF,)) -> Path:
    """A one-disk archive (an increment of parent when given) holding these clusters."""
    blobs = list(configs)
    if parent is not None:
        with Archive.open(str(parent), layer=True) as p:
            blobs.append((chain.CONFIG_NAME, chain.encode(chain.ChainRecord(parent=link_to(p)))))
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec(DEV, SIZE)], blobs, ctime=ctime,
                          incremental=[1] if parent is not None else [])
        for cluster, data in writes.items():
            w.write(1, cluster * C, data)
        w.finish()
    return path


def cluster(byte: int) -> bytes:
    return bytes([byte]) * C  # compresses well: a .vma.zst is smaller than its stream


def vz(vmid: str, ctime: int, zstd: bool = False) -> str:
    return vzdump_name(vmid, ctime, zstd)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """101: a full archive and two increments (the middle one .vma.zst); 102: a full archive
    with a vzdump name and an older one named only by its 102.conf config."""
    d = tmp_path_factory.mktemp("library")
    full = write(d / vz("101", T0), T0, {0: cluster(1), 1: cluster(2), 5: cluster(3)})
    inc1 = write(d / vz("101", T0 + 3600, True), T0 + 3600, {1: cluster(4)}, parent=full)
    write(d / vz("101", T0 + 7200), T0 + 7200, {2: cluster(5), 3: cluster(6)}, parent=inc1)
    write(d / "base-vm102.vma", T0 - 86400, {0: cluster(7)},
          configs=(("102.conf", b"name: vm102\n"),))
    write(d / vz("102", T0 + 60, True), T0 + 60, {0: cluster(8), 7: cluster(9)})
    return d


def json_of(*args: str | os.PathLike[str]) -> dict[str, Any]:
    rc, out, err = run_vmafs(*args, "--json")
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1
    doc: dict[str, Any] = json.loads(lines[0])
    assert doc["ok"] is True
    return doc


def uuid_of(path: Path) -> str:
    with Archive.open(str(path), layer=True) as a:
        return str(a.uuid)


# -- info ----------------------------------------------------------------------------------------

def test_info_plain_full(library: Path) -> None:
    path = library / vz("101", T0)
    doc = json_of("info", path)
    assert doc["archive"] == str(path)
    assert (doc["container"], doc["seekable"], doc["mode"]) == ("vma", True, "indexed")
    assert doc["indexed"] is True and doc["checksums"] is True and doc["block_sums"] is True
    assert doc["archive_bytes"] == path.stat().st_size == doc["stream_bytes"]
    assert doc["ratio"] == 1.0
    assert doc["devices"] == [{"dev_id": 1, "name": DEV, "device_bytes": SIZE,
                               "stored_bytes": 3 * C}]
    assert (doc["device_bytes"], doc["stored_bytes"]) == (SIZE, 3 * C)
    assert doc["configs"] == [{"name": "qemu-server.conf", "size": len(CONF[1])}]
    assert doc["uuid"] == uuid_of(path) and doc["ctime"] == T0
    assert datetime.fromisoformat(doc["time"]).timestamp() == T0
    assert doc["time"][-6] in "+-"  # local time with its offset
    assert doc["vmid"] == "101"
    assert (doc["incremental"], doc["parent"], doc["depth"], doc["chain"]) == (False, None, 0, [])
    assert doc["chain_complete"] is True
    rc, out, err = run_vmafs("info", path)
    text = out.decode()
    assert rc == 0, err
    assert "index: vmafs index with data checksums" in text
    assert f"device: {DEV}: 512.0 KiB ({SIZE} bytes), stored 192.0 KiB" in text
    assert "kind: full" in text and "vmid: 101" in text


def test_info_incremental_chain(library: Path) -> None:
    names = [vz("101", T0), vz("101", T0 + 3600, True), vz("101", T0 + 7200)]
    doc = json_of("info", library / names[2])
    assert doc["incremental"] is True and doc["chain_complete"] is True
    assert doc["depth"] == 2
    assert doc["parent"] == uuid_of(library / names[1])
    assert [c["archive"] for c in doc["chain"]] == [str(library / n) for n in names]
    assert [c["incremental"] for c in doc["chain"]] == [False, True, True]
    assert [c["stored_bytes"] for c in doc["chain"]] == [3 * C, C, 2 * C]
    assert [c["ctime"] for c in doc["chain"]] == [T0, T0 + 3600, T0 + 7200]
    assert doc["stored_bytes"] == 2 * C  # this archive's own data
    # the .vma.zst increment in the middle: seekable zstd, compressed
    mid = json_of("info", library / names[1])
    assert (mid["container"], mid["seekable"], mid["indexed"]) == ("zstd", True, True)
    assert mid["stream_bytes"] > mid["archive_bytes"] and mid["ratio"] > 1
    assert mid["depth"] == 1 and len(mid["chain"]) == 2
    rc, out, err = run_vmafs("info", library / names[2])
    assert rc == 0, err
    assert "chain: complete, depth 2" in out.decode()
    assert f"kind: incremental, parent {doc['parent']}" in out.decode()


def test_info_broken_chain_and_base(library: Path, tmp_path: Path) -> None:
    """The parent missing: info still describes the archive, and says why the chain is not
    complete; given with --base, the chain resolves."""
    name = vz("101", T0 + 3600, True)
    shutil.copyfile(library / name, tmp_path / name)
    doc = json_of("info", tmp_path / name)
    assert doc["incremental"] is True and doc["chain_complete"] is False
    assert "needs its parent" in doc["chain_error"] and doc["depth"] is None
    assert doc["chain"] == [] and doc["stored_bytes"] == C
    rc, out, err = run_vmafs("info", tmp_path / name)
    assert rc == 0, err
    assert "chain: broken: " in out.decode()
    doc = json_of("info", tmp_path / name, "--base", library / vz("101", T0))
    assert doc["chain_complete"] is True and doc["depth"] == 1


@pytest.mark.parametrize("name, container, mode", [
    ("sample-2disks.vma", "vma", "walked"),         # vzdump's, no vmafs index
    ("sample-2disks.vma.zst", "zstd", None),        # one frame: not seekable
    ("sample-2disks.vma.gz", "gzip", None),
])
def test_info_vzdump(vectors: Path, proxmox_manifest: dict[str, Any], name: str,
                     container: str, mode: str | None) -> None:
    expected = proxmox_manifest["sample-2disks.vma"]
    doc = json_of("info", vectors / "proxmox" / name)
    assert (doc["container"], doc["mode"], doc["seekable"]) == (container, mode, mode is not None)
    assert doc["indexed"] is (None if mode is None else False)
    assert [d["name"] for d in doc["devices"]] == list(expected["devices"])
    assert [d["device_bytes"] for d in doc["devices"]] == [
        v["size"] for v in expected["devices"].values()]
    assert doc["configs"] == [{"name": n, "size": v["size"]}
                              for n, v in expected["configs"].items()]
    assert (doc["incremental"], doc["vmid"]) == (False, None)
    if mode is None:  # header only
        assert doc["stored_bytes"] is None and doc["stream_bytes"] is None
        assert all("stored_bytes" not in d for d in doc["devices"])
        assert doc["hint"].startswith("not seekable: convert it to mount")
        rc, out, err = run_vmafs("info", vectors / "proxmox" / name)
        assert rc == 0, err
        assert "not seekable: convert it to mount" in out.decode()
    else:
        assert doc["stored_bytes"] > 0 and doc["checksums"] is False


def test_info_errors(tmp_path: Path) -> None:
    rc, _out, err = run_vmafs("info", tmp_path / "none.vma")
    assert_one_line_error(rc, err, "cannot open")
    assert rc == 1
    rc, _out, err = run_vmafs("info", tmp_path)
    assert_one_line_error(rc, err, "not a regular file")
    assert rc == 2
    (tmp_path / "junk.vma").write_bytes(b"not an archive at all")
    rc, _out, err = run_vmafs("info", tmp_path / "junk.vma")
    assert_one_line_error(rc, err, "not a vma file")
    assert rc == 3


# -- snapshots -----------------------------------------------------------------------------------

def test_snapshots(library: Path, tmp_path: Path) -> None:
    """Two VMIDs, a broken chain, an unreadable file, a symlink."""
    d = tmp_path / "dir"
    shutil.copytree(library, d)
    orphan = vz("103", T0 + 100, True)  # its parent is elsewhere: a broken chain
    parent = write(tmp_path / "p.vma", T0 + 50, {0: cluster(1)})
    write(d / orphan, T0 + 100, {1: cluster(2)}, parent=parent)
    (d / vz("104", T0)).write_bytes(b"garbage, not an archive")
    os.symlink(vz("101", T0), d / "link.vma")
    os.symlink(library / vz("102", T0 + 60, True), d / "outside.vma.zst")
    os.link(d / vz("101", T0 + 7200), d / "hard.vma")  # listed once, under its vzdump name
    os.mkfifo(d / "fifo.vma")  # never opened (a FIFO would block)
    (d / "notes.txt").write_text("not an archive\n")

    doc = json_of("snapshots", d)
    got = [(s["name"], s["vmid"], s["incremental"], s["complete"]) for s in doc["snapshots"]]
    assert got == [
        (vz("101", T0), "101", False, True),
        (vz("101", T0 + 3600, True), "101", True, True),
        (vz("101", T0 + 7200), "101", True, True),
        ("base-vm102.vma", "102", False, True),        # VMID from its 102.conf
        (vz("102", T0 + 60, True), "102", False, True),
        (orphan, "103", True, False),
    ]
    by_name = {s["name"]: s for s in doc["snapshots"]}
    inc = by_name[vz("101", T0 + 7200)]
    assert inc["parent"] == uuid_of(d / vz("101", T0 + 3600, True))
    assert inc["archive"] == str(d / inc["name"])
    assert inc["archive_bytes"] == (d / inc["name"]).stat().st_size
    assert inc["device_bytes"] == SIZE and inc["ctime"] == T0 + 7200
    assert datetime.fromisoformat(inc["time"]).timestamp() == T0 + 7200
    assert by_name[vz("101", T0)]["parent"] is None
    assert "needs its parent" in by_name[orphan]["chain_error"]
    assert [u["name"] for u in doc["unreadable"]] == [vz("104", T0)]
    assert "not a vma file" in doc["unreadable"][0]["error"]
    assert [(s["name"], s["reason"]) for s in doc["skipped"]] == [
        ("fifo.vma", "not a regular file"),
        ("hard.vma", f"another name of {vz('101', T0 + 7200)}"),
        ("link.vma", "not a regular file"),
        ("outside.vma.zst", "not a regular file")]

    rc, out, err = run_vmafs("snapshots", d)
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "VMID 101:" and "VMID 102:" in lines and "VMID 103:" in lines
    assert any(orphan in line and "INCOMPLETE" in line for line in lines)
    assert any(line.startswith(f"unreadable: {vz('104', T0)}: ") for line in lines)
    assert "skipped: link.vma: not a regular file" in lines
    assert lines[-1] == "6 archives of 3 VMs, 1 with an incomplete chain, 1 unreadable"

    only = json_of("snapshots", d, "--vmid", "102")
    assert [s["name"] for s in only["snapshots"]] == ["base-vm102.vma", vz("102", T0 + 60, True)]
    assert only["unreadable"] == []


def test_snapshots_errors(tmp_path: Path) -> None:
    rc, _out, err = run_vmafs("snapshots", tmp_path / "none")
    assert_one_line_error(rc, err, "not a directory")
    rc, _out, err = run_vmafs("snapshots", tmp_path, "--vmid", "../x")
    assert_one_line_error(rc, err, "bad VMID")
    assert rc == 2
    doc = json_of("snapshots", tmp_path)  # empty: nothing to list is not an error
    assert doc["snapshots"] == [] and doc["unreadable"] == [] and doc["skipped"] == []


# -- protect -------------------------------------------------------------------------------------

def test_protect_then_prune_keeps_it(library: Path, tmp_path: Path) -> None:
    old, new = vz("102", T0), vz("102", T0 + 86400, True)
    shutil.copyfile(library / vz("102", T0 + 60, True), tmp_path / new)
    write(tmp_path / old, T0, {0: cluster(1)})
    doc = json_of("protect", tmp_path / old)
    marker = tmp_path / protected_marker(old)
    assert doc["changed"] is True and doc["protected"] is True
    assert doc["marker"] == doc["output"] == str(marker)
    assert marker.is_file() and not marker.is_symlink() and marker.stat().st_size == 0
    again = json_of("protect", tmp_path / old)
    assert again["changed"] is False and again["output"] is None
    listed = json_of("snapshots", tmp_path)["snapshots"]
    assert [(s["name"], s["protected"]) for s in listed] == [(old, True), (new, False)]

    rc, _out, err = run_vmafs("prune", tmp_path, "--keep-last", "1")
    assert rc == 0, err
    assert (tmp_path / old).exists() and (tmp_path / new).exists()

    rc, out, err = run_vmafs("protect", "--remove", tmp_path / old)
    assert rc == 0, err
    assert out.decode() == f"{marker}: removed\n" and not marker.exists()
    assert json_of("protect", "--remove", tmp_path / old)["changed"] is False
    rc, _out, err = run_vmafs("prune", tmp_path, "--keep-last", "1")
    assert rc == 0, err
    assert not (tmp_path / old).exists() and (tmp_path / new).exists()


def test_protect_never_through_a_symlink(library: Path, tmp_path: Path) -> None:
    name = vz("101", T0)
    shutil.copyfile(library / name, tmp_path / name)
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / protected_marker(name))
    rc, _out, err = run_vmafs("protect", tmp_path / name)
    assert_one_line_error(rc, err, "not a regular file")
    assert not target.exists()
    rc, _out, err = run_vmafs("protect", "--remove", tmp_path / name)
    assert_one_line_error(rc, err, "not a regular file")
    assert os.path.islink(tmp_path / protected_marker(name))
    os.unlink(tmp_path / protected_marker(name))
    # the archive itself a symlink (prune never considers one), or not an archive's name
    os.symlink(name, tmp_path / "link.vma")
    rc, _out, err = run_vmafs("protect", tmp_path / "link.vma")
    assert_one_line_error(rc, err, "not a regular file")
    assert not os.path.lexists(tmp_path / protected_marker("link.vma"))
    rc, _out, err = run_vmafs("protect", tmp_path / "notes.txt")
    assert_one_line_error(rc, err, "not an archive name")
    assert rc == 2
    rc, _out, err = run_vmafs("protect", tmp_path / "gone.vma")
    assert_one_line_error(rc, err, "cannot protect")


def test_uuid_strings_are_uuids(library: Path) -> None:
    doc = json_of("snapshots", library)
    for s in doc["snapshots"]:
        uuidlib.UUID(s["uuid"])


def test_naming_rules() -> None:
    """The one home of the marker name and of an archive's VMID."""
    from vmafs.archive.naming import archive_vmid, config_vmid
    assert protected_marker("/b/vzdump-qemu-1-2024_01_01-00_00_00.vma") == (
        "/b/vzdump-qemu-1-2024_01_01-00_00_00.vma.protected")
    assert config_vmid(["qemu-server.conf", "101.conf"]) == "101"
    assert config_vmid(["101.conf", "102.conf"]) is None and config_vmid([]) is None
    assert archive_vmid("/b/" + vz("7", T0, True), ["101.conf"]) == "7"
    assert archive_vmid("/b/base.vma", ["101.conf"]) == "101"
    assert archive_vmid("/b/base.vma", ["vm.conf"]) is None
