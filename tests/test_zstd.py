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

from vmafs.container.streams import detect_container, open_stream
from vmafs.container.zstd_frames import ZSTD_MAGIC, FrameInfo, ZstdFrameParser, walk_frame
from vmafs.container.zstd_output import (
    MAX_WINDOW_LOG,
    PlainOutput,
    SeekableZstdOutput,
    compression_params,
)
from vmafs.container.zstd_source import MAX_FRAME_SIZE, SeekableZstdSource
from vmafs.errors import ContainerError, FormatError, NotSeekableError
from vmafs.format.seektable import SEEKABLE_MAGIC, SKIPPABLE_MAGIC, encode_seek_table

VECTORS = Path(__file__).resolve().parent / "vectors"
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
def test_frames_without_content_checksums_for_benchmarks(tmp_path: Path) -> None:
    """tools/bench_size.py's ``nocheck`` variant (write_checksum=0 laid over the level's
    parameters): frames without zstd's content checksum, read alike by zstd -d and the
    random-access reader, small reads and whole frames."""
    assert not compression_params(4, 1 << 20, {"write_checksum": 0}).write_checksum
    chunks = _extents(5, 40)
    stream = b"".join(chunks)
    path = tmp_path / "n.zst"
    _write_seekable(path, chunks, frame_size=200000, params={"write_checksum": 0})
    assert _zstd_d(path) == stream
    data = path.read_bytes()
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.checked_by_reader = True
        assert src.num_frames > 2
        c0, c1 = src.table.compressed_range(1)
        assert not zstandard.get_frame_parameters(data[c0:c1]).has_checksum
        d0, d1 = src.frame_bounds(1)
        assert src.pread(d0 + 4096, 4096) == stream[d0 + 4096 : d0 + 8192]
        assert src.read_frame(1) == stream[d0:d1]


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
    import trio

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


def _count_reads(src: SeekableZstdSource) -> list[int]:
    """The lengths of the disk reads (readinto) src makes from now on, appended as they come."""
    lengths: list[int] = []
    readinto = src._raw.readinto

    def counting(offset: int, view: memoryview) -> int:
        lengths.append(len(view))
        return readinto(offset, view)

    src._raw.readinto = counting  # type: ignore[method-assign]
    return lengths


def _one_mib_frames(tmp_path: Path) -> tuple[Path, list[bytes], bytes]:
    """A seekable file of 1 MiB frames over 400 seeded extents: its path, chunks, stream."""
    chunks = _extents(41, 400)
    path = tmp_path / "p.zst"
    _write_seekable(path, chunks, frame_size=1 << 20)
    return path, chunks, b"".join(chunks)


def test_prefix_reads(tmp_path: Path) -> None:
    """Once the reader checks every read, a small read decompresses its frame only up to the
    read's end (and reads about that much of the frame), compressible frames or not."""
    path, chunks, stream = _one_mib_frames(tmp_path)
    rng = random.Random(5)
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.checked_by_reader = True
        read: list[int] = []
        raw_read, raw_readinto = src._raw.read, src._raw.readinto

        def counting_read(offset: int, length: int) -> bytes:
            read.append(length)
            return raw_read(offset, length)

        def counting_readinto(offset: int, view: memoryview) -> int:
            read.append(len(view))
            return raw_readinto(offset, view)

        src._raw.read = counting_read  # type: ignore[method-assign]
        src._raw.readinto = counting_readinto  # type: ignore[method-assign]
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


