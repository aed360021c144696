"""Walking the extent chain, in one place: forward through a stream (verify, extract, convert),
or header by header through a random-access source (opening an archive that has no index).

An extent is accepted only whole: header checks (vma.check_extent_header), then its block count
against its masks. The stream may end only at an extent boundary. Runs of extents are decoded as
batches (HeaderBatch): a sparse disk has millions of extents, too many to decode one by one.

Forward, a reader thread may read ahead of the checks (two cores: reads and decompression
release the GIL); a regular file is then read by offset, an extent's data in pieces that the
reader and the caller waiting for that extent share, each piece hashed (its clusters' index
checks) by the thread that read it, in the same call without the GIL, while it is in that
core's cache.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

import numpy as np

from vmafs.archive import problems
from vmafs.archive.rules import ClusterRules
from vmafs.buffers import on_huge_pages
from vmafs.container.source import ByteSource
from vmafs.errors import FormatError
from vmafs.format import index, vma


@dataclass(frozen=True)
class Extent:
    """One checked extent header: its used slots (dev_id != 0) as arrays, in slot order."""

    offset: int
    block_count: int
    dev_ids: np.ndarray  # uint8
    clusters: np.ndarray  # uint32
    masks: np.ndarray  # uint16
    raw: bytes  # the 512 header bytes

    @property
    def size(self) -> int:
        return vma.EXTENT_HEADER_SIZE + self.block_count * vma.BLOCK_SIZE

    @property
    def is_null(self) -> bool:
        """No used slot and no data: Proxmox skips it; vmafs carries its index in such."""
        return not self.block_count and not len(self.dev_ids)

    def payload(self) -> bytes:
        return vma.null_extent_payload(self.raw)


def decode_extent(raw: bytes | memoryview, uuid: bytes, offset: int) -> Extent:
    """Check one extent header at stream offset `offset`; ArchiveError says what and where."""
    if len(raw) < vma.EXTENT_HEADER_SIZE:
        raise problems.error(problems.TRUNCATED, f"read short extent ({len(raw)} bytes) at "
                             f"offset {offset}", offset=offset)
    raw = bytes(raw[:vma.EXTENT_HEADER_SIZE])
    try:
        block_count = vma.check_extent_header(raw, uuid)
    except FormatError as exc:
        raise _at(exc, offset) from None
    return _extent(raw, block_count, offset)


def _extent(raw: bytes, block_count: int, offset: int) -> Extent:
    """The Extent of a header whose fields are checked: its used slots, their blocks counted."""
    return _extent_ends(raw, block_count, offset)[0]


def _extent_ends(raw: bytes, block_count: int, offset: int) -> tuple[Extent, np.ndarray]:
    """_extent, and where each stored cluster's data ends in its data."""
    dev_ids, clusters, masks, ends, blocks = vma.used_slots(raw)
    _check_blocks(blocks, block_count, offset)
    return Extent(offset, block_count, dev_ids, clusters, masks, raw), ends


def _at(exc: FormatError, offset: int) -> problems.ArchiveError:
    """A header check's error, saying where (the walks call the check inline: it is per
    extent, millions of times for a sparse disk)."""
    return problems.error(problems.FORMAT, f"{exc} at offset {offset}", offset=offset)


def _check_blocks(blocks: int, block_count: int, offset: int) -> None:
    """An extent's block count must be exactly what its masks store."""
    if blocks > block_count:
        raise problems.error(problems.FORMAT,
                             f"short vma extent - too many blocks at offset {offset}",
                             offset=offset)
    if blocks < block_count:
        raise problems.error(problems.FORMAT, f"vma extent error - missing blocks at offset "
                             f"{offset}", offset=offset)


def slot_offsets(ext: Extent) -> np.ndarray:
    """Stream offset of each used slot's first stored block."""
    blocks = vma.POPCOUNT16[ext.masks].astype(np.int64)
    before = np.cumsum(blocks) - blocks
    return ext.offset + vma.EXTENT_HEADER_SIZE + before * vma.BLOCK_SIZE


