"""`vmafs boot`: the qemu-server.conf -> QEMU command line rules (pure, over the Proxmox
vectors and hand-written configs), each vector's command line accepted by the real QEMU with
its disks seen by the firmware, the test guest booted with --check, and a disk that does not
boot failing within the timeout. The archives' sha256 never changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import guestimage as gi
import pytest

from vmafs.archive.chain import open_chain
from vmafs.boot import qemuconf
from vmafs.boot.qemuconf import BootDisk, build, parse

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "proxmox"
PLAIN = sorted(p.name for p in VECTORS.glob("*.vma"))

needs_qemu = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-system-x86_64")),
    reason="needs qemu-img and qemu-system-x86_64")


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _vector_plan(name: str) -> qemuconf.Plan:
    with open_chain(str(VECTORS / name)) as archive:
        conf = dict(archive.configs).get("qemu-server.conf")
        cfg = parse(conf.decode()) if conf is not None else qemuconf.VmConfig()
        disks = []
        for d in sorted(archive.devices, key=lambda d: d.dev_id):
            key = qemuconf.disk_key(d.name)
            assert key is not None
            disks.append(BootDisk(key, f"/o/{key}.qcow2", size=d.size))
    return build(cfg, disks, accel="tcg", qmp="/s/qmp", serial="/s/serial", qga="/s/qga")


def test_vector_command_lines() -> None:
    """Every Proxmox vector's config and disks as QEMU arguments."""
    two = _vector_plan("sample-2disks.vma").argv
    assert _option(two, "-m") == "2048" and _option(two, "-name") == "guest=vmatest"
    assert _option(two, "-smp") == "2,sockets=1,cores=2"
    assert _option(two, "-machine") == "pc,accel=tcg"
    assert _devices(two) == [
        "lsi53c895a,id=scsihw0",
        "scsi-hd,bus=scsihw0.0,scsi-id=0,drive=drive-scsi0,id=scsi0,bootindex=100",
        "scsi-hd,bus=scsihw0.0,scsi-id=1,drive=drive-scsi1,id=scsi1"]
    assert "file=/o/scsi0.qcow2,format=qcow2,if=none,id=drive-scsi0,cache=unsafe," \
        "discard=unmap" in two
    assert two[-2:] == ["-nic", "none"] and "-netdev" not in two
    assert "pflash" not in " ".join(two)
    legacy = _vector_plan("sample-legacy-positional.vma")
    assert _option(legacy.argv, "-m") == "2048"
    assert "scsi1 is in the config but not in the archive" in legacy.notes
    bare = _vector_plan("sample-1disk-nocfg.vma").argv
    assert _option(bare, "-m") == "512" and _option(bare, "-smp") == "1,sockets=1,cores=1"
    assert _devices(bare)[-1].endswith("id=scsi0,bootindex=100")   # the only disk boots
    sata = _vector_plan("sample-odd-size-1000b.vma").argv
    assert _devices(sata) == ["ahci,id=ahci0",
                              "ide-hd,bus=ahci0.0,drive=drive-sata0,id=sata0,bootindex=100"]


def test_config_rules() -> None:
    """Buses, controllers, firmware, boot order, machine, agent and network."""
    cfg = parse("""# comment
name: web
memory: 4096
sockets: 2
cores: 4
machine: pc-q35-8.1+pve0
bios: ovmf
scsihw: virtio-scsi-single
agent: enabled=1,fstrim_cloned_disks=1
boot: order=virtio1;scsi0;net0
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
efidisk0: local:vm-1-disk-9,efitype=4m,size=528K
scsi0: local:vm-1-disk-0,size=8G
virtio1: local:vm-1-disk-1,size=8G
ide0: local:vm-1-disk-2,size=1G
ide2: none,media=cdrom
sata3: local:vm-1-disk-3,size=1G

[snap1]
memory: 1
""")
    assert (cfg.memory, cfg.sockets, cfg.cores, cfg.machine, cfg.bios, cfg.agent) == \
        (4096, 2, 4, "q35", "ovmf", True)
    disks = [BootDisk("efidisk0", "/o/e", size=540672), BootDisk("scsi0", "/o/s"),
             BootDisk("virtio1", "/o/v"), BootDisk("ide0", "/o/i"), BootDisk("sata3", "/o/a")]
    argv = build(cfg, disks, accel="kvm", qga="/s/qga", net=True).argv
    text = " ".join(argv)
    assert _option(argv, "-smp") == "8,sockets=2,cores=4" and _option(argv, "-cpu") == "host"
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" \
        in argv
    assert "if=pflash,unit=1,format=qcow2,id=drive-efidisk0,file=/o/e" in argv
    devs = _devices(argv)
    assert "virtio-scsi-pci,id=virtioscsi0" in devs
    assert "scsi-hd,bus=virtioscsi0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0," \
        "bootindex=101" in devs
    assert "virtio-blk-pci,drive=drive-virtio1,id=virtio1,bootindex=100" in devs
    assert "ide-hd,bus=ide.0,drive=drive-ide0,id=ide0" in devs         # q35: AHCI ports
    assert "ide-hd,bus=ahci0.3,drive=drive-sata3,id=sata3" in devs
    assert "virtio-net-pci,netdev=net0,id=net0,mac=BC:24:11:00:00:01,bootindex=102" in devs
    assert "user,id=net0" in argv and "bridge" not in text and "tap" not in text
    assert "name=org.qemu.guest_agent.0" in text and "path=/s/qga" in text
    # legacy boot keys, i440fx ide units, SeaBIOS, no agent, no network unless asked
    old = parse("boot: cdn\nbootdisk: ide1\nide1: x,size=1G\nnet0: e1000=BC:24:11:00:00:02\n"
                "agent: 0\nmemory: nonsense\n")
    assert old.boot_order == ["ide1", "net0"] and not old.agent and old.memory == 512
    plan = build(old, [BootDisk("ide1", "/o/i")], qga="/s/qga")
    assert "ide-hd,bus=ide.0,unit=1,drive=drive-ide1,id=ide1,bootindex=100" in plan.argv
    assert "pflash" not in " ".join(plan.argv) and "guest_agent" not in " ".join(plan.argv)
    assert plan.argv[-2:] == ["-nic", "none"]
    assert any("memory" in n for n in plan.notes)
    assert qemuconf.disk_key("drive-efidisk0") == "efidisk0"
    assert qemuconf.disk_key("disk0") is None


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}


