"""QEMU dirty bitmaps for incremental backups (pure: QMP JSON in, QMP actions out).

Every backup adds, in the transaction that starts its jobs, one bitmap per disk named after the
new archive (chain.bitmap_name): it counts the guest's writes from exactly that point in time.
An incremental backup from PREV copies what PREV's bitmap holds (`sync: bitmap`,
`bitmap-mode: never`, so a failed job leaves it as it was) and removes it only once the new
archive is committed: a failure at any step loses no change.

Bitmaps are persistent on qcow2 v3 nodes (stored in the image on a clean close, back after a
restart) and live in memory elsewhere (raw, rbd, qcow2 v2...: gone with the QEMU process).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Mapping, Sequence
from typing import Any

from vmafs.backup.blockgraph import Disk
from vmafs.format import chain, vma

Json = Mapping[str, Any]
GRANULARITY = vma.CLUSTER_SIZE  # one bit per VMA cluster
def can_persist(info: Json) -> bool:
    """Whether a node can store a bitmap: qcow2, but not its v2 (compat=0.10) files, where QEMU
    refuses a persistent one (and with it the whole transaction)."""
    if info.get("drv") != "qcow2":
        return False
    specific = (info.get("image") or {}).get("format-specific") or {}
    return (specific.get("data") or {}).get("compat") != "0.10"


def _node(nodes: Sequence[Json], name: str) -> Json | None:
    return next((n for n in nodes if n.get("node-name") == name), None)


def bitmap_of(nodes: Sequence[Json], node: str, name: str) -> Json | None:
    """The bitmap `name` on a node (query-named-block-nodes, flat), if it has one."""
    info = _node(nodes, node)
    if info is None:
        return None
    return next((b for b in info.get("dirty-bitmaps") or [] if b.get("name") == name), None)


def chain_mismatch(disks: Sequence[Disk], prev_devices: Mapping[str, int]) -> str | None:
    """Why these disks cannot continue PREV's chain at all (None: they can): the chain's
    archives all hold the same devices."""
    names = {d.name for d in disks}
    for disk in disks:
        if disk.name not in prev_devices:
            return f"disk {disk.name}: not in the previous archive (a new disk)"
        if prev_devices[disk.name] != disk.size:
            return (f"disk {disk.name}: resized since the previous archive "
                    f"({prev_devices[disk.name]} -> {disk.size} bytes)")
    for name in prev_devices:
        if name not in names:
            return f"disk {name}: in the previous archive, but not backed up now"
    return None


def missing_reason(info: Json | None, prev_ctime: int, qemu_started: float | None,
                   successor: str | None) -> str:
    """Why PREV's bitmap is not on a disk, as far as can be known: a later archive that
    continued from PREV (its commit removed the bitmap), a QEMU process younger than PREV
    (restarted), or one older than PREV (someone removed it)."""
    persists = info is not None and can_persist(info)
    if successor is not None:
        return (f"a later backup, {successor}, continued the chain from that archive and moved "
                "the bitmap on: continue from the newest archive of the chain")
    if qemu_started is not None and qemu_started > prev_ctime:
        if not persists:
            return ("the VM was restarted after that backup, and a bitmap on a raw or qcow2 v2 "
                    "disk lives only as long as the QEMU process")
        return ("the VM was restarted after that backup and the image did not hold it (QEMU "
                "stopped uncleanly before storing it, or the disk was replaced)")
    if qemu_started is not None:
        return ("QEMU has run since before that backup, so it was removed: by a later backup "
                "continuing this chain, --drop-old-bitmaps, or vmafs bitmaps --drop")
    if not persists:
        return ("a bitmap on a raw or qcow2 v2 disk lives only as long as the QEMU process: was "
                "the VM restarted?")
    return ("the VM was restarted uncleanly, the disk was replaced, or a later backup of this "
            "chain moved the bitmap on")


def unusable(disk: Disk, nodes: Sequence[Json], prev: uuidlib.UUID,
             missing: str | None = None) -> str | None:
    """Why this disk's changes since PREV are unknown (None: its bitmap has them); `missing`
    says why the bitmap is gone, if it is (missing_reason)."""
    name = chain.bitmap_name(prev)
    bitmap = bitmap_of(nodes, disk.node, name)
    if bitmap is None:
        why = missing or missing_reason(_node(nodes, disk.node), 0, None, None)
        return f"disk {disk.name}: no dirty bitmap {name} ({why})"
    if bitmap.get("inconsistent"):
        return (f"disk {disk.name}: dirty bitmap {name} is inconsistent (QEMU stopped uncleanly "
                "while it was in use); its changes are unknown")
    if bitmap.get("busy"):
        return f"disk {disk.name}: dirty bitmap {name} is in use by another job"
    if not bitmap.get("recording", True):
        return f"disk {disk.name}: dirty bitmap {name} is disabled (it missed writes)"
    granularity = int(bitmap.get("granularity", 0))
    if not 0 < granularity <= GRANULARITY or GRANULARITY % granularity:
        return f"disk {disk.name}: dirty bitmap {name} has granularity {granularity}"
    return None


def dirty_bytes(disks: Sequence[Disk], nodes: Sequence[Json], prev: uuidlib.UUID) -> int:
    """What the incremental will copy, as QEMU counts it now (for progress)."""
    name = chain.bitmap_name(prev)
    return sum(int((bitmap_of(nodes, d.node, name) or {}).get("count", 0)) for d in disks)


def add_actions(disks: Sequence[Disk], nodes: Sequence[Json], new: uuidlib.UUID
                ) -> list[dict[str, Any]]:
    """Transaction actions that start the new archive's bitmaps."""
    actions = []
    for disk in disks:
        info = _node(nodes, disk.node) or {}
        actions.append({"type": "block-dirty-bitmap-add", "data": {
            "node": disk.node, "name": chain.bitmap_name(new), "granularity": GRANULARITY,
            "persistent": can_persist(info)}})
    return actions


