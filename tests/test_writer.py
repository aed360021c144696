"""ArchiveWriter: writes in any order and at any alignment, zero ranges, several devices.

Each output is checked three ways: by an independent walker (every Proxmox rule, every cluster
exactly once), by vmafs's own Archive.read at random offsets, and by dissect.archive.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from archive_helpers import MemOutput, assert_every_cluster_once, dissect_read, walk_vma
from conftest import run_vmafs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.errors import FormatError
from vmafs.format import vma

CLUSTER = 65536
UUID = bytes.fromhex("00112233445566778899aabbccddeeff")


def make_image(rng: random.Random, size: int) -> bytes:
    """Random content with zero clusters, zero blocks, single bytes and random blocks. A
    block that starts in the partial last sector of an odd size stays zero: VMA cannot store
    it (vma.end_mask), and no QEMU disk has one."""
    buf = bytearray(size)
    for start in range(0, size, 4096):
        kind = rng.random()
        end = min(start + 4096, size)
        if start >= size // 512 * 512:
            break
        if kind < 0.35:
            buf[start:end] = rng.randbytes(end - start)
        elif kind < 0.45:
            buf[start + rng.randrange(end - start)] = rng.randint(1, 255)
    return bytes(buf)


def split(rng: random.Random, image: bytes, zero_ok: bool = True) -> list[tuple[str, int, int]]:
    """Cut [0, len) at random points (often mid-cluster); zero pieces may become write_zeroes."""
    size = len(image)
    cuts = {0, size}
    for _ in range(rng.randint(0, 2 + size // 16384)):
        cuts.add(rng.choice([rng.randrange(size), rng.randrange(0, size, 4096),
                             rng.randrange(0, size, CLUSTER) if size > CLUSTER else 0]))
    points = sorted(cuts)
    pieces = []
    for a, b in zip(points, points[1:], strict=False):
        if a == b:
            continue
        zero = image[a:b].count(0) == b - a
        pieces.append(("zeroes" if zero and zero_ok and rng.random() < 0.7 else "data", a, b))
    return pieces


def write_archive(images: list[bytes], configs: list[tuple[str, bytes]], seed: int,
                  extent_bytes: int | None = None, skip_zero: bool = True) -> MemOutput:
    rng = random.Random(seed)
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec(f"drive-scsi{i}", len(img))
                                 for i, img in enumerate(images)], configs,
                           uuid=UUID, ctime=1700000000, extent_bytes=extent_bytes)
    ops = []
    for dev_id, img in enumerate(images, start=1):
        for kind, a, b in split(rng, img):
            # untouched zero ranges are fine too: finish() fills them in
            if kind == "zeroes" and skip_zero and rng.random() < 0.3:
                continue
            ops.append((dev_id, kind, a, b))
    rng.shuffle(ops)
    for dev_id, kind, a, b in ops:
        if kind == "zeroes":
            writer.write_zeroes(dev_id, a, b - a)
        else:
            data = images[dev_id - 1][a:b]
            kind_of_buffer = rng.randrange(3)  # bytes, bytearray or memoryview: all accepted
            if kind_of_buffer == 0:
                writer.write(dev_id, a, data)
            elif kind_of_buffer == 1:
                writer.write(dev_id, a, bytearray(data))
            else:
                writer.write(dev_id, a, memoryview(data))
    writer.finish()
    return out


def check_archive(out: MemOutput, images: list[bytes], configs: list[tuple[str, bytes]],
                  seed: int, tmp_dir: str, use_dissect: bool = True) -> None:
    walk = walk_vma(out.buf)
    assert walk.uuid == UUID and walk.ctime == 1700000000
    assert_every_cluster_once(walk)
    assert [walk.devices[i] for i in sorted(walk.devices)] == [
        (f"drive-scsi{i}", len(img)) for i, img in enumerate(images)]
    assert walk.configs == dict(configs)
    for dev_id, img in enumerate(images, start=1):
        assert bytes(walk.images[dev_id]) == img
    # the index and the footer are null extents at the very end
    assert walk.null_extents and walk.null_extents[-1] == len(out.buf) - 512
    path = os.path.join(tmp_dir, f"w{seed}.vma")
    with open(path, "wb") as f:
        f.write(out.buf)
    rng = random.Random(seed ^ 0x5A5A)
    with Archive.open(path) as archive:
        assert archive.indexed
        assert [(d.name, d.size) for d in archive.devices] == [
            (f"drive-scsi{i}", len(img)) for i, img in enumerate(images)]
        assert dict(archive.configs) == dict(configs)
        for dev_id, img in enumerate(images, start=1):
            assert archive.read(dev_id, 0, len(img)) == img
            for _ in range(20):
                off = rng.randrange(len(img) + 10)
                length = rng.choice([1, 511, 4096, rng.randrange(3 * CLUSTER)])
                assert archive.read(dev_id, off, length) == img[off:off + length]
    if use_dissect:
        got_images, got_configs = dissect_read(path)
        assert got_configs == dict(configs)
        for i, img in enumerate(images):
            assert got_images[f"drive-scsi{i}"] == img


sizes = st.one_of(
    st.integers(1, 6).map(lambda n: n * CLUSTER),  # whole clusters
    st.integers(1, 800).map(lambda n: n * 512),  # multiples of 512, partial last cluster
    st.integers(1, 5 * CLUSTER),  # odd sizes like 1000 bytes
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(device_sizes=st.lists(sizes, min_size=1, max_size=3), seed=st.integers(0, 2**32),
       extent_bytes=st.sampled_from([None, 65536, 4096 * 20, 512 + 3 * CLUSTER]),
       configs=st.dictionaries(st.sampled_from(["qemu-server.conf", "qemu-server.fw", "x.json"]),
                               st.binary(max_size=600), max_size=3))
def test_writer_random_order_property(device_sizes: list[int], seed: int,
                                      extent_bytes: int | None,
                                      configs: dict[str, bytes]) -> None:
    rng = random.Random(seed)
    images = [make_image(rng, s) for s in device_sizes]
    out = write_archive(images, list(configs.items()), seed, extent_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        check_archive(out, images, list(configs.items()), seed, tmp,
                      use_dissect=seed % 4 == 0)
    if extent_bytes is not None:
        limit = max(extent_bytes // 4096, 16)
        walk = walk_vma(out.buf)
        assert all(blocks <= limit for _, _, blocks in walk.extents)


@pytest.mark.parametrize("seed", range(6))
def test_writer_with_dissect_and_extract(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    images = [make_image(rng, s) for s in (3 * CLUSTER + 512, 1000, 10 * CLUSTER, 70144)]
    configs = [("qemu-server.conf", b"cores: 2\nmemory: 512\n"), ("qemu-server.fw", b"")]
    out = write_archive(images, configs, seed)
    check_archive(out, images, configs, seed, str(tmp_path))
    # and `vmafs extract`, as a user runs it
    rc, _, err = run_vmafs("extract", "-q", tmp_path / f"w{seed}.vma", tmp_path / "x")
    assert rc == 0, err
    for i, img in enumerate(images):
        assert (tmp_path / "x" / f"disk-drive-scsi{i}.raw").read_bytes() == img
    for name, data in configs:
        assert (tmp_path / "x" / name).read_bytes() == data


def test_sparse_device_is_mostly_zero_slots() -> None:
    """A 64 MiB empty disk: 1024 zero slots, no data blocks, in 59-slot extents."""
    size = 64 * 1024 * 1024
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], uuid=UUID, ctime=0)
    writer.write(1, 5 * CLUSTER + 100, b"hello")
    writer.write_zeroes(1, 10 * CLUSTER, 20 * CLUSTER)
    writer.finish()
    walk = walk_vma(out.buf)
    assert_every_cluster_once(walk)
    data_blocks = sum(blocks for _, _, blocks in walk.extents)
    assert data_blocks == 1
    assert walk.max_slots == 59
    assert len(out.buf) < 12800 + 20 * 512 + 4096 + 2048
    image = bytearray(size)
    image[5 * CLUSTER + 100:5 * CLUSTER + 105] = b"hello"
    assert walk.images[1] == image


def test_full_clusters_use_full_mask() -> None:
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", 2 * CLUSTER)], uuid=UUID, ctime=0)
    data = os.urandom(2 * CLUSTER)
    writer.write(1, 0, data)
    writer.finish()
    raw = bytes(out.buf)
    h = vma.decode_header(raw)
    ext = vma.decode_extent_header(raw[h.header_size:h.header_size + 512], UUID)
    assert ext.slots == ((1, 0, 0xFFFF), (1, 1, 0xFFFF))
    assert raw[h.header_size + 512:h.header_size + 512 + 2 * CLUSTER] == data


def test_partial_last_cluster_mask_and_padding() -> None:
    """A 70144-byte device: the straddling block is stored zero-padded; no bit past the end."""
    size = 70144
    data = bytes([7]) * size
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi1", size)], uuid=UUID, ctime=0)
    writer.write(1, 0, data)
    writer.finish()
    raw = bytes(out.buf)
    h = vma.decode_header(raw)
    ext = vma.decode_extent_header(raw[h.header_size:h.header_size + 512], UUID)
    assert ext.slots == ((1, 0, 0xFFFF), (1, 1, 0x0003))
    tail = raw[h.header_size + 512 + CLUSTER:h.header_size + 512 + CLUSTER + 8192]
    assert tail == bytes([7]) * 4608 + bytes(8192 - 4608)


def test_emitted_frames_end_at_extent_boundaries() -> None:
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("d0", 3 * CLUSTER)], uuid=UUID, ctime=0)
    writer.write(1, 0, os.urandom(3 * CLUSTER))
    writer.finish()
    walk = walk_vma(out.buf)
    starts = {off for off, _, _ in walk.extents}
    assert out.frame_ends and all(end in starts for end in out.frame_ends)


def test_diskless_archive() -> None:
    """No devices: like `vma create` without disks, one empty extent, then index + footer."""
    out = MemOutput()
    writer = ArchiveWriter(out, [], [("qemu-server.conf", b"x")], uuid=UUID, ctime=0)
    writer.finish()
    walk = walk_vma(out.buf)
    assert walk.devices == {} and walk.configs == {"qemu-server.conf": b"x"}
    assert walk.extents[0][0] == walk.header_size and walk.extents[0][1:] == (0, 0)


def test_progress_counts_every_byte_once() -> None:
    seen: list[int] = []
    out = MemOutput()
    sizes = [3 * CLUSTER + 1000, 2 * CLUSTER]
    writer = ArchiveWriter(out, [DeviceSpec(f"d{i}", s) for i, s in enumerate(sizes)],
                           uuid=UUID, ctime=0, progress=seen.append)
    writer.write(1, 100, os.urandom(CLUSTER))
    writer.write_zeroes(2, 0, CLUSTER)
    writer.finish()
    assert sum(seen) == sum(sizes)


def test_writer_rejects_misuse() -> None:
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("d0", 2 * CLUSTER + 512)], uuid=UUID, ctime=0)
    writer.write(1, 0, bytes(CLUSTER))
    with pytest.raises(FormatError, match="written twice"):
        writer.write(1, 0, b"x" * CLUSTER)
    with pytest.raises(FormatError, match="written twice"):
        writer.write(1, 100, b"x")
    with pytest.raises(FormatError, match="written twice"):
        writer.write_zeroes(1, 0, 2 * CLUSTER)
    writer.write(1, CLUSTER, b"a" * 100)
    with pytest.raises(FormatError, match="written twice"):
        writer.write_zeroes(1, CLUSTER, CLUSTER)
    with pytest.raises(FormatError, match="outside device"):
        writer.write(1, 2 * CLUSTER, b"x" * 513)
    with pytest.raises(FormatError, match="outside device"):
        writer.write_zeroes(1, -1, 10)
    with pytest.raises(FormatError, match="unknown device id"):
        writer.write(2, 0, b"x")
    with pytest.raises(FormatError, match="unknown device id"):
        writer.write(0, 0, b"x")
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.finish()
    with pytest.raises(RuntimeError):
        writer.write(1, 2 * CLUSTER, b"x")
    walk = walk_vma(out.buf)
    assert_every_cluster_once(walk)
    expected = bytearray(2 * CLUSTER + 512)
    expected[CLUSTER:CLUSTER + 100] = b"a" * 100
    assert walk.images[1] == expected


def test_writer_rejects_bad_header_input() -> None:
    with pytest.raises(FormatError):
        ArchiveWriter(MemOutput(), [DeviceSpec("vmstate", CLUSTER)])
    with pytest.raises(FormatError, match="two devices named"):
        ArchiveWriter(MemOutput(), [DeviceSpec("d", CLUSTER), DeviceSpec("d", CLUSTER)])
    with pytest.raises(FormatError):
        ArchiveWriter(MemOutput(), [DeviceSpec("d", CLUSTER)], [("c", bytes(65536))])


def test_overlapping_pieces_in_one_cluster() -> None:
    """Pieces of one cluster may arrive in any order; it goes out once, when complete."""
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("d0", CLUSTER)], uuid=UUID, ctime=0)
    writer.write(1, 4096, b"b" * 8192)
    writer.write(1, 60000, b"c" * 5536)
    writer.write(1, 0, b"a" * 4096)
    writer.write(1, 12288, bytes(60000 - 12288))
    writer.finish()
    walk = walk_vma(out.buf)
    assert_every_cluster_once(walk)
    assert walk.images[1] == b"a" * 4096 + b"b" * 8192 + bytes(60000 - 12288) + b"c" * 5536


def test_writer_takes_over_handed_buffers() -> None:
    """bytearrays and memoryviews handed over (as the NBD sink does) are stored as they were."""
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("d0", 4 * CLUSTER)], uuid=UUID, ctime=0)
    first = bytearray(os.urandom(2 * CLUSTER))
    second = bytearray(os.urandom(CLUSTER))
    writer.write(1, 0, first)
    writer.write(1, 2 * CLUSTER, memoryview(second))
    writer.finish()
    assert bytes(walk_vma(out.buf).images[1]) == bytes(first) + bytes(second) + bytes(CLUSTER)


class RecordingOutput(MemOutput):
    """MemOutput that also keeps each write's length: zstd frames may only end between writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, chunk: bytes | bytearray | memoryview) -> int:
        self.writes.append(len(chunk))
        return super().write(chunk)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), chunk=st.sampled_from([1, 2, 58, 59, 60, 118, 1000]),
       device_sizes=st.lists(st.integers(1, 300).map(lambda n: n * CLUSTER - n % 3 * 512),
                             min_size=1, max_size=3))
