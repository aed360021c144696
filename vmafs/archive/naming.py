"""Archive names as Proxmox's vzdump gives them: `vzdump-qemu-<VMID>-YYYY_MM_DD-HH_MM_SS.vma`
(`.vma.zst` compressed), the time in local time. `vmafs prune` finds an archive's VM and point
in time from its name alone, as vzdump's own prune does.

Pure, apart from is_directory_output() (and output_path()) asking whether the output is an
existing directory.

A VMID is Proxmox's number (`100`), or any other id made only of [A-Za-z0-9_.-]: never a path.
A VM's name (not trusted) becomes a VMID only sanitised to those characters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime

from vmafs.errors import UsageError, VmafsError

PREFIX = "vzdump-qemu-"
TIME_FORMAT = "%Y_%m_%d-%H_%M_%S"
# what vzdump writes for a VM; vmafs writes the first two, and reads the others too
SUFFIXES = (".vma", ".vma.zst", ".vma.gz", ".vma.lzo")
VMID_MAX = 128
_VMID = re.compile(r"[A-Za-z0-9_.-]+")
_NAME = re.compile(r"vzdump-qemu-(?P<vmid>[A-Za-z0-9_.-]+)-"
                   r"(?P<time>\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2})"
                   r"(?P<suffix>\.vma(?:\.zst|\.gz|\.lzo)?)")
_PROXMOX_CONF = re.compile(r"([0-9]+)\.conf")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def check_vmid(vmid: str) -> str:
    """vmid itself when it may name archives: 1 to 128 of [A-Za-z0-9_.-], at least one letter
    or digit (so never '.', '..' or '-'); a VmafsError otherwise."""
    if (not _VMID.fullmatch(vmid) or len(vmid) > VMID_MAX
            or not any(c.isascii() and c.isalnum() for c in vmid)):
        raise UsageError(f"bad VMID {vmid!r}: use 1 to {VMID_MAX} of A-Z a-z 0-9 _ . - "
                         "(at least one letter or digit)")
    return vmid


def _local(when: datetime | float) -> datetime:
    """A naive local wall-clock time: an epoch or an aware datetime converted, a naive datetime
    taken as local time already."""
    if isinstance(when, datetime):
        return when.astimezone().replace(tzinfo=None) if when.tzinfo is not None else when
    return datetime.fromtimestamp(when)


def vzdump_name(vmid: str, when: datetime | float, zstd: bool) -> str:
    """vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst], in local time as vzdump names it."""
    stamp = _local(when).strftime(TIME_FORMAT)
    return f"{PREFIX}{check_vmid(vmid)}-{stamp}{'.vma.zst' if zstd else '.vma'}"


def parse_vzdump_name(name: str) -> tuple[str, datetime] | None:
    """(VMID, local time) from a vzdump archive name (a base name, any of SUFFIXES); None for
    any other name, an impossible date (month 13) or a bad VMID."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    try:
        when = datetime.strptime(m["time"], TIME_FORMAT)
        return check_vmid(m["vmid"]), when
    except (ValueError, VmafsError):
        return None


def strip_suffix(name: str) -> str:
    """The archive name without .vma[.zst|.gz|.lzo]: what vzdump calls its log, plus .log."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def default_vmid(configs: Sequence[tuple[str, bytes]], vm_name: str | None) -> str:
    """The VMID to name an archive by: from a Proxmox config file name (`100.conf`, as in
    /etc/pve/qemu-server/), else the VM's name sanitised (other characters become '_'), else
    a VmafsError asking for one."""
    numbers = sorted({m[1] for name, _ in configs if (m := _PROXMOX_CONF.fullmatch(name))},
                     key=lambda n: (len(n), n))
    if len(numbers) > 1:
        raise VmafsError(f"config files of several VMIDs ({', '.join(numbers)}): "
                         "give the VMID to name the archive by")
    if numbers:
        return check_vmid(numbers[0])
    if vm_name:
        safe = _UNSAFE.sub("_", vm_name)[:VMID_MAX]
        if any(c.isalnum() for c in safe):
            return safe
    raise VmafsError("no VMID to name the archive by: give a config file like 100.conf, "
                     "a VM name, or a VMID")


def is_directory_output(output: str) -> bool:
    """-o DIR/ (or an existing directory): the archive gets a vzdump name in it."""
    return output.endswith("/") or (output != "-" and os.path.isdir(output))


def output_path(output: str, vmid: str, when: datetime | float, zstd: bool) -> str:
    """DIR/vzdump-name when OUTPUT names a directory (is_directory_output), else OUTPUT."""
    if is_directory_output(output):
        return os.path.join(output, vzdump_name(vmid, when, zstd))
    return output


# vzdump names have one-second resolution: an archive started in the same second as the last one
# of its VM (an incremental right after its full) takes a later second's name rather than fail
NAME_WAITS = 2


def vacant_second(output: str, vmid: str, when: int, zstd: bool,
                  taken: Callable[[str], bool]) -> int:
    """The first second from WHEN (at most NAME_WAITS later) whose vzdump name in the directory
    OUTPUT is not taken; WHEN itself when all are (the exclusive create then says so). The
    caller waits for that second, so an archive's name never claims a time still to come."""
    for second in range(when, when + NAME_WAITS + 1):
        if not taken(output_path(output, vmid, second, zstd)):
            return second
    return when


# vzdump's mark that an archive is protected (never pruned): an empty file beside it named
# like the archive plus this suffix, as Proxmox's storage plugin writes "$path.protected".
PROTECTED_SUFFIX = ".protected"


def protected_marker(archive: str) -> str:
    """The marker that protects an archive: ARCHIVE.protected (a path gives a path, a base name
    a base name). The one home of this rule: protect, prune and backup --protected use it."""
    return archive + PROTECTED_SUFFIX


def config_vmid(config_names: Sequence[str]) -> str | None:
    """The VMID a Proxmox config file name in an archive says (`101.conf`); None when no name
    says one, or several names say different ones."""
    numbers = {m[1] for name in config_names if (m := _PROXMOX_CONF.fullmatch(name))}
    return numbers.pop() if len(numbers) == 1 else None


def archive_vmid(path: str, config_names: Sequence[str]) -> str | None:
    """An archive's VMID: from its vzdump name, else from a `NNN.conf` config name, else None."""
    parsed = parse_vzdump_name(os.path.basename(path))
    return parsed[0] if parsed is not None else config_vmid(config_names)
