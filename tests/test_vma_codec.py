"""vmafs.format.vma, the pure VMA codec: header and extent round trips, Proxmox's error texts, null
extents, and the mask helpers against naive per-block references."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import numpy as np
import pytest
from conftest import VECTORS
from hypothesis import given, settings
from hypothesis import strategies as st

from vmafs.errors import FormatError
from vmafs.format import vma

UUID = bytes.fromhex("6a1f0c52d7b34c0e9a44c1b2e3f40517")

devnames = st.from_regex(r"\A[a-z][a-z0-9_-]{0,20}\Z", fullmatch=True).filter(
    lambda s: s != vma.VMSTATE)
confnames = st.from_regex(r"\A[a-z][a-z0-9._-]{0,30}\Z", fullmatch=True)


def reseal_header(buf: bytes | bytearray) -> bytes:
    """Recompute the header md5 after a deliberate edit (so a later check is reached)."""
    b = bytearray(buf)
    size = struct.unpack_from(">I", b, 56)[0]
    b[32:48] = bytes(16)
    b[32:48] = hashlib.md5(b[:size]).digest()
    return bytes(b)


def reseal_extent(buf: bytes | bytearray) -> bytes:
    """Recompute an extent header's md5 after a deliberate edit."""
    b = bytearray(buf)
    b[24:40] = bytes(16)
    b[24:40] = hashlib.md5(b).digest()
    return bytes(b)


def sample_header() -> bytes:
    return vma.encode_header(UUID, 1700000000,
                             [("drive-scsi0", 1 << 20), ("drive-efidisk0", 70144)],
                             [("qemu-server.conf", b"cores: 2\n"), ("qemu-server.fw", b"")])


# --- header -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    uuid=st.binary(min_size=16, max_size=16),
    ctime=st.integers(-(2**40), 2**40),
    devices=st.dictionaries(devnames, st.integers(1, vma.MAX_DEVICE_SIZE), max_size=6),
    configs=st.dictionaries(confnames, st.binary(max_size=3000), max_size=5),
)
def test_header_round_trip(uuid: bytes, ctime: int, devices: dict[str, int],
                           configs: dict[str, bytes]) -> None:
    buf = vma.encode_header(uuid, ctime, list(devices.items()), list(configs.items()))
    assert len(buf) % 512 == 0 and len(buf) > vma.HEADER_FIXED_SIZE
    assert vma.header_size_of(buf[:vma.HEADER_FIXED_SIZE]) == len(buf)
    h = vma.decode_header(buf)
    assert (h.uuid, h.ctime, h.header_size) == (uuid, ctime, len(buf))
    assert [(d.dev_id, d.name, d.size) for d in h.devices] == [
        (i, n, s) for i, (n, s) in enumerate(devices.items(), start=1)]
    assert h.configs == tuple(configs.items())
    assert h.vmstate is None


def test_header_layout_details() -> None:
    buf = sample_header()
    assert buf[:4] == b"VMA\0"
    assert struct.unpack_from(">I", buf, 4)[0] == 1
    assert struct.unpack_from(">I", buf, 48)[0] == 12288  # blob_buffer_offset
    # the blob buffer starts with the zero pad; lengths are little-endian
    assert buf[12288] == 0
    assert buf[12289:12291] == len(b"qemu-server.conf\0").to_bytes(2, "little")
    assert buf[12291:12291 + 17] == b"qemu-server.conf\0"
    assert struct.unpack_from(">I", buf, 2044)[0] == 1  # first config name at relative offset 1
    # blob_buffer_size counts the pad byte and is not rounded
    blob_size = struct.unpack_from(">I", buf, 52)[0]
    assert blob_size == 1 + (2 + 17) + (2 + 9) + (2 + 15) + (2 + 0) + (2 + 12) + (2 + 15)
    assert vma.decode_header(reseal_header(buf)) == vma.decode_header(buf)


@pytest.mark.parametrize("name", ["sample-2disks.vma", "sample-1disk-nocfg.vma",
                                  "sample-odd-size-1000b.vma", "sample-legacy-positional.vma"])
