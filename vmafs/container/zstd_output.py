"""Archive outputs: seekable zstd (independent frames + seek table) and plain, never seeking.

The archive writer hands over whole extents (``write``), may ask for a frame cut
(``end_frame``) and finally ``close``\\ s.  Frames are compressed in a small thread
pool (zstandard releases the GIL) with a bounded number in flight, and written
strictly in order, so memory stays bounded and the target may be a pipe.  Calls
may come from any one thread at a time (plain threads, or trio worker threads).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, Self

from vmafs.format import vma

if TYPE_CHECKING:
    import concurrent.futures

    import zstandard

# zstandard, its thread pool (concurrent.futures) and the seek table are imported by the
# seekable output alone: a plain archive (a live backup's .vma, create's) needs none of them.

DEFAULT_FRAME_SIZE = 3 << 19
"""Sets size against random-read latency: a cold read decodes its frame up to the read.

Chosen from tools/bench_size.py's curve against vzdump's ``vma create | zstd -3`` (= 1.000;
``zstd -T2 -3`` writes the same bytes) of a 1.5 GiB ext4 image of /usr, the harder of its two
images (a SQLite image: 0.989-0.999 at every point); create's CPU against the pipeline's, and
cold 4 KiB reads through a mount, all in one run (two sessions' runs, 2-3 rounds at load 9-13:
the latencies are inflated, their order is not):

    frames    level  size    CPU-speed    cold 4 KiB p50
    1 MiB       3    1.033   1.06x        2.9 ms
    1.25 MiB    4    1.017   0.99x        2.5 ms
    1.5 MiB     3    1.016   1.18x
    1.5 MiB     4    1.007   0.93-1.00x   2.6-2.9 ms   <- the default
    2 MiB       3    1.007   1.09-1.17x   3.1-3.2 ms   (the default before)
    3 MiB       3    0.998   1.12x        8.0 ms       (before that)
    1 MiB       5    0.997   0.62x        3.0 ms

