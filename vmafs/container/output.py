"""Opening an archive for writing: the container follows the name, and nothing half-written
ever appears under the final name (a fresh exclusive temporary file, fsync, rename without
replacing). TempFile is the same rule for every file a command writes (extract uses it too)."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import io
import os
import queue
import secrets
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from vmafs.container.zstd_output import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    Output,
    PlainOutput,
    SeekableZstdOutput,
    Writable,
)
from vmafs.errors import UsageError, VmafsError
from vmafs.format.names import display
from vmafs.store import display_location, is_remote
from vmafs.store.local import stat_identity


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WRITE_AND_WAIT = 7  # WAIT_BEFORE | WRITE | WAIT_AFTER
_UNSUPPORTED = (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP)
WRITEBACK_STEP = 64 << 20
PACE_STEP = 8 << 20
"""Paced writeback (a live backup): the archive goes to disk in steps of at most this size, ..."""
PACE_MIN_STEP = 1 << 20
"""... and of at least this size (the first steps: the device's rate is not known yet), ..."""
PACE_WINDOW = 2
"""... at most this many steps of it at the device at a time, ..."""
PACE_LATENCY = 0.016
"""... sized so that what is at the device takes about this long to write at the rate the
device has been writing the archive (a guest write queued behind it waits that long). 16 ms
(tools/bench_guest_latency.py, 6 interleaved rounds: guest p99 26 ms, 8 ms: 34, the fixed
8 MiB steps before: 52; backup rate 1.23x and 1.12x theirs; 8 ms was 0.89x in a quiet run,
4 ms no better than 8). A fast device still gets PACE_STEP steps, ..."""
PACE_AHEAD = 64 << 20
"""... and the writer at most this far ahead of what is on disk (it waits beyond)."""


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk now, without waiting (Linux): a thread of
    its own asks the kernel, on a duplicate of fd, since sync_file_range submits the writes in
    the caller's context and blocks while the device's queue is full; a request for a file
    that one already waits for is dropped. Measured, extract of a 4 GiB half-data disk
    (tools/bench_restore.py, 5 interleaved rounds, load 8-10): 4.58 s and 2.20 s of CPU
    instead of 6.27 s and 2.77 s with the call in the copying thread."""
    if _SYNC_FILE_RANGE is None:
        return
    with _KICKS_LOCK:
        global _KICKS  # noqa: PLW0603 - one thread for the process, started on first use
        if _KICKS is None:
            _KICKS = queue.SimpleQueue()
            threading.Thread(target=_kick, args=(_KICKS,), name="vmafs-writeback",
                             daemon=True).start()
        ident = os.fstat(fd)
        key = (ident.st_dev, ident.st_ino)
        if key in _PENDING:
            return
        _PENDING.add(key)
    _KICKS.put((key, os.dup(fd)))


_KICKS: queue.SimpleQueue[tuple[tuple[int, int], int]] | None = None
_KICKS_LOCK = threading.Lock()
_PENDING: set[tuple[int, int]] = set()


def _kick(kicks: queue.SimpleQueue[tuple[tuple[int, int], int]]) -> None:
    assert _SYNC_FILE_RANGE is not None
    while True:
        key, fd = kicks.get()
        with _KICKS_LOCK:
            _PENDING.discard(key)
        try:
            _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # an error: fsync reports it
        finally:
            os.close(fd)


class WritebackFile:
    """A file whose dirty pages go to disk while it is written, not all at the final fsync.

    Otherwise gigabytes of dirty pages wait for the final fsync, and a backup pays the whole
    write-out at the end instead of overlapping it with the copy (measured: 0.62x -> 1.0x of
    qemu-img convert for a live backup). Unpaced: the kernel's writeback of the whole file is
    started every 64 MiB, without waiting. Paced: a Pacer thread writes it out step by step.
    """

    def __init__(self, raw: io.FileIO, *, paced: bool = False) -> None:
        self.raw = raw
        self.written = 0
        self._pacer = Pacer(raw.fileno()) if paced and _SYNC_FILE_RANGE is not None else None
        self._next = self._pacer.grain if self._pacer is not None else WRITEBACK_STEP

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        n = self.raw.write(data) or 0
        self._count(n)
        return n

    def _count(self, n: int) -> None:
        self.written += n
        if self.written >= self._next:
            if self._pacer is not None:
                self._next = self._pacer.advance(self.written)
            else:
                self._next = self.written + WRITEBACK_STEP
                start_writeback(self.raw.fileno())

    def writev(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write the pieces in order, all of them (os.writev: no joined copy)."""
        fd = self.raw.fileno()
        total = sum(memoryview(p).nbytes for p in parts)
        done = os.writev(fd, parts)
        if done < total:  # a short write: the rest one by one
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                rest = rest[os.write(fd, rest):]
        self._count(total)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Write the rest out paced and stop the pacer; raise the write error it met (the final
        fsync may not see it). The commit's fsync then finds only metadata to write, not what
        the disk was behind at the end (up to PACE_AHEAD), sent to the device at once in front
        of the guest's writes."""
        if self._pacer is not None:
            self._pacer.finish(self.written)
            self._pacer.check()

    def stop(self) -> None:
        """Stop the pacer, after a failure: its errors no longer matter."""
        if self._pacer is not None:
            self._pacer.stop()


class Pacer:
    """Writes a growing file out in steps, PACE_WINDOW at the device at a time, from its own
    thread (sync_file_range), and drops what is on disk from the page cache.

    Why (issue 17, tools/bench_guest_latency.py): a live backup's guest shares the disk with
    the archive, and a guest write queued at the device behind the archive's waits until they
    are written. Unpaced, 64 MiB of the archive at once is well over 100 requests queued in
    front of the guest's writes and its copy-before-write reads; paced, the archive keeps
    about PACE_LATENCY of the device's time there: each step is the bytes the device wrote of
    the archive in PACE_LATENCY / PACE_WINDOW at its recent rate (PACE_MIN_STEP from the first
    byte, up to PACE_STEP), so a device that slows down (others' I/O) gets smaller steps.
    The writer runs up to PACE_AHEAD ahead of the disk without waiting, so a device that
    stalls for a moment is absorbed in the page cache rather than by QEMU's copy-before-write
    requests (the sink's queue behind the writer stays free). A write error found by a wait
    here is consumed for the file (an fsync after it would succeed), so it is kept and raised
    to the writer: ``check``.
    """

    def __init__(self, fd: int, *, step: int | None = None, window: int | None = None,
                 ahead: int | None = None, min_step: int | None = None,
                 latency: float | None = None) -> None:
        self._fd = fd
        self._max_step = step or PACE_STEP
        self.grain = max(4096, min(min_step or PACE_MIN_STEP, self._max_step))
        self._window = max(1, window or PACE_WINDOW)
        self._latency = PACE_LATENCY if latency is None else latency
        self._ahead = max(ahead or PACE_AHEAD, self._max_step * (self._window + 1))
        self._cond = threading.Condition()
        self._limit = 0     # bytes written so far (what the writer reported)
        self.flushed = 0    # bytes on disk and dropped from the cache
        self.rate: float | None = None  # the device's recent rate for this file, bytes/s
        self._stopping = False
        self._draining = False  # finish(): write out everything up to _limit, then end
        self._off = False   # the thread has ended: nothing to wait for
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="vmafs-writeback", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> int:
        """The file has `written` bytes; wait while the disk is too far behind. Returns the
        size at which to call again."""
        with self._cond:
            self._limit = written
            self._cond.notify_all()
            while (written - self.flushed > self._ahead and self.error is None
                   and not self._off):
                self._cond.wait()
        self.check()
        return written - written % self.grain + self.grain

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self, written: int) -> None:
        """The file is complete at `written` bytes: write the rest out in paced steps, then
        end (an error: ``check``)."""
        with self._cond:
            self._limit = max(self._limit, written)
            self._draining = True
            self._cond.notify_all()
        self._thread.join()

    def stop(self) -> None:
        """Stop after the step being waited for (after a failure: the rest is not wanted)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._pace()
        except OSError as exc:
            self._end(exc)
        finally:
            self._end(None)  # the writer never waits for a pacer that is gone

    def _end(self, error: OSError | None) -> None:
        with self._cond:
            if error is not None and error.errno in _UNSUPPORTED:
                error = None  # a file system without it: the commit's fsync does it all
            if error is not None and self.error is None:
                self.error = error
            self._off = True
            self._cond.notify_all()

    def step(self) -> int:
        """The next step's size: PACE_LATENCY / window of the device's time at its recent
        rate, in whole grains, between the grain and the largest step."""
        if self.rate is None:
            return self.grain
        want = int(self.rate * self._latency / self._window)
        return max(self.grain, min(self._max_step, want - want % self.grain))

    def _pace(self) -> None:
        assert _SYNC_FILE_RANGE is not None
        fd = self._fd
        in_flight: collections.deque[tuple[int, int, float]] = collections.deque()
        submitted = 0
        last_done = 0.0
        moved = took = 0.0  # decaying sums: bytes written, the device's seconds on them
        while True:
            step = self.step()
            with self._cond:
                while (self._limit - submitted < step and not in_flight
                       and not self._stopping
                       and not (self._draining and self._limit > submitted)):
                    if self._draining:
                        return  # all of it on disk
                    self._cond.wait()
                if self._stopping:
                    return
                limit, draining = self._limit, self._draining
            while len(in_flight) < self._window and (
                    limit - submitted >= step or (draining and limit > submitted)):
                n = min(step, limit - submitted)
                _SYNC_FILE_RANGE(fd, submitted, n, _SYNC_FILE_RANGE_WRITE)
                in_flight.append((submitted, n, time.monotonic()))
                submitted += n
            old, n, sent = in_flight.popleft()
            if _SYNC_FILE_RANGE(fd, old, n, _SYNC_FILE_RANGE_WRITE_AND_WAIT) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            now = time.monotonic()
            # the device's time on this step alone; bytes and times are summed (decaying), not
            # rates averaged: steps at the device together complete in bursts, and a burst's
            # tiny interval as a rate of its own made every step the largest
            busy = now - max(sent, last_done)
            last_done = now
            if n >= self.grain:
                moved = 0.75 * moved + n
                took = 0.75 * took + busy
                self.rate = moved / took if took > 0 else None
            os.posix_fadvise(fd, old, n, os.POSIX_FADV_DONTNEED)
            with self._cond:
                self.flushed = old + n
                self._cond.notify_all()


def is_zstd_name(path: str) -> bool:
    return path.endswith((".zst", ".zstd"))


def check_output_name(path: str) -> None:
    """Refuse a bad archive name, a missing directory or an existing file, before any work
    starts."""
    if path == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write an archive to a terminal; redirect stdout")
        return
    if not path.endswith((".vma", ".vma.zst")):
        raise VmafsError(f"{path}: archive name must end in .vma or .vma.zst")
    if is_remote(path):
        if not path.startswith("s3://"):
            raise UsageError(f"{display_location(path)}: cannot write there (an http(s) URL is "
                             "read-only; write to a directory or s3://BUCKET/KEY)")
        from vmafs.store.s3 import S3Store

        S3Store.shared().check_new(path)  # the bucket, the credentials, no object there yet
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise VmafsError(f"{path}: directory {parent} does not exist")
    if os.path.lexists(path):
        raise VmafsError(f"{path} exists (vmafs does not replace existing files)")


@contextlib.contextmanager
def open_output(path: str, *, zstd: bool | None = None, level: int | None = None,
                threads: int = 2, frame_size: int | None = None,
                paced: bool = False) -> Iterator[Output]:
    """Yield an Output for PATH ('-' is stdout); commit on normal exit, discard on exception.
    ``level`` None: the seekable zstd default (DEFAULT_LEVEL, chosen with its frame size).

    The data goes to a fresh temporary file beside PATH (TempFile); PATH appears only when
    complete, and never replaces a file that is there. ``paced``: write it out in small
    steps as it comes (WritebackFile), for a live backup whose guest shares the disk.
    """
    check_output_name(path)
    compressed = is_zstd_name(path) if zstd is None else zstd
    level = DEFAULT_LEVEL if level is None else level
    if path == "-":
        with _archive_output(sys.stdout.buffer, compressed, level, threads, frame_size) as out:
            yield out
        return
    if is_remote(path):
        yield from _open_upload(path, compressed, level, threads, frame_size)
        return
    with open_dir(os.path.dirname(os.path.abspath(path))) as dir_fd:
        tmp = TempFile(dir_fd, os.fsencode(os.path.basename(path)), label=display(path))
        try:
            with os.fdopen(tmp.fd, "wb", buffering=0, closefd=False) as target:
                wb = WritebackFile(target, paced=paced)
                try:
                    with _archive_output(wb, compressed, level, threads, frame_size) as out:
                        yield out
                    wb.close()
                finally:
                    wb.stop()
            tmp.commit()
        except BaseException:
            tmp.discard()
            raise
        if out.on_commit is not None and (identity := tmp.identity()) is not None:
            out.on_commit(identity)


def _open_upload(path: str, compressed: bool, level: int, threads: int,
                 frame_size: int | None) -> Iterator[Output]:
    """A store's upload (an S3 multipart upload): the archive streams into it and appears
    only at commit; any failure, Ctrl-C or SIGTERM aborts it (nothing left behind)."""
    from vmafs.store import store_for

    upload = store_for(path).create(path)
    try:
        with _archive_output(upload, compressed, level, threads, frame_size) as out:
            yield out
        upload.commit()
    except BaseException:
        try:
            upload.abort()
        except VmafsError as exc:  # the failure itself is what the command reports
            print(f"vmafs: warning: {exc}", file=sys.stderr)
        raise


# --- exclusive temporary files ------------------------------------------------------------------

_TEMP_SUFFIX = b".part"
_TEMP_RANDOM = 6
_TEMP_STEM_MAX = 255 - 2 - _TEMP_RANDOM - len(_TEMP_SUFFIX)  # "." NAME "." XXXXXX ".part"
_RENAME_NOREPLACE = 1


def temp_name(final: bytes) -> bytes:
    """A fresh temporary name for FINAL: .FINAL.XXXXXX.part (random), within NAME_MAX."""
    tag = secrets.token_hex(_TEMP_RANDOM // 2).encode()
    return b"." + final[:_TEMP_STEM_MAX] + b"." + tag + _TEMP_SUFFIX


@contextlib.contextmanager
def open_dir(path: str | bytes) -> Iterator[int]:
    """A directory fd, so every name below is resolved in the same directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class TempFile:
    """A new file under a fresh name in a directory, later committed under its final name or
    discarded. Created with O_CREAT|O_EXCL|O_NOFOLLOW, so it is never a file that was there and
    never reached through a symlink; discard removes only this file, commit never replaces a
    file the user had (unless asked to, and then it replaces a symlink, never follows it).
    It is flock()ed while written, up to and through the rename, so a temporary file of a
    command still running is never taken for one a killed command left (stale_temp)."""

    def __init__(self, dir_fd: int, final: bytes, *, label: str | None = None) -> None:
        self.dir_fd = dir_fd
        self.final = final
        self.label = label if label is not None else os.fsdecode(final)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            name = temp_name(final)
            try:
                self.fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except OSError as exc:  # named by the file the user asked for, not the temp name
                raise VmafsError(f"cannot write {self.label}: {exc.strerror}") from None
            break
        else:
            raise VmafsError(f"{self.label}: cannot create a temporary file beside it")
        self.name = name
        # Waits if need be: a prune looking at the new file holds a shared lock for an instant
        # (temp_in_use), and without the lock the whole run would pass for a killed one's.
        with contextlib.suppress(OSError):  # a file system without flock: no sweep finds it
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)
        self._open = True
        self._done = False

    def commit(self, *, replace: bool = False) -> None:
        """fsync, mode 0644 & ~umask, then rename to the final name (atomically, even with
        replace); fails with "NAME exists" rather than replace a file without replace."""
        os.fsync(self.fd)
        os.fchmod(self.fd, 0o644 & ~current_umask())
        try:  # renamed while still open and locked: never unlocked under its temporary name
            if replace:
                os.rename(self.name, self.final, src_dir_fd=self.dir_fd,
                          dst_dir_fd=self.dir_fd)
            else:
                try:
                    rename_noreplace(self.dir_fd, self.name, self.final)
                except FileExistsError:
                    raise VmafsError(f"{self.label} exists (vmafs does not replace existing "
                                     "files)") from None
            self._done = True
        finally:
            self._close()
        os.fsync(self.dir_fd)

    def identity(self) -> bytes | None:
        """The committed file's identity (file_identity), if the final name is still this
        file; None otherwise (replaced since, or not committed)."""
        if not self._done:
            return None
        try:
            st = os.stat(self.final, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return None
        return stat_identity(st) if (st.st_dev, st.st_ino) == self._id else None

    def discard(self) -> None:
        """Remove the temporary file, if it is still ours and was not committed."""
        self._close()
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._id:
                os.unlink(self.name, dir_fd=self.dir_fd)

    def _close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)