def test_prefix_read_of_a_local_frame(tmp_path: Path) -> None:
    """A local frame's small read decodes its prefix as its compressed bytes are read, piece by
    piece, and a first read checks the whole frame (block headers to its end) before returning
    anything: the bytes, the frame checked, only the prefix read into the frame buffer (the
    tail's block headers by small reads); an entry that lies about its frame is still the
    error."""
    import vmafs.container.zstd_source as zs

    path, chunks, stream = _one_mib_frames(tmp_path)
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.checked_by_reader = True
        pieces = _count_reads(src)
        start, _ = src.frame_bounds(1)
        c_start, c_end = src.table.compressed_range(1)
        for again in (False, True):  # the first read checks the frame, the next does not
            pieces.clear()
            assert src.pread(start + 4096, 4096) == stream[start + 4096 : start + 8192]
            assert pieces and max(pieces) <= zs.FEED_PIECE
            assert sum(pieces) < (c_end - c_start) // 2, again
            assert src._state[1] == zs._SIZED
        num_frames, entries = src.num_frames, [src.table.compressed_range(i)
                                               for i in range(src.num_frames)]
    # entry 2 claims one byte less than its frame holds: the first small read refuses it
    data = path.read_bytes()
    table_at = entries[-1][1]
    with SeekableZstdSource(path) as src:
        sizes = [(c1 - c0, src.frame_bounds(i)[1] - src.frame_bounds(i)[0])
                 for i, (c0, c1) in enumerate(entries)]
    sizes[2] = (sizes[2][0], sizes[2][1] - 1)
    path.write_bytes(data[:table_at] + encode_seek_table(sizes))
    with SeekableZstdSource(path, cache_bytes=0) as src:
        assert src.num_frames == num_frames
        src.checked_by_reader = True
        start, _ = src.frame_bounds(2)
        with pytest.raises(FormatError, match="entry 2:"):
            src.pread(start + 4096, 4096)


def test_a_threads_last_prefix_serves_a_read_before_its_end(tmp_path: Path) -> None:
    """A local prefix read decodes into a buffer its thread reuses; a later small read of the
    same frame, before where that one stopped, is served from it (no disk read), but never
    another file's read of its frame of the same number, nor a read past the prefix's end."""
    path, chunks, stream = _one_mib_frames(tmp_path)
    other = tmp_path / "other.zst"
    other_chunks = [bytes(reversed(c)) for c in chunks]
    _write_seekable(other, other_chunks, frame_size=1 << 20)
    other_stream = b"".join(other_chunks)
    with SeekableZstdSource(path) as src, SeekableZstdSource(other) as src2:
        for s in (src, src2):
            s.checked_by_reader = True
            s.trust_layout()
        assert src.table.d_offsets.tolist() == src2.table.d_offsets.tolist()
        reads = _count_reads(src)
        start, _ = src.frame_bounds(1)
        assert src.pread(start + 100_000, 4096) == stream[start + 100_000 : start + 104_096]
        assert reads
        assert src2.pread(start + 8192, 4096) == other_stream[start + 8192 : start + 12288]
        reads.clear()
        assert src.pread(start + 8192, 4096) == stream[start + 8192 : start + 12288]
        assert reads  # src2's prefix took the thread's buffer
        reads.clear()
        assert src.pread(start + 4096, 4096) == stream[start + 4096 : start + 8192]
        assert not reads  # within the prefix just decoded
        assert src.pread(start + 200_000, 4096) == stream[start + 200_000 : start + 204_096]
        assert reads


@pytest.mark.parametrize("direct", [True, False])
def test_prefix_decoders_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               direct: bool) -> None:
    """A local prefix is decoded by libzstd's buffer-less decoder where the system has one,
    by python-zstandard's stream reader otherwise: the same bytes (the buffer-less one decodes
    and keeps for the thread's next read the whole block that holds the read's end); a block
    zstd cannot decode is the error either way."""
    import vmafs.container.zstd_source as zs

    if direct and zs._Direct.load() is None:
        pytest.skip("no libzstd.so.1 on this system")
    if not direct:
        monkeypatch.setattr(zs, "_direct", lambda: None)
    path, chunks, stream = _one_mib_frames(tmp_path)
    rng = random.Random(7)
    with SeekableZstdSource(path) as src:
        src.checked_by_reader = True
        for _ in range(200):
            off = rng.randrange(src.size)
            n = rng.choice([1, 4096, 65536])
            assert src.pread(off, n) == stream[off : off + n], (off, n)
        start, end = src.frame_bounds(2)
        got = src._prefix(2, 5000)
        assert bytes(got[:5000]) == stream[start : start + 5000]
        held = len(zs._THREAD.prefix[2])  # bytes decoded: to the end of a block, or exactly
        assert 5000 <= held <= min(end - start, 5000 + zs.BLOCK_SIZE_MAX) if direct \
            else held == 5000
        c_start, _ = src.table.compressed_range(3)
        head = path.read_bytes()[c_start : c_start + 18]
    damaged = bytearray(path.read_bytes())
    first_block = c_start + zs.decode_frame_header(head, c_start).size
    damaged[first_block] |= 0x06  # block type 3: reserved
    path.write_bytes(damaged)
    with SeekableZstdSource(path) as src:
        src.checked_by_reader = True
        start, _ = src.frame_bounds(3)
        with pytest.raises((FormatError, ContainerError)):
            src.pread(start + 4096, 4096)