def sync_arguments(prev: uuidlib.UUID | None) -> dict[str, Any]:
    """blockdev-backup's sync arguments: everything (prev None: a full backup, or a disk
    copied whole into an incremental one), or what PREV's bitmap holds."""
    if prev is None:
        return {"sync": "full"}
    return {"sync": "bitmap", "bitmap": chain.bitmap_name(prev), "bitmap-mode": "never"}


def to_remove(disk: Disk, nodes: Sequence[Json], new: uuidlib.UUID, *, started: bool,
              committed: bool, parent: chain.Link | None, drop_old: bool) -> list[str]:
    """The bitmaps of a disk to remove once the backup ended. Failed: its own (if `started`).
    Committed: with drop_old, every other vmafs bitmap (ending older chains); else, if this
    archive's own bitmaps took over, the parent's (an incremental's PREV)."""
    info = _node(nodes, disk.node) or {}
    present = [b.get("name", "") for b in info.get("dirty-bitmaps") or []]
    ours = chain.bitmap_name(new)
    if not committed:
        return [ours] if started and ours in present else []
    if drop_old:
        return [n for n in present if n.startswith("vmafs-") and n != ours]
    previous = chain.bitmap_name(parent.uuid) if parent is not None else None
    return [previous] if started and previous is not None and previous in present else []


def archive_of(name: str) -> uuidlib.UUID | None:
    """The archive a vmafs bitmap counts from (the uuid in its name); None: not ours."""
    if not name.startswith("vmafs-"):
        return None
    try:
        archive = uuidlib.UUID(name[len("vmafs-"):])
    except ValueError:
        return None
    return archive if chain.bitmap_name(archive) == name else None


def inventory(disks: Sequence[Disk], nodes: Sequence[Json]) -> list[dict[str, Any]]:
    """Every vmafs bitmap of the VM, one entry each: the disk (its archive name when it is one
    of `disks`, else the node's), the archive it continues (the uuid in its name) and QEMU's
    flags."""
    names = {d.node: d.name for d in disks}
    found = []
    for node in nodes:
        for bitmap in node.get("dirty-bitmaps") or []:
            name = bitmap.get("name") or ""
            archive = archive_of(name)
            if archive is None:
                continue
            found.append({
                "disk": names.get(node.get("node-name", ""), node.get("node-name")),
                "node": node.get("node-name"), "name": name, "archive": str(archive),
                "count": int(bitmap.get("count", 0)),
                "granularity": int(bitmap.get("granularity", 0)),
                "persistent": bool(bitmap.get("persistent")),
                "recording": bool(bitmap.get("recording", True)),
                "busy": bool(bitmap.get("busy")),
                "inconsistent": bool(bitmap.get("inconsistent")),
            })
    return found
