"""The VM's config files in an archive, under the names Proxmox reads them by.

vzdump stores a VM's configuration as `qemu-server.conf` (and its firewall rules as
`qemu-server.fw`); `vma config` and `qmrestore` look for exactly those names. So a file given
with `-c 101.conf` (or `vm1.conf`) is stored as `qemu-server.conf`, a `*.fw` file as
`qemu-server.fw`, any other file by its base name, and `-c NAME=FILE` under the name chosen.
The VMID a `NNN.conf` file name carries is kept for naming the archive. `vmafs-chain.json` is
vmafs's own record of an incremental's parent (format/chain.py): no user file may take it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from vmafs.errors import UsageError, VmafsError
from vmafs.format import chain
from vmafs.format.names import display
from vmafs.format.vma import MAX_BLOB_SIZE

VM_CONFIG = "qemu-server.conf"
FIREWALL = "qemu-server.fw"
_VMID_CONF = re.compile(r"([0-9]+)\.conf")


@dataclass(frozen=True)
class ConfigFiles:
    """Config files read from the command line, as the archive will store them."""

    files: list[tuple[str, bytes]]
    vmid: str | None  # from a Proxmox config file name like 101.conf


def stored_name(arg: str) -> tuple[str, str]:
    """(name in the archive, path to read) for one -c argument."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name:  # NAME=FILE; a path with '=' reads as ./a=b
        check_name(name)
        return name, path
    base = os.path.basename(arg)
    if base.endswith(".conf"):
        return VM_CONFIG, arg
    if base.endswith(".fw"):
        return FIREWALL, arg
    check_name(base)
    return base, arg


def check_name(name: str) -> None:
    """A name a config file may be stored under (a base name Proxmox can extract)."""
    if name == chain.CONFIG_NAME:
        raise UsageError(f"{name} is reserved for vmafs's chain record; store the file "
                         "under another name (-c NAME=FILE)")
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"'{display(name)}' cannot be a config file name")
    if len(os.fsencode(name)) > 255:
        raise UsageError(f"config file name too long: {display(name[:40])}...")


def vmid_of(args: Sequence[str]) -> str | None:
    """The VMID a Proxmox config file name says (101.conf as in /etc/pve/qemu-server/)."""
    found = {m[1] for a in args if (m := _VMID_CONF.fullmatch(os.path.basename(a)))}
    if len(found) > 1:
        raise UsageError(f"config files of several VMIDs ({', '.join(sorted(found))}): "
                         "give the VMID with --vmid")
    return found.pop() if found else None


def read_configs(args: Sequence[str]) -> ConfigFiles:
    """Read every -c argument; two files for one stored name are refused."""
    files: list[tuple[str, bytes]] = []
    sources: dict[str, str] = {}
    for arg in args:
        name, path = stored_name(arg)
        if name in sources:
            raise UsageError(f"{display(sources[name])} and {display(path)} would both be "
                             f"stored as {display(name)}; name one with -c NAME=FILE")
        sources[name] = path
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BLOB_SIZE + 1)
        except OSError as exc:
            raise VmafsError(f"{display(path)}: {exc.strerror}") from None
        if len(data) > MAX_BLOB_SIZE:
            raise VmafsError(f"{display(path)}: config files are limited to {MAX_BLOB_SIZE} "
                             "bytes by VMA")
        files.append((name, data))
    return ConfigFiles(files, vmid_of([p for p in sources.values()]))


def vm_configs(configs: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """An archive's configs without vmafs's chain record: the files that are the VM's."""
    return [(n, d) for n, d in configs if n != chain.CONFIG_NAME]
