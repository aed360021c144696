"""Names from an archive: as Proxmox's reader reads them (C strings, raw bytes), the file names
extract and mount give them (sanitised, unique, the same in both), and how `list`, `config` and
errors show them (escaped on a terminal, exact in JSON).

Hostile names are made the way a damaged or forged archive would carry them: a real archive is
written with placeholder names of the same length, then its header blobs are overwritten with
the raw bytes and the header md5 is resealed.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
from archive_helpers import reseal_header
from conftest import assert_one_line_error, run_vmafs

from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.errors import FormatError
from vmafs.format import vma
from vmafs.format.names import (
    decode,
    disk_file_name,
    display,
    file_names,
    json_name,
    raw,
    safe_name,
)
from vmafs.mount.fs import layout

CLUSTER = 65536


def _placeholder(i: int, n: int, pad: str) -> str:
    tag = str(i)
    assert n >= len(tag), "a raw name blob needs at least as many bytes as its placeholder"
    return tag.rjust(n, pad)


def hostile_archive(path: Path, devices: list[tuple[bytes, int]],
                    configs: list[tuple[bytes, bytes]], *, ctime: int = 1700000000) -> Path:
    """An archive whose device and config name blobs are exactly the given bytes (each blob
    as stored, its terminating NUL included). Device i holds one cluster of byte i+1."""
    specs = [DeviceSpec(_placeholder(i, len(b) - 1, "d"), size)
             for i, (b, size) in enumerate(devices)]
    confs = [(_placeholder(i, len(b) - 1, "c"), data) for i, (b, data) in enumerate(configs)]
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, specs, confs, ctime=ctime)
        for dev_id, (_, size) in enumerate(devices, start=1):
            w.write(dev_id, 0, bytes([dev_id]) * min(size, CLUSTER))
        w.finish()
    data = bytearray(path.read_bytes())
    blob_off = struct.unpack_from(">I", data, 48)[0]

    def patch(ptr: int, blob: bytes) -> None:
        at = blob_off + ptr
        assert int.from_bytes(data[at:at + 2], "little") == len(blob)
        data[at + 2:at + 2 + len(blob)] = blob

    for i, (blob, _) in enumerate(configs):
        patch(struct.unpack_from(">I", data, 2044 + 4 * i)[0], blob)
    for dev_id, (blob, _) in enumerate(devices, start=1):
        patch(struct.unpack_from(">I", data, 4096 + 32 * dev_id)[0], blob)
    reseal_header(data)
    path.write_bytes(data)
    return path


# --- pure rules ---------------------------------------------------------------------------------


def test_display_escapes_everything_a_terminal_would_act_on() -> None:
    assert display("drive-scsi0") == "drive-scsi0"
    assert display("qemu-server.conf\nDEV: dev_id=9") == "qemu-server.conf\\nDEV: dev_id=9"
    assert display("\x1b]0;pwned\x07\x1b[2J") == "\\x1b]0;pwned\\x07\\x1b[2J"
    assert display("a\x9bb") == "a\\x9bb"                    # C1 CSI
    assert display("x\u202etxt.exe") == "x\\u202etxt.exe"    # bidi override
    assert display("tab\there\r") == "tab\\there\\r"
    assert display("back\\slash") == "back\\\\slash"          # so every escape is unambiguous
    assert display("café ü 日本") == "café ü 日本"             # printable text stays
    assert display(decode(b"bad\xff\xc3")) == "bad\\xff\\xc3"  # raw bytes, not U+FFFD
    for c in map(chr, range(0x110000)):
        if 0xD800 <= ord(c) < 0xE000:
            continue
        shown = display(c)
        assert shown == c or shown.startswith("\\"), repr(c)
        assert shown.isprintable()


def test_json_name_is_exact() -> None:
    assert json_name("drive-scsi0") == {"name": "drive-scsi0"}
    assert json_name("a\nb\x1b") == {"name": "a\nb\x1b"}  # JSON escapes these itself
    assert json_name(decode(b"x\xffy")) == {"name": "x\ufffdy", "name_hex": "78ff79"}
    assert json_name(b"disk-\xfe.raw", "file") == {"file": "disk-\ufffd.raw",
                                                  "file_hex": "6469736b2dfe2e726177"}


def test_safe_name_keeps_bytes_and_is_one_component() -> None:
    assert safe_name("a/b\\c\0d\ne\x7f") == b"a_b_c_d_e_"
    assert safe_name(decode(b"caf\xe9")) == b"caf\xe9"      # a latin-1 name keeps its byte
    assert [safe_name(n) for n in ("", ".", "..", "...")] == [b"_", b"_.", b"_..", b"..."]
    long = "é" * 200                                          # 400 bytes of UTF-8
    cut = safe_name(long)
    assert len(cut) <= 231 and cut.decode("utf-8") == "é" * (len(cut) // 2)
    assert len(safe_name(decode(b"\xff" * 400))) == 231
    assert disk_file_name("../x") == b"disk-.._x.raw"


def test_file_names_unique_disks_first_then_configs_then_vmstate() -> None:
    devs = [vma.Device(2, "drive-scsi0", 1), vma.Device(1, "drive/scsi0", 1),
            vma.Device(3, "drive_scsi0", 1)]
    names = file_names(devs, ["a/b", "a_b", "a\nb", "disk-drive_scsi0.raw", "vmstate.bin"],
                       vmstate=True)
    assert names.disks == {1: b"disk-drive_scsi0.raw", 2: b"disk-drive-scsi0.raw",
                           3: b"disk-drive_scsi0~2.raw"}
    assert names.configs == [b"a_b", b"a_b~2", b"a_b~3", b"disk-drive_scsi0.raw~2",
                             b"vmstate.bin"]
    assert names.vmstate == b"vmstate~2.bin"
    every = [*names.disks.values(), *names.configs, names.vmstate]
    assert len(set(every)) == len(every)
    assert file_names(devs, ["x"]).vmstate is None


# --- names as Proxmox's reader reads them -------------------------------------------------------


def test_name_blobs_are_c_strings(tmp_path: Path) -> None:
    """Proxmox stops at the first NUL (get_header_str gives a C string): so does vmafs."""
    path = hostile_archive(tmp_path / "a.vma", [(b"drive-scsi0\0old\0", CLUSTER)],
                           [(b"qemu-server.conf\0junk\0", b"cores: 1\n")])
    header = vma.decode_header(path.read_bytes())
    assert [d.name for d in header.devices] == ["drive-scsi0"]
    assert header.configs == (("qemu-server.conf", b"cores: 1\n"),)
    rc, out, err = run_vmafs("config", path, "qemu-server.conf")
    assert rc == 0, err
    assert out == b"cores: 1\n"
    rc, out, err = run_vmafs("config", path)  # the default name finds it too
    assert (rc, out) == (0, b"cores: 1\n"), err


def test_non_utf8_names_stay_raw_bytes(tmp_path: Path) -> None:
    path = hostile_archive(tmp_path / "a.vma", [(b"drive-\xff\0", CLUSTER)],
                           [(b"caf\xe9.conf\0", b"latin-1\n")])
    header = vma.decode_header(path.read_bytes())
    assert raw(header.devices[0].name) == b"drive-\xff"
    assert os.fsencode(header.configs[0][0]) == b"caf\xe9.conf"
    assert "\ufffd" not in header.configs[0][0]
    # `vmafs config NAME` matches by bytes: argv carries the raw byte
    rc, out, err = run_vmafs("config", path, os.fsdecode(b"caf\xe9.conf"))
    assert (rc, out) == (0, b"latin-1\n"), err
    rc, _, err = run_vmafs("config", path, "café.conf")  # the UTF-8 spelling is another name
    line = assert_one_line_error(rc, err, "café.conf", "caf\\xe9.conf")
    assert "\ufffd" not in line
    # extract writes the raw bytes as the file name, -d matches by bytes
    rc, _, err = run_vmafs("extract", "-q", "-d", os.fsdecode(b"drive-\xff"), path,
                           tmp_path / "x")
    assert rc == 0, err
    assert sorted(os.listdir(os.fsencode(tmp_path / "x"))) == [b"caf\xe9.conf",
                                                               b"disk-drive-\xff.raw"]


def test_blobs_without_final_nul(tmp_path: Path) -> None:
    """get_header_str: a device whose name blob lacks the final NUL does not exist; a config
    name like that makes the archive invalid (vma-reader.c says the same)."""
    path = hostile_archive(tmp_path / "a.vma", [(b"drive-scsi0\0", CLUSTER),
                                                (b"drive-scsi1x", CLUSTER)], [])
    header = vma.decode_header(path.read_bytes())
    assert [d.name for d in header.devices] == ["drive-scsi0"]
    bad = hostile_archive(tmp_path / "b.vma", [(b"drive-scsi0\0", CLUSTER)],
                          [(b"qemu-server.confx", b"")])
    with pytest.raises(FormatError, match="vma contains invalid data pointers"):
        vma.decode_header(bad.read_bytes())
    rc, _, err = run_vmafs("list", bad)
    assert_one_line_error(rc, err, "invalid data pointers")


def test_slash_in_device_name_is_accepted_and_sanitised(tmp_path: Path) -> None:
    """Proxmox's list shows it and its extract fails; vmafs reads it and names the file
    disk-a_b.raw in extract and in the mount alike (documented in the README)."""
    path = hostile_archive(tmp_path / "a.vma", [(b"../../etc/x\0", CLUSTER)],
                           [(b"../evil\0", b"e")])
    rc, out, err = run_vmafs("list", path)
    assert rc == 0, err
    assert b"devname: ../../etc/x\n" in out
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "x")) == [".._evil", "disk-.._.._etc_x.raw"]
    assert (tmp_path / "x" / "disk-.._.._etc_x.raw").read_bytes() == b"\x01" * CLUSTER
    assert not (tmp_path / "evil").exists() and not (tmp_path / "etc").exists()


# --- extract and mount agree on names -----------------------------------------------------------


def test_configs_that_sanitise_alike_are_all_extracted(tmp_path: Path) -> None:
    """Two configs whose names sanitise to the same file: extract writes both (the second as
    NAME~2), and the mount's layout gives exactly the same names."""
    path = hostile_archive(tmp_path / "a.vma", [(b"drive-scsi0\0", CLUSTER)],
                           [(b"a/b.conf\0", b"one"), (b"a_b.conf\0", b"two"),
                            (b"a\nb.conf\0", b"three")])
    rc, out, err = run_vmafs("extract", "-q", "--json", path, tmp_path / "x")
    assert rc == 0, err
    files = {n: (tmp_path / "x" / n).read_bytes() for n in os.listdir(tmp_path / "x")}
    assert files == {"disk-drive-scsi0.raw": b"\x01" * CLUSTER, "a_b.conf": b"one",
                     "a_b.conf~2": b"two", "a_b.conf~3": b"three"}
    summary = json.loads(out)
    assert [(c["name"], c["file"]) for c in summary["configs"]] == [
        ("a/b.conf", "a_b.conf"), ("a_b.conf", "a_b.conf~2"), ("a\nb.conf", "a_b.conf~3")]
    assert summary["devices"] == [{"name": "drive-scsi0", "device_bytes": CLUSTER,
                                   "file": "disk-drive-scsi0.raw"}]
    archive = Archive.open(str(path))
    try:
        entries = layout(archive.devices, archive.configs)
    finally:
        archive.close()
    assert sorted(e.name for e in entries) == sorted(os.fsencode(n) for n in files)
    assert {e.name: e.data for e in entries if not e.dev_id} == {
        os.fsencode(n): d for n, d in files.items() if not n.startswith("disk-")}


