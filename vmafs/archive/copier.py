"""The copy engine: a whole disk out of an archive into a file or a block device, stored data
only, in few large writes. extract and restore share it.

Into a sparse file, holes stay holes (nothing is written there). Onto a block device (or a
file that already has content), what the archive holds as holes must read as zeros afterwards:
the gaps are discarded where the device guarantees zeros (fallocate PUNCH_HOLE, what
`qemu-img convert` does), zeroed by the kernel otherwise (ZERO_RANGE), written as zeros last;
clusters stored in part are written whole.

Data read into the walk's extent buffers (page-aligned) is written around the page cache
(O_DIRECT, a second descriptor of the same file) where the file system allows it: the file is
fsynced before it is renamed into place, so the disk takes the data anyway, and a buffered
write cost the CPU of allocating, charging and filling a page of cache for each 4 KiB of it
(extract: ~0.5 CPU-s a GiB written, an O_DIRECT write ~0.05).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import io
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, cast

import numpy as np

from vmafs.archive.reader import ZEROS, Archive
from vmafs.archive.scan import StoredCluster
from vmafs.archive.walk import READ_AHEAD, Extent
from vmafs.buffers import address
from vmafs.container.output import WRITEBACK_STEP, start_writeback
from vmafs.errors import VmafsError
from vmafs.format import vma

COPY_BATCH = 256  # clusters written at once (whole adjacent ones by one pwritev)
# Buffered writes into a fresh file cost CPU (page allocation, delayed-allocation accounting,
# the copy): a large batch is split among this many threads, as qemu-img's parallel requests do.
WRITERS = 2
PARALLEL_MIN = 1 << 20   # smaller batches are written by the caller alone

DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and memory aligned to this (a page: any
# logical block size up to 4 KiB)
# local file systems on a disk whose O_DIRECT writes are plain: ext2/3/4, XFS, btrfs, F2FS
# (not tmpfs, whose data is its page cache, nor NFS, FUSE and the like, where a direct write
# waits for a server: buffered there, as before)
_DIRECT_FS = frozenset((0xEF53, 0x58465342, 0x9123683E, 0xF2F52010))

_KEEP_SIZE = 0x01
_PUNCH_HOLE = 0x02
_ZERO_RANGE = 0x10


def copy_device(archive: Archive, dev_id: int, fd: int, progress: Callable[[int], None],
                *, dense: bool = False, packed: np.ndarray | None = None,
                packed_at: int = 0) -> int:
    """A device as the model reads it (a chain: each cluster from its newest archive) into
    fd; returns the data bytes written. `dense`: fd has old content (a block device), so holes
    are zeroed and partial clusters written whole; otherwise fd is a fresh sparse file of the
    device's size and holes stay holes. `packed`: the device's stored clusters (ascending,
    Archive.stored_clusters), written one after another from file cluster `packed_at` (a
    qcow2 image's data area) instead of at their offsets in the disk."""
    size = archive.device(dev_id).size
    limit = size if packed is None else 1 << 62  # what write_extent clips at
    steps = [0]  # writeback steps kicked

    def kick(total: int) -> None:
        if total // WRITEBACK_STEP != steps[0]:  # overlap the disk writes with the reads
            steps[0] = total // WRITEBACK_STEP
            start_writeback(fd)

    # the clusters' views stay valid after the reader moves on (each window's reads are
    # buffers of their own): written behind, while the next ones are checked
    behind = WriteBehind({dev_id: fd}, {dev_id: limit}, kick=kick)
    try:
        written = _copy_device(archive, dev_id, fd, size, behind, progress, dense, packed,
                               packed_at)
        behind.finish()
    finally:
        behind.close()
    return written


def _copy_device(archive: Archive, dev_id: int, fd: int, size: int, behind: WriteBehind,
                 progress: Callable[[int], None], dense: bool, packed: np.ndarray | None,
                 packed_at: int) -> int:
    zero = _Zeroer(fd) if dense else None
    batch: list[StoredCluster] = []
    done = 0      # device bytes accounted for
    covered = 0   # device bytes written or zeroed (dense)
    written = 0
    rank = 0      # stored clusters met (packed)
    for cluster, mask, data, _ in archive.iter_stored(dev_id):
        start = cluster * vma.CLUSTER_SIZE
        if zero is not None:
            if start > covered:
                zero(covered, start - covered)
            if mask != vma.FULL_MASK:
                data, mask = memoryview(vma.expand_blocks(data, mask)), vma.FULL_MASK
            covered = min(start + vma.CLUSTER_SIZE, size)
        place = cluster
        if packed is not None and mask:
            if rank >= len(packed) or packed[rank] != cluster:
                raise VmafsError(f"cluster {cluster} is not where the image's map has it")
            place, rank = packed_at + rank, rank + 1
            if start + vma.CLUSTER_SIZE > size:  # the disk's last cluster: nothing past it
                whole = memoryview(vma.expand_blocks(data, mask))
                data, mask = whole[:max(0, size - start)], vma.FULL_MASK
        batch.append(StoredCluster(dev_id, place, mask, 0, data))
        written += len(data)
        if len(batch) == COPY_BATCH:
            behind.put(batch)
            reached = min((cluster + 1) * vma.CLUSTER_SIZE, size)
            progress(reached - done)
            done, batch = reached, []
    if batch:
        behind.put(batch)
    if packed is not None and rank != len(packed):
        raise VmafsError(f"{len(packed) - rank} clusters of the image's map were not read")
    if zero is not None and covered < size:
        zero(covered, size - covered)
    progress(size - done)
    return written


class _Zeroer:
    """Make [offset, offset+length) of fd read as zeros, the cheapest way fd allows."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.modes = [_PUNCH_HOLE | _KEEP_SIZE, _ZERO_RANGE | _KEEP_SIZE]
        self._fallocate = _libc_fallocate()

    def __call__(self, offset: int, length: int) -> None:
        while self.modes and self._fallocate is not None:
            if self._fallocate(self.fd, self.modes[0], offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
            self.modes.pop(0)
        view = memoryview(ZEROS)
        end = offset + length
        while offset < end:
            offset += os.pwrite(self.fd, view[:min(len(view), end - offset)], offset)


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    return _libc_fn("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def _libc_fn(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """A libc function returning an int (errno kept for ctypes.get_errno), None if absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return cast(Callable[..., int], fn)


class DirectFds:
    """For each output fd, a second descriptor of its file opened with O_DIRECT, where that
    helps: a block device, or a file on a local disk's file system (_DIRECT_FS). Close it
    when the writes are done (before the fsync of the files)."""

    def __init__(self, fds: Iterable[int]) -> None:
        self.direct: dict[int, int] = {}
        for fd in fds:
            if fd not in self.direct and _direct_helps(fd):
                with contextlib.suppress(OSError):  # none (no O_DIRECT, no /proc): buffered
                    self.direct[fd] = os.open(f"/proc/self/fd/{fd}",
                                              os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)

    def close(self) -> None:
        direct, self.direct = self.direct, {}
        for dfd in direct.values():
            os.close(dfd)

    def __enter__(self) -> DirectFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pwritev(self, fd: int, views: list[memoryview], offset: int) -> None:
        """Write views at offset of fd: whole pages of page-aligned memory at page-aligned
        offsets through fd's O_DIRECT descriptor (the walk's extent buffers), the rest
        buffered (memory of bytes objects: a copy through an aligned buffer made a restore's
        CPU no smaller and its wall time longer). A file system that refuses (EINVAL) gets
        buffered writes from then on."""
        dfd = self.direct.get(fd, -1)
        if dfd < 0:
            _pwritev_all(fd, views, offset)
            return
        at = offset
        pending: list[memoryview] = []  # buffered views, adjacent: one pwritev
        for view in views:
            whole = len(view) - len(view) % DIRECT_ALIGN
            if not (whole and at % DIRECT_ALIGN == 0 and address(view) % DIRECT_ALIGN == 0):
                pending.append(view)
                at += len(view)
                continue
            if pending:
                _pwritev_all(fd, pending, at - sum(len(v) for v in pending))
                pending = []
            try:
                _pwrite_all(dfd, view[:whole], at)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                del self.direct[fd]
                os.close(dfd)
                _pwritev_all(fd, _after(views, at - offset), at)
                return
            if whole < len(view):  # a tail within a page (a disk's last cluster)
                pending.append(view[whole:])
            at += len(view)
        if pending:
            _pwritev_all(fd, pending, at - sum(len(v) for v in pending))


def _direct_helps(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    if stat.S_ISBLK(mode):
        return True
    if not stat.S_ISREG(mode):
        return False
    fstatfs = _libc_fn("fstatfs", [ctypes.c_int, ctypes.c_void_p])
    if fstatfs is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type first (a long)
    if fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in _DIRECT_FS


def _after(views: list[memoryview], skip: int) -> list[memoryview]:
    """views without their first `skip` bytes."""
    rest = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        rest.append(view[skip:])
        skip = 0
    return rest


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_extent(fds: dict[int, int], slots: list[StoredCluster], sizes: dict[int, int],
                 *, threads: int = WRITERS, direct: DirectFds | None = None) -> int:
    """Write an extent's stored data, runs of whole adjacent clusters in one pwritev (a large
    extent by `threads` threads at once; through `direct` where it has the fd); returns the
    bytes written. The slots' data is not used after it returns."""
    written = sum(len(s.data) for s in slots if s.dev_id in fds)
    pieces: list[tuple[int, int, memoryview]] = []   # (fd, offset, whole clusters' bytes)
    for slot in slots:
        fd = fds.get(slot.dev_id)
        if fd is None or not slot.mask:
            continue
        if slot.mask != vma.FULL_MASK:
            write_cluster(fd, slot, sizes[slot.dev_id])
            continue
        start = slot.cluster * vma.CLUSTER_SIZE
        pieces.append((fd, start, slot.data[:sizes[slot.dev_id] - start]))
    total = sum(len(p[2]) for p in pieces)
    if total < PARALLEL_MIN or threads < 2:
        _write_pieces(pieces, direct)
        return written
    cuts = [0]
    done = 0
    for i, (_, _, data) in enumerate(pieces):
        done += len(data)
        if done * threads >= total * len(cuts) and len(cuts) < threads:
            cuts.append(i + 1)
    cuts.append(len(pieces))
    pool = _writer_pool()
    others: list[Future[None]] = [pool.submit(_write_pieces, pieces[a:b], direct)
                                  for a, b in zip(cuts[1:-1], cuts[2:], strict=True)]
    try:
        _write_pieces(pieces[cuts[0]:cuts[1]], direct)
    finally:
        for f in others:
            f.result()  # wait for every write, then raise the first failure
    return written


def extent_runs(fds: dict[int, int], sizes: dict[int, int], ext: Extent, data: memoryview
                ) -> tuple[list[tuple[int, int, memoryview]], list[StoredCluster], int]:
    """What write_extent writes of an extent, from its columns (no object a slot: ~0.25 ms
    of Python an extent less): runs of whole adjacent clusters of one device as (fd, offset,
    bytes), clipped at the device's end; its clusters stored in part; the stored bytes of
    the devices in fds."""
    runs: list[tuple[int, int, memoryview]] = []
    partial: list[StoredCluster] = []
    written = pos = 0
    run_fd = run_dev = -1
    run_start = run_end = run_pos = 0
    counts, full = vma.POPCOUNT16_LIST, vma.FULL_MASK
    for dev_id, cluster, mask in zip(ext.dev_ids.tolist(), ext.clusters.tolist(),
                                     ext.masks.tolist(), strict=True):
        if not mask:
            continue
        n = counts[mask] * vma.BLOCK_SIZE
        fd = fds.get(dev_id)
        if fd is not None:
            written += n
            start = cluster * vma.CLUSTER_SIZE
            if mask != full:
                partial.append(StoredCluster(dev_id, cluster, mask, 0, data[pos:pos + n]))
            elif fd == run_fd and start == run_end and pos == run_pos + run_end - run_start:
                run_end += n
            else:
                if run_fd >= 0:
                    end = min(run_end, sizes[run_dev])
                    runs.append((run_fd, run_start, data[run_pos:run_pos + end - run_start]))
                run_fd, run_dev, run_start, run_end, run_pos = fd, dev_id, start, start + n, pos
        pos += n
    if run_fd >= 0:
        end = min(run_end, sizes[run_dev])
        runs.append((run_fd, run_start, data[run_pos:run_pos + end - run_start]))
    return runs, partial, written


class WriteBehind:
    """Extents written by a thread of their own, at most `depth` queued: the caller goes on
    (checks the extent, the next one's header) while one is written, instead of waiting for
    its write (extract from S3: the main thread spent ~60 % of its time in writes). A queued
    write reads views of a buffer that their producer refills: the producer calls fence(buffer)
    before it does, and waits there until no queued write still reads that buffer. A failed
    write is raised by the next put(), or by finish(); the writes after it are skipped."""

    def __init__(self, fds: dict[int, int], sizes: dict[int, int], *, depth: int = 2,
                 kick: Callable[[int], None] | None = None) -> None:
        self._fds = fds
        self._sizes = sizes
        self._depth = depth
        self._kick = kick  # told the bytes written so far after each write (writeback)
        # an extent's slots, or the extent and its data; the ids of the buffers they read
        self._jobs: queue.SimpleQueue[tuple[list[StoredCluster] | tuple[Extent, memoryview],
                                            list[int]] | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._busy: collections.Counter[int] = collections.Counter()  # id(buffer): writes
        self._queued = 0
        self._written = 0
        self._error: BaseException | None = None
        self._direct = DirectFds(fds.values())
        self._thread = threading.Thread(target=self._run, name="vmafs-write", daemon=True)
        self._thread.start()

    @property
    def direct(self) -> bool:
        """Whether some of its writes go around the page cache (and wait for the disk)."""
        return bool(self._direct.direct)

    @property
    def depth(self) -> int:
        return self._depth

    def put(self, slots: list[StoredCluster]) -> None:
        """Queue an extent's stored clusters (waits while `depth` are queued)."""
        self._queue(slots, [id(slot.data.obj) for slot in slots])

    def put_extent(self, ext: Extent, data: memoryview) -> None:
        """Queue an extent's data, all of one buffer (waits while `depth` are queued)."""
        self._queue((ext, data), [id(data.obj)])

    def _queue(self, job: list[StoredCluster] | tuple[Extent, memoryview],
               buffers: list[int]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._queued < self._depth or self._error is not None)
            if self._error is not None:
                raise self._error
            self._queued += 1
            for key in buffers:
                self._busy[key] += 1
        self._jobs.put((job, buffers))

    def fence(self, buffer: object) -> None:
        """Wait until no queued write reads buffer (its producer is about to refill it)."""
        if not self._busy.get(id(buffer)):  # no lock: a buffer given back is not queued again
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._busy.get(id(buffer)))

    def fenced(self, stream: BinaryIO) -> BinaryIO:
        """stream, read through the fence: for a forward walk whose extent buffers are the
        ones queued here."""
        return cast(BinaryIO, _Fenced(stream, self))

    def finish(self) -> None:
        """Wait for every write; raise the first failure."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queued)
        self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread (the writes queued are done or skipped first)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._direct.close()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, buffers = item
            try:
                if self._error is None:
                    self._written += self._write(job)
                    if self._kick is not None:
                        self._kick(self._written)
            except BaseException as exc:  # noqa: BLE001 - raised to the caller
                self._error = exc
            del item, job
            with self._cond:
                for key in buffers:
                    self._busy[key] -= 1
                    if not self._busy[key]:
                        del self._busy[key]
                self._queued -= 1
                self._cond.notify_all()

    def _write(self, job: list[StoredCluster] | tuple[Extent, memoryview]) -> int:
        if isinstance(job, list):
            return write_extent(self._fds, job, self._sizes, threads=1, direct=self._direct)
        runs, partial, written = extent_runs(self._fds, self._sizes, *job)
        _write_pieces(runs, self._direct)
        for slot in partial:
            write_cluster(self._fds[slot.dev_id], slot, self._sizes[slot.dev_id])
        return written


class _Fenced(io.RawIOBase):
    """A stream whose reader waits, before it refills a buffer, until the writes queued
    behind (WriteBehind) no longer read it: the forward walk reads a stream only through
    readinto (read() comes here too), into a ring of extent buffers it reuses."""

    def __init__(self, stream: BinaryIO, behind: WriteBehind) -> None:
        self._stream = stream
        self._behind = behind
        hint = getattr(stream, "read_ahead_bytes", 0)  # what the walk keeps read ahead
        if behind.direct:  # its writes wait for the disk: buffers for those queued, too
            hint = max(hint, READ_AHEAD * vma.MAX_EXTENT_SIZE) + behind.depth * \
                vma.MAX_EXTENT_SIZE
        self.read_ahead_bytes = hint

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        self._behind.fence(memoryview(b).obj)
        return cast(int, self._stream.readinto(b))  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)  # new bytes (the extent headers): nothing to wait for


def _write_pieces(pieces: list[tuple[int, int, memoryview]],
                  direct: DirectFds | None = None) -> None:
    """Each run of adjacent pieces of one fd by one pwritev (through `direct` if given)."""
    write = _pwritev_all if direct is None else direct.pwritev
    run: list[memoryview] = []
    run_fd, run_start, run_end = -1, 0, 0
    for fd, start, data in pieces:
        if run and (fd != run_fd or start != run_end):
            write(run_fd, run, run_start)
            run = []
        if not run:
            run_fd, run_start = fd, start
        run.append(data)
        run_end = start + len(data)
    if run:
        write(run_fd, run, run_start)


_POOL: ThreadPoolExecutor | None = None


def _writer_pool() -> ThreadPoolExecutor:
    global _POOL  # noqa: PLW0603 - one pool for the process, made on first use
    if _POOL is None:
        _POOL = ThreadPoolExecutor(WRITERS - 1, thread_name_prefix="vmafs-write")
    return _POOL


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """pwritev, continued after a short write (a block device may take less at once)."""
    total = sum(len(v) for v in views)
    done = os.pwritev(fd, views, offset)
    if done == total:
        return
    data = memoryview(b"".join(views))
    while done < total:
        done += os.pwrite(fd, data[done:], offset + done)


def write_cluster(fd: int, slot: StoredCluster, size: int) -> None:
    """Write the stored blocks of one cluster; clear blocks stay holes in the sparse file."""
    base = slot.cluster * vma.CLUSTER_SIZE
    pos = 0
    j = 0
    while j < vma.BLOCKS_PER_CLUSTER:
        if not slot.mask >> j & 1:
            j += 1
            continue
        run = j
        while run < vma.BLOCKS_PER_CLUSTER and slot.mask >> run & 1:
            run += 1
        n = (run - j) * vma.BLOCK_SIZE
        start = base + j * vma.BLOCK_SIZE
        os.pwrite(fd, slot.data[pos:pos + min(n, size - start)], start)
        pos += n
        j = run