def test_trusted_layout_checks_a_frame_header_only(tmp_path: Path) -> None:
    """Once the archive model says the layout was proven before (trust_layout), a frame's
    first small read checks its header only: no block header past the prefix is read."""
    import vmafs.container.zstd_source as zs

    path, chunks, stream = _one_mib_frames(tmp_path)
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.checked_by_reader = True
        src.trust_layout()
        small: list[int] = []
        raw_read = src._raw.read

        def counting(offset: int, length: int) -> bytes:
            small.append(length)
            return raw_read(offset, length)

        src._raw.read = counting  # type: ignore[method-assign]
        start, _ = src.frame_bounds(1)
        assert src.pread(start + 4096, 4096) == stream[start + 4096 : start + 8192]
        assert not small
        assert src._state[1] == zs._SIZED


def test_will_need_asks_for_the_compressed_prefix_a_read_decodes(tmp_path: Path) -> None:
    """will_need (a mount calls it before it hands a read to a thread) asks the disk for the
    first compressed piece of the read's frame alone; the read asks for the rest of its guess,
    a request per piece, not the first one again and nothing past the guess (the layout is
    trusted: the frame's tail is not needed); a cached frame or an offset past the end asks
    nothing."""
    import vmafs.container.zstd_source as zs

    path, chunks, stream = _one_mib_frames(tmp_path)
    with SeekableZstdSource(path) as src:
        src.checked_by_reader = True
        src.trust_layout()
        asked: list[tuple[int, int]] = []
        advise = src._raw.advise

        def counting(offset: int, length: int) -> None:
            asked.append((offset, length))
            advise(offset, length)

        src._raw.advise = counting  # type: ignore[method-assign]
        start, _ = src.frame_bounds(1)
        c_start, c_end = src.table.compressed_range(1)
        want = src._prefix_guess(1, 8192)
        assert zs.FEED_PIECE < want < c_end - c_start
        src.will_need([start + 4096, src.size + 1], 4096)
        assert asked == [(c_start, zs.FEED_PIECE)]
        asked.clear()
        assert src.pread(start + 4096, 4096) == stream[start + 4096 : start + 8192]
        pieces = [(c_start + at, min(zs.FEED_PIECE, want - at))
                  for at in range(zs.FEED_PIECE, want, zs.FEED_PIECE)]
        assert asked == pieces
        src.frame(1)
        asked.clear()
        src.will_need([start], 4096)
        assert not asked


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
    with SeekableZstdSource(bad) as src, pytest.raises(FormatError, match="does not describe"):
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
        with pytest.raises(FormatError, match="does not describe"):
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
        src.read_prefix(0, src.frame_bounds(0)[1])  # a prefix of all of it checks the checksum


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
        checker = ZstdFrameParser()
        prev = 0
        for pos in _split_points(len(data), seed):
            checker.feed(data[prev:pos])
            prev = pos
        checker.finish()
        assert checker.frames == 2 and checker.offset == len(data)
    checker = ZstdFrameParser()
    checker.feed(data[:-3])
    with pytest.raises(FormatError):
        checker.finish()