A cold read's time is mostly decoding (~1 GB/s here) from the frame's start to the read: half
a frame on average (0.83x the time of 2 MiB frames through the mount, 3 rounds of 100, 0.78x
in-process).  Level 4 is level 3's strategy (dfast) with larger match tables (2**18 entries):
1.5 MiB frames as small as level 3's 2 MiB ones (/usr image: 446.51 vs 446.43 MB) for 12-17%
more CPU in create (8.1-8.3 vs 7.0-7.1 s for the /usr image, 2 threads).  Greedy search
(level 5, or searchLog 1 at any table size) halves compression speed (~160 vs ~280 MB/s a
core); minMatch 4 or 6 and larger tables do not pay; long-distance matching and a window past
the frame buy nothing within a frame."""
DEFAULT_LEVEL = 4
DEFAULT_THREADS = 2
MAX_WINDOW_LOG = 27
"""Plain ``zstd -d`` refuses larger windows without --long."""
PLAIN_BUFFER_SIZE = 1 << 20


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


class Output(Protocol):
    """What the archive writer writes its VMA stream into: plain or seekable zstd.

    Each write() is whole extents, so a zstd output may start a frame at any call; extent_bytes
    is the largest extent it wants (small for zstd, so a random read decompresses little).
    """

    extent_bytes: int
    bytes_out: int
    # told the file's identity (container.source.file_identity) once the file is committed
    # under its final name, where an output knows it: what the archive model may remember
    on_commit: Callable[[bytes], None] | None

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def end_frame(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _write_all(target: Writable, data: bytes | bytearray | memoryview) -> None:
    """Write everything, also to raw files that may write less than asked."""
    view = memoryview(data).cast("B")
    while view:
        n = target.write(view)
        if n is None or n >= len(view):
            return
        view = view[n:]


def _flush(target: Writable) -> None:
    flush = getattr(target, "flush", None)
    if flush is not None:
        flush()


def compression_params(
    level: int, frame_size: int, overrides: Mapping[str, int] | None = None
) -> zstandard.ZstdCompressionParameters:
    """Parameters for one independent frame: content size and checksum on, window ≤ 2**27.

    ``overrides`` are ZstdCompressionParameters keywords (``strategy``, ``hash_log``,
    ``enable_ldm``, ...) laid over the level's own, for benchmarks (tools/bench_size.py).
    """
    import zstandard

    base = zstandard.ZstdCompressionParameters.from_level(level, source_size=frame_size)
    extra = dict(overrides or {})
    window_log = min(MAX_WINDOW_LOG, extra.pop("window_log", base.window_log))
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=frame_size,
        window_log=window_log,
        write_content_size=1,
        write_checksum=extra.pop("write_checksum", 1),
        **extra,
    )


class _Output:
    """As a context manager: close() on success, abort() after an exception."""

    on_commit: Callable[[bytes], None] | None = None

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SeekableZstdOutput(_Output):
    """Writes a zstd seekable file: one frame per ≥ ``frame_size`` bytes, then the seek table.

    The underlying file is neither sought nor closed; ``close`` flushes it.  Frame
    boundaries fall only on ``write`` call boundaries.
    """

    def __init__(
        self,
        target: Writable,
        *,
        frame_size: int = DEFAULT_FRAME_SIZE,
        level: int = DEFAULT_LEVEL,
        threads: int = DEFAULT_THREADS,
        max_in_flight: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> None:
        import concurrent.futures

        import zstandard

        from vmafs.format.seektable import MAX_FRAME_DECOMPRESSED_SIZE, SeekTableBuilder

        if not 0 < frame_size <= MAX_FRAME_DECOMPRESSED_SIZE:
            raise ValueError(f"frame_size {frame_size} out of range")
        if not zstandard.MAX_COMPRESSION_LEVEL >= level >= -(1 << 17):
            raise ValueError(f"zstd level {level} out of range")
        if threads < 0:
            raise ValueError("threads must be >= 0")
        self._target = target
        self._frame_size = frame_size
        self._max_frame = MAX_FRAME_DECOMPRESSED_SIZE
        self._compressor = zstandard.ZstdCompressor
        self.extent_bytes = frame_size
        self._params = compression_params(level, frame_size, params)
        self._local = threading.local()
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="vmafs-zstd")
            if threads
            else None
        )
        self._max_in_flight = max_in_flight or max(1, 2 * threads)
        self._pending: collections.deque[concurrent.futures.Future[tuple[bytes, int]]] = (
            collections.deque()
        )
        self._buf = bytearray()
        self._table = SeekTableBuilder()
        self._closed = False
        self.bytes_in = 0
        """Decompressed bytes accepted so far."""
        self.bytes_out = 0
        """Compressed bytes written so far (seek table included after close)."""

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return len(self._table)

    def _compress(self, data: bytearray) -> tuple[bytes, int]:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._compressor(compression_params=self._params)
            self._local.compressor = compressor
        return compressor.compress(data), len(data)

    def _emit(self, frame: bytes, size: int) -> None:
        _write_all(self._target, frame)
        self._table.add(len(frame), size)
        self.bytes_out += len(frame)

    def _drain(self, keep: int) -> None:
        """Write finished frames in order until at most ``keep`` are in flight."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            self._emit(*self._pending.popleft().result())

    def _cut(self) -> None:
        data, self._buf = self._buf, bytearray()
        if not data:
            return
        if self._pool is None:
            self._emit(*self._compress(data))
            return
        self._drain(self._max_in_flight - 1)
        self._pending.append(self._pool.submit(self._compress, data))
        self._drain(self._max_in_flight)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("write to a closed SeekableZstdOutput")

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        """Append whole extents; the data is copied, so the caller may reuse its buffer."""
        self._check_open()
        n = memoryview(data).nbytes
        if n > self._max_frame:
            raise ValueError(f"a {n}-byte write cannot fit in one seekable frame")
        if len(self._buf) + n > self._max_frame:
            self._cut()
        self._buf += data
        self.bytes_in += n
        if len(self._buf) >= self._frame_size:
            self._cut()
        return n

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> int:
        """write() of the pieces joined, without joining them first."""
        self._check_open()
        n = sum(memoryview(p).nbytes for p in parts)
        if n > self._max_frame:
            raise ValueError(f"a {n}-byte write cannot fit in one seekable frame")
        if len(self._buf) + n > self._max_frame:
            self._cut()
        for part in parts:
            self._buf += part
        self.bytes_in += n
        if len(self._buf) >= self._frame_size:
            self._cut()
        return n

    def end_frame(self) -> None:
        """Make the next ``write`` start a new frame."""
        self._check_open()
        self._cut()

    def close(self) -> None:
        """Write the remaining frames and the seek table; flush (but not close) the target."""
        if self._closed:
            return
        try:
            self._cut()
            self._drain(0)
            table = self._table.to_bytes()
            _write_all(self._target, table)
            self.bytes_out += len(table)
            _flush(self._target)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()

    def abort(self) -> None:
        """Drop buffered and in-flight frames without writing a table (after an error)."""
        self._closed = True
        self._buf = bytearray()
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)



class PlainOutput(_Output):
    """Uncompressed ``.vma``: the same interface, writes gathered into ~1 MiB blocks."""

    def __init__(self, target: Writable, *, buffer_size: int = PLAIN_BUFFER_SIZE) -> None:
        self._target = target
        self._buffer_size = buffer_size
        self.extent_bytes = vma.MAX_EXTENT_SIZE
        self._buf = bytearray()
        self._closed = False
        self.bytes_in = 0
        self.bytes_out = 0

    def _flush_buf(self) -> None:
        if self._buf:
            _write_all(self._target, self._buf)
            self.bytes_out += len(self._buf)
            self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if self._closed:
            raise ValueError("write to a closed PlainOutput")
        n = memoryview(data).nbytes
        self.bytes_in += n
        if len(self._buf) + n > self._buffer_size:
            self._flush_buf()
        if n >= self._buffer_size:
            _write_all(self._target, data)
            self.bytes_out += n
        else:
            self._buf += data
        return n

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> int:
        """write() of the pieces joined: straight to a target that gathers them itself
        (os.writev), else joined."""
        n = sum(memoryview(p).nbytes for p in parts)
        writev = getattr(self._target, "writev", None)
        if writev is None or n < self._buffer_size:
            return self.write(b"".join(parts))
        if self._closed:
            raise ValueError("write to a closed PlainOutput")
        self._flush_buf()
        writev(parts)
        self.bytes_in += n
        self.bytes_out += n
        return n

    def end_frame(self) -> None:
        """Nothing to cut in a plain stream."""

    def close(self) -> None:
        """Write what is buffered and flush (but not close) the target."""
        if self._closed:
            return
        self._flush_buf()
        _flush(self._target)
        self._closed = True

    def abort(self) -> None:
        self._buf = bytearray()
        self._closed = True

