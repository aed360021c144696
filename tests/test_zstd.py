"""Seekable zstd output, random-access source and streaming decompressors, against real zstd."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from vmafs.container.streams import ZstdFrameChecker, detect_container, open_stream
from vmafs.container.zstd_output import (
    MAX_WINDOW_LOG,
    PlainOutput,
    SeekableZstdOutput,
    compression_params,
)
from vmafs.container.zstd_source import SeekableZstdSource
from vmafs.errors import FormatError, NotSeekableError
from vmafs.format.seektable import SEEKABLE_MAGIC, SKIPPABLE_MAGIC, encode_seek_table

VECTORS = Path(__file__).resolve().parent.parent.parent / "shared" / "vectors"
SPEC = VECTORS / "spec"
PROXMOX = VECTORS / "proxmox"
TWO_DISKS = SPEC / "two-disks.vma"

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd program not installed")
needs_lzop = pytest.mark.skipif(shutil.which("lzop") is None, reason="lzop program not installed")


def _extents(seed: int, count: int) -> list[bytes]:
    """Fake extents: 512-byte header plus 1-8 half-random, half-compressible 4 KiB blocks."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        blocks = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                blocks.append(rng.randbytes(4096))
            else:
                blocks.append((b"extent %d line %d " % (i, rng.randint(0, 99))) * 300)
        body = b"".join(b[:4096] for b in blocks)
        out.append(struct.pack(">4sI", b"EXT\0", len(body)) + bytes(504) + body)
    return out


def _write_seekable(
    path: Path, chunks: list[bytes], cut_after: frozenset[int] = frozenset(), **kw: int
) -> SeekableZstdOutput:
    with open(path, "wb") as f:
        out = SeekableZstdOutput(f, **kw)
        for i, chunk in enumerate(chunks):
            out.write(chunk)
            if i in cut_after:
                out.end_frame()
        out.close()
    return out


def _zstd_d(path: Path) -> bytes:
    proc = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- output ----------------------------------------------------------------------------


@needs_zstd
@pytest.mark.parametrize("threads", [0, 1, 2])
@pytest.mark.parametrize("frame_size", [1, 20000, 1 << 20])
def test_output_round_trip(tmp_path: Path, threads: int, frame_size: int) -> None:
    chunks = _extents(threads * 7 + frame_size, 60)
    stream = b"".join(chunks)
    path = tmp_path / "a.vma.zst"
    out = _write_seekable(
        path, chunks, frozenset({10, 11, 40}), frame_size=frame_size, threads=threads
    )
    assert out.bytes_in == len(stream)
    assert out.bytes_out == path.stat().st_size
    assert _zstd_d(path) == stream
    with SeekableZstdSource(path) as src:
        assert src.size == len(stream)
        assert src.num_frames == out.frames
        assert src.pread(0, src.size) == stream
        # Frames start only at write-call boundaries, and always after end_frame.
        boundaries = {0}
        pos = 0
        for chunk in chunks:
            pos += len(chunk)
            boundaries.add(pos)
        starts = {src.frame_bounds(i)[0] for i in range(src.num_frames)}
        assert starts <= boundaries
        cuts = [sum(len(c) for c in chunks[: i + 1]) for i in (10, 11, 40)]
        assert set(cuts) <= starts
        for i in range(src.num_frames - 1):
            start, end = src.frame_bounds(i)
            assert end - start >= min(frame_size, 1) or end in cuts
    with open_stream(path) as f:
        assert f.read() == stream


def test_frame_size_policy(tmp_path: Path) -> None:
    chunks = [bytes([i]) * 1000 for i in range(25)]
    path = tmp_path / "p.zst"
    _write_seekable(path, chunks, frame_size=3000, threads=2)
    with SeekableZstdSource(path) as src:
        sizes = [e - s for s, e in (src.frame_bounds(i) for i in range(src.num_frames))]
    assert sizes == [3000] * 8 + [1000]


