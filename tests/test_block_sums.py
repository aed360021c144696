"""Block-summed plain archives (issue 17, format/index.py): every stored 4 KiB block has a sum
in null extents after its data extent, and a read of part of a cluster reads only its blocks
and the cluster's sums. Every path must still give the same bytes or an error: damaged sums
fall back to the whole cluster, a damaged block fails wherever it is read, and an archive
written without sums reads as before. Real archives, real commands, dissect.archive as a second
reader. The sums themselves: the C accelerator (format/_blocksums.c) and the Python fallback each
compute what the format defines, for every kind of buffer (so they are equal)."""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash
from archive_helpers import assert_every_cluster_once, dissect_read, walk_vma
from conftest import run_vmafs

from vmafs.archive.problems import ArchiveError
from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.zstd_output import PlainOutput
from vmafs.errors import FormatError
from vmafs.format import index, vma

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutations as mu  # noqa: E402

MiB = 1 << 20
CLUSTER = vma.CLUSTER_SIZE
BLOCK = vma.BLOCK_SIZE


def _image(path: Path) -> bytes:
    """Dense data, partial clusters (some 4 KiB blocks zero), holes, an odd tail: 9 MiB."""
    rnd = random.Random(17)
    img = bytearray(9 * MiB + 3 * 512)
    img[:5 * MiB] = rnd.randbytes(5 * MiB)
    for c in range(40, 80):  # every other block zero: masks 0x5555
        for j in range(0, 16, 2):
            at = c * CLUSTER + j * BLOCK
            img[at:at + BLOCK] = bytes(BLOCK)
    for _ in range(30):
        at = rnd.randrange(6 * MiB, 9 * MiB) // BLOCK * BLOCK
        img[at:at + BLOCK] = rnd.randbytes(BLOCK)
    img[-700:] = rnd.randbytes(700)
    path.write_bytes(img)
    return bytes(img)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    work = tmp_path_factory.mktemp("block-sums")
    img = _image(work / "disk.raw")
    out = work / "a.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", out, f"drive-scsi0={work / 'disk.raw'}")
    assert rc == 0, err
    return out, img


def _footer(data: bytes) -> index.Footer:
    footer = index.decode_footer(vma.null_extent_payload(data[-512:]))
    assert footer is not None
    return footer


def _sums_runs(data: bytes) -> list[tuple[int, int, int]]:
    """(data extent offset, its blocks, where its sums start) of every data extent."""
    walk = walk_vma(data)
    return [(off, blocks, off + 512 + blocks * BLOCK) for off, _, blocks in walk.extents
            if blocks]


def _reads(archive: Archive, img: bytes, seed: int, count: int = 1500) -> None:
    rnd = random.Random(seed)
    for _ in range(count):
        off = rnd.randrange(len(img))
        n = rnd.choice((1, 100, 512, BLOCK, 2 * BLOCK, 3 * BLOCK + 5, CLUSTER, 200_000))
        assert bytes(archive.read(1, off, n)) == img[off:off + n], (off, n)


