"""Streaming input for archives read from start to end, whatever vzdump compressed them with.

The container is told by its magic bytes, never by the file name: plain VMA, zstd
(any number of frames, skippable ones ignored, like ``zstd -d``), gzip (any number
of members) and lzop (decoded by the ``lzop`` program).  Every decoder reports a
truncated or damaged input as FormatError instead of ending the stream quietly.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import os
import stat
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np
import zstandard

from vmafs.container.zstd_frames import (
    ZSTD_MAGIC,
    FrameInfo,
    ZstdFrameParser,
    entry_mismatch,
    is_skippable_magic,
)
from vmafs.errors import ContainerError, FormatError, VmafsError
from vmafs.format.seektable import (
    ENTRY_SIZE,
    ENTRY_SIZE_CHECKSUMS,
    FOOTER_SIZE,
    SEEKABLE_MAGIC,
    SKIPPABLE_HEADER_SIZE,
    SeekTableFooter,
    check_seek_table_header,
    decode_entries,
    parse_seek_table_footer,
)
from vmafs.store import ObjectStream

if TYPE_CHECKING:
    from concurrent.futures import Future

    from vmafs.container.zstd_source import SeekableZstdSource

CHUNK = 1 << 20
"""Read and buffer size: big sequential reads go in MiB pieces."""
PEEK = 16

VMA_MAGIC = b"VMA\0"
GZIP_MAGIC = b"\x1f\x8b"
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


def detect_container(first_bytes: bytes) -> str:
    """``"vma"``, ``"zstd"``, ``"gzip"`` or ``"lzo"`` from the first (up to 9) bytes."""
    if not first_bytes:
        raise FormatError("empty archive")
    if first_bytes.startswith(VMA_MAGIC):
        return "vma"
    if first_bytes.startswith(ZSTD_MAGIC) or is_skippable_magic(first_bytes):
        return "zstd"
    if first_bytes.startswith(GZIP_MAGIC):
        return "gzip"
    if first_bytes.startswith(LZOP_MAGIC):
        return "lzo"
    raise FormatError(
        "not a vma file - wrong magic number (nor zstd, gzip or lzop compressed; "
        f"starts with {first_bytes[:9].hex()})"
    )


# -- zstd seek table against the frames --------------------------------------------

_ENTRIES_CHUNK = 4096
"""Seek-table entries read at a time: the table is compared piece by piece, never held."""


class _SeekTableCheck:
    """Compares each frame of a seekable zstd file with its seek-table entry as it passes.

    ``zstd -d`` reads the frames and ignores the table; the random-access reader trusts the
    table (checking each frame before its first use).  So that verify, extract and convert
    reject a table the mount would trip over, every frame must match its entry.  Only for
    files (the table is read from the end by pread); a pipe's table is not compared.
    """

    def __init__(self, pread: Callable[[int, int], bytes], name: str, file_size: int,
                 footer: SeekTableFooter) -> None:
        self._pread = pread
        self._name = name
        self._footer = footer
        self.table_start = file_size - footer.table_size
        self._entries_at = self.table_start + SKIPPABLE_HEADER_SIZE
        self._width = ENTRY_SIZE_CHECKSUMS if footer.checksums else ENTRY_SIZE
        self._chunk: list[tuple[int, int]] = []
        self._chunk_first = 0
        self.index = 0
        """Frames compared so far."""
        self.decompressed = 0
        """Their decompressed size, as the table gives it."""
        self._table_seen = False

    @classmethod
    def open(cls, fd: int, name: str) -> _SeekTableCheck | None:
        """The check for a seekable zstd file, None for other files; FormatError for a file
        that ends in a seek-table footer but whose table is malformed."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return cls.open_reader(lambda length, offset: os.pread(fd, length, offset),
                               st.st_size, name)

    @classmethod
    def open_reader(cls, pread: Callable[[int, int], bytes], size: int, name: str
                    ) -> _SeekTableCheck | None:
        """The same for any random-access reader: pread(length, offset), and its size."""
        if size < FOOTER_SIZE:
            return None
        tail = pread(FOOTER_SIZE, size - FOOTER_SIZE)
        if len(tail) != FOOTER_SIZE or int.from_bytes(tail[-4:], "little") != SEEKABLE_MAGIC:
            return None
        try:
            footer = parse_seek_table_footer(tail)
            if footer.table_size > size:
                raise ContainerError(
                    f"seek table of {footer.num_frames} frames is larger than the file"
                )
            check_seek_table_header(
                pread(SKIPPABLE_HEADER_SIZE, size - footer.table_size), footer
            )
        except FormatError as e:
            raise ContainerError(f"{name}: bad zstd seek table: {e}") from None
        return cls(pread, name, size, footer)

    def _entry(self, index: int) -> tuple[int, int]:
        rel = index - self._chunk_first
        if not 0 <= rel < len(self._chunk):
            count = min(_ENTRIES_CHUNK, self._footer.num_frames - index)
            at = self._entries_at + index * self._width
            data = self._pread(count * self._width, at)
            self._chunk = decode_entries(data, self._footer.checksums)
            self._chunk_first = index
            rel = 0
            if len(self._chunk) < count:
                raise ContainerError(f"{self._name}: short read in the zstd seek table at {at}")
        return self._chunk[rel]

    def _mismatch(self, problem: str) -> FormatError:
        return FormatError(
            f"{self._name}: zstd seek table does not describe the frames "
            f"(entry {self.index}: {problem})"
        )

    def frame(self, info: FrameInfo) -> None:
        """The next frame of the file, as the frame walker saw it."""
        if info.start == self.table_start and self.index == self._footer.num_frames:
            self._table_seen = True  # the table itself: the file's last frame
            return
        if self.index >= self._footer.num_frames or info.start >= self.table_start:
            raise self._mismatch(
                f"the table lists {self._footer.num_frames} frames, another starts at "
                f"{info.start}"
            )
        c_size, d_size = self._entry(self.index)
        problem = entry_mismatch(info, c_size, d_size)
        if problem is not None:
            raise self._mismatch(problem)
        self.index += 1
        self.decompressed += d_size

    def check_output(self, decompressed: int) -> None:
        """The decoder, behind the walker, cannot have output more than the entries of the
        frames the walker has entered: a frame expanding past its entry stops here."""
        limit = self.decompressed
        if self.index < self._footer.num_frames:
            limit += self._entry(self.index)[1]
        if decompressed > limit:
            raise self._mismatch("its frame holds more than the entry's bytes")

    def finish(self, decompressed: int) -> None:
        """At the end of the input, after ``decompressed`` bytes of output."""
        if not self._table_seen:
            raise self._mismatch(
                f"the table lists {self._footer.num_frames} frames, the file has {self.index}"
            )
        if decompressed != self.decompressed:
            raise ContainerError(
                f"{self._name}: zstd seek table does not describe the frames (they hold "
                f"{decompressed} bytes, the table {self.decompressed})"
            )