_WHOLE_WRITE_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # flock


def is_locked(fd: int) -> bool:
    """Whether another open file holds a byte-range lock on the file (QEMU marks the images
    and devices a VM runs on so: OFD locks at 100 and 200 + each permission); False where
    the file system cannot say."""
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WHOLE_WRITE_LOCK)
    except OSError:
        return False
    return struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK


def lock_whole(fd: int) -> bool:
    """Write-lock the whole file for as long as fd is open (a QEMU started on it then fails
    to take its locks); False when another open file holds a lock on it. True where the
    file system has no such locks."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_WRITE_LOCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
    return True


STALE_AFTER = 3600  # s: a temporary file unchanged this long and unlocked is a leftover


def temp_final(name: str) -> str | None:
    """The final name a temporary name (.FINAL.XXXXXX.part) was made for, else None."""
    if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX.decode())):
        return None
    stem, dot, tag = name[1:-len(_TEMP_SUFFIX)].rpartition(".")
    if not dot or not stem or len(tag) != _TEMP_RANDOM or tag.strip("0123456789abcdef"):
        return None
    return stem


def open_existing(dir_fd: int, name: str | bytes) -> int | None:
    """The file under name opened to look at (read-only, never through a symlink, never
    waiting on a FIFO), None if it cannot be."""
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except OSError:
        return None


def temp_in_use(dir_fd: int, name: str) -> bool:
    """Whether a running command is writing the temporary file (its TempFile's lock)."""
    fd = open_existing(dir_fd, name)
    if fd is None:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    finally:
        os.close(fd)
    return False


def remove_stale_temp(dir_fd: int, name: str, *, now: float, dry_run: bool = False) -> bool:
    """Remove a temporary file a killed command left (True), never one being written: it
    must be a regular file unchanged for STALE_AFTER seconds that nobody holds locked (a
    running command's TempFile holds its lock until renamed), still under this name."""
    fd = open_existing(dir_fd, name)
    if fd is None:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < STALE_AFTER:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a command is writing it
        try:
            now_st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        if (now_st.st_dev, now_st.st_ino) != (st.st_dev, st.st_ino):
            return False
        if not dry_run:
            os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def rename_noreplace(dir_fd: int, src: bytes, dst: bytes) -> None:
    """Rename src to dst in one directory, FileExistsError if dst exists (even a symlink).

    renameat2(RENAME_NOREPLACE) where the kernel and file system have it; else a hard link
    (which never replaces) and unlink; else, on file systems without either, a check and a
    rename (the one case with a race, against another writer of the same name).
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(dir_fd, src, dir_fd, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), os.fsdecode(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        try:
            os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst)) from None
    os.unlink(src, dir_fd=dir_fd)


@contextlib.contextmanager
def _archive_output(target: Writable, compressed: bool, level: int, threads: int,
                    frame_size: int | None) -> Iterator[Output]:
    """The archive's output over target: closed (everything written) when the block ends
    well, aborted (nothing more written) when it raises."""
    out = _make(target, compressed, level, threads, frame_size)
    try:
        yield out
        out.close()
    except BaseException:
        out.abort()
        raise


def _make(target: Writable, compressed: bool, level: int, threads: int,
          frame_size: int | None = None) -> Output:
    if compressed:
        return SeekableZstdOutput(target, level=level, threads=threads,
                                  frame_size=frame_size or DEFAULT_FRAME_SIZE)
    return PlainOutput(target)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