def test_header_identical_to_proxmox(name: str) -> None:
    """Re-encoding what we decode from a real `vma create` header gives the same bytes."""
    path = VECTORS / "proxmox" / name
    raw = path.read_bytes()[:65536]
    h = vma.decode_header(raw)
    again = vma.encode_header(h.uuid, h.ctime, [(d.name, d.size) for d in h.devices], h.configs)
    assert again == raw[:h.header_size]


def test_header_identical_to_spec_vector() -> None:
    path = VECTORS / "spec" / "two-disks.vma"
    raw = path.read_bytes()
    h = vma.decode_header(raw)
    assert [d.name for d in h.devices] == ["drive-efidisk0", "drive-scsi0"]
    again = vma.encode_header(h.uuid, h.ctime, [(d.name, d.size) for d in h.devices], h.configs)
    assert again == raw[:h.header_size]


def test_header_errors_use_proxmox_texts() -> None:
    good = sample_header()
    with pytest.raises(FormatError, match="can't read vma header - got EOF"):
        vma.decode_header(good[:12287])
    with pytest.raises(FormatError, match="not a vma file - wrong magic number"):
        vma.decode_header(b"VMB\0" + good[4:])
    with pytest.raises(FormatError, match="wrong vma header chechsum"):
        bad = bytearray(good)
        bad[100] ^= 1
        vma.decode_header(bytes(bad))
    with pytest.raises(FormatError, match="wrong vma version 2"):
        vma.decode_header(reseal_header(good[:4] + struct.pack(">I", 2) + good[8:]))
    with pytest.raises(FormatError, match="wrong vma header size 12288"):
        bad = bytearray(good)
        struct.pack_into(">I", bad, 56, 12288)
        vma.decode_header(bytes(bad))
    with pytest.raises(FormatError, match="can't read vma header data"):
        vma.decode_header(good[:-1])
    with pytest.raises(FormatError, match="wrong vma blob buffer offset"):
        bad = bytearray(good)
        struct.pack_into(">I", bad, 48, 12000)
        vma.decode_header(reseal_header(bad))
    with pytest.raises(FormatError, match="wrong vma blob buffer size"):
        bad = bytearray(good)
        struct.pack_into(">I", bad, 52, len(good))
        vma.decode_header(reseal_header(bad))
    with pytest.raises(FormatError, match="vma contains invalid data pointers"):
        bad = bytearray(good)
        struct.pack_into(">I", bad, 3068, 2)  # config data pointer off the blob chain
        vma.decode_header(reseal_header(bad))


def test_header_lenient_like_proxmox() -> None:
    """What the real reader ignores: reserved bytes; devices with size 0 or a bad name pointer."""
    good = bytearray(sample_header())
    good[60:2044] = os.urandom(1984)
    struct.pack_into(">Q", good, 4096 + 32 * 2 + 8, 0)  # efidisk0 size 0 -> no such device
    h = vma.decode_header(reseal_header(good))
    assert [d.name for d in h.devices] == ["drive-scsi0"]
    struct.pack_into(">I", good, 4096 + 32 * 1, 7)  # scsi0's name pointer off the chain
    assert vma.decode_header(reseal_header(good)).devices == ()


def _with_blob(buf: bytes, ptr_at: int, blob: bytes) -> bytes:
    """The header with the blob that the pointer at ptr_at names replaced (same length)."""
    b = bytearray(buf)
    at = vma.HEADER_FIXED_SIZE + struct.unpack_from(">I", b, ptr_at)[0]
    assert int.from_bytes(b[at:at + 2], "little") == len(blob)
    b[at + 2:at + 2 + len(blob)] = blob
    return reseal_header(b)


