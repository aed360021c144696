"""Random access into the decompressed stream of a seekable ``.vma.zst``.

Reading any byte decompresses only the frame that holds it.  All file reads use
``os.pread`` (no shared file position), decompressors are per thread, and the
frame cache has its own lock, so every method is safe to call from worker
threads, e.g. a read-ahead pipeline running ``frame(i + 1)`` while ``frame(i)``
is being served.

The seek table is trusted only as far as the frames bear it out, so that this
reader and ``zstd -d`` read the same stream: before a frame is first used, its
entry's compressed range must hold exactly one complete frame (a skippable one
for an empty entry) whose Frame_Content_Size is the entry's decompressed size
(see ``_check_frame``), and no frame is ever decompressed past that size or
MAX_FRAME_SIZE, whichever is smaller.  One exception, for an object in a store whose
reader checks every cluster against the index: a small first read of a frame checks its
header and decodes a prefix (read_prefix), so it fetches part of the frame, not all.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from types import TracebackType
from typing import IO, cast

import numpy as np
import zstandard

from vmafs.buffers import address
from vmafs.container.source import open_file
from vmafs.container.zstd_frames import (
    BLOCK_SIZE_MAX,
    ZSTD_MAGIC,
    decode_frame_header,
    entry_mismatch,
    is_skippable_magic,
    walk_frame,
)
from vmafs.errors import ContainerError, FormatError, NotSeekableError
from vmafs.format.seektable import (
    FOOTER_SIZE,
    SEEKABLE_MAGIC,
    SeekTable,
    decode_seek_table,
    parse_seek_table_footer,
)
from vmafs.lru import ByteLRU
from vmafs.store import StoredObject
from vmafs.store.local import LocalObject

DEFAULT_CACHE_BYTES = 16 << 20  # 10 frames of the default size (1.5 MiB)
# With checked_by_reader set, a read of at most this many bytes from a frame not in the cache
# decompresses the frame only up to the read's end: a random 4 KiB read then costs half a frame
# of disk reads on average, not a whole one.
PREFIX_READ_MAX = 256 << 10
# Compressed bytes read past the proportional guess: one zstd block (<= 128 KiB) and its header.
PREFIX_SLACK = (128 << 10) + 64
# Whole frames read in file order get this many compressed bytes requested ahead of them.
PREFETCH = 8 << 20
# check_frames walks every frame's block headers in spans of this many bytes, each requested
# ahead as a whole, CHECK_THREADS spans at once.
CHECK_AHEAD = 32 << 20
CHECK_THREADS = 4
MAX_FRAME_SIZE = 32 << 20
"""Largest frame (decompressed) read for random access; a table listing a larger one is refused.

A frame is decompressed whole, so each reading thread holds one (a mount runs two workers and
its own thread, beside a 16 MiB cache): 32 MiB keeps that near 100 MiB, well inside a 256 MiB
budget, where the format's own 2 GiB limit would cost 2 GiB per thread.  vmafs writes frames of
1.5 MiB (2 MiB, 3 MiB and 512 KiB before) plus at most one extent (< 6.7 MiB); other seekable
writers use a few MiB."""
MAX_FRAME_COMPRESSED = MAX_FRAME_SIZE + 3 * (MAX_FRAME_SIZE // BLOCK_SIZE_MAX) + 64
"""A frame of MAX_FRAME_SIZE stored raw: its header, block headers and checksum."""
COLD_READ_MAX = 64 << 10
"""Local reads of more compressed bytes than this are announced first (POSIX_FADV_WILLNEED)."""
FEED_PIECE = 64 << 10
"""Compressed bytes a local prefix read hands the decoder at a time, and asks the disk for in
one request (POSIX_FADV_WILLNEED): a request's pages arrive together, so piece by piece the
decoder starts on the first after 0.12 ms cold on this VM's disk, where a whole 700 KB frame
asked for at once took 0.6 ms to its first byte. 64 and 128 KiB measured alike, 256 KiB
slower."""
FEED_AHEAD = 2 * FEED_PIECE
"""A prefix read that goes past its guess keeps the disk this far ahead of the decoder."""
_REUSE_MAX = 8 << 20
"""Compressed frames up to this size are read into a per-thread buffer kept for the next."""
_UNCHECKED, _SIZED, _UNSIZED, _SKIPPABLE = range(4)
"""Per-frame state: what _check_frame found (once per frame)."""
STREAM_FRAMES = 2
"""Frames pread_stream keeps per file for the next call (it goes through the file in order)."""
_THREAD = threading.local()
"""Each thread's decompressor and compressed-frame buffer, shared by every file it reads: a
merge reads a chain's layers (up to 256 files) with each of its reader threads."""