def test_zero_slots_in_chunks_are_the_same_stream(seed: int, chunk: int,
                                                  device_sizes: list[int]) -> None:
    """finish() walks the zero slots in bounded chunks; the bytes and the writes are those of a
    single pass (grouping of 59 runs across chunks, the open extent is filled first)."""
    from vmafs.archive import writer as writer_module

    def run(zero_chunk: int) -> RecordingOutput:
        rng = random.Random(seed)
        out = RecordingOutput()
        old = writer_module.ZERO_CHUNK
        writer_module.ZERO_CHUNK = zero_chunk
        try:
            writer = ArchiveWriter(out, [DeviceSpec(f"d{i}", s)
                                         for i, s in enumerate(device_sizes)],
                                   uuid=UUID, ctime=0)
            for dev_id, size in enumerate(device_sizes, start=1):
                for _ in range(rng.randint(0, 6)):
                    off = rng.randrange(size)
                    n = min(size - off, rng.choice([100, CLUSTER, 3 * CLUSTER + 7]))
                    try:
                        if rng.random() < 0.3:
                            writer.write_zeroes(dev_id, off, n)
                        else:
                            writer.write(dev_id, off, rng.randbytes(n))
                    except FormatError:
                        pass  # overlapping random writes: the duplicate is refused, go on
            writer.finish()
        finally:
            writer_module.ZERO_CHUNK = old
        return out

    small, whole = run(chunk), run(1 << 30)
    assert small.buf == whole.buf and small.writes == whole.writes
    assert_every_cluster_once(walk_vma(small.buf))