def test_parser_and_walker_agree() -> None:
    """The stream parser (fed in any pieces) and the random-access walker (headers only)
    describe every frame of a file the same way."""
    data = (SPEC / "two-disks.seekable.vma.zst").read_bytes()
    seen: list[FrameInfo] = []
    parser = ZstdFrameParser(seen.append)
    prev = 0
    for pos in _split_points(len(data), 9):
        parser.feed(data[prev:pos])
        prev = pos
    parser.finish()
    assert len(seen) > 2 and seen[-1].skippable and seen[-1].end == len(data)
    reads = 0

    def read(offset: int, length: int) -> bytes:
        nonlocal reads
        reads += 1
        return data[offset : offset + length]

    for info in seen:
        walked, end = walk_frame(read, info.start, len(data), max_blocks=1 << 20)
        assert walked == info and end == info.end
    assert reads <= sum(1 + f.blocks for f in seen)
    with SeekableZstdSource(SPEC / "two-disks.seekable.vma.zst") as src:
        for i, info in enumerate(seen[:-1]):
            assert src.table.compressed_range(i) == (info.start, info.end)
            # Made by the reference seekable writer: no content sizes, so never prefix reads.
            assert info.content_size is None and info.checksum is False


# -- forged seek tables and frames: the same bytes as zstd -d, or an error ----------------------


def _zstd_d_partial(path: Path) -> tuple[bool, bytes]:
    """``zstd -d``'s verdict and what it wrote before stopping."""
    proc = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], capture_output=True, check=False)
    return proc.returncode == 0, proc.stdout


def _sized(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)