class _Direct:
    """libzstd's buffer-less decoder (ZSTD_decompressContinue, through ctypes), for prefixes:
    each block is decoded straight into the caller's buffer, where python-zstandard's stream
    reader decodes into its own window and copies out, and the content checksum is not
    hashed (ZSTD_d_forceIgnoreChecksum), which a prefix never reaches anyway: its bytes are
    checked by the reader (checked_by_reader).  Decoding half a 1.5 MiB frame of the /usr
    image's default .vma.zst: 0.87x the CPU time of the stream reader, the same bytes.
    ``lib`` is None where the system has no libzstd.so.1 (>= 1.4.7, < 2): prefixes are then
    decoded by the stream reader."""

    IGNORE_CHECKSUM = 1002  # ZSTD_d_forceIgnoreChecksum (ZSTD_d_experimentalParam3)
    lib: ctypes.CDLL | None = None
    loaded = False

    @classmethod
    def load(cls) -> ctypes.CDLL | None:
        """The library, loaded at the first prefix read (a command that decodes none pays
        nothing at start); None if it is missing or of another major version."""
        if cls.loaded:
            return cls.lib
        cls.loaded = True
        try:
            lib = ctypes.CDLL("libzstd.so.1")
            lib.ZSTD_versionNumber.restype = ctypes.c_uint
            if not 10407 <= lib.ZSTD_versionNumber() < 20000:
                return None
            vp, size = ctypes.c_void_p, ctypes.c_size_t
            for name, res, args in (
                    ("ZSTD_createDCtx", vp, []), ("ZSTD_freeDCtx", size, [vp]),
                    ("ZSTD_DCtx_setParameter", size, [vp, ctypes.c_int, ctypes.c_int]),
                    ("ZSTD_decompressBegin", size, [vp]),
                    ("ZSTD_nextSrcSizeToDecompress", size, [vp]),
                    ("ZSTD_decompressContinue", size, [vp, vp, size, vp, size]),
                    ("ZSTD_isError", ctypes.c_uint, [size])):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except (OSError, AttributeError):
            return None
        cls.lib = lib
        return lib

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._dctx = lib.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("ZSTD_createDCtx")
        lib.ZSTD_DCtx_setParameter(self._dctx, self.IGNORE_CHECKSUM, 1)  # hashed if refused

    def __del__(self) -> None:  # the thread's local storage is dropped when the thread ends
        self._lib.ZSTD_freeDCtx(self._dctx)

    def prefix(self, feed: _FrameFeed, out: memoryview, need: int) -> int:
        """Decode ``feed``'s frame into ``out`` block by block until at least ``need`` bytes
        are out (the last block whole, if ``out`` has room for it): the bytes written, or -1
        if the frame is cut short or zstd finds an error (the caller reads it the slow way,
        which says what)."""
        lib, dctx = self._lib, self._dctx
        src = address(feed.buf)
        dst = address(out)
        room = len(out)
        if zstd_error(lib, lib.ZSTD_decompressBegin(dctx)):
            return -1
        got = pos = 0
        while got < need:
            n = lib.ZSTD_nextSrcSizeToDecompress(dctx)
            if not n:
                break  # the frame ended before need: the caller finds it short
            if pos + n > feed.pos:
                feed.fill(max(FEED_PIECE, pos + n - feed.pos))
                if pos + n > feed.pos:
                    return -1
            r = lib.ZSTD_decompressContinue(dctx, dst + got, room - got, src + pos, n)
            if zstd_error(lib, r):
                return -1
            pos += n
            got += r
        return got


def zstd_error(lib: ctypes.CDLL, code: int) -> bool:
    return bool(lib.ZSTD_isError(code))


def _direct() -> _Direct | None:
    """This thread's buffer-less decoder, None without libzstd (see _Direct)."""
    direct: _Direct | None = getattr(_THREAD, "direct", None)
    if direct is None:
        lib = _Direct.load()
        if lib is None:
            return None
        direct = _THREAD.direct = _Direct(lib)
    return direct