# -- raw decoders ------------------------------------------------------------------


class _PrefixedRaw(io.RawIOBase):
    """Bytes already peeked from a pipe, then the rest of the pipe."""

    def __init__(self, prefix: bytes, raw: io.RawIOBase) -> None:
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(b) or 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _CheckedSource:
    """Feeds what the zstd reader reads through the frame walker (and the seek-table check)."""

    def __init__(self, raw: io.RawIOBase, table: _SeekTableCheck | None = None, *,
                 reuse: bool = False) -> None:
        self._raw = raw
        self.table = table
        self.checker = ZstdFrameParser(table.frame if table is not None else None)
        self.at_eof = False
        # reuse: read into two buffers in turn, not new bytes each time (a remote stream's
        # read() copies twice, through a new bytearray); the decoder is done with the last
        # read before it asks for the next. (A file's read() is one copy: a local .vma.zst
        # verified with reused buffers took 1.2x the reader's CPU, bench_verify, 2 runs.)
        self._buffers = [bytearray(), bytearray()] if reuse else None

    def read(self, size: int = CHUNK) -> bytes | memoryview:
        if self._buffers is None:
            return self._fed(self._raw.read(size) or b"")
        buffer = self._buffers.pop(0)
        self._buffers.append(buffer)
        if len(buffer) < size:
            buffer[:] = bytes(size)
        return self._fed(memoryview(buffer)[:self._raw.readinto(memoryview(buffer)[:size]) or 0])

    def _fed(self, data: bytes | memoryview) -> bytes | memoryview:
        """data, through the frame walker (the end of the input if empty)."""
        if data:
            self.checker.feed(data)
        else:
            self.at_eof = True
            self.checker.finish()
        return data


class _ZstdRaw(io.RawIOBase):
    def __init__(self, raw: io.RawIOBase, table: _SeekTableCheck | None = None, *,
                 reuse: bool = False) -> None:
        self._raw = raw
        self._source = _CheckedSource(raw, table, reuse=reuse)
        self._out = 0
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, self._source), read_size=CHUNK, read_across_frames=True, closefd=False
        )

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        if not len(b):
            return 0
        try:
            n: int = self._reader.readinto(b)
        except zstandard.ZstdError as e:
            raise ContainerError(
                f"zstd stream damaged near offset {self._source.checker.offset}: {e}"
            ) from None
        # If the decoder stopped before its source did, anything left is junk.
        if n == 0 and not self._source.at_eof and self._source.read(CHUNK):
            raise ContainerError("zstd stream: data after the last frame")
        self._out += n
        table = self._source.table
        if table is not None:
            if n:
                table.check_output(self._out)
            else:
                table.finish(self._out)
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
            self._raw.close()
        super().close()


