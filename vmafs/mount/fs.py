"""The read-only FUSE view of an archive: one `disk-<dev>.raw` per device plus the config blobs.

Thin on purpose: a front end over the serving session (archive/serving.py, which opens the
archive and decides what is read inline, in threads or ahead): it translates FUSE requests into
session reads and knows nothing of the VMA format; a read that fails answers EIO and the
daemon serves on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyfuse3

from vmafs.archive.reader import Archive, Device
from vmafs.archive.serving import Reader, Session
from vmafs.errors import VmafsError
from vmafs.format.names import NAME_MAX, file_names

log = logging.getLogger("vmafs.mount")

# The archive never changes while mounted: let the kernel cache names and attributes for a year.
TIMEOUT = 365 * 24 * 3600.0
FIRST_CONFIG_INODE = 1024   # disks use 1 + dev_id (dev_id is 1..255), configs count up from here
BLOCK_SIZE = 65536          # reported st_blksize / f_bsize: one VMA cluster

@dataclass(frozen=True)
class Entry:
    """One file in the mount's root directory."""

    inode: int
    name: bytes
    size: int
    dev_id: int = 0          # 0 for a config blob
    data: bytes = b""        # a config blob's content


def layout(devices: Sequence[Device],
           configs: Mapping[str, bytes] | Sequence[tuple[str, bytes]]) -> list[Entry]:
    """The root directory: disks by dev_id, then configs in archive order; names sanitised and
    unique (names.file_names, the same names extract writes), inode numbers stable for a given
    archive."""
    pairs = list(configs.items()) if isinstance(configs, Mapping) else list(configs)
    names = file_names(devices, [name for name, _ in pairs])
    entries = [Entry(1 + dev.dev_id, names.disks[dev.dev_id], dev.size, dev_id=dev.dev_id)
               for dev in sorted(devices, key=lambda d: d.dev_id)]
    entries += [Entry(FIRST_CONFIG_INODE + i, name, len(data), data=bytes(data))
                for i, (name, (_, data)) in enumerate(zip(names.configs, pairs, strict=True))]
    return entries


@dataclass
class _Handle:
    """An open file of the mount: a disk with its reader, or a config blob."""

    entry: Entry
    reader: Reader | None = None          # a disk's reader (None: a config blob)


class VmaFS(pyfuse3.Operations):
    """pyfuse3 operations over one serving session (an Archive alone gets a session without
    read-ahead, as tests use it). `on_init` is called once the kernel's FUSE_INIT has been
    handled.

    Disks are opened through the page cache by default (mmap works, small reads get kernel
    read-ahead). `direct_io` hands each read straight to the reader's buffer instead: no
    second cached copy of the data and no page-cache fill, which is what bounds streaming
    reads through FUSE, but MAP_SHARED mmap of a disk fails with ENODEV (libfuse < 3.16).
    """

    def __init__(self, session: Session | Archive, *, uid: int | None = None,
                 gid: int | None = None, direct_io: bool = False) -> None:
        super().__init__()
        if isinstance(session, Archive):
            session = Session(session)
        self.session = session
        self.archive = archive = session.archive
        self.direct_io = direct_io
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        # the header's ctime is any int64: clamp it to what a file time can hold
        self.ctime_ns = min(max(int(archive.ctime), 0), (1 << 63) // 10**9 - 1) * 10**9
        self.entries = layout(session.devices, session.configs)
        self.by_inode = {e.inode: e for e in self.entries}
        self.by_name = {e.name: e for e in self.entries}
        self.on_init: Callable[[], None] | None = None
        # a plain archive's reads never wait: answered straight from the model, without the
        # session's bookkeeping of streaming readers (it serves the reads that decompress)
        self._inline = session.inline
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # st_blocks of a disk counts its stored data, so du and ls -s show how sparse it is.
        self._allocated = {e.inode: archive.stored_bytes(e.dev_id)
                           for e in self.entries if e.dev_id}

    def init(self) -> None:
        """FUSE_INIT is answered: the mount is fully up."""
        if self.on_init is not None:
            self.on_init()

    # -- attributes and names ------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            entry = self.by_inode.get(inode)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = entry.size
        attr.st_ino = inode
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (self._allocated.get(inode, attr.st_size) + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.ctime_ns
        attr.attr_timeout = TIMEOUT
        attr.entry_timeout = TIMEOUT
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        entry = self.by_name.get(name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(entry.inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # start_id is the position of the next entry to send: ".", "..", then the files.
        names = [(b".", pyfuse3.ROOT_INODE), (b"..", pyfuse3.ROOT_INODE)]
        names += [(e.name, e.inode) for e in self.entries]
        for i in range(start_id, len(names)):
            name, inode = names[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = BLOCK_SIZE
        total = sum(e.size for e in self.entries)
        st.f_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.entries) + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = NAME_MAX
        return st

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    # -- files ---------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self.by_inode.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(
            entry, self.session.reader(entry.dev_id) if entry.dev_id else None)
        # Page cache (when used) is kept across opens: the content never changes.
        direct = self.direct_io and bool(entry.dev_id)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def flush(self, fh: int) -> None:
        return None

    # pyfuse3 takes any buffer from read(); its stub says bytes.
    async def read(self, fh: int, off: int, size: int  # type: ignore[override]
                   ) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        entry = handle.entry
        if off >= entry.size or size <= 0:
            return b""
        size = min(size, entry.size - off)
        if handle.reader is None:
            return memoryview(entry.data)[off:off + size]
        try:
            if self._inline:
                return self.session.read_inline(entry.dev_id, off, size)
            return await self.session.read(handle.reader, off, size)
        except Exception as exc:  # noqa: BLE001 - a read fails, the daemon serves on
            raise self._eio(entry, off, size, exc) from None

    # -- errors --------------------------------------------------------------------------------

    def _eio(self, entry: Entry, off: int, size: int, exc: Exception) -> pyfuse3.FUSEError:
        """Log why a read fails; the reader gets EIO, never bytes that are not proven."""
        name = os.fsdecode(entry.name)
        if isinstance(exc, VmafsError):
            log.error("%s: bytes %d-%d: %s; returning EIO", name, off, off + size - 1, exc)
        elif isinstance(exc, OSError):
            log.error("%s: bytes %d-%d: cannot read the archive: %s; returning EIO", name, off,
                      off + size - 1, exc)
        else:
            log.exception("%s: bytes %d-%d: internal error; returning EIO", name, off,
                          off + size - 1)
        return pyfuse3.FUSEError(errno.EIO)