def test_duplicates_across_cluster_set_pages() -> None:
    """A 5 TiB sparse device spans many ClusterSet pages: duplicates are found in any of them,
    with the first duplicate cluster named, whatever wrote it first."""
    size = 5 << 40
    page = 1 << 16
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("d0", size), DeviceSpec("d1", CLUSTER)],
                           uuid=UUID, ctime=0)
    far = 7 * page + 5
    writer.write(1, far * CLUSTER, os.urandom(3 * CLUSTER))
    writer.write_zeroes(1, (far - 2 * page) * CLUSTER, 2 * page * CLUSTER)  # ends at far
    writer.write(1, (9 * page - 1) * CLUSTER + 10, b"x")  # partial, last cluster of a page
    with pytest.raises(FormatError, match=f"cluster {far + 1} of d0 written twice"):
        writer.write(1, (far + 1) * CLUSTER, bytes(4 * CLUSTER))
    with pytest.raises(FormatError, match=f"cluster {far - 1} of d0 written twice"):
        writer.write_zeroes(1, (far - 1) * CLUSTER, 10 * CLUSTER)
    with pytest.raises(FormatError, match=f"cluster {9 * page - 1} of d0 written twice"):
        writer.write(1, (9 * page - 2) * CLUSTER, bytes(2 * CLUSTER))
    writer.write(1, (9 * page - 1) * CLUSTER + 100, b"y")  # more of a partial cluster is fine
    assert len(writer._touched[0]) == 3 + 2 * page + 1
    writer.write(2, 0, b"z" * CLUSTER)  # the other device is unaffected
    # nothing per cluster of the device: the sets hold a few pages
    assert len(writer._touched[0]._pages) <= 4 and len(writer._zeroed[0]._pages) <= 3


def test_sparse_device_finishes_in_bounded_memory() -> None:
    """A 256 GiB empty device: 2^22 zero slots (16 chunks) stream out in 59-slot extents, one
    write each, without any per-cluster array over the device."""
    import tracemalloc

    class Counting(MemOutput):
        """Counts, keeps nothing."""

        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.writes = 0

        def write(self, chunk: bytes | bytearray | memoryview) -> int:
            self.n += len(chunk)
            self.writes += 1
            return len(chunk)

    size = 1 << 38
    out = Counting()
    tracemalloc.start()
    try:
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], uuid=UUID, ctime=0)
        writer.write(1, size - 100, b"end")
        before, before_writes = out.n, out.writes
        writer.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    clusters = size // CLUSTER
    zero_extents = -(-(clusters - 1 - 58) // 59)  # 58 fill the tail cluster's open extent
    assert peak < 32 << 20
    # the partial tail cluster's extent, the zero slots, then index + footer
    assert out.n - before == 512 + 4096 + zero_extents * 512 + 2 * 512
    assert out.writes - before_writes == 1 + zero_extents + 2