FRAMES_AHEAD = 16 << 20
"""Decompressed bytes of frames decoded ahead of the reader (8 frames of the default size)."""
FRAMES_QUEUED = 16
"""And at most this many frames (small frames, from other writers)."""
DECODERS = 2
"""Worker threads decoding frames: zstandard's decompress and pread release the GIL."""
STORED_SHARE = 0.9
"""A file whose frames take at least this share of their content's bytes is mostly stored
blocks (incompressible data): decoding it is a copy, which costs the reader's thread less than
a worker's hand-off, its second copy and its buffers' page faults (verify of a 1 GiB image half
random data, half holes: 0.39 s CPU with the workers, 0.22 s in line; on 2 cores 0.90x of one)."""


def _spare_core() -> bool:
    """Whether decoding frames in worker threads can pay: only with a core to spare. On one
    CPU the workers would take turns with the reader; on a saturated machine every frame's
    handoff waits for a CPU (verify of 1 GiB of .vma.zst at load 9 on 2 cores: 1.9 s with
    workers, 1.1 s in line, median of 5 interleaved runs)."""
    cores = len(os.sched_getaffinity(0))
    return cores > 1 and os.getloadavg()[0] <= cores - 1


class _FramesRaw(io.RawIOBase):
    """A seekable zstd file's stream, its frames decoded by worker threads ahead of the reader,
    so decoding overlaps what the reader does with the bytes (verify hashes them).

    Frames are independent, and SeekableZstdSource proves each entry holds exactly its one
    frame before decoding it (empty entries included), and the table that the entries fill
    the file before it: the bytes are ``zstd -d``'s. A frame's error is raised when the
    reader reaches that frame, after every byte before it. Decoding ahead starts at one frame
    and grows with what was read (list and config read only the header). Frames are decoded
    into buffers the reader hands back (fresh ones cost a page fault per 4 KiB)."""

    def __init__(self, raw: io.RawIOBase, source: SeekableZstdSource) -> None:
        self._raw = raw
        self._source = source
        self._sizes = np.diff(source.table.d_offsets).tolist()
        from concurrent.futures import ThreadPoolExecutor  # 3 ms (logging) most commands skip

        self._pool = ThreadPoolExecutor(
            DECODERS, thread_name_prefix="vmafs-unzstd")
        self._queue: collections.deque[
            tuple[int, Future[tuple[bytearray, int]]]] = collections.deque()
        self._free: collections.deque[bytearray] = collections.deque()  # appends are atomic
        self._next = 0      # the next frame to hand to a worker
        self._ahead = 0     # decompressed bytes of the frames queued
        self._read = 0      # bytes handed to the reader
        self._buffer = bytearray()
        self._frame = memoryview(self._buffer)
        self._pos = 0

    @classmethod
    def open(cls, raw: io.FileIO, name: str) -> _FramesRaw | None:
        """The frame-parallel stream of a seekable zstd file whose table holds (frames of at
        most MAX_FRAME_SIZE that fill the file) and whose frames compress (STORED_SHARE); None
        for any other, which the one-thread decoder then reads and judges as before."""
        from vmafs.container.zstd_source import SeekableZstdSource  # it imports this module

        try:
            source = SeekableZstdSource(raw.fileno(), closefd=False, name=name)
        except VmafsError:
            return None
        finally:
            raw.seek(0)  # opening it sought to the end
        table = source.table
        if int(table.c_offsets[-1]) >= STORED_SHARE * int(table.d_offsets[-1]):
            source.close()
            return None
        return cls(raw, source)

    def readable(self) -> bool:
        return True

    def _decode(self, index: int, size: int) -> tuple[bytearray, int]:
        """In a worker: frame ``index`` into a free buffer that fits it (not one far larger:
        memory follows the frames in flight)."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = bytearray()
        if not size <= len(buf) <= 2 * size + (1 << 20):
            buf = bytearray(size)
        return buf, self._source.read_frame_into(index, buf)

    def _fill(self) -> None:
        limit = min(FRAMES_AHEAD, max(self._read, 1))
        sizes = self._sizes
        while self._next < len(sizes) and (not self._queue or (
                self._ahead < limit and len(self._queue) < FRAMES_QUEUED)):
            size = sizes[self._next]
            self._queue.append((size, self._pool.submit(self._decode, self._next, size)))
            self._ahead += size
            self._next += 1

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        want = len(b)
        if not want:
            return 0
        while self._pos == len(self._frame):
            self._fill()
            if not self._queue:
                return 0
            size, future = self._queue.popleft()
            self._ahead -= size
            self._fill()  # the workers go on while this frame is waited for and read
            self._frame.release()
            if self._buffer:
                self._free.append(self._buffer)
            self._buffer = bytearray()
            self._buffer, n = future.result()
            self._frame = memoryview(self._buffer)[:n]
            self._pos = 0
        n = min(want, len(self._frame) - self._pos)
        b[:n] = self._frame[self._pos:self._pos + n]
        self._pos += n
        self._read += n
        return n

    def close(self) -> None:
        if not self.closed:
            for _, future in self._queue:
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._queue.clear()
            self._free.clear()
            self._frame.release()
            self._source.close()
            self._raw.close()
        super().close()


class _GzipRaw(io.RawIOBase):
    """Multi-member gzip via zlib, output bounded per call (no zip-bomb buffers)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(31)
        self._tail = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def _read_input(self) -> bytes:
        data = self._raw.read(CHUNK) or b""
        self._offset += len(data)
        return data

    def _expect_zero_padding(self, rest: bytes) -> None:
        """Zero bytes after the last member are tape padding (``gzip -d`` accepts them too)."""
        while rest:
            if rest.count(0) != len(rest):
                raise ContainerError("gzip stream: data after the last member")
            rest = self._read_input()

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        want = len(b)
        if not want:
            return 0
        while True:
            if self._d.eof:
                rest = self._d.unused_data or self._read_input()
                if not rest:
                    return 0
                if len(rest) < 2:
                    rest += self._read_input()
                if rest[:2] != GZIP_MAGIC:
                    self._expect_zero_padding(rest)
                    return 0
                self._d = zlib.decompressobj(31)
                self._tail = rest
            if not self._tail:
                self._tail = self._read_input()
                if not self._tail:
                    raise ContainerError(f"gzip stream truncated at {self._offset} bytes")
            try:
                out = self._d.decompress(self._tail, want)
            except zlib.error as e:
                raise ContainerError(
                    f"gzip stream damaged before offset {self._offset}: {e}"
                ) from None
            self._tail = self._d.unconsumed_tail
            if out:
                b[: len(out)] = out
                return len(out)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _LzopRaw(io.RawIOBase):
    """``lzop -dc`` as a subprocess; its exit status is checked at end of output."""

    def __init__(self, raw: io.RawIOBase, direct_fd: int | None) -> None:
        self._raw = raw
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        try:
            self._proc = subprocess.Popen(
                ["lzop", "-dc"],
                stdin=direct_fd if direct_fd is not None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
            )
        except FileNotFoundError:
            self._stderr.close()
            raise VmafsError(
                "reading a .lzo archive needs the lzop program (apt install lzop)"
            ) from None
        if direct_fd is None:
            self._feeder = threading.Thread(target=self._feed, name="vmafs-lzop-feed", daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while data := self._raw.read(CHUNK):
                stdin.write(data)
        except BrokenPipeError:
            pass  # lzop stopped early; its exit status says why
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self._feed_error = e
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
            self._raw.close()  # the feeder owns the source: no close while it reads

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        if not len(b):
            return 0
        stdout = cast(io.FileIO, self._proc.stdout)  # bufsize=0: unbuffered
        n = stdout.readinto(b)
        if n:
            return n
        rc = self._proc.wait()
        if rc == 0 and self._feeder is not None:
            self._feeder.join()  # lzop saw the end of its input: the feeder is done
        if self._feed_error is not None:
            raise self._feed_error
        if rc != 0:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else "no message"
            raise ContainerError(f"lzop stream damaged: lzop -dc exited {rc}: {detail}")
        return 0

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:
                self._proc.kill()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc.wait()
            if self._feeder is not None:
                # It may still wait for input from a pipe; it is a daemon and closes
                # the source itself when it ends.
                self._feeder.join(timeout=1.0)
            else:
                self._raw.close()
            self._stderr.close()
        super().close()


# -- entry point ---------------------------------------------------------------------


def _peek(raw: io.RawIOBase) -> bytes:
    head = b""
    while len(head) < PEEK:
        data = raw.read(PEEK - len(head))
        if not data:
            break
        head += data
    return head


def _open_file(path: str | os.PathLike[str]) -> io.FileIO:
    """Open for reading without blocking on a FIFO that has no writer (it then reads as
    empty); reads block as usual."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return open(fd, "rb", buffering=0)  # noqa: SIM115 - returned
    except BaseException:
        os.close(fd)
        raise


def open_stream(path: str | os.PathLike[str]) -> BinaryIO:
    """The archive's VMA stream, decompressed as needed; ``"-"`` reads standard input.

    A seekable zstd file's seek table is compared with its frames as they pass: a table
    that does not describe them is a FormatError, reported at the frame that differs.
    """
    from vmafs.store import is_remote

    if is_remote(os.fspath(path)):
        return _open_remote_stream(os.fspath(path))
    if os.fspath(path) == "-":
        raw: io.RawIOBase = open(  # noqa: SIM115 - returned
            sys.stdin.fileno(), "rb", buffering=0, closefd=False
        )
        name = "standard input"
        stdin = True
    else:
        try:
            raw = _open_file(path)
        except OSError as e:
            raise VmafsError(f"cannot open {os.fspath(path)}: {e.strerror}") from None
        name = os.fspath(path)
        stdin = False
    try:
        head = _peek(raw)
        try:
            kind = detect_container(head)
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None
        direct_fd: int | None = None
        stdin_pipe = False
        if raw.seekable():
            raw.seek(0)
            source: io.RawIOBase = raw
            direct_fd = raw.fileno()
        else:
            source = _PrefixedRaw(head, raw)
            stdin_pipe = stdin
        decoded: io.RawIOBase
        if kind == "vma":
            decoded = source
        elif kind == "zstd":
            table = _SeekTableCheck.open(direct_fd, name) if direct_fd is not None else None
            frames = (_FramesRaw.open(cast(io.FileIO, raw), name)
                      if table is not None and _spare_core() else None)
            decoded = frames if frames is not None else _ZstdRaw(source, table)
        elif kind == "gzip":
            decoded = _GzipRaw(source)
        else:
            decoded = _LzopRaw(source, direct_fd)
    except BaseException:
        raw.close()
        raise
    return (_StdinPipe if stdin_pipe else io.BufferedReader)(decoded, buffer_size=CHUNK)


class _StdinPipe(io.BufferedReader):
    """Standard input from a pipe: a read may wait for good on an idle producer, so a reader
    thread in one is not waited for when a command leaves early (walk._read_ahead), and
    closing releases nothing (the descriptor stays open) rather than wait for that read."""

    idle_may_block = True

    def close(self) -> None:
        pass


HEADERS_BUFFER = 64 << 10
"""A remote stream's buffer: the extent headers (with a data extent's block sums, ~11 of 512
bytes) come through it, the data straight into the reader's buffers (a buffer of CHUNK
copied each extent's first MiB once more)."""


