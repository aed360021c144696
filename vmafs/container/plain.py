"""An uncompressed .vma file as a ByteSource."""

from __future__ import annotations

import os
from typing import cast

import numpy as np

from vmafs.container.source import file_identity
from vmafs.store import StoredObject

CLUSTER = 65536


class PlainSource:
    """An uncompressed .vma file.

    A reader that goes through the stream in order gets the next PREFETCH bytes requested
    ahead (POSIX_FADV_WILLNEED), so the disk works while the data already read is served. With
    `drop_behind`, what such a reader has passed is dropped from the page cache: when the mount
    serves it through the page cache, a second cached copy would only double the memory used
    (and filling fresh pages is what costs most in a streaming read).
    """

    PREFETCH = 8 << 20

    def __init__(self, fd: int, *, drop_behind: bool = False) -> None:
        self.fd = fd
        self.drop_behind = drop_behind
        self._size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
        self._next = 0  # where a sequential reader reads next
        self._ahead = 0  # end of what was already requested ahead
        self._behind = 0  # where the sequential reader's run started, or was dropped up to

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        end = offset + length
        sequential = abs(offset - self._next) <= CLUSTER
        if not sequential:
            self._ahead = end  # a new run: nothing of it was requested ahead yet
        elif end + self.PREFETCH // 2 > self._ahead:
            start = max(end, self._ahead)
            self._ahead = end + self.PREFETCH
            os.posix_fadvise(self.fd, start, self._ahead - start, os.POSIX_FADV_WILLNEED)
        self._next = end
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        if not sequential:
            self._behind = offset
        elif self.drop_behind and offset > self._behind:
            # whole pages only: the page holding `offset` may still be needed by this read
            os.posix_fadvise(self.fd, self._behind, offset - self._behind,
                             os.POSIX_FADV_DONTNEED)
            self._behind = offset
        return data

    checked_by_reader = False  # nothing to skip: a plain file has no checks of its own

    def check_layout(self) -> None:
        """A plain file is the stream itself."""

    def identity(self) -> bytes:
        return file_identity(self.fd)

    def will_need(self, offsets: list[int], length: int) -> None:
        for offset in offsets:
            if offset < self._size:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self.fd)


class StoredPlainSource:
    """An uncompressed .vma held by a store (S3, a URL): the store's object reads ahead for a
    sequential reader itself, and fetches only what a random read asks for."""

    remote = True  # reads may wait on the network
    checked_by_reader = False

    def __init__(self, obj: StoredObject) -> None:
        self.obj = obj
        self.name = obj.name

    @property
    def size(self) -> int:
        return self.obj.size

    def pread(self, offset: int, length: int) -> memoryview:
        view = getattr(self.obj, "view", None)
        if view is not None:  # a sequential reader's read within one fetched chunk: a view
            # of it, not a copy into a fresh buffer (RangedObject.view)
            return cast(memoryview, view(offset, length))
        size = max(0, min(length, self.obj.size - offset))
        # filled straight from the fetched ranges (one copy), so never zeroed first
        buf = np.empty(size, np.uint8).data
        return buf[:self.obj.readinto(offset, buf)]

    def check_layout(self) -> None:
        """A plain object is the stream itself."""

    def identity(self) -> bytes:
        return self.obj.identity()

    def will_need(self, offsets: list[int], length: int) -> None:
        """Nothing: each header read is its own request, asked for when needed."""

    def close(self) -> None:
        self.obj.close()