def test_frame_parameters(tmp_path: Path) -> None:
    chunks = _extents(3, 40)
    path = tmp_path / "f.zst"
    _write_seekable(path, chunks, frame_size=50000, level=19)
    data = path.read_bytes()
    with SeekableZstdSource(path) as src:
        for i in range(src.num_frames):
            c0, c1 = src.table.compressed_range(i)
            d0, d1 = src.table.decompressed_range(i)
            params = zstandard.get_frame_parameters(data[c0:c1])
            assert params.content_size == d1 - d0
            assert params.has_checksum
            assert params.window_size <= 1 << MAX_WINDOW_LOG


@pytest.mark.parametrize("level", [-5, 1, 3, 19, 22])
@pytest.mark.parametrize("frame_size", [1 << 16, 1 << 20, 1 << 31])
def test_window_log_is_capped(level: int, frame_size: int) -> None:
    params = compression_params(level, frame_size)
    assert 0 < params.window_log <= MAX_WINDOW_LOG
    assert params.write_checksum and params.write_content_size


@needs_zstd
def test_output_into_a_pipe_never_seeks() -> None:
    chunks = _extents(11, 50)
    proc = subprocess.Popen(
        ["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    with SeekableZstdOutput(proc.stdin, frame_size=30000) as out:
        for chunk in chunks:
            out.write(chunk)
    proc.stdin.close()
    reader.join()
    assert proc.wait() == 0
    assert result[0] == b"".join(chunks)


def test_output_from_trio_worker_threads(tmp_path: Path) -> None:
    """The live backup writes from trio.to_thread workers, one call at a time."""
    trio = pytest.importorskip("trio")
    chunks = _extents(13, 40)
    path = tmp_path / "t.zst"

    async def main() -> None:
        with open(path, "wb") as f:
            out = SeekableZstdOutput(f, frame_size=25000)
            for i, chunk in enumerate(chunks):
                await trio.to_thread.run_sync(out.write, chunk)
                if i == 20:
                    await trio.to_thread.run_sync(out.end_frame)
            await trio.to_thread.run_sync(out.close)

    trio.run(main)
    with SeekableZstdSource(path) as src:
        assert src.pread(0, src.size) == b"".join(chunks)


def test_reused_caller_buffer_is_copied(tmp_path: Path) -> None:
    chunks = _extents(5, 30)
    path = tmp_path / "r.zst"
    buf = bytearray()
    with open(path, "wb") as f, SeekableZstdOutput(f, frame_size=40000) as out:
        for chunk in chunks:
            buf[:] = chunk
            out.write(memoryview(buf))
            buf[:] = bytes(len(buf))
    with SeekableZstdSource(path) as src:
        assert src.pread(0, src.size) == b"".join(chunks)


@needs_zstd
def test_empty_output(tmp_path: Path) -> None:
    path = tmp_path / "e.zst"
    _write_seekable(path, [])
    assert path.read_bytes() == encode_seek_table([])
    assert _zstd_d(path) == b""
    with SeekableZstdSource(path) as src:
        assert src.size == 0 and src.pread(0, 10) == b""


def test_write_after_close_and_abort(tmp_path: Path) -> None:
    sink = io.BytesIO()
    out = SeekableZstdOutput(sink)
    out.write(b"x" * 100)
    out.close()
    out.close()  # idempotent
    with pytest.raises(ValueError):
        out.write(b"y")
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), SeekableZstdOutput(sink, frame_size=10) as out:
        out.write(b"z" * 100)
        raise RuntimeError("writer failed")
    # No seek table after an abort: the file is not mistaken for a complete archive.
    assert not sink.getvalue().endswith(struct.pack("<I", SEEKABLE_MAGIC))


def test_plain_output() -> None:
    chunks = _extents(9, 40) + [os.urandom(3 << 20)] + _extents(10, 5)
    sink = io.BytesIO()
    with PlainOutput(sink, buffer_size=100000) as out:
        for chunk in chunks:
            out.write(chunk)
            out.end_frame()
    assert sink.getvalue() == b"".join(chunks)
    assert out.bytes_in == out.bytes_out == len(sink.getvalue())


# -- seekable source ---------------------------------------------------------------------


@needs_zstd
def test_reads_seekable_vector_like_zstd_d() -> None:
    path = SPEC / "two-disks.seekable.vma.zst"
    stream = _zstd_d(path)
    assert stream == TWO_DISKS.read_bytes()
    rng = random.Random(1)
    with SeekableZstdSource(path, cache_bytes=50000) as src:
        assert src.size == len(stream)
        assert src.pread(0, src.size + 100) == stream
        for _ in range(300):
            offset = rng.randrange(0, src.size + 10)
            length = rng.choice([1, 512, 4096, 70000, 250000])
            assert src.pread(offset, length) == stream[offset : offset + length]
        for i in range(src.num_frames):
            start, end = src.frame_bounds(i)
            assert src.frame_of(start) == i and src.frame_of(end - 1) == i
            assert src.read_frame(i) == src.frame(i) == stream[start:end]


def test_source_on_fd() -> None:
    fd = os.open(SPEC / "two-disks.seekable.vma.zst", os.O_RDONLY)
    try:
        with SeekableZstdSource(fd, closefd=False) as src:
            assert src.pread(100, 1000) == TWO_DISKS.read_bytes()[100:1100]
        os.fstat(fd)  # not closed: the caller owns it
    finally:
        os.close(fd)
    fd = os.open(SPEC / "two-disks.seekable.vma.zst", os.O_RDONLY)
    with SeekableZstdSource(fd) as src:
        assert src.size == TWO_DISKS.stat().st_size
    with pytest.raises(OSError):
        os.fstat(fd)  # closefd=True (the default): closed with the source
    fd = os.open(SPEC / "two-disks.vma.zst", os.O_RDONLY)
    try:
        with pytest.raises(NotSeekableError):
            SeekableZstdSource(fd)
        os.fstat(fd)  # a failed open leaves the descriptor to the caller
    finally:
        os.close(fd)


def test_single_frame_zstd_is_not_seekable() -> None:
    for path in (SPEC / "two-disks.vma.zst", PROXMOX / "sample-2disks.vma.zst"):
        with pytest.raises(NotSeekableError, match="vmafs convert"):
            SeekableZstdSource(path)
    with pytest.raises(FormatError, match="not a zstd file"):
        SeekableZstdSource(TWO_DISKS)


def test_concurrent_reads(tmp_path: Path) -> None:
    chunks = _extents(21, 120)
    stream = b"".join(chunks)
    path = tmp_path / "c.zst"
    _write_seekable(path, chunks, frame_size=30000)
    errors: list[BaseException] = []
    with SeekableZstdSource(path, cache_bytes=100000) as src:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    off = rng.randrange(src.size)
                    n = rng.choice([4096, 65536])
                    assert src.pread(off, n) == stream[off : off + n]
                    src.frame(rng.randrange(src.num_frames))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert src.cache_used <= 100000
        src.prefetch(3)
        assert src.cached(3)
    assert not errors


def test_prefix_reads(tmp_path: Path) -> None:
    """With prefix_reads, a small read decompresses its frame only up to the read's end (and
    reads about that much of the frame), for compressible and incompressible frames alike."""
    chunks = _extents(41, 400)
    stream = b"".join(chunks)
    path = tmp_path / "p.zst"
    _write_seekable(path, chunks, frame_size=1 << 20)
    rng = random.Random(5)
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.prefix_reads = True
        read: list[int] = []
        pread_exact, pread_frame = src._pread_exact, src._pread_frame

        def counting_exact(length: int, offset: int) -> bytes:
            read.append(length)
            return pread_exact(length, offset)

        def counting_frame(length: int, offset: int) -> memoryview:
            read.append(length)
            return pread_frame(length, offset)

        src._pread_exact = counting_exact  # type: ignore[method-assign]
        src._pread_frame = counting_frame  # type: ignore[method-assign]
        for _ in range(300):
            off = rng.randrange(src.size)
            n = rng.choice([1, 4096, 65536, 256 << 10, 300 << 10])
            assert src.pread(off, n) == stream[off : off + n], (off, n)
        read.clear()
        start, end = src.frame_bounds(0)
        assert src.pread(start + 4096, 4096) == stream[start + 4096 : start + 8192]
        c_start, c_end = src.table.compressed_range(0)
        assert 0 < sum(read) < (c_end - c_start) // 2
        assert src.read_prefix(0, end - start) == stream[start:end]


def _seekable_bytes(tmp_path: Path) -> tuple[bytes, list[bytes]]:
    chunks = _extents(31, 30)
    path = tmp_path / "s.zst"
    _write_seekable(path, chunks, frame_size=20000)
    return path.read_bytes(), chunks


def test_corrupted_seek_table_in_file(tmp_path: Path) -> None:
    data, _ = _seekable_bytes(tmp_path)
    n = struct.unpack_from("<I", data, len(data) - 9)[0]
    table_at = len(data) - (8 + 8 * n + 9)
    assert struct.unpack_from("<I", data, table_at)[0] == SKIPPABLE_MAGIC
    cases = {
        "skippable magic": (table_at, 1),
        "frame size": (table_at + 4, 1),
        "compressed size": (table_at + 8, 1),
        "decompressed size": (table_at + 12 + 3, 0x80),
        "number of frames": (len(data) - 9, 1),
        "descriptor": (len(data) - 5, 0x10),
    }
    bad = tmp_path / "bad.zst"
    for what, (pos, flip) in cases.items():
        damaged = bytearray(data)
        damaged[pos] ^= flip
        bad.write_bytes(damaged)
        with pytest.raises(FormatError, match="seek table"):
            SeekableZstdSource(bad)
        del what
    # Without the seekable magic the file is just a zstd file without a table.
    damaged = bytearray(data)
    damaged[-1] ^= 1
    bad.write_bytes(damaged)
    with pytest.raises(NotSeekableError):
        SeekableZstdSource(bad)


def test_table_lying_about_sizes_is_caught_on_read(tmp_path: Path) -> None:
    data, chunks = _seekable_bytes(tmp_path)
    n = struct.unpack_from("<I", data, len(data) - 9)[0]
    table_at = len(data) - (8 + 8 * n + 9)
    damaged = bytearray(data)
    struct.pack_into(
        "<I", damaged, table_at + 12, struct.unpack_from("<I", data, table_at + 12)[0] + 1
    )
    bad = tmp_path / "lie.zst"
    bad.write_bytes(damaged)
    with SeekableZstdSource(bad) as src, pytest.raises(FormatError, match="decompresses to"):
        src.read_frame(0)
    # Move a frame boundary: frame 0 then holds a piece of frame 1.
    damaged = bytearray(data)
    c0 = struct.unpack_from("<I", data, table_at + 8)[0]
    c1 = struct.unpack_from("<I", data, table_at + 16)[0]
    struct.pack_into("<I", damaged, table_at + 8, c0 + 5)
    struct.pack_into("<I", damaged, table_at + 16, c1 - 5)
    bad.write_bytes(damaged)
    with SeekableZstdSource(bad) as src:
        with pytest.raises(FormatError):
            src.read_frame(1)
        with pytest.raises(FormatError):
            src.pread(0, src.size)
    # The same for frames without a content size, as other writers make them.
    zc = zstandard.ZstdCompressor(write_content_size=False)
    frames = [zc.compress(c) for c in chunks[:3]]
    entries = [(len(f), len(c)) for f, c in zip(frames, chunks[:3], strict=True)]
    entries[0] = (entries[0][0] + 5, entries[0][1])
    entries[1] = (entries[1][0] - 5, entries[1][1])
    bad.write_bytes(b"".join(frames) + encode_seek_table(entries))
    with SeekableZstdSource(bad) as src:
        with pytest.raises(FormatError, match="before the seek table says"):
            src.read_frame(0)
        with pytest.raises(FormatError):
            src.read_frame(1)
        assert src.read_frame(2) == chunks[2]


def test_damaged_frame_data_is_caught(tmp_path: Path) -> None:
    data, _ = _seekable_bytes(tmp_path)
    damaged = bytearray(data)
    damaged[200] ^= 0xFF
    bad = tmp_path / "d.zst"
    bad.write_bytes(damaged)
    with SeekableZstdSource(bad) as src, pytest.raises(FormatError):
        src.pread(0, src.size)
    with SeekableZstdSource(bad) as src, pytest.raises(FormatError):
        src.read_prefix(0, 10)  # damage in a compressed block fails a prefix read too


# -- streaming input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "two-disks.vma",
        "two-disks.vma.zst",
        "two-disks.vma.gz",
        pytest.param("two-disks.vma.lzo", marks=needs_lzop),
        "two-disks.seekable.vma.zst",
        "two-disks.skipidx.vma.zst",
    ],
)
def test_open_stream_spec_vectors(name: str) -> None:
    with open_stream(SPEC / name) as f:
        assert f.read() == TWO_DISKS.read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "sample-2disks.vma.zst",
        "sample-2disks.vma.gz",
        pytest.param("sample-2disks.vma.lzo", marks=needs_lzop),
    ],
)
def test_open_stream_proxmox_vectors(name: str) -> None:
    expected = (PROXMOX / "sample-2disks.vma").read_bytes()
    with open_stream(PROXMOX / name) as f:
        got = bytearray()
        while chunk := f.read(1 << 20):
            got += chunk
    assert got == expected


