"""The archive model trusts an index only where the stream it sits in agrees, and opens nothing
that verify rejects for its structure: one case per class of defect found in review."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import MemOutput, walk_vma
from conftest import run_vmafs

from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.errors import FormatError
from vmafs.format import index, vma

CLUSTER = 65536
UUID = bytes(range(16))
_HEAD = struct.Struct("<8sIIQQ")


def build(image: bytes, *, extent_clusters: int = 4) -> bytes:
    out = MemOutput()
    writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", len(image))], uuid=UUID, ctime=0,
                           extent_bytes=512 + extent_clusters * CLUSTER)
    writer.write(1, 0, image)
    writer.finish()
    return bytes(out.buf)


def footer_of(data: bytes) -> index.Footer:
    footer = index.decode_footer(vma.null_extent_payload(data[-512:]))
    assert footer is not None
    return footer


def index_blob(data: bytes) -> bytes:
    footer = footer_of(data)
    span = data[footer.index_offset:len(data) - 512]
    payload = b"".join(vma.null_extent_payload(span[p:p + 512]) for p in range(0, len(span), 512))
    return payload[:footer.index_length]


def seal_index(uuid: bytes, blob: bytes, index_offset: int) -> bytes:
    """Index null extents plus footer for blob, as the writer lays them out."""
    footer = index.Footer(index_offset, len(blob), index.checksum(blob))
    return vma.encode_null_extents(uuid, blob) + vma.encode_null_extents(
        uuid, index.encode_footer(footer))


def columns(blob: bytes) -> tuple[int, int, dict[str, np.ndarray]]:
    _, _, _, n_ext, n_slots = _HEAD.unpack_from(blob)
    pos = _HEAD.size
    cols = {}
    for name, dtype, count in (("ext", "<u8", n_ext), ("count", "<u2", n_ext),
                               ("cluster", "<u4", n_slots), ("mask", "<u2", n_slots),
                               ("dev", "u1", n_slots), ("check", "<u4", n_slots)):
        cols[name] = np.frombuffer(blob, dtype, count, pos).copy()
        pos += cols[name].nbytes
    return n_ext, n_slots, cols


def encode_columns(cols: dict[str, np.ndarray]) -> bytes:
    head = _HEAD.pack(index.INDEX_MAGIC, index.INDEX_VERSION, 0, len(cols["ext"]),
                      len(cols["cluster"]))
    return head + b"".join(cols[n].tobytes() for n in ("ext", "count", "cluster", "mask",
                                                        "dev", "check"))


def refused(path: Path, *fragments: str) -> None:
    """Archive.open refuses it, and verify fails it, each with one line."""
    with pytest.raises(FormatError) as err:
        Archive.open(str(path))
    for fragment in fragments:
        assert fragment in str(err.value)
    rc, _, stderr = run_vmafs("verify", "-q", path)
    assert rc == 3 and "Traceback" not in stderr


@pytest.fixture(scope="module")
def image() -> bytes:
    rng = random.Random(8)
    return rng.randbytes(24 * CLUSTER)  # every block non-zero: data extents to the end


def test_footer_forged_in_the_last_data_cluster(image: bytes, tmp_path: Path) -> None:
    """Class 1: an un-indexed archive whose guest wrote a sealed index and footer into its
    last cluster. The tail looks indexed; the stream walk sees only data. Verify and extract
    reject it, and so does the model (the extent the forged index hides is a data extent)."""
    full = build(image)
    stream = full[:footer_of(full).index_offset]  # the real index cut off: un-indexed
    walk = walk_vma(stream)
    data_extents = [e for e in walk.extents if e[1]]
    last_offset = data_extents[-1][0]
    # The forged index lists every data extent but the last, whose place it calls empty.
    _, _, cols = columns(index_blob(full))
    keep = int(cols["count"][:-1].sum())
    forged_cols = {"ext": cols["ext"][:-1], "count": cols["count"][:-1],
                   **{n: cols[n][:keep] for n in ("cluster", "mask", "dev", "check")}}
    blob = encode_columns(forged_cols)
    tail_len = len(seal_index(UUID, blob, 0))
    assert tail_len <= CLUSTER
    forged_tail = seal_index(UUID, blob, len(stream) - tail_len)
    assert (len(stream) - tail_len - last_offset) % 512 == 0
    guest = bytearray(image)
    guest[-tail_len:] = forged_tail  # the guest's own last bytes
    forged = build(bytes(guest))
    forged = forged[:footer_of(forged).index_offset]
    assert forged.endswith(forged_tail) and len(forged) == len(stream)
    path = tmp_path / "forged.vma"
    path.write_bytes(forged)
    refused(path, "vmafs index not usable", f"offset {last_offset}")
    rc, _, err = run_vmafs("verify", path)
    assert "look like a vmafs footer" in err
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 3 and "Traceback" not in err


def test_index_contradicting_extent_headers(image: bytes, tmp_path: Path) -> None:
    """Class 4: two clusters swapped in the index and resealed (checksums follow the data, so
    only the extent headers can tell): refused, never one cluster served as another."""
    data = build(image)
    footer = footer_of(data)
    _, _, cols = columns(index_blob(data))
    cols["cluster"][[0, 1]] = cols["cluster"][[1, 0]]
    bad = data[:footer.index_offset] + seal_index(UUID, encode_columns(cols),
                                                  footer.index_offset)
    path = tmp_path / "swapped.vma"
    path.write_bytes(bad)
    refused(path, "does not match the extent header", f"offset {int(cols['ext'][0])}")


def test_damaged_footer_is_never_read_without_checksums(image: bytes, tmp_path: Path) -> None:
    """Class 3: a flipped footer byte does not make the model walk the archive and serve it
    unchecked: the walk reaches the damaged footer and refuses."""
    data = bytearray(build(image))
    data[-100] ^= 0x10
    path = tmp_path / "footer.vma"
    path.write_bytes(bytes(data))
    refused(path, f"offset {len(data) - 512}")


def test_index_gone_but_its_extents_remain(image: bytes, tmp_path: Path) -> None:
    """The footer cut off at an extent boundary: the index's null extents are still there."""
    data = build(image)
    path = tmp_path / "cut.vma"
    path.write_bytes(data[:-512])
    refused(path, "vmafs index is damaged")


