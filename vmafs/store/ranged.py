"""An object read by ranged requests (S3 GETs, HTTP Range): what every remote store shares.

Opening costs one request: the object's last TAIL bytes (a suffix range), which answers its
size and version too and holds an indexed archive's footer, index and seek table. The first
read near the start fetches HEAD bytes once (the VMA header and its configs). After that:

- a random read fetches exactly the bytes it asks for (a cluster run, one zstd frame);
- a sequential reader (reads that follow each other, or an `advise`) is served from
  CHUNK-sized pieces with AHEAD of them in flight at once, each its own ranged request from a
  small thread pool, so the network stays busy while the reader works;
- a `stream()`, one reader from start to end, is one request for the rest of the object
  (what a full GET costs: measured against the RADOS gateway here, 16 MiB ranges 3 at a time
  took 1.3-1.5x the time of one GET), asked for again from where it broke off if it does; its
  body read ahead by a thread of its own, or (`direct`, for a reader that keeps buffers of its
  own ahead: the forward walk of extract, verify, convert) by the reader's own readinto calls
  straight into its buffers; a store that cannot stream a body gets STREAM_CHUNK-sized
  ranges, STREAM_AHEAD in flight;
- memory stays bounded: at most (AHEAD + KEEP + 1) chunks for each of at most RUNS sequential
  readers at once, whatever the object's size;
- a read is copied once, from the fetched buffers into the reader's (readinto) or into the
  bytes it returns.

Every request names the version first seen (S3: If-Match on the ETag), so an object replaced
while open is an error, never a mix of two archives.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, cast

import numpy as np

from vmafs.errors import IncompleteError

CHUNK = 8 << 20  # 4 MiB ranges went at two thirds of the speed here (per-request cost)
AHEAD = 4  # chunks requested ahead of a sequential reader
KEEP = 2  # chunks kept behind it (concurrent readers a little apart share them)
STREAM_CHUNK = 16 << 20  # a stream()'s chunks: one reader, start to end, so fewer requests
STREAM_AHEAD = 3  # (a request costs ~2 ms of botocore CPU; client and gateway share the cores)
STREAM_KEEP = 0
STREAM_PIECE = 8 << 20  # a streamed body's pieces read ahead (BODY_AHEAD of them): the
BODY_AHEAD = 6  # reader's pace varies (extract's writes share the cores with the gateway): with
# 3 the body's thread waited for a free piece ~25 % of the time, with 6 ~10 % (extract of 2 GiB
# from the RADOS gateway, 0.85x the time, 3 interleaved rounds at load 11-14)
STREAM_IDLE = 5.0  # seconds a streamed request waits for its reader's next chunk
HEAD = 1 << 20  # the VMA header and its configs, or a seekable file's first frames
TAIL = 1 << 20
NEAR = 2 << 20  # a read starting this close to the last one's end continues its run (a few
# threads reading in order, each a little ahead or behind the others, are one reader)
RUN = 4 << 20  # the span a run covers before its reader counts as sequential: the kernel's
# read-ahead around one random read, or an open reading a header and a tail, start no chunks
RUNS = 4  # runs told apart at once, each its own sequential reader once RUN long (memory:
# chunks for each, so at most RUNS x (AHEAD + KEEP + a read's) chunks)

BODY_ATTEMPTS = 5  # a streamed body that breaks off is asked for again this often in a row

_Chunk = concurrent.futures.Future[bytes | memoryview]  # a chunk fetched or on its way

Fetch = Callable[[int, int], bytes]
"""The store's one primitive: bytes [start, end) of the object's version, retried as needed."""


class Body(Protocol):
    """A response body as it arrives (the request itself already answered)."""

    def readinto(self, view: memoryview) -> int:
        """Fill the start of view; 0 at the body's end (or where the connection dropped);
        BodyBroke when it broke off."""
        ...

    def close(self) -> None: ...


OpenBody = Callable[[int, int], Body]
"""A store's streaming request: the body of bytes [start, end) of the object's version (the
request retried as needed, its failures the store's one-line errors)."""


class BodyBroke(Exception):
    """A body broke off mid-transfer (the message is the store's line for it, if it stays
    broken)."""


class HttpBody:
    """A GET's body as it arrives (a Body), read with http.client's readinto when the HTTP
    stack under it exposes one (`fp`): straight from the socket into the reader's buffer
    (urllib3's own readinto reads into new bytes and copies them). `broke` turns what the
    stack raised into the error to raise instead (None: raise it as it is)."""

    def __init__(self, fp: Any, read: Callable[[int], bytes], close: Callable[[], None],
                 broke: Callable[[Exception], Exception | None]) -> None:
        self._fp = fp if callable(getattr(fp, "readinto", None)) else None
        self._read = read
        self._close = close
        self._broke = broke

    def readinto(self, view: memoryview) -> int:
        try:
            if self._fp is not None:
                return int(self._fp.readinto(view))
            data = self._read(len(view))
            view[:len(data)] = data
            return len(data)
        except Exception as exc:
            error = self._broke(exc)
            if error is None:
                raise
            raise error from None

    def close(self) -> None:
        self._close()  # the connection is not reused: the body may be unread


class RangedObject:
    """A remote object read by ranged requests; thread-safe (a StoredObject)."""

    def __init__(self, name: str, size: int, version: bytes, fetch: Fetch,
                 tail: tuple[int, bytes], open_body: OpenBody | None = None) -> None:
        self.name = name
        self._size = size
        self._version = version
        self._fetch = fetch
        self._open_body = open_body
        self._streamer: _Streamer | None = None  # a sequential reader's chunks, streamed
        self._tail_at, self._tail = tail
        self._head: bytes | None = b"" if size == 0 else None
        self._lock = threading.Lock()
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # runs of reads that follow each other, the latest first: [start, end, next] (where
        # the run's last read ended); a few at once (a layout check's threads, each through
        # its own span of the object, are as many sequential readers)
        self._runs: list[list[int]] = []
        self.sequential = False
        """Set for a reader that goes through the object in order (a stream)."""
        self._chunk, self._ahead, self._keep = CHUNK, AHEAD, KEEP
        self.requests = 1  # the suffix range that opened it

    @property
    def size(self) -> int:
        return self._size

    def identity(self) -> bytes:
        return self._version

    # -- reading ----------------------------------------------------------------------------

    def _get(self, start: int, end: int) -> bytes:
        with self._lock:
            self.requests += 1
        data = self._fetch(start, end)
        if len(data) != end - start:
            raise IncompleteError(f"{self.name}: short read at {start}: {len(data)} of "
                                  f"{end - start} bytes (object changed while open?)")
        return data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        if offset >= self._tail_at:
            return self._tail[offset - self._tail_at:end - self._tail_at]
        if end <= HEAD:
            return self._head_bytes()[offset:end]
        if not self._streaming(offset, end):
            return self._get(offset, end)
        return b"".join(self._slices(offset, end))  # one copy

    def view(self, offset: int, length: int) -> memoryview:
        """What read() gives, as a view: a sequential reader's read that lies in one chunk
        (a zstd frame) is a view of that chunk, not a copy. The view keeps the chunk's
        buffer, which is never filled again."""
        end = min(offset + length, self._size)
        if offset >= end or offset >= self._tail_at or end <= HEAD:
            return memoryview(self.read(offset, length))
        if not self._streaming(offset, end):
            return memoryview(self._get(offset, end))
        pieces = self._slices(offset, end)
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))

    def _streaming(self, offset: int, end: int) -> bool:
        """True for a read of a sequential reader (a run of RUN bytes, or one large read):
        served from chunks, the next ones requested ahead; also for a read that a chunk
        already fetched or on its way holds."""
        with self._lock:
            run = next((r for r in self._runs if abs(offset - r[2]) <= NEAR), None)
            held = (offset // self._chunk in self._chunks
                    and (end - 1) // self._chunk in self._chunks)
            if self.sequential and run is None and self._chunks and not held:
                # a stream's reader looking elsewhere (a zstd seek table near the end): that
                # read alone, exact, neither chunks ahead of it nor the stream's evicted
                return False
            if run is None:
                run = [offset, end, end]
            else:
                self._runs.remove(run)
            self._runs.insert(0, run)
            del self._runs[RUNS:]
            run[1], run[2] = max(run[1], end), end
            return (self.sequential or end - offset >= self._chunk
                    or run[1] - run[0] >= RUN or held)

    def _streams(self) -> int:
        """How many runs are sequential readers now (the lock held): each has its chunks."""
        return max(1, sum(1 for r in self._runs if r[1] - r[0] >= RUN))

    def readinto(self, offset: int, view: memoryview) -> int:
        end = min(offset + len(view), self._size)
        if offset >= end or offset >= self._tail_at or end <= HEAD:
            data = self.read(offset, len(view))
            view[:len(data)] = data
            return len(data)
        if not self._streaming(offset, end):
            view[:end - offset] = self._get(offset, end)
            return end - offset
        at = 0  # from the chunks straight into view: one copy
        for piece in self._slices(offset, end):
            view[at:at + len(piece)] = piece
            at += len(piece)
        return end - offset

    def _head_bytes(self) -> bytes:
        head = self._head
        if head is None:
            head = self._get(0, min(HEAD, self._size))
            self._head = head
        return head

    def _slices(self, offset: int, end: int) -> list[memoryview]:
        """Views of [offset, end) in whole chunks, the next ones requested ahead."""
        first, last = offset // self._chunk, (end - 1) // self._chunk
        futures = self._schedule(first, last + self._ahead)[: last - first + 1]
        out = []
        for idx, future in enumerate(futures, start=first):
            try:
                data = future.result()
            except BaseException:
                with self._lock:
                    if self._chunks.get(idx) is future:
                        del self._chunks[idx]  # the next read asks again
                raise
            lo = max(offset, idx * self._chunk)
            hi = min(end, (idx + 1) * self._chunk)
            out.append(memoryview(data)[lo - idx * self._chunk:hi - idx * self._chunk])
        return out

    def _schedule(self, first: int, last: int) -> list[_Chunk]:
        """The chunks first..last (clipped to the object), requested if not yet."""
        last = min(last, (self._size - 1) // self._chunk)
        out = []
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max(AHEAD, STREAM_AHEAD), thread_name_prefix="vmafs-get")
            for idx in range(first, last + 1):
                future = self._chunks.get(idx)
                if future is None:
                    start = idx * self._chunk
                    future = self._request(start, min(start + self._chunk, self._size))
                    self._chunks[idx] = future
                else:
                    self._chunks.move_to_end(idx)
                out.append(future)
            # the read, ahead, behind: for each sequential reader at once
            while len(self._chunks) > (last - first + 1 + self._keep) * self._streams():
                self._chunks.popitem(last=False)
        return out

    def _fetch_chunk(self, start: int, end: int) -> bytes:
        return self._get(start, end)

    def _request(self, start: int, end: int) -> _Chunk:
        """A chunk's future (lock held): from the streamed request when the chunk continues
        it (or starts one: a store that streams bodies), else its own ranged request."""
        assert self._pool is not None
        if self._open_body is None:
            return self._pool.submit(self._fetch_chunk, start, end)
        streamer = self._streamer
        if streamer is None or not streamer.take(start):
            if streamer is not None and not streamer.idle():
                return self._pool.submit(self._fetch_chunk, start, end)  # one elsewhere
            if streamer is not None:
                streamer.stop()
            streamer = self._streamer = _Streamer(self, self._open_body, start)
        return streamer.queue(start, end)

    def advise(self, offset: int, length: int) -> None:
        """Honoured for a sequential reader, and for a span longer than a chunk: its reader
        goes through it (a zstd layout check walks each frame's block headers, a small read
        every <= 128 KiB), so it is a sequential run from here on, not first a run of small
        requests. A reader's first reads (a header, a seek table, one frame and the next
        ones) must not start whole chunks of an object they will not read."""
        end = min(offset + length, self._size, self._tail_at)
        if offset >= end:
            return
        with self._lock:
            if end - offset > self._chunk:
                run = next((r for r in self._runs if abs(offset - r[2]) <= NEAR), None)
                if run is None:
                    run = [offset, offset, offset]
                    self._runs.insert(0, run)
                    del self._runs[RUNS:]
                run[0] = min(run[0], run[1] - RUN)  # sequential already
            elif not (self.sequential or any(abs(offset - r[2]) <= NEAR and r[1] - r[0] >= RUN
                                             for r in self._runs)):
                return
        first = offset // self._chunk
        self._schedule(first, min((end - 1) // self._chunk, first + self._ahead - 1))

    def stream(self, *, direct: bool = False) -> io.RawIOBase:
        """The object start to end: one streamed request, or ranges read ahead. `direct`:
        the request's body read by the reader's own readinto calls, straight into its
        buffers (DirectStream), for a reader that keeps buffers of its own ahead."""
        from vmafs.store import ObjectStream  # the package imports this module

        if self._open_body is not None:
            if direct:
                return DirectStream(self, self._open_body)
            return _BodyStream(self, self._open_body)
        with self._lock:
            self.sequential = True
            if not self._chunks:  # one reader from start to end: larger chunks
                self._chunk, self._ahead, self._keep = STREAM_CHUNK, STREAM_AHEAD, STREAM_KEEP
        return ObjectStream(self)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            streamer, self._streamer = self._streamer, None
            for future in self._chunks.values():
                future.cancel()
            self._chunks.clear()
        if streamer is not None:
            streamer.stop()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Resuming:
    """One streamed request from `pos` on, asked for again from where it breaks off (an
    error, or its end before the object's), up to BODY_ATTEMPTS times in a row without
    progress; then one StoreError line."""

    def __init__(self, obj: RangedObject, open_body: OpenBody, pos: int) -> None:
        self.obj = obj
        self._open = open_body
        self.pos = pos
        self._body: Body | None = None

    def fill(self, view: memoryview, stopped: Callable[[], bool]) -> bool:
        """Fill all of view with the next bytes; False if stopped() turned true meanwhile."""
        got, failures = 0, 0
        while got < len(view):
            if stopped():
                return False
            if self._body is None:
                with self.obj._lock:
                    self.obj.requests += 1
                self._body = self._open(self.pos, self.obj.size)
            try:
                n = self._body.readinto(view[got:])
                if not n:
                    raise BodyBroke(f"{self.obj.name}: the connection broke off at "
                                    f"{self.pos} of {self.obj.size} bytes")
            except BodyBroke as exc:
                self.close()
                failures += 1
                if failures >= BODY_ATTEMPTS:
                    from vmafs.store import StoreError  # the package imports this module

                    raise StoreError(str(exc)) from None
                time.sleep(min(5.0, 0.1 * 2 ** failures) * random.random())  # full jitter
                continue
            failures = 0
            got += n
            self.pos += n
        return True

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                body.close()


class _Streamer:
    """A sequential reader's chunks, in order, from one streamed request (its own thread):
    what one GET of the rest costs instead of a request per chunk. A chunk that does not
    continue it goes to its own ranged request; a streamer with nothing to read for
    STREAM_IDLE seconds closes its request and ends."""

    def __init__(self, obj: RangedObject, open_body: OpenBody, pos: int) -> None:
        self._reader = _Resuming(obj, open_body, pos)
        self._next = pos   # where the next chunk queued must start
        self._jobs: queue.SimpleQueue[tuple[int, int, _Chunk]
                                      | None] = queue.SimpleQueue()
        self._waiting = 0  # jobs queued, not yet read (under the object's lock)
        self._ended = False
        self._stopped = False
        threading.Thread(target=self._run, name="vmafs-stream", daemon=True).start()

    def take(self, start: int) -> bool:
        """True if a chunk at start continues this stream (the object's lock held)."""
        return not self._ended and start == self._next

    def idle(self) -> bool:
        return self._ended or self._waiting == 0

    def queue(self, start: int, end: int) -> _Chunk:
        future: _Chunk = concurrent.futures.Future()
        self._next = end
        self._waiting += 1
        self._jobs.put((start, end, future))
        return future

    def stop(self) -> None:
        self._stopped = True
        self._jobs.put(None)

    def _run(self) -> None:
        lock = self._reader.obj._lock
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=STREAM_IDLE)
                except queue.Empty:
                    with lock:
                        if self._jobs.empty():
                            self._ended = True
                            return
                    continue
                if job is None or self._stopped:
                    return
                start, end, future = job
                if not future.set_running_or_notify_cancel():
                    self._stopped = True  # a cancelled chunk: the reader went (close)
                    return
                try:
                    # filled whole: not zeroed first (bytearray's memset of every chunk cost
                    # ~3 % of a mount's CPU)
                    data = np.empty(end - start, np.uint8).data
                    if not self._reader.fill(memoryview(data), lambda: self._stopped):
                        future.cancel()
                        return
                except BaseException as exc:  # noqa: BLE001 - the reader gets it
                    future.set_exception(exc)
                    with lock:
                        self._ended = True
                    return
                future.set_result(data)
                with lock:
                    self._waiting -= 1
        finally:
            with lock:
                self._ended = True
            self._reader.close()
            while True:  # whatever is still queued: its reader asks again
                try:
                    left = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    left[2].cancel()


class DirectStream(io.RawIOBase):
    """A RangedObject from start to end by one streamed request, read by the reader's own
    calls: readinto fills the reader's buffer straight from the connection (no thread, no
    copy: what a full GET's client costs). For a reader that reads ahead into buffers of its
    own (the forward walk of a plain archive keeps READ_AHEAD_BYTES of extents; the kernel's
    socket buffer holds what arrives while it checks one): with no one reading, the
    transfer stops. Breaks are resumed as _BodyStream's are; an error reaches the reader at
    the read it happened in. Every read is filled whole (fewer bytes only at the end)."""

    READ_AHEAD_BYTES = BODY_AHEAD * STREAM_PIECE
    """What its reader should keep read ahead (the walk's ring of extent buffers)."""

    def __init__(self, obj: RangedObject, open_body: OpenBody) -> None:
        self._obj = obj
        self._reader = _Resuming(obj, open_body, 0)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        n = min(len(view), self._obj.size - self._reader.pos)
        if n <= 0:
            return 0
        if not self._reader.fill(view[:n], lambda: self.closed):
            raise ValueError("read of a closed stream")
        return n

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._reader.close()
            self._obj.close()


class _BodyStream(io.RawIOBase):
    """A RangedObject from start to end by one streamed request, read by its own thread into
    BODY_AHEAD pieces of STREAM_PIECE bytes ahead of the reader: the network keeps going
    while the reader works (read straight into the reader's buffers instead, the transfer
    stopped whenever it did: extract from S3 took 1.2x the time). Where the body breaks off
    (an error, or its end before the object's), the rest is asked for again from there, up to
    BODY_ATTEMPTS times in a row without progress; an error reaches the reader where it
    happened, after the bytes before it."""

    def __init__(self, obj: RangedObject, open_body: OpenBody) -> None:
        self._obj = obj
        self._open = open_body
        self._pieces: queue.SimpleQueue[memoryview | BaseException] = queue.SimpleQueue()
        # the pieces' buffers, reused: a fresh 8 MiB buffer a piece cost its zeroing and page
        # faults (2.4 % of extract's CPU in memset alone); one more than ahead: the reader's
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(BODY_AHEAD + 1):
            self._free.put(None)  # allocated when first needed (a short object needs few)
        self._stopped = False
        self._piece: memoryview = memoryview(b"")
        self._held: bytearray | None = None  # the buffer of the piece being read
        self._at = 0      # where the reader is in the object
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vmafs-body", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        if not view or self._at >= self._obj.size:
            return 0
        n = min(len(view), len(self._current()))
        view[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        self._at += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to size bytes (all the rest if negative) in one copy from the piece (a zstd
        decoder reads so; RawIOBase's read copied twice, through a new bytearray)."""
        if size is None or size < 0:
            return self.readall()
        if not size or self._at >= self._obj.size:
            return b""
        n = min(size, len(self._current()))
        data = bytes(self._piece[:n])
        self._piece = self._piece[n:]
        self._at += n
        return data

    def _current(self) -> memoryview:
        """The piece being read (the next one, once it is read whole)."""
        if not self._piece:
            if self._failed is not None:
                raise self._failed
            if self._held is not None:  # read whole: its buffer takes a piece ahead again
                self._free.put(self._held)
                self._held = None
            item = self._pieces.get()
            if isinstance(item, BaseException):
                self._failed = item
                raise item
            self._piece = item
            self._held = cast(bytearray, item.obj)
        return self._piece

    def _run(self) -> None:
        reader = _Resuming(self._obj, self._open, 0)
        size = self._obj.size
        try:
            while reader.pos < size and not self._stopped:
                buffer = self._free.get()
                if self._stopped:
                    return
                if buffer is None:
                    buffer = bytearray(STREAM_PIECE)
                piece = memoryview(buffer)[:min(STREAM_PIECE, size - reader.pos)]
                if not reader.fill(piece, lambda: self._stopped):
                    return
                self._pieces.put(piece)
        except BaseException as exc:  # noqa: BLE001 - raised to the reader, in order
            self._pieces.put(exc)
        finally:
            reader.close()

    def close(self) -> None:
        """Stop the thread (at its next piece; a read waiting on the network ends with the
        connection's timeout, the process need not wait for it)."""
        if not self.closed:
            self._stopped = True
            self._free.put(None)  # a thread waiting for a buffer wakes up and stops
            self._obj.close()
        super().close()