@pytest.mark.parametrize(
    "name", ["two-disks.vma", "two-disks.vma.zst", "two-disks.vma.gz", "two-disks.vma.lzo"]
)
def test_open_stream_stdin(name: str) -> None:
    if name.endswith(".lzo") and shutil.which("lzop") is None:
        pytest.skip("lzop program not installed")
    proc = _open_stream_from_pipe(
        SPEC / name,
        "import sys; from vmafs.container.streams import open_stream; "
        "sys.stdout.buffer.write(open_stream('-').read())",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == TWO_DISKS.read_bytes()


@needs_lzop
@pytest.mark.parametrize("name", ["sample-2disks.vma.lzo", "sample-2disks.vma.zst"])
def test_open_stream_stdin_closed_early(name: str) -> None:
    """A reader that stops early (vma config reads only the header) ends cleanly."""
    proc = _open_stream_from_pipe(
        PROXMOX / name,
        "from vmafs.container.streams import open_stream; f = open_stream('-'); "
        "assert f.read(4) == b'VMA\\0'; f.close(); print('closed')",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"closed\n"


def _open_stream_from_pipe(path: Path, code: str) -> subprocess.CompletedProcess[bytes]:
    """Run `code` in a child whose stdin is `path` through a pipe, not a file: stdin cannot
    seek back after the magic is peeked."""
    root = Path(__file__).resolve().parent.parent
    with open(path, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        proc = subprocess.run(
            [sys.executable, "-c", code], stdin=cat.stdout, capture_output=True, cwd=root,
            timeout=60,
        )
        assert cat.stdout is not None
        cat.stdout.close()
        cat.wait()
    return proc


def test_detect_container() -> None:
    assert detect_container(b"VMA\0\0\0\0\1") == "vma"
    assert detect_container(b"\x28\xb5\x2f\xfd") == "zstd"
    assert detect_container(struct.pack("<I", 0x184D2A53)) == "zstd"
    assert detect_container(b"\x1f\x8b\x08") == "gzip"
    assert detect_container(b"\x89LZO\x00\r\n\x1a\n") == "lzo"
    for bad in (b"", b"VM", b"PK\3\4", b"\x89LZO\x00\r\n\x1a\x0b"):
        with pytest.raises(FormatError):
            detect_container(bad)


def _decode_all(data: bytes, tmp_path: Path, name: str = "x") -> bytes:
    path = tmp_path / name
    path.write_bytes(data)
    with open_stream(path) as f:
        return f.read()


def test_multi_frame_and_multi_member(tmp_path: Path) -> None:
    a, b = os.urandom(5000) + bytes(100000), b"second part " * 5000
    zc = zstandard.ZstdCompressor(write_content_size=False)
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc"
    zst = skippable + zc.compress(a) + skippable + zc.compress(b) + skippable
    assert _decode_all(zst, tmp_path) == a + b
    assert _decode_all(gzip.compress(a) + gzip.compress(b), tmp_path) == a + b


def test_gzip_bomb_output_is_bounded(tmp_path: Path) -> None:
    data = gzip.compress(bytes(64 << 20))
    path = tmp_path / "zeros.gz"
    path.write_bytes(data)
    with open_stream(path) as f:
        raw = f.raw  # type: ignore[attr-defined]
        buf = bytearray(1 << 20)
        assert raw.readinto(buf) <= 1 << 20
        total = len(f.read())
    assert total >= (63 << 20)


@pytest.mark.parametrize("kind", ["zst", "gz", pytest.param("lzo", marks=needs_lzop)])
@pytest.mark.parametrize("cut", [1, 4, 9, 1000, 100000, -20])
def test_truncated_input_raises(tmp_path: Path, kind: str, cut: int) -> None:
    data = (SPEC / f"two-disks.vma.{kind}").read_bytes()
    data = data[:-cut]  # cut < 0: keep only the first -cut bytes
    with pytest.raises(FormatError):
        _decode_all(data, tmp_path, "t." + kind)


@pytest.mark.parametrize("kind", ["zst", "gz", pytest.param("lzo", marks=needs_lzop)])
@pytest.mark.parametrize(
    "junk", [b"garbage!", b"\0" * 600 + b"x", b"\x1f"], ids=["text", "zeros+x", "half-magic"]
)
def test_trailing_junk_raises(tmp_path: Path, kind: str, junk: bytes) -> None:
    """Like gzip -d (exit 2), lzop -d (exit 2) and zstd -d (exit 1), so like a Proxmox restore."""
    data = (SPEC / f"two-disks.vma.{kind}").read_bytes()
    with pytest.raises(FormatError):
        _decode_all(data + junk, tmp_path, "j." + kind)


@pytest.mark.parametrize("kind", ["zst", "gz", pytest.param("lzo", marks=needs_lzop)])
@pytest.mark.parametrize("pad", [1, 600, 3 << 20])
def test_trailing_zero_padding(tmp_path: Path, kind: str, pad: int) -> None:
    """gzip -d and lzop -d accept zero padding silently (exit 0); zstd -d refuses it."""
    data = (SPEC / f"two-disks.vma.{kind}").read_bytes() + bytes(pad)
    if kind == "zst":
        with pytest.raises(FormatError):
            _decode_all(data, tmp_path, "p." + kind)
    else:
        assert _decode_all(data, tmp_path, "p." + kind) == TWO_DISKS.read_bytes()


def test_truncated_seekable_and_skippable(tmp_path: Path) -> None:
    data = (SPEC / "two-disks.skipidx.vma.zst").read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        _decode_all(data[:-1], tmp_path)
    data = (SPEC / "two-disks.seekable.vma.zst").read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        _decode_all(data[:-9], tmp_path)


def test_unknown_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="empty"):
        _decode_all(b"", tmp_path)
    with pytest.raises(FormatError, match="not a vma file"):
        _decode_all(b"hello world", tmp_path)


def _split_points(n: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    pos = 0
    while pos < n:
        pos = min(n, pos + rng.choice([1, 2, 3, 7, 100, 5000]))
        yield pos


def test_frame_checker_any_split() -> None:
    data = (SPEC / "two-disks.skipidx.vma.zst").read_bytes()
    for seed in range(5):
        checker = ZstdFrameChecker()
        prev = 0
        for pos in _split_points(len(data), seed):
            checker.feed(data[prev:pos])
            prev = pos
        checker.finish()
        assert checker.frames == 2 and checker.offset == len(data)
    checker = ZstdFrameChecker()
    checker.feed(data[:-3])
    with pytest.raises(FormatError):
        checker.finish()
