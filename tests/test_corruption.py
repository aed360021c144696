"""Damaged archives: a flipped bit anywhere, or a cut at any point, is reported with exit 1 and
a clear message, never a traceback; Archive.read fails only for the damaged cluster."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from pathlib import Path

import pytest
from archive_helpers import MemOutput, walk_vma
from conftest import run_vmafs

from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.errors import ChecksumError, FormatError
from vmafs.format import index, vma

CLUSTER = 65536


def verify_fails(path: Path, *fragments: str) -> list[str]:
    """`vmafs verify` exits 1; every stderr line names the archive; the first has fragments."""
    rc, out, err = run_vmafs("verify", path)
    assert rc == 3, (rc, out, err)
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 12, err
    assert all(str(path) in x for x in lines), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[bytes]]:
    """An indexed archive: 2 devices, mixed clusters, several data extents, a 2-extent index."""
    rng = random.Random(3)
    images = []
    for size in (40 * CLUSTER + 4096, 3 * CLUSTER):
        img = bytearray(size)
        for start in range(0, size, 4096):
            if rng.random() < 0.6:
                img[start:start + 4096] = rng.randbytes(4096)
        images.append(bytes(img))
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", len(images[0])),
                                 DeviceSpec("drive-scsi1", len(images[1]))],
                           [("qemu-server.conf", b"cores: 1\n")], ctime=0,
                           extent_bytes=512 + 8 * CLUSTER)
    writer.write(2, 0, images[1])
    writer.write(1, 0, images[0])
    writer.finish()
    return bytes(out.buf), images


def save(tmp_path: Path, data: bytes | bytearray, name: str = "a.vma") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def layout(data: bytes) -> tuple[list[tuple[int, int, int]], list[int]]:
    walk = walk_vma(data)
    data_extents = [e for e in walk.extents if e[1]]
    return data_extents, walk.null_extents


def test_good_archive_verifies(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    data, _ = good
    data_extents, nulls = layout(data)
    assert len(data_extents) > 3 and len(nulls) >= 2  # index + footer
    rc, out, err = run_vmafs("verify", save(tmp_path, data))
    assert rc == 0, err


def test_flipped_data_bit(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    data, images = good
    with Archive.open(str(save(tmp_path, data, "probe.vma"))) as a:
        clusters = a._maps[1].clusters
        victim = int(clusters[len(clusters) // 2])
        offset = int(a._maps[1].offsets[len(clusters) // 2])  # first stored block of it
    bad = bytearray(data)
    bad[offset + 1234] ^= 0x20
    path = save(tmp_path, bad)
    verify_fails(path, "data checksum mismatch", f"cluster {victim} ")
    with Archive.open(str(path)) as a:
        with pytest.raises(ChecksumError, match=f"cluster {victim} of drive-scsi0"):
            a.read(1, victim * CLUSTER + 100, 10)
        with pytest.raises(ChecksumError):
            a.read(1, 0, len(images[0]))  # a read that touches it
        # every other cluster still reads
        for c in range(-(-len(images[0]) // CLUSTER)):
            if c != victim:
                assert a.read(1, c * CLUSTER, CLUSTER) == images[0][c * CLUSTER:(c + 1) * CLUSTER]
        assert a.read(2, 0, len(images[1])) == images[1]
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 3 and "Traceback" not in err and "checksum" in err
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


@pytest.mark.parametrize("where", [5, 40, 3000, 4096 + 32 + 9, 12288 + 3])
def test_flipped_header_bit(good: tuple[bytes, list[bytes]], tmp_path: Path,
                            where: int) -> None:
    data, _ = good
    bad = bytearray(data)
    bad[where] ^= 0x01
    path = save(tmp_path, bad)
    lines = verify_fails(path)
    assert "checksum" in lines[0] or "chechsum" in lines[0] or "version" in lines[0]
    with pytest.raises(FormatError):
        Archive.open(str(path))


@pytest.mark.parametrize("which", ["md5", "slot", "block_count", "uuid"])
def test_flipped_extent_header_bit(good: tuple[bytes, list[bytes]], tmp_path: Path,
                                   which: str) -> None:
    data, _ = good
    data_extents, _ = layout(data)
    pos = data_extents[2][0]
    byte = {"md5": 30, "slot": 40 + 8 * 3 + 6, "block_count": 7, "uuid": 10}[which]
    bad = bytearray(data)
    bad[pos + byte] ^= 0x04
    path = save(tmp_path, bad)
    verify_fails(path, "wrong vma extent header chechsum", f"offset {pos}")


def test_resealed_extent_header_lie(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    """A slot changed with a valid md5 (as Proxmox would accept it) still fails our checks."""
    data, _ = good
    data_extents, _ = layout(data)
    pos = data_extents[1][0]
    bad = bytearray(data)
    info = struct.unpack_from(">Q", bad, pos + 40)[0]
    struct.pack_into(">Q", bad, pos + 40, info ^ 1)  # another cluster number
    bad[pos + 24:pos + 40] = bytes(16)
    bad[pos + 24:pos + 40] = hashlib.md5(bad[pos:pos + 512]).digest()
    verify_fails(save(tmp_path, bad))


def test_flipped_index_bit(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    data, _ = good
    _, nulls = layout(data)
    index_pos = nulls[-2]
    bad = bytearray(data)
    bad[index_pos + 100] ^= 0x01  # index payload: the extent md5 breaks
    path = save(tmp_path, bad)
    verify_fails(path, "wrong vma extent header chechsum", f"offset {index_pos}")
    with pytest.raises(FormatError):
        Archive.open(str(path))


def test_resealed_index_bit(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    """Valid VMA (md5 recomputed) but the index bytes changed: its own checksum catches it."""
    data, _ = good
    footer = index.decode_footer(vma.null_extent_payload(data[-512:]))
    assert footer is not None and footer.index_length > 413  # spans 2 null extents
    index_pos = footer.index_offset + 512  # the second one, inside the index bytes
    bad = bytearray(data)
    bad[index_pos + 41] ^= 0x01
    bad[index_pos + 24:index_pos + 40] = bytes(16)
    bad[index_pos + 24:index_pos + 40] = hashlib.md5(bad[index_pos:index_pos + 512]).digest()
    path = save(tmp_path, bad)
    verify_fails(path, "trailing index", "checksum")
    with pytest.raises(ChecksumError, match="index checksum"):
        Archive.open(str(path))


def test_flipped_footer_bit(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    data, _ = good
    pos = len(data) - 512
    bad = bytearray(data)
    bad[pos + 41] ^= 0x80
    path = save(tmp_path, bad)
    verify_fails(path, "wrong vma extent header chechsum", f"offset {pos}")


def test_resealed_footer_lie(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    """A footer pointing elsewhere (valid md5) is caught by verify and by Archive.open."""
    data, _ = good
    pos = len(data) - 512
    raw = data[pos:]
    payload = vma.null_extent_payload(raw)
    footer = index.decode_footer(payload)
    assert footer is not None
    moved = index.Footer(footer.index_offset + 512, footer.index_length, footer.index_checksum)
    uuid = vma.decode_header(data).uuid
    bad = data[:pos] + vma.encode_null_extents(uuid, index.encode_footer(moved))
    path = save(tmp_path, bad)
    verify_fails(path, "trailing index")
    with pytest.raises(FormatError):
        Archive.open(str(path))


def cut_points(data: bytes) -> list[tuple[str, int]]:
    data_extents, nulls = layout(data)
    first = data_extents[0][0]
    mid = data_extents[len(data_extents) // 2][0]
    return [
        ("in the fixed header", 5000),
        ("in the blob area", 12288 + 100),
        ("inside an extent header", first + 200),
        ("inside extent data", first + 512 + 4096 * 2 + 7),
        ("at a data extent boundary", mid),
        ("one byte short", len(data) - 1),
        ("inside the index", nulls[-2] + 100),
        ("between index and footer", len(data) - 512),
    ]


@pytest.mark.parametrize("case", range(8))
def test_truncated(good: tuple[bytes, list[bytes]], tmp_path: Path, case: int) -> None:
    data, _ = good
    what, cut = cut_points(data)[case]
    path = save(tmp_path, data[:cut])
    lines = verify_fails(path)
    assert any(word in lines[0] for word in ("truncated", "EOF", "short", "missing")), \
        (what, lines)
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 3 and "Traceback" not in err
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


def test_truncated_archive_open(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    """Without its footer the archive is walked, which finds the cut and refuses to open it:
    the model serves nothing verify rejects."""
    data, images = good
    data_extents, _ = layout(data)
    cut = data_extents[-1][0] + 512 + 4096  # inside the last data extent
    with pytest.raises(FormatError, match=f"offset {data_extents[-1][0]}.*truncated"):
        Archive.open(str(save(tmp_path, data[:cut])))
    with pytest.raises(FormatError):
        Archive.open(str(save(tmp_path, data[:12288 + 10], "b.vma")))


def test_junk_after_footer(good: tuple[bytes, list[bytes]], tmp_path: Path) -> None:
    data, _ = good
    verify_fails(save(tmp_path, data + b"x" * 100), "read short extent (100 bytes)")
    verify_fails(save(tmp_path, data + bytes(512), "b.vma"), "wrong vma extent header chechsum")
