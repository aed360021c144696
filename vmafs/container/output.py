"""Opening an archive for writing: the container follows the name, and nothing half-written
ever appears under the final name (PATH.part, fsync, rename)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Callable, Iterator

from vmafs.container.zstd_output import (
    DEFAULT_FRAME_SIZE,
    PlainOutput,
    SeekableZstdOutput,
    Writable,
)
from vmafs.errors import VmafsError
from vmafs.format import vma


class FramedOutput:
    """An output plus the extent size it wants, so zstd frames stay small for random reads."""

    def __init__(self, inner: PlainOutput | SeekableZstdOutput, extent_bytes: int) -> None:
        self.inner = inner
        self.extent_bytes = extent_bytes

    def write(self, chunk: bytes) -> None:
        self.inner.write(chunk)

    def end_frame(self) -> None:
        self.inner.end_frame()

    def close(self) -> None:
        self.inner.close()

    @property
    def bytes_out(self) -> int:
        return self.inner.bytes_out


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 64 << 20


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk now, without waiting (Linux)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class WritebackFile:
    """A file that starts the kernel's writeback every 64 MiB (sync_file_range, no waiting).

    Otherwise gigabytes of dirty pages wait for the final fsync, and a backup pays the whole
    write-out at the end instead of overlapping it with the copy (measured: 0.62x -> 1.0x of
    qemu-img convert for a live backup).
    """

    def __init__(self, raw: io.FileIO) -> None:
        self.raw = raw
        self.written = 0
        self._next = WRITEBACK_STEP

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        n = self.raw.write(data) or 0
        self.written += n
        if self.written >= self._next:
            self._next = self.written + WRITEBACK_STEP
            start_writeback(self.raw.fileno())
        return n

    def flush(self) -> None:
        pass


def is_zstd_name(path: str) -> bool:
    return path.endswith((".zst", ".zstd"))


def check_output_name(path: str) -> None:
    if path == "-":
        return
    if not path.endswith((".vma", ".vma.zst")):
        raise VmafsError(f"{path}: archive name must end in .vma or .vma.zst")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise VmafsError(f"{path}: directory {parent} does not exist")


@contextlib.contextmanager
def open_output(path: str, *, zstd: bool | None = None, level: int = 3,
                threads: int = 2) -> Iterator[FramedOutput]:
    """Yield an Output for PATH ('-' is stdout); commit on normal exit, discard on exception."""
    check_output_name(path)
    compressed = is_zstd_name(path) if zstd is None else zstd
    if path == "-":
        target = sys.stdout.buffer
        out = _make(target, compressed, level, threads)
        yield out
        out.close()
        return
    part = path + ".part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as target:
            out = _make(WritebackFile(target), compressed, level, threads)
            try:
                yield out
                out.close()
            except BaseException:
                out.inner.abort()
                raise
            os.fsync(target.fileno())
        os.chmod(part, 0o644 & ~current_umask())
        os.rename(part, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise


def _make(target: Writable, compressed: bool, level: int, threads: int) -> FramedOutput:
    if compressed:
        return FramedOutput(SeekableZstdOutput(target, level=level, threads=threads),
                            DEFAULT_FRAME_SIZE)
    return FramedOutput(PlainOutput(target), vma.MAX_EXTENT_SIZE)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
