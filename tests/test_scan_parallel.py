"""The forward scan's reader thread (issue 17: verify on both cores). What a scan sees and
reports is what the one-thread walk sees and reports, from a file, a pipe or a decoder, cut
short anywhere; every data view holds its extent's bytes while the caller has it; the thread
ends with the scan, however the scan ends."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
import pytest
from conftest import run_vmafs

from vmafs.archive import walk
from vmafs.archive.scan import StoredCluster, read_header, scan_stream
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.container.streams import open_stream
from vmafs.errors import FormatError
from vmafs.format import index, vma

C = vma.CLUSTER_SIZE
SIZES = [("drive-scsi0", 560 * C), ("drive-scsi1", 70 * C + 8192)]


def images() -> list[bytes]:
    """Device contents: data with zero blocks inside clusters, and runs of zero clusters long
    enough for extents without data between the extents with data."""
    rng = np.random.default_rng(17)
    out = []
    for n, (_, size) in enumerate(SIZES):
        disk = rng.integers(1, 256, size, dtype=np.uint8)
        blocks = disk.reshape(-1, vma.BLOCK_SIZE)
        blocks[rng.random(len(blocks)) < 0.3] = 0  # partial clusters
        if n == 0:
            disk[130 * C:400 * C] = 0  # zero clusters: extents without data
            disk[480 * C:540 * C] = 0
        out.append(disk.tobytes())
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same disks as a plain and as a seekable zstd archive."""
    directory = tmp_path_factory.mktemp("scan")
    disks = images()
    paths = {}
    for name in ("a.vma", "a.vma.zst"):
        path = directory / name
        with open_output(str(path)) as out:
            w = ArchiveWriter(out, [DeviceSpec(n, s) for n, s in SIZES],
                              [("qemu-server.conf", b"cores: 1\n")])
            for dev_id, disk in enumerate(disks, start=1):
                for at in range(0, len(disk), 16 * C):
                    w.write(dev_id, at, disk[at:at + 16 * C])
            w.finish()
        paths[name] = path
    return paths


def summary(stream: BinaryIO, ahead: int) -> tuple[list[tuple[object, ...]], str | None]:
    """Each item of a forward walk, as plain values, and the error that ended it."""
    header = read_header(stream)
    seen: list[tuple[object, ...]] = []
    try:
        for item in walk.iter_stream_runs(stream, header, ahead=ahead):
            if isinstance(item, walk.HeaderBatch):
                seen.append(("run", item.offsets.tolist(), item.raw.tobytes()))
            else:
                ext, data = item
                seen.append((ext.offset, ext.raw, hashlib.sha256(data).hexdigest()))
    except FormatError as exc:
        return seen, str(exc)
    return seen, None


