"""A Proxmox `qemu-server.conf` and an archive's disks -> a QEMU command line. Pure: no I/O,
so every rule is unit-tested over the vectors.

Only what makes the VM boot as it did is honoured: memory, sockets x cores, machine type,
firmware (SeaBIOS, or OVMF with the archived EFI vars), the disks on the bus their names say
(scsi with the configured controller, virtio, sata, ide), the boot order and the guest agent.
Network devices are left out unless asked for, and then get user-mode networking only: a
restore test must not appear on the production network. What is not honoured becomes a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_MEMORY = 512        # MiB, Proxmox's default
OVMF_DIR = "/usr/share/OVMF"
BUSES = ("scsi", "virtio", "sata", "ide")
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
              "rtl8139": "rtl8139", "vmxnet3": "vmxnet3"}
SCSI_HW = {"lsi": "lsi53c895a", "lsi53c810": "lsi53c810", "megasas": "megasas",
           "pvscsi": "pvscsi", "virtio-scsi-pci": "virtio-scsi-pci",
           "virtio-scsi-single": "virtio-scsi-pci"}


@dataclass
class VmConfig:
    """The parts of a qemu-server.conf that decide how the VM boots."""

    name: str | None = None
    memory: int = DEFAULT_MEMORY
    cores: int = 1
    sockets: int = 1
    machine: str = "pc"
    bios: str = "seabios"
    scsihw: str = "lsi"
    boot_order: list[str] = field(default_factory=list)
    agent: bool = False
    nets: dict[str, str] = field(default_factory=dict)     # net0 -> its option string
    drives: dict[str, str] = field(default_factory=dict)   # scsi0 -> its option string
    notes: list[str] = field(default_factory=list)


@dataclass
class BootDisk:
    """One archived disk as the VM gets it: the key (scsi0, efidisk0) and its image."""

    key: str
    path: str
    fmt: str = "qcow2"
    size: int = 0


@dataclass
class Plan:
    """The QEMU command line made from an archive's config, and what it could not carry over."""

    argv: list[str]
    notes: list[str]


def _options(value: str) -> dict[str, str]:
    """Proxmox's "a=b,c=d" (a bare first item is keyed by "")."""
    out: dict[str, str] = {}
    for i, item in enumerate(value.split(",")):
        key, sep, val = item.partition("=")
        if sep:
            out[key.strip()] = val.strip()
        elif i == 0 and item.strip():
            out[""] = item.strip()
    return out


def _int(key: str, value: str, low: int, notes: list[str], default: int) -> int:
    try:
        n = int(value)
    except ValueError:
        notes.append(f"{key}: {value!r} is not a number; {default} used")
        return default
    return max(n, low)


def parse(text: str) -> VmConfig:
    """The VM's current config (the part before any [snapshot] section)."""
    cfg = VmConfig()
    legacy_boot = bootdisk = None
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("["):
            break
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "name":
            if value.isprintable():
                cfg.name = value
            else:  # a NUL cannot even be a QEMU argument
                cfg.notes.append("name: not printable; the VM is named vmafs-boot")
        elif key == "memory":
            cfg.memory = _int(key, value, 16, cfg.notes, DEFAULT_MEMORY)
        elif key == "cores":
            cfg.cores = _int(key, value, 1, cfg.notes, 1)
        elif key == "sockets":
            cfg.sockets = _int(key, value, 1, cfg.notes, 1)
        elif key == "machine":
            cfg.machine = machine_type(_options(value).get("type")
                                       or _options(value).get("", "pc"))
        elif key == "bios":
            cfg.bios = "ovmf" if value == "ovmf" else "seabios"
        elif key == "scsihw":
            cfg.scsihw = value if value in SCSI_HW else "lsi"
            if value not in SCSI_HW:
                cfg.notes.append(f"scsihw {value} is not known here; lsi used")
        elif key == "boot":
            opts = _options(value)
            if "order" in opts:
                cfg.boot_order = [k for k in opts["order"].split(";") if k]
            else:
                legacy_boot = opts.get("", value)
        elif key == "bootdisk":
            bootdisk = value
        elif key == "agent":
            opts = _options(value)
            cfg.agent = (opts.get("enabled", opts.get("", "0")) in ("1", "on", "yes", "true"))
        elif re.fullmatch(r"net\d+", key):
            cfg.nets[key] = value
        elif re.fullmatch(r"(scsi|virtio|sata|ide|efidisk|tpmstate)\d+", key):
            cfg.drives[key] = value
    if not cfg.boot_order and (legacy_boot is not None or bootdisk):
        # "boot: cdn" + "bootdisk: scsi0": disk (the bootdisk) before cdrom before network
        order = []
        for c in legacy_boot or "c":
            if c == "c" and bootdisk:
                order.append(bootdisk)
            elif c == "d":
                order += [k for k, v in cfg.drives.items() if "media=cdrom" in v]
            elif c == "n":
                order += list(cfg.nets)
        cfg.boot_order = order
    return cfg


def machine_type(value: str) -> str:
    """Proxmox's machine (pc-q35-8.1+pve0, q35, pc-i440fx-7.2, pc) as this QEMU knows it:
    the family, since a newer versioned type may not exist here."""
    return "q35" if "q35" in value else "pc"


def disk_key(device_name: str) -> str | None:
    """drive-scsi0 -> scsi0; None for a name that is no Proxmox drive."""
    m = re.fullmatch(r"drive-((?:scsi|virtio|sata|ide|efidisk|tpmstate)\d+)", device_name)
    return m.group(1) if m else None


def _q(value: str) -> str:
    return value.replace(",", ",,")


