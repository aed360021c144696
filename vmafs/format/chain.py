"""Pure codec of the chain record: what makes an archive one link of an incremental chain.

An incremental archive is an ordinary VMA archive that holds only the clusters the guest changed
since its parent (changed to zeros: zero slots; unchanged: no slot at all, so Proxmox's
`vma extract` fails with "missing cluster" instead of restoring wrong data). Its header carries
one extra config blob, `vmafs-chain.json`, covered by the header's md5 like every config:

    {"vmafs-chain": 1,
     "parent": {"uuid": "...", "ctime": 1733050000,
                "devices": [["drive-scsi0", 34359738368], ...],
                "digest": "<sha256 of the parent's content>"},
     "stands-for": "<digest>"}

`parent` names the archive whose point in time this one continues. `stands-for` is written by
`vmafs merge`: the merged archive has the same uuid and point in time as the archive it folds up
to, and children of that archive link to it by that archive's digest. An archive's *identity* is
(uuid, stands-for or its own content digest).

The content digest covers the index rows (device, cluster, mask, data checksum) sorted by
cluster, and for an incremental also the clusters it holds as zeros: it does not depend on extent
layout or container (convert to .vma.zst keeps it), only on what the archive says the disks hold.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vmafs.errors import FormatError

CONFIG_NAME = "vmafs-chain.json"
VERSION = 1
MAX_RECORD = 64 * 1024
MAX_DEPTH = 8  # a real record nests 4 deep ({"parent": {"devices": [[...]]}})
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Link:
    """The parent an incremental archive continues."""

    uuid: uuidlib.UUID
    ctime: int
    devices: tuple[tuple[str, int], ...]  # (name, size) in the parent's order
    digest: str


@dataclass(frozen=True)
class ChainRecord:
    """An archive's chain config: its parent's link, or the archive a merge replaces."""

    parent: Link | None = None
    stands_for: str | None = None  # digest of the archive a merged archive replaces

    @property
    def incremental(self) -> bool:
        return self.parent is not None


def encode(record: ChainRecord) -> bytes:
    doc: dict[str, object] = {"vmafs-chain": VERSION}
    if record.parent is not None:
        p = record.parent
        doc["parent"] = {"uuid": str(p.uuid), "ctime": p.ctime,
                         "devices": [[n, s] for n, s in p.devices], "digest": p.digest}
    if record.stands_for is not None:
        doc["stands-for"] = record.stands_for
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode(data: bytes) -> ChainRecord:
    """The record, strictly checked: a damaged record is an error, never a full archive."""
    if len(data) > MAX_RECORD:
        raise FormatError(f"{CONFIG_NAME} is too large")
    if _nesting(data) > MAX_DEPTH:
        raise FormatError(f"{CONFIG_NAME} is nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FormatError(f"{CONFIG_NAME} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("vmafs-chain") != VERSION:
        raise FormatError(f"{CONFIG_NAME}: unknown chain record version")
    if set(doc) - {"vmafs-chain", "parent", "stands-for"}:
        raise FormatError(f"{CONFIG_NAME}: unknown fields")
    parent = None
    if "parent" in doc:
        parent = _decode_link(doc["parent"])
    stands_for = doc.get("stands-for")
    if stands_for is not None and not _is_digest(stands_for):
        raise FormatError(f"{CONFIG_NAME}: bad stands-for digest")
    return ChainRecord(parent, stands_for)


def _nesting(data: bytes) -> int:
    """How deep [ and { nest outside strings: checked before json.loads, whose recursion a
    deeply nested record would exhaust. One linear pass (the record is at most MAX_RECORD)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _decode_link(p: object) -> Link:
    bad = FormatError(f"{CONFIG_NAME}: bad parent record")
    if not isinstance(p, dict) or set(p) != {"uuid", "ctime", "devices", "digest"}:
        raise bad
    try:
        uuid = uuidlib.UUID(p["uuid"])
    except (ValueError, TypeError, AttributeError):
        raise bad from None
    ctime, devices, digest = p["ctime"], p["devices"], p["digest"]
    if type(ctime) is not int or not 0 <= ctime < 1 << 63 or not _is_digest(digest):
        raise bad
    if not isinstance(devices, list) or not 1 <= len(devices) <= 254:
        raise bad
    pairs = []
    for d in devices:
        if (not isinstance(d, list) or len(d) != 2 or not isinstance(d[0], str)
                or type(d[1]) is not int or not 0 < d[1] < 1 << 63):
            raise bad
        pairs.append((d[0], d[1]))
    return Link(uuid, ctime, tuple(pairs), digest)


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def find(configs: Sequence[tuple[str, bytes]]) -> ChainRecord | None:
    """The chain record among an archive's configs (None: a plain full archive)."""
    found = [data for name, data in configs if name == CONFIG_NAME]
    if len(found) > 1:
        raise FormatError(f"two {CONFIG_NAME} records")
    return decode(found[0]) if found else None


def is_incremental(configs: Sequence[tuple[str, bytes]]) -> bool:
    """True if the archive holds only what changed since a parent it names."""
    record = find(configs)
    return record is not None and record.incremental


@dataclass(frozen=True)
class DeviceContent:
    """What one device of an archive holds, for the digest: stored rows sorted by cluster,
    and (incremental archives) every cluster it holds as zeros, sorted."""

    name: str
    size: int
    clusters: np.ndarray   # uint32
    masks: np.ndarray      # uint16
    checksums: np.ndarray  # uint32
    zeros: np.ndarray | ZeroChunks | None  # uint32; None: a full archive (all else is zero)


@dataclass(frozen=True)
class ZeroChunks:
    """An increment's zero clusters as ascending uint32 pieces, hashed one at a time: the
    same digest as the whole array, without holding 4 bytes per zero cluster."""

    count: int
    chunks: Callable[[], Iterator[np.ndarray]]


def content_digest(devices: Sequence[DeviceContent]) -> str:
    h = hashlib.sha256(b"vmafs-content-1\0")
    for d in devices:
        name = d.name.encode("utf-8", "surrogateescape")
        zeros = -1 if d.zeros is None else (
            d.zeros.count if isinstance(d.zeros, ZeroChunks) else len(d.zeros))
        h.update(struct.pack("<QQQq", len(name), d.size, len(d.clusters), zeros))
        h.update(name)
        for column, dtype in ((d.clusters, "<u4"), (d.masks, "<u2"), (d.checksums, "<u4")):
            h.update(np.ascontiguousarray(column, dtype).data)
        if isinstance(d.zeros, ZeroChunks):
            for chunk in d.zeros.chunks():
                h.update(np.ascontiguousarray(chunk, "<u4").data)
        elif d.zeros is not None:
            h.update(np.ascontiguousarray(d.zeros, "<u4").data)
    return h.hexdigest()


def bitmap_name(archive_uuid: uuidlib.UUID) -> str:
    """The QEMU dirty bitmap that counts the writes since this archive's point in time."""
    return f"vmafs-{archive_uuid}"
