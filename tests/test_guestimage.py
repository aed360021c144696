"""The real-guest fixtures work: writer guest, guest agent, latency guest, bootable disk."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestimage as gi  # noqa: E402

# -- pure helpers ------------------------------------------------------------------------------


def test_counter_record_roundtrip() -> None:
    rec = gi.counter_record(123456)
    assert len(rec) == gi.RECORD_SIZE
    assert rec.startswith(b"VMAFSCTR 0000000000123456\n")
    assert rec.endswith(b"VMAFSEND 0000000000123456\n")
    assert gi.parse_counter(rec, 0) == 123456
    disk = bytearray(gi.WRITE_REGION)
    assert gi.parse_counter(disk) is None
    disk[gi.COUNTER_OFFSET : gi.COUNTER_OFFSET + gi.RECORD_SIZE] = gi.counter_record(7)
    assert gi.parse_counter(disk) == 7


def test_counter_rejects_torn_record() -> None:
    torn = gi.counter_record(5)[:2048] + gi.counter_record(6)[2048:]
    with pytest.raises(ValueError):
        gi.parse_counter(torn, 0)
    with pytest.raises(ValueError):
        gi.parse_counter(b"\1" * gi.RECORD_SIZE, 0)


def test_parse_latencies() -> None:
    log = "junk\nVMAFS-LAT 120\r\nVMAFS-LAT 7\nVMAFS-LATX 9\nVMAFS-DONE\n"
    assert gi.parse_latencies(log) == [120, 7]


# -- real guests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    t0 = time.monotonic()
    g = gi.guest_or_skip()
    print(f"guest ready in {time.monotonic() - t0:.1f} s (build {g.build_seconds:.1f} s)")
    return g


def _allocated_extents(image: Path) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(out) if e["data"]]


def test_writer_guest(guest: gi.Guest, tmp_path: Path) -> None:
    a = gi.create_disk(tmp_path / "a.qcow2", 32 << 20)
    b = gi.create_disk(tmp_path / "b.qcow2", 32 << 20)
    disks = [gi.Disk(a), gi.Disk(b, style="blockdev")]
    with gi.QemuVM(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.cmdline("writer"),
        disks=disks,
        qga=True,
    ) as vm:
        boot = vm.wait_for("VMAFS-READY", timeout=180)
        print(f"writer guest: VMAFS-READY after {boot:.1f} s")
        assert vm.qga("guest-ping") == {}
        info = vm.qga("guest-info")
        assert info["version"].startswith("7.")
        # freeze/thaw must answer (nothing to freeze in an initramfs guest)
        assert isinstance(vm.qga("guest-fsfreeze-freeze"), int)
        assert isinstance(vm.qga("guest-fsfreeze-thaw"), int)
        # both naming styles are visible to QMP
        block = {d["qdev"]: d for d in vm.qmp("query-block")}
        assert block["/machine/peripheral/virtio0/virtio-backend"]["device"] == "drive-virtio0"
        assert block["/machine/peripheral/virtio1/virtio-backend"]["inserted"]["node-name"] == (
            "node-virtio1"
        )
        # the counter advances
        vm.wait_for(f"VMAFS-COUNT {gi.REPORT_EVERY}", timeout=60)
        vm.wait_for(f"VMAFS-COUNT {3 * gi.REPORT_EVERY}", timeout=60)
        vm.stop()
        assert not vm.running()
    ca, cb = gi.read_counter(a, "qcow2"), gi.read_counter(b, "qcow2")
    print(f"counters after stop: vda={ca} vdb={cb}")
    assert ca is not None and cb is not None
    assert ca >= 3 * gi.REPORT_EVERY
    assert cb in (ca, ca - 1)
    for img in (a, b):
        extents = _allocated_extents(img)
        assert extents, "nothing written"
        assert max(end for _, end in extents) <= gi.WRITE_REGION


def test_latency_guest_and_drive_options(guest: gi.Guest, tmp_path: Path) -> None:
    """Latency mode; read-only drive and CD-ROMs (with and without medium) in the same VM."""
    disk = gi.create_disk(tmp_path / "lat.qcow2", 32 << 20)
    ro = gi.create_disk(tmp_path / "ro.raw", 1 << 20, fmt="raw")
    iso = gi.create_disk(tmp_path / "cd.iso", 1 << 20, fmt="raw")
    disks = [
        gi.Disk(disk, style="blockdev", cache="none"),
        gi.Disk(ro, fmt="raw", readonly=True),
        gi.Disk(iso, fmt="raw", media="cdrom"),
        gi.Disk(None, media="cdrom"),
    ]
    with gi.QemuVM(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.cmdline("latency", count=20, interval_ms=5),
        disks=disks,
    ) as vm:
        vm.wait_for("VMAFS-READY", timeout=180)
        block = {d["device"] or d["qdev"]: d for d in vm.qmp("query-block")}
        assert block["drive-virtio1"]["inserted"]["ro"] is True
        assert block["drive-ide2"]["removable"] is True
        assert block["drive-ide2"]["inserted"]["file"] == str(iso)
        assert "inserted" not in block["drive-ide3"]
        vm.wait_for("VMAFS-DONE", timeout=120)
        lat = gi.parse_latencies(vm.serial())
    assert len(lat) == 20
    assert all(x >= 0 for x in lat)
    print(f"latency guest: median write {sorted(lat)[10]} us")


def test_kill_cleans_up(guest: gi.Guest) -> None:
    vm = gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline("idle"))
    with vm:
        pid = vm.pid
        vm.kill()
        assert not vm.running()
        with pytest.raises(gi.GuestError):
            vm.wait_for("VMAFS-READY", timeout=5)
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not vm.workdir.exists()


def test_boot_disk(tmp_path: Path) -> None:
    image = gi.boot_disk_or_skip()
    data = image.read_bytes()
    assert len(data) == gi.BOOT_DISK_SIZE
    assert data[510:512] == b"\x55\xaa"
    status, lba, sectors = struct.unpack_from("<B7xII", data, 446)
    assert status == 0x80
    assert lba * 512 == gi.BOOT_PARTITION_OFFSET
    assert sectors * 512 == gi.BOOT_PARTITION_SIZE
    with gi.QemuVM(disks=[gi.Disk(image, fmt="raw", snapshot=True)]) as vm:
        boot = vm.wait_for(gi.BOOT_MARKER, timeout=180)
        print(f"boot disk: {gi.BOOT_MARKER} after {boot:.1f} s")
        assert vm.wait_exit(timeout=60) == 0
    if os.geteuid() == 0:
        _check_boot_files(image, tmp_path / "mnt")


def _check_boot_files(image: Path, mnt: Path) -> None:
    mnt.mkdir()
    loop = subprocess.run(
        [
            "losetup",
            "-f",
            "--show",
            "-r",
            "-o",
            str(gi.BOOT_PARTITION_OFFSET),
            "--sizelimit",
            str(gi.BOOT_PARTITION_SIZE),
            str(image),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
        try:
            for name, content in gi.boot_disk_files().items():
                assert (mnt / name.lstrip("/")).read_bytes() == content
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