def build(cfg: VmConfig, disks: list[BootDisk], *, accel: str = "tcg",
          qmp: str | None = None, serial: str | None = None, qga: str | None = None,
          net: bool = False, headless: bool = True, name: str = "vmafs-boot") -> Plan:
    """The QEMU argv (without extra user arguments) that boots `disks` as `cfg` says.
    serial: a file for the console (None: on stdio); qga: the agent's socket if the VM has
    one; accel kvm or tcg."""
    notes = list(cfg.notes)
    # the archive's VM name as the value of guest=: bare, "process=x" or "debug-threads=on"
    # in a crafted config would be read by QEMU as those options
    argv = ["qemu-system-x86_64", "-name", f"guest={_q(cfg.name or name)}", "-nodefaults",
            "-no-user-config", "-machine", f"{cfg.machine},accel={accel}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-m", str(cfg.memory),
            "-smp", f"{cfg.sockets * cfg.cores},sockets={cfg.sockets},cores={cfg.cores}"]
    argv += ["-display", "none"] if headless else ["-vga", "std"]
    if serial is not None:
        argv += ["-chardev", f"file,id=serial0,path={_q(serial)}", "-serial", "chardev:serial0"]
    else:
        argv += ["-serial", "mon:stdio"]
    if qmp is not None:
        argv += ["-qmp", f"unix:{_q(qmp)},server=on,wait=off"]
    by_key = {d.key: d for d in disks}
    efi = next((d for d in disks if d.key.startswith("efidisk")), None)
    if cfg.bios == "ovmf" or efi is not None:
        if cfg.bios != "ovmf":
            notes.append("an EFI disk but bios is not ovmf: booted with OVMF")
        four_m = efi is None or efi.size >= 540672 or "efitype=4m" in cfg.drives.get(
            efi.key, "")
        code = f"{OVMF_DIR}/OVMF_CODE_4M.fd" if four_m else f"{OVMF_DIR}/OVMF_CODE.fd"
        argv += ["-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={_q(code)}"]
        if efi is not None:
            argv += ["-drive", f"if=pflash,unit=1,format={efi.fmt},id=drive-{efi.key},"
                               f"file={_q(efi.path)}"]
        else:
            notes.append("no EFI disk in the archive: OVMF starts with empty vars")
    order = {key: 100 + i for i, key in enumerate(cfg.boot_order)}
    controllers: list[str] = []
    devices: list[str] = []
    bootable = [d for d in disks if d.key.rstrip("0123456789") in BUSES]
    if not order and bootable:
        order = {bootable[0].key: 100}
    for d in disks:
        bus = d.key.rstrip("0123456789")
        if bus not in BUSES:
            if not bus.startswith("efidisk"):
                notes.append(f"{d.key} is not attached ({bus} is not emulated here)")
            continue
        index = int(d.key[len(bus):])
        backend = f"drive-{d.key}"
        argv += ["-drive", f"file={_q(d.path)},format={d.fmt},if=none,id={backend},"
                           "cache=unsafe,discard=unmap"]
        boot = f",bootindex={order[d.key]}" if d.key in order else ""
        if bus == "virtio":
            devices.append(f"virtio-blk-pci,drive={backend},id={d.key}{boot}")
        elif bus == "scsi":
            if cfg.scsihw == "virtio-scsi-single":
                hw = f"virtioscsi{index}"
                controllers.append(f"virtio-scsi-pci,id={hw}")
                devices.append(f"scsi-hd,bus={hw}.0,channel=0,scsi-id=0,lun={index},"
                               f"drive={backend},id={d.key}{boot}")
            else:
                if "scsihw0" not in "".join(controllers):
                    controllers.append(f"{SCSI_HW[cfg.scsihw]},id=scsihw0")
                where = (f"channel=0,scsi-id=0,lun={index}" if cfg.scsihw == "virtio-scsi-pci"
                         else f"scsi-id={index}")
                devices.append(f"scsi-hd,bus=scsihw0.0,{where},drive={backend},"
                               f"id={d.key}{boot}")
        elif bus == "sata":
            if "ahci0" not in "".join(controllers):
                controllers.append("ahci,id=ahci0")
            devices.append(f"ide-hd,bus=ahci0.{index},drive={backend},id={d.key}{boot}")
        else:   # ide: two units per bus on i440fx, one port per bus on q35's AHCI
            where = (f"bus=ide.{index}" if cfg.machine == "q35"
                     else f"bus=ide.{index // 2},unit={index % 2}")
            devices.append(f"ide-hd,{where},drive={backend},id={d.key}{boot}")
    for key in cfg.drives:
        if key not in by_key and "media=cdrom" not in cfg.drives[key] \
                and not key.startswith("tpmstate"):
            notes.append(f"{key} is in the config but not in the archive")
    for c in controllers:
        argv += ["-device", c]
    for dev in devices:
        argv += ["-device", dev]
    if net:
        for key, value in cfg.nets.items() or {"net0": "virtio"}.items():
            opts = _options(value)
            model = next((m for m in NIC_MODELS if m in opts), "virtio")
            mac = opts.get(model, "")
            argv += ["-netdev", f"user,id={key}", "-device",
                     f"{NIC_MODELS[model]},netdev={key},id={key}"
                     + (f",mac={mac}" if re.fullmatch(r"[0-9A-Fa-f:]{17}", mac) else "")
                     + (f",bootindex={order[key]}" if key in order else "")]
    else:
        argv += ["-nic", "none"]
    if cfg.agent and qga is not None:
        argv += ["-chardev", f"socket,id=qga0,path={_q(qga)},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=qga-serial",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    return Plan(argv, notes)
