"""The serving session: one archive (a chain resolved) opened for a server, whatever protocol
the server speaks. The mount (FUSE), `vmafs serve` (NBD) and, later, live restore are thin
adapters over it: they translate requests into `Session.read` and `Session.allocation` and
decide only what a client sees when a read fails.

`open_session` is an async context manager (an exit stack: each resource it takes has its
undo), so a server is `async with open_session(path) as session:` and nothing outlives it.

Reads are as cheap as they can be. Plain archives are read inline in the trio task: an index
lookup and preads cost less than a thread hop (measured: a hop is ~140 µs here). Holes are
slices of the model's zero buffer. Reads that decompress run in worker threads, and a streaming
reader gets whole chunks, the next ones decompressed ahead in the session's nursery, shared by
every reader of the archive. A random read of a local compressed archive goes to a thread of
its own that is moved to the CPU the loop runs on (`Session.near`): handing it the read and its
answer back are then wake-ups on one CPU, where on this 2-vCPU VM a wake-up on the other CPU
costs the waker 10-15 µs more and the woken thread its vCPU's wake from halt (cold 4 KiB reads
through the mount of the /usr image's .vma.zst, 150 a round interleaved at load 7-9: per read
0.946 and 0.986 the time, 4 and 5 rounds; daemon CPU 0.95-0.97). Whether a reader streams is
decided here only (`Reader`). Errors are raised as they come from the model (every byte checked
against its checksum in an indexed archive); the adapter decides what its client sees (EIO).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import outcome
import trio

from vmafs.archive.configs import vm_configs
from vmafs.archive.reader import CLUSTER, ZERO_VIEW, Archive, Device
from vmafs.errors import VmafsError
from vmafs.format.names import FileNames, display, file_names
from vmafs.format.vma import BLOCK_SIZE as BLOCK

CHUNK = 1 << 20            # device bytes a chunk holds
AHEAD = 4                  # chunks decompressed ahead of a streaming reader
REMOTE_AHEAD = 8           # ... read ahead of one of an archive in a store (S3, a URL): measured
# through a mount from S3, sequential read 0.77x the time of 4 ahead (same run, 3 rounds)
REMOTE_BATCH = 4           # ... of those read in one worker call (one thread hop, not four)
CACHED_CHUNKS = 12         # chunks kept, all readers together (at least the read-ahead + 8)
WORKERS = 2                # decompressing threads at once (one per core here)
MAX_RUNS = 1024            # allocation runs answered at once (NBD caps descriptors too)
GROUP = 4096               # chunks whose "holds data" bits are found at once (4 GiB of disk)


T = TypeVar("T")


class _Fetch:
    """A chunk being (or done being) decompressed; several reads may wait on it."""

    __slots__ = ("done", "data", "failed")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | memoryview = b""
        self.failed = False


class _Workers:
    """The session's threads for reads that decompress (and the read-ahead): `count` of them
    take calls in the order they come, as trio.to_thread.run_sync under a CapacityLimiter of
    `count` would, without its set-up per call (a thread from its cache, the limiter, a
    context copy): measured, a call of nothing 48 µs of CPU and 52 µs to the answer, where
    to_thread took 65 and 110 (5000 calls, quiet machine). The waiting task cannot be
    cancelled until its call has run (to_thread's cannot while it runs; a read-ahead call of
    a session being left returns at once). `close` ends the threads once their calls are
    done."""

    def __init__(self, count: int) -> None:
        self.busy = 0  # calls not answered yet
        self._cpu = -1  # the one CPU the threads run on (follow), -1: any
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], trio.lowlevel.TrioToken,
                                             trio.lowlevel.Task] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"vmafs-serve-{i}",
                                          daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, token, task = call
            result = outcome.capture(fn)
            with contextlib.suppress(trio.RunFinishedError):  # the run torn down meanwhile
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() in one of the threads; its result or its exception."""
        self._calls.put((fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        self.busy += 1
        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(
                lambda _: trio.lowlevel.Abort.FAILED)
        finally:
            self.busy -= 1
        return result

    def follow(self, cpu: int) -> bool:
        """Run the threads on this CPU from their next call on (a syscall only when it
        changes); False if the system refuses (the threads then run anywhere)."""
        if cpu != self._cpu:
            try:
                for thread in self._threads:
                    if thread.native_id is not None:  # started in __init__: always set
                        os.sched_setaffinity(thread.native_id, {cpu})
            except (OSError, ValueError):
                return False
            self._cpu = cpu
        return True

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)
        for thread in self._threads:
            thread.join()


def _this_cpu() -> int:
    """The CPU the calling thread runs on (sched_getcpu, no syscall), -1 if unknown."""
    global _getcpu
    if _getcpu is None:
        import ctypes
        try:
            _getcpu = ctypes.CDLL(None).sched_getcpu
        except (OSError, AttributeError):
            _getcpu = lambda: -1  # noqa: E731
    return int(_getcpu())


_getcpu: Callable[[], int] | None = None


@dataclass
class Reader:
    """One reader of one device (an open file, an NBD connection's export): what the session
    needs to tell a streaming reader from a random one."""

    dev_id: int
    next_offset: int = -1   # where a sequential reader's next read would start
    streak: int = 0         # consecutive sequential reads


class Session:
    """An open archive as servers show it: its disks (`devices`, with the file names extract
    and mount give them), its VM config files, and the one read path.

    `nursery` runs the read-ahead of compressed archives; without one (a Session made
    directly, as tests do) there is none. `open_session` gives it one.
    """

    def __init__(self, archive: Archive, nursery: trio.Nursery | None = None,
                 *, path: str | None = None) -> None:
        self.archive = archive
        self.path = path if path is not None else archive.path
        self.nursery = nursery
        self.devices: list[Device] = sorted(archive.devices, key=lambda d: d.dev_id)
        self.configs: list[tuple[str, bytes]] = list(vm_configs(archive.configs))
        self.names: FileNames = file_names(self.devices, [n for n, _ in self.configs])
        self._chunks: OrderedDict[tuple[int, int], _Fetch] = OrderedDict()
        self._limiter = trio.CapacityLimiter(WORKERS)
        # session_of gives a session its own threads (_Workers); one made directly (tests, a
        # mount over an Archive) hops with trio.to_thread under the limiter
        self.workers: _Workers | None = None
        # ... and, for a local compressed archive, one for random reads that runs on the
        # loop's CPU (_near)
        self.near: _Workers | None = None
        self._sizes = {d.dev_id: d.size for d in archive.devices}
        self._data_bits: dict[tuple[int, int], bytes] = {}  # (dev_id, group): chunk has data
        # an archive in a store (S3, a URL): its reads may wait on the network
        self._remote = any(getattr(s, "remote", False) for s in archive.sources)
        self._ahead = REMOTE_AHEAD if self._remote else AHEAD
        # chunks one worker call reads: a remote archive's come in order from one stream, so
        # a batch costs one hop; a local one's decompress side by side, one chunk a thread
        self._batch = REMOTE_BATCH if self._remote else 1
        self._closing = False  # set when the session is left: a batch stops between chunks
        self._cached = max(CACHED_CHUNKS, self._ahead + 8)
        # one local compressed archive: a random read's first disk request is made before
        # its thread hop (Source.will_need), not after
        self._advise = archive.compressed and not self._remote and len(archive.layers) == 1

    # -- what is served --------------------------------------------------------------------

    def size(self, dev_id: int) -> int:
        return self._sizes[dev_id]

    def notes(self) -> list[str]:
        """What a user should know about how the archive is served."""
        archive = self.archive
        if len(archive.layers) > 1:
            return [f"a chain of {len(archive.layers)} archives: each read comes from the "
                    "newest that holds the cluster"]
        if archive.indexed:
            return []
        return ["this archive has no vmafs index: reads are not checked against data "
                "checksums (vmafs convert writes an archive that has them)"]

    def mode(self) -> str:
        return ("indexed: every read is checked against its checksum" if self.archive.indexed
                else "walked: it has no index, so no data checksums")

    # -- reads -----------------------------------------------------------------------------

    def reader(self, dev_id: int) -> Reader:
        return Reader(dev_id)

    @property
    def inline(self) -> bool:
        """True when reads never wait (a plain archive: index lookups and preads of a hot
        file; measured: a thread per 2 MiB read made qemu-img convert slower, as for the
        mount), so a server may answer them in order, in the task that parsed them."""
        return not self.archive.compressed and not self._remote

    def read_inline(self, dev_id: int, offset: int, size: int) -> bytes | memoryview:
        """A read of an `inline` session, from any thread (the model reads with pread
        only): device bytes [offset, offset+size), clipped at the end."""
        return self.archive.read(dev_id, offset, size)

    def streaming(self, reader: Reader, offset: int, size: int) -> bool:
        """The one place that decides what is sequential: a read that starts where the
        reader's last one ended, or inside a chunk being streamed, and follows another such
        read. Call it in request order (before any await), then `read_range`."""
        sequential = (offset == reader.next_offset
                      or (reader.dev_id, offset // CHUNK) in self._chunks)
        reader.streak = reader.streak + 1 if sequential else 0
        reader.next_offset = offset + size
        return reader.streak >= 1

    async def read(self, reader: Reader, offset: int, size: int) -> bytes | memoryview:
        """Device bytes [offset, offset+size), clipped at the device's end."""
        dev_id = reader.dev_id
        dev_size = self._sizes[dev_id]
        if offset >= dev_size or size <= 0:
            return b""
        size = min(size, dev_size - offset)
        streaming = self.streaming(reader, offset, size)
        return await self.read_range(dev_id, offset, size, streaming=streaming)

    async def read_range(self, dev_id: int, offset: int, size: int, *, streaming: bool
                         ) -> bytes | memoryview:
        """Device bytes [offset, offset+size) (clipped at the end); `streaming`: read whole
        chunks and the next ones ahead."""
        archive = self.archive
        if self.inline:
            return self.read_inline(dev_id, offset, size)
        size = min(size, max(0, self._sizes[dev_id] - offset))
        idx = offset // CHUNK
        if not size or ((offset + size - 1) // CHUNK == idx
                        and not self._holds_data(dev_id, idx)):
            return ZERO_VIEW[:size]  # a chunk without data: no index search per read
        at = None
        if self._advise and not streaming and (offset + size - 1) // BLOCK == offset // BLOCK:
            # a read in one block (a random reader's 4 KiB): where the block lies in the
            # stream says whether it is a hole too (measured: 3 µs, where _is_hole took 11)
            at = archive.stream_offset(dev_id, offset)
            if at is None:
                return ZERO_VIEW[:size]
        elif not streaming and size <= len(ZERO_VIEW) and self._is_hole(dev_id, offset, size):
            return ZERO_VIEW[:size]
        if streaming and self.nursery is not None:
            data = await self._read_chunked(dev_id, offset, size)
            if data is not None:
                return data
        if self._advise:
            # the disk starts on the read's first compressed bytes while its thread wakes
            if at is None:
                at = archive.stream_offset(dev_id, offset)
            if at is not None:
                archive.source.will_need([at], size)
        read = functools.partial(archive.read, dev_id, offset, size)
        near = self.near
        if near is not None and not near.busy:
            if near.follow(_this_cpu()):
                return await near.run(read)
            self.near = None
        return await self._run(read)

    async def _run(self, fn: Callable[[], T]) -> T:
        """fn() in a worker thread, WORKERS at once."""
        if self.workers is not None:
            return await self.workers.run(fn)
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def allocation(self, dev_id: int, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs from offset, covering at most `length` bytes (fewer when
        the device is very fragmented): what block status reports so clients skip holes.
        Cluster granular: a stored cluster is data even where some of its blocks are not."""
        end = min(offset + length, self._sizes[dev_id])
        if offset >= end:
            return []
        clusters = self.archive.stored_clusters(dev_id, offset // CLUSTER,
                                                (end - 1) // CLUSTER)
        runs: list[tuple[int, bool]] = []
        pos = offset
        if len(clusters):
            breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
            starts = np.concatenate(([0], breaks))[:MAX_RUNS]
            stops = np.concatenate((breaks, [len(clusters)]))[:MAX_RUNS]
            for a, b in zip(clusters[starts].tolist(), clusters[stops - 1].tolist(),
                            strict=True):
                lo, hi = max(a * CLUSTER, offset), min((b + 1) * CLUSTER, end)
                if lo > pos:
                    runs.append((lo - pos, True))
                runs.append((hi - lo, False))
                pos = hi
            if len(starts) == MAX_RUNS and pos < end:
                return runs
        if pos < end:
            runs.append((end - pos, True))
        return runs

    def _holds_data(self, dev_id: int, idx: int) -> bool:
        """Whether chunk idx of the device holds stored data: one bit per chunk, found for a
        GROUP of chunks at once (a streaming reader asks for every read it makes; two index
        searches per read cost a third of a remote mount's loop)."""
        group = idx // GROUP
        bits = self._data_bits.get((dev_id, group))
        if bits is None:
            per_chunk = CHUNK // CLUSTER
            first = group * GROUP * per_chunk
            last = min(first + GROUP * per_chunk, -(-self._sizes[dev_id] // CLUSTER)) - 1
            have = np.zeros(GROUP, np.uint8)
            if last >= first:
                have[self.archive.stored_clusters(dev_id, first, last) // per_chunk
                     - group * GROUP] = 1
            bits = self._data_bits[(dev_id, group)] = have.tobytes()
        return bool(bits[idx - group * GROUP])

    def _is_hole(self, dev_id: int, offset: int, size: int) -> bool:
        try:
            return self.archive.is_hole(dev_id, offset, size)
        except Exception:  # noqa: BLE001 - the read itself reports it
            return False

    async def _read_chunked(self, dev_id: int, offset: int, size: int
                            ) -> bytes | memoryview | None:
        """Serve a read from whole chunks and start reading the next ones. None if a chunk
        failed, so the caller re-reads exactly the asked range (a bad cluster must fail only
        the reads that touch it)."""
        dev_size = self._sizes[dev_id]
        size = min(size, dev_size - offset)
        first, last = offset // CHUNK, (offset + size - 1) // CHUNK
        nchunks = (dev_size + CHUNK - 1) // CHUNK
        new: list[tuple[int, _Fetch]] = []
        wanted = [(idx, self._claim(dev_id, idx, new)) for idx in range(first, last + 1)]
        self._start(dev_id, new)
        ahead: list[tuple[int, _Fetch]] = []
        for idx in range(last + 1, min(last + 1 + self._ahead, nchunks)):
            self._claim(dev_id, idx, ahead)
        if ahead and (len(ahead) >= self._batch or ahead[0][0] <= last + self._batch):
            self._start(dev_id, ahead)
        else:  # too few to be worth a worker call yet: claimed again by a later read
            for idx, _ in ahead:
                del self._chunks[(dev_id, idx)]
        parts: list[memoryview] = []
        for idx, fetch in wanted:
            start = max(offset, idx * CHUNK) - idx * CHUNK
            end = min(offset + size, (idx + 1) * CHUNK) - idx * CHUNK
            if fetch is None:
                parts.append(ZERO_VIEW[start:end])
                continue
            await fetch.done.wait()
            if fetch.failed:
                return None
            parts.append(memoryview(fetch.data)[start:end])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _claim(self, dev_id: int, idx: int, new: list[tuple[int, _Fetch]]) -> _Fetch | None:
        """The chunk's fetch; a new one (not started) is appended to `new`. None for a chunk
        that is all hole: answered from the zero buffer, no worker call."""
        key = (dev_id, idx)
        fetch = self._chunks.get(key)
        if fetch is not None:
            self._chunks.move_to_end(key)
            return fetch
        if not self._holds_data(dev_id, idx):
            return None
        fetch = self._chunks[key] = _Fetch()
        new.append((idx, fetch))
        return fetch

    def _start(self, dev_id: int, new: list[tuple[int, _Fetch]]) -> None:
        """Read claimed chunks, up to `_batch` of them in one worker call (a thread hop
        costs more daemon CPU than the bookkeeping of a chunk)."""
        while len(self._chunks) > self._cached:
            self._chunks.popitem(last=False)
        assert self.nursery is not None or not new
        for at in range(0, len(new), self._batch):
            assert self.nursery is not None
            self.nursery.start_soon(self._read_ahead, dev_id, new[at:at + self._batch])

    async def _read_ahead(self, dev_id: int, batch: list[tuple[int, _Fetch]]) -> None:
        """Read the batch's chunks in order in one worker thread, each handed back to the
        loop (run_sync_soon: the worker does not wait for it) as soon as it is read."""
        archive, size = self.archive, self._sizes[dev_id]
        token = trio.lowlevel.current_trio_token()

        def work() -> None:
            for idx, fetch in batch:
                if self._closing:  # the session is being left: the rest is never wanted
                    return
                try:
                    fetch.data = archive.read(dev_id, idx * CHUNK,
                                              min(CHUNK, size - idx * CHUNK))
                except Exception:  # noqa: BLE001 - reported by the exact re-read, if asked
                    fetch.failed = True
                token.run_sync_soon(self._done, dev_id, idx, fetch)

        try:
            await self._run(work)
        finally:  # cancelled before the thread ran, or it failed: nobody waits forever
            for idx, fetch in batch:
                if not fetch.done.is_set():
                    fetch.failed = True
                    self._done(dev_id, idx, fetch)

    def _done(self, dev_id: int, idx: int, fetch: _Fetch) -> None:
        if fetch.done.is_set():
            return
        if fetch.failed and self._chunks.get((dev_id, idx)) is fetch:
            del self._chunks[(dev_id, idx)]
        fetch.done.set()


def open_archive(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False
                 ) -> Archive:
    """The archive at path with its chain; an unreadable file is one line naming it."""
    from vmafs.archive.chain import open_chain
    try:
        return open_chain(path, bases, drop_behind=drop_behind)
    except OSError as exc:
        raise VmafsError(f"{display(path)}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def open_session(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False
                       ) -> AsyncIterator[Session]:
    """The archive at path (an incremental one with its chain, every link checked) opened
    for serving. Opening (a walk of an un-indexed archive can take seconds) runs in a thread,
    so signals are still heard; leaving closes everything it opened, read-ahead included."""
    async with contextlib.AsyncExitStack() as stack:
        archive = await trio.to_thread.run_sync(
            lambda: open_archive(path, bases, drop_behind=drop_behind), abandon_on_cancel=False)
        stack.callback(archive.close)
        session = await stack.enter_async_context(session_of(archive))
        session.path = path
        yield session


@contextlib.asynccontextmanager
async def session_of(archive: Archive) -> AsyncIterator[Session]:
    """A session over an archive the caller opened (and closes): its read-ahead runs in a
    nursery of its own, cancelled when the block is left. A thread loads the archive's block
    sums meanwhile (Archive.preload_sums), stopped and joined when the block is left."""
    stop = threading.Event()
    preload = threading.Thread(target=archive.preload_sums, args=(stop,), daemon=True,
                               name="vmafs-sums")
    preload.start()
    try:
        workers = _Workers(WORKERS)
        near = None
        try:
            async with trio.open_nursery() as nursery:
                session = Session(archive, nursery)
                session.workers = workers
                if archive.compressed and not session._remote and _this_cpu() >= 0:
                    near = session.near = _Workers(1)
                try:
                    yield session
                finally:
                    session._closing = True
                    session.workers = None  # a read that comes now hops with to_thread
                    session.near = None
                    nursery.cancel_scope.cancel()
        finally:
            workers.close()  # every call answered: the nursery waited for its tasks
            if near is not None:
                near.close()
    finally:
        stop.set()
        preload.join()  # at most one small read away