def test_round_trip(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """Every read size, verify, extract, and Proxmox's rules (an independent walker) and
    dissect.archive agree; each data extent is followed by exactly its sums."""
    path, img = made
    data = path.read_bytes()
    assert _footer(data).block_sums and _footer(data).sums_carried
    walk = walk_vma(data)  # asserts Proxmox's reader rules: mid-stream null extents pass
    assert_every_cluster_once(walk)
    assert bytes(walk.images[1]) == img
    for _, blocks, at in _sums_runs(data):
        n = index.sums_extents(blocks)
        payload = b"".join(vma.null_extent_payload(data[at + k * 512:at + (k + 1) * 512])
                           for k in range(n))
        own = data[at - blocks * BLOCK:at]
        assert payload[:4 * blocks] == index.block_sums(own)
        assert not any(payload[4 * blocks:])
    images, _ = dissect_read(path)
    assert images["drive-scsi0"] == img
    with Archive.open(str(path)) as archive:
        _reads(archive, img, 1)
    rc, out, err = run_vmafs("verify", path)
    assert rc == 0, err
    rc, _, err = run_vmafs("extract", "-q", path, tmp_path / "x")
    assert rc == 0, err
    assert (tmp_path / "x" / "disk-drive-scsi0.raw").read_bytes() == img


def _damaged(path: Path, tmp: Path, edit: str) -> tuple[Path, int, int]:
    """A copy of the archive with one thing damaged; (copy, cluster, stream offset of its
    data) of the second cluster (full) of the first data extent."""
    data = bytearray(path.read_bytes())
    runs = _sums_runs(bytes(data))
    ext_off, _, sums_at = runs[0]
    first = struct.unpack_from(">Q", data, ext_off + 40)[0]
    info = struct.unpack_from(">Q", data, ext_off + 48)[0]
    dev, cluster, mask = info >> 32 & 0xFF, info & 0xFFFFFFFF, info >> 48
    assert mask == 0xFFFF and dev and first >> 48 == 0xFFFF
    data_at = ext_off + 512 + CLUSTER
    if edit == "block":  # a byte of block 0 of that cluster
        data[data_at + 10] ^= 1
    elif edit == "sums":  # its sums, resealed: a valid null extent with wrong sums
        data[sums_at + 40 + 9 * 8] ^= 1  # payload byte 63: the 16th sum of cluster 1
        mu.reseal(data, sums_at)
    elif edit == "sums-md5":  # a broken extent where Proxmox's reader stops
        data[sums_at + 40] ^= 1
    out = tmp / f"{edit}.vma"
    out.write_bytes(data)
    return out, cluster, data_at


def test_damaged_block_fails_on_every_path(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """A damaged block is an error wherever it is read; the other blocks of its cluster,
    proven by their sums, still read (the oracle in mutations.py allows exactly that)."""
    path, img = made
    bad, cluster, _ = _damaged(path, tmp_path, "block")
    base = cluster * CLUSTER
    with Archive.open(str(bad)) as archive:
        with pytest.raises(ArchiveError, match="checksum mismatch"):
            archive.read(1, base, BLOCK)  # the damaged block
        with pytest.raises(ArchiveError, match="checksum mismatch"):
            archive.read(1, base, CLUSTER)  # the whole cluster
        with pytest.raises(ArchiveError, match="checksum mismatch"):
            archive.read(1, base - BLOCK, 2 * BLOCK)  # across into it
        assert bytes(archive.read(1, base + 5 * BLOCK, BLOCK)) == img[base + 5 * BLOCK:
                                                                     base + 6 * BLOCK]
        with pytest.raises(ArchiveError, match="checksum mismatch"):
            list(archive.iter_stored(1))
    rc, _, err = run_vmafs("verify", bad)
    assert rc == 3 and "checksum mismatch" in err, err
    rc, _, err = run_vmafs("extract", "-q", bad, tmp_path / "x")
    assert rc == 3 and not (tmp_path / "x" / "disk-drive-scsi0.raw").exists(), err


def test_damaged_sums_fall_back(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """Sums that fail the index: small reads read the whole cluster instead (same bytes as
    every other path); verify and extract call the archive damaged."""
    path, img = made
    bad, cluster, _ = _damaged(path, tmp_path, "sums")
    with Archive.open(str(bad)) as archive:
        _reads(archive, img, 2, 800)
        base = cluster * CLUSTER
        for j in range(16):
            at = base + j * BLOCK
            assert bytes(archive.read(1, at + 3, 100)) == img[at + 3:at + 103]
        assert sum(len(d) for _, _, d, _ in archive.iter_stored(1)) > 0
    rc, _, err = run_vmafs("verify", bad)
    assert rc == 3 and "block sums" in err, err
    rc, _, err = run_vmafs("extract", "-q", bad, tmp_path / "x")
    assert rc != 0 and not (tmp_path / "x" / "disk-drive-scsi0.raw").exists(), err


def test_broken_sums_extent_refused(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """A sums extent whose md5 fails ends the stream for Proxmox's reader: a random reader
    must not serve what follows it, so the archive does not open."""
    path, _ = made
    bad, _, _ = _damaged(path, tmp_path, "sums-md5")
    with pytest.raises(ArchiveError, match="md5"):
        Archive.open(str(bad))
    rc, _, err = run_vmafs("verify", bad)
    assert rc == 3, err


def _write(out_path: Path, img: bytes, *, block_sums: bool) -> None:
    with open(out_path, "wb") as f:
        out = PlainOutput(f)
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", len(img))], uuid=b"u" * 16,
                               ctime=1, block_sums=block_sums)
        writer.write(1, 0, img)
        writer.finish()
        out.close()


def test_unsummed_archive_reads_as_before(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """An archive with data checksums (every vmafs before block sums): no sums extents, no
    footer field, every path reads it."""
    _, img = made
    old = tmp_path / "old.vma"
    _write(old, img, block_sums=False)
    data = old.read_bytes()
    footer = _footer(data)
    assert not footer.block_sums
    walk = walk_vma(data)
    assert min(walk.null_extents) == footer.index_offset  # only the index and its footer
    with Archive.open(str(old)) as archive:
        _reads(archive, img, 3, 500)
    rc, _, err = run_vmafs("verify", old)
    assert rc == 0, err
    new = tmp_path / "new.vma"
    _write(new, img, block_sums=True)
    overhead = new.stat().st_size / old.stat().st_size - 1
    assert 0 < overhead < 0.002  # 10 null extents per 3.8 MB extent: 0.13 %


def test_zstd_archive_carries_no_sums(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """Only plain archives carry sums (a zstd read decompresses a whole frame anyway), but
    the checks are over block sums in both: the same content digest, plain or zstd, and
    `zstd -d` of a .vma.zst is a plain archive that verifies."""
    path, img = made
    out = tmp_path / "a.vma.zst"
    rc, _, err = run_vmafs("convert", path, out)
    assert rc == 0, err
    with Archive.open(str(out)) as archive, Archive.open(str(path)) as plain:
        assert archive._sums == [None] and archive.block_sums
        assert archive.digest() == plain.digest()
        _reads(archive, img, 4, 300)
    unz = tmp_path / "unz.vma"
    subprocess.run(["zstd", "-q", "-d", str(out), "-o", str(unz)], check=True)
    footer = _footer(unz.read_bytes())
    assert footer.block_sums and not footer.sums_carried
    rc, _, err = run_vmafs("verify", unz)
    assert rc == 0, err
    with Archive.open(str(unz)) as archive:
        _reads(archive, img, 6, 300)
    back = tmp_path / "back.vma"
    rc, _, err = run_vmafs("convert", out, back)
    assert rc == 0, err
    assert _footer(back.read_bytes()).sums_carried
    with Archive.open(str(back)) as archive:
        _reads(archive, img, 5, 300)


def test_mixed_index_semantics_is_damage(made: tuple[Path, bytes], tmp_path: Path) -> None:
    """The footer's word for block sums taken away (resealed): the index's checks no longer
    match any cluster's data checksum, so reads fail, and verify says why."""
    path, _ = made
    data = bytearray(path.read_bytes())
    payload = vma.null_extent_payload(bytes(data[-512:]))
    footer = _footer(bytes(data))
    plain = index.encode_footer(index.Footer(footer.index_offset, footer.index_length,
                                             footer.index_checksum, footer.header_digest))
    assert footer.block_sums and footer.sums_carried
    data[-512:] = vma.encode_null_extents(bytes(data[8:24]), plain)
    assert payload != plain
    bad = tmp_path / "nofield.vma"
    bad.write_bytes(data)
    with Archive.open(str(bad)) as archive, pytest.raises(ArchiveError):
        archive.read(1, 0, BLOCK)
    rc, _, err = run_vmafs("verify", bad)
    assert rc == 3 and "block sums" in err, err


def test_null_payloads() -> None:
    """The sums of any block are found in the null extents that carry them."""
    sums = hashlib.sha256(b"x").digest() * 118  # 3776 bytes: 944 blocks
    raw = vma.encode_null_extents(b"u" * 16, sums)
    assert len(raw) == index.sums_extents(944) * 512
    assert vma.null_payloads(raw)[:len(sums)] == sums
    assert vma.null_payloads(raw[512:1024]) == vma.null_extent_payload(raw[512:1024])


def test_footer_fields() -> None:
    """Block sums (critical) and sums carried round-trip; carried without block sums, or a
    field given twice, is a damaged footer; an older footer reads without them."""
    for summed, carried in ((False, False), (True, False), (True, True)):
        footer = index.Footer(1 << 20, 1000, 7, bytes(32), summed, carried)
        assert index.decode_footer(index.encode_footer(footer).ljust(413, b"\0")) == footer
    head = index.encode_footer(index.Footer(1 << 20, 1000, 7))
    field = struct.pack("<HH", index.FIELD_SUMS_CARRIED, 0)
    with pytest.raises(FormatError, match="without block sums"):
        index.decode_footer((head + field).ljust(413, b"\0"))
    twice = struct.pack("<HH", index.FIELD_BLOCK_SUMS, 0) * 2
    with pytest.raises(FormatError, match="block sums field"):
        index.decode_footer((head + twice).ljust(413, b"\0"))
    assert index.decode_footer(head.ljust(413, b"\0")) == index.Footer(1 << 20, 1000, 7)


def _layer(path: Path, disk: bytes, writes: list[tuple[int, bytes]], *, parent: Path | None,
           block_sums: bool, ctime: int) -> None:
    """A full archive of `disk` (parent None) or an increment holding `writes` (a disk of
    len(disk) bytes), written with or without block sums."""
    from vmafs.archive.chain import link_to
    from vmafs.container.output import open_output
    from vmafs.format import chain as chain_record

    configs = [("qemu-server.conf", b"memory: 512\n")]
    if parent is not None:
        with Archive.open(str(parent), layer=True) as p:
            configs.append((chain_record.CONFIG_NAME, chain_record.encode(
                chain_record.ChainRecord(parent=link_to(p)))))
    with open_output(str(path)) as out:
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", len(disk))], configs,
                               ctime=ctime, incremental=[1] if parent else [],
                               block_sums=block_sums)
        for off, data in ([(0, disk)] if parent is None else writes):
            writer.write(1, off, data)
        writer.finish()


def test_chain_of_old_and_new_archives(tmp_path: Path) -> None:
    """An archive with data checksums (from before block sums) under increments with block
    sums, plain and zstd: the chain reads as one (small and whole reads, merge's read), each
    layer checked its own way, and a damaged block of the old base is an error."""
    from vmafs.archive.chain import open_chain

    rnd = random.Random(9)
    disk = bytearray(rnd.randbytes(2 * MiB))
    base = tmp_path / "c0.vma"
    _layer(base, bytes(disk), [], parent=None, block_sums=False, ctime=1_700_000_000)
    writes = [(5 * CLUSTER, rnd.randbytes(CLUSTER)), (20 * CLUSTER, rnd.randbytes(2 * CLUSTER))]
    parent = base
    for k, name in enumerate(("c1.vma", "c2.vma.zst"), start=1):
        path = tmp_path / name
        _layer(path, bytes(disk), writes[k - 1:k], parent=parent, block_sums=True,
               ctime=1_700_000_000 + 3600 * k)
        off, data = writes[k - 1]
        disk[off:off + len(data)] = data
        parent = path
    with open_chain(str(parent)) as view:
        assert [a.block_sums for a in view.layers] == [False, True, True]
        img = bytes(disk)
        _reads(view, img, 7, 600)
        got = bytearray(len(img))
        for cluster, mask, data, _ in view.iter_stored(1):
            assert mask == 0xFFFF
            got[cluster * CLUSTER:(cluster + 1) * CLUSTER] = data
        assert bytes(got) == img
    rc, _, err = run_vmafs("verify", parent)
    assert rc == 0, err
    data = bytearray(base.read_bytes())
    at = walk_vma(bytes(data)).extents[0][0] + 512 + 30 * CLUSTER + 5  # cluster 30: the base's
    data[at] ^= 1
    base.write_bytes(data)
    with open_chain(str(parent)) as view, pytest.raises(ArchiveError, match="checksum"):
        view.read(1, 30 * CLUSTER + 4096 * 3, 4096)


def test_convert_of_an_old_archive_keeps_its_links(tmp_path: Path) -> None:
    """An archive's children link to its content digest, which covers its index's checks: so
    convert writes an archive from before block sums with data checksums again (its footer
    read first), and the chain over the converted parent still reads; from a stream, where
    the footer comes last, such an archive is refused rather than relinked wrong."""
    from vmafs.archive.chain import open_chain

    rnd = random.Random(11)
    disk = rnd.randbytes(MiB)
    base, child = tmp_path / "c0.vma", tmp_path / "c1.vma"
    _layer(base, disk, [], parent=None, block_sums=False, ctime=1_700_000_000)
    _layer(child, disk, [(3 * CLUSTER, rnd.randbytes(CLUSTER))], parent=base, block_sums=True,
           ctime=1_700_003_600)
    moved = tmp_path / "moved"
    moved.mkdir()
    rc, _, err = run_vmafs("convert", "-q", base, moved / "c0.vma.zst")
    assert rc == 0, err
    with Archive.open(str(base), layer=True) as a, \
            Archive.open(str(moved / "c0.vma.zst"), layer=True) as b:
        assert b.digest() == a.digest() and not b.block_sums
    child.rename(moved / "c1.vma")
    with open_chain(str(moved / "c1.vma")) as view:
        assert len(view.layers) == 2
    with open(base, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "vmafs", "convert", "-q", "-",
                               str(tmp_path / "piped.vma")], stdin=stdin, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode != 0 and "from a file, not a stream" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "piped.vma").exists()


# --- the accelerator (vmafs/format/_blocksums.c) and the Python it stands in for ----------------


class _Python:
    """index.py's own sums, as the accelerator is called."""

    block_sums = staticmethod(index._block_sums)

    @staticmethod
    def checks(data: object, ends: object, summed: bool = False) -> bytes:
        return index._checks(data, ends, summed)  # type: ignore[arg-type]


def _implementation(name: str) -> Any:
    """The Python fallback, the C accelerator (skipped, so a failure in CI: conftest.py, if
    it was not built), or whichever index.py uses."""
    if name == "python":
        return _Python
    if name == "index":
        return index
    try:
        from vmafs.format import _blocksums
    except ImportError:
        pytest.skip("the block sums accelerator is not built (pip install -e . builds it from "
                    "setup.py; it needs gcc, python3-dev and libxxhash-dev)")
    return _blocksums


def _buffers(rnd: random.Random) -> list[object]:
    """Every kind of buffer a caller passes: bytes, bytearray, views (some not contiguous),
    numpy arrays of other item sizes and orders; empty, one block, partial blocks, many."""
    import numpy as np

    sizes = [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, CLUSTER, 59 * CLUSTER + 7]
    out: list[object] = []
    for size in sizes:
        raw = rnd.randbytes(size)
        out += [raw, bytearray(raw), memoryview(raw), memoryview(bytearray(raw))[1:]]
        out.append(memoryview(raw)[::2])  # not contiguous
        out.append(memoryview(bytearray(raw))[::-3])
    grid = np.frombuffer(rnd.randbytes(64 * BLOCK), np.uint32).reshape(256, 256)
    out += [grid, grid.T, grid[:, ::3], memoryview(grid)[::2], memoryview(grid.tobytes()).cast("I")]
    out.append(bytes(BLOCK))  # a zero block: the most common sum of all
    return out


def _sums(flat: bytes) -> bytes:
    """The format's definition (format/index.py): low 32 bits of XXH3-64 of each 4 KiB
    block (a short last one as it is), LE."""
    return b"".join(struct.pack("<I", xxhash.xxh3_64_intdigest(flat[at:at + BLOCK]) & 0xFFFFFFFF)
                    for at in range(0, len(flat), BLOCK))


def _low32(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


IMPLEMENTATIONS = ["python", "accelerator", "index"]


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_block_sums_as_the_format_says(name: str) -> None:
    """The Python fallback and the C accelerator (index.py uses the one it has) sum as the
    format says, for any buffer, one part or many; a buffer that is not C-contiguous is
    summed as its bytes in C order. So the two are equal."""
    impl = _implementation(name)
    rnd = random.Random(1717)
    buffers = _buffers(rnd)
    flats = [memoryview(buf).tobytes() for buf in buffers]  # type: ignore[call-overload]
    for buf, flat in zip(buffers, flats, strict=True):
        assert impl.block_sums(buf) == _sums(flat)
    assert impl.block_sums() == b""
    for _ in range(20):
        picked = rnd.sample(range(len(buffers)), rnd.randrange(1, 6))
        assert impl.block_sums(*[buffers[i] for i in picked]) == b"".join(
            _sums(flats[i]) for i in picked)
    for bad in (None, 7, "text"):
        with pytest.raises(TypeError):
            impl.block_sums(b"x", bad)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_checks_as_the_format_says(name: str) -> None:
    """The index check of each cluster (or of any pieces) of a buffer, over its data or its
    block sums, as the format says, from either implementation; ends out of order or past the
    data are refused by both."""
    import numpy as np

    impl = _implementation(name)
    rnd = random.Random(1718)
    for buf in _buffers(rnd):
        flat = memoryview(buf).tobytes()  # type: ignore[call-overload]
        for _ in range(4):
            ends = sorted(rnd.randrange(len(flat) + 1) for _ in range(rnd.randrange(0, 8)))
            if rnd.random() < 0.5:
                ends.append(len(flat))
            starts = [0, *ends][:len(ends)]
            for summed in (False, True):
                want = struct.pack(f"<{len(ends)}I", *[
                    _low32(_sums(flat[a:b]) if summed else flat[a:b])
                    for a, b in zip(starts, ends, strict=True)])
                assert impl.checks(buf, ends, summed=summed) == want
                assert impl.checks(buf, np.array(ends, np.int64), summed=summed) == want
    data = rnd.randbytes(3 * CLUSTER)
    for ends in ([CLUSTER, 0], [3 * CLUSTER + 1], [-1]):
        for summed in (False, True):
            for given in (ends, np.array(ends, np.int64)):
                with pytest.raises(ValueError, match="non-decreasing"):
                    impl.checks(data, given, summed=summed)
    with pytest.raises(TypeError):
        impl.checks(data, 5)
    assert index.summed_check(data) == _low32(_sums(data))
    assert index.checksum(data) == _low32(data)


@pytest.mark.parametrize("name", ["python", "accelerator"])
def test_null_payloads_as_the_format_says(name: str) -> None:
    """The payloads of null extent headers (what the forward scan takes a data extent's
    block sums from), in C as vma.null_payloads gives them, from any buffer: each slot's
    bytes but its dev_id; a short last header left out."""
    import numpy as np

    payloads = (vma.gather_null_payloads if name == "python"
                else _implementation("accelerator").null_payloads)
    rnd = random.Random(1720)
    sums = rnd.randbytes(3776)
    raw = vma.encode_null_extents(b"u" * 16, sums)
    assert payloads(raw)[:len(sums)] == sums
    for n in (0, 1, 2, 11):
        heads = rnd.randbytes(512 * n + rnd.randrange(512))
        want = b"".join(
            b"".join(heads[at:at + 3] + heads[at + 4:at + 8]
                     for at in range(k + 40, k + 512, 8))
            for k in range(0, len(heads) // 512 * 512, 512))
        rows = np.frombuffer(heads[:512 * n], np.uint8).reshape(n, 512)
        for given in (heads, bytearray(heads), memoryview(heads), memoryview(rows.reshape(-1))):
            assert payloads(given) == want
    with pytest.raises(TypeError):
        payloads("text")


def _carried_checks(name: str) -> Any:
    """index.carried_checks in Python, in C (skipped if not built), or whichever index.py
    uses."""
    if name == "python":
        return index._carried_checks
    if name == "index":
        return index.carried_checks
    native = _implementation("accelerator")
    return lambda heads, blocks, ends: native.carried_checks(heads, blocks, ends,
                                                             index.SUMS_REFUSED)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_carried_checks_as_the_format_says(name: str) -> None:
    """A data extent's cluster checks from the block sums carried after it are its clusters'
    summed checks, from any buffer of headers (more than the sums need: the rest is not
    looked at); headers too few, a nonzero byte after the sums, or an index where the sums
    would be: None (not sums), from both implementations alike; bad ends are refused."""
    import numpy as np

    carried = _carried_checks(name)
    rnd = random.Random(1721)
    for blocks_of in ([16] * 59, [rnd.randrange(1, 17) for _ in range(59)], [1], [16, 0, 3]):
        ends = np.cumsum(np.array(blocks_of, np.int64)) * BLOCK
        data = rnd.randbytes(int(ends[-1]))
        blocks = len(data) // BLOCK
        sums = index.block_sums(data)
        heads = vma.encode_null_extents(b"u" * 16, sums)
        n = index.sums_extents(blocks)
        assert len(heads) == n * 512
        want = index.checks(data, ends, summed=True)
        more = heads + rnd.randbytes(700)  # what follows: not looked at
        rows = np.frombuffer(heads, np.uint8).reshape(n, 512)
        for given in (heads, bytearray(more), memoryview(more), rows, rows[:, :]):
            assert carried(given, blocks, ends) == want
        assert carried(heads, blocks, list(ends)) == want
        assert carried(heads[:-1], blocks, ends) is None  # a header short
        if blocks * 4 % vma.NULL_PAYLOAD_SIZE:  # a byte after the sums
            bad = vma.encode_null_extents(b"u" * 16, sums + b"\1")
            assert carried(bad, blocks, ends) is None
            assert carried(bad, blocks + 1, np.append(ends, ends[-1] + BLOCK)) is not None
        for magic in (index.INDEX_MAGIC, index.FOOTER_MAGIC):
            assert carried(vma.encode_null_extents(b"u" * 16, magic + sums[8:]), blocks,
                           ends) is None
    assert carried(b"", 0, np.zeros(0, np.int64)) == b""
    for bad_ends in ([BLOCK, 0], [2 * BLOCK], [-1]):
        with pytest.raises(ValueError):
            carried(bytes(512), 1, np.array(bad_ends, np.int64))
    with pytest.raises(ValueError):
        carried(bytes(512), -1, np.zeros(0, np.int64))


def _read_pieces(name: str) -> Any:
    """walk's read_pieces in Python, or the accelerator's (skipped if it is not built)."""
    from vmafs.archive import walk

    return walk._read_pieces if name == "python" else _implementation("accelerator").read_pieces


@pytest.mark.parametrize("name", ["python", "accelerator"])
def test_read_pieces_as_the_format_says(name: str, tmp_path: Path) -> None:
    """An extent's data read by pieces, each piece's clusters hashed as `checks` says; two
    threads at once take each piece once; a file that ends early leaves the pieces past its
    end short and unhashed (the caller reports the first, in file order)."""
    import threading

    import numpy as np

    read_pieces = _read_pieces(name)
    rnd = random.Random(1719)
    path = tmp_path / "data"
    blocks = [rnd.randrange(1, 17) for _ in range(59)]  # a full extent of partial clusters
    ends = np.cumsum(np.array(blocks, np.int64)) * BLOCK
    data = rnd.randbytes(int(ends[-1]))
    path.write_bytes(b"x" * 777 + data)
    bounds = np.array([0, 1, 20, 21, 58, 59], np.int64)
    pieces = len(bounds) - 1

    def want(summed: bool, upto: int = len(ends)) -> np.ndarray:
        out = np.frombuffer(index.checks(data, ends, summed=summed), "<u4").copy()
        out[upto:] = 0
        return out

    with open(path, "rb") as f:
        for threads in (1, 2):
            buffer = bytearray(len(data) + 5)
            state = np.zeros(1 + 2 * pieces, np.int64)
            outs = [np.zeros(len(ends), "<u4"), np.zeros(len(ends), "<u4")]
            did: list[int] = []
            call = (f.fileno(), buffer, 777, ends, bounds, state, *outs)
            work = [threading.Thread(target=lambda c=call, d=did: d.append(read_pieces(*c)))
                    for _ in range(threads)]
            for t in work:
                t.start()
            for t in work:
                t.join()
            assert sum(did) == pieces
            assert bytes(buffer[:len(data)]) == data
            assert state[1::2].tolist() == np.diff(np.concatenate(([0], ends[bounds[1:] - 1]))
                                                   ).tolist()
            assert not state[2::2].any()
            assert np.array_equal(outs[0], want(False)) and np.array_equal(outs[1], want(True))
        # only the summed checks wanted; the data's wanted alone
        state = np.zeros(1 + 2 * pieces, np.int64)
        summed = np.zeros(len(ends), "<u4")
        assert read_pieces(f.fileno(), bytearray(len(data)), 777, ends, bounds, state, None,
                           summed) == pieces
        assert np.array_equal(summed, want(True))
    cut = 777 + int(ends[30]) + 100  # inside the fourth piece (clusters 21 to 57)
    path.write_bytes((b"x" * 777 + data)[:cut])
    with open(path, "rb") as f:
        state = np.zeros(1 + 2 * pieces, np.int64)
        outs = [np.zeros(len(ends), "<u4"), np.zeros(len(ends), "<u4")]
        assert read_pieces(f.fileno(), bytearray(len(data)), 777, ends, bounds, state,
                           *outs) == pieces
        got = state[1::2].tolist()
        assert got[:3] == [int(ends[0]), int(ends[19] - ends[0]), int(ends[20] - ends[19])]
        assert got[3] == cut - 777 - int(ends[20]) and got[4] == 0
        assert np.array_equal(outs[0], want(False, 21)) and np.array_equal(outs[1], want(True, 21))
        for bad_ends, bad_bounds in ((ends + 1, bounds), (ends, np.array([0, 5, 5, 59])),
                                     (ends, np.array([0, 58]))):
            with pytest.raises(ValueError):
                read_pieces(f.fileno(), bytearray(len(data)), 777, bad_ends, bad_bounds,
                            np.zeros(1 + 2 * pieces, np.int64), None, None)
