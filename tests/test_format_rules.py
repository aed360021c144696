"""One rule set for every command (issue 13, items 3, 7 and 13): crafted archives through the
real `vmafs` command. Each bad archive is refused by verify, extract, list, convert and merge
(and, for two devices with one name, a real mount) with the same one line and exit 3; what
Proxmox's reader accepts stays accepted, and convert carries it over.

Archives are crafted the way a forger would: written by vmafs, then one header field is
changed and the header resealed (its md5, and the header digest the index carries), so the
rule under test is the only one broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from archive_helpers import reseal_header
from conftest import assert_one_line_error, fuse_missing, run_vmafs

from vmafs.archive.chain import link_to
from vmafs.archive.reader import Archive
from vmafs.archive.scan import scan_stream
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.errors import FormatError
from vmafs.format import chain, vma

C = 65536
ODD = 536_832        # 1048.5 sectors: Proxmox's max_sector is 1048 (536,576 bytes)
WHOLE = 540_672      # ODD rounded up to a whole 4 KiB block
DEVS = [("drive-scsi0", 4 * C), ("drive-scsi1", WHOLE)]
CONF = ("qemu-server.conf", b"cores: 1\n")


def write(path: Path, devices: list[tuple[str, int]], configs: list[tuple[str, bytes]], *,
          incremental: bool = False, tail: bool = True) -> None:
    """Every device: its first cluster of 0x11.., and (`tail`) the last 4 KiB block of a
    device of WHOLE bytes, which holds data."""
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec(n, s) for n, s in devices], configs,
                          incremental=range(1, len(devices) + 1) if incremental else ())
        for dev_id, (_, size) in enumerate(devices, start=1):
            w.write(dev_id, 0, bytes([0x11 * dev_id]) * C)
            if tail and size == WHOLE:
                w.write(dev_id, WHOLE - 4096, b"\x77" * 4096)
        w.finish()


@dataclass
class Pair:
    """A full archive and an incremental child of it, in one directory."""

    base: Path
    child: Path


def make_pair(directory: Path, devices: list[tuple[str, int]] = DEVS, *,
              tail: bool = True) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    base, child = directory / "base.vma", directory / "child.vma"
    write(base, devices, [CONF], tail=tail)
    with Archive.open(str(base)) as parent:
        record = chain.encode(chain.ChainRecord(parent=link_to(parent)))
    with open_output(str(child)) as out:
        w = ArchiveWriter(out, [DeviceSpec(n, s) for n, s in devices],
                          [CONF, (chain.CONFIG_NAME, record)],
                          incremental=range(1, len(devices) + 1), ctime=2_000_000_000)
        w.write(1, C, b"\x42" * C)
        w.finish()
    return Pair(base, child)


def header_field(path: Path, edit: object) -> None:
    """Apply edit(bytearray of the whole file, blob offset) and reseal the header."""
    data = bytearray(path.read_bytes())
    edit(data, struct.unpack_from(">I", data, 48)[0])  # type: ignore[operator]
    reseal_header(data)
    path.write_bytes(data)


def rename_device(path: Path, dev_id: int, name: bytes) -> None:
    def edit(data: bytearray, blob_off: int) -> None:
        at = blob_off + struct.unpack_from(">I", data, 4096 + 32 * dev_id)[0]
        assert int.from_bytes(data[at:at + 2], "little") == len(name) + 1
        data[at + 2:at + 3 + len(name)] = name + b"\0"
    header_field(path, edit)


def resize_device(path: Path, dev_id: int, size: int) -> None:
    def edit(data: bytearray, _: int) -> None:
        struct.pack_into(">Q", data, 4096 + 32 * dev_id + 8, size)
    header_field(path, edit)


def run_all(runs: dict[str, tuple[str | os.PathLike[str], ...]]
            ) -> dict[str, tuple[int, bytes, str]]:
    """Independent `vmafs` commands side by side (each a real process; most of their time is
    the interpreter starting)."""
    with ThreadPoolExecutor(4) as pool:
        done = {what: pool.submit(run_vmafs, *args) for what, args in runs.items()}
        return {what: future.result() for what, future in done.items()}


def refused_by_every_command(path: Path, tmp: Path, *fragments: str,
                             merge: Path | None = None, header: bool = True) -> None:
    """verify, extract, list, convert (and merge of `merge`, a chain's newest archive): the
    same one line naming the problem, exit 3, nothing written. `header=False`: a rule of the
    extents, which list (like `vma list`) does not read."""
    runs = {
        "verify": ("verify", path),
        "extract": ("extract", "-q", path, tmp / "x"),
        "convert": ("convert", "-q", path, tmp / "out.vma"),
    }
    if header:
        runs["list"] = ("list", path)
    if merge is not None:
        runs["merge"] = ("merge", "-q", "-o", tmp / "merged.vma", merge)
    for what, (rc, _, err) in run_all(runs).items():
        assert rc == 3, (what, rc, err)
        assert_one_line_error(rc, err, *fragments)
    assert not (tmp / "x").exists() or not os.listdir(tmp / "x")
    assert not (tmp / "out.vma").exists() and not (tmp / "merged.vma").exists()


# --- item 3: a chain record nested deeply ---------------------------------------------------


def test_deeply_nested_chain_record_is_one_line(tmp_path: Path) -> None:
    """json.loads would recurse until RecursionError: the nesting is checked first."""
    nested = (b'{"vmafs-chain": 1, "parent": ' + b"[" * 30000 + b"]" * 30000 + b"}")
    assert len(nested) <= vma.MAX_BLOB_SIZE
    bad = tmp_path / "bad.vma"
    write(bad, DEVS, [CONF, (chain.CONFIG_NAME, nested)])
    with pytest.raises(FormatError, match="nested too deeply"):
        chain.decode(nested)
    pair = make_pair(tmp_path / "merge")
    child = bytearray(pair.child.read_bytes())
    record_at = child.index(b'{\n "vmafs-chain"')
    size = int.from_bytes(child[record_at - 2:record_at], "little")
    flat = b'{"vmafs-chain":1,"stands-for":' + b"[" * 40 + b"]" * 40 + b"}"
    child[record_at:record_at + size] = flat.ljust(size, b" ")
    reseal_header(child)
    pair.child.write_bytes(bytes(child))
    refused_by_every_command(bad, tmp_path, "vmafs-chain.json is nested too deeply",
                             merge=pair.child)


def test_nested_record_in_a_sibling_does_not_stop_a_chain(tmp_path: Path) -> None:
    """The parent is looked for among every archive of the directory: one whose record is
    damaged is just unreadable there, and the chain still reads."""
    pair = make_pair(tmp_path / "d")
    nested = b'{"vmafs-chain": 1, "parent": ' + b"{" * 20000 + b"}" * 20000 + b"}"
    write(pair.base.parent / "other.vma", DEVS, [CONF, (chain.CONFIG_NAME, nested)])
    done = run_all({"verify": ("verify", pair.child), "list": ("list", pair.child),
                    "extract": ("extract", "-q", pair.child, tmp_path / "x"),
                    "merge": ("merge", "-q", "-o", tmp_path / "m.vma", pair.child),
                    "prune": ("prune", "-n", pair.base.parent, "--keep-last", "1")})
    for what, (rc, _, err) in done.items():
        assert "Traceback" not in err and "RecursionError" not in err, (what, err)
        assert rc == 0 or what == "prune", (what, err)
    # with its parent gone, the one line names what is missing (and what could not be read)
    pair.base.unlink()
    rc, _, err = run_vmafs("verify", pair.child)
    assert_one_line_error(rc, err, "needs its parent")


# --- item 7: two devices with one name ------------------------------------------------------


def test_duplicate_device_names_are_refused_by_every_reader(tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "d")
    rename_device(pair.base, 2, b"drive-scsi0")
    rename_device(pair.child, 2, b"drive-scsi0")
    refused_by_every_command(pair.base, tmp_path, "two devices named 'drive-scsi0' (ids 1 "
                             "and 2)", merge=pair.child)
    with pytest.raises(FormatError, match="two devices named"):
        Archive.open(str(pair.base))


@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
def test_duplicate_device_names_are_not_mounted(tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "d")
    rename_device(pair.base, 2, b"drive-scsi0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, _, err = run_vmafs("mount", pair.base, mnt, timeout=60)
    assert_one_line_error(rc, err, "two devices named 'drive-scsi0'")
    assert not os.path.ismount(mnt) and not os.listdir(mnt)


# --- item 13: sizes that are not whole sectors, and names -----------------------------------


def test_block_past_the_last_whole_sector_is_refused(tmp_path: Path) -> None:
    """A device of ODD bytes may not store the block at 536,576 (sector 1048 = max_sector):
    Proxmox says "write beyond end", so does every command (extract used to drop it)."""
    pair = make_pair(tmp_path / "d")
    resize_device(pair.base, 2, ODD)
    resize_device(pair.child, 2, ODD)
    refused_by_every_command(pair.base, tmp_path, "got wrong block address - write beyond end",
                             "drive-scsi1", merge=pair.child, header=False)


def test_odd_size_without_that_block_is_accepted_and_converted(tmp_path: Path) -> None:
    """The same odd size with nothing stored past the last whole sector: Proxmox accepts it,
    so verify, extract, list and convert do (and the converted archive verifies)."""
    pair = make_pair(tmp_path / "d", tail=False)
    resize_device(pair.base, 2, ODD)
    done = run_all({"verify": ("verify", pair.base),
                    "extract": ("extract", "-q", pair.base, tmp_path / "x"),
                    "list": ("list", "--json", pair.base),
                    "convert": ("convert", "-q", pair.base, tmp_path / "c.vma.zst")})
    for what, (rc, _, err) in done.items():
        assert rc == 0, (what, err)
    disk = (tmp_path / "x" / "disk-drive-scsi1.raw").read_bytes()
    assert len(disk) == ODD and disk[:C] == b"\x22" * C and not any(disk[C:])
    listed = json.loads(done["list"][1])["devices"]
    assert [d.get("size", d.get("device_bytes")) for d in listed] == [4 * C, ODD]
    with Archive.open(str(tmp_path / "c.vma.zst")) as converted:
        assert converted.indexed and converted.devices[1].size == ODD
        assert bytes(converted.read(2, 0, ODD)) == disk


def test_writer_refuses_data_it_cannot_store() -> None:
    """Data in the partial last sector of an odd size: refused, never silently dropped."""
    from archive_helpers import MemOutput

    w = ArchiveWriter(MemOutput(), [DeviceSpec("drive-scsi0", ODD)])
    w.write(1, 0, b"\1" * 8 * C)
    with pytest.raises(FormatError, match="last partial sector"):
        w.write(1, 8 * C, bytes(ODD - 8 * C - 1) + b"\1")
    w = ArchiveWriter(MemOutput(), [DeviceSpec("drive-scsi0", ODD)])
    w.write(1, 0, b"\1" * 536_576)  # data up to the last whole sector is stored
    w.write_zeroes(1, 536_576, ODD - 536_576)
    w.finish()
    w = ArchiveWriter(MemOutput(), [DeviceSpec("drive-scsi0", ODD)])
    w.write_zeroes(1, 0, ODD)  # zeros there are what VMA restores anyway
    w.finish()


def test_convert_carries_every_name_a_reader_accepts(tmp_path: Path) -> None:
    """Names Proxmox's reader accepts (and vmafs verify and extract did) but vmafs would not
    give a new disk: convert and merge carry them over instead of refusing."""
    pair = make_pair(tmp_path / "d", [("drive/sc i0", 4 * C), ("drive-scsi1", WHOLE)])
    with pytest.raises(FormatError, match="invalid device name"):
        vma.check_device_name("drive/sc i0")
    data = bytearray(pair.base.read_bytes())
    at = data.index(b"qemu-server.conf\0")
    data[at:at + 17] = b"a/b\n..conf\x1b[1m\xffx\0"
    reseal_header(data)
    pair.base.write_bytes(bytes(data))
    done = run_all({"verify": ("verify", pair.base),
                    "convert": ("convert", "-q", pair.base, tmp_path / "c.vma"),
                    "merge": ("merge", "-q", "-o", tmp_path / "m.vma", pair.child)})
    for what, (rc, _, err) in done.items():
        assert rc == 0, (what, err)
    for archive in (pair.base, tmp_path / "c.vma"):
        header = vma.decode_header((archive).read_bytes())
        assert [d.name for d in header.devices] == ["drive/sc i0", "drive-scsi1"]
        assert header.configs[0][0] == os.fsdecode(b"a/b\n..conf\x1b[1m\xffx")
    with open(tmp_path / "c.vma", "rb") as f:
        assert not scan_stream(f).problems
    assert [d.name for d in vma.decode_header((tmp_path / "m.vma").read_bytes()).devices] == [
        "drive/sc i0", "drive-scsi1"]


def test_spec_vectors_keep_their_verdicts(vectors: Path, spec_manifest: dict[str, object],
                                          tmp_path: Path) -> None:
    """oddsize.vma (70,144 bytes: a partial cluster of whole sectors), which Proxmox
    accepts, still verifies and converts (the other vectors: tests/test_vectors.py)."""
    samples = spec_manifest["samples"]
    assert isinstance(samples, dict) and samples["oddsize.vma"]["expect"] == "ok"
    src = vectors / "spec" / "oddsize.vma"
    done = run_all({"verify": ("verify", src),
                    "convert": ("convert", "-q", src, tmp_path / "o.vma")})
    for what, (rc, _, err) in done.items():
        assert rc == 0, (what, err)
    with open(tmp_path / "o.vma", "rb") as f:
        result = scan_stream(f)
    assert not result.problems and result.header_digest


def test_device_255_is_no_disk(tmp_path: Path) -> None:
    """Proxmox's tools list and restore devices 1..254: a header entry at 255 is no disk, and
    data for it is "got wrong dev id 255" (vmafs used to restore it)."""
    uuid = bytes(range(16))
    head = bytearray(vma.encode_header(uuid, 0, [("drive-scsi0", C), ("drive-scsi1", C)]))
    head[4096 + 32 * 255:4096 + 32 * 256] = head[4096 + 64:4096 + 96]
    head[4096 + 64:4096 + 96] = bytes(32)
    head[32:48] = bytes(16)
    head[32:48] = hashlib.md5(head).digest()
    assert [d.dev_id for d in vma.decode_header(bytes(head)).devices] == [1]
    good = bytes(head) + vma.encode_extent_header(uuid, [(1, 0, 0)], 0)
    bad = good + vma.encode_extent_header(uuid, [(255, 0, 0xFFFF)], 16) + b"\1" * C
    (tmp_path / "good.vma").write_bytes(good)
    (tmp_path / "bad.vma").write_bytes(bad)
    done = run_all({"good": ("verify", tmp_path / "good.vma"),
                    "bad": ("verify", tmp_path / "bad.vma"),
                    "list": ("list", "--json", tmp_path / "bad.vma")})
    assert done["good"][0] == 0, done["good"]
    assert_one_line_error(done["bad"][0], done["bad"][2], "got wrong dev id 255")
    assert [d["name"] for d in json.loads(done["list"][1])["devices"]] == ["drive-scsi0"]
