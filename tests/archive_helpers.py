"""Helpers for the archive tests: an independent VMA walker (struct + hashlib only, so it does
not share bugs with vmafs.format.vma), an in-memory Output, and dissect.archive as a second
reader."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER = 65536
BLOCK = 4096


class MemOutput:
    """An ArchiveWriter Output that keeps the stream in memory and records frame ends."""

    extent_bytes = 512 + 59 * 65536  # whole VMA extents, as a plain output writes them

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frame_ends: list[int] = []
        self.closed = False

    @property
    def bytes_out(self) -> int:
        return len(self.buf)

    def write(self, chunk: bytes | bytearray | memoryview) -> int:
        assert not self.closed
        self.buf += chunk
        return len(chunk)

    def end_frame(self) -> None:
        self.frame_ends.append(len(self.buf))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@dataclass
class Walk:
    """What a plain VMA stream holds, as Proxmox's reader would see it."""

    uuid: bytes
    ctime: int
    header_size: int
    devices: dict[int, tuple[str, int]]  # dev_id -> (name, size)
    configs: dict[str, bytes]
    images: dict[int, bytearray]  # dev_id -> full device bytes
    seen: dict[int, list[int]] = field(default_factory=dict)  # dev_id -> count per cluster
    extents: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, used, blocks)
    null_extents: list[int] = field(default_factory=list)  # offsets of extents with no used slot
    max_slots: int = 0


def walk_vma(data: bytes | bytearray) -> Walk:
    """Parse a whole plain VMA stream, asserting every rule of Proxmox's reader."""
    data = bytes(data)
    assert data[:4] == b"VMA\0" and struct.unpack_from(">I", data, 4)[0] == 1
    uuid = data[8:24]
    ctime = struct.unpack_from(">q", data, 24)[0]
    blob_off, blob_size, header_size = struct.unpack_from(">III", data, 48)
    head = bytearray(data[:header_size])
    head[32:48] = bytes(16)
    assert hashlib.md5(head).digest() == data[32:48], "header md5"
    blobs = {}
    pos = 1
    area = data[blob_off:blob_off + blob_size]
    while pos + 2 <= len(area):
        n = area[pos] | area[pos + 1] << 8
        if pos + 2 + n <= len(area):
            blobs[pos] = area[pos + 2:pos + 2 + n]
        pos += 2 + n
    devices = {}
    for dev_id in range(1, 256):
        ptr, size = struct.unpack_from(">I4xQ", data, 4096 + 32 * dev_id)
        if size and ptr in blobs and blobs[ptr].endswith(b"\0"):
            devices[dev_id] = (blobs[ptr][:-1].decode(), size)
    configs = {}
    for i in range(256):
        n_ptr = struct.unpack_from(">I", data, 2044 + 4 * i)[0]
        d_ptr = struct.unpack_from(">I", data, 3068 + 4 * i)[0]
        if n_ptr and d_ptr:
            configs[blobs[n_ptr][:-1].decode()] = blobs[d_ptr]
    walk = Walk(uuid, ctime, header_size, devices, configs,
                {d: bytearray(s) for d, (_, s) in devices.items()},
                {d: [0] * -(-s // CLUSTER) for d, (_, s) in devices.items()})
    pos = header_size
    while pos < len(data):
        assert pos + 512 <= len(data), f"short extent at {pos}"
        eh = bytearray(data[pos:pos + 512])
        md5 = bytes(eh[24:40])
        eh[24:40] = bytes(16)
        assert hashlib.md5(eh).digest() == md5, f"extent md5 at {pos}"
        assert eh[:4] == b"VMAE" and eh[4:6] == b"\0\0" and eh[8:24] == uuid
        block_count = struct.unpack_from(">H", eh, 6)[0]
        dpos = pos + 512
        used = 0
        for s in range(59):
            info = struct.unpack_from(">Q", eh, 40 + 8 * s)[0]
            dev_id = info >> 32 & 0xFF
            if not dev_id:
                continue
            used += 1
            mask, cluster = info >> 48, info & 0xFFFFFFFF
            assert dev_id in walk.devices, f"unknown dev_id {dev_id}"
            name, size = walk.devices[dev_id]
            walk.seen[dev_id][cluster] += 1  # IndexError = cluster beyond the end
            for j in range(16):
                if mask >> j & 1:
                    start = cluster * CLUSTER + j * BLOCK
                    assert start < size, f"mask bit past the end of {name}"
                    chunk = data[dpos:dpos + BLOCK]
                    walk.images[dev_id][start:start + BLOCK] = chunk[:size - start]
                    dpos += BLOCK
        assert dpos == pos + 512 + block_count * BLOCK, f"block_count mismatch at {pos}"
        walk.extents.append((pos, used, block_count))
        if not used:
            assert block_count == 0
            walk.null_extents.append(pos)
        walk.max_slots = max(walk.max_slots, used)
        pos = dpos
    assert pos == len(data), "stream must end at an extent boundary"
    return walk


def assert_every_cluster_once(walk: Walk) -> None:
    for dev_id, counts in walk.seen.items():
        bad = [(c, n) for c, n in enumerate(counts) if n != 1]
        assert not bad, f"device {walk.devices[dev_id][0]}: clusters not exactly once: {bad[:5]}"
    assert walk.max_slots <= 59


def dissect_read(path: Path | str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """({devname: bytes}, {config: bytes}) as dissect.archive reads a plain .vma."""
    from dissect.archive.vma import VMA

    with open(path, "rb") as fh:
        archive = VMA(fh)
        images = {}
        for dev in archive.devices():
            stream = dev.open()
            images[dev.name] = stream.read(dev.size)
        return images, dict(archive.configs())


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




def reseal_header(data: bytearray) -> None:
    """After editing a plain archive's header in place: reseal its md5 and, when the archive
    ends in a vmafs footer that carries a header digest, that digest too (a rewritten header
    must reseal both structures: vmafs/format/index.py)."""
    from vmafs.errors import FormatError
    from vmafs.format import index, vma

    header_size = struct.unpack_from(">I", data, 56)[0]
    data[32:48] = bytes(16)
    data[32:48] = hashlib.md5(data[:header_size]).digest()
    try:
        header = vma.decode_header(bytes(data[:header_size]))
    except FormatError:
        return  # a header no reader takes: nothing further to keep in step with it
    footer = index.decode_footer(vma.null_extent_payload(bytes(data[-512:])))
    if footer is not None and footer.header_digest is not None:
        fresh = dataclasses.replace(footer, header_digest=vma.header_digest(header))
        data[-512:] = vma.encode_null_extents(header.uuid, index.encode_footer(fresh))
