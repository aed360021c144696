"""Streaming input for archives read from start to end, whatever vzdump compressed them with.

The container is told by its magic bytes, never by the file name: plain VMA, zstd
(any number of frames, skippable ones ignored, like ``zstd -d``), gzip (any number
of members) and lzop (decoded by the ``lzop`` program).  Every decoder reports a
truncated or damaged input as FormatError instead of ending the stream quietly.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import zlib
from typing import BinaryIO, cast

import zstandard

from vmafs.errors import FormatError, VmafsError

CHUNK = 1 << 20
"""Read and buffer size: big sequential reads go in MiB pieces."""
PEEK = 16

VMA_MAGIC = b"VMA\0"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


def _is_skippable(head: bytes | bytearray | memoryview) -> bool:
    return len(head) >= 4 and head[0] & 0xF0 == 0x50 and bytes(head[1:4]) == b"\x2a\x4d\x18"


def detect_container(first_bytes: bytes) -> str:
    """``"vma"``, ``"zstd"``, ``"gzip"`` or ``"lzo"`` from the first (up to 9) bytes."""
    if not first_bytes:
        raise FormatError("empty archive")
    if first_bytes.startswith(VMA_MAGIC):
        return "vma"
    if first_bytes.startswith(ZSTD_MAGIC) or _is_skippable(first_bytes):
        return "zstd"
    if first_bytes.startswith(GZIP_MAGIC):
        return "gzip"
    if first_bytes.startswith(LZOP_MAGIC):
        return "lzo"
    raise FormatError(
        "not a vma file - wrong magic number (nor zstd, gzip or lzop compressed; "
        f"starts with {first_bytes[:9].hex()})"
    )


# -- zstd frame structure (pure) ---------------------------------------------------

_MAGIC, _SKIP_SIZE, _FHD, _BLOCK = range(4)
_HEADER_NEED = {_MAGIC: 4, _SKIP_SIZE: 4, _FHD: 1, _BLOCK: 3}
_BLOCK_SIZE_MAX = 128 << 10


class ZstdFrameChecker:
    """Follows zstd frame and block headers of a byte stream, without decompressing.

    python-zstandard's stream reader ends quietly when its input stops in the middle
    of a frame; this walker, fed the same bytes, knows whether the input ended
    exactly at a frame boundary.  Costs one small header parse per block.
    """

    def __init__(self) -> None:
        self._state = _MAGIC
        self._hdr = bytearray()
        self._skip = 0
        self._checksum = False
        self.offset = 0
        """Bytes consumed so far."""
        self.frames = 0
        """Complete frames (skippable ones included) seen so far."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        end = len(view)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                pos += n
                self._skip -= n
                continue
            need = _HEADER_NEED[self._state] - len(self._hdr)
            take = min(need, end - pos)
            self._hdr += view[pos : pos + take]
            pos += take
            if take == need:
                self._header(bytes(self._hdr), self.offset + pos - len(self._hdr))
                self._hdr.clear()
        self.offset += end

    def _header(self, hdr: bytes, at: int) -> None:
        state = self._state
        if state == _MAGIC:
            if hdr == ZSTD_MAGIC:
                self._state = _FHD
            elif _is_skippable(hdr):
                self._state = _SKIP_SIZE
            else:
                raise FormatError(f"zstd stream: unknown frame magic {hdr.hex()} at offset {at}")
        elif state == _SKIP_SIZE:
            self._skip = int.from_bytes(hdr, "little")
            self._state = _MAGIC
            self.frames += 1
        elif state == _FHD:
            fhd = hdr[0]
            if fhd & 0x08:
                raise FormatError(f"zstd stream: reserved bit set in frame header at offset {at}")
            single_segment = bool(fhd & 0x20)
            fcs_flag = fhd >> 6
            fcs_bytes = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
            self._skip = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + fcs_bytes
            self._checksum = bool(fhd & 0x04)
            self._state = _BLOCK
        else:
            value = int.from_bytes(hdr, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise FormatError(f"zstd stream: reserved block type at offset {at}")
            if size > _BLOCK_SIZE_MAX:
                raise FormatError(f"zstd stream: block of {size} bytes at offset {at}")
            self._skip = 1 if kind == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self._state = _MAGIC
                self.frames += 1

    def finish(self) -> None:
        """Raise FormatError unless the input ended right after a complete frame."""
        if self._state != _MAGIC or self._hdr or self._skip:
            raise FormatError(f"zstd stream truncated: input ends inside a frame at {self.offset}")
        if not self.frames:
            raise FormatError("zstd stream holds no frame")


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
    """Feeds what the zstd reader reads through a ZstdFrameChecker."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self.checker = ZstdFrameChecker()
        self.at_eof = False

    def read(self, size: int = CHUNK) -> bytes:
        data = self._raw.read(size) or b""
        if data:
            self.checker.feed(data)
        else:
            self.at_eof = True
            self.checker.finish()
        return data


class _ZstdRaw(io.RawIOBase):
    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self._source = _CheckedSource(raw)
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
            raise FormatError(
                f"zstd stream damaged near offset {self._source.checker.offset}: {e}"
            ) from None
        # If the decoder stopped before its source did, anything left is junk.
        if n == 0 and not self._source.at_eof and self._source.read(CHUNK):
            raise FormatError("zstd stream: data after the last frame")
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
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
                raise FormatError("gzip stream: data after the last member")
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
                    raise FormatError(f"gzip stream truncated at {self._offset} bytes")
            try:
                out = self._d.decompress(self._tail, want)
            except zlib.error as e:
                raise FormatError(
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
            raise FormatError(f"lzop stream damaged: lzop -dc exited {rc}: {detail}")
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


def open_stream(path: str | os.PathLike[str]) -> BinaryIO:
    """The archive's VMA stream, decompressed as needed; ``"-"`` reads standard input."""
    if os.fspath(path) == "-":
        raw: io.RawIOBase = open(  # noqa: SIM115 - returned
            sys.stdin.fileno(), "rb", buffering=0, closefd=False
        )
        name = "standard input"
    else:
        try:
            raw = open(path, "rb", buffering=0)  # noqa: SIM115 - returned
        except OSError as e:
            raise VmafsError(f"cannot open {os.fspath(path)}: {e.strerror}") from None
        name = os.fspath(path)
    try:
        head = _peek(raw)
        try:
            kind = detect_container(head)
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None
        direct_fd: int | None = None
        if raw.seekable():
            raw.seek(0)
            source: io.RawIOBase = raw
            direct_fd = raw.fileno()
        else:
            source = _PrefixedRaw(head, raw)
        decoded: io.RawIOBase
        if kind == "vma":
            decoded = source
        elif kind == "zstd":
            decoded = _ZstdRaw(source)
        elif kind == "gzip":
            decoded = _GzipRaw(source)
        else:
            decoded = _LzopRaw(source, direct_fd)
    except BaseException:
        raw.close()
        raise
    return io.BufferedReader(decoded, buffer_size=CHUNK)