def test_header_names_are_c_strings_of_raw_bytes() -> None:
    """get_header_str: a NUL-terminated blob read up to its first NUL; bytes that are not
    UTF-8 stay those bytes (surrogateescape), never U+FFFD."""
    good = sample_header()  # drive-scsi0 (11 bytes + NUL), qemu-server.conf (16 + NUL)
    h = vma.decode_header(_with_blob(good, 2044, b"qemu-server\0conf\0"))
    assert h.configs[0][0] == "qemu-server"
    h = vma.decode_header(_with_blob(good, 4096 + 32, b"drive-\xffcsi0\0"))
    assert h.devices[0].name == "drive-\udcffcsi0"
    assert os.fsencode(h.devices[0].name) == b"drive-\xffcsi0"
    h = vma.decode_header(_with_blob(good, 4096 + 32, b"drive/scsi0\0"))
    assert h.devices[0].name == "drive/scsi0"  # accepted; file names are sanitised
    h = vma.decode_header(_with_blob(good, 4096 + 32, b"drive-scsi0x"))  # no final NUL
    assert [d.name for d in h.devices] == ["drive-efidisk0"]
    with pytest.raises(FormatError, match="invalid data pointers"):
        vma.decode_header(_with_blob(good, 2044, b"qemu-server.confx"))


def test_names_a_reader_accepts_round_trip() -> None:
    """convert and merge re-encode what they decoded: every name decode_header gives comes
    back byte for byte (one rule set: what a reader accepts, a writer carries over); the
    policy for new names (check_device_name) stays strict."""
    name = os.fsdecode(b"caf\xe9.conf")
    odd = ["drive/scsi0", "drive scsi0", os.fsdecode(b"drive-\xff"), "a\nb", ""]
    h = vma.decode_header(vma.encode_header(
        UUID, 0, [(n, 4096) for n in odd], [(name, b"x"), ("a/b", b""), ("..", b"y")]))
    assert h.configs == ((name, b"x"), ("a/b", b""), ("..", b"y"))
    assert [d.name for d in h.devices] == odd
    for bad in odd:
        with pytest.raises(FormatError, match="invalid device name"):
            vma.check_device_name(bad)
    with pytest.raises(FormatError, match="two devices named 'd'"):
        vma.encode_header(UUID, 0, [("d", 4096), ("d", 512)])
    with pytest.raises(FormatError, match="NUL"):
        vma.encode_header(UUID, 0, [("a\0b", 4096)])


def test_vmstate_device_is_separate() -> None:
    """Headers we decode may carry Proxmox's legacy vmstate; we never encode one."""
    path = VECTORS / "spec" / "vmstate.vma"
    h = vma.decode_header(path.read_bytes())
    assert [d.name for d in h.devices] == ["drive-scsi1"]
    assert h.vmstate == vma.Device(2, "vmstate", 196608)
    assert h.device(2) == h.vmstate
    with pytest.raises(FormatError, match="vmstate"):
        vma.encode_header(UUID, 0, [("vmstate", 65536)])


@pytest.mark.parametrize("name", ["", "drive scsi0", "drive-scsi0\n", "a/b", "..", "vmstate",
                                  "x" * 200, "drive\tx", "-leading-dash"])
def test_invalid_device_names(name: str) -> None:
    with pytest.raises(FormatError):
        vma.check_device_name(name)


def test_header_limits() -> None:
    with pytest.raises(FormatError, match="65535"):
        vma.encode_header(UUID, 0, [], [("big.conf", bytes(65536))])
    vma.encode_header(UUID, 0, [], [("max.conf", bytes(65535))])  # exactly at the limit
    with pytest.raises(FormatError, match="too many devices"):
        vma.encode_header(UUID, 0, [(f"d{i}", 512) for i in range(255)])
    with pytest.raises(FormatError):
        vma.encode_header(UUID, 0, [("d", 0)])
    with pytest.raises(FormatError):
        vma.encode_header(UUID, 0, [("d", vma.MAX_DEVICE_SIZE + 1)])
    for bad in ("a/b", "", "..", "."):
        with pytest.raises(FormatError, match="config name"):
            vma.check_config_name(bad)


# --- extents ------------------------------------------------------------------------------------

slot_lists = st.lists(
    st.tuples(st.integers(1, 255), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF)),
    max_size=vma.SLOTS_PER_EXTENT)


@settings(max_examples=100, deadline=None)
@given(uuid=st.binary(min_size=16, max_size=16), slots=slot_lists,
       block_count=st.integers(0, vma.SLOTS_PER_EXTENT * vma.BLOCKS_PER_CLUSTER))
