"""Where archives live: one small protocol, a *store* (S3QL's `backends/` are the model).

A store lists the archives under a place, opens one for reading (random access by ranged
reads, or as a stream), creates one as an output that appears only when committed, and
removes one. A local directory is the first store, S3 (`s3://BUCKET/KEY`) the second, and
plain `https://`/`http://` URLs of servers that honour Range requests a read-only third.

The container layer (plain `.vma`, seekable `.vma.zst`) reads a stored archive through
`StoredObject`, so it never knows where the bytes come from.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat as stat_mod
from dataclasses import dataclass
from typing import Protocol

from vmafs.errors import VmafsError
from vmafs.format.names import hide_url_queries


@dataclass(frozen=True)
class Entry:
    """One archive (or other object) under a place."""

    name: str  # the base name, as vzdump names an archive
    location: str  # what open() and remove() take: a path or a URL
    size: int
    identity: bytes  # changes whenever the stored object does


class StoredObject(Protocol):
    """A stored archive's bytes, read at any offset (thread-safe)."""

    name: str  # for messages: never carries credentials

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly length bytes at offset, fewer only at the end of the object."""
        ...

    def readinto(self, offset: int, view: memoryview) -> int:
        """Fill view from offset; the count is short only at the end of the object."""
        ...

    def advise(self, offset: int, length: int) -> None:
        """A hint: these bytes are read soon (a disk or a server starts on them now)."""
        ...

    def identity(self) -> bytes: ...

    def close(self) -> None: ...


class Upload(Protocol):
    """An archive being written: it appears under its name only at commit."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


UploadsInProgress = list[tuple[str, float]]
"""Archives being written that cannot be read yet: (name, when it last got data, epoch s)."""


class Store(Protocol):
    """The operations every place where archives live offers."""

    def list(self, place: str) -> list[Entry]:
        """The objects directly under place (a directory, a prefix), sorted by name."""
        ...

    def stat(self, location: str) -> Entry | None:
        """The object at location, or None if there is none."""
        ...

    def open(self, location: str) -> StoredObject: ...

    def open_stream(self, location: str) -> io.RawIOBase:
        """The object from start to end, read ahead in bounded parallel requests."""
        ...

    def create(self, location: str) -> Upload: ...

    def mark(self, location: str) -> bool:
        """Create an empty object (vzdump's ARCHIVE.protected) unless one is there, in one
        atomic step; False when one was."""
        ...

    def remove(self, location: str, identity: bytes | None = None) -> None:
        """Remove the object (only if it still has identity, when given)."""
        ...

    def uploads(self, place: str) -> UploadsInProgress:
        """The archives being written directly under place that cannot be read yet (a
        multipart upload: a backup under way, or one a killed run left), sorted by name."""
        ...


def is_remote(location: str) -> bool:
    """True for an archive that a remote store holds (s3://, https://, http://)."""
    return location.startswith(("s3://", "https://", "http://"))


class ObjectStream(io.RawIOBase):
    """A stored object read start to end, as a file (what open_stream reads)."""

    def __init__(self, obj: StoredObject) -> None:
        self._obj = obj
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        n = self._obj.readinto(self._pos, memoryview(b).cast("B"))
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._obj.close()
        super().close()


def display_location(location: str) -> str:
    """A location as messages show it: a URL without its query (a presigned URL's query
    carries a signature and an access key id)."""
    return hide_url_queries(location)


def store_for(location: str) -> Store:
    """The store that holds location: S3, HTTP or the local file system."""
    if location.startswith("s3://"):
        from vmafs.store.s3 import S3Store

        return S3Store.shared()
    if location.startswith(("https://", "http://")):
        from vmafs.store.http import HttpStore

        return HttpStore.shared()
    from vmafs.store.local import LocalStore

    return LocalStore()


def join(place: str, name: str) -> str:
    """A name under a place: DIR/NAME, s3://BUCKET/PREFIX/NAME."""
    if is_remote(place):
        return place + name if place.endswith("/") or not place else place + "/" + name

    return os.path.join(place, name)


def parent_of(location: str) -> str:
    """The place an archive lives in: its directory, or its S3 prefix (with the slash)."""
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        prefix = key.rpartition("/")[0]
        return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
    if location.startswith(("https://", "http://")):
        return location.split("?", 1)[0].rpartition("/")[0] + "/"

    return os.path.dirname(location)


def basename(location: str) -> str:
    if is_remote(location):
        return location.split("?", 1)[0].rstrip("/").rpartition("/")[2]

    return os.path.basename(location)


class StoreError(VmafsError):
    """A store could not do what was asked (one line, never with credentials in it)."""


# -- what the commands that walk a place ask, for paths and remote locations alike ----------


def absolute(location: str) -> str:
    """An absolute path; a remote location as it is."""

    return location if is_remote(location) else os.path.abspath(location)


def names(place: str) -> list[str]:
    """Every name directly under place (a directory: all entries; a prefix: its objects)."""
    if is_remote(place):
        return [e.name for e in store_for(place).list(place)]
    from vmafs.format.names import display

    try:
        return sorted(os.listdir(place or "."))
    except OSError as exc:
        raise VmafsError(f"cannot list {display(place)}: {exc.strerror}") from None


def remote_key(location: str) -> tuple[int, int]:
    """A remote object's key where a file's is (st_dev, st_ino): from its location alone (an
    object has one name; no device is -1)."""

    return -1, int.from_bytes(hashlib.sha256(location.encode()).digest()[:8], "little")


def lstat(location: str) -> os.stat_result | None:
    """os.lstat of a path; for a remote object a regular file's stat with its size (no
    request for a listing's entry is saved: one HEAD); None if there is nothing."""

    if not is_remote(location):
        try:
            return os.lstat(location)
        except OSError:
            return None
    entry = store_for(location).stat(location)
    if entry is None:
        return None
    dev, ino = remote_key(location)
    return os.stat_result((stat_mod.S_IFREG | 0o444, ino, dev, 1, 0, 0, entry.size, 0, 0, 0))


def exists(location: str) -> bool:

    if is_remote(location):
        return store_for(location).stat(location) is not None
    return os.path.lexists(location)