def reported(stream: BinaryIO) -> list[str]:
    """What scan_stream reports: its problems, or the error that stopped it."""
    try:
        return [str(p) for p in scan_stream(stream).problems]
    except FormatError as exc:
        return [str(exc)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vmafs-read-ahead"]


@pytest.mark.parametrize("name", ["a.vma", "a.vma.zst"])
def test_read_ahead_yields_what_the_walk_yields(archives: dict[str, Path], name: str) -> None:
    """From a file (data and the next header in one read), through a decoder, and from a
    pipe-like stream: the same items, in the same order, with the same bytes."""
    with open_stream(archives[name]) as f:
        expected = summary(f, 0)
    assert expected[1] is None and any(s[0] == "run" for s in expected[0])
    assert sum(s[0] != "run" for s in expected[0]) > 5
    for ahead in (1, walk.READ_AHEAD):
        with open_stream(archives[name]) as f:
            assert summary(f, ahead) == expected
        if name == "a.vma":
            with open(archives[name], "rb") as f:
                assert summary(f, ahead) == expected
            stream = io.BufferedReader(io.BytesIO(archives[name].read_bytes()))  # type: ignore[arg-type]
            assert summary(stream, ahead) == expected
    assert not reader_threads()


def cuts(path: Path) -> Iterator[int]:
    """Where to cut the archive: inside, at and right after every extent's header and data,
    and inside the trailing index."""
    with open(path, "rb") as f:
        items, _ = summary(f, 0)
    size = path.stat().st_size
    for item in items:
        if item[0] == "run":
            offsets = item[1]
            assert isinstance(offsets, list)
            starts = [offsets[0], offsets[-1]]
        else:
            assert isinstance(item[0], int)
            starts = [item[0]]
        for start in starts:
            for delta in (0, 1, 511, 512, 513, C + 5):
                if start + delta < size:
                    yield start + delta
    yield size - 100


def test_a_cut_archive_reports_alike(archives: dict[str, Path], tmp_path: Path) -> None:
    """Cut anywhere, the threaded walk of a file (reading past each extent into the next
    header) yields the same items and then the same error as the one-thread walk of a
    stream that reads exactly; and scan_stream reports the same."""
    whole = archives["a.vma"].read_bytes()
    cut = tmp_path / "cut.vma"
    points = sorted(set(cuts(archives["a.vma"])))
    assert len(points) > 30
    for at in points:
        cut.write_bytes(whole[:at])
        exact = summary(io.BufferedReader(io.BytesIO(whole[:at])), 0)  # type: ignore[arg-type]
        with open(cut, "rb") as f:
            assert summary(f, walk.READ_AHEAD) == exact, at
        with open(cut, "rb") as f:
            messages = [reported(io.BufferedReader(io.BytesIO(whole[:at]))),  # type: ignore[arg-type]
                        reported(f)]
        assert messages[0] == messages[1], at
    assert not reader_threads()


def test_views_hold_their_extent_while_the_caller_has_them(archives: dict[str, Path]) -> None:
    """on_extent's views are the archive's bytes until it returns (extract writes from them),
    however far the reader is ahead; the reader uses its few buffers only."""
    disks = [bytearray(size) for _, size in SIZES]
    buffers = set()

    def on_extent(slots: list[StoredCluster]) -> None:
        for s in slots:
            buffers.add(id(s.data.obj))
            start = s.cluster * C
            block = vma.expand_blocks(s.data, s.mask)
            end = min(start + C, len(disks[s.dev_id - 1]))
            disks[s.dev_id - 1][start:end] = block[:end - start]

    for name in archives:
        disks = [bytearray(size) for _, size in SIZES]
        with open_stream(archives[name]) as f:
            result = scan_stream(f, on_extent)
        assert not result.problems and result.has_index
        assert [bytes(d) for d in disks] == images()
    assert 1 < len(buffers) <= 2 * walk.READ_AHEAD


def test_the_reader_stops_with_the_scan(archives: dict[str, Path]) -> None:
    """A scan that ends early (its caller fails, or it is closed after one item) leaves no
    reader thread behind."""
    def fail(slots: list[StoredCluster]) -> None:
        raise RuntimeError("disk full")

    with open(archives["a.vma"], "rb") as f, pytest.raises(RuntimeError, match="disk full"):
        scan_stream(f, fail)
    assert not reader_threads()
    with open_stream(archives["a.vma.zst"]) as f:
        items = walk.iter_stream_runs(f, read_header(f), ahead=2)
        next(items)
        items.close()
    assert not reader_threads()


def test_verify_reads_standard_input(archives: dict[str, Path]) -> None:
    """`vmafs verify -`: the whole archive, and one cut inside an extent's data, say what
    verify of the file says."""
    for name in archives:
        data = archives[name].read_bytes()
        rc, out, err = run_vmafs("verify", "-", input=data)
        assert rc == 0, err
        assert b"OK" in out
    whole = archives["a.vma"].read_bytes()
    rc, _, err = run_vmafs("verify", "-", input=whole[:len(whole) // 2 + 1000])
    assert rc == 3 and "archive is truncated" in err, err



def test_pieces_in_python_report_alike(archives: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The pieces of a file's extents read and hashed by the Python read_pieces, and then
    every check in Python too (no C accelerator: the sums, the checks, the block sums carried
    after each data extent), or by whichever walk uses: the same problems, the same bad
    clusters, for the whole archive, a damaged one, one whose carried sums are damaged (their
    null extent resealed) and a cut one."""
    whole = archives["a.vma"].read_bytes()
    with open(archives["a.vma"], "rb") as f:
        items, _ = summary(f, 0)
        f.seek(0)
        header = read_header(f)
    data_at = [item[0] for item in items if item[0] != "run"]
    damaged = bytearray(whole)
    for at in data_at[1::2]:
        assert isinstance(at, int)
        damaged[at + 512 + 5000] ^= 0xFF
    sums = bytearray(whole)
    for at in data_at[::3]:
        assert isinstance(at, int)
        end = walk.decode_extent(whole[at:at + 512], header.uuid, at).size + at
        head = bytearray(sums[end:end + 512])
        head[41] ^= 0x10  # the first sum's second byte
        sums[end:end + 512] = _resealed(head)
    # a header broken in a run read at once (a data extent's third sums extent), and a data
    # extent's header resealed with a bad magic: the same error at the same offset
    broken = bytearray(whole)
    end = walk.decode_extent(whole[data_at[1]:data_at[1] + 512], header.uuid,
                             data_at[1]).size + data_at[1]
    broken[end + 2 * 512 + 100] ^= 0x01
    magic = bytearray(whole)
    head = bytearray(magic[data_at[2]:data_at[2] + 512])
    head[3] ^= 0x20
    magic[data_at[2]:data_at[2] + 512] = _resealed(head)
    variants = {"whole": whole, "damaged": bytes(damaged), "sums": bytes(sums),
                "cut": whole[:len(whole) * 2 // 3], "header": bytes(broken),
                "magic": bytes(magic)}
    seen = {}
    for impl in ("now", "python", "no accelerator"):
        if impl == "python":
            monkeypatch.setattr(walk, "_read_pieces_now", walk._read_pieces)
        if impl == "no accelerator":
            monkeypatch.setattr(index, "_native", None)
            monkeypatch.setattr(vma, "_native", None)
        for name, content in variants.items():
            path = tmp_path / f"{name}.vma"
            path.write_bytes(content)
            with open(path, "rb") as f:
                try:
                    result = scan_stream(f)
                    bad = result.bad_data
                    seen[impl, name] = ([str(p) for p in result.problems],
                                        None if bad is None else bad.clusters.tolist())
                except FormatError as exc:
                    seen[impl, name] = ([str(exc)], None)
    for name in variants:
        assert seen["now", name] == seen["python", name] == seen["no accelerator", name], name
    assert not seen["now", "whole"][0] and seen["now", "damaged"][1]
    assert any("block sums" in p for p in seen["now", "sums"][0]), seen["now", "sums"]
    assert not seen["now", "sums"][1]  # the data is intact
    assert "truncated" in seen["now", "cut"][0][0]
    assert seen["now", "header"][0] == [f"wrong vma extent header chechsum (md5 mismatch) at "
                                        f"offset {end + 2 * 512}"]
    assert seen["now", "magic"][0] == [f"wrong vma extent header magic at offset {data_at[2]}"]


def _resealed(head: bytearray) -> bytes:
    """An extent header with its md5 made right again for what it now says."""
    head[24:40] = bytes(16)
    head[24:40] = hashlib.md5(head).digest()
    return bytes(head)


def _header_damage(head: bytes) -> Iterator[tuple[str, bytes]]:
    """A data-less extent header broken in each way the checks tell apart (md5, uuid, magic,
    reserved, block count, a slot), alone and with its md5 resealed."""
    for what, at in (("md5", 24), ("uuid", 8), ("magic", 0), ("reserved", 5),
                     ("block count", 7), ("a slot's mask", 40), ("a slot's dev_id", 43)):
        broken = bytearray(head)
        broken[at] ^= 0x01
        yield what, bytes(broken)
        if what != "md5":
            yield f"{what}, resealed", _resealed(broken)


def test_runs_of_headers_checked_at_once_report_alike(archives: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """The data-less headers read with the one before them (a data extent's block sums, zero
    slots, the trailing index) are checked together: any of them broken in any way, the
    threaded walk of the file yields what the one-thread walk of a stream, which checks each
    header alone, yields, and scan_stream reports the same."""
    whole = archives["a.vma"].read_bytes()
    with open(archives["a.vma"], "rb") as f:
        items, _ = summary(f, 0)
    runs = [cast(list[int], item[1]) for item in items if item[0] == "run"]
    assert len(runs) > 5
    chosen = {at for offsets in runs[:3] + runs[-2:]
              for at in (offsets[0], offsets[min(1, len(offsets) - 1)], offsets[-1])}
    chosen |= {offsets[1] for offsets in runs if len(offsets) > 1}
    path = tmp_path / "broken.vma"
    tried = 0
    for at in sorted(chosen):
        for what, head in _header_damage(whole[at:at + vma.EXTENT_HEADER_SIZE]):
            content = whole[:at] + head + whole[at + vma.EXTENT_HEADER_SIZE:]
            path.write_bytes(content)
            exact = summary(io.BufferedReader(io.BytesIO(content)), 0)  # type: ignore[arg-type]
            assert exact[1] is not None or what.endswith("resealed"), (at, what)
            with open(path, "rb") as f:
                assert summary(f, walk.READ_AHEAD) == exact, (at, what)
            with open(path, "rb") as f:
                assert reported(f) == reported(
                    io.BufferedReader(io.BytesIO(content))), (at, what)  # type: ignore[arg-type]
            tried += 1
    assert tried > 100
    assert not reader_threads()


def test_rules_batched_report_the_first_broken_rule(archives: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Data extents' slots go to the rules several at a time: a slot that breaks a rule (a
    cluster again) is still reported before a broken header, a cut or damaged data after it,
    as when each extent is checked alone."""
    whole = archives["a.vma"].read_bytes()
    with open(archives["a.vma"], "rb") as f:
        items, _ = summary(f, 0)
    data_at = [cast(int, item[0]) for item in items if item[0] != "run"]
    first, second = data_at[3], data_at[4]
    # the first slot of the 4th data extent names the cluster of the 1st's first slot again
    twice = bytearray(whole[first:first + vma.EXTENT_HEADER_SIZE])
    twice[44:48] = whole[data_at[0] + 44:data_at[0] + 48]
    twice[43] = whole[data_at[0] + 43]
    base = whole[:first] + _resealed(twice) + whole[first + vma.EXTENT_HEADER_SIZE:]
    broken_next = bytearray(base)
    broken_next[second + 24] ^= 0xFF
    variants = {"duplicate": base, "then a broken header": bytes(broken_next),
                "then cut": base[:second + 1000]}
    path = tmp_path / "rules.vma"
    seen: dict[tuple[int, str], list[str]] = {}
    for batch in (1, 16):
        monkeypatch.setattr("vmafs.archive.scan.RULES_BATCH", batch)
        for name, content in variants.items():
            path.write_bytes(content)
            with open(path, "rb") as f:
                seen[batch, name] = reported(f)
            assert "duplicated cluster" in seen[batch, name][0], (batch, name)
    for name in variants:
        assert seen[1, name] == seen[16, name], name
