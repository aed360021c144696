"""Random access to an archive's VMA stream, whatever holds it: one small protocol, so that the
archive model reads a plain file, a seekable zstd file (and later an object store by ranged
requests) the same way."""

from __future__ import annotations

import os
import stat
from typing import Protocol

from vmafs.container.streams import detect_container
from vmafs.errors import NotSeekableError, VmafsError
from vmafs.store.local import stat_identity


class ByteSource(Protocol):
    """The decompressed VMA stream, readable at any offset; thread-safe."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes | memoryview:
        """Up to length bytes at offset; fewer only at the end of the stream."""
        ...

    def will_need(self, offsets: list[int], length: int) -> None:
        """A hint: these ranges are read soon (a disk answers many requests at once)."""
        ...

    def identity(self) -> bytes | None:
        """Bytes that change whenever the stored archive does (None: cannot tell), so what
        was learnt about it (a walk) can be kept for the next open."""
        ...

    # The container's own integrity, for the archive model to set up once it knows the mode:
    checked_by_reader: bool
    """True once every read is checked against the index's checksums: a container may then
    skip checks that cost whole reads (zstd: decompress only a frame's prefix)."""

    def check_layout(self) -> None:
        """Check the container's whole structure now (zstd: every frame is the one its
        seek-table entry says, so offsets are those of `zstd -d`); nothing for a plain file."""
        ...

    def close(self) -> None: ...


def file_identity(fd: int) -> bytes:
    """A file's device, inode, size, mtime and ctime: any change to it changes one of them."""
    return stat_identity(os.fstat(fd))


def open_file(path: str) -> int:
    """A read-only descriptor of a regular file (or block device): never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise VmafsError(f"cannot open {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise NotSeekableError(f"{path}: not a regular file; random access needs one "
                               "(read it as a stream, e.g. vmafs verify, extract or convert)")
    os.set_blocking(fd, True)
    return fd


def open_source(path: str, *, drop_behind: bool = False) -> tuple[ByteSource, str]:
    """The archive's stream for random access and its container kind ("vma" or "zstd").

    PATH may also be a remote store's location (s3://BUCKET/KEY, an https:// or http:// URL):
    its source reads by ranged requests, and has `remote` set (its reads may wait on the
    network, so a trio server reads it in worker threads)."""
    from vmafs.store import is_remote

    if is_remote(path):
        return _open_remote(path)
    fd = open_file(path)
    try:
        kind = detect_container(os.pread(fd, 16, 0))
        source: ByteSource
        if kind == "vma":
            from vmafs.container.plain import PlainSource

            source = PlainSource(fd, drop_behind=drop_behind)
        elif kind == "zstd":
            from vmafs.container.zstd_source import SeekableZstdSource  # zstandard if needed

            source = SeekableZstdSource(fd, name=path)
        else:
            raise NotSeekableError(
                f"{path}: a {kind} archive can only be read start to end; make it "
                f"mountable with: vmafs convert {path} OUT.vma.zst")
    except BaseException:
        os.close(fd)
        raise
    return source, kind


def _open_remote(location: str) -> tuple[ByteSource, str]:
    from vmafs.store import store_for

    obj = store_for(location).open(location)
    try:
        kind = detect_container(obj.read(0, 16))
        source: ByteSource
        if kind == "vma":
            from vmafs.container.plain import StoredPlainSource

            source = StoredPlainSource(obj)
        elif kind == "zstd":
            from vmafs.container.zstd_source import SeekableZstdSource

            source = SeekableZstdSource(obj, name=obj.name)
        else:
            raise NotSeekableError(
                f"{obj.name}: a {kind} archive can only be read start to end; make it "
                f"mountable with: vmafs convert {obj.name} OUT.vma.zst")
    except BaseException:
        obj.close()
        raise
    return source, kind
