"""Random access into the decompressed stream of a seekable ``.vma.zst``.

Reading any byte decompresses only the frame that holds it.  All file reads use
``os.pread`` (no shared file position), decompressors are per thread, and the
frame cache has its own lock, so every method is safe to call from worker
threads, e.g. a read-ahead pipeline running ``frame(i + 1)`` while ``frame(i)``
is being served.
"""

from __future__ import annotations

import collections
import os
import threading
from types import TracebackType

import zstandard

from vmafs.errors import FormatError, NotSeekableError
from vmafs.format.seektable import (
    FOOTER_SIZE,
    SEEKABLE_MAGIC,
    SeekTable,
    decode_seek_table,
    parse_seek_table_footer,
)

DEFAULT_CACHE_BYTES = 16 << 20  # 32 frames of the default size
# With prefix_reads on, a read of at most this many bytes from a frame not in the cache
# decompresses the frame only up to the read's end: a random 4 KiB read then costs half a frame
# of disk reads on average, not a whole one.
PREFIX_READ_MAX = 256 << 10
# Compressed bytes read past the proportional guess: one zstd block (<= 128 KiB) and its header.
PREFIX_SLACK = (128 << 10) + 64
# Whole frames read in file order get this many compressed bytes requested ahead of them.
PREFETCH = 8 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _is_skippable_magic(head: bytes | memoryview) -> bool:
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class SeekableZstdSource:
    """A seekable zstd file, read by decompressed offset."""

    def __init__(
        self,
        file: str | os.PathLike[str] | int,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        closefd: bool = True,
        name: str | None = None,
    ) -> None:
        """Open a path, or take a file descriptor (closed by ``close`` if ``closefd``).

        If opening fails, a descriptor passed in is left open: it is still the caller's.
        """
        if isinstance(file, int):
            self._fd = file
            self._own_fd = False
            self.name = name or f"fd {file}"
        else:
            self._fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            self._own_fd = True
            self.name = name or os.fspath(file)
        try:
            self.table = self._load_table()
        except BaseException:
            self.close()
            raise
        self._own_fd = self._own_fd or closefd
        self._cache_limit = cache_bytes
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        # Off by default: a frame's content checksum is only checked at its end, so a reader
        # may turn this on only if it checks what it reads itself (an indexed archive does).
        self.prefix_reads = False
        self._next_frame = 0  # the frame a reader going through the file in order reads next
        self._ahead = 0  # end of the compressed bytes already requested ahead

    # -- opening --------------------------------------------------------------

    def _pread_exact(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(
                f"{self.name}: short read at {offset}: {len(data)} of {length} bytes "
                "(file changed while open?)"
            )
        return data

    def _pread_frame(self, length: int, offset: int) -> memoryview:
        """Like _pread_exact, into this thread's reused buffer: valid until its next call.

        Spares a fresh allocation, and its page faults, for every frame read.
        """
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = bytearray(-(-length // (64 << 10)) * (64 << 10))
            self._local.buf = buf
        view = memoryview(buf)[:length]
        got = os.preadv(self._fd, [view], offset)
        while 0 < got < length:
            more = os.preadv(self._fd, [view[got:]], offset + got)
            if not more:
                break
            got += more
        if got != length:
            raise FormatError(
                f"{self.name}: short read at {offset}: {got} of {length} bytes "
                "(file changed while open?)"
            )
        return view

    def _not_seekable(self, why: str) -> NotSeekableError:
        return NotSeekableError(
            f"{self.name}: {why}; convert it first: vmafs convert {self.name} OUT.vma.zst"
        )

    def _load_table(self) -> SeekTable:
        file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 4, 0)
        if head != _ZSTD_MAGIC and not _is_skippable_magic(head):
            raise FormatError(f"{self.name}: not a zstd file")
        if file_size < FOOTER_SIZE:
            raise self._not_seekable("no zstd seek table (file too short)")
        tail = self._pread_exact(FOOTER_SIZE, file_size - FOOTER_SIZE)
        if int.from_bytes(tail[-4:], "little") != SEEKABLE_MAGIC:
            raise self._not_seekable("zstd file without a seek table (one-frame, as vzdump writes)")
        try:
            footer = parse_seek_table_footer(tail)
            if footer.table_size > file_size:
                raise FormatError(
                    f"seek table of {footer.num_frames} frames is larger than the file"
                )
            table_bytes = self._pread_exact(footer.table_size, file_size - footer.table_size)
            return decode_seek_table(table_bytes, file_size)
        except FormatError as e:
            raise FormatError(f"{self.name}: bad zstd seek table: {e}") from None

    # -- geometry -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size of the decompressed stream."""
        return self.table.decompressed_size

    @property
    def num_frames(self) -> int:
        return self.table.num_frames

    def frame_of(self, offset: int) -> int:
        """Index of the frame holding decompressed byte ``offset``."""
        return self.table.frame_for(offset)

    def frame_bounds(self, index: int) -> tuple[int, int]:
        """Decompressed ``[start, end)`` of frame ``index``."""
        if not 0 <= index < self.table.num_frames:
            raise IndexError(f"frame {index} out of range 0..{self.table.num_frames - 1}")
        return self.table.decompressed_range(index)

    # -- decompression --------------------------------------------------------

    def read_frame(self, index: int) -> bytes:
        """Decompress frame ``index`` from the file, bypassing the cache (thread-safe)."""
        start, end = self.frame_bounds(index)
        c_start, c_end = self.table.compressed_range(index)
        self._prefetch_after(index, c_end)
        data = self._pread_frame(c_end - c_start, c_start)
        expected = end - start
        if expected == 0 and _is_skippable_magic(data):
            return b""
        if data[:4] != _ZSTD_MAGIC:
            raise FormatError(f"{self.name}: frame {index} at {c_start} is not a zstd frame")
        dctx = self._dctx()
        try:
            content_size = zstandard.get_frame_parameters(data).content_size
            if content_size == expected:
                # Fast path (our frames): one call, one output allocation.  Data after the
                # frame inside its table entry goes unnoticed here, but then the next
                # frame's entry starts in the wrong place and fails.
                out = dctx.decompress(data)
            elif content_size != zstandard.CONTENTSIZE_UNKNOWN:
                raise FormatError(
                    f"{self.name}: frame {index} decompresses to {content_size} bytes, "
                    f"the seek table says {expected}"
                )
            else:
                out = self._decompress_unsized(dctx, data, index, c_start)
        except zstandard.ZstdError as e:
            raise FormatError(f"{self.name}: frame {index} at {c_start}: {e}") from None
        if len(out) != expected:
            raise FormatError(
                f"{self.name}: frame {index} decompresses to {len(out)} bytes, "
                f"the seek table says {expected}"
            )
        return out

    def _prefetch_after(self, index: int, c_end: int) -> None:
        """Frames read in order (give or take the threads of a read-ahead pipeline) keep the
        disk busy with the next PREFETCH bytes (POSIX_FADV_WILLNEED)."""
        with self._lock:
            sequential = abs(index - self._next_frame) <= 4
            self._next_frame = index + 1
            if not sequential or c_end + PREFETCH // 2 <= self._ahead:
                return
            start = max(c_end, self._ahead)
            self._ahead = c_end + PREFETCH
        os.posix_fadvise(self._fd, start, c_end + PREFETCH - start, os.POSIX_FADV_WILLNEED)

    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor()
            self._local.dctx = dctx
        return dctx

    def read_prefix(self, index: int, need: int) -> bytes:
        """At least the first ``need`` decompressed bytes of frame ``index`` (not cached).

        Reads the compressed bytes in proportion to ``need``, plus a block's worth, and
        decompresses them as a stream; only if that falls short is the rest read.
        """
        start, end = self.frame_bounds(index)
        c_start, c_end = self.table.compressed_range(index)
        c_size = c_end - c_start
        guess = min(c_size, need * c_size // max(end - start, 1) + PREFIX_SLACK)
        data = self._pread_frame(guess, c_start)
        if data[:4] != _ZSTD_MAGIC:
            raise FormatError(f"{self.name}: frame {index} at {c_start} is not a zstd frame")
        try:
            dobj = self._dctx().decompressobj()
            out: bytes = dobj.decompress(data)
            if len(out) < need and guess < c_size:
                out += dobj.decompress(self._pread_exact(c_size - guess, c_start + guess))
        except zstandard.ZstdError as e:
            raise FormatError(f"{self.name}: frame {index} at {c_start}: {e}") from None
        if len(out) < min(need, end - start) or len(out) > end - start:
            raise FormatError(
                f"{self.name}: frame {index} does not decompress to the {end - start} bytes "
                "the seek table says"
            )
        return out

    def _decompress_unsized(
        self, dctx: zstandard.ZstdDecompressor, data: bytes | memoryview, index: int,
        c_start: int
    ) -> bytes:
        """Frames without a content size (other writers): decompressobj checks the end."""
        dobj = dctx.decompressobj()
        out: bytes = dobj.decompress(data)
        if not dobj.eof:
            raise FormatError(f"{self.name}: frame {index} at {c_start} is truncated")
        if dobj.unused_data:
            raise FormatError(
                f"{self.name}: frame {index} at {c_start} ends {len(dobj.unused_data)} bytes "
                "before the seek table says"
            )
        return out

    def frame(self, index: int) -> bytes:
        """Frame ``index`` decompressed, through the LRU cache (thread-safe)."""
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
        data = self.read_frame(index)
        self._remember(index, data)
        return data

    def prefetch(self, index: int) -> None:
        """Decompress frame ``index`` into the cache unless it is there (for worker threads)."""
        if not self.cached(index):
            self.frame(index)

    @property
    def cache_used(self) -> int:
        """Bytes of decompressed frames held in the cache."""
        with self._lock:
            return self._cache_used

    def _remember(self, index: int, data: bytes) -> None:
        if len(data) > self._cache_limit:
            return
        with self._lock:
            if index in self._cache:
                return
            self._cache[index] = data
            self._cache_used += len(data)
            while self._cache_used > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_used -= len(old)

    def cached(self, index: int) -> bool:
        with self._lock:
            return index in self._cache

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at decompressed ``offset`` (short only at the end)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first = self.frame_of(offset)
        f_start, f_end = self.table.decompressed_range(first)
        if end <= f_end:
            if (self.prefix_reads and end - offset <= PREFIX_READ_MAX and end < f_end
                    and not self.cached(first)):
                return self.read_prefix(first, end - f_start)[offset - f_start : end - f_start]
            return self.frame(first)[offset - f_start : end - f_start]
        parts: list[memoryview] = []  # views: the join below is the only copy
        index = first
        pos = offset
        while pos < end:
            f_start, f_end = self.table.decompressed_range(index)
            if f_end > f_start:
                whole = f_start >= offset and f_end <= end
                # Frames a big read covers whole are not cached: they would evict hotter ones.
                if whole and not self.cached(index):
                    data = self.read_frame(index)
                else:
                    data = self.frame(index)
                parts.append(memoryview(data)[pos - f_start : min(end, f_end) - f_start])
                pos = min(end, f_end)
            index += 1
        return b"".join(parts)

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        if hasattr(self, "_cache"):
            with self._lock:
                self._cache.clear()
                self._cache_used = 0

    def __enter__(self) -> SeekableZstdSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
