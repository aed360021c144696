"""A local directory as a store: regular files only (a symlink is its target), never opening
anything that could block (a FIFO), outputs under an exclusive temporary name renamed at
commit (container/output.TempFile)."""

from __future__ import annotations

import io
import os
import stat
import struct

from vmafs.errors import VmafsError
from vmafs.format.names import display
from vmafs.store import Entry, UploadsInProgress


def stat_identity(st: os.stat_result) -> bytes:
    """Device, inode, size, mtime and ctime: any change to the file changes one of them."""
    return struct.pack("<QQQqq", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                       st.st_ctime_ns)


class LocalObject:
    """A file descriptor as a StoredObject (pread, so any thread may read at any offset)."""

    def __init__(self, fd: int, name: str, *, own: bool = True) -> None:
        self.fd = fd
        self.name = name
        self.own = own
        st = os.fstat(fd)
        self.regular = stat.S_ISREG(st.st_mode)
        self._size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while 0 < len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def readinto(self, offset: int, view: memoryview) -> int:
        got = os.preadv(self.fd, [view], offset)
        while 0 < got < len(view):
            more = os.preadv(self.fd, [view[got:]], offset + got)
            if not more:
                break
            got += more
        return got

    def advise(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def identity(self) -> bytes:
        return stat_identity(os.fstat(self.fd))

    def close(self) -> None:
        if self.own and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class LocalUpload:
    """A file written under a fresh temporary name beside its final one, renamed at commit."""

    def __init__(self, path: str) -> None:
        from vmafs.container.output import TempFile

        self._dir_fd = os.open(os.path.dirname(os.path.abspath(path)),
                               os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._tmp = TempFile(self._dir_fd, os.fsencode(os.path.basename(path)),
                                 label=display(path))
        except BaseException:
            os.close(self._dir_fd)
            raise

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._tmp.fd, view[done:])
        return done

    def commit(self) -> None:
        try:
            self._tmp.commit()
        finally:
            os.close(self._dir_fd)

    def abort(self) -> None:
        self._tmp.discard()
        os.close(self._dir_fd)


class LocalStore:
    """Archives in a directory of the local file system."""

    def list(self, place: str) -> list[Entry]:
        """Regular files directly in the directory (symlinks followed), by name; nothing else,
        and nothing is opened."""
        directory = place or "."
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise VmafsError(f"cannot list {display(directory)}: {exc.strerror}") from None
        out = []
        for name in names:
            path = os.path.join(place, name) if place else name
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone since the listing, or a dangling symlink
            if stat.S_ISREG(st.st_mode):
                out.append(Entry(name, path, st.st_size, stat_identity(st)))
        return out

    def stat(self, location: str) -> Entry | None:
        try:
            st = os.stat(location)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VmafsError(f"cannot open {display(location)}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise VmafsError(f"{display(location)}: not a regular file")
        return Entry(os.path.basename(location), location, st.st_size, stat_identity(st))

    def open(self, location: str) -> LocalObject:
        from vmafs.container.source import open_file

        return LocalObject(open_file(location), location)

    def open_stream(self, location: str) -> io.RawIOBase:
        from vmafs.container.source import open_file

        return open(open_file(location), "rb", buffering=0)  # noqa: SIM115 - returned

    def create(self, location: str) -> LocalUpload:
        return LocalUpload(location)

    def mark(self, location: str) -> bool:
        """An empty file created exclusively (never through a symlink), synced with its
        directory so the mark survives a crash."""
        directory = os.path.dirname(location) or "."
        try:
            fd = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise VmafsError(f"cannot create {display(location)}: {exc.strerror}") from None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    def uploads(self, place: str) -> UploadsInProgress:
        return []  # a file being written is a .part file beside the archives (Place.live_temps)

    def remove(self, location: str, identity: bytes | None = None) -> None:
        """Unlink the name (never what a symlink points to), if it still is the file read."""
        try:
            st = os.stat(location, follow_symlinks=False)
        except FileNotFoundError:
            return
        if identity is not None and (not stat.S_ISREG(st.st_mode)
                                     or stat_identity(st) != identity):
            raise VmafsError(f"{display(location)}: replaced since it was read; not removed")
        try:
            os.unlink(location)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise VmafsError(f"cannot remove {display(location)}: {exc.strerror}") from None