class _AheadReader(io.BufferedReader):
    """A buffered stream that says how far ahead its reader should keep buffers of its own
    (read_ahead_bytes; 0: no need, something under it reads ahead)."""

    read_ahead_bytes = 0


def _open_remote_stream(location: str) -> BinaryIO:
    """A stored archive (s3://, https://) from start to end: ranged requests kept in flight
    ahead of the reader; a seekable zstd file's table is read from the tail and compared."""
    from vmafs.store import store_for
    from vmafs.store.ranged import RangedObject

    obj = store_for(location).open(location)
    try:
        head = obj.read(0, PEEK)
        try:
            kind = detect_container(head)
        except FormatError as e:
            raise FormatError(f"{obj.name}: {e}") from None
        # plain or zstd: read (and decoded) by the walk's reader thread, straight into its
        # buffers, which it keeps ahead; no thread of the stream's own
        direct = isinstance(obj, RangedObject) and kind in ("vma", "zstd")
        raw = (obj.stream(direct=direct) if isinstance(obj, RangedObject)
               else ObjectStream(obj))
        decoded: io.RawIOBase
        if kind == "vma":
            decoded = raw
        elif kind == "zstd":
            table = _SeekTableCheck.open_reader(
                lambda length, offset: obj.read(offset, length), obj.size, obj.name)
            decoded = _ZstdRaw(raw, table, reuse=direct)
        elif kind == "gzip":
            decoded = _GzipRaw(raw)
        else:
            decoded = _LzopRaw(raw, None)
    except BaseException:
        obj.close()
        raise
    reader = _AheadReader(decoded, buffer_size=HEADERS_BUFFER if direct else CHUNK)
    reader.read_ahead_bytes = getattr(raw, "READ_AHEAD_BYTES", 0)
    return reader