# --- forward, through a stream ------------------------------------------------------------------


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at end of stream."""
    data = stream.read(n)
    if data is None:
        raise FormatError("input would block")
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_into(stream: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def read_header(stream: BinaryIO) -> vma.Header:
    """The archive header from the start of a stream (at most 16 MiB, as its size field says)."""
    prefix = read_exact(stream, vma.HEADER_FIXED_SIZE)
    size = vma.header_size_of(prefix)
    rest = read_exact(stream, size - vma.HEADER_FIXED_SIZE)
    if len(rest) != size - vma.HEADER_FIXED_SIZE:
        raise problems.error(problems.TRUNCATED, "can't read vma header data")
    return vma.decode_header(prefix + rest)


ZERO_RUN_BATCH = 4096  # data-less extents in a row checked together: a sparse disk has millions
READ_AHEAD = 2
"""Extent buffers (3.8 MiB each) of a threaded forward read: the reader thread fills one while
the caller checks the other (reads and decompression release the GIL). More are no faster:
with 3, a scan of 1 GiB dense on two cores was 1.31-1.36x one core in two runs of 5-7
rounds, 1.29-1.33x with 2 (others' load below one core during each round)."""


@dataclass
class Hashing:
    """Which index checks (index.checks) of each data extent's stored clusters a forward walk
    computes as it reads: of the data, and over its block sums. The caller may turn one off
    once it knows it is not needed (extents already read may still carry it)."""

    data: bool = False
    summed: bool = False


@dataclass(frozen=True)
class ExtentChecks:
    """A data extent's stored clusters (nonzero masks, in slot order): where each one's data
    ends in the extent's data, and its index checks (LE u32) as Hashing asked, else None."""

    ends: np.ndarray  # int64
    data: np.ndarray | None
    summed: np.ndarray | None


def iter_stream_runs(stream: BinaryIO, header: vma.Header, *, ahead: int = 0
                     ) -> Iterator[_Item]:
    """Like iter_stream, but runs of extents without data come as HeaderBatch: a 16 TiB sparse
    disk is 4.5 million of them, too many to handle one by one in Python.

    With ahead > 0 a reader thread reads up to that many extents ahead of the caller, into a
    ring of buffers; the caller, when it waits for an extent, reads the rest of it itself.
    Items, and the error that ends the stream, come in stream order as with ahead=0. Either
    way an extent's data view stays valid until the next item is asked for. Close the
    iterator to stop the thread early.
    """
    with contextlib.closing(iter_stream_checked(stream, header, Hashing(), ahead=ahead)) as items:
        for item in items:
            yield item if isinstance(item, HeaderBatch) else item[:2]


def iter_stream_checked(stream: BinaryIO, header: vma.Header, hashing: Hashing, *,
                        ahead: int = 0) -> Generator[_CheckedItem, None, None]:
    """iter_stream_runs, each data extent with its ExtentChecks: computed while its data is
    read (by the reader thread and the caller, piece by piece, when reading a file by offset;
    by the caller from its whole data otherwise)."""
    source: _Source = (_FileSource(stream, header) if read_by_offset(stream)
                       else _StreamSource(stream))
    if ahead > 0:
        # a stream nothing reads ahead under (a remote body read straight into these
        # buffers) says how much it wants kept ahead
        hint = int(getattr(stream, "read_ahead_bytes", 0) or 0)
        ahead = max(ahead, -(-hint // vma.MAX_EXTENT_SIZE))
        yield from _read_ahead(source, header, ahead, hashing)
        return
    buffer = _new_buffer()
    for item in _runs(source, header, lambda: buffer, hashing):
        if isinstance(item, HeaderBatch):
            yield item
        else:
            ext, data = item
            yield ext, data.finish(), data.checks()


def _new_buffer() -> np.ndarray:
    """An extent's buffer, not zeroed: its pages are touched first by the read into it,
    without the GIL (a zeroed bytearray's 3.8 MiB were faulted in and cleared with it held,
    ~1-3 ms a buffer at the start of every walk); a view of it is handed out only once read
    whole. Page-aligned, so its clusters can be written with O_DIRECT (copier.DirectFds)
    without a copy; on huge pages (buffers.on_huge_pages), as the ring's buffers are filled
    again and again."""
    return on_huge_pages(vma.MAX_EXTENT_SIZE)


def _runs(source: _Source, header: vma.Header, take: Callable[[], np.ndarray], hashing: Hashing
          ) -> Iterator[HeaderBatch | tuple[Extent, _Data]]:
    """The forward walk; take() gives the buffer for the next extent's data, which the caller
    finishes reading (_Data.finish) before it looks at it. The headers read at once (a data
    extent's block sums and the next header; a chunk of a run without data) are checked at
    once (vma.check_extent_headers); a header that fails is checked alone, which says why."""
    offset = header.header_size
    run = _NullRun()
    want = vma.EXTENT_HEADER_SIZE
    try:
        while True:
            heads = source.headers(offset, want)
            if not heads:
                break
            if len(heads) < vma.EXTENT_HEADER_SIZE:
                raise problems.error(problems.TRUNCATED, f"read short extent ({len(heads)} "
                                     f"bytes) at offset {offset}", offset=offset)
            nulls, block_count = vma.check_extent_headers(heads, header.uuid)
            yield from run.add(offset, heads, nulls)
            offset += nulls * vma.EXTENT_HEADER_SIZE
            at = nulls * vma.EXTENT_HEADER_SIZE
            if at + vma.EXTENT_HEADER_SIZE > len(heads):  # read on
                want = HEADER_CHUNK
                continue
            raw = bytes(heads[at:at + vma.EXTENT_HEADER_SIZE])
            if block_count < 0:
                try:
                    block_count = vma.check_extent_header(raw, header.uuid)
                except FormatError as exc:
                    raise _at(exc, offset) from None
                if not block_count:  # accepted alone after all
                    yield from run.add(offset, raw, 1)
                    offset += vma.EXTENT_HEADER_SIZE
                    want = HEADER_CHUNK
                    continue
            yield from run.flush()
            ext, ends = _extent_ends(raw, block_count, offset)
            data = source.data(take(), offset, ext.block_count * vma.BLOCK_SIZE,
                               _Wanted(ends, hashing))
            yield ext, data
            offset += ext.size
            # its block sums' null extents, if the archive carries them, and the next header
            want = (index.sums_extents(block_count) + 1) * vma.EXTENT_HEADER_SIZE
    except FormatError:
        yield from run.flush()
        raise
    yield from run.flush()


class _NullRun:
    """Consecutive headers without data not yet handed out, as the pieces of what was read
    that hold them (back to back in the stream: anything else ends the run); handed out as
    HeaderBatch of ZERO_RUN_BATCH rows (a sparse disk has millions), the rest before the next
    data extent, an error or the end."""

    def __init__(self) -> None:
        self.pieces: list[bytes | memoryview] = []
        self.offset = 0  # of the first
        self.rows = 0

    def add(self, offset: int, heads: bytes | memoryview, count: int
            ) -> Iterator[HeaderBatch]:
        """The first count headers of heads, at offset; the batches they fill."""
        size = vma.EXTENT_HEADER_SIZE
        while count:
            take = min(count, ZERO_RUN_BATCH - self.rows)
            if not self.rows:
                self.offset = offset
            self.pieces.append(heads[:take * size])
            self.rows += take
            heads, offset, count = heads[take * size:], offset + take * size, count - take
            if self.rows >= ZERO_RUN_BATCH:
                yield from self.flush()

    def flush(self) -> Iterator[HeaderBatch]:
        if not self.rows:
            return
        pieces, self.pieces, rows, self.rows = self.pieces, [], self.rows, 0
        joined = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        offsets = np.arange(self.offset, self.offset + rows * vma.EXTENT_HEADER_SIZE,
                            vma.EXTENT_HEADER_SIZE, dtype=np.int64)
        yield _batch(offsets, np.zeros(rows, np.int64), joined)


def read_by_offset(stream: BinaryIO) -> bool:
    """A stream straight from a regular file (not a decoder, not a pipe): it can be read by
    offset, by two threads at once."""
    raw = getattr(stream, "raw", stream)
    return isinstance(raw, io.FileIO) and raw.seekable()


def _truncated(offset: int, got: int, need: int) -> problems.ArchiveError:
    return problems.error(
        problems.TRUNCATED,
        f"short vma extent ({vma.EXTENT_HEADER_SIZE + got} < {vma.EXTENT_HEADER_SIZE + need}) "
        f"at offset {offset}: archive is truncated", offset=offset)


class _Wanted:
    """An extent's stored clusters (where each one's data ends) and the checks wanted of them
    (the Hashing at the time it was read), with room for them."""

    def __init__(self, ends: np.ndarray, hashing: Hashing) -> None:
        self.ends = ends
        n = len(ends)
        self.data = np.zeros(n, "<u4") if hashing.data else None
        self.summed = np.zeros(n, "<u4") if hashing.summed else None

    def compute(self, data: memoryview) -> None:
        """The checks of the whole data, at once."""
        if self.data is not None:
            self.data[:] = np.frombuffer(index.checks(data, self.ends), "<u4")
        if self.summed is not None:
            self.summed[:] = np.frombuffer(index.checks(data, self.ends, summed=True), "<u4")

    def result(self) -> ExtentChecks:
        return ExtentChecks(self.ends, self.data, self.summed)


class _Data:
    """An extent's data, read into its buffer by the time finish() returns it, and its checks
    by the time checks() returns them."""

    def __init__(self, buffer: np.ndarray, offset: int, need: int, got: int,
                 wanted: _Wanted) -> None:
        self.view = buffer.data[:need]
        self.offset = offset
        self.need = need
        self.got = got
        self.wanted = wanted

    def work(self) -> None:
        """Read what is left of it (nothing: a stream is read in order)."""

    def finish(self) -> memoryview:
        """The data, all of it: a short read is the archive cut short."""
        if self.got != self.need:
            raise _truncated(self.offset, self.got, self.need)
        return self.view

    def checks(self) -> ExtentChecks:
        """Its clusters' checks (after finish): hashed here, by the caller."""
        self.wanted.compute(self.view)
        return self.wanted.result()


class _Source:
    """Where a forward walk reads: headers by stream offset (the walk asks in order), and
    extent data."""

    def headers(self, offset: int, ahead: int) -> bytes | memoryview:
        """Whole 512-byte headers from offset on, at least one (fewer bytes only at the end);
        ahead: how many bytes from offset are likely headers (a file reads them at once, and
        gives what it read before and has not given yet)."""
        raise NotImplementedError

    def data(self, buffer: np.ndarray, offset: int, need: int, wanted: _Wanted) -> _Data:
        """The data of the extent at offset, need bytes."""
        raise NotImplementedError


class _StreamSource(_Source):
    """A stream (a pipe, a decoder): each read where the last one ended, data read at once."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def headers(self, offset: int, ahead: int) -> bytes:
        return read_exact(self.stream, vma.EXTENT_HEADER_SIZE)

    def data(self, buffer: np.ndarray, offset: int, need: int, wanted: _Wanted) -> _Data:
        got = _read_into(self.stream, buffer.data[:need])
        return _Data(buffer, offset, need, got, wanted)


PIECE_CLUSTERS = 4
"""An extent's data is read in pieces of this many stored clusters (at most 256 KiB: it stays
in a core's cache from its read to its hash, even with others' work beside it): the reader
thread and the caller waiting for the extent each take the next piece not taken (two cores
copy from the page cache and hash). Smaller pieces also shorten the caller's wait for the
other thread's last piece of an extent. 1 GiB dense in-process scan on both cores, SCHED_FIFO,
load 9-11, medians of 5 (two runs): 16 clusters 205-229 ms (the caller waiting 8-15 % of it),
8: 152-168 ms, 4: 132-152 ms (5-6 %), 2: 136-163 ms."""
HEADER_CHUNK = 64 << 10  # read at a time in a run of headers without data


class _FileSource(_Source):
    """A regular file, read by offset (os.pread: the stream's own position is not used)."""

    def __init__(self, stream: BinaryIO, header: vma.Header) -> None:
        self.fd = stream.fileno()
        self.delta = stream.tell() - header.header_size  # file offset of stream offset 0
        self.chunk = memoryview(b"")
        self.chunk_at = 0

    def headers(self, offset: int, ahead: int) -> memoryview:
        at = offset + self.delta
        rel = at - self.chunk_at
        if rel < 0 or rel + vma.EXTENT_HEADER_SIZE > len(self.chunk):
            self.chunk = memoryview(os.pread(self.fd, ahead, at))
            self.chunk_at, rel = at, 0
        n = max(len(self.chunk) - rel, 0)
        if n >= vma.EXTENT_HEADER_SIZE:
            n -= n % vma.EXTENT_HEADER_SIZE
        return self.chunk[rel:rel + n]

    def data(self, buffer: np.ndarray, offset: int, need: int, wanted: _Wanted) -> _Data:
        return _Pieces(self.fd, buffer, offset, need,
                       offset + vma.EXTENT_HEADER_SIZE + self.delta, wanted)


_claims = threading.Lock()  # the Python read_pieces' claims of pieces


def _read_pieces(fd: int, buffer: bytearray | memoryview, offset: int, ends: np.ndarray,
                 bounds: np.ndarray, state: np.ndarray, data_out: np.ndarray | None,
                 summed_out: np.ndarray | None) -> int:
    """_blocksums.read_pieces without the accelerator (the same results): each piece read,
    then its clusters hashed if it was read whole."""
    view = memoryview(buffer)
    if len(ends) and (ends[0] < 0 or ends[-1] > len(view) or (np.diff(ends) < 0).any()):
        raise ValueError("ends must be non-decreasing and within the data")
    if (len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != len(ends)
            or (np.diff(bounds) <= 0).any() or len(state) < 2 * len(bounds) - 1):
        raise ValueError("bounds must go from 0 to len(ends), increasing; state must have "
                         "room for every piece")
    done = 0
    while True:
        with _claims:
            k = int(state[0])
            state[0] = k + 1
        if k >= len(bounds) - 1:
            return done
        first, stop = int(bounds[k]), int(bounds[k + 1])
        lo, hi = (int(ends[first - 1]) if first else 0), int(ends[stop - 1])
        got, err = 0, 0
        try:
            while got < hi - lo:
                n = os.preadv(fd, [view[lo + got:hi]], offset + lo + got)
                if not n:
                    break
                got += n
        except OSError as exc:
            err = exc.errno or 0
        if got == hi - lo:
            for out, summed in ((data_out, False), (summed_out, True)):
                if out is not None:
                    out[first:stop] = np.frombuffer(
                        index.checks(view[lo:hi], ends[first:stop] - lo, summed=summed), "<u4")
        state[1 + 2 * k], state[2 + 2 * k] = got, err
        done += 1


try:  # the C accelerator's read_pieces (format/_blocksums.c), without the GIL
    from vmafs.format._blocksums import read_pieces as _read_pieces_now
except ImportError:
    _read_pieces_now = _read_pieces


@functools.cache
def _bounds(n: int, per: int) -> np.ndarray:
    """The pieces (of per clusters) of an extent of n stored clusters, as read_pieces takes
    them (read-only: shared by every extent of n clusters)."""
    bounds = np.minimum(np.arange(0, n + per, per), n)
    bounds.flags.writeable = False
    return bounds


class _Pieces(_Data):
    """Data read, and hashed, piece by piece by whichever thread takes the next piece (each
    call of read_pieces, one an extent and thread, takes pieces until none is left); finish()
    waits for the pieces the other thread has taken. What it reports is what one read in order
    would: the first short read (the end of the file) or error, in file order."""

    def __init__(self, fd: int, buffer: np.ndarray, offset: int, need: int, at: int,
                 wanted: _Wanted) -> None:
        super().__init__(buffer, offset, need, need, wanted)
        self.fd = fd
        self.at = at
        self.bounds = _bounds(len(wanted.ends), PIECE_CLUSTERS)
        self.left = len(self.bounds) - 1
        self.state = np.zeros(1 + 2 * self.left, np.int64)  # see read_pieces
        self.lock = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()  # released by whoever reads the last piece

    def work(self) -> None:
        wanted = self.wanted
        did = _read_pieces_now(self.fd, self.view, self.at, wanted.ends, self.bounds,
                               self.state, wanted.data, wanted.summed)
        if did:
            with self.lock:
                self.left -= did
                if not self.left:
                    self.done.release()

    def finish(self) -> memoryview:
        self.work()
        with self.done:
            pass
        got, errors = self.state[1::2], self.state[2::2]
        if int(got.sum()) == self.need and not errors.any():
            return self.view
        starts = np.concatenate(([0], self.wanted.ends[self.bounds[1:-1] - 1]))
        sizes = self.wanted.ends[self.bounds[1:] - 1] - starts
        bad = np.flatnonzero((errors != 0) | (got < sizes))
        if len(bad):  # the first in file order: an error, or the end of the file
            k = int(bad[0])
            if errors[k]:
                raise OSError(int(errors[k]), os.strerror(int(errors[k])))
            self.got = int(starts[k] + got[k])
        return super().finish()

    def checks(self) -> ExtentChecks:
        """Its clusters' checks, hashed with the pieces."""
        return self.wanted.result()


class _Stopped(Exception):
    """The reader thread's caller went away."""


_END = object()  # the reader's last item at the end of the stream
_STOP = object()  # the caller went away: the reader stops at its next wait
_FRESH = object()  # a buffer not allocated yet (a short archive needs few)


class _Ring:
    """Between the reader thread and its caller: the items read, in order, and what bounds
    them: the free extent buffers, and room for runs of headers (queues in C: a handoff
    costs a few microseconds, not a Python condition's churn).

    The reader walks ahead first (headers, in Python) and reads an extent's data pieces
    (without the GIL) only while it waits for a buffer or for room, oldest extent first; the
    caller reads the pieces left when it comes to that extent. So one thread's Python runs
    while the other reads and hashes, rather than both reading one extent's last pieces and
    then queueing for the GIL together."""

    def __init__(self, count: int) -> None:
        self.items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.buffers: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.room: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.unread: collections.deque[_Data] = collections.deque()  # pieces maybe left
        self.stopped = False
        for _ in range(count):
            self.buffers.put(_FRESH)
            self.room.put(True)

    def _wait(self, tokens: queue.SimpleQueue[object]) -> object:
        """The next token (a buffer, room), reading the unread extents' pieces meanwhile."""
        while self.unread:
            try:
                token = tokens.get_nowait()
                break
            except queue.Empty:
                self.unread.popleft().work()
        else:
            token = tokens.get()
        if token is _STOP or self.stopped:
            raise _Stopped
        return token

    def take(self) -> np.ndarray:
        """A free buffer for the reader (it waits for one)."""
        buffer = self._wait(self.buffers)
        return _new_buffer() if buffer is _FRESH else cast(np.ndarray, buffer)

    def put(self, item: HeaderBatch | tuple[Extent, _Data]) -> None:
        """An item for the caller; a run of headers waits for room (the data waited for its
        buffer)."""
        if isinstance(item, HeaderBatch):
            self._wait(self.room)
        if self.stopped:
            raise _Stopped
        self.items.put(item)
        if not isinstance(item, HeaderBatch):
            self.unread.append(item[1])

    def drain(self) -> None:
        """At the end of the stream: read what is left (the caller reads along)."""
        while self.unread and not self.stopped:
            self.unread.popleft().work()

    def stop(self) -> None:
        self.stopped = True
        self.buffers.put(_STOP)
        self.room.put(_STOP)


def _read_ahead(source: _Source, header: vma.Header, count: int, hashing: Hashing
                ) -> Iterator[_CheckedItem]:
    ring = _Ring(count)

    def read() -> None:
        try:
            for item in _runs(source, header, ring.take, hashing):
                ring.put(item)
            ring.items.put(_END)
            ring.drain()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread, in order
            ring.items.put(exc)

    thread = threading.Thread(target=read, name="vmafs-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ring.items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, HeaderBatch):
                yield item
                ring.room.put(True)
                continue
            ext, data = cast(tuple[Extent, _Data], item)
            yield ext, data.finish(), data.checks()
            ring.buffers.put(data.view.obj)
    finally:
        ring.stop()
        # A reader in a read of an idle pipe (`convert -` fed by a stalled producer) may wait
        # there for good: leaving early (Ctrl-C, SIGTERM, an error) does not wait for it, or
        # a stop signal would be held until the input ends; it stops at its next item.
        if sys.exc_info()[0] is None or not (isinstance(source, _StreamSource)
                                             and getattr(source.stream, "idle_may_block", False)):
            thread.join()


def iter_stream(stream: BinaryIO, header: vma.Header) -> Iterator[tuple[Extent, memoryview]]:
    """Each extent with a view of its data (valid until the next one: the buffer is reused)."""
    for item in iter_stream_runs(stream, header):
        if not isinstance(item, HeaderBatch):
            yield item
            continue
        for i in range(len(item.offsets)):
            used = item.dev_ids[i] != 0
            yield Extent(int(item.offsets[i]), 0, item.dev_ids[i][used], item.clusters[i][used],
                         item.masks[i][used], item.raw[i].tobytes()), memoryview(b"")


# --- header by header, through a random-access source ------------------------------------------

WALK_BATCH = 1024  # extent headers decoded and checked together (vectorised)
PREFETCH_EXTENTS = 64  # full-size extents ahead whose headers are requested in advance


@dataclass(frozen=True)
class HeaderBatch:
    """Consecutive extent headers of a walk, each checked on its own (md5, uuid, magic),
    with their slots decoded as (n, 59) arrays."""

    offsets: np.ndarray  # int64 (n,)
    block_counts: np.ndarray  # int64 (n,)
    raw: np.ndarray  # uint8 (n, 512)
    dev_ids: np.ndarray  # uint8 (n, 59), 0 for an unused slot
    clusters: np.ndarray  # uint32 (n, 59)
    masks: np.ndarray  # uint16 (n, 59)

    def trailing_nulls(self) -> tuple[bool, np.ndarray]:
        """The null extents at the batch's end (rows), and whether they are all of it (so a
        null run from the batch before goes on): where a vmafs index would sit."""
        null = ~(self.dev_ids != 0).any(axis=1) & (self.block_counts == 0)
        real = np.flatnonzero(~null)
        start = int(real[-1]) + 1 if len(real) else 0
        return not len(real), np.arange(start, len(null))

    def payload(self, row: int) -> bytes:
        return vma.null_extent_payload(self.raw[row].tobytes())


_Item = tuple[Extent, memoryview] | HeaderBatch  # what a forward walk yields
_CheckedItem = tuple[Extent, memoryview, ExtentChecks] | HeaderBatch


def _batch(offsets: np.ndarray, block_counts: np.ndarray, joined: bytes) -> HeaderBatch:
    """Consecutive checked headers (joined), at offsets (int64), of block_counts (int64):
    their slots decoded, and each one's blocks against its masks."""
    raw = np.frombuffer(joined, np.uint8).reshape(-1, vma.EXTENT_HEADER_SIZE)
    dev_ids, clusters, masks = vma.slot_columns(joined)
    # native and contiguous: every consumer selects the used slots, which is slow on views
    dev_ids, clusters, masks = dev_ids.copy(), clusters.astype(np.uint32), masks.astype(np.uint16)
    if dev_ids.any() or block_counts.any():  # not only null extents (a data extent's sums)
        blocks = (vma.POPCOUNT16[masks].astype(np.int64) * (dev_ids != 0)).sum(axis=1)
        bad = np.flatnonzero(blocks != block_counts)
        if len(bad):
            i = int(bad[0])
            _check_blocks(int(blocks[i]), int(block_counts[i]), int(offsets[i]))
    return HeaderBatch(offsets, block_counts, raw, dev_ids, clusters, masks)


def _list_batch(offsets: list[int], counts: list[int], heads: list[bytes]) -> HeaderBatch:
    return _batch(np.array(offsets, np.int64), np.array(counts, np.int64), b"".join(heads))


def iter_source(source: ByteSource, header: vma.Header) -> Iterator[HeaderBatch]:
    """The extent headers of a random-access source, from the first extent to its end, in
    batches; an extent must end exactly at the end. A broken header ends the walk with its
    ArchiveError, after the batch before it (whose own problems come first in the stream)."""
    offset, end = header.header_size, source.size
    offsets: list[int] = []
    counts: list[int] = []
    heads: list[bytes] = []
    ahead = 0  # how far headers were requested ahead
    try:
        while offset < end:
            if offset >= ahead:  # a disk answers many reads at once: ask for the next ones
                ahead = offset + PREFETCH_EXTENTS * vma.MAX_EXTENT_SIZE
                source.will_need([offset + k * vma.MAX_EXTENT_SIZE
                                 for k in range(PREFETCH_EXTENTS)], vma.EXTENT_HEADER_SIZE)
            raw = bytes(source.pread(offset, vma.EXTENT_HEADER_SIZE))
            if len(raw) < vma.EXTENT_HEADER_SIZE or offset + vma.EXTENT_HEADER_SIZE > end:
                raise problems.error(problems.TRUNCATED, "read short extent "
                                     f"({min(len(raw), end - offset)} bytes) at offset {offset}",
                                     offset=offset)
            try:
                block_count = vma.check_extent_header(raw, header.uuid)
            except FormatError as exc:
                raise _at(exc, offset) from None
            size = vma.EXTENT_HEADER_SIZE + block_count * vma.BLOCK_SIZE
            if offset + size > end:
                raise problems.error(
                    problems.TRUNCATED, f"short vma extent ({end - offset} < {size}) at offset "
                    f"{offset}: archive is truncated", offset=offset)
            offsets.append(offset)
            counts.append(block_count)
            heads.append(raw)
            if len(heads) == WALK_BATCH:
                yield _list_batch(offsets, counts, heads)
                offsets, counts, heads = [], [], []
            offset += size
    except FormatError:
        if heads:
            yield _list_batch(offsets, counts, heads)
        raise
    if heads:
        yield _list_batch(offsets, counts, heads)


def index_by_walking(source: ByteSource, header: vma.Header) -> index.IndexTable:
    """An index for an archive without one, from its extent headers, with every rule checked.

    Refuses (ArchiveError) what verify rejects: damage, a cut-off stream, missing or repeated
    clusters, and the remains of a vmafs index whose footer is gone. Memory: 11 bytes per
    stored cluster, however large the devices claim to be.
    """
    rules = ClusterRules(header)
    columns = {name: bytearray() for name in ("ext", "count", "dev", "cluster", "mask")}
    index_remains = False
    for batch in iter_source(source, header):
        used = batch.dev_ids != 0
        rules.check(batch.dev_ids[used], batch.clusters[used], batch.masks[used],
                    np.repeat(batch.offsets, used.sum(axis=1)))
        stored = used & (batch.masks != 0)
        counts = stored.sum(axis=1)
        data_rows = counts > 0
        columns["ext"] += batch.offsets[data_rows].astype("<u8").tobytes()
        columns["count"] += counts[data_rows].astype("<u2").tobytes()
        columns["dev"] += batch.dev_ids[stored].tobytes()
        columns["cluster"] += batch.clusters[stored].astype("<u4").tobytes()
        columns["mask"] += batch.masks[stored].astype("<u2").tobytes()
        # a trailing run of null extents that holds our index: its footer is gone
        continues, rows = batch.trailing_nulls()
        index_remains = (index_remains and continues) or any(
            batch.payload(i).startswith((index.INDEX_MAGIC, index.FOOTER_MAGIC))
            for i in rows.tolist())
    if index_remains:
        raise problems.error(problems.INDEX, "the archive's vmafs index is damaged (its footer "
                             "is missing or broken); vmafs verify tells more")
    missing = rules.missing()
    if missing:
        raise problems.ArchiveIncompleteError(missing[0])
    # views of the columns, no copies: 7 bytes a stored cluster, plus 4 for its data offset
    masks = np.frombuffer(columns["mask"], "<u2")
    ext_offsets = np.frombuffer(columns["ext"], np.uint64)
    ext_counts = np.frombuffer(columns["count"], np.uint16)
    offsets = index.data_offsets(ext_offsets, ext_counts, masks, sector_base=header.header_size)
    return index.IndexTable(np.frombuffer(columns["dev"], np.uint8),
                            np.frombuffer(columns["cluster"], "<u4"), masks, offsets, None,
                            ext_offsets, ext_counts, sector_base=header.header_size)