def test_layout_takes_pairs_with_duplicate_names() -> None:
    """A sequence of (name, data) keeps duplicate names apart (a dict would drop one)."""
    entries = layout([], [("qemu-server.conf", b"1"), ("qemu-server.conf", b"2")])
    assert [(e.name, e.data) for e in entries] == [(b"qemu-server.conf", b"1"),
                                                  (b"qemu-server.conf~2", b"2")]


# --- list ---------------------------------------------------------------------------------------


def test_list_escapes_hostile_names(tmp_path: Path) -> None:
    path = hostile_archive(
        tmp_path / "a.vma",
        [(b"x\nDEV: dev_id=9 size: 1 devname: forged\0", CLUSTER), (b"\x1b[31mred\0", CLUSTER),
         (b"raw\xff\0", CLUSTER)],
        [(b"qemu-server.conf\nCFG: size: 1 name: fake\0", b"c"), (b"\x1b]0;t\x07\0", b"")])
    rc, out, err = run_vmafs("list", path)
    assert rc == 0, err
    text = out.decode("ascii")  # nothing but escaped text reaches the terminal
    lines = text.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["CFG", "CFG", "DEV", "DEV", "DEV", "CTIME"]
    assert "\x1b" not in text and "\x07" not in text
    assert lines[0] == "CFG: size: 1 name: qemu-server.conf\\nCFG: size: 1 name: fake"
    assert lines[1] == "CFG: size: 0 name: \\x1b]0;t\\x07"
    assert lines[2] == ("DEV: dev_id=1 size: 65536 devname: "
                        "x\\nDEV: dev_id=9 size: 1 devname: forged")
    assert lines[3] == "DEV: dev_id=2 size: 65536 devname: \\x1b[31mred"
    assert lines[4] == "DEV: dev_id=3 size: 65536 devname: raw\\xff"
    rc, out, err = run_vmafs("list", "--json", path)
    assert rc == 0, err
    info = json.loads(out)
    assert [d["name"] for d in info["devices"]] == [
        "x\nDEV: dev_id=9 size: 1 devname: forged", "\x1b[31mred", "raw\ufffd"]
    assert info["devices"][2]["name_hex"] == b"raw\xff".hex()
    assert "name_hex" not in info["devices"][0]
    assert [c["name"] for c in info["configs"]] == [
        "qemu-server.conf\nCFG: size: 1 name: fake", "\x1b]0;t\x07"]
    # errors that name things escape them too
    rc, _, err = run_vmafs("config", path, "nope")
    line = assert_one_line_error(rc, err, "\\x1b]0;t\\x07")
    assert "\x1b" not in line


@pytest.mark.parametrize("ctime", [1 << 62, -(1 << 62), (1 << 63) - 1, -(1 << 63), -1])
def test_list_any_ctime(ctime: int, tmp_path: Path) -> None:
    """ctime is any int64: list prints it as a number where the platform cannot format it,
    and every other command accepts the archive as well."""
    path = hostile_archive(tmp_path / "a.vma", [(b"drive-scsi0\0", CLUSTER)], [],
                           ctime=ctime)
    rc, out, err = run_vmafs("list", path)
    assert rc == 0, err
    last = out.decode().splitlines()[-1]
    assert last.startswith("CTIME: ")
    if abs(ctime) >= 1 << 62:
        assert last == f"CTIME: {ctime}"
    else:
        assert last == "CTIME: " + time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(ctime))
    rc, out, err = run_vmafs("list", "--json", path)
    assert rc == 0 and json.loads(out)["ctime"] == ctime, err
    assert run_vmafs("verify", path)[0] == 0
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 0, err