def _unsized(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compress(data)


def _frame_header(content_size: int | None, window_log: int = 20) -> bytes:
    """Magic and a header with a window descriptor and, if given, a 4-byte content size."""
    if content_size is None:
        return ZSTD_MAGIC + bytes([0, (window_log - 10) << 3])
    return ZSTD_MAGIC + bytes([2 << 6, (window_log - 10) << 3]) + struct.pack("<I", content_size)


def _block(last: bool, kind: int, size: int) -> bytes:
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")


def _rle_bomb(content_size: int | None, blocks: int) -> bytes:
    """RLE blocks of 128 KiB each: 4 bytes of file per 128 KiB of output."""
    body = b"".join(_block(i == blocks - 1, 1, 128 << 10) + b"A" for i in range(blocks))
    return _frame_header(content_size) + body


def _literals_bomb(content_size: int | None, blocks: int) -> bytes:
    """Compressed blocks holding only RLE literals: 8 bytes per 128 KiB that no block header
    gives away (only decompressing tells their size)."""
    literals = (1 | 3 << 2 | ((128 << 10) - 1) << 4).to_bytes(3, "little") + b"B"
    payload = literals + b"\x00"  # no sequences
    body = b"".join(_block(i == blocks - 1, 2, len(payload)) + payload for i in range(blocks))
    return _frame_header(content_size) + body


def _agrees_with_zstd_d(path: Path, reads: list[tuple[int, int]]) -> list[str]:
    """Every read path gives the bytes ``zstd -d`` writes there, or a clear error; returns
    what each path did (for the cases that must fail).

    The random-access reader checks a frame at its first use; that proves the frame's bytes,
    and its offset as long as the entries before it hold their frames (``check_frames`` and
    open_stream prove that for all of them).  So reads are compared with zstd -d up to the
    first entry that does not describe its frame; after it, a read is compared with nothing
    (zstd -d's output stops at a damaged frame; a mount serves there only what the archive's
    index checksums), but once every frame is checked, a table that lies about good frames is
    refused.
    """
    ok, oracle = _zstd_d_partial(path)
    outcomes = []
    try:
        with open_stream(path) as f:
            stream = f.read()
        assert ok and stream == oracle, "open_stream passed what zstd -d does not give"
        outcomes.append("stream ok")
    except FormatError:
        outcomes.append("stream error")
    for mode in ("whole", "prefix", "checked"):
        try:
            src = SeekableZstdSource(path, cache_bytes=0)
        except (FormatError, NotSeekableError):
            outcomes.append("source refused")
            continue
        with src:
            src.checked_by_reader = mode == "prefix"
            trusted = src.size  # decompressed offset of the first entry not describing its frame
            probe = SeekableZstdSource(path)
            for i in range(probe.num_frames):
                try:
                    probe.read_frame(i)
                except FormatError:
                    trusted = probe.frame_bounds(i)[0]
                    break
            probe.close()
            if mode == "checked":
                try:
                    src.check_frames()
                except FormatError:
                    outcomes.append("source refused")
                    continue
            for off, n in [*reads, (0, src.size)]:
                try:
                    got = src.pread(off, n)
                except FormatError:
                    outcomes.append("read error")
                    continue
                outcomes.append("read ok")
                if off + n > trusted:
                    # Past a frame zstd -d cannot decompress: its output stops there.  Past an
                    # entry that lies about good frames: refused once every frame is checked.
                    assert not (mode == "checked" and ok), (off, n, mode)
                    continue
                # What zstd -d wrote (all of its output if it succeeded) must cover the read.
                assert got == oracle[off : off + n] and (ok or off + len(got) <= len(oracle)), (
                    off, n, mode)
    return outcomes


def _seekable(path: Path, frames: list[bytes], entries: list[tuple[int, int]]) -> Path:
    path.write_bytes(b"".join(frames) + encode_seek_table(entries))
    return path


@needs_zstd
def test_entry_covering_two_frames(tmp_path: Path) -> None:
    """Class 2: zstd -d reads a+b+c; a table reading only a (or a+b as one frame) is refused."""
    a, b, c = (bytes([i]) * 1000 + os.urandom(3000) for i in range(3))
    fa, fb, fc = _sized(a), _sized(b), _sized(c)
    for entries in (
        [(len(fa) + len(fb), len(a)), (len(fc), len(c))],
        [(len(fa) + len(fb), len(a) + len(b)), (len(fc), len(c))],
    ):
        path = _seekable(tmp_path / "two.zst", [fa, fb, fc], entries)
        assert _zstd_d(path) == a + b + c
        outcomes = _agrees_with_zstd_d(path, [(0, 100), (len(a) - 10, 20), (len(a) + 5, 100)])
        assert outcomes[0] == "stream error"
        with SeekableZstdSource(path) as src, pytest.raises(FormatError, match="another frame"):
            src.pread(0, 10)
        with pytest.raises(FormatError, match="does not describe the frames"):
            open_stream(path).read()
    # The honest table of the same frames reads like zstd -d everywhere.
    path = _seekable(tmp_path / "ok.zst", [fa, fb, fc],
                     [(len(fa), len(a)), (len(fb), len(b)), (len(fc), len(c))])
    assert set(_agrees_with_zstd_d(path, [(0, 100), (len(a) - 10, 20)])) == {
        "stream ok", "read ok"}


@needs_zstd
def test_wrong_sizes_in_entries(tmp_path: Path) -> None:
    parts = [os.urandom(2000) + bytes(5000) for _ in range(4)]
    frames = [_sized(p) for p in parts]
    honest = [(len(f), len(p)) for f, p in zip(frames, parts, strict=True)]
    forged = {
        "decompressed +1": [honest[0], (honest[1][0], honest[1][1] + 1), *honest[2:]],
        "decompressed -1, next +1": [honest[0], (honest[1][0], honest[1][1] - 1),
                                     (honest[2][0], honest[2][1] + 1), honest[3]],
        "boundary moved": [(honest[0][0] + 7, honest[0][1]), (honest[1][0] - 7, honest[1][1]),
                           *honest[2:]],
        "one entry too many": [*honest[:3], (honest[3][0] - 20, honest[3][1]), (20, 0)],
        "one entry too few": [*honest[:2], (honest[2][0] + honest[3][0], honest[2][1]
                                            + honest[3][1])],
    }
    for what, entries in forged.items():
        path = _seekable(tmp_path / "w.zst", frames, entries)
        assert _zstd_d(path) == b"".join(parts), what
        outcomes = _agrees_with_zstd_d(path, [(0, 10), (7000, 10), (14005, 100), (21000, 50)])
        assert outcomes[0] == "stream error", what
        assert "read error" in outcomes or "source refused" in outcomes, what


@needs_zstd
def test_frames_without_content_size(tmp_path: Path) -> None:
    """Other writers leave out Frame_Content_Size: such frames are decompressed whole (never
    by prefix), bounded by the table's size."""
    parts = [os.urandom(3000) + bytes(60000) for _ in range(3)]
    frames = [_unsized(p) for p in parts]
    entries = [(len(f), len(p)) for f, p in zip(frames, parts, strict=True)]
    path = _seekable(tmp_path / "u.zst", frames, entries)
    reads = [(0, 4096), (70000, 4096), (63000 * 2 + 5, 10)]
    assert set(_agrees_with_zstd_d(path, reads)) == {"stream ok", "read ok"}
    with SeekableZstdSource(path, cache_bytes=0) as src:
        src.checked_by_reader = True
        assert src.read_prefix(1, 10) == parts[1]  # the whole frame: nothing less is proven
    # The table claims less than the frame holds, or more.
    for delta in (-1, 1, -60000):
        lying = [entries[0], (entries[1][0], entries[1][1] + delta), entries[2]]
        path = _seekable(tmp_path / "l.zst", frames, lying)
        outcomes = _agrees_with_zstd_d(path, reads)
        assert outcomes[0] == "stream error" and "read error" in outcomes, delta


@needs_zstd
def test_hidden_frame_in_an_empty_entry(tmp_path: Path) -> None:
    """An empty entry may hold a skippable frame (zstd -d skips it), but not data."""
    a, b = os.urandom(5000), os.urandom(6000)
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"hello"
    hidden = _unsized(b"hidden " * 100)
    for middle, honest in ((skippable, True), (hidden, False), (_sized(b""), True)):
        frames = [_sized(a), middle, _sized(b)]
        entries = [(len(frames[0]), len(a)), (len(middle), 0), (len(frames[2]), len(b))]
        path = _seekable(tmp_path / "e.zst", frames, entries)
        outcomes = _agrees_with_zstd_d(path, [(0, 100), (5000, 100), (4990, 20)])
        if honest:
            assert set(outcomes) == {"stream ok", "read ok"}
        else:
            assert outcomes[0] == "stream error" and "read error" in outcomes
            with SeekableZstdSource(path) as src:
                assert src.pread(0, 100) == a[:100]  # before the hidden frame: same offsets
                with pytest.raises(FormatError, match="does not describe"):
                    src.pread(5000, 100)


_BOMB_CHILD = """
import resource, sys
from vmafs.container.zstd_source import MAX_FRAME_SIZE, SeekableZstdSource
from vmafs.errors import FormatError
src = SeekableZstdSource(sys.argv[1], cache_bytes=0)
src.checked_by_reader = sys.argv[2] == "prefix"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    got = len(src.pread(int(sys.argv[3]), 4096))
except FormatError as e:
    got = str(e)
print(repr(got), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@needs_zstd
@pytest.mark.parametrize("kind", ["rle", "literals"])
@pytest.mark.parametrize("sized", [True, False], ids=["claims-64KiB", "no-content-size"])
def test_bomb_is_refused_in_bounded_memory(tmp_path: Path, kind: str, sized: bool) -> None:
    """Class 7: ~100 KB whose frame expands to 3 GiB while the table (and maybe the frame
    header) says 64 KiB: refused, using at most a few MiB."""
    blocks = 24 << 10  # 3 GiB of output
    frame = (_rle_bomb if kind == "rle" else _literals_bomb)(64 << 10 if sized else None, blocks)
    tail = _sized(b"after the bomb")
    entries = [(len(frame), 64 << 10), (len(tail), 14)]
    path = _seekable(tmp_path / "bomb.zst", [frame, tail], entries)
    assert path.stat().st_size < 200_000
    root = Path(__file__).resolve().parent.parent
    for mode in ("whole", "prefix"):
        for offset in (0, 64 << 10):
            proc = subprocess.run(
                [sys.executable, "-c", _BOMB_CHILD, str(path), mode, str(offset)],
                capture_output=True, text=True, cwd=root, timeout=120, check=False,
            )
            assert proc.returncode == 0, proc.stderr
            result, grown_kib = proc.stdout.rsplit(" ", 1)
            assert int(grown_kib) < 8 << 10, (mode, offset, result)
            if offset == 0:
                assert "bomb.zst" in result, (mode, result)  # a FormatError naming the file
            else:
                assert result == "14", (mode, result)  # the frame after it is fine
    # Streaming stops within a read of the table's size too (zstd -d is no oracle here: it
    # writes the 3 GiB, or fails at once where the frame header says 64 KiB).
    out = 0
    with pytest.raises(FormatError), open_stream(path) as f:  # the table's or zstd's check
        while chunk := f.read(1 << 20):
            out += len(chunk)
    assert out <= 4 << 20


def test_frame_larger_than_the_cap_is_not_seekable(tmp_path: Path) -> None:
    """A legal frame above MAX_FRAME_SIZE (the format allows 2 GiB) is refused for random
    access with the way out; streaming it still works."""
    path = tmp_path / "big.zst"
    stream = bytes(MAX_FRAME_SIZE + 4096)
    with open(path, "wb") as f:
        out = SeekableZstdOutput(f, frame_size=len(stream), threads=0)
        out.write(stream)
        out.close()
    with pytest.raises(NotSeekableError, match=f"vmafs convert {path}"):
        SeekableZstdSource(path)
    with open_stream(path) as f:
        assert f.read() == stream
    # A table that only claims a huge frame is refused the same way, before any read.
    small = _sized(b"x" * 100)
    lying = _seekable(tmp_path / "claim.zst", [small], [(len(small), 2 << 30)])
    with pytest.raises(NotSeekableError, match="more than"):
        SeekableZstdSource(lying)


def test_huge_window_without_content_size_is_refused(tmp_path: Path) -> None:
    frame = _frame_header(None, window_log=30) + _block(True, 0, 5) + b"hello"
    path = _seekable(tmp_path / "w.zst", [frame], [(len(frame), 5)])
    with SeekableZstdSource(path) as src, pytest.raises(FormatError, match="window"):
        src.pread(0, 5)


def test_stream_checks_the_table_of_a_file_only(tmp_path: Path) -> None:
    """A piped seekable file is read like zstd -d (its table is for random access, which
    needs the file); the file itself has its table compared."""
    a, b = os.urandom(3000), os.urandom(4000)
    fa, fb = _sized(a), _sized(b)
    path = _seekable(tmp_path / "p.zst", [fa, fb], [(len(fa) + len(fb), len(a))])
    with pytest.raises(FormatError, match=r"does not describe the frames \(entry 0"):
        open_stream(path).read()
    proc = _open_stream_from_pipe(
        path,
        "import sys; from vmafs.container.streams import open_stream; "
        "sys.stdout.buffer.write(open_stream('-').read())",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == a + b
    # A file ending in a seek-table footer whose table is malformed is refused.
    damaged = bytearray(_seekable(tmp_path / "d.zst", [fa], [(len(fa), len(a))]).read_bytes())
    damaged[-5] |= 0x10  # a reserved descriptor bit
    (tmp_path / "d.zst").write_bytes(damaged)
    with pytest.raises(FormatError, match="bad zstd seek table"):
        open_stream(tmp_path / "d.zst").read()


def test_fifo_without_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from vmafs.container.streams import open_stream\n"
        "from vmafs.container.zstd_source import SeekableZstdSource\n"
        "from vmafs.errors import VmafsError\n"
        "for opener in (open_stream, SeekableZstdSource):\n"
        "    try:\n"
        "        opener(sys.argv[1])\n"
        "    except VmafsError as e:\n"
        "        print(type(e).__name__, e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parent.parent, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("FormatError") and "empty" in lines[0]
    assert lines[1].startswith("NotSeekableError") and "not a regular file" in lines[1]


# -- frames decoded ahead by worker threads (open_stream of a seekable file) --------------------


def _many_frames(path: Path, frame_size: int = 64 << 10) -> bytes:
    """A seekable file of many frames, compressible and not, as vmafs writes it."""
    rng = random.Random(7)
    data = b"".join(rng.randbytes(20000) + bytes(30000) for _ in range(60))
    with open(path, "wb") as f:
        out = SeekableZstdOutput(f, frame_size=frame_size, threads=0)
        out.write(data)
        out.close()
    return data


def _unzstd_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vmafs-unzstd")]


@pytest.fixture
def spare_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on an idle machine of several cores: frames decoded ahead (the suite loads it)."""
    from vmafs.container import streams

    monkeypatch.setattr(streams, "_spare_core", lambda: True)


@pytest.mark.usefixtures("spare_core")
def test_stream_of_a_seekable_file_decodes_frames_ahead(tmp_path: Path) -> None:
    """Worker threads decode the frames ahead of the reader; the bytes are zstd -d's, in
    reads of any size, and the workers end with the stream."""
    path = tmp_path / "many.zst"
    data = _many_frames(path)
    with open_stream(path) as f:
        got = bytearray(f.read(100))
        assert _unzstd_threads()
        rng = random.Random(1)
        while chunk := f.read(rng.choice((1, 4096, 65536, 200000, 1 << 20))):
            got += chunk
    assert bytes(got) == data
    assert not _unzstd_threads()


@needs_zstd
@pytest.mark.usefixtures("spare_core")
def test_stream_damaged_frame_is_the_error_after_every_byte_before_it(tmp_path: Path) -> None:
    """A frame that fails its checksum: the reader gets every byte of the frames before it
    (decoded ahead or not), then the error, as far as zstd -d got or further."""
    path = tmp_path / "many.zst"
    data = _many_frames(path)
    with SeekableZstdSource(path) as src:
        k = src.num_frames // 2
        c_start, c_end = src.table.compressed_range(k)
        d_start = src.frame_bounds(k)[0]
    raw = bytearray(path.read_bytes())
    raw[c_end - 2] ^= 0xFF  # in the frame's content checksum
    path.write_bytes(raw)
    ok, partial = _zstd_d_partial(path)
    assert not ok
    got = bytearray()
    with open_stream(path) as f, pytest.raises(FormatError, match=f"frame {k} at {c_start}"):
        while chunk := f.read(65536):
            got += chunk
    assert bytes(got) == data[:d_start]
    assert partial[:d_start] == bytes(got)
    assert not _unzstd_threads()


@pytest.mark.usefixtures("spare_core")
def test_stream_of_stored_frames_decodes_in_line(tmp_path: Path) -> None:
    """Frames that do not compress (random data: stored blocks) are a copy to decode: the
    reader's thread decodes them, no workers; the same bytes."""
    path = tmp_path / "random.zst"
    data = random.Random(3).randbytes(600 << 10)
    with open(path, "wb") as f:
        out = SeekableZstdOutput(f, frame_size=64 << 10, threads=0)
        out.write(data)
        out.close()
    with open_stream(path) as f:
        got = f.read(100)
        assert not _unzstd_threads()
        got += f.read()
    assert got == data


def test_stream_on_one_cpu_decodes_in_line(tmp_path: Path) -> None:
    """Pinned to one CPU, the stream decodes on the reader's thread (workers would only
    take turns with it): the same bytes."""
    path = tmp_path / "many.zst"
    data = _many_frames(path)
    code = ("import os, sys, threading\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from vmafs.container.streams import open_stream\n"
            "with open_stream(sys.argv[1]) as f:\n"
            "    out = f.read()\n"
            "    names = [t.name for t in threading.enumerate()]\n"
            "    assert not [n for n in names if n.startswith('vmafs-unzstd')]\n"
            "sys.stdout.buffer.write(out)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          check=True)
    assert proc.stdout == data


def test_check_frames_in_spans_names_the_first_bad_entry(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """check_frames walks spans of the file in threads: with two bad entries, the error is
    the first one's, whichever thread finds its own first; good files pass whole."""
    import vmafs.container.zstd_source as zs

    monkeypatch.setattr(zs, "CHECK_AHEAD", 16 << 10)  # many spans
    parts = [os.urandom(3000) + bytes(5000) for _ in range(40)]
    frames = [_sized(p) for p in parts]
    entries = [(len(f), len(p)) for f, p in zip(frames, parts, strict=True)]
    good = _seekable(tmp_path / "good.zst", frames, entries)
    with SeekableZstdSource(good) as src:
        src.check_frames()
        assert src.pread(0, src.size) == b"".join(parts)
    for first, second in ((3, 30), (30, 33)):
        bad = list(entries)
        for k in (first, second):  # the frame stays, its entry claims one byte more
            bad[k] = (entries[k][0], entries[k][1] + 1)
        path = _seekable(tmp_path / f"bad{first}.zst", frames, bad)
        with SeekableZstdSource(path) as src, pytest.raises(FormatError, match=f"entry {first}:"):
            src.check_frames()