def test_extent_header_round_trip(uuid: bytes, slots: list[tuple[int, int, int]],
                                  block_count: int) -> None:
    raw = vma.encode_extent_header(uuid, slots, block_count)
    assert len(raw) == 512 and raw[:4] == b"VMAE" and raw[4:6] == b"\0\0"
    ext = vma.decode_extent_header(raw, uuid)
    assert ext.block_count == block_count
    assert ext.slots == tuple(slots)
    assert ext.size == 512 + 4096 * block_count
    # the blockinfo layout: mask<<48 | dev_id<<32 | cluster, big-endian
    for i, (dev_id, cluster, mask) in enumerate(slots):
        assert struct.unpack_from(">Q", raw, 40 + 8 * i)[0] == mask << 48 | dev_id << 32 | cluster


def test_extent_header_ignores_unused_slots() -> None:
    """A slot with dev_id 0 is skipped whatever its other 7 bytes say (slot-gaps-ok.vma)."""
    infos = [0] * 59
    infos[0] = 0xFFFF << 48 | 1 << 32 | 5
    infos[1] = 0xABCD << 48 | 0x7F << 40 | 0 << 32 | 0xDEADBEEF  # dev_id 0
    infos[3] = 0x0001 << 48 | 2 << 32 | 9
    raw = vma.seal_extent(UUID, 17, struct.pack(">59Q", *infos))
    assert vma.decode_extent_header(raw, UUID).slots == ((1, 5, 0xFFFF), (2, 9, 1))


def test_extent_errors_in_proxmox_order() -> None:
    good = vma.encode_extent_header(UUID, [(1, 0, 0xFFFF)], 16)
    with pytest.raises(FormatError, match=r"read short extent \(100 bytes\)"):
        vma.decode_extent_header(good[:100], UUID)
    with pytest.raises(FormatError, match="wrong vma extent header chechsum"):
        vma.decode_extent_header(good[:50] + bytes([good[50] ^ 4]) + good[51:], UUID)
    with pytest.raises(FormatError, match="wrong vma extent header chechsum"):
        vma.decode_extent_header(bytes(512), UUID)
    # md5 is checked before the uuid, the uuid before the magic
    other = bytes(16)
    with pytest.raises(FormatError, match="wrong vma extent uuid"):
        vma.decode_extent_header(good, other)
    bad_magic = reseal_extent(b"VMAX" + good[4:])
    with pytest.raises(FormatError, match="wrong vma extent uuid"):
        vma.decode_extent_header(bad_magic, other)
    with pytest.raises(FormatError, match="wrong vma extent header magic"):
        vma.decode_extent_header(bad_magic, UUID)
    reserved = reseal_extent(good[:4] + b"\0\1" + good[6:])
    with pytest.raises(FormatError, match="wrong vma extent header magic"):
        vma.decode_extent_header(reserved, UUID)
    too_big = vma.encode_extent_header(UUID, [], 945)
    with pytest.raises(FormatError, match=r"short vma extent \(3867136 < 3871232\)"):
        vma.decode_extent_header(too_big, UUID)
    with pytest.raises(ValueError):
        vma.encode_extent_header(UUID, [(1, i, 0) for i in range(60)], 0)


@pytest.mark.parametrize("name", ["sample-2disks.vma", "sample-legacy-positional.vma"])
def test_extent_headers_identical_to_proxmox(name: str) -> None:
    """Every extent header of a real `vma create` archive re-encodes to the same 512 bytes."""
    path = VECTORS / "proxmox" / name
    raw = path.read_bytes()
    h = vma.decode_header(raw)
    pos = h.header_size
    count = 0
    while pos < len(raw):
        ext = vma.decode_extent_header(raw[pos:pos + 512], h.uuid)
        assert len(ext.slots) <= 58  # the real writer's limit
        assert vma.encode_extent_header(h.uuid, ext.slots, ext.block_count) == raw[pos:pos + 512]
        assert sum(bin(m).count("1") for _, _, m in ext.slots) == ext.block_count
        pos += ext.size
        count += 1
    assert pos == len(raw) and count > 1


