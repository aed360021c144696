"""vmafs against archives nobody in this project wrote (tests/vectors, a copy of
the project's shared vectors), with the real
Proxmox reader's verdicts from the MANIFESTs.

Deliberate differences from Proxmox's `vma` tool, asserted below:
- bad/missing-cluster.vma: Proxmox's `vma verify` passes it (only its extract fails); our
  `verify` rejects it too, with extract's text "detected missing cluster 5 for stream
  drive-scsi0": an archive that cannot be restored must not verify.
- bad/unknown-dev-id.vma: Proxmox's `vma verify` hits an assert() and aborts; ours fails
  cleanly with extract's text "got wrong dev id 3".
- header-magic.vma: vmafs also reads compressed archives, so the message adds that the file is
  not zstd, gzip or lzop compressed either, after Proxmox's "wrong magic number".
- vmstate.vma: Proxmox's extract drops vmstate's zero blocks (a short, corrupt vmstate.bin); we
  write the full stream, whose sha256 is the manifest's.
- Our messages add where the problem is ("at offset N"), after Proxmox's text.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from archive_helpers import file_sha256, sha256
from conftest import VECTORS, assert_one_line_error, run_vmafs

from vmafs.archive.reader import Archive
from vmafs.errors import NotSeekableError

PROXMOX = VECTORS / "proxmox"
SPEC = VECTORS / "spec"
BAD = SPEC / "bad"



def _names(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern)) if folder.is_dir() else []


PROXMOX_ARCHIVES = _names(PROXMOX, "*.vma*")
SPEC_SAMPLES = _names(SPEC, "*.vma*")
BAD_ARCHIVES = _names(BAD, "*.vma")
BAD_PARAMS = BAD_ARCHIVES


def proxmox_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    entry = manifest[name]
    return manifest[entry["same_as"]] if "same_as" in entry else entry


def spec_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """two-disks.vma.gz, two-disks.seekable.vma.zst, diskless.vma.zst... -> the plain sample."""
    base = re.sub(r"(\.seekable|\.skipidx)?\.vma(\.zst|\.gz|\.lzo)?$", ".vma", name)
    return manifest["samples"][base]


def extract_and_check(archive: Path, out: Path, devices: dict[str, str],
                      configs: dict[str, str], sizes: dict[str, int] | None = None) -> None:
    rc, _, err = run_vmafs("extract", "-q", archive, out)
    assert rc == 0, err
    assert "Traceback" not in err
    expected_files = {f"disk-{n}.raw" for n in devices if n != "vmstate"} | set(configs)
    if "vmstate" in devices:
        expected_files.add("vmstate.bin")
    assert set(os.listdir(out)) == expected_files
    for name, digest in devices.items():
        path = out / ("vmstate.bin" if name == "vmstate" else f"disk-{name}.raw")
        if sizes is not None:
            assert path.stat().st_size == sizes[name]
        assert file_sha256(path) == digest, name
    for name, digest in configs.items():
        assert file_sha256(out / name) == digest, name


# --- proxmox/ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROXMOX_ARCHIVES)
def test_proxmox_list(name: str, proxmox_manifest: dict[str, Any]) -> None:
    entry = proxmox_entry(proxmox_manifest, name)
    rc, out, err = run_vmafs("list", PROXMOX / name, env={"TZ": "UTC"})
    assert rc == 0, err
    text = out.decode()
    expected = entry["vma_list"]
    # Proxmox printed CTIME in its own local time zone; compare it where that was UTC.
    got_lines = text.splitlines()
    want_lines = expected.splitlines()
    assert [x for x in got_lines if not x.startswith("CTIME:")] == \
        [x for x in want_lines if not x.startswith("CTIME:")]
    assert re.fullmatch(r"CTIME: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", got_lines[-1])
    rc, out, err = run_vmafs("list", "--json", PROXMOX / name)
    assert rc == 0, err
    info = json.loads(out)
    assert [(d["dev_id"], d["name"], d["device_bytes"]) for d in info["devices"]] == [
        (d["dev_id"], n, d["size"]) for n, d in entry["devices"].items()]
    assert [(c["name"], c["size"]) for c in info["configs"]] == [
        (n, c["size"]) for n, c in entry["configs"].items()]
    if time.asctime(time.gmtime(info["ctime"])) == entry["vma_list_ctime"]:
        assert text == expected


@pytest.mark.parametrize("name", PROXMOX_ARCHIVES)
def test_proxmox_config(name: str, proxmox_manifest: dict[str, Any]) -> None:
    entry = proxmox_entry(proxmox_manifest, name)
    for cfg, info in entry["configs"].items():
        rc, out, err = run_vmafs("config", PROXMOX / name, cfg)
        assert rc == 0, err
        assert sha256(out) == info["sha256"] and len(out) == info["size"]
        assert out == (PROXMOX / cfg).read_bytes()
    if "qemu-server.conf" in entry["configs"]:
        rc, out, _ = run_vmafs("config", PROXMOX / name)  # the default name
        assert rc == 0 and out == (PROXMOX / "qemu-server.conf").read_bytes()
    else:
        rc, _, err = run_vmafs("config", PROXMOX / name)
        assert_one_line_error(rc, err, "qemu-server.conf")


@pytest.mark.parametrize("name", PROXMOX_ARCHIVES)
def test_proxmox_verify_and_extract(name: str, proxmox_manifest: dict[str, Any],
                                    tmp_path: Path) -> None:
    rc, out, err = run_vmafs("verify", PROXMOX / name)
    assert rc == 0, err
    assert b"OK" in out and "Traceback" not in err
    entry = proxmox_entry(proxmox_manifest, name)
    extract_and_check(PROXMOX / name, tmp_path / "out",
                      {n: d["sha256"] for n, d in entry["devices"].items()},
                      {n: c["sha256"] for n, c in entry["configs"].items()},
                      {n: d["size"] for n, d in entry["devices"].items()})


@pytest.mark.parametrize("name", [n for n in PROXMOX_ARCHIVES if n.endswith(".vma")])
def test_proxmox_random_access(name: str, proxmox_manifest: dict[str, Any]) -> None:
    """Archive.open walks the extent headers of a plain Proxmox archive (no index)."""
    entry = proxmox_manifest[name]
    with Archive.open(str(PROXMOX / name)) as archive:
        assert not archive.indexed and not archive.compressed
        assert [(d.dev_id, d.name, d.size) for d in archive.devices] == [
            (d["dev_id"], n, d["size"]) for n, d in entry["devices"].items()]
        assert {n: sha256(c) for n, c in archive.configs} == {
            n: c["sha256"] for n, c in entry["configs"].items()}
        for dev in archive.devices:
            data = archive.read(dev.dev_id, 0, dev.size + 12345)  # clipped at the end
            assert len(data) == dev.size
            assert sha256(data) == entry["devices"][dev.name]["sha256"]
            # a few unaligned reads agree with the whole
            for off, n in [(0, 1), (4095, 2), (65535, 70000), (dev.size - 1, 10),
                           (dev.size // 3, 123457)]:
                assert archive.read(dev.dev_id, off, n) == data[off:off + n]
            assert archive.read(dev.dev_id, dev.size, 10) == b""


@pytest.mark.parametrize("name", [n for n in PROXMOX_ARCHIVES if not n.endswith(".vma")])
def test_proxmox_compressed_not_seekable(name: str) -> None:
    with pytest.raises(NotSeekableError, match="convert") as info:
        Archive.open(str(PROXMOX / name))
    assert str(PROXMOX / name) in str(info.value)


# --- spec/ samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_SAMPLES)
def test_spec_sample_verify_and_extract(name: str, spec_manifest: dict[str, Any],
                                        tmp_path: Path) -> None:
    entry = spec_entry(spec_manifest, name)
    assert entry["expect"] == "ok"
    rc, out, err = run_vmafs("verify", SPEC / name)
    assert rc == 0, err
    extract_and_check(SPEC / name, tmp_path / "out",
                      {d["name"]: d["sha256"] for d in entry["devices"]}, entry["configs"],
                      {d["name"]: d["size"] for d in entry["devices"]})


@pytest.mark.parametrize("name", SPEC_SAMPLES)
def test_spec_sample_list(name: str, spec_manifest: dict[str, Any]) -> None:
    entry = spec_entry(spec_manifest, name)
    rc, out, err = run_vmafs("list", SPEC / name, env={"TZ": "UTC"})
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert lines[-1] == "CTIME: " + time.asctime(time.gmtime(spec_manifest["ctime"]))
    devs = [d for d in entry["devices"] if d["name"] != "vmstate"]
    assert [x for x in lines if x.startswith("DEV:")] == [
        f"DEV: dev_id={d['dev_id']} size: {d['size']} devname: {d['name']}" for d in devs]
    vmstate = [d for d in entry["devices"] if d["name"] == "vmstate"]
    assert [x for x in lines if x.startswith("VMSTATE:")] == [
        f"VMSTATE: dev_id={d['dev_id']} memory: {d['size']}" for d in vmstate]
    assert [x.split("name: ")[1] for x in lines if x.startswith("CFG:")] == list(entry["configs"])


@pytest.mark.parametrize("name", [n for n in SPEC_SAMPLES if n.endswith(".vma")
                                  or n.endswith(".seekable.vma.zst")])
def test_spec_sample_random_access(name: str, spec_manifest: dict[str, Any]) -> None:
    entry = spec_entry(spec_manifest, name)
    with Archive.open(str(SPEC / name)) as archive:
        assert archive.uuid.hex == spec_manifest["uuid"]
        assert archive.ctime == spec_manifest["ctime"]
        assert {n: sha256(c) for n, c in archive.configs} == entry["configs"]
        want = {d["name"]: d for d in entry["devices"] if d["name"] != "vmstate"}
        assert {d.name: d.size for d in archive.devices} == {n: d["size"] for n, d in want.items()}
        for dev in archive.devices:
            data = archive.read(dev.dev_id, 0, dev.size)
            assert sha256(data) == want[dev.name]["sha256"]
            for off in range(0, dev.size, 40000):
                assert archive.read(dev.dev_id, off, 70001) == data[off:off + 70001]


@pytest.mark.parametrize("name", [n for n in SPEC_SAMPLES if n.endswith((".gz", ".lzo"))
                                  or n in ("two-disks.vma.zst", "two-disks.skipidx.vma.zst")])
def test_spec_compressed_not_seekable(name: str) -> None:
    with pytest.raises(NotSeekableError, match="convert"):
        Archive.open(str(SPEC / name))


def test_spec_vmstate_full(spec_manifest: dict[str, Any], tmp_path: Path) -> None:
    """Proxmox's extract drops vmstate's zero blocks; ours writes all 196608 bytes."""
    rc, _, err = run_vmafs("extract", "-q", SPEC / "vmstate.vma", tmp_path)
    assert rc == 0, err
    vmstate = [d for d in spec_manifest["samples"]["vmstate.vma"]["devices"]
               if d["name"] == "vmstate"][0]
    assert (tmp_path / "vmstate.bin").stat().st_size == vmstate["size"] == 196608
    assert file_sha256(tmp_path / "vmstate.bin") == vmstate["sha256"]


def test_spec_config_commands(spec_manifest: dict[str, Any]) -> None:
    entry = spec_manifest["samples"]["two-disks-extra-config.vma"]
    for name, digest in entry["configs"].items():
        rc, out, err = run_vmafs("config", SPEC / "two-disks-extra-config.vma", name)
        assert rc == 0, err
        assert sha256(out) == digest
    rc, _, err = run_vmafs("config", SPEC / "two-disks.vma", "x-index.json")
    assert_one_line_error(rc, err, "x-index.json")


# --- spec/bad/ ----------------------------------------------------------------------------------


def bad_expectation(expect: str) -> tuple[bool, str | None]:
    """(accepted, text our verify must show) from a manifest `expect`."""
    if expect.startswith("ok"):
        return True, None
    if expect.startswith("extract: "):
        # "extract: X; verify: Y": we reject in verify too, with extract's text (see docstring)
        return False, expect.split(";")[0].removeprefix("extract: ")
    return False, expect


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_bad_verify(name: str, spec_manifest: dict[str, Any]) -> None:
    entry = spec_manifest["bad"][name]
    assert file_sha256(BAD / name) == entry["sha256"]
    accepted, text = bad_expectation(entry["expect"])
    rc, out, err = run_vmafs("verify", BAD / name)
    if accepted:
        assert rc == 0, err
        assert b"OK" in out
    else:
        line = assert_one_line_error(rc, err)
        assert text is not None and text in line.replace(str(BAD / name), "")


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_bad_extract(name: str, spec_manifest: dict[str, Any], tmp_path: Path) -> None:
    """Rejected archives leave no file under a final name; accepted ones give the images."""
    accepted, text = bad_expectation(spec_manifest["bad"][name]["expect"])
    out = tmp_path / "out"
    rc, _, err = run_vmafs("extract", "-q", BAD / name, out)
    if accepted:
        assert rc == 0, err
        return
    line = assert_one_line_error(rc, err)
    assert not out.exists() or os.listdir(out) == []
    assert text is not None and text in line.replace(str(BAD / name), "")


def test_bad_missing_cluster_is_our_deliberate_difference() -> None:
    rc, _, err = run_vmafs("verify", BAD / "missing-cluster.vma")
    assert_one_line_error(rc, err, "detected missing cluster 5 for stream drive-scsi0")


def test_bad_unknown_dev_id_fails_cleanly() -> None:
    rc, _, err = run_vmafs("verify", BAD / "unknown-dev-id.vma")
    assert rc == 3  # not an abort (134) like Proxmox's verify
    assert_one_line_error(rc, err, "got wrong dev id 3")


def test_bad_header_magic_message() -> None:
    rc, _, err = run_vmafs("verify", BAD / "header-magic.vma")
    line = assert_one_line_error(rc, err)
    assert "wrong magic number" in line.replace(str(BAD / "header-magic.vma"), "")


@pytest.mark.parametrize("name", ["empty-extent-in-middle.vma", "zero-cluster-beyond-end.vma"])
def test_bad_accepted_ones_hold_two_disks(name: str, spec_manifest: dict[str, Any],
                                          tmp_path: Path) -> None:
    """These are two-disks.vma with an odd but legal extent added: same images."""
    entry = spec_manifest["samples"]["two-disks.vma"]
    extract_and_check(BAD / name, tmp_path / "out",
                      {d["name"]: d["sha256"] for d in entry["devices"]}, entry["configs"])
    with Archive.open(str(BAD / name)) as archive:
        for dev in archive.devices:
            want = [d for d in entry["devices"] if d["name"] == dev.name][0]["sha256"]
            assert sha256(archive.read(dev.dev_id, 0, dev.size)) == want


def test_bad_slot_gaps_ok_matches_dissect(tmp_path: Path) -> None:
    from archive_helpers import dissect_read
    images, _ = dissect_read(BAD / "slot-gaps-ok.vma")
    rc, _, err = run_vmafs("extract", "-q", BAD / "slot-gaps-ok.vma", tmp_path)
    assert rc == 0, err
    with Archive.open(str(BAD / "slot-gaps-ok.vma")) as archive:
        for dev in archive.devices:
            data = (tmp_path / f"disk-{dev.name}.raw").read_bytes()
            assert data == images[dev.name][:dev.size] == archive.read(dev.dev_id, 0, dev.size)
            assert any(data)