def _boot(tmp: Path, *args: str | os.PathLike[str], timeout: float = 180
          ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    (tmp / "t").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "vmafs", "boot", "--check", "--json",
                        "--accel", "tcg", *map(str, args)], capture_output=True, text=True,
                       env=_env(tmp / "t"), timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp / "t") == []     # overlays, sockets, logs: all removed
    return r, json.loads(r.stdout.strip().splitlines()[-1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_qemu
@pytest.mark.parametrize("name", PLAIN)
def test_vector_command_line_runs(name: str, tmp_path: Path) -> None:
    """The real QEMU accepts each vector's command line and its firmware reads the disks
    (they hold no OS: not up, within the timeout, QEMU not failed)."""
    before = _sha(VECTORS / name)
    r, out = _boot(tmp_path, VECTORS / name, "--timeout", "3")
    assert r.returncode == 1 and out["ok"] is False and out["up"] is False
    assert out["reason"] == "the guest did not come up within 3 s", (out, r.stderr)
    if "odd-size" not in name:   # a 1000-byte disk: SeaBIOS may skip it
        assert out["first_read_seconds"] is not None
    assert _sha(VECTORS / name) == before


@needs_qemu
def test_boot_check(tmp_path: Path) -> None:
    """The test guest comes up (console marker); a disk that does not boot fails in time."""
    try:
        disk = gi.build_boot_disk()
    except gi.GuestUnavailable as exc:
        pytest.skip(str(exc))
    archive = tmp_path / "boot.vma.zst"
    subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", archive,
                    f"drive-virtio0={disk}"], check=True, env=_env(tmp_path))
    sha = _sha(archive)
    r, out = _boot(tmp_path, archive, "--expect", gi.BOOT_MARKER, "--timeout", "120")
    assert r.returncode == 0 and out["ok"] is True and out["up"] is True, (out, r.stderr)
    assert out["by"] == "serial" and 0 < out["first_read_seconds"] <= out["up_seconds"]
    assert "UP: the console matched" in r.stderr
    assert _sha(archive) == sha

    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(16 << 20)
    dead = tmp_path / "dead.vma"
    subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", dead,
                    f"drive-virtio0={blank}"], check=True, env=_env(tmp_path))
    start = time.monotonic()
    r, out = _boot(tmp_path, dead, "--expect", gi.BOOT_MARKER, "--timeout", "5")
    assert r.returncode == 1 and out["up"] is False
    assert time.monotonic() - start < 5 + 15
    assert "NOT UP: the guest did not come up within 5 s" in r.stderr


def test_boot_usage_errors(tmp_path: Path) -> None:
    for args in (["--expect", "x", str(VECTORS / PLAIN[0])],
                 ["--check", "--timeout", "0", str(VECTORS / PLAIN[0])],
                 ["--check", "--expect", "(", str(VECTORS / PLAIN[0])]):
        r = subprocess.run([sys.executable, "-m", "vmafs", "boot", *args],
                           capture_output=True, text=True, env=_env(tmp_path), timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "vmafs", "boot", "--check",
                        str(tmp_path / "missing.vma")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr


@needs_qemu
def test_boot_check_guest_agent(tmp_path: Path) -> None:
    """A VM with `agent: 1` is up when its guest agent answers guest-ping (the test guest's
    kernel given through the QEMU arguments after --; it runs qemu-ga on the port)."""
    guest = gi.guest_or_skip()
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(16 << 20)
    conf = tmp_path / "101.conf"
    conf.write_text("agent: 1\nmemory: 256\nvirtio0: local:vm-101-disk-0,size=16M\n")
    archive = tmp_path / "agent.vma"
    subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", archive, "-c", conf,
                    f"drive-virtio0={blank}"], check=True, env=_env(tmp_path))
    r, out = _boot(tmp_path, archive, "--timeout", "120", "--", "-kernel", guest.kernel,
                   "-initrd", guest.initrd, "-append", guest.cmdline("idle"))
    assert r.returncode == 0 and out["up"] is True and out["by"] == "guest-agent", \
        (out, r.stderr)
    assert "-m" in out["qemu"] and out["qemu"][out["qemu"].index("-m") + 1] == "256"
    assert "UP: the guest agent answered" in r.stderr