# --- null extents -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=3 * vma.NULL_PAYLOAD_SIZE + 5))
def test_null_extent_payload_round_trip(payload: bytes) -> None:
    raw = vma.encode_null_extents(UUID, payload)
    n = max(1, -(-len(payload) // vma.NULL_PAYLOAD_SIZE))
    assert len(raw) == 512 * n
    got = b""
    for i in range(n):
        head = raw[512 * i:512 * (i + 1)]
        ext = vma.decode_extent_header(head, UUID)
        # what Proxmox sees: block_count 0, no used slot
        assert ext.block_count == 0 and ext.slots == ()
        assert all(head[40 + 8 * s + 3] == 0 for s in range(59))
        part = vma.null_extent_payload(head)
        assert len(part) == 413
        got += part
    assert got[:len(payload)] == payload
    assert got[len(payload):] == bytes(len(got) - len(payload))


def test_null_extent_full_413_bytes() -> None:
    payload = bytes(range(256)) + bytes(range(157))
    assert len(payload) == 413 == vma.NULL_PAYLOAD_SIZE
    raw = vma.encode_null_extents(UUID, payload)
    assert len(raw) == 512
    assert vma.null_extent_payload(raw) == payload
    assert len(vma.encode_null_extents(UUID, payload + b"x")) == 1024


def test_null_extent_payload_rejects_used_slot() -> None:
    raw = vma.encode_extent_header(UUID, [(1, 0, 0)], 0)
    with pytest.raises(FormatError, match="not a null extent"):
        vma.null_extent_payload(raw)


def test_spec_null_extent_trailer_payload() -> None:
    """The spec vector's trailer (written independently) decodes as null extents with JSON."""
    path = VECTORS / "spec" / "two-disks-null-extent-trailer.vma"
    raw = path.read_bytes()
    uuid = vma.decode_header(raw).uuid
    payload = b"".join(vma.null_extent_payload(raw[p:p + 512])
                       for p in (len(raw) - 1024, len(raw) - 512))
    assert payload.rstrip(b"\0").startswith(b"{") and len(payload.rstrip(b"\0")) == 739
    for p in (len(raw) - 1024, len(raw) - 512):
        assert vma.decode_extent_header(raw[p:p + 512], uuid).slots == ()


# --- masks and blocks ---------------------------------------------------------------------------


def naive_masks(data: bytes) -> list[int]:
    out = []
    for c in range(0, len(data), vma.CLUSTER_SIZE):
        mask = 0
        for j in range(16):
            block = data[c + j * 4096:c + (j + 1) * 4096]
            if block.count(0) != len(block):
                mask |= 1 << j
        out.append(mask)
    return out


def random_clusters(rng: random.Random, n: int) -> bytes:
    buf = bytearray(n * vma.CLUSTER_SIZE)
    for c in range(n):
        kind = rng.choice(["zero", "full", "mixed", "single-byte"])
        base = c * vma.CLUSTER_SIZE
        if kind == "full":
            buf[base:base + vma.CLUSTER_SIZE] = rng.randbytes(vma.CLUSTER_SIZE)
        elif kind == "mixed":
            for j in range(16):
                if rng.random() < 0.5:
                    buf[base + j * 4096:base + (j + 1) * 4096] = rng.randbytes(4096)
        elif kind == "single-byte":
            for _ in range(rng.randint(1, 4)):
                buf[base + rng.randrange(vma.CLUSTER_SIZE)] = rng.randint(1, 255)
    return bytes(buf)


@pytest.mark.parametrize("seed", range(8))
def test_cluster_masks_vs_naive(seed: int) -> None:
    rng = random.Random(seed)
    data = random_clusters(rng, rng.randint(1, 24))
    masks = vma.cluster_masks(data)
    assert masks.dtype == np.uint16
    assert masks.tolist() == naive_masks(data)
    # also from a memoryview and for the edge bytes of each block
    assert vma.cluster_masks(memoryview(data)).tolist() == naive_masks(data)


@settings(max_examples=100, deadline=None)
@given(positions=st.sets(st.integers(0, 2 * vma.CLUSTER_SIZE - 1), max_size=20),
       value=st.integers(1, 255))
def test_cluster_masks_single_bytes(positions: set[int], value: int) -> None:
    data = bytearray(2 * vma.CLUSTER_SIZE)
    for p in positions:
        data[p] = value
    assert vma.cluster_masks(bytes(data)).tolist() == naive_masks(bytes(data))


@pytest.mark.parametrize("seed", range(6))
def test_stored_and_expand_blocks_inverse(seed: int) -> None:
    rng = random.Random(seed)
    data = random_clusters(rng, 6)
    for c, mask in enumerate(naive_masks(data)):
        cluster = data[c * vma.CLUSTER_SIZE:(c + 1) * vma.CLUSTER_SIZE]
        stored = bytes(vma.stored_blocks(cluster, mask))
        assert len(stored) == 4096 * bin(mask).count("1")
        assert stored == b"".join(cluster[j * 4096:(j + 1) * 4096]
                                  for j in range(16) if mask >> j & 1)
        assert vma.expand_blocks(stored, mask) == cluster
    # a set bit may hold zeros (legal); a clear bit expands to zeros whatever was there
    assert vma.expand_blocks(bytes(4096), 1) == bytes(vma.CLUSTER_SIZE)
    assert vma.stored_blocks(b"\1" * vma.CLUSTER_SIZE, 0) == b""


@pytest.mark.parametrize(("size", "cluster", "expected"), [
    (65536, 0, 0xFFFF),
    (65536 * 3, 2, 0xFFFF),
    (1024, 0, 0x0001),
    (1000, 0, 0x0001),
    (70144, 1, 0x0003),  # one block + 512 bytes: the straddling block is allowed
    (65536 + 4096, 1, 0x0001),
    (65536, 1, 0x0000),  # past the end
    (10486272, 160, 0x0001),
])
def test_end_mask(size: int, cluster: int, expected: int) -> None:
    assert vma.end_mask(size, cluster) == expected


def test_popcount_table() -> None:
    rng = random.Random(1)
    for m in [0, 1, 0xFFFF, 0x8000] + [rng.randrange(1 << 16) for _ in range(200)]:
        assert int(vma.POPCOUNT16[m]) == bin(m).count("1")


def test_device_clusters() -> None:
    assert vma.Device(1, "d", 1).clusters == 1
    assert vma.Device(1, "d", 65536).clusters == 1
    assert vma.Device(1, "d", 65537).clusters == 2


# --- runs of extent headers at once (the forward walk), C and numpy ------------------------------


def _accelerator() -> object:
    try:
        from vmafs.format import _blocksums
    except ImportError:
        pytest.skip("the accelerator is not built (pip install -e . builds it from setup.py; "
                    "it needs gcc, python3-dev and libxxhash-dev)")
    return _blocksums


def _checked_one_by_one(buf: bytes, uuid: bytes) -> tuple[int, int]:
    """check_extent_headers by its definition: check_extent_header on each header in turn."""
    n = len(buf) // 512
    for i in range(n):
        try:
            blocks = vma.check_extent_header(buf[512 * i:512 * (i + 1)], uuid)
        except FormatError:
            return i, -1
        if blocks:
            return i, blocks
    return n, -1


def _header_runs(rnd: random.Random) -> list[bytes]:
    """Runs of extent headers as a walk reads them: null extents (block sums, an index), zero
    slots, a data header, then bytes after it; each also damaged in one of the ways a header
    can be (any byte, or a field resealed with a good md5), and cut short anywhere."""
    other = bytes(reversed(UUID))
    runs = []
    for _ in range(40):
        heads = [vma.encode_null_extents(UUID, rnd.randbytes(rnd.randrange(0, 5000)))]
        if rnd.random() < 0.3:
            heads.append(vma.encode_extent_header(UUID, [(1, rnd.randrange(1 << 32), 0)
                                                         for _ in range(rnd.randrange(60))], 0))
        heads.append(vma.encode_extent_header(UUID, [(2, 7, 0xFFFF), (1, 3, 0x8001)], 18))
        heads.append(rnd.randbytes(rnd.randrange(0, 1500)))  # its data
        runs.append(b"".join(heads))
    slots = bytes(rnd.randrange(256) if k % 8 != 3 else 0 for k in range(59 * 8))
    random_slots = vma.seal_extent(UUID, 0, slots)  # any slot bytes: md5 over all of them
    runs.append(random_slots * 3)
    damaged = []
    for run in runs:
        n = len(run) // 512
        i = rnd.randrange(n) if n else 0
        head = bytearray(run[512 * i:512 * (i + 1)])
        if len(head) < 512:
            continue
        flip = bytearray(run)
        flip[512 * i + rnd.randrange(512)] ^= 1 << rnd.randrange(8)
        damaged.append(bytes(flip))
        for edit in ((0, b"VMAX"), (4, b"\0\1"), (6, (945).to_bytes(2, "big")),
                     (6, (1).to_bytes(2, "big")), (8, other)):
            head2 = bytearray(head)
            head2[edit[0]:edit[0] + len(edit[1])] = edit[1]
            damaged.append(run[:512 * i] + reseal_extent(head2) + run[512 * (i + 1):])
    cut = [run[:rnd.randrange(len(run) + 1)] for run in runs]
    return runs + damaged + cut + [b"", bytes(512), bytes(1023)]


def test_check_extent_headers_as_one_by_one() -> None:
    """The C check of a run of headers, its numpy fallback and check_extent_header on each
    header in turn agree on every run, damaged or cut short (what the walk's one truth rests
    on); C's own md5 included."""
    native = _accelerator()
    rnd = random.Random(17)
    for run in _header_runs(rnd):
        want = _checked_one_by_one(run, UUID)
        assert vma.check_extent_headers_numpy(run, UUID) == want
        for buf in (run, bytearray(run), memoryview(run), np.frombuffer(run, np.uint8)):
            assert native.check_headers(buf, UUID) == want  # type: ignore[attr-defined]
        assert vma.check_extent_headers(memoryview(run)[:len(run)], UUID) == want
    with pytest.raises(ValueError):
        native.check_headers(b"", b"short")  # type: ignore[attr-defined]


def test_used_slots_c_and_numpy() -> None:
    """used_slots: the C accelerator and numpy give the same arrays, of the same dtypes,
    writable, for any slot bytes (dev_id 0 or not, any mask)."""
    native = _accelerator()
    rnd = random.Random(18)
    heads = [vma.encode_extent_header(UUID, [], 0), vma.encode_null_extents(UUID, b"x" * 413)]
    for _ in range(200):
        slots = bytearray(rnd.randbytes(59 * 8))
        for k in range(59):
            if rnd.random() < 0.4:
                slots[8 * k + 3] = 0  # unused
            elif rnd.random() < 0.3:
                slots[8 * k:8 * k + 2] = rnd.choice([b"\0\0", b"\xff\xff", b"\x80\x01"])
        heads.append(vma.seal_extent(UUID, rnd.randrange(945), bytes(slots)))
    for head in heads:
        want = vma.used_slots_numpy(head)
        got = [np.frombuffer(part, dtype) for part, dtype in zip(
            native.used_slots(head)[:4],  # type: ignore[attr-defined]
            (np.uint8, np.uint32, np.uint16, np.int64), strict=True)]
        for mine, theirs in zip(got, want[:4], strict=True):
            assert mine.dtype == theirs.dtype and mine.tolist() == theirs.tolist()
        assert native.used_slots(head)[4] == want[4]  # type: ignore[attr-defined]
        dev_ids, clusters, masks, ends, blocks = vma.used_slots(head)
        assert all(a.flags.writeable for a in (dev_ids, clusters, masks, ends))
        listed = [(d, c, m) for d, c, m in zip(dev_ids.tolist(), clusters.tolist(),
                                               masks.tolist(), strict=True)]
        infos = struct.unpack(">59Q", head[40:])
        assert listed == [(i >> 32 & 0xFF, i & 0xFFFFFFFF, i >> 48) for i in infos
                          if i >> 32 & 0xFF]
        assert blocks == sum(bin(m).count("1") for _, _, m in listed)
        assert ends.tolist() == list(np.cumsum([bin(m).count("1") * 4096 for _, _, m in listed
                                               if m], dtype=np.int64))
    with pytest.raises(ValueError):
        native.used_slots(bytes(511))  # type: ignore[attr-defined]
