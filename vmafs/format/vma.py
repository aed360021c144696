"""Pure codec of Proxmox VMA v1: the archive header, extent headers and null extents.

Bytes in, objects out; no I/O. Error messages follow Proxmox's reader (vma-reader.c) where it has
one, so users can match them to `vma verify`. Byte-level facts: shared/research/vma-format.md.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vmafs.errors import FormatError
from vmafs.format.names import display

try:  # the optional C accelerator (setup.py); without it, numpy
    from vmafs.format import _blocksums as _native
except ImportError:
    _native = None  # type: ignore[assignment]

MAGIC = b"VMA\0"
EXTENT_MAGIC = b"VMAE"
VERSION = 1
CLUSTER_SIZE = 65536
BLOCK_SIZE = 4096
BLOCKS_PER_CLUSTER = CLUSTER_SIZE // BLOCK_SIZE
FULL_MASK = 0xFFFF
HEADER_FIXED_SIZE = 12288
EXTENT_HEADER_SIZE = 512
SLOTS_PER_EXTENT = 59
MAX_EXTENT_SIZE = EXTENT_HEADER_SIZE + SLOTS_PER_EXTENT * CLUSTER_SIZE
MAX_BLOB_SIZE = 65535
MAX_CONFIGS = 256
MAX_DEV_ID = 254  # Proxmox's tools restore ids 1..254; 0 is reserved
MAX_DEVICE_SIZE = (1 << 32) * CLUSTER_SIZE  # cluster numbers are 32-bit
NULL_PAYLOAD_SIZE = SLOTS_PER_EXTENT * 7  # the 7 bytes of each slot a reader never looks at
VMSTATE = "vmstate"

_MD5_FIELD = slice(32, 48)
_EXTENT_MD5_FIELD = slice(24, 40)
_FIXED = struct.Struct(">4sI16sq16sIII")
_DEVINFO = struct.Struct(">I4xQ16x")
_SLOTS = struct.Struct(">59Q")
_EXTENT_HEAD = struct.Struct(">4sHH16s16s")
_DEVNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,127}")

# popcount of every 16-bit mask, for stored-byte arithmetic without per-cluster Python loops:
# a mask's high byte's count plus its low byte's (mask = high * 256 + low), built from the 256
# bytes' counts at import in 0.02 ms instead of 1.2 ms for all 65536 masks' bits unpacked
_POPCOUNT8 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(
    axis=1, dtype=np.uint8)
POPCOUNT16 = np.add.outer(_POPCOUNT8, _POPCOUNT8).ravel()
POPCOUNT16_LIST: list[int] = POPCOUNT16.tolist()  # for per-slot Python code
_BIT_WEIGHTS = (1 << np.arange(BLOCKS_PER_CLUSTER, dtype=np.uint32)).astype(np.uint32)


@dataclass(frozen=True)
class Device:
    """A disk in the archive; dev_id is its index in the header's device table (1-based)."""

    dev_id: int
    name: str
    size: int

    @property
    def clusters(self) -> int:
        return -(-self.size // CLUSTER_SIZE)


@dataclass(frozen=True)
class Header:
    """A VMA header's parsed fields."""

    uuid: bytes
    ctime: int
    header_size: int
    devices: tuple[Device, ...]  # without vmstate
    configs: tuple[tuple[str, bytes], ...]
    vmstate: Device | None = None

    def device(self, dev_id: int) -> Device | None:
        for dev in self.devices:
            if dev.dev_id == dev_id:
                return dev
        if self.vmstate is not None and self.vmstate.dev_id == dev_id:
            return self.vmstate
        return None


@dataclass(frozen=True)
class ExtentHeader:
    """An extent header's used slots and how many blocks of data follow it."""

    block_count: int
    # (dev_id, cluster, mask) of every used slot (dev_id != 0), in slot order.
    slots: tuple[tuple[int, int, int], ...]

    @property
    def size(self) -> int:
        return EXTENT_HEADER_SIZE + self.block_count * BLOCK_SIZE


def check_device_name(name: str) -> None:
    """The names vmafs gives *new* disks (create, backup): Proxmox's own kind, no whitespace
    (qmrestore's parser), no '/', usable as a file name and in `vma list` output. A policy for
    names a user chooses, not a format rule: an archive's existing names are whatever its
    header holds (check_header_names), and convert and merge carry them over."""
    if name == VMSTATE:
        raise FormatError("'vmstate' is reserved for RAM state and is never written")
    if not _DEVNAME.fullmatch(name):
        raise FormatError(
            f"invalid device name {name!r}: use letters, digits and _ . + : - (like drive-scsi0)"
        )


def check_config_name(name: str) -> None:
    """A plain file name, for config files a user adds (a policy like check_device_name)."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name) > 255:
        raise FormatError(f"invalid config name {name!r}: it must be a plain file name")


def check_header_names(devices: Sequence[tuple[int, str]]) -> None:
    """The format's rule on device names, the one home for writers and readers alike: every
    device (vmstate included) has a name of its own. Readers find a device by name (a chain's
    links, merge, `extract -d`, the mount's files), so two devices with one name would serve
    one's data for the other; Proxmox's reader does not check, vmafs refuses such a header."""
    first: dict[str, int] = {}
    for dev_id, name in devices:
        if name in first:
            raise FormatError(f"two devices named '{display(name)}' (ids {first[name]} and "
                              f"{dev_id}): every device needs a name of its own")
        first[name] = dev_id


def _name_bytes(what: str, name: str) -> bytes:
    """A name's exact bytes for a header blob (decode_header's surrogateescape reversed)."""
    try:
        data = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"{what} name '{display(name)}' is not a byte string") from None
    if b"\0" in data:
        raise FormatError(f"{what} name '{display(name)}' contains a NUL byte")
    return data + b"\0"


# --- header -------------------------------------------------------------------------------------


def encode_header(
    uuid: bytes,
    ctime: int,
    devices: Sequence[tuple[str, int]],
    configs: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """The archive header: configs first (name, data), then device names, like vma-writer.c.

    It takes every name decode_header gives (convert and merge carry an archive's names over)
    and refuses what decode_header would read differently: a disk named vmstate, two devices
    with one name, a NUL inside a name. Policies for new names: check_device_name."""
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    if len(devices) > MAX_DEV_ID:
        raise FormatError(f"too many devices ({len(devices)} > {MAX_DEV_ID})")
    if len(configs) > MAX_CONFIGS:
        raise FormatError(f"too many config files ({len(configs)} > {MAX_CONFIGS})")
    blobs = bytearray(b"\0")

    def add_blob(data: bytes) -> int:
        if len(data) > MAX_BLOB_SIZE:
            raise FormatError(f"blob of {len(data)} bytes is over the VMA limit of 65535")
        pos = len(blobs)
        blobs.extend(len(data).to_bytes(2, "little"))
        blobs.extend(data)
        return pos

    names = [0] * MAX_CONFIGS
    datas = [0] * MAX_CONFIGS
    for i, (name, data) in enumerate(configs):
        if len(data) > MAX_BLOB_SIZE:
            raise FormatError(f"config '{display(name)}' is {len(data)} bytes; VMA allows at "
                              "most 65535")
        # the exact bytes decode_header read (surrogateescape), so convert keeps them as is
        names[i] = add_blob(_name_bytes("config", name))
        datas[i] = add_blob(bytes(data))
    check_header_names(list(enumerate((name for name, _ in devices), start=1)))
    devinfo = bytearray(256 * 32)
    for dev_id, (name, size) in enumerate(devices, start=1):
        if name == VMSTATE:
            raise FormatError("'vmstate' is reserved for RAM state and is never written")
        if not 0 < size <= MAX_DEVICE_SIZE:
            raise FormatError(f"device {display(name)} has an unsupported size {size}")
        ptr = add_blob(_name_bytes("device", name))
        _DEVINFO.pack_into(devinfo, dev_id * 32, ptr, size)
    header_size = HEADER_FIXED_SIZE + -(-len(blobs) // 512) * 512
    buf = bytearray(header_size)
    _FIXED.pack_into(buf, 0, MAGIC, VERSION, uuid, ctime, bytes(16),
                     HEADER_FIXED_SIZE, len(blobs), header_size)
    struct.pack_into(">256I", buf, 2044, *names)
    struct.pack_into(">256I", buf, 3068, *datas)
    buf[4096:HEADER_FIXED_SIZE] = devinfo
    buf[HEADER_FIXED_SIZE:HEADER_FIXED_SIZE + len(blobs)] = blobs
    buf[_MD5_FIELD] = hashlib.md5(buf).digest()
    return bytes(buf)


def header_size_of(prefix: bytes) -> int:
    """The whole header's size, from its first 12288 bytes."""
    if len(prefix) < HEADER_FIXED_SIZE:
        raise FormatError("can't read vma header - got EOF")
    if prefix[:4] != MAGIC:
        raise FormatError("not a vma file - wrong magic number")
    header_size = int.from_bytes(prefix[56:60], "big")
    if header_size <= HEADER_FIXED_SIZE or header_size > HEADER_FIXED_SIZE + 16 * 1024 * 1024:
        raise FormatError(f"wrong vma header size {header_size}")
    return header_size


def decode_header(buf: bytes) -> Header:
    """Parse and check a whole header with every rule of vma_reader_read_head."""
    header_size = header_size_of(buf)
    if len(buf) < header_size:
        raise FormatError("can't read vma header data")
    buf = bytes(buf[:header_size])
    magic, version, uuid, ctime, md5, blob_off, blob_size, _ = _FIXED.unpack_from(buf)
    zeroed = bytearray(buf)
    zeroed[_MD5_FIELD] = bytes(16)
    if hashlib.md5(zeroed).digest() != md5:
        raise FormatError("wrong vma header chechsum (md5 mismatch)")
    if version != VERSION:
        raise FormatError(f"wrong vma version {version}")
    if blob_off < HEADER_FIXED_SIZE or blob_off >= header_size:
        raise FormatError("wrong vma blob buffer offset")
    if blob_off + blob_size > header_size:
        raise FormatError("wrong vma blob buffer size")
    blobs = _parse_blobs(buf[blob_off:blob_off + blob_size])

    def blob_str(ptr: int) -> str | None:
        """get_header_str: a blob whose last byte is NUL, read as a C string (up to its first
        NUL); bytes that are not UTF-8 stay those bytes (surrogateescape)."""
        data = blobs.get(ptr)
        if data is None or not data.endswith(b"\0"):
            return None
        return data[:data.index(b"\0")].decode("utf-8", "surrogateescape")

    devices: list[Device] = []
    vmstate = None
    named: list[tuple[int, str]] = []
    for dev_id in range(1, 256):
        ptr, size = _DEVINFO.unpack_from(buf, 4096 + 32 * dev_id)
        name = blob_str(ptr) if ptr else None
        if not size or name is None:
            continue
        if dev_id > MAX_DEV_ID and name != VMSTATE:
            continue  # Proxmox's tools list and restore disks 1..254 only: 255 is no disk
        if size > MAX_DEVICE_SIZE:
            raise FormatError(f"device '{display(name)}' has an impossible size {size}")
        named.append((dev_id, name))
        if name == VMSTATE:
            vmstate = Device(dev_id, name, size)
        else:
            devices.append(Device(dev_id, name, size))
    check_header_names(named)
    names = struct.unpack_from(">256I", buf, 2044)
    datas = struct.unpack_from(">256I", buf, 3068)
    configs = []
    for name_ptr, data_ptr in zip(names, datas, strict=True):
        if not name_ptr or not data_ptr:
            continue
        cname = blob_str(name_ptr)
        cdata = blobs.get(data_ptr)
        if cname is None or cdata is None:
            raise FormatError("vma contains invalid data pointers")
        configs.append((cname, cdata))
    return Header(uuid, ctime, header_size, tuple(devices), tuple(configs), vmstate)


def header_digest(header: Header) -> bytes:
    """SHA-256 of what a header says: uuid, ctime, every device (vmstate too) by id with its
    name and size, every config's name and data in order. The index's footer carries it
    (format/index.py), so a header rewritten and resealed with a new md5 is found out; blob
    layout and unused bytes, which no reader looks at, are left out (convert may redo them)."""
    h = hashlib.sha256(b"vmafs-header-1\0")
    devices = sorted((*header.devices, *((header.vmstate,) if header.vmstate else ())),
                     key=lambda d: d.dev_id)
    h.update(header.uuid + struct.pack("<qI", header.ctime, len(devices)))
    for dev in devices:
        name = dev.name.encode("utf-8", "surrogateescape")
        h.update(struct.pack("<BQI", dev.dev_id, dev.size, len(name)) + name)
    h.update(struct.pack("<I", len(header.configs)))
    for cname, data in header.configs:
        raw = cname.encode("utf-8", "surrogateescape")
        h.update(struct.pack("<II", len(raw), len(data)) + raw)
        h.update(data)
    return h.digest()


def _parse_blobs(area: bytes) -> dict[int, bytes]:
    """Blob chain from relative offset 1; a pointer is valid only at an exact chain position."""
    blobs = {}
    pos = 1
    end = len(area)
    while pos + 2 <= end:
        size = area[pos] | area[pos + 1] << 8
        if pos + 2 + size <= end:
            blobs[pos] = area[pos + 2:pos + 2 + size]
        pos += size + 2
    return blobs


# --- extents ------------------------------------------------------------------------------------


def encode_extent_header(
    uuid: bytes, slots: Sequence[tuple[int, int, int]], block_count: int
) -> bytes:
    """A 512-byte extent header for (dev_id, cluster, mask) slots."""
    if len(slots) > SLOTS_PER_EXTENT:
        raise ValueError("too many slots for one extent")
    infos = [mask << 48 | dev_id << 32 | cluster for dev_id, cluster, mask in slots]
    infos.extend([0] * (SLOTS_PER_EXTENT - len(infos)))
    return seal_extent(uuid, block_count, _SLOTS.pack(*infos))


def seal_extent(uuid: bytes, block_count: int, slot_bytes: bytes) -> bytes:
    head = bytearray(EXTENT_HEADER_SIZE)
    _EXTENT_HEAD.pack_into(head, 0, EXTENT_MAGIC, 0, block_count, uuid, bytes(16))
    head[40:] = slot_bytes
    head[_EXTENT_MD5_FIELD] = hashlib.md5(head).digest()
    return bytes(head)


def check_extent_header(buf: bytes | bytearray | memoryview, uuid: bytes) -> int:
    """Check an extent header in Proxmox's order (md5, uuid, magic); returns block_count.

    block_count against the masks is the walker's check (it knows the offset).
    """
    if len(buf) < EXTENT_HEADER_SIZE:
        raise FormatError(f"read short extent ({len(buf)} bytes)")
    head = bytearray(buf[:EXTENT_HEADER_SIZE])
    magic, reserved, block_count, ext_uuid, md5 = _EXTENT_HEAD.unpack_from(head)
    head[_EXTENT_MD5_FIELD] = bytes(16)
    if hashlib.md5(head).digest() != md5:
        raise FormatError("wrong vma extent header chechsum (md5 mismatch)")
    if ext_uuid != uuid:
        raise FormatError("wrong vma extent uuid")
    if magic != EXTENT_MAGIC or reserved != 0:
        raise FormatError("wrong vma extent header magic")
    if block_count > SLOTS_PER_EXTENT * BLOCKS_PER_CLUSTER:
        raise FormatError(f"short vma extent ({MAX_EXTENT_SIZE} < "
                          f"{EXTENT_HEADER_SIZE + block_count * BLOCK_SIZE})")
    return int(block_count)


_FIRST_WORD = int.from_bytes(EXTENT_MAGIC + bytes(4), "little")  # magic, reserved 0, 0 blocks


def check_extent_headers(headers: bytes | bytearray | memoryview, uuid: bytes
                         ) -> tuple[int, int]:
    """check_extent_header for a run of headers at once (a block-summed archive has ~10 null
    extents after each data extent, a sparse one runs of thousands): (nulls, block_count),
    how many of the whole 512-byte headers at the start pass every check with a block count
    of 0, and the block count of the one after them if it is whole and passes too (-1 if
    not: check_extent_header says why). In C when the accelerator is built
    (tests/test_vma_codec.py proves the two equal)."""
    if _native is not None:
        return _native.check_headers(headers, uuid)
    return check_extent_headers_numpy(headers, uuid)


def check_extent_headers_numpy(headers: bytes | bytearray | memoryview, uuid: bytes
                               ) -> tuple[int, int]:
    """check_extent_headers with numpy and hashlib: the fixed fields of all at once, then
    each one's md5."""
    n = len(headers) // EXTENT_HEADER_SIZE
    nulls = 0
    if n:
        words = np.frombuffer(headers, "<u8", n * (EXTENT_HEADER_SIZE // 8)).reshape(n, -1)
        uuid_words = np.frombuffer(uuid, "<u8")
        ok = ((words[:, 0] == _FIRST_WORD) & (words[:, 1] == uuid_words[0])
              & (words[:, 2] == uuid_words[1]))
        nulls = n if ok.all() else int(np.argmin(ok))
        if nulls:
            copy = np.frombuffer(headers, np.uint8, nulls * EXTENT_HEADER_SIZE).reshape(
                nulls, -1).copy()
            want = copy[:, 24:40].tobytes()
            copy[:, 24:40] = 0
            flat = copy.data.cast("B")
            md5 = hashlib.md5
            got = b"".join([md5(flat[k:k + EXTENT_HEADER_SIZE]).digest()
                            for k in range(0, len(flat), EXTENT_HEADER_SIZE)])
            if got != want:
                nulls = int(np.argmax((np.frombuffer(got, np.uint8) != np.frombuffer(
                    want, np.uint8)).reshape(-1, 16).any(axis=1)))
    if nulls == n:
        return nulls, -1
    try:
        return nulls, check_extent_header(
            headers[nulls * EXTENT_HEADER_SIZE:(nulls + 1) * EXTENT_HEADER_SIZE], uuid)
    except FormatError:
        return nulls, -1


def slot_columns(headers: bytes | bytearray | memoryview
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dev_ids, clusters, masks) of every slot of consecutive 512-byte extent headers, each
    (n, 59), as views of the bytes (no copy): dev_id 0 marks an unused slot.

    A slot is big-endian mask u16, reserved u8, dev_id u8, cluster u32.
    """
    n = len(headers) // EXTENT_HEADER_SIZE
    shape, strides = (n, SLOTS_PER_EXTENT), (EXTENT_HEADER_SIZE, 8)
    return (np.ndarray(shape, np.uint8, headers, 43, strides),
            np.ndarray(shape, ">u4", headers, 44, strides),
            np.ndarray(shape, ">u2", headers, 40, strides))


def used_slots(raw: bytes | bytearray | memoryview
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The used slots (dev_id != 0) of a 512-byte extent header, in slot order: dev_ids (u8),
    clusters (u32), masks (u16), native and writable; where the data of each one with a
    nonzero mask ends in the extent's data (int64), and how many blocks the masks store. Its
    fields are not checked here (check_extent_header). In C when the accelerator is built
    (tests/test_vma_codec.py proves the two equal)."""
    if _native is None:
        return used_slots_numpy(raw)
    dev_ids, clusters, masks, ends, blocks = _native.used_slots(raw)
    return (np.frombuffer(dev_ids, np.uint8), np.frombuffer(clusters, np.uint32),
            np.frombuffer(masks, np.uint16), np.frombuffer(ends, np.int64), blocks)


def used_slots_numpy(raw: bytes | bytearray | memoryview
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """used_slots in numpy."""
    dev_ids, clusters, masks = (c[0] for c in slot_columns(bytes(raw[:EXTENT_HEADER_SIZE])))
    used = dev_ids != 0
    masks = masks[used].astype(np.uint16)
    blocks = POPCOUNT16[masks[masks != 0]]
    ends = np.cumsum(blocks, dtype=np.int64) * BLOCK_SIZE
    return (dev_ids[used], clusters[used].astype(np.uint32), masks, ends,
            int(blocks.sum(dtype=np.int64)))


def decode_extent_header(buf: bytes | memoryview, uuid: bytes) -> ExtentHeader:
    """Check an extent header (check_extent_header) and list its used slots as tuples."""
    block_count = check_extent_header(buf, uuid)
    dev_ids, clusters, masks = slot_columns(bytes(buf[:EXTENT_HEADER_SIZE]))
    slots = tuple((d, c, m) for d, c, m in zip(dev_ids[0].tolist(), clusters[0].tolist(),
                                               masks[0].tolist(), strict=True) if d)
    return ExtentHeader(block_count, slots)


def encode_null_extents(uuid: bytes, payload: bytes) -> bytes:
    """Carry payload in null extents: block_count 0, every slot's dev_id byte 0.

    Proxmox's reader skips such slots whole, so 7 of each slot's 8 bytes are ours.
    """
    out = []
    for start in range(0, max(len(payload), 1), NULL_PAYLOAD_SIZE):
        chunk = payload[start:start + NULL_PAYLOAD_SIZE].ljust(NULL_PAYLOAD_SIZE, b"\0")
        slot_bytes = bytearray(SLOTS_PER_EXTENT * 8)
        arr = np.frombuffer(slot_bytes, np.uint8).reshape(SLOTS_PER_EXTENT, 8)
        src = np.frombuffer(chunk, np.uint8).reshape(SLOTS_PER_EXTENT, 7)
        arr[:, 0:3] = src[:, 0:3]
        arr[:, 4:8] = src[:, 3:7]
        out.append(seal_extent(uuid, 0, bytes(slot_bytes)))
    return b"".join(out)


_PAYLOAD_BYTES = np.array([0, 1, 2, 4, 5, 6, 7])  # of each 8-byte slot: all but dev_id


def null_payloads(headers: bytes | bytearray | memoryview) -> bytes:
    """The payloads of consecutive null extent headers, joined (413 bytes each); a short last
    header is left out. Their md5 and dev_id bytes are not checked here. In C when the
    accelerator is built (tests/test_block_sums.py proves the two equal)."""
    if _native is not None:
        return _native.null_payloads(headers)
    return gather_null_payloads(headers)


def gather_null_payloads(headers: bytes | bytearray | memoryview) -> bytes:
    """null_payloads in numpy: a gather of the headers' slot bytes, not a loop."""
    n = len(headers) // EXTENT_HEADER_SIZE
    arr = np.frombuffer(headers, np.uint8, n * EXTENT_HEADER_SIZE).reshape(n, EXTENT_HEADER_SIZE)
    return arr[:, 40:].reshape(n, SLOTS_PER_EXTENT, 8)[:, :, _PAYLOAD_BYTES].tobytes()


def null_extent_payload(buf: bytes) -> bytes:
    """The 413 payload bytes of a null extent header (checked by decode_extent_header first)."""
    arr = np.frombuffer(buf[40:EXTENT_HEADER_SIZE], np.uint8).reshape(SLOTS_PER_EXTENT, 8)
    if arr[:, 3].any():
        raise FormatError("not a null extent")
    return np.concatenate([arr[:, 0:3], arr[:, 4:8]], axis=1).tobytes()


# --- cluster payloads ---------------------------------------------------------------------------


def cluster_masks(data: bytes | memoryview) -> np.ndarray:
    """The 16-bit block mask of every 64 KiB cluster in data (a multiple of 64 KiB long).

    One vectorised pass; bit j is set when 4 KiB block j holds a non-zero byte.
    """
    words = np.frombuffer(data, np.uint64).reshape(-1, BLOCKS_PER_CLUSTER, BLOCK_SIZE // 8)
    nonzero = words.max(axis=2) != 0
    return (nonzero.astype(np.uint32) @ _BIT_WEIGHTS).astype(np.uint16)


def stored_blocks(cluster: bytes | memoryview, mask: int) -> bytes | memoryview:
    """The bytes VMA stores for one cluster: the blocks whose mask bit is set, in order."""
    if mask == FULL_MASK:
        return cluster
    if mask == 0:
        return b""
    view = memoryview(cluster)
    return b"".join(
        view[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]
        for j in range(BLOCKS_PER_CLUSTER) if mask >> j & 1
    )


def end_mask(device_size: int, cluster: int) -> int:
    """Mask bits allowed in this cluster: a block must start inside the device's whole 512-byte
    sectors. Proxmox's reader counts sectors (max_sector = size / 512) and refuses a block
    starting at or past it ("write beyond end"), so for a size that is not a multiple of 512
    the last partial sector cannot start a block. The one home of this rule: the writer
    sets, and every reader allows, exactly these bits."""
    remaining = device_size // 512 * 512 - cluster * CLUSTER_SIZE
    if remaining >= CLUSTER_SIZE:
        return FULL_MASK
    blocks = -(-remaining // BLOCK_SIZE) if remaining > 0 else 0
    return (1 << blocks) - 1


def expand_blocks(payload: bytes | memoryview, mask: int) -> bytes:
    """Inverse of stored_blocks: the whole 64 KiB cluster, zeros where the mask is clear."""
    if mask == FULL_MASK:
        return bytes(payload)
    out = bytearray(CLUSTER_SIZE)
    pos = 0
    for j in range(BLOCKS_PER_CLUSTER):
        if mask >> j & 1:
            out[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE] = payload[pos:pos + BLOCK_SIZE]
            pos += BLOCK_SIZE
    return bytes(out)
