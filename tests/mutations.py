"""Seeded archive mutations and the oracle that judges every reading path of vmafs on them.

Shared by tests/test_differential.py (a few hundred mutants) and tools/mutate_archives.py (as
many as asked). A mutant is (base, kind, seed): the same triple always gives the same bytes, so
every failure reproduces with `tools/mutate_archives.py --base B --kind K --seed S -v`.

The oracle does not share code with vmafs: it walks the mutated stream with struct + hashlib
(+ xxhash for our index's checksums, zstandard/gzip for the containers), following Proxmox's
reader (vma-reader.c; the project's VMA format notes, §3): what `vma extract` would write, up
to the first broken extent. Per device cluster it says "decided: these bytes" or "undecided".
Three stricter rules come from issue 8:
- a cluster never seen in the valid prefix is undecided (a missing cluster must not read as 0);
- where the stream carries our index (a null extent with the index or footer magic), the data
  is decided only if that index is sound (footer last, checksum, rows == the walked extents) and
  the cluster's checksum matches; an index present but damaged leaves every stored cluster
  undecided ("never silently serve unchecked data from an archive whose index was damaged");
- zstd is read frame after frame as `zstd -d` reads it (the seek table is a skippable frame and
  proves nothing); a frame that fails to decode ends the stream there.
A footer with the block-sums field (0x8002) makes a row's checksum that of its data's 4 KiB
blocks' sums; the sums extents (field 2: carried) are never needed to decide a cluster (a
reader whose sums are damaged reads the whole cluster), only to be whole extents (Proxmox
stops at a broken one); where a cluster fails, the blocks its sound sums prove stay decided.
Then, per mutant: verify passes => extract succeeds, agrees with the reference, and the model,
VmaFS and a mount return exactly extract's bytes; verify fails => extract fails leaving no file
under a final name, and every piece read is an error or the reference's decided bytes.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import gzip
import hashlib
import io
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
import zstandard

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT  # the vmafs tree the subprocess paths run (tools/mutate_archives.py --vmafs)
VECTORS = ROOT / "tests" / "vectors"
MiB = 1 << 20
CLUSTER = 65536
BLOCK = 4096
EXT = 512
SLOTS = 59
MAX_EXTENT = EXT + SLOTS * CLUSTER
NULL_PAYLOAD = SLOTS * 7
INDEX_MAGIC = b"VMAFSIX1"
FOOTER_MAGIC = b"VMAFSFT1"
FIELD_BLOCK_SUMS = 0x8002
FIELD_SUMS_CARRIED = 2
SEEK_MAGIC = 0x8F92EAB1
SKIP_SEEK = 0x184D2A5E
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
REFERENCE_LIMIT = 1 << 30  # the reference refuses to hold more device bytes than this


def popcount(mask: int) -> int:
    return bin(mask).count("1")


def xxh32low(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


def summed(data: bytes | memoryview) -> int:
    """A cluster's check in a block-summed archive: of its 4 KiB blocks' sums, LE u32."""
    return xxh32low(b"".join(struct.pack("<I", xxh32low(data[a:a + BLOCK]))
                             for a in range(0, len(data), BLOCK)))


def footer_fields(footer: bytes) -> list[tuple[int, bytes]]:
    """The typed fields after a footer payload's fixed 32 bytes, up to type 0."""
    pos, out = 32, []
    while pos + 4 <= len(footer):
        kind, n = struct.unpack_from("<HH", footer, pos)
        if kind == 0:
            break
        out.append((kind, footer[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def fields_bytes(footer: bytes) -> bytes:
    """The raw typed fields of a footer payload (to keep them when forging a new footer)."""
    return b"".join(struct.pack("<HH", k, len(v)) + v for k, v in footer_fields(footer))


# -- bases -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """An archive to mutate. container: plain | seekable | zstd1 (one frame) | gzip."""

    name: str
    path: Path
    container: str
    indexed: bool

    @property
    def random_access(self) -> bool:
        return self.container in ("plain", "seekable")


def _write_images(work: Path) -> list[str]:
    """Two small disks: dense, holes, 4 KiB blocks (partial masks), an odd write, a partial
    last cluster, written zeros; and two configs. Returns the `vmafs create` arguments."""
    rnd = random.Random(8)
    d0, d1 = work / "disk0.raw", work / "disk1.raw"
    size0 = 3 * MiB + 5 * 512
    with open(d0, "wb") as f:
        f.truncate(size0)
        f.seek(0)
        f.write(rnd.randbytes(MiB // 2) + b"compressible text " * 30000)
        for _ in range(12):
            f.seek(rnd.randrange(MiB + MiB // 2, 3 * MiB) // BLOCK * BLOCK)
            f.write(rnd.randbytes(BLOCK))
        f.seek(2 * MiB + 777)
        f.write(b"odd write" * 5)
        f.seek(size0 - 9000)
        f.write(rnd.randbytes(9000))
    with open(d1, "wb") as f:
        f.write(rnd.randbytes(MiB // 2) + bytes(MiB // 2) + rnd.randbytes(MiB // 4))
    conf, fw = work / "qemu-server.conf", work / "qemu-server.fw"
    conf.write_text("boot: order=scsi0\nscsi0: local:vm-100-disk-0,size=3M\n")
    fw.write_text("[OPTIONS]\nenable: 1\n")
    return ["-c", str(conf), "-c", str(fw), f"drive-scsi0={d0}", f"drive-virtio1={d1}"]


# (name, path under the vectors, container); small ones for the suite, all for the tool
VECTOR_BASES = [
    ("spec-two-disks.vma", "spec/two-disks.vma", "plain"),
    ("spec-two-disks-59.vma", "spec/two-disks-59.vma", "plain"),
    ("pve-legacy-positional.vma", "proxmox/sample-legacy-positional.vma", "plain"),
    ("pve-odd-1000b.vma", "proxmox/sample-odd-size-1000b.vma", "plain"),
    ("spec-two-disks.seekable.vma.zst", "spec/two-disks.seekable.vma.zst", "seekable"),
    ("spec-two-disks.vma.zst", "spec/two-disks.vma.zst", "zstd1"),
    ("spec-two-disks.vma.gz", "spec/two-disks.vma.gz", "gzip"),
]
LARGE_VECTOR_BASES = [
    ("pve-2disks.vma", "proxmox/sample-2disks.vma", "plain"),
    ("pve-1disk-nocfg.vma", "proxmox/sample-1disk-nocfg.vma", "plain"),
    ("pve-2disks.vma.zst", "proxmox/sample-2disks.vma.zst", "zstd1"),
]


def build_bases(work: Path, vectors: Path = VECTORS, *, large: bool = False) -> dict[str, Base]:
    """vmafs's own archives (plain and seekable zstd, indexed) plus the vectors present."""
    from vmafs.cli import main

    work.mkdir(parents=True, exist_ok=True)
    args = _write_images(work)
    bases: dict[str, Base] = {}
    for name, container in (("vmafs.vma", "plain"), ("vmafs.vma.zst", "seekable")):
        out = work / name
        if not out.exists():
            with captured():
                rc = main(["create", "-q", "-o", str(out), *args])
            if rc:
                raise RuntimeError(f"vmafs create {name} failed")
        bases[name] = Base(name, out, container, True)
    for name, rel, container in VECTOR_BASES + (LARGE_VECTOR_BASES if large else []):
        path = vectors / rel
        if path.is_file():
            bases[name] = Base(name, path, container, False)
    return bases


# -- containers --------------------------------------------------------------------------------

@dataclass
class Decoded:
    """A container read the way its own tool reads it, front to back."""

    stream: bytes
    clean: bool  # every byte of the file belongs to a frame/member that decoded and checked
    why: str = ""
    d_ends: list[int] = field(default_factory=list)  # decompressed end of each data frame


def decode(container: str, data: bytes) -> Decoded:
    if container == "plain":
        return Decoded(data, True)
    if container == "gzip":
        try:
            return Decoded(gzip.decompress(data), True)
        except (OSError, EOFError, zlib_error()) as exc:
            return Decoded(b"", False, f"gzip: {exc}")
    return _decode_zstd(data)


def zlib_error() -> type[Exception]:
    import zlib
    return zlib.error


def _decode_zstd(data: bytes) -> Decoded:
    """Frames in order, skippable ones skipped; a frame is kept only once it decoded whole
    (its content checksum checked)."""
    out = bytearray()
    ends: list[int] = []
    pos = 0
    dctx = zstandard.ZstdDecompressor()
    while pos < len(data):
        magic = data[pos:pos + 4]
        if len(magic) == 4 and 0x184D2A50 <= struct.unpack("<I", magic)[0] <= 0x184D2A5F:
            if pos + 8 > len(data):
                return Decoded(bytes(out), False, "cut skippable frame", ends)
            size = struct.unpack_from("<I", data, pos + 4)[0]
            if pos + 8 + size > len(data):
                return Decoded(bytes(out), False, "cut skippable frame", ends)
            pos += 8 + size
            continue
        if magic != ZSTD_MAGIC:
            return Decoded(bytes(out), False, f"no zstd frame at {pos}", ends)
        obj = dctx.decompressobj()
        frame = bytearray()
        fed = pos
        try:
            while fed < len(data) and not obj.eof:
                chunk = data[fed:fed + (1 << 20)]
                frame += obj.decompress(chunk)
                fed += len(chunk)
                if len(frame) > 256 * MiB:
                    return Decoded(bytes(out), False, f"frame at {pos} too big", ends)
        except zstandard.ZstdError as exc:
            return Decoded(bytes(out), False, f"frame at {pos}: {exc}", ends)
        if not obj.eof:
            return Decoded(bytes(out), False, f"frame at {pos} cut", ends)
        pos = fed - len(obj.unused_data)
        out += frame
        ends.append(len(out))
    return Decoded(bytes(out), True, "", ends)


def encode_seekable(stream: bytes, ends: list[int]) -> bytes:
    """Frames ending at `ends` (clipped to the stream) plus a seek table, as vmafs writes."""
    cuts = sorted({e for e in ends if 0 < e < len(stream)} | {len(stream)})
    params = zstandard.ZstdCompressionParameters.from_level(1, write_checksum=True,
                                                            write_content_size=True)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    parts, entries, start = [], [], 0
    for end in cuts if stream else []:
        frame = cctx.compress(stream[start:end])
        parts.append(frame)
        entries.append((len(frame), end - start))
        start = end
    parts.append(seek_table(entries))
    return b"".join(parts)


def seek_table(entries: list[tuple[int, int]], *, frames: int | None = None,
               descriptor: int = 0) -> bytes:
    body = b"".join(struct.pack("<II", c, d) for c, d in entries)
    n = len(entries) if frames is None else frames
    size = len(body) + 9
    return struct.pack("<II", SKIP_SEEK, size) + body + struct.pack("<IBI", n, descriptor,
                                                                     SEEK_MAGIC)


def encode(container: str, stream: bytes, ends: list[int]) -> bytes:
    if container == "plain":
        return stream
    if container == "seekable":
        return encode_seekable(stream, ends)
    if container == "zstd1":
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(stream)
    return gzip.compress(stream, compresslevel=1, mtime=0)


def parse_seek_table(data: bytes) -> list[tuple[int, int]] | None:
    """(compressed, decompressed) entries of a seekable file's table, or None."""
    if len(data) < 17 or struct.unpack_from("<I", data, len(data) - 4)[0] != SEEK_MAGIC:
        return None
    n, desc = struct.unpack_from("<IB", data, len(data) - 9)
    width = 12 if desc & 0x80 else 8
    start = len(data) - 9 - n * width
    if start < 8:
        return None
    return [struct.unpack_from("<II", data, start + i * width) for i in range(n)]


# -- a lenient layout of a plain stream (for choosing where to mutate) -------------------------

@dataclass
class Extent:
    offset: int
    block_count: int
    slots: list[tuple[int, int, int, int]]  # (slot index, dev_id, cluster, mask)

    @property
    def size(self) -> int:
        return EXT + self.block_count * BLOCK

    @property
    def null(self) -> bool:
        return not self.slots

    def payload(self, stream: bytes) -> bytes:
        return null_payload(stream[self.offset:self.offset + EXT])

    def slot_data(self, i: int) -> tuple[int, int]:
        """(stream offset, length) of the data of the i-th used slot."""
        pos = self.offset + EXT
        for k, (_, _, _, mask) in enumerate(self.slots):
            n = popcount(mask) * BLOCK
            if k == i:
                return pos, n
            pos += n
        raise IndexError(i)


@dataclass
class Layout:
    header_size: int
    uuid: bytes
    sizes: dict[int, int]
    extents: list[Extent]

    @property
    def data_extents(self) -> list[Extent]:
        return [e for e in self.extents if e.slots and e.block_count]

    @property
    def nulls(self) -> list[Extent]:
        return [e for e in self.extents if e.null]


def layout(stream: bytes) -> Layout:
    """Header size, uuid and the extents whose md5 holds, from the start until one does not."""
    header_size = struct.unpack_from(">I", stream, 56)[0] if len(stream) >= 60 else 0
    uuid = stream[8:24]
    sizes = {}
    for dev_id in range(1, 256):
        if 4096 + 32 * dev_id + 16 <= len(stream):
            size = struct.unpack_from(">Q", stream, 4096 + 32 * dev_id + 8)[0]
            if size:
                sizes[dev_id] = size
    extents = []
    pos = header_size if header_size > 12288 else len(stream)
    while pos + EXT <= len(stream):
        raw = stream[pos:pos + EXT]
        if raw[:4] != b"VMAE" or md5_of_extent(raw) != raw[24:40]:
            break
        bc = struct.unpack_from(">H", raw, 6)[0]
        slots = []
        for s in range(SLOTS):
            info = struct.unpack_from(">Q", raw, 40 + 8 * s)[0]
            if info >> 32 & 0xFF:
                slots.append((s, info >> 32 & 0xFF, info & 0xFFFFFFFF, info >> 48))
        extents.append(Extent(pos, bc, slots))
        pos += EXT + bc * BLOCK
    return Layout(header_size, uuid, sizes, extents)


def md5_of_extent(raw: bytes | bytearray) -> bytes:
    h = bytearray(raw[:EXT])
    h[24:40] = bytes(16)
    return hashlib.md5(h).digest()


def reseal(buf: bytearray, pos: int) -> None:
    buf[pos + 24:pos + 40] = bytes(16)
    buf[pos + 24:pos + 40] = hashlib.md5(buf[pos:pos + EXT]).digest()


def null_payload(raw: bytes) -> bytes:
    return b"".join(raw[40 + 8 * s:40 + 8 * s + 3] + raw[40 + 8 * s + 4:40 + 8 * s + 8]
                    for s in range(SLOTS))


def null_extents(uuid: bytes, payload: bytes) -> bytes:
    out = bytearray()
    for start in range(0, max(len(payload), 1), NULL_PAYLOAD):
        chunk = payload[start:start + NULL_PAYLOAD].ljust(NULL_PAYLOAD, b"\0")
        raw = bytearray(b"VMAE\0\0\0\0" + uuid + bytes(16))
        for s in range(SLOTS):
            c = chunk[7 * s:7 * s + 7]
            raw += c[:3] + b"\0" + c[3:]
        reseal(raw, 0)
        out += raw
    return bytes(out)


def set_slot(buf: bytearray, ext: Extent, slot: int, dev_id: int, cluster: int,
             mask: int) -> None:
    struct.pack_into(">Q", buf, ext.offset + 40 + 8 * slot,
                     mask << 48 | dev_id << 32 | cluster & 0xFFFFFFFF)


# -- our index, read and written independently ------------------------------------------------

@dataclass
class Index:
    rows: list[tuple[int, int, int, int]]      # (dev_id, cluster, mask, checksum), slot order
    extents: list[tuple[int, int]]             # (offset, stored slots)
    offset: int = 0                            # footer's index_offset
    length: int = 0


def encode_index(idx: Index) -> bytes:
    head = struct.pack("<8sIIQQ", INDEX_MAGIC, 1, 0, len(idx.extents), len(idx.rows))
    cols = [b"".join(struct.pack("<Q", o) for o, _ in idx.extents),
            b"".join(struct.pack("<H", n) for _, n in idx.extents),
            b"".join(struct.pack("<I", r[1]) for r in idx.rows),
            b"".join(struct.pack("<H", r[2]) for r in idx.rows),
            bytes(r[0] for r in idx.rows),
            b"".join(struct.pack("<I", r[3]) for r in idx.rows)]
    return head + b"".join(cols)


def decode_index(blob: bytes) -> Index | None:
    if len(blob) < 32 or blob[:8] != INDEX_MAGIC:
        return None
    _, version, _, n_ext, n_slots = struct.unpack_from("<8sIIQQ", blob)
    if version != 1 or 32 + 10 * n_ext + 11 * n_slots != len(blob):
        return None
    pos = 32
    offs = struct.unpack_from(f"<{n_ext}Q", blob, pos)
    pos += 8 * n_ext
    counts = struct.unpack_from(f"<{n_ext}H", blob, pos)
    pos += 2 * n_ext
    clusters = struct.unpack_from(f"<{n_slots}I", blob, pos)
    pos += 4 * n_slots
    masks = struct.unpack_from(f"<{n_slots}H", blob, pos)
    pos += 2 * n_slots
    devs = blob[pos:pos + n_slots]
    pos += n_slots
    sums = struct.unpack_from(f"<{n_slots}I", blob, pos)
    return Index(list(zip(devs, clusters, masks, sums, strict=True)),
                 list(zip(offs, counts, strict=True)))


def footer_extent(uuid: bytes, offset: int, length: int, check: int, fields: bytes = b""
                  ) -> bytes:
    return null_extents(uuid, struct.pack("<8sIQQI", FOOTER_MAGIC, 1, offset, length, check)
                        + fields)


def read_trailer(stream: bytes, lay: Layout) -> tuple[Index, int] | None:
    """Our index and footer offset if the stream ends with a sound-looking footer."""
    if not lay.extents or not lay.extents[-1].null:
        return None
    foot = lay.extents[-1]
    p = foot.payload(stream)
    if p[:8] != FOOTER_MAGIC:
        return None
    _, _, off, length, _ = struct.unpack_from("<8sIQQI", p)
    n = max(1, -(-length // NULL_PAYLOAD))
    if off + n * EXT != foot.offset:
        return None
    blob = b"".join(null_payload(stream[off + i * EXT:off + (i + 1) * EXT])
                    for i in range(n))[:length]
    idx = decode_index(blob)
    if idx is None:
        return None
    idx.offset, idx.length = off, length
    return idx, foot.offset


def index_trailer(idx: Index, uuid: bytes, at: int, fields: bytes = b"") -> bytes:
    """Index null extents starting at stream offset `at`, then the footer (with `fields`)."""
    blob = encode_index(idx)
    return null_extents(uuid, blob) + footer_extent(uuid, at, len(blob), xxh32low(blob), fields)


def walked_index(stream: bytes, lay: Layout) -> Index:
    """The index that honestly describes the data extents of a layout."""
    rows, exts = [], []
    for e in lay.data_extents:
        n = 0
        for k, (_, d, c, m) in enumerate(e.slots):
            if m:
                off, ln = e.slot_data(k)
                rows.append((d, c, m, xxh32low(stream[off:off + ln])))
                n += 1
        if n:
            exts.append((e.offset, n))
    return Index(rows, exts)


# -- the reference reader ----------------------------------------------------------------------

@dataclass
class RefDevice:
    name: str
    size: int
    decided: bytearray  # per cluster: 1 = decided (image holds its bytes), 0 = undecided
    seen: bytearray
    image: dict[int, bytearray] = field(default_factory=dict)  # written clusters only
    # block-summed archives: of an undecided cluster, the 4 KiB blocks (bits) still decided:
    # those not stored (the index says zeros) and those its sound sums prove
    blocks: dict[int, int] = field(default_factory=dict)

    def decides(self, off: int, end: int) -> bool:
        """Every byte of [off, end) decided: its cluster, or its block of it."""
        for c in range(off // CLUSTER, (end - 1) // CLUSTER + 1):
            if self.decided[c]:
                continue
            bits = self.blocks.get(c)
            if bits is None:
                return False
            lo, hi = max(off, c * CLUSTER) - c * CLUSTER, min(end, (c + 1) * CLUSTER) - c * CLUSTER
            want = (1 << ((hi - 1) // BLOCK + 1)) - (1 << (lo // BLOCK))
            if want & ~bits:
                return False
        return True

    def write(self, start: int, data: bytes) -> None:
        while data:
            c, at = divmod(start, CLUSTER)
            buf = self.image.setdefault(c, bytearray(CLUSTER))
            n = min(len(data), CLUSTER - at)
            buf[at:at + n] = data[:n]
            data, start = data[n:], start + n

    def read(self, off: int, end: int) -> bytes:
        out = bytearray()
        while off < end:
            c, at = divmod(off, CLUSTER)
            n = min(end - off, CLUSTER - at)
            buf = self.image.get(c)
            out += buf[at:at + n] if buf is not None else bytes(n)
            off += n
        return bytes(out)


@dataclass
class Reference:
    """What Proxmox's `vma extract` makes of a stream, plus issue 8's stricter rules."""

    header_ok: bool
    why: str = ""
    devices: dict[int, RefDevice] = field(default_factory=dict)
    configs: dict[str, bytes] = field(default_factory=dict)
    clean: bool = False
    problems: list[str] = field(default_factory=list)
    index_claimed: bool = False
    index_sound: bool = False

    def piece(self, dev_id: int, off: int, length: int) -> bytes | None:
        """The decided bytes of [off, off+length) (clipped), or None if undecided."""
        dev = self.devices.get(dev_id)
        if dev is None:
            return None
        end = min(off + length, dev.size)
        if off >= end:
            return b""
        if not dev.decides(off, end):
            return None
        return dev.read(off, end)


def _near(a: bytes, b: bytes, bits: int = 4) -> bool:
    if len(a) != len(b):
        return False
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True)) <= bits


def reference(stream: bytes, container_clean: bool = True, container_why: str = ""
              ) -> Reference:
    ref = Reference(False)
    if not _ref_header(stream, ref):
        return ref
    if not container_clean:
        ref.problems.append(f"container: {container_why}")
    hsize = struct.unpack_from(">I", stream, 56)[0]
    uuid = stream[8:24]
    pos = hsize
    stored: list[tuple[int, list[tuple[int, int, int, int, int]]]] = []  # for the index check
    nulls: list[tuple[int, bytes]] = []
    broken_raw = b""
    complete = True
    while pos < len(stream):
        why, ext_slots, size = _ref_extent(stream, pos, uuid, ref)
        if why:
            ref.problems.append(f"{why} at {pos}")
            broken_raw = stream[pos:pos + EXT]
            complete = False
            break
        if ext_slots:
            stored.append((pos, ext_slots))
        else:
            nulls.append((pos, null_payload(stream[pos:pos + EXT])))
        pos += size
    # clusters of extents walked: decided; never seen: undecided
    for dev in ref.devices.values():
        n = len(dev.seen)
        dev.decided[:] = dev.seen
        if not all(dev.seen) and complete:
            ref.problems.append(f"missing clusters of {dev.name}")
        del n
    # our index
    claimed = any(p[:8] in (INDEX_MAGIC, FOOTER_MAGIC) for _, p in nulls)
    if len(broken_raw) >= 56:
        bp = null_payload(broken_raw.ljust(EXT, b"\0"))[:8]
        claimed = claimed or _near(bp, INDEX_MAGIC) or _near(bp, FOOTER_MAGIC)
    ref.index_claimed = claimed
    if claimed:
        sound, bad, proven = _ref_index(stream, hsize, uuid, stored, nulls)
        ref.index_sound = sound
        if not sound:
            ref.problems.append("index present but not sound")
            for _, slots in stored:
                for d, c, m, _, _ in slots:
                    if m and d in ref.devices:
                        ref.devices[d].decided[c] = 0
        for d, c in bad:
            ref.problems.append(f"checksum of cluster {c} of device {d}")
            ref.devices[d].decided[c] = 0
        for (d, c), bits in proven.items():
            ref.devices[d].blocks[c] = bits
        if sound and not _ref_header_digest_holds(stream, nulls[-1][1]):
            ref.problems.append("the header does not match the index's header digest")
    ref.clean = complete and not ref.problems
    return ref


def _ref_header(stream: bytes, ref: Reference) -> bool:
    if len(stream) < 12288:
        ref.why = "can't read vma header"
        return False
    if stream[:4] != b"VMA\0":
        ref.why = "wrong magic"
        return False
    hsize = struct.unpack_from(">I", stream, 56)[0]
    if struct.unpack(">i", struct.pack(">I", (hsize - 12288) & 0xFFFFFFFF))[0] <= 0:
        ref.why = "wrong vma header size"
        return False
    if len(stream) < hsize:
        ref.why = "can't read vma header data"
        return False
    head = bytearray(stream[:hsize])
    head[32:48] = bytes(16)
    if hashlib.md5(head).digest() != stream[32:48]:
        ref.why = "wrong vma header checksum"
        return False
    if struct.unpack_from(">I", stream, 4)[0] != 1:
        ref.why = "wrong version"
        return False
    boff, bsize = struct.unpack_from(">II", stream, 48)
    if boff < 12288 or (boff + bsize) & 0xFFFFFFFF > hsize or boff + bsize > hsize:
        ref.why = "wrong blob buffer"
        return False
    area = stream[boff:boff + bsize]
    blobs: dict[int, bytes] = {}
    p = 1
    while p + 2 <= len(area):
        n = area[p] | area[p + 1] << 8
        if p + 2 + n <= len(area):
            blobs[p] = area[p + 2:p + 2 + n]
        p += 2 + n
    total = 0
    for dev_id in range(1, 255):
        ptr, size = struct.unpack_from(">I4xQ", stream, 4096 + 32 * dev_id)
        blob = blobs.get(ptr)
        if size and blob is not None and blob.endswith(b"\0"):
            name = blob.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if name == "vmstate":
                continue
            total += size
            if total > REFERENCE_LIMIT:
                ref.why = "devices too big for the reference"
                return False
            n = -(-size // CLUSTER)
            ref.devices[dev_id] = RefDevice(name, size, bytearray(n), bytearray(n))
    for i in range(256):
        n_ptr = struct.unpack_from(">I", stream, 2044 + 4 * i)[0]
        d_ptr = struct.unpack_from(">I", stream, 3068 + 4 * i)[0]
        if not n_ptr or not d_ptr:
            continue
        nb, db = blobs.get(n_ptr), blobs.get(d_ptr)
        if nb is None or db is None or not nb.endswith(b"\0"):
            ref.why = "vma contains invalid data pointers"
            ref.devices = {}
            return False
        ref.configs[nb.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")] = db
    ref.header_ok = True
    return True


def _ref_header_digest_holds(stream: bytes, footer: bytes) -> bool:
    """Our footer's header digest (typed field 1 after its fixed 32 bytes), if it carries
    one, against the reference's own digest of the header."""
    digest = None
    for kind, value in footer_fields(footer):
        if kind == 1:
            digest = value
    return digest is None or digest == _ref_header_sha256(stream)


def _ref_header_sha256(stream: bytes) -> bytes:
    """SHA-256 of what the header says: uuid, ctime, devices 1..254 and vmstate (which may be
    255) by id with name and size, configs in table order with name and data (the header
    digest of vmafs/format/index.py, computed independently)."""
    boff, bsize = struct.unpack_from(">II", stream, 48)
    area = stream[boff:boff + bsize]
    blobs: dict[int, bytes] = {}
    p = 1
    while p + 2 <= len(area):
        n = area[p] | area[p + 1] << 8
        if p + 2 + n <= len(area):
            blobs[p] = area[p + 2:p + 2 + n]
        p += 2 + n

    def c_string(ptr: int) -> bytes | None:
        blob = blobs.get(ptr)
        return blob.split(b"\0", 1)[0] if blob is not None and blob.endswith(b"\0") else None

    devices = []
    for dev_id in range(1, 256):
        ptr, size = struct.unpack_from(">I4xQ", stream, 4096 + 32 * dev_id)
        name = c_string(ptr) if ptr else None
        if size and name is not None and (dev_id < 255 or name == b"vmstate"):
            devices.append(struct.pack("<BQI", dev_id, size, len(name)) + name)
    configs = []
    for i in range(256):
        n_ptr, d_ptr = (struct.unpack_from(">I", stream, at + 4 * i)[0] for at in (2044, 3068))
        name = c_string(n_ptr) if n_ptr and d_ptr else None
        if name is not None and d_ptr in blobs:
            data = blobs[d_ptr]
            configs.append(struct.pack("<II", len(name), len(data)) + name + data)
    ctime = struct.unpack_from(">q", stream, 24)[0]
    return hashlib.sha256(b"vmafs-header-1\0" + stream[8:24] + struct.pack("<qI", ctime,
                                                                            len(devices))
                          + b"".join(devices) + struct.pack("<I", len(configs))
                          + b"".join(configs)).digest()


def _ref_extent(stream: bytes, pos: int, uuid: bytes, ref: Reference
                ) -> tuple[str, list[tuple[int, int, int, int, int]], int]:
    """(problem or "", stored slots (dev, cluster, mask, data offset, length), size); applies
    the extent's writes to the reference only if the whole extent is good."""
    raw = stream[pos:pos + EXT]
    if len(raw) < EXT:
        return "read short extent", [], 0
    if md5_of_extent(raw) != raw[24:40]:
        return "wrong vma extent header checksum", [], 0
    if raw[8:24] != uuid:
        return "wrong vma extent uuid", [], 0
    if raw[:6] != b"VMAE\0\0":
        return "wrong vma extent header magic", [], 0
    bc = struct.unpack_from(">H", raw, 6)[0]
    size = EXT + bc * BLOCK
    if size > MAX_EXTENT or pos + size > len(stream):
        return "short vma extent", [], 0
    dpos = pos + EXT
    writes: list[tuple[RefDevice, int, int, int]] = []  # (dev, start, data offset, length)
    staged: set[tuple[int, int]] = set()
    slots = []
    for s in range(SLOTS):
        info = struct.unpack_from(">Q", raw, 40 + 8 * s)[0]
        d = info >> 32 & 0xFF
        if not d:
            continue
        mask, c = info >> 48, info & 0xFFFFFFFF
        dev = ref.devices.get(d)
        if dev is None:
            return f"got wrong dev id {d}", [], 0
        nclusters = len(dev.seen)
        capacity = -(-(dev.size // 512) // 8192) * 64
        if c >= capacity:
            return "cluster beyond the bitmap", [], 0
        if (c < nclusters and dev.seen[c]) or (d, c) in staged:
            return f"found duplicated cluster {c}", [], 0
        staged.add((d, c))
        max_sector = dev.size // 512
        n = popcount(mask) * BLOCK
        if dpos + n > pos + size:
            return "short vma extent - too many blocks", [], 0
        if mask == 0xFFFF:
            if c * 128 >= max_sector:
                return "write beyond end", [], 0
            writes.append((dev, c * CLUSTER, dpos, CLUSTER))
        elif mask:
            q = dpos
            for j in range(16):
                if mask >> j & 1:
                    if (c * CLUSTER + j * BLOCK) // 512 >= max_sector:
                        return "write beyond end", [], 0
                    writes.append((dev, c * CLUSTER + j * BLOCK, q, BLOCK))
                    q += BLOCK
        slots.append((d, c, mask, dpos, n))
        dpos += n
    if dpos != pos + size:
        return "vma extent error - missing blocks", [], 0
    for dev, start, off, length in writes:
        end = min(start + length, dev.size)
        dev.write(start, stream[off:off + end - start])
    for d, c, _, _, _ in slots:
        dev = ref.devices[d]
        if c < len(dev.seen):
            dev.seen[c] = 1
    return "", [s for s in slots if s[2]], size


def _ref_index(stream: bytes, hsize: int, uuid: bytes,
               stored: list[tuple[int, list[tuple[int, int, int, int, int]]]],
               nulls: list[tuple[int, bytes]]
               ) -> tuple[bool, list[tuple[int, int]], dict[tuple[int, int], int]]:
    """(sound, clusters whose data fails its checksum, the blocks of those still decided in a
    block-summed archive). Sound: the footer is the last walked extent, the index null extents
    sit right before it, after every data extent, its checksum holds and its rows are exactly
    the walked stored slots."""
    no: tuple[bool, list[tuple[int, int]], dict[tuple[int, int], int]] = (False, [], {})
    if not nulls or nulls[-1][1][:8] != FOOTER_MAGIC:
        return no
    foot_off, p = nulls[-1]
    _, version, off, length, check = struct.unpack_from("<8sIQQI", p)
    n = max(1, -(-length // NULL_PAYLOAD))
    if version != 1 or off + n * EXT != foot_off or off < hsize:
        return no
    if stored and off < stored[-1][0]:
        return no
    by_off = dict(nulls)
    parts = [by_off.get(off + i * EXT) for i in range(n)]
    if any(q is None for q in parts):
        return no
    blob = b"".join(q for q in parts if q is not None)[:length]
    if len(blob) != length or xxh32low(blob) != check:
        return no
    idx = decode_index(blob)
    if idx is None:
        return no
    exts = [(o, len(s)) for o, s in stored]
    rows = [(d, c, m) for _, s in stored for d, c, m, _, _ in s]
    if idx.extents != exts or [r[:3] for r in idx.rows] != rows:
        return no
    bad = []
    proven: dict[tuple[int, int], int] = {}
    block_sums = any(k == FIELD_BLOCK_SUMS for k, _ in footer_fields(p))
    check = summed if block_sums else xxh32low
    ends = {o: max(dp + dl for _, _, _, dp, dl in s) for o, s in stored}
    for (d, c, m, check_row), (eo, slot) in zip(idx.rows, [(o, x) for o, s in stored
                                                            for x in s], strict=True):
        doff, dlen = slot[3], slot[4]
        if check(stream[doff:doff + dlen]) == check_row:
            continue
        bad.append((d, c))
        if block_sums:
            proven[(d, c)] = _ref_proven_blocks(stream, by_off, ends[eo], eo, doff, m, check_row)
    return True, bad, proven


def _ref_proven_blocks(stream: bytes, by_off: dict[int, bytes], end: int, ext: int, doff: int,
                       mask: int, check: int) -> int:
    """The blocks of a cluster that fails its check which a reader may still serve: those
    not stored (zeros, as the index says) and, if the cluster's sums in the walked null
    extents after its data extent hash to its check, the stored ones matching their sum."""
    bits = ~mask & 0xFFFF
    blocks = (end - ext - EXT) // BLOCK
    parts = [by_off.get(end + k * EXT) for k in range(-(-4 * blocks // NULL_PAYLOAD))]
    if any(q is None for q in parts):
        return bits
    payload = b"".join(q for q in parts if q is not None)
    first = (doff - ext - EXT) // BLOCK
    sums = payload[4 * first:4 * (first + popcount(mask))]
    if xxh32low(sums) != check:
        return bits
    k = 0
    for j in range(16):
        if mask >> j & 1:
            at = doff + k * BLOCK
            if xxh32low(stream[at:at + BLOCK]) == struct.unpack_from("<I", sums, 4 * k)[0]:
                bits |= 1 << j
            k += 1
    return bits





# -- mutations ---------------------------------------------------------------------------------

KINDS = ("none", "flip", "overwrite", "truncate", "append", "reseal", "forge", "seektable",
         "combo", "header", "sums")


@dataclass
class BaseInfo:
    base: Base
    raw: bytes
    decoded: Decoded
    lay: Layout

    @property
    def stream(self) -> bytes:
        return self.decoded.stream


def base_info(base: Base) -> BaseInfo:
    raw = base.path.read_bytes()
    dec = decode(base.container, raw)
    return BaseInfo(base, raw, dec, layout(dec.stream))


@dataclass(frozen=True)
class Mutant:
    base: str
    kind: str
    seed: int
    params: str
    data: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.base}:{self.kind}:{self.seed}"

    @property
    def repro(self) -> str:
        return (f"python3 tools/mutate_archives.py --base {self.base} --kind {self.kind} "
                f"--seed {self.seed} -v   # {self.params}")


Params = dict[str, Any]


def _region(info: BaseInfo, rng: random.Random) -> tuple[str, int, int]:
    """An interesting stretch of the plain stream: (name, start, end)."""
    s, lay = info.stream, info.lay
    choices: list[tuple[str, int, int]] = [("header", 0, min(lay.header_size, len(s)))]
    data_ext = lay.data_extents
    if data_ext:
        e = rng.choice(data_ext)
        choices.append(("extent-header", e.offset, e.offset + EXT))
        choices.append(("extent-slots", e.offset + 40, e.offset + 40 + 8 * max(
            (k for k, *_ in e.slots), default=0) + 8))
        choices.append(("extent-md5", e.offset + 24, e.offset + 40))
        choices.append(("block-count", e.offset + 6, e.offset + 8))
        choices.append(("data", e.offset + EXT, e.offset + e.size))
        choices.append(("data", e.offset + EXT, e.offset + e.size))
    runs = sums_runs(info)
    if runs:
        run = rng.choice(runs)
        choices.append(("sums", run[0].offset, run[-1].offset + EXT))
    nulls = [e for e in lay.nulls if e.offset > (data_ext[-1].offset if data_ext else 0)
             and not any(e is x for r in runs for x in r)]
    if len(nulls) > 1:
        e = rng.choice(nulls[:-1])
        choices.append(("index", e.offset, e.offset + EXT))
    if nulls:
        choices.append(("footer", nulls[-1].offset, nulls[-1].offset + EXT))
        choices.append(("footer-fields", nulls[-1].offset + 40, nulls[-1].offset + 80))
    choices.append(("anywhere", 0, len(s)))
    return rng.choice([c for c in choices if c[2] > c[1]])


def _file_region(info: BaseInfo, rng: random.Random) -> tuple[str, int, int]:
    """An interesting stretch of a compressed file."""
    raw = info.raw
    choices = [("file-anywhere", 0, len(raw)), ("file-start", 0, min(64, len(raw)))]
    table = parse_seek_table(raw) if info.base.container == "seekable" else None
    if table:
        tsize = 8 + 8 * len(table) + 9
        choices.append(("seek-table", len(raw) - tsize, len(raw)))
        starts = [0]
        for c, _ in table:
            starts.append(starts[-1] + c)
        i = rng.randrange(len(table))
        choices.append(("frame-header", starts[i], min(starts[i] + 18, starts[i + 1])))
        choices.append(("frame-body", starts[i], starts[i + 1]))
        choices.append(("last-frames", starts[max(0, len(table) - 2)], starts[-1]))
    else:
        choices.append(("file-end", max(0, len(raw) - 64), len(raw)))
    return rng.choice(choices)


def _reencode(info: BaseInfo, stream: bytes) -> bytes:
    return encode(info.base.container, stream, info.decoded.d_ends)


def _flip(info: BaseInfo, rng: random.Random, p: Params) -> bytes:
    compressed = info.base.container != "plain"
    if compressed and rng.random() < 0.5:
        region, lo, hi = _file_region(info, rng)
        buf = bytearray(info.raw)
        p["level"] = "file"
    else:
        region, lo, hi = _region(info, rng)
        buf = bytearray(info.stream)
    p["region"] = region
    bits = rng.choice((1, 1, 1, 2, 3))
    p["at"] = []
    for _ in range(bits):
        at = rng.randrange(lo, hi)
        bit = rng.randrange(8)
        buf[at] ^= 1 << bit
        p["at"].append((at, bit))
    return bytes(buf) if p.get("level") == "file" or not compressed else _reencode(
        info, bytes(buf))


def _overwrite(info: BaseInfo, rng: random.Random, p: Params) -> bytes:
    compressed = info.base.container != "plain"
    file_level = compressed and rng.random() < 0.5
    region, lo, hi = _file_region(info, rng) if file_level else _region(info, rng)
    buf = bytearray(info.raw if file_level else info.stream)
    n = rng.choice((1, 4, 8, 16, 64, 512))
    at = rng.randrange(lo, hi)
    fill = rng.choice(("zero", "ff", "random"))
    chunk = {"zero": bytes(n), "ff": b"\xff" * n, "random": rng.randbytes(n)}[fill]
    buf[at:at + n] = chunk[:len(buf) - at]
    p.update(level="file" if file_level else "stream", region=region, at=at, n=n, fill=fill)
    return bytes(buf) if file_level or not compressed else _reencode(info, bytes(buf))


def _truncate(info: BaseInfo, rng: random.Random, p: Params) -> bytes:
    s, lay = info.stream, info.lay
    compressed = info.base.container != "plain"
    how = rng.choice(("extent-boundary", "extent-boundary", "random", "last-byte",
                      "in-footer", "in-header", "file-random" if compressed else "random"))
    p["how"] = how
    if how == "file-random":
        at = rng.randrange(1, len(info.raw))
        p["at"] = at
        return info.raw[:at]
    if how == "extent-boundary" and len(lay.extents) > 1:
        at = rng.choice(lay.extents[1:]).offset
    elif how == "last-byte":
        at = len(s) - 1
    elif how == "in-footer" and lay.extents:
        at = lay.extents[-1].offset + rng.randrange(1, EXT)
    elif how == "in-header":
        at = rng.randrange(1, max(2, lay.header_size))
    else:
        at = rng.randrange(1, len(s))
    p["at"] = at
    return _reencode(info, s[:at]) if compressed else s[:at]


def _append(info: BaseInfo, rng: random.Random, p: Params) -> bytes:
    s, lay = info.stream, info.lay
    what = rng.choice(("zeros", "junk", "footer-copy", "null-extent", "last-extent-copy"))
    if what == "zeros":
        extra = bytes(rng.choice((1, 100, 511, 512, 4096)))
    elif what == "junk":
        extra = rng.randbytes(rng.choice((7, 512, 3000)))
    elif what == "footer-copy":
        extra = s[-EXT:]
    elif what == "null-extent":
        extra = null_extents(lay.uuid, b"")
    else:
        last = lay.extents[-1] if lay.extents else None
        extra = s[last.offset:last.offset + last.size] if last else bytes(EXT)
    p.update(what=what, n=len(extra))
    if info.base.container == "plain":
        return s + extra
    if rng.random() < 0.5:  # after the container's end (zstd -d / gunzip see trailing junk)
        p["level"] = "file"
        return info.raw + extra
    p["level"] = "stream"
    return _reencode(info, s + extra)


def sums_runs(info: BaseInfo) -> list[list[Extent]]:
    """The null extents that carry each data extent's block sums (a footer with the sums
    carried field), one run per data extent; [] for an archive without them."""
    lay = info.lay
    if not lay.extents or not lay.extents[-1].null or not any(
            k == FIELD_SUMS_CARRIED
            for k, _ in footer_fields(lay.extents[-1].payload(info.stream))):
        return []
    by_offset = {e.offset: e for e in lay.extents}
    runs = []
    for d in lay.data_extents:
        n = -(-4 * d.block_count // NULL_PAYLOAD)
        run = [by_offset.get(d.offset + d.size + k * EXT) for k in range(n)]
        if all(e is not None and e.null for e in run):
            runs.append([e for e in run if e is not None])
    return runs


def _sums(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    """Damage to the block sums after the data extents: resealed (a valid null extent whose
    sums are wrong: reads fall back to whole clusters) or not (a broken extent, where
    Proxmox's reader stops), moved, dropped, or the footer's word for them taken away."""
    s, lay = info.stream, info.lay
    runs = sums_runs(info)
    if not runs:
        return None
    buf = bytearray(s)
    op = rng.choice(("payload-resealed", "payload-resealed", "payload", "zero-resealed",
                     "dev-id-resealed", "swap", "drop-run", "drop-field"))
    run = rng.choice(runs)
    p.update(op=op, run=run[0].offset)
    if op in ("payload-resealed", "payload"):
        e = rng.choice(run)
        at = e.offset + 40 + rng.choice([8 * k + b for k in range(SLOTS) for b in (0, 1, 2, 4, 5,
                                                                                  6, 7)])
        buf[at] ^= 1 << rng.randrange(8)
        p["at"] = at
        if op == "payload-resealed":
            reseal(buf, e.offset)
    elif op == "zero-resealed":
        for e in run:
            buf[e.offset:e.offset + EXT] = null_extents(lay.uuid, b"")
    elif op == "dev-id-resealed":  # a slot that Proxmox's reader no longer skips
        e = rng.choice(run)
        at = e.offset + 40 + 8 * rng.randrange(SLOTS) + 3
        buf[at] = rng.choice((1, 2, 7))
        reseal(buf, e.offset)
        p["at"] = at
    elif op == "swap":
        same = [r for r in runs if len(r) == len(run) and r[0].offset != run[0].offset]
        if not same:
            return None
        other = rng.choice(same)
        a, b, n = run[0].offset, other[0].offset, len(run) * EXT
        buf[a:a + n], buf[b:b + n] = s[b:b + n], s[a:a + n]
    elif op == "drop-run":
        del buf[run[0].offset:run[-1].offset + EXT]
    else:
        foot = lay.extents[-1]
        payload = foot.payload(s)
        drop = rng.choice(((FIELD_BLOCK_SUMS,), (FIELD_SUMS_CARRIED,),
                           (FIELD_BLOCK_SUMS, FIELD_SUMS_CARRIED)))
        p["dropped"] = drop
        kept = b"".join(struct.pack("<HH", k, len(v)) + v for k, v in footer_fields(payload)
                        if k not in drop)
        buf[foot.offset:foot.offset + EXT] = null_extents(lay.uuid, payload[:32] + kept)
    return _finish(info, bytes(buf))


def _data_slots(info: BaseInfo) -> list[tuple[Extent, int]]:
    return [(e, k) for e in info.lay.data_extents for k in range(len(e.slots))]


def _reseal(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    s, lay = info.stream, info.lay
    slots = _data_slots(info)
    if len(slots) < 2:
        return None
    buf = bytearray(s)
    op = rng.choice(("swap", "swap", "dup", "remove", "remove-zero", "mask", "devid",
                     "beyond", "block-count"))
    p["op"] = op
    e, k = rng.choice(slots)
    si, d, c, m = e.slots[k]
    touched = {e.offset}
    if op == "swap":
        same = [(e2, k2) for e2, k2 in slots if e2.slots[k2][1] == d
                and (e2.offset, k2) != (e.offset, k)]
        if not same:
            return None
        e2, k2 = rng.choice(same)
        s2, _, c2, m2 = e2.slots[k2]
        set_slot(buf, e, si, d, c2, m)
        set_slot(buf, e2, s2, d, c, m2)
        touched.add(e2.offset)
        p.update(a=(e.offset, c), b=(e2.offset, c2))
    elif op == "dup":
        others = [e2.slots[k2][2] for e2, k2 in slots if e2.slots[k2][1] == d
                  and e2.slots[k2][2] != c]
        if not others:
            return None
        c2 = rng.choice(others)
        set_slot(buf, e, si, d, c2, m)
        p.update(at=e.offset, cluster=c, now=c2)
    elif op in ("remove", "remove-zero"):
        want_zero = op == "remove-zero"
        cands = [(e2, k2) for e2, k2 in slots if (e2.slots[k2][3] == 0) == want_zero]
        if not cands:
            return None
        e, k = rng.choice(cands)
        si, d, c, m = e.slots[k]
        off, n = e.slot_data(k)
        set_slot(buf, e, si, 0, 0, 0)
        struct.pack_into(">H", buf, e.offset + 6, e.block_count - n // BLOCK)
        reseal(buf, e.offset)
        del buf[off:off + n]
        p.update(at=e.offset, cluster=c, dev=d)
        return _finish(info, bytes(buf))
    elif op == "mask":
        bit = rng.randrange(16)
        set_slot(buf, e, si, d, c, m ^ 1 << bit)
        p.update(at=e.offset, cluster=c, bit=bit)
    elif op == "devid":
        new = rng.choice([x for x in (*lay.sizes, 7, 255) if x != d])
        set_slot(buf, e, si, new, c, m)
        p.update(at=e.offset, cluster=c, dev=new)
    elif op == "beyond":
        n = -(-lay.sizes.get(d, CLUSTER) // CLUSTER)
        new = rng.choice((n, n + 1, n + 63, 0xFFFFFFFF))
        set_slot(buf, e, si, d, new, m)
        p.update(at=e.offset, cluster=new)
    else:
        delta = rng.choice((-1, 1, 16))
        struct.pack_into(">H", buf, e.offset + 6, max(0, e.block_count + delta) & 0xFFFF)
        p.update(at=e.offset, delta=delta)
    for t in touched:
        reseal(buf, t)
    return _finish(info, bytes(buf))


def _finish(info: BaseInfo, stream: bytes) -> bytes:
    return stream if info.base.container == "plain" else _reencode(info, stream)


def _forge(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    s, lay = info.stream, info.lay
    trailer = read_trailer(s, lay)
    if trailer is None:
        op = rng.choice(("in-last-cluster", "in-last-cluster", "appended"))
    else:
        op = rng.choice(("row-swap", "row-drop", "row-checksum", "offset-2^64", "length",
                         "footer-moved"))
    p["op"] = op
    if trailer is None:
        honest = walked_index(s, lay)
        lie = rng.choice(("swap", "honest"))
        p["lie"] = lie
        if op == "appended":
            idx = _lie(honest, lie, rng, p)
            return _finish(info, s + index_trailer(idx, lay.uuid, len(s)))
        # the guest's own data: the last stored blocks of the stream become index + footer
        if not lay.extents or lay.extents[-1].null or not honest.rows:
            return None
        last = lay.extents[-1]
        off, n = last.slot_data(len(last.slots) - 1)
        if off + n != len(s):
            return None
        # the index leaves out the cluster it sits in (its checksum would depend on itself)
        rows = honest.rows[:-1]
        exts = list(honest.extents)
        o, cnt = exts[-1]
        exts[-1] = (o, cnt - 1)
        if cnt - 1 == 0:
            exts.pop()
        idx = _lie(Index(rows, exts), lie, rng, p)
        blob_len = len(encode_index(idx))
        size = (max(1, -(-blob_len // NULL_PAYLOAD)) + 1) * EXT
        if size > n:
            return None
        at = len(s) - size
        return _finish(info, s[:at] + index_trailer(idx, lay.uuid, at))
    idx, foot = trailer
    buf = bytearray(s)
    fields = fields_bytes(lay.extents[-1].payload(s))  # header digest, block sums: kept
    if op in ("row-swap", "row-drop", "row-checksum"):
        idx = _lie(idx, {"row-swap": "swap", "row-drop": "drop",
                         "row-checksum": "checksum"}[op], rng, p)
        return _finish(info, s[:idx.offset] + index_trailer(idx, lay.uuid, idx.offset, fields))
    _, _, off, length, check = struct.unpack_from("<8sIQQI", lay.extents[-1].payload(s))
    if op == "offset-2^64":
        off = (1 << 64) - rng.choice((512, 1024, 4096 * 3))
    elif op == "length":
        length = max(0, length + rng.choice((-1, 1, 413, -413, 1 << 40)))
    else:
        off += rng.choice((-EXT, EXT))
    p.update(index_offset=off, index_length=length)
    buf[foot:] = footer_extent(lay.uuid, off, length, check, fields)
    return _finish(info, bytes(buf))


def _lie(idx: Index, lie: str, rng: random.Random, p: Params) -> Index:
    rows = list(idx.rows)
    exts = list(idx.extents)
    if lie == "swap":
        pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, min(len(rows), i + 40))
                 if rows[i][0] == rows[j][0] and rows[i][2] == rows[j][2]]
        if pairs:
            i, j = rng.choice(pairs)
            (d, ci, mi, si), (_, cj, mj, sj) = rows[i], rows[j]
            rows[i], rows[j] = (d, cj, mi, si), (d, ci, mj, sj)
            p["swapped"] = (ci, cj)
    elif lie == "drop" and len(rows) > 1:
        i = rng.randrange(len(rows))
        p["dropped"] = rows[i][:2]
        del rows[i]
        pos = 0
        for e, (o, n) in enumerate(exts):
            if pos <= i < pos + n:
                exts[e] = (o, n - 1)
                break
            pos += n
        exts = [x for x in exts if x[1]]
    elif lie == "checksum" and rows:
        i = rng.randrange(len(rows))
        d, c, m, sm = rows[i]
        rows[i] = (d, c, m, sm ^ 1 << rng.randrange(32))
        p["bad_checksum"] = (d, c)
    return Index(rows, exts, idx.offset, idx.length)


def _seektable(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    raw = info.raw
    table = parse_seek_table(raw)
    if info.base.container != "seekable" or not table or len(table) < 2:
        return None
    body = raw[:len(raw) - (8 + 8 * len(table) + 9)]
    entries = [list(e) for e in table]
    op = rng.choice(("merge", "merge", "dsize", "count", "shift", "checksum-flag", "drop",
                     "split"))
    p["op"] = op
    i = rng.randrange(len(entries) - 1)
    p["entry"] = i
    frames: int | None = None
    desc = 0
    if op == "merge":  # one entry covers frames i and i+1 but lists only frame i's size
        entries[i][0] += entries[i + 1][0]
        del entries[i + 1]
    elif op == "dsize":
        delta = rng.choice((4096, -4096, 512, entries[i][1], -entries[i][1], 1 << 20))
        entries[i][1] = max(0, entries[i][1] + delta)
        p["delta"] = delta
    elif op == "count":
        frames = len(entries) + rng.choice((-1, 1))
    elif op == "shift":
        k = rng.choice((1, 18, entries[i][0] // 2))
        entries[i][0] += k
        entries[i + 1][0] -= k
        p["k"] = k
    elif op == "checksum-flag":
        desc = 0x80
    elif op == "split":  # two entries for one frame
        c, d = entries[i]
        entries[i:i + 1] = [[c // 2, d // 2], [c - c // 2, d - d // 2]]
    else:
        return body
    return body + seek_table([(max(0, c) & 0xFFFFFFFF, max(0, d) & 0xFFFFFFFF)
                              for c, d in entries], frames=frames, descriptor=desc)


def _combo(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    """A flipped data byte plus damage to the trailer: the data must still not be served
    unchecked (issue 8, classes 3 and 11)."""
    s, lay = info.stream, info.lay
    slots = [(e, k) for e, k in _data_slots(info) if e.slots[k][3]]
    if not slots:
        return None
    e, k = rng.choice(slots)
    off, n = e.slot_data(k)
    buf = bytearray(s)
    at = rng.randrange(off, off + n)
    buf[at] ^= 1 << rng.randrange(8)
    how = rng.choice(("footer-flip", "append-512-zeros", "drop-footer", "index-flip",
                      "footer-reseal-junk"))
    p.update(data_at=at, cluster=e.slots[k][2], dev=e.slots[k][1], how=how)
    last = lay.extents[-1].offset if lay.extents else len(s) - EXT
    if how == "footer-flip":
        buf[last + 40 + rng.randrange(EXT - 40)] ^= 1 << rng.randrange(8)
    elif how == "append-512-zeros":
        buf += bytes(EXT)
    elif how == "drop-footer":
        del buf[last:]
    elif how == "index-flip":
        nulls = lay.nulls
        t = nulls[-2].offset if len(nulls) > 1 else last
        buf[t + rng.randrange(EXT)] ^= 1 << rng.randrange(8)
    else:  # footer payload junk, resealed: a valid null extent that is no footer
        buf[last + 40:last + EXT] = b"".join(rng.randbytes(3) + b"\0" + rng.randbytes(4)
                                             for _ in range(SLOTS))
        reseal(buf, last)
    return _finish(info, bytes(buf))


def _header(info: BaseInfo, rng: random.Random, p: Params) -> bytes | None:
    """A header edited and its md5 resealed, as a forger would (issue 13, items 7, 13, 14): a
    config byte, a device name byte, one device named like another, or a device size (sizes
    that are not whole sectors too); half the time the footer's header digest is resealed
    too (then only the VMA rules stand between the edit and a reader)."""
    s = bytearray(info.stream)
    hsize = info.lay.header_size
    if hsize <= 12288 or len(s) < hsize:
        return None
    boff = struct.unpack_from(">I", s, 48)[0]
    devs = [(d, ptr) for d in range(1, 255)
            for ptr, size in [struct.unpack_from(">I4xQ", s, 4096 + 32 * d)] if ptr and size]
    confs = [ptr for i in range(256) if (ptr := struct.unpack_from(">I", s, 3068 + 4 * i)[0])]

    def blob(ptr: int) -> tuple[int, int]:
        at = boff + ptr
        return at + 2, s[at] | s[at + 1] << 8

    what = rng.choice(("config", "name", "dup-name", "size", "size"))
    p["what"] = what
    if what == "config" and confs:
        at, n = blob(rng.choice(confs))
        if not n:
            return None
        s[at + rng.randrange(n)] ^= 1 << rng.randrange(7)
    elif what == "name" and devs:
        at, n = blob(rng.choice(devs)[1])
        if n < 2:
            return None
        s[at + rng.randrange(n - 1)] = rng.choice(b"abcXYZ019-_")
    elif what == "dup-name" and len(devs) > 1:
        (_, a), (_, b) = rng.sample(devs, 2)
        (at_a, n_a), (at_b, n_b) = blob(a), blob(b)
        if n_a != n_b:
            return None
        s[at_b:at_b + n_b] = s[at_a:at_a + n_a]
    elif what == "size" and devs:
        d = rng.choice(devs)[0]
        at = 4096 + 32 * d + 8
        size = struct.unpack_from(">Q", s, at)[0]
        new = size + rng.choice((-4096 - 256, -4096, -512, -256, -1, 1, 256, 512))
        if new <= 0:
            return None
        struct.pack_into(">Q", s, at, new)
        p["size"] = (d, size, new)
    else:
        return None
    s[32:48] = bytes(16)
    s[32:48] = hashlib.md5(s[:hsize]).digest()
    foot = info.lay.extents[-1] if info.lay.extents else None
    p["digest"] = "kept"
    if foot is not None and foot.null and rng.random() < 0.5:
        payload = bytearray(foot.payload(bytes(s)))
        if payload[:8] == FOOTER_MAGIC and struct.unpack_from("<HH", payload, 32) == (1, 32):
            payload[36:68] = _ref_header_sha256(bytes(s))
            s[foot.offset:foot.offset + EXT] = null_extents(info.lay.uuid, bytes(payload))
            p["digest"] = "resealed"
    return _finish(info, bytes(s))


GENERATORS: dict[str, Callable[[BaseInfo, random.Random, Params], bytes | None]] = {
    "none": lambda info, rng, p: info.raw,
    "flip": _flip, "overwrite": _overwrite, "truncate": _truncate, "append": _append,
    "reseal": _reseal, "forge": _forge, "seektable": _seektable, "combo": _combo,
    "header": _header, "sums": _sums,
}


def applicable(kind: str, base: Base) -> bool:
    if kind == "seektable":
        return base.container == "seekable"
    if kind == "sums":  # only plain archives carry block sums
        return base.container == "plain" and base.indexed
    return True


def make_mutant(info: BaseInfo, kind: str, seed: int) -> Mutant | None:
    """The mutant (base, kind, seed), or None where that kind has nothing to work on."""
    if not applicable(kind, info.base):
        return None
    rng = random.Random(f"{info.base.name}|{kind}|{seed}")
    params: Params = {}
    for _attempt in range(4):  # a generator may find nothing to do with this draw
        params = {}
        data = GENERATORS[kind](info, rng, params)
        if data is not None:
            text = json.dumps(params, default=str)
            return Mutant(info.base.name, kind, seed, text, data)
    return None


# -- running the reading paths -----------------------------------------------------------------

@dataclass
class Failure:
    path: str      # verify | extract | list | config | model | fs | cli | mount
    klass: str     # short class name, for the tables
    detail: str


@dataclass
class Outcome:
    mutant: Mutant
    verify_ok: bool | None = None
    strict: bool = False  # verify rejects what the reference finds clean (allowed; a note)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, path: str, klass: str, detail: str) -> None:
        self.failures.append(Failure(path, klass, detail[:300]))


@contextlib.contextmanager
def captured() -> Iterator[tuple[io.BytesIO, io.BytesIO]]:
    """sys.stdout/stderr (text and .buffer) into BytesIO, for in-process cli.main."""
    ob, eb = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(ob, encoding="utf-8", errors="replace", write_through=True)
    err = io.TextIOWrapper(eb, encoding="utf-8", errors="replace", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield ob, eb
    out.flush()
    err.flush()
    out.detach()  # a collected wrapper would close the BytesIO under the caller
    err.detach()


def run_cli(args: list[str]) -> tuple[int, bytes, str, BaseException | None]:
    """vmafs.cli.main in-process: (rc, stdout, stderr, exception that escaped main)."""
    from vmafs.cli import main

    with captured() as (ob, eb):
        try:
            rc = main(args)
            exc = None
        except SystemExit as e:
            rc, exc = (e.code if isinstance(e.code, int) else 2), None
        except Exception as e:  # noqa: BLE001 - anything escaping main is a finding
            rc, exc = 99, e
    return rc, ob.getvalue(), eb.getvalue().decode(errors="replace"), exc


class Watchdog:
    """Kill the process with a message and every thread's stack if one mutant takes longer
    than `seconds`: a hang must fail loudly, not stall the suite."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def _fire(self, what: str) -> None:
        os.write(2, f"\nHANG: {what} took more than {self.seconds} s\n".encode())
        faulthandler.dump_traceback(file=2, all_threads=True)
        os._exit(3)

    @contextlib.contextmanager
    def arm(self, what: str) -> Iterator[None]:
        self._timer = threading.Timer(self.seconds, self._fire, (what,))
        self._timer.daemon = True
        self._timer.start()
        try:
            yield
        finally:
            self._timer.cancel()


def pieces(devs: dict[int, int], rng: random.Random, random_pieces: int = 6
           ) -> list[tuple[int, int, int]]:
    """(dev_id, offset, length): every cluster of every disk, then random ranges."""
    out = []
    for dev_id, size in sorted(devs.items()):
        out += [(dev_id, off, CLUSTER) for off in range(0, size, CLUSTER)]
        for _ in range(random_pieces):
            off = rng.randrange(0, size + 2)
            out.append((dev_id, off, rng.choice((1, 511, 4096, 70000, 3 * CLUSTER + 5))))
        out.append((dev_id, max(0, size - 700), 4096))
    return out


def check_mutant(m: Mutant, base: Base, work: Path, *, fs: bool = True) -> Outcome:
    """Every in-process reading path on one mutant, judged by the oracle."""
    t0 = time.monotonic()
    out = Outcome(m)
    path = work / ("m" + base.name[base.name.index("."):] if "." in base.name else "m.vma")
    path.write_bytes(m.data)
    dec = decode(base.container, m.data)
    ref = reference(dec.stream, dec.clean, dec.why)
    p = str(path)

    rc, _, err, exc = run_cli(["verify", "-q", p])
    _no_traceback(out, "verify", err, exc)
    out.verify_ok = rc == 0
    if out.verify_ok and not ref.clean:
        out.fail("verify", "verify-passes-damaged", "; ".join(ref.problems or [ref.why]))
    out.strict = not out.verify_ok and ref.clean

    xdir = work / "x"
    shutil.rmtree(xdir, ignore_errors=True)
    rc, _, err, exc = run_cli(["extract", "-q", p, str(xdir)])
    _no_traceback(out, "extract", err, exc)
    files = sorted(os.listdir(xdir)) if xdir.is_dir() else []
    with contextlib.ExitStack() as stack:
        extracted = _open_extracted(stack, xdir, ref) if rc == 0 else {}
        if rc == 0:
            if not out.verify_ok:
                out.fail("extract", "extract-passes-rejected", "extract succeeded, "
                         "verify failed")
            if ref.clean:
                for dev_id, f in extracted.items():
                    if not _same_as_reference(f, ref.devices[dev_id]):
                        out.fail("extract", "extract-differs-reference",
                                 ref.devices[dev_id].name)
        else:
            if out.verify_ok:
                out.fail("extract", "extract-fails-verified", err.strip()[-200:])
            if files:
                out.fail("extract", "files-left", ", ".join(files[:5]))
        _read_paths(out, m, base, p, ref, extracted, fs)
    shutil.rmtree(xdir, ignore_errors=True)
    out.seconds = time.monotonic() - t0
    return out


def _open_extracted(stack: contextlib.ExitStack, xdir: Path, ref: Reference
                    ) -> dict[int, io.BufferedReader]:
    found = {}
    for dev_id, dev in ref.devices.items():
        f = xdir / f"disk-{dev.name}.raw"
        if f.is_file():
            found[dev_id] = stack.enter_context(f.open("rb"))
    return found


def _same_as_reference(f: io.BufferedReader, dev: RefDevice) -> bool:
    if os.fstat(f.fileno()).st_size != dev.size:
        return False
    for off in range(0, dev.size, CLUSTER):
        end = min(off + CLUSTER, dev.size)
        if os.pread(f.fileno(), end - off, off) != dev.read(off, end):
            return False
    return True


def _read_paths(out: Outcome, m: Mutant, base: Base, p: str, ref: Reference,
                extracted: dict[int, io.BufferedReader], fs: bool) -> None:
    """list, config, the model and VmaFS, judged against extract's files or the reference."""
    from vmafs.errors import VmafsError

    rc_l, lout, err, exc = run_cli(["list", "--json", p])
    _no_traceback(out, "list", err, exc)
    listed = json.loads(lout) if rc_l == 0 else None
    rc_c, cout, err, exc = run_cli(["config", p])
    _no_traceback(out, "config", err, exc)

    from vmafs.archive.reader import Archive

    rng = random.Random(f"pieces|{m.id}")
    try:
        archive = Archive.open(p)
    except VmafsError as e:
        archive = None
        if out.verify_ok and base.random_access and type(e).__name__ != "NotSeekableError":
            out.fail("model", "refuses-verified", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001
        archive = None
        out.fail("model", "traceback", f"open: {type(e).__name__}: {e}")
    if archive is not None:
        try:
            _check_header(out, archive, listed, rc_c, cout, ref)
            devs = {d.dev_id: d.size for d in archive.devices}
            plan = pieces(devs, rng)
            expect = _expected(out, ref, extracted, devs)
            if base.indexed and any(q.startswith("container:") for q in ref.problems):
                expect.original = _original_reference(base)
            for dev_id, off, length in plan:
                try:
                    got: bytes | None = bytes(archive.read(dev_id, off, length))
                except VmafsError as e:
                    got = None
                    err_text = f"{type(e).__name__}: {e}"
                except Exception as e:  # noqa: BLE001
                    out.fail("model", "traceback", f"read {dev_id}@{off}+{length}: "
                             f"{type(e).__name__}: {e}")
                    continue
                else:
                    err_text = ""
                _judge(out, "model", expect, dev_id, off, length, got, err_text)
            if fs:
                _check_fs(out, archive, plan, expect)
        finally:
            archive.close()


def _no_traceback(out: Outcome, path: str, err: str, exc: BaseException | None) -> None:
    if exc is not None:
        out.fail(path, "traceback", f"{type(exc).__name__}: {exc}")
    elif "Traceback" in err:
        out.fail(path, "traceback", err.strip().splitlines()[-1])


@dataclass
class Expect:
    """Per device: the bytes a piece must have, or None where only an error is allowed."""

    verified: bool
    images: dict[int, io.BufferedReader]   # verified: extract's files
    ref: Reference
    # Where the container (zstd) is damaged, the reference cannot read past it; an indexed
    # archive may still serve a cluster there that its checksum proves (the issue allows it):
    # then it must be exactly the unmutated archive's cluster.
    original: Reference | None = None

    def piece(self, dev_id: int, off: int, length: int) -> bytes | None:
        if self.verified:
            img = self.images.get(dev_id)
            return None if img is None else os.pread(img.fileno(), length, off)
        return self.ref.piece(dev_id, off, length)


_ORIGINALS: dict[str, Reference] = {}


def _original_reference(base: Base) -> Reference:
    if base.name not in _ORIGINALS:
        dec = decode(base.container, base.path.read_bytes())
        _ORIGINALS[base.name] = reference(dec.stream, dec.clean, dec.why)
    return _ORIGINALS[base.name]


def _expected(out: Outcome, ref: Reference, extracted: dict[int, io.BufferedReader],
              devs: dict[int, int]) -> Expect:
    return Expect(bool(out.verify_ok) and bool(extracted or not devs), extracted, ref)


def _judge(out: Outcome, path: str, expect: Expect, dev_id: int, off: int, length: int,
           got: bytes | None, err_text: str) -> None:
    want = expect.piece(dev_id, off, length)
    where = f"dev {dev_id} bytes {off}+{length}"
    if got is None:
        if expect.verified:
            out.fail(path, "error-on-verified", f"{where}: {err_text}")
        return
    if want is None:
        if expect.verified:
            out.fail(path, "unknown-device", where)
        elif expect.original is not None and got == expect.original.piece(dev_id, off, length):
            return  # proven by its checksum, and it is the archive's true content
        else:
            out.fail(path, "serves-unproven", f"{where}: reference cannot decide "
                     f"({'; '.join(expect.ref.problems or [expect.ref.why])[:120]})")
    elif got != want:
        out.fail(path, "wrong-bytes-verified" if expect.verified else "wrong-bytes",
                 f"{where}: {len(got)} bytes differ from the "
                 f"{'extracted' if expect.verified else 'reference'} {len(want)}")


def model_configs(archive: Any) -> list[tuple[str, bytes]]:
    """The model's configs as (name, data) pairs, whether it keeps a mapping or pairs."""
    configs = archive.configs
    pairs = configs.items() if isinstance(configs, dict) else configs
    return [(str(n), bytes(d)) for n, d in pairs]


def _check_header(out: Outcome, archive: Any, listed: dict[str, Any] | None, rc_c: int,
                  cout: bytes, ref: Reference) -> None:
    model_devs = sorted((d.dev_id, d.name, d.size) for d in archive.devices)
    if listed is not None:
        list_devs = sorted((d["dev_id"], d["name"], d["device_bytes"]) for d in listed["devices"])
        if list_devs != model_devs:
            out.fail("list", "header-disagrees", f"list {list_devs} model {model_devs}")
        if sorted(c["name"] for c in listed["configs"]) != sorted(
                n for n, _ in model_configs(archive)):
            out.fail("list", "header-disagrees", "config names differ from the model's")
    conf = next((d for n, d in model_configs(archive) if n == "qemu-server.conf"), None)
    if rc_c == 0 and conf is not None and cout != conf:
        out.fail("config", "header-disagrees", "config bytes differ from the model's")
    if rc_c == 0 and conf is None:
        out.fail("config", "header-disagrees", "config printed what the model lacks")
    if ref.header_ok:
        ref_devs = sorted((d, r.name, r.size) for d, r in ref.devices.items())
        if [(d, s) for d, _, s in ref_devs] != [(d, s) for d, _, s in model_devs]:
            out.fail("model", "header-disagrees", f"reference {ref_devs} model {model_devs}")
    elif out.verify_ok is False and not ref.header_ok:
        out.fail("model", "opens-bad-header", ref.why)


def _check_fs(out: Outcome, archive: Any, plan: list[tuple[int, int, int]],
              expect: Expect) -> None:
    import pyfuse3
    import trio

    from vmafs.mount.fs import VmaFS

    sizes = {d.dev_id: d.size for d in archive.devices}

    async def go() -> None:
        fs = VmaFS(archive)
        handles = {}
        for entry in fs.entries:
            attr = await fs.lookup(pyfuse3.ROOT_INODE, entry.name, None)
            fi = await fs.open(attr.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            if entry.dev_id:
                handles[entry.dev_id] = fi.fh
                if attr.st_size != sizes.get(entry.dev_id):
                    out.fail("fs", "header-disagrees", f"{entry.name!r} size {attr.st_size}")
            else:
                data = bytes(await fs.read(fi.fh, 0, entry.size + 1))
                if data not in [d for _, d in model_configs(archive)]:
                    out.fail("fs", "header-disagrees", f"config {entry.name!r} bytes")
        for dev_id, off, length in plan:
            fh = handles.get(dev_id)
            if fh is None:
                out.fail("fs", "missing-file", f"no file for dev {dev_id}")
                continue
            try:
                got: bytes | None = bytes(await fs.read(fh, off, length))
                err_text = ""
            except pyfuse3.FUSEError as e:
                if e.errno != errno.EIO:
                    out.fail("fs", "wrong-errno", f"{e.errno} at dev {dev_id} {off}")
                got, err_text = None, "EIO"
            _judge(out, "fs", expect, dev_id, off, length, got, err_text)

    log = logging.getLogger("vmafs.mount")  # each EIO is logged; not wanted here
    was, log.disabled = log.disabled, True
    try:
        trio.run(go)
    except Exception as e:  # noqa: BLE001
        out.fail("fs", "traceback", f"{type(e).__name__}: {e}")
    finally:
        log.disabled = was


# -- the real command, in a subprocess ---------------------------------------------------------

def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def run_vmafs(*args: str, timeout: float = 60) -> tuple[int, str]:
    """(rc, stderr) of `python3 -m vmafs ARGS`; rc -9 and 'TIMEOUT' on a hang."""
    try:
        proc = subprocess.run([sys.executable, "-m", "vmafs", *args], env=_env(),
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -9, "TIMEOUT"
    return proc.returncode, proc.stderr.decode(errors="replace")


def check_subprocess(m: Mutant, base: Base, work: Path, inproc: Outcome) -> list[Failure]:
    """verify, list, config and extract as real processes: no traceback, no hang, the same
    verdict as in-process."""
    fails = []
    path = work / ("s" + base.name[base.name.index("."):])
    path.write_bytes(m.data)
    xdir = work / "sx"
    shutil.rmtree(xdir, ignore_errors=True)
    for cmd in (["verify", "-q", str(path)], ["list", str(path)], ["config", str(path)],
                ["extract", "-q", str(path), str(xdir)]):
        rc, err = run_vmafs(*cmd)
        if rc == -9:
            fails.append(Failure("cli", "hang", f"vmafs {cmd[0]}"))
        elif "Traceback" in err or rc not in (0, 1, 2, 3):
            fails.append(Failure("cli", "traceback", f"vmafs {cmd[0]} rc {rc}: "
                                 f"{err.strip().splitlines()[-1:]}"))
        elif cmd[0] == "verify" and (rc == 0) != inproc.verify_ok:
            fails.append(Failure("cli", "disagrees-in-process", f"verify rc {rc}"))
    shutil.rmtree(xdir, ignore_errors=True)
    return fails


def _pread_judged(out: Outcome, expect: Expect, fd: int, dev_id: int, off: int,
                  length: int) -> None:
    """Read [off, off+length) as read(2) gives it: a short read is the bytes before an error
    (POSIX), so judge what came, then read on from there to meet the error itself."""
    pos, end = off, off + length
    while pos < end:
        try:
            got = os.pread(fd, end - pos, pos)
        except OSError as e:
            if e.errno != errno.EIO:
                out.fail("mount", "wrong-errno", f"{e}")
            _judge(out, "mount", expect, dev_id, pos, end - pos, None, str(e))
            return
        if not got:
            _judge(out, "mount", expect, dev_id, pos, end - pos, got, "")
            return
        _judge(out, "mount", expect, dev_id, pos, len(got), got, "")
        pos += len(got)


def check_mount(m: Mutant, base: Base, work: Path, inproc: Outcome) -> list[Failure]:
    """A real FUSE mount: every piece via os.pread, judged like the in-process paths."""
    fails: list[Failure] = []
    out = Outcome(m)
    path = work / ("f" + base.name[base.name.index("."):])
    path.write_bytes(m.data)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    dec = decode(base.container, m.data)
    ref = reference(dec.stream, dec.clean, dec.why)
    rc, err = run_vmafs("mount", str(path), str(mnt), timeout=60)
    if rc == -9:
        return [Failure("mount", "hang", "vmafs mount")]
    if "Traceback" in err:
        fails.append(Failure("mount", "traceback", err.strip().splitlines()[-1]))
    if rc != 0:
        if inproc.verify_ok and base.random_access:
            fails.append(Failure("mount", "refuses-verified", err.strip()[-200:]))
        return fails
    xdir = work / "mx"
    stack = contextlib.ExitStack()
    try:
        images: dict[int, io.BufferedReader] = {}
        if inproc.verify_ok:
            shutil.rmtree(xdir, ignore_errors=True)
            run_cli(["extract", "-q", str(path), str(xdir)])
            images = _open_extracted(stack, xdir, ref)
        expect = Expect(bool(inproc.verify_ok), images, ref)
        rng = random.Random(f"pieces|{m.id}")
        devs = {d: r.size for d, r in ref.devices.items()}
        for dev_id, off, length in pieces(devs, rng):
            name = mnt / f"disk-{ref.devices[dev_id].name}.raw"
            try:
                fd = os.open(name, os.O_RDONLY)
            except OSError as e:
                out.fail("mount", "missing-file", f"{name.name}: {e}")
                break
            try:
                _pread_judged(out, expect, fd, dev_id, off, min(length, devs[dev_id] - off))
            finally:
                os.close(fd)
    finally:
        stack.close()
        shutil.rmtree(xdir, ignore_errors=True)
        rc, err = run_vmafs("umount", str(mnt), timeout=60)
        if rc != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           check=False)
            fails.append(Failure("mount", "umount-failed", err.strip()[-200:]))
    return fails + out.failures


# -- a run over many mutants -------------------------------------------------------------------

def mutants(infos: dict[str, BaseInfo], kinds: tuple[str, ...] | list[str], seeds: range
            ) -> Iterator[Mutant]:
    for info in infos.values():
        for kind in kinds:
            for seed in seeds if kind != "none" else range(1):
                m = make_mutant(info, kind, seed)
                if m is not None:
                    yield m


def summarize(outcomes: list[Outcome]) -> str:
    """A table of failing mutants per kind x reading path, then the failure classes."""
    paths = ["verify", "extract", "list", "config", "model", "fs", "cli", "mount"]
    kinds = sorted({o.mutant.kind for o in outcomes}, key=KINDS.index)
    lines = ["mutants failing per reading path (vrf-rej: verify rejects; strict: rejects "
             "what Proxmox's rules accept)",
             f"{'kind':10} {'mutants':>7} {'vrf-rej':>7} {'strict':>7} "
             + " ".join(f"{p:>7}" for p in paths)]
    for kind in kinds:
        mine = [o for o in outcomes if o.mutant.kind == kind]
        row = [f"{kind:10} {len(mine):7d} {sum(1 for o in mine if not o.verify_ok):7d} "
               f"{sum(1 for o in mine if o.strict):7d}"]
        for p in paths:
            row.append(f"{sum(1 for o in mine if any(f.path == p for f in o.failures)):7d}")
        lines.append(" ".join(row))
    classes: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        for key in {(f.path, f.klass) for f in o.failures}:
            classes.setdefault(key, []).append(o)
    if classes:
        lines.append("")
        lines.append("failure classes (path/class: mutants; first reproducer):")
        for (path, klass), mine in sorted(classes.items(), key=lambda kv: -len(kv[1])):
            first = mine[0]
            detail = next(f.detail for f in first.failures if (f.path, f.klass) == (path, klass))
            lines.append(f"  {path}/{klass}: {len(mine)}")
            lines.append(f"    {first.mutant.repro}")
            lines.append(f"    -> {detail[:160]}")
    return "\n".join(lines)