def _read_up_to(reader: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    """At most ``n`` bytes from a one-frame reader: fewer only where the frame ends."""
    out: bytes = reader.read(n)
    while len(out) < n:
        more: bytes = reader.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _max_blocks(d_size: int) -> int:
    """Blocks a frame of ``d_size`` bytes may have: encoders write blocks of up to 128 KiB and
    cut smaller ones only at flushes; 1 KiB a block on average bounds the walk's reads."""
    return 16 + d_size // 1024


def _prefix_buffer(length: int) -> memoryview:
    """``length`` bytes of this thread's reused buffer for decoded prefixes (a buffer of their
    own past _REUSE_MAX, as _frame_buffer's): a fresh bytes object per cold read cost a page
    fault per 4 KiB of it."""
    if length > _REUSE_MAX:
        return memoryview(bytearray(length))
    buf: bytearray | None = getattr(_THREAD, "out", None)
    if buf is None or len(buf) < length:
        buf = bytearray(-(-length // (256 << 10)) * (256 << 10))
        _THREAD.out = buf
        _THREAD.prefix = None
    return memoryview(buf)[:length]


def _frame_buffer(length: int) -> memoryview:
    """``length`` bytes of this thread's reused frame buffer (a buffer of their own past
    _REUSE_MAX): valid until the thread's next call, on any file."""
    buf: bytearray | None = getattr(_THREAD, "buf", None)
    if length > _REUSE_MAX:
        buf = bytearray(length)
    elif buf is None or len(buf) < length:
        buf = bytearray(-(-length // (64 << 10)) * (64 << 10))
        _THREAD.buf = buf
    return memoryview(buf)[:length]


class _FrameFeed:
    """A local frame's compressed bytes handed to a zstd stream reader piece by piece as the
    disk delivers them, so that decoding starts after the first piece, not the whole prefix.

    Before the first piece is waited for, the disk is asked (POSIX_FADV_WILLNEED) for the
    bytes the read is expected to take (``want``), one request per FEED_PIECE, so each piece
    arrives on its own; a read that goes past them keeps FEED_AHEAD bytes asked ahead.  The
    disk reads ~3x faster than zstd consumes compressed bytes, so the decoder seldom waits,
    and no more of the frame is read than the read decodes (the tail, which a frame not yet
    checked needs, is asked for by the caller).  ``asked``: bytes already asked (will_need).
    ``buf`` holds what has been read, ``pos`` bytes of it.
    """

    def __init__(self, raw: StoredObject, start: int, size: int, name: str, want: int = 0,
                 asked: int = 0) -> None:
        self._raw = raw
        self._start = start
        self._name = name
        self.buf = _frame_buffer(size)
        self.pos = 0
        self._given = 0
        self._asked = asked
        self._want = want  # compressed bytes the read is expected to take

    def ask(self, end: int, piece: int = FEED_PIECE) -> None:
        """Have the disk read the frame's bytes up to ``end`` (relative) in the background, in
        requests of ``piece`` bytes."""
        end = min(end, len(self.buf))
        while self._asked < end:
            n = min(piece, end - self._asked)
            self._raw.advise(self._start + self._asked, n)
            self._asked += n

    def fill(self, n: int) -> memoryview:
        """Read the next ``n`` bytes of the frame from the disk (fewer at its end)."""
        pos = self.pos
        end = min(len(self.buf), pos + n)
        if end <= pos:
            return self.buf[:0]
        self.ask(max(end, self._want, pos + FEED_AHEAD) if pos else max(end, self._want))
        got = self._raw.readinto(self._start + pos, self.buf[pos:end])
        if got != end - pos:
            raise ContainerError(
                f"{self._name}: short read at {self._start + pos}: {got} of {end - pos} bytes "
                "(file changed while open?)"
            )
        self.pos = end
        return self.buf[pos:end]

    def read(self, n: int = -1) -> memoryview:
        """The next ``n`` bytes not yet handed over, read first if need be: what zstd's
        reader calls."""
        if n < 0:
            n = len(self.buf)
        if self._given == self.pos:
            self.fill(n)
        end = min(self.pos, self._given + n)
        view = self.buf[self._given:end]
        self._given = end
        return view


class SeekableZstdSource:
    """A seekable zstd file, read by decompressed offset."""

    def __init__(
        self,
        file: str | os.PathLike[str] | int | StoredObject,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        closefd: bool = True,
        name: str | None = None,
    ) -> None:
        """Open a path, or take a file descriptor or a stored object (closed by ``close`` if
        ``closefd``).

        If opening fails, a descriptor or object passed in is left open: it is still the
        caller's.
        """
        self._raw: StoredObject
        if isinstance(file, int):
            self._raw = LocalObject(file, name or f"fd {file}", own=False)
            self._own_fd = False
            self.name = name or f"fd {file}"
        elif isinstance(file, (str, os.PathLike)):
            self._raw = LocalObject(open_file(os.fspath(file)), os.fspath(file))
            self._own_fd = True
            self.name = name or os.fspath(file)
        else:
            self._raw = file
            self._own_fd = False
            self.name = name or file.name
        try:
            self.table = self._load_table()
        except BaseException:
            self.close()
            raise
        if closefd and not self._own_fd:
            self._own_fd = True
            if isinstance(self._raw, LocalObject):
                self._raw.own = True
        self._cache: ByteLRU[int] = ByteLRU(cache_bytes)
        self._lock = threading.Lock()
        # pread_stream's frames, apart from the cache: a merge streams every layer of a chain at
        # once, so it holds STREAM_FRAMES frames a layer, not a cache (16 MiB) a layer
        self._stream: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._state = np.zeros(self.table.num_frames, dtype=np.uint8)
        # Off by default: a frame's content checksum is only checked at its end, so a reader
        # may turn this on only if it checks what it reads itself (an indexed archive does).
        self.checked_by_reader = False
        self.remote = not isinstance(self._raw, LocalObject)
        """True when reads may wait on the network (a store's object): never on a trio loop."""
        self._layout_trusted = False  # trust_layout
        self._next_frame = 0  # the frame a reader going through the file in order reads next
        self._ahead = 0  # end of the compressed bytes already requested ahead
        self._token = object()  # this source in a thread's note of its last prefix
        self._told: dict[int, int] = {}  # frame -> its first bytes will_need asked for

    # -- opening --------------------------------------------------------------

    def _pread_exact(self, length: int, offset: int) -> bytes:
        data = self._raw.read(offset, length)
        if len(data) != length:
            raise ContainerError(
                f"{self.name}: short read at {offset}: {len(data)} of {length} bytes "
                "(file changed while open?)"
            )
        return data

    def _pread_frame(self, length: int, offset: int) -> memoryview:
        """Like _pread_exact, into this thread's reused buffer: valid until its next call (on any
        file).

        Spares a fresh allocation, and its page faults, for every frame read.  Frames larger
        than _REUSE_MAX get a buffer of their own, freed with the result.  A store's object
        hands out a view of the chunk it fetched instead (no copy).
        """
        view_of = getattr(self._raw, "view", None) if self.remote else None
        if view_of is not None:
            view = cast(memoryview, view_of(offset, length))
            got = len(view)
        else:
            view = _frame_buffer(length)
            if not self.remote and length > COLD_READ_MAX:
                # asked for at once, the disk reads it in one go: a cold pread of a file's
                # pages waits for them a few at a time (1 MB cold on this 2-core VM: 3.1 ms,
                # so 0.7 ms)
                self._raw.advise(offset, length)
            got = self._raw.readinto(offset, view)
        if got != length:
            raise ContainerError(
                f"{self.name}: short read at {offset}: {got} of {length} bytes "
                "(file changed while open?)"
            )
        return view

    def _not_seekable(self, why: str) -> NotSeekableError:
        return NotSeekableError(
            f"{self.name}: {why}; convert it first: vmafs convert {self.name} OUT.vma.zst"
        )

    def _load_table(self) -> SeekTable:
        if not getattr(self._raw, "regular", True):
            raise self._not_seekable("not a regular file")
        file_size = self._raw.size
        head = self._raw.read(0, 4)
        if head != ZSTD_MAGIC and not is_skippable_magic(head):
            raise ContainerError(f"{self.name}: not a zstd file")
        if file_size < FOOTER_SIZE:
            raise self._not_seekable("no zstd seek table (file too short)")
        tail = self._pread_exact(FOOTER_SIZE, file_size - FOOTER_SIZE)
        if int.from_bytes(tail[-4:], "little") != SEEKABLE_MAGIC:
            raise self._not_seekable("zstd file without a seek table (one-frame, as vzdump writes)")
        try:
            footer = parse_seek_table_footer(tail)
            if footer.table_size > file_size:
                raise ContainerError(
                    f"seek table of {footer.num_frames} frames is larger than the file"
                )
            table_bytes = self._pread_exact(footer.table_size, file_size - footer.table_size)
            table = decode_seek_table(table_bytes, file_size)
        except FormatError as e:
            raise ContainerError(f"{self.name}: bad zstd seek table: {e}") from None
        if table.num_frames:
            d_sizes = np.diff(table.d_offsets)
            c_sizes = np.diff(table.c_offsets)
            big = int(np.argmax(d_sizes))
            if int(d_sizes[big]) > MAX_FRAME_SIZE:
                raise self._not_seekable(
                    f"zstd frame {big} holds {int(d_sizes[big])} bytes, more than the "
                    f"{MAX_FRAME_SIZE} random access decompresses at once"
                )
            big = int(np.argmax(c_sizes))
            if int(c_sizes[big]) > MAX_FRAME_COMPRESSED:
                raise self._not_seekable(
                    f"zstd frame {big} takes {int(c_sizes[big])} compressed bytes, more than "
                    f"a frame of {MAX_FRAME_SIZE} bytes can"
                )
        return table

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

    # -- frame structure ------------------------------------------------------

    def _checked(self, index: int, head: memoryview) -> int:
        """Frame ``index``'s state, checking it (and the empty entries beside it) once.

        Empty entries are never read, but ``zstd -d`` decompresses whatever frame they hold:
        the ones right before a data frame (and after the last) are checked with it.
        """
        state = int(self._state[index])
        if state != _UNCHECKED:
            return state
        state = self._check_frame(index, head)
        d = self.table.d_offsets
        j = index - 1
        while j >= 0 and d[j] == d[j + 1]:
            self._check_empty(j)
            j -= 1
        if d[index + 1] == d[-1]:
            for j in range(index + 1, self.table.num_frames):
                self._check_empty(j)
        self._state[index] = state
        return state

    def check_layout(self) -> None:
        """The ByteSource check: every frame is its seek-table entry (check_frames)."""
        self.check_frames()

    def trust_layout(self) -> None:
        """Every frame was proven to be its entry before (check_layout passed for this file
        unchanged, which the archive model remembers by its identity), so a small first read
        of a frame checks its header, not its block headers to its end: that waited for the
        whole frame from the disk (cold 4 KiB reads of the /usr image's default .vma.zst,
        in-process, 3 runs of 300-400 interleaved at load 5-8: p50 0.92-0.94x)."""
        self._layout_trusted = True

    def check_frames(self) -> None:
        """Check every entry now (a small pread per block of the whole file; once).

        A frame is otherwise checked at its first use, which proves that frame's bytes but
        not its offset: that is ``zstd -d``'s only if every entry before it holds exactly its
        one frame too.  Verify proves that for the whole file (open_stream compares the table
        with the frames); a reader that cannot rely on it calls this.  Frames without a
        content size are decompressed too (one at a time): nothing else proves their size.
        """
        todo = np.flatnonzero(self._state == _UNCHECKED)
        if not len(todo):
            return
        # Spans of CHECK_AHEAD compressed bytes, walked by CHECK_THREADS threads at once: on a
        # cold file the walk waits on the disk, which serves several spans as fast as one.
        span = self.table.c_offsets[todo] // CHECK_AHEAD
        cuts = np.flatnonzero(np.diff(span)) + 1
        spans = [part.tolist() for part in np.split(todo, cuts)]
        if len(spans) == 1:
            self._check_span(spans[0])
            return
        from concurrent.futures import ThreadPoolExecutor  # 3 ms (logging) most reads skip

        with ThreadPoolExecutor(
                CHECK_THREADS, thread_name_prefix="vmafs-check") as pool:
            futures = [pool.submit(self._check_span, part) for part in spans]
            try:
                for future in futures:
                    future.result()  # the first bad entry in file order is the error
            finally:
                for future in futures:
                    future.cancel()

    def _check_span(self, frames: list[int]) -> None:
        """check_frames for these entries (in file order, within CHECK_AHEAD bytes)."""
        c = self.table.c_offsets
        d = self.table.d_offsets
        start = int(c[frames[0]])
        # The block headers (one every <= 128 KiB): the disk reads them in large requests
        # now, instead of one small cold read per block (a cold increment of 29 x 86 MiB:
        # 19,000 reads, seconds).
        self._raw.advise(start, int(c[frames[-1] + 1]) - start)
        empty = memoryview(b"")
        for index in frames:
            if d[index] == d[index + 1]:
                self._check_empty(index)
            elif self._checked(index, empty) == _UNSIZED:
                self.read_frame(index)  # only decompressing tells such a frame's size

    def _check_empty(self, index: int) -> None:
        if self._state[index] != _UNCHECKED:
            return
        state = self._check_frame(index, memoryview(b""))
        if state == _UNSIZED:
            c_start, c_end = self.table.compressed_range(index)
            data = memoryview(self._pread_exact(c_end - c_start, c_start))
            try:
                out = self._decompress_unsized(self._dctx(), data, 0)
            except zstandard.ZstdError as e:
                raise ContainerError(f"{self.name}: frame {index} at {c_start}: {e}") from None
            if out:
                raise self._table_lie(index, f"the frame at {c_start} holds data, the entry none")
        self._state[index] = state

    def _table_lie(self, index: int, problem: str) -> FormatError:
        return FormatError(
            f"{self.name}: zstd seek table does not describe the frames (entry {index}: {problem})"
        )

    def _check_frame(self, index: int, head: memoryview) -> int:
        """Prove that entry ``index`` holds exactly one frame of its listed size.

        ``head`` holds the entry's first compressed bytes (all of them for a whole-frame read);
        block headers past it are read with small preads, block payloads never.  Without this,
        an entry covering two frames but listing one frame's size would make this reader skip
        a frame that ``zstd -d`` decompresses.
        """
        c_start, c_end = self.table.compressed_range(index)
        d_start, d_end = self.table.decompressed_range(index)
        d_size = d_end - d_start
        have = len(head)

        def read(offset: int, length: int) -> bytes | memoryview:
            rel = offset - c_start
            if rel + length <= have:
                return head[rel : rel + length]
            return self._raw.read(offset, length)

        def bad(problem: str) -> FormatError:
            return self._table_lie(index, problem)

        try:
            info, reached = walk_frame(read, c_start, c_end, max_blocks=_max_blocks(d_size))
        except FormatError as e:
            raise bad(str(e).removeprefix("zstd stream: ")) from None
        if info is None:
            raise bad(f"its frame does not end by {c_end}")
        if reached < c_end:
            after = read(reached, 4)
            what = "another frame" if bytes(after) == ZSTD_MAGIC or is_skippable_magic(after) \
                else "other data"
            raise bad(f"{what} follows its frame at {reached}, which zstd -d reads too")
        problem = entry_mismatch(info, c_end - c_start, d_size)
        if problem is not None:
            raise bad(problem)
        if info.skippable:
            return _SKIPPABLE
        if info.dict_id:
            raise ContainerError(f"{self.name}: frame {index} needs zstd dictionary {info.dict_id}")
        window = info.window_size
        if info.content_size is not None:
            window = min(window, info.content_size)
        if window > MAX_FRAME_SIZE:
            raise ContainerError(
                f"{self.name}: frame {index} needs a {window}-byte window, more than the "
                f"{MAX_FRAME_SIZE} random access allows"
            )
        return _SIZED if info.content_size is not None else _UNSIZED

    # -- decompression --------------------------------------------------------

    def read_frame(self, index: int) -> bytes:
        """Decompress frame ``index`` from the file, bypassing the cache (thread-safe)."""
        start, end = self.frame_bounds(index)
        c_start, c_end = self.table.compressed_range(index)
        self._prefetch_after(index, c_end)
        data = self._pread_frame(c_end - c_start, c_start)
        expected = end - start
        state = self._checked(index, data)
        if state == _SKIPPABLE:
            return b""
        dctx = self._dctx()
        try:
            if state == _SIZED:
                # One call, one output allocation of the checked content size (<= the cap);
                # zstd fails if the blocks regenerate more or less than it.
                out: bytes = dctx.decompress(data)
            else:
                out = self._decompress_unsized(dctx, data, expected)
        except zstandard.ZstdError as e:
            raise ContainerError(f"{self.name}: frame {index} at {c_start}: {e}") from None
        if len(out) != expected:
            got = f"{len(out)}" if len(out) <= expected else f"more than {expected}"
            raise self._table_lie(
                index, f"the frame at {c_start} decompresses to {got} bytes, the entry {expected}"
            )
        return out

    def read_frame_into(self, index: int, out: bytearray | memoryview) -> int:
        """Frame ``index`` decoded into ``out`` (at least its size), for a reader that takes
        every entry in order as ``zstd -d`` reads the frames: the bytes written. An empty
        entry is checked (its frame may hold data), a data frame checked as by read_frame.

        Into the caller's buffer, which it reuses: a fresh output per frame, freed by another
        thread, cost page faults on every byte (verify of 1 GiB: 0.5 s system time, not 0.2).
        Thread-safe: a pool of workers decodes the frames ahead of the reader.
        """
        start, end = self.frame_bounds(index)
        expected = end - start
        if not expected:
            self._check_empty(index)
            return 0
        if len(out) < expected:
            raise ValueError(f"a buffer of {len(out)} bytes for a frame of {expected}")
        c_start, c_end = self.table.compressed_range(index)
        self._prefetch_after(index, c_end)
        data = self._pread_frame(c_end - c_start, c_start)
        if self._checked(index, data) != _SIZED:  # frames without a content size, rare
            whole = self.read_frame(index)
            out[:len(whole)] = whole
            return len(whole)
        view = memoryview(out)
        got = 0
        try:
            # The whole frame in one input and room for its content size: zstd decodes it
            # straight into `out` (no window buffer), its checksum checked at its end.
            with self._dctx().stream_reader(data, read_size=len(data),
                                            read_across_frames=False) as reader:
                while got < expected and (n := reader.readinto(view[got:expected])):
                    got += n
                if got == expected and reader.readinto(bytearray(1)):
                    got += 1
        except zstandard.ZstdError as e:
            raise ContainerError(f"{self.name}: frame {index} at {c_start}: {e}") from None
        if got != expected:
            many = f"{got}" if got < expected else f"more than {expected}"
            raise self._table_lie(
                index, f"the frame at {c_start} decompresses to {many} bytes, the entry {expected}"
            )
        return got

    @staticmethod
    def _decompress_unsized(
        dctx: zstandard.ZstdDecompressor, data: memoryview, expected: int
    ) -> bytes:
        """Frames without a content size (other writers): output stops one byte past the
        table's size, so a bomb costs no more than an honest frame; reading to the frame's end
        checks its checksum."""
        with dctx.stream_reader(data, read_size=len(data), read_across_frames=False) as reader:
            return _read_up_to(reader, expected + 1)

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
        self._raw.advise(start, c_end + PREFETCH - start)

    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(_THREAD, "dctx", None)
        if dctx is None:
            # zstd's default window limit, as ``zstd -d``'s: _check_frame bounds what a frame
            # can cost by its window and content size together.
            dctx = zstandard.ZstdDecompressor()
            _THREAD.dctx = dctx
        return dctx

    def read_prefix(self, index: int, need: int) -> bytes:
        """At least the first ``need`` decompressed bytes of frame ``index`` (not cached).

        A local frame is decoded as its compressed bytes arrive (_stream_prefix).  In a store,
        the compressed bytes are read in proportion to ``need``, plus a block's worth, and
        decompressed as a stream, never past ``need``; only if that falls short is the whole
        frame read.  The frame's checksum is not checked unless ``need`` takes all of it;
        a frame without a content size is always decompressed whole.
        """
        start, end = self.frame_bounds(index)
        need = min(need, end - start)
        if not self.remote and need < end - start:
            fed = self._stream_prefix(index, need)
            if fed is not None:
                return bytes(fed)
        return self._read_prefix(index, need)

    def _read_prefix(self, index: int, need: int) -> bytes:
        """read_prefix by reading the compressed bytes first (a store's frame; a local one
        that _stream_prefix declined)."""
        start, end = self.frame_bounds(index)
        need = min(need, end - start)
        c_start, c_end = self.table.compressed_range(index)
        c_size = c_end - c_start
        guess = self._prefix_guess(index, need)
        unchecked = self._state[index] == _UNCHECKED
        # In a store, a frame's first small read checks its header only and fetches the
        # prefix, not the whole frame (a cold random 4 KiB read through the mount from S3:
        # 2.1x a 64 KiB GET with 3 MiB frames, 1.7x so): an archive in a store is trusted as
        # far as the index's checksums of what is read, which this reader's caller checks
        # (checked_by_reader; its layout is not confirmed at open either), and verify compares
        # every frame with its entry. The frame is checked whole at its first whole read.
        header_only = unchecked and self.remote and self.checked_by_reader
        if unchecked and not header_only:
            # Checking walks every block header to the frame's end: one read of the whole
            # frame costs less than a cold read per block past the prefix.
            guess = c_size
        data = self._pread_frame(guess, c_start)
        if need == end - start or not (self._header_fits(index, data) if header_only
                                       else self._checked(index, data) == _SIZED):
            return self.read_frame(index)  # checks the content checksum at the frame's end
        try:
            out = self._decompress_prefix(data, need)
            if len(out) < need and header_only:
                return self.read_frame(index)
            if len(out) < need and guess < c_size:
                out = self._decompress_prefix(self._pread_frame(c_size, c_start), need)
        except zstandard.ZstdError as e:
            raise ContainerError(f"{self.name}: frame {index} at {c_start}: {e}") from None
        if len(out) < need:
            raise ContainerError(
                f"{self.name}: frame {index} does not decompress to the {end - start} bytes "
                "the seek table says"
            )
        return out

    def _stream_prefix(self, index: int, need: int) -> memoryview | None:
        """read_prefix of a local frame, into this thread's prefix buffer (valid until the
        thread's next one): its compressed bytes fed to the decoder as the disk delivers them
        (_FrameFeed), so reading and decoding overlap; a frame not yet checked is checked (its
        block headers walked to its end, asked for meanwhile) before any of it is returned.
        Cold 4 KiB reads of a /usr image's .vma.zst (1.5 MiB frames, in-process, 400
        interleaved, 3 runs at load 8): p50 0.91-0.97x the time of reading the prefix whole
        first (0.40-0.45 ms of 1.45), then decoding it.  None if anything is off: read_prefix
        then does it the slow way, which says what is wrong."""
        c_start, c_end = self.table.compressed_range(index)
        feed = _FrameFeed(self._raw, c_start, c_end - c_start, self.name,
                          self._prefix_guess(index, need), self._told.pop(index, 0))
        unchecked = self._state[index] == _UNCHECKED
        if unchecked and not self._header_fits(index, feed.fill(FEED_PIECE)):
            return None
        if not unchecked and self._state[index] != _SIZED:
            return None
        start, end = self.table.decompressed_range(index)
        direct = _direct()
        # room for the block that holds the read's end: the buffer-less decoder writes whole
        # blocks (BLOCK_SIZE_MAX at most)
        out = _prefix_buffer(min(end - start, need + BLOCK_SIZE_MAX) if direct else need)
        _THREAD.prefix = None  # it may be a view of the buffer about to be overwritten
        got = 0
        if direct is not None:
            got = direct.prefix(feed, out, need)
        else:
            try:
                # zstd's reader calls only read(): the feed is a file to it
                with self._dctx().stream_reader(cast("IO[bytes]", feed), read_size=FEED_PIECE,
                                                read_across_frames=False) as reader:
                    while got < need and (n := reader.readinto(out[got:])):
                        got += n
            except zstandard.ZstdError:
                return None
        if got < need:
            return None
        if unchecked and self._layout_trusted:
            self._state[index] = _SIZED  # its header gives the entry's size (_header_fits)
        elif unchecked:
            feed.ask(len(feed.buf), len(feed.buf))  # the tail's block headers: one request
            if self._checked(index, feed.buf[:feed.pos]) != _SIZED:
                return None
        return out[:got]

    def _prefix(self, index: int, need: int) -> memoryview:
        """At least the first ``need`` bytes of frame ``index`` for a small read: the thread's
        last prefix if it is this file's frame and long enough (a read near the one before;
        a read's extent header, which extent_check.py reads right after its data, mostly),
        else decoded: a local frame into the thread's prefix buffer (_stream_prefix), a
        store's, or a local one that _stream_prefix declines, by _read_prefix.  Kept as the
        thread's last prefix (not with caching off): one note a thread, for local files and
        stores alike; none past _REUSE_MAX bytes (frames of other writers: no thread keeps one
        that size)."""
        held: tuple[object, int, memoryview] | None = getattr(_THREAD, "prefix", None)
        if (held is not None and held[0] is self._token and held[1] == index
                and len(held[2]) >= need):
            return held[2]
        out = None if self.remote else self._stream_prefix(index, need)
        if out is None:
            out = memoryview(self._read_prefix(index, need))
        if self._cache.limit and len(out) <= _REUSE_MAX:
            _THREAD.prefix = (self._token, index, out)
        return out

    def _prefix_guess(self, index: int, need: int) -> int:
        """Compressed bytes that the first ``need`` decompressed bytes of frame ``index`` take,
        guessed in proportion, plus a block's worth (PREFIX_SLACK)."""
        start, end = self.table.decompressed_range(index)
        c_start, c_end = self.table.compressed_range(index)
        c_size = c_end - c_start
        return min(c_size, need * c_size // max(end - start, 1) + PREFIX_SLACK)

    def _header_fits(self, index: int, head: memoryview) -> bool:
        """True if ``head`` starts with a frame header that decodes entry ``index`` as a
        prefix may be (content size the entry's, no dictionary); otherwise the whole frame is
        read and checked, which says what is wrong."""
        if len(head) < 18 or bytes(head[:4]) != ZSTD_MAGIC:
            return False
        try:
            header = decode_frame_header(head[:18], int(self.table.c_offsets[index]))
        except FormatError:
            return False
        start, end = self.table.decompressed_range(index)
        return header.content_size == end - start and not header.dict_id

    def _decompress_prefix(self, data: memoryview, need: int) -> bytes:
        with self._dctx().stream_reader(
            data, read_size=len(data), read_across_frames=False
        ) as reader:
            return _read_up_to(reader, need)

    def frame(self, index: int) -> bytes:
        """Frame ``index`` decompressed, through the LRU cache (thread-safe)."""
        data = self._cache.get(index)
        if data is not None:
            return data
        data = self.read_frame(index)
        self._cache.put(index, data)
        return data

    def prefetch(self, index: int) -> None:
        """Decompress frame ``index`` into the cache unless it is there (for worker threads)."""
        if not self.cached(index):
            self.frame(index)

    @property
    def cache_used(self) -> int:
        """Bytes of decompressed frames held in the cache."""
        return self._cache.used

    def cached(self, index: int) -> bool:
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
            if (self.checked_by_reader and end - offset <= PREFIX_READ_MAX and end < f_end
                    and self._state[first] != _UNSIZED and not self.cached(first)):
                prefix = self._prefix(first, end - f_start)  # maybe the thread's buffer: a copy
                return bytes(prefix[offset - f_start:end - f_start])
            return self.frame(first)[offset - f_start : end - f_start]
        return b"".join(self._parts(first, offset, end))  # views: the join is the only copy

    def pread_stream(self, offset: int, length: int) -> bytes | memoryview:
        """Like ``pread``, for a reader that goes through the file in order in long reads (a
        merge reads every layer of a chain so): a frame it reads in part is kept for its next
        call apart from the cache (STREAM_FRAMES a file, not a 16 MiB cache a file), frames
        it reads whole are not kept.

        A read of several frames is one buffer that the frames it covers whole are decoded
        into (read_frame_into), and freed by the thread that made it: handing frames over as
        views kept them alive longer, and the allocator gave each new frame fresh pages
        (measured: 2.5x the page faults, +1.2-2.3 s CPU for a 30-deep chain); joining them
        was a copy of every byte (reading the 30-deep zstd chain of tools/bench_incremental:
        3.4 s CPU instead of 3.9, 0.55x the page faults, 4 interleaved rounds).
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first = self.frame_of(offset)
        if end <= self.table.decompressed_range(first)[1]:  # within one frame: a view of it
            return self._parts(first, offset, end, stream=True)[0]
        # Frames the read covers whole are decoded straight into the result (no frame of
        # their own, no join); the others are copied from the frame kept for the next call.
        out = np.empty(end - offset, np.uint8).data  # not zeroed: every byte is written
        index, pos = first, offset
        while pos < end:
            f_start, f_end = self.table.decompressed_range(index)
            hi = min(end, f_end)
            if f_start >= offset and f_end <= end:
                self.read_frame_into(index, out[f_start - offset:f_end - offset])
            elif f_end > f_start:
                data = self._streamed(index, keep=True)
                out[pos - offset:hi - offset] = memoryview(data)[pos - f_start:hi - f_start]
            pos = max(pos, hi)
            index += 1
        return out

    def _streamed(self, index: int, *, keep: bool) -> bytes:
        """Frame ``index`` for pread_stream: from its frames or the cache, else read (and kept
        if ``keep``: a frame read in part, whose rest the next call reads)."""
        with self._lock:
            data = self._stream.get(index)
            if data is None:
                data = self._cache.get(index)
        if data is None:
            data = self.read_frame(index)
            if not keep:
                return data
            with self._lock:
                self._stream[index] = data
                while len(self._stream) > STREAM_FRAMES:
                    self._stream.popitem(last=False)
        return data

    def _parts(self, first: int, offset: int, end: int, *, stream: bool = False
               ) -> list[memoryview]:
        """Views of [offset, end) frame by frame, from frame ``first`` (which holds offset);
        frames read in part come from the cache, or with ``stream`` from _streamed."""
        parts: list[memoryview] = []
        index = first
        pos = offset
        while pos < end:
            f_start, f_end = self.table.decompressed_range(index)
            if f_end > f_start:
                whole = f_start >= offset and f_end <= end
                # Frames a big read covers whole are not cached: they would evict hotter ones.
                if stream:
                    data = self._streamed(index, keep=not whole)
                elif whole and not self.cached(index):
                    data = self.read_frame(index)
                else:
                    data = self.frame(index)
                parts.append(memoryview(data)[pos - f_start : min(end, f_end) - f_start])
                pos = min(end, f_end)
            index += 1
        return parts

    def will_need(self, offsets: list[int], length: int) -> None:
        """A hint of the ByteSource protocol: reads at these decompressed offsets come soon.
        A local file's disk is asked now for the first compressed piece (FEED_PIECE) of each
        one's frame (unless cached), so it reads it while the read waits for its thread (a
        mount hands each read to a worker); the read asks for the rest itself (_FrameFeed)
        before it waits for that piece.  One small request each: the caller (a mount's event
        loop) does not wait while the kernel sets up the pages of a whole prefix."""
        if self.remote:
            return
        for offset in offsets:
            if not 0 <= offset < self.size:
                continue
            index = self.frame_of(offset)
            if self.cached(index):
                continue
            c_start, c_end = self.table.compressed_range(index)
            first = min(FEED_PIECE, c_end - c_start)
            self._raw.advise(c_start, first)
            if len(self._told) >= 64:
                self._told.clear()
            self._told[index] = first

    def identity(self) -> bytes:
        return self._raw.identity()

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        held = getattr(_THREAD, "prefix", None)
        if held is not None and held[0] is getattr(self, "_token", None):
            _THREAD.prefix = None  # this thread's note of this file (other threads': their next)
        if self._own_fd:
            self._raw.close()
            self._own_fd = False
        if hasattr(self, "_cache"):
            self._cache.clear()
            with self._lock:
                self._stream.clear()

    def __enter__(self) -> SeekableZstdSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