def test_bytes_appended_after_the_footer(image: bytes, tmp_path: Path) -> None:
    """Class 11: 512 zero bytes after a vmafs archive: no index is found at the tail, and the
    walk refuses the junk instead of serving the archive unchecked."""
    data = build(image)
    path = tmp_path / "appended.vma"
    path.write_bytes(data + bytes(512))
    refused(path, f"offset {len(data)}")


@pytest.mark.parametrize("where", ["footer", "index"])
def test_offsets_near_2_64(image: bytes, tmp_path: Path, where: str) -> None:
    """Class 5: offsets that overflow any arithmetic are refused at open, not on a read."""
    data = build(image)
    footer = footer_of(data)
    if where == "footer":
        lie = index.Footer((1 << 64) - 512, footer.index_length, footer.index_checksum)
        bad = data[:-512] + vma.encode_null_extents(UUID, index.encode_footer(lie))
    else:
        _, _, cols = columns(index_blob(data))
        cols["ext"][0] = (1 << 64) - 4096
        bad = data[:footer.index_offset] + seal_index(UUID, encode_columns(cols),
                                                      footer.index_offset)
    path = tmp_path / "overflow.vma"
    path.write_bytes(bad)
    refused(path, "vmafs index not usable")


def test_proxmox_archive_cut_at_an_extent_boundary(tmp_path: Path, vectors: Path) -> None:
    """Class 11: what an interrupted vzdump leaves is refused: its missing clusters must not
    read as zeros."""
    data = (vectors / "proxmox" / "sample-2disks.vma").read_bytes()
    walk = walk_vma(data)
    cut = walk.extents[len(walk.extents) // 2][0]
    path = tmp_path / "cut.vma"
    path.write_bytes(data[:cut])
    refused(path, "missing cluster")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Class 10: a FIFO with no writer is not waited on."""
    fifo = tmp_path / "pipe.vma"
    os.mkfifo(fifo)
    with pytest.raises(FormatError.__mro__[1], match="not a regular file"):
        Archive.open(str(fifo))


def test_indexed_archive_opens_in_indexed_mode(image: bytes, tmp_path: Path) -> None:
    path = tmp_path / "good.vma"
    path.write_bytes(build(image))
    with Archive.open(str(path)) as archive:
        assert archive.mode == "indexed"
        assert bytes(archive.read(1, 0, len(image))) == image


def test_walk_cache(tmp_path: Path, vectors: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A walked archive is walked once; while it is unchanged the next open uses the cached
    walk, and any change to the file makes the cache miss."""
    import shutil

    from vmafs.archive import reader, walk_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(walk_cache, "MIN_EXTENTS", 0)
    path = tmp_path / "p.vma"
    shutil.copy(vectors / "proxmox" / "sample-2disks.vma", path)
    with Archive.open(str(path)) as first:
        images = {d.dev_id: bytes(first.read(d.dev_id, 0, d.size)) for d in first.devices}
    assert len(os.listdir(walk_cache.cache_dir())) == 1
    assert oct(os.stat(walk_cache.cache_dir()).st_mode & 0o777) == "0o700"

    def no_walk(*args: object) -> None:
        raise AssertionError("walked again")

    monkeypatch.setattr(reader, "index_by_walking", no_walk)
    with Archive.open(str(path)) as again:
        assert again.mode == "walked"
        assert {d.dev_id: bytes(again.read(d.dev_id, 0, d.size)) for d in again.devices} == images
    os.utime(path, ns=(1, 1))  # changed (ctime moves too): the cache must not answer
    with pytest.raises(AssertionError, match="walked again"):
        Archive.open(str(path))
    monkeypatch.setattr(reader, "index_by_walking", walk_cache_walk)
    Archive.open(str(path)).close()  # walked and cached anew
    for name in os.listdir(walk_cache.cache_dir()):
        entry = Path(walk_cache.cache_dir(), name)
        data = bytearray(entry.read_bytes())
        data[60] ^= 1  # a damaged entry is a miss, never trusted
        entry.write_bytes(bytes(data))
    monkeypatch.setattr(reader, "index_by_walking", no_walk)
    with pytest.raises(AssertionError, match="walked again"):
        Archive.open(str(path))


@pytest.mark.parametrize("name", ["w.vma", "w.vma.zst"])
def test_a_written_archive_opens_without_its_check(image: bytes, tmp_path: Path, name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A full archive vmafs has just written and committed is remembered as checked (its index
    and stream agree by construction): opening it reads no extent headers, until the file
    changes; an increment is not (what it holds is learnt only by the check)."""
    from vmafs.archive import locate, walk_cache
    from vmafs.container.output import open_output

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / name
    with open_output(str(path)) as out:
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", len(image))])
        writer.write(1, 0, image)
        writer.finish()
    assert len(os.listdir(walk_cache.cache_dir())) == 1
    checked = []
    confirm = locate.confirm_index
    monkeypatch.setattr(locate, "confirm_index",
                        lambda *a, **k: checked.append(1) or confirm(*a, **k))
    with Archive.open(str(path)) as archive:
        assert bytes(archive.read(1, 0, len(image))) == image
    assert not checked
    os.utime(path, ns=(1, 1))  # changed (ctime moves too): checked again
    Archive.open(str(path)).close()
    assert checked


def walk_cache_walk(*args: object) -> object:
    from vmafs.archive.walk import index_by_walking

    return index_by_walking(*args)  # type: ignore[arg-type]


def test_verify_json_gives_problems_as_values(image: bytes, tmp_path: Path) -> None:
    """Problems are data: kind, device, cluster, offset and message, not text to parse."""
    import json

    data = bytearray(build(image))
    walk = walk_vma(bytes(data))
    first_data = next(e for e in walk.extents if e[2])[0]
    data[first_data + 512 + 100] ^= 0x01  # a data byte of cluster 0: only its checksum tells
    path = tmp_path / "bad.vma"
    path.write_bytes(bytes(data))
    rc, out, _ = run_vmafs("verify", "-q", "--json", path)
    report = json.loads(out)
    assert rc == 3 and report["ok"] is False
    assert report["problems"][0] == {
        "kind": "checksum", "device": "drive-scsi0", "cluster": 0, "offset": first_data + 512,
        "message": report["problems"][0]["message"]}
    with Archive.open(str(path)) as archive:  # the model serves the rest, EIO for that cluster
        assert bytes(archive.read(1, CLUSTER, CLUSTER)) == image[CLUSTER:2 * CLUSTER]
        with pytest.raises(FormatError, match="checksum"):
            archive.read(1, 0, 4096)


def test_confirmed_index_is_remembered(image: bytes, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An index checked against its stream is not checked again while the file is unchanged;
    any change to the file checks it anew."""
    from vmafs.archive import locate, walk_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(walk_cache, "MIN_EXTENTS", 0)
    path = tmp_path / "a.vma"
    path.write_bytes(build(image))
    Archive.open(str(path)).close()
    checked = []
    real = locate.confirm_index

    def counting(*args: object, **kwargs: object) -> object:
        checked.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(locate, "confirm_index", counting)
    with Archive.open(str(path)) as again:
        assert again.mode == "indexed" and bytes(again.read(1, 0, len(image))) == image
    assert not checked
    os.utime(path, ns=(1, 1))
    Archive.open(str(path)).close()
    assert checked == [1]
