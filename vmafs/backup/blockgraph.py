"""Which disks of a running VM to back up, and what to call them (pure: QMP JSON in).

Input is what QEMU reports: `query-block` (one entry per BlockBackend/drive),
`query-named-block-nodes`, `query-block-jobs` and the QOM type of each drive's device.
Output is a list of `Disk`s: the node to give `blockdev-backup`, its virtual size, and a
Proxmox-style device name for the archive.  No I/O here, so it is tested on recorded JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmafs.errors import VmafsError

Json = Mapping[str, Any]

# QOM types of removable-media devices: never backed up by default.
_MEDIA_TYPES = ("ide-cd", "scsi-cd", "floppy", "isa-fdc")
_PERIPHERAL = "/machine/peripheral/"
_BAD_NAME = re.compile(r"[\s/]")


class SelectionError(VmafsError):
    """The requested drives do not exist, clash, or cannot be backed up."""


@dataclass(frozen=True)
class Disk:
    """One disk to back up."""

    name: str    # archive device name, e.g. "drive-scsi0"
    node: str    # node name handed to blockdev-backup (the drive's top node)
    size: int    # virtual size in bytes; the NBD export must have exactly this size


def device_id(qdev: str) -> str | None:
    """The `-device id=` of a drive's device from query-block's `qdev` path, if it has one.

    QEMU reports "/machine/peripheral/<id>/virtio-backend" for virtio, plain "<id>" for
    IDE/SCSI, and "/machine/peripheral-anon/..." for devices without an id.
    """
    if not qdev:
        return None
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL):].split("/", 1)[0] or None
    if "/" not in qdev:
        return qdev
    return None


def proxmox_name(block: Json) -> str:
    """The name Proxmox would use: `drive-…` -drive ids as they are, else drive-<device id>."""
    drive = block.get("device") or ""
    if drive.startswith("drive-"):
        return _clean(drive)
    dev = device_id(block.get("qdev") or "")
    if dev:
        return _clean(f"drive-{dev}")
    if drive:
        return _clean(f"drive-{drive}")
    return _clean(f"drive-{block['inserted']['node-name']}")


def _clean(name: str) -> str:
    return _BAD_NAME.sub("_", name)


def type_queries(blocks: Sequence[Json]) -> list[str]:
    """The qdev paths whose QOM `type` property select_disks() wants (qom-get path=… type)."""
    return [b["qdev"] for b in blocks if b.get("qdev") and b.get("inserted")]


def is_media_drive(block: Json, qom_types: Mapping[str, str]) -> bool:
    """CD-ROM or floppy: a tray, or a device whose QOM type says so."""
    if "tray_open" in block:
        return True
    qtype = qom_types.get(block.get("qdev") or "", "")
    return qtype in _MEDIA_TYPES or qtype.endswith("-cd")


def _size(block: Json) -> int:
    return int(block["inserted"]["image"]["virtual-size"])


def _skip_reason(block: Json, qom_types: Mapping[str, str]) -> str | None:
    if not block.get("inserted"):
        return "has no medium"
    if is_media_drive(block, qom_types):
        return "is a CD-ROM/floppy drive"
    if block["inserted"].get("ro"):
        return "is read-only"
    return None


def select_disks(blocks: Sequence[Json], nodes: Sequence[Json], qom_types: Mapping[str, str],
                 wanted: Sequence[tuple[str, str | None]] = ()) -> list[Disk]:
    """Pick the disks to back up.

    Without `wanted`: every drive with a medium that is neither read-only nor removable
    media, in query-block order.  With `wanted` ((NODE, DEVNAME or None) pairs): exactly
    those, where NODE may be a node name, a -drive id, a -device id or the Proxmox name.
    """
    if wanted:
        disks = [_resolve(spec, name, blocks, nodes, qom_types) for spec, name in wanted]
    else:
        disks = [Disk(proxmox_name(b), b["inserted"]["node-name"], _size(b))
                 for b in blocks if _skip_reason(b, qom_types) is None]
        if not disks:
            raise SelectionError("the VM has no writable disk to back up")
    seen: dict[str, Disk] = {}
    nodes_seen: set[str] = set()
    for disk in disks:
        if disk.name in seen:
            raise SelectionError(
                f"two disks would both be named {disk.name!r}; name them with --drive NODE=NAME")
        if disk.node in nodes_seen:
            raise SelectionError(f"node {disk.node!r} is selected twice")
        seen[disk.name] = disk
        nodes_seen.add(disk.node)
    return disks


def _resolve(spec: str, name: str | None, blocks: Sequence[Json], nodes: Sequence[Json],
             qom_types: Mapping[str, str]) -> Disk:
    if name is not None and (not name or _BAD_NAME.search(name)):
        raise SelectionError(f"bad device name {name!r}: it must not be empty or hold "
                             "whitespace or '/'")
    matchers = (
        lambda b: b["inserted"].get("node-name") == spec,
        lambda b: b.get("device") == spec,
        lambda b: device_id(b.get("qdev") or "") == spec,
        lambda b: proxmox_name(b) == spec,
    )
    with_medium = [b for b in blocks if b.get("inserted")]
    for match in matchers:
        hits = [b for b in with_medium if match(b)]
        if hits:
            block = hits[0]
            if is_media_drive(block, qom_types):
                raise SelectionError(f"drive {spec!r} is a CD-ROM/floppy drive")
            return Disk(name or proxmox_name(block), block["inserted"]["node-name"],
                        _size(block))
    for node in nodes:
        if node.get("node-name") == spec:
            return Disk(name or _clean(f"drive-{spec}"), spec,
                        int(node["image"]["virtual-size"]))
    if any(b.get("device") == spec and not b.get("inserted") for b in blocks):
        raise SelectionError(f"drive {spec!r} has no medium")
    known = sorted({proxmox_name(b) for b in with_medium})
    raise SelectionError(f"no drive or node named {spec!r} (disks: {', '.join(known) or 'none'})")


def check_no_jobs(jobs: Sequence[Json]) -> None:
    """Refuse to start while any block job runs: QEMU would refuse part-way through."""
    if jobs:
        desc = ", ".join(f"{j.get('device', '?')} ({j.get('type', '?')})" for j in jobs)
        raise SelectionError(f"another block job is running: {desc}; wait for it to finish")


def leftovers(nodes: Sequence[Json], ours: Sequence[str]) -> list[str]:
    """Our node names and any copy-before-write filter still in the graph (should be none)."""
    mine = set(ours)
    return [n["node-name"] for n in nodes
            if n.get("node-name") in mine or n.get("drv") == "copy-before-write"]
