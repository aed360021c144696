"""What `vmafs info` and `vmafs snapshots` tell about archives, without reading disk data.

info opens one archive through the archive model (Archive.open: the header, the index and its
cross-checks, or the cached walk), and an incremental one's chain through chain.resolve, which
checks every link. An archive that can only be read start to end (gzip, lzo, one-frame zstd) is
described from its header alone. snapshots lists a directory through chain.candidates (header
reads) and says of each incremental whether its chain resolves.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmafs.archive import chain, naming, problems, protection
from vmafs.archive.configs import vm_configs
from vmafs.archive.reader import Archive, read_source_header
from vmafs.archive.walk import read_header as read_stream_header
from vmafs.container.source import open_source
from vmafs.container.streams import detect_container, open_stream
from vmafs.errors import NotSeekableError, UsageError, VmafsError
from vmafs.format import chain as chain_record
from vmafs.format import vma
from vmafs.format.names import display
from vmafs.store import display_location, is_remote, store_for
from vmafs.store import lstat as store_lstat

NOT_SEEKABLE = "not seekable: convert it to mount (vmafs convert ARCHIVE OUT.vma.zst)"


@dataclass(frozen=True)
class DeviceFacts:
    """One disk as `info` and `list` show it."""

    dev_id: int
    name: str
    size: int
    stored: int | None  # None: not known without reading the whole stream


@dataclass(frozen=True)
class ChainLink:
    """One archive of a chain as `info` shows it."""

    path: str
    uuid: uuidlib.UUID
    ctime: int
    incremental: bool
    stored_bytes: int


@dataclass
class Info:
    """One archive, as `qemu-img info` shows an image."""

    path: str
    archive_bytes: int
    container: str            # vma, zstd, gzip, lzo
    seekable: bool
    mode: str | None          # indexed, walked (None: not seekable)
    stream_bytes: int | None  # the decompressed VMA stream
    uuid: uuidlib.UUID
    ctime: int
    devices: list[DeviceFacts]
    configs: list[tuple[str, int]]
    vmstate_bytes: int | None
    vmid: str | None
    record: chain_record.ChainRecord | None
    chain: list[ChainLink] = field(default_factory=list)  # oldest first; [] for a full one
    chain_error: str | None = None
    block_sums: bool = False  # plain, indexed, each 4 KiB block summed (small reads read less)

    @property
    def incremental(self) -> bool:
        return self.record is not None and self.record.incremental

    @property
    def parent(self) -> uuidlib.UUID | None:
        return self.record.parent.uuid if self.record and self.record.parent else None

    @property
    def indexed(self) -> bool | None:
        """Has a vmafs index with data checksums (None: unknown, not seekable)."""
        return None if self.mode is None else self.mode == "indexed"

    @property
    def stored_bytes(self) -> int | None:
        if any(d.stored is None for d in self.devices):
            return None
        return sum(d.stored or 0 for d in self.devices)

    @property
    def ratio(self) -> float | None:
        """Decompressed stream bytes per archive byte (1.0 for a plain archive)."""
        if self.stream_bytes is None or self.archive_bytes == 0:
            return None
        return self.stream_bytes / self.archive_bytes

    @property
    def depth(self) -> int | None:
        """Ancestors in the chain: 0 for a full archive, None when the chain did not resolve."""
        if not self.incremental:
            return 0
        return len(self.chain) - 1 if self.chain else None


def _regular_size(path: str) -> int:
    if is_remote(path):
        entry = store_for(path).stat(path)
        if entry is None:
            raise VmafsError(f"{display_location(path)}: no such object")
        return entry.size
    try:
        st = os.stat(path)
    except OSError as exc:
        raise VmafsError(f"cannot open {display(path)}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{display(path)}: not a regular file")
    return st.st_size


def _container(path: str) -> str:
    if is_remote(path):
        obj = store_for(path).open(path)
        try:
            return detect_container(obj.read(0, 16))
        finally:
            obj.close()
    try:
        with open(path, "rb") as f:
            return detect_container(f.read(16))
    except OSError as exc:
        raise VmafsError(f"cannot open {display(path)}: {exc.strerror}") from None


def read_header(path: str) -> tuple[vma.Header, bool]:
    """(header, seekable): by random access, else from the start of the stream."""
    try:
        source, _kind = open_source(path)
    except NotSeekableError:
        with open_stream(path) as stream:
            return read_stream_header(stream), False
    try:
        return read_source_header(source)[0], True
    finally:
        source.close()


def describe(path: str, bases: Sequence[str] = ()) -> Info:
    """Everything info shows; reads headers and indexes, never disk data."""
    size = _regular_size(path)
    container = _container(path)
    header, seekable = read_header(path)
    configs = [(name, len(data)) for name, data in vm_configs(header.configs)]
    info = Info(path, size, container, seekable, None, None, uuidlib.UUID(bytes=header.uuid),
                header.ctime, [DeviceFacts(d.dev_id, d.name, d.size, None) for d in header.devices],
                configs, header.vmstate.size if header.vmstate else None,
                naming.archive_vmid(path, [n for n, _ in configs]),
                chain_record.find(header.configs))
    if not seekable:
        cut = chain.lost_seek_table(path)  # not vzdump's one frame: vmafs's, its end lost
        if cut is not None:
            raise problems.error(problems.TRUNCATED, f"{display(path)}: {cut}")
        if info.incremental:
            info.chain_error = NOT_SEEKABLE
        return info
    layers: list[Archive] = []
    if info.incremental:
        try:
            layers = chain.resolve(path, bases)
        except chain.ChainError as exc:
            info.chain_error = str(exc)
    try:
        archive = layers[-1] if layers else Archive.open(path, layer=True)
        try:
            info.mode = archive.mode
            info.block_sums = archive.block_sums
            info.stream_bytes = archive.source.size
            # stored in 4 KiB blocks: a device's short last block counts only up to its end
            info.devices = [DeviceFacts(d.dev_id, d.name, d.size,
                                        min(d.size, archive.stored_bytes(d.dev_id)))
                            for d in archive.devices]
            if info.incremental:
                info.chain = [ChainLink(a.path or path, a.uuid, a.ctime, a.incremental,
                                        sum(a.stored_bytes(d.dev_id) for d in a.devices))
                              for a in layers]
        finally:
            if not layers:
                archive.close()
    finally:
        for a in layers:
            a.close()
    return info


# -- snapshots of a directory ---------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """One archive of a place as `snapshots` lists it."""

    path: str
    vmid: str | None
    uuid: uuidlib.UUID
    ctime: int
    parent: uuidlib.UUID | None
    archive_bytes: int
    device_bytes: int
    complete: bool            # every ancestor resolves (chain.resolve); a full archive: True
    chain_error: str | None
    protected: bool           # vzdump's ARCHIVE.protected is there: prune keeps it

    @property
    def incremental(self) -> bool:
        return self.parent is not None


@dataclass
class Listing:
    """What `snapshots` found under a place, and what it could not read or passed over."""

    snapshots: list[Snapshot]            # by VMID (unknown last), then oldest first
    unreadable: list[tuple[str, str]]    # (path, why)
    skipped: list[tuple[str, str]]       # (path, why): not regular files


def _lstat(path: str) -> os.stat_result | None:
    return store_lstat(path)  # an object in a store: a regular file of its size


def snapshots(directory: str, vmid: str | None = None) -> Listing:
    """The archives of a directory (regular files only), each with whether its chain is
    complete; a file that cannot be read is listed as unreadable, not an error."""
    if not is_remote(directory) and not os.path.isdir(directory):
        raise VmafsError(f"{display(directory)}: not a directory")
    pool = chain.candidates(directory)
    listing = Listing([], [], [])
    found: list[tuple[chain.Peek, os.stat_result, str | None]] = []
    for peek in pool.peeks:
        path = _shown_name(pool.names.get(peek.key, [peek.path]), listing.skipped)
        st = _lstat(path) if path is not None else None
        if path is None or st is None or not stat.S_ISREG(st.st_mode):
            continue
        owner = _vmid(path)
        if vmid is not None and owner != vmid:
            continue
        cut = chain.lost_seek_table(path) if peek.parent is None else None
        if cut is not None:  # (an incremental's chain does not resolve: said below)
            listing.unreadable.append((path, cut))
        else:
            found.append((dataclasses.replace(peek, path=path), st, owner))
    for path, why in pool.unreadable:
        st = _lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            listing.skipped.append((path, "not a regular file"))
        elif vmid is None or naming.archive_vmid(path, []) == vmid:
            listing.unreadable.append((path, why))
    broken = _chains(found)
    for peek, st, owner in found:
        reason = broken.get(peek.key)
        listing.snapshots.append(Snapshot(
            peek.path, owner, peek.uuid, peek.ctime,
            peek.parent.uuid if peek.parent is not None else None, st.st_size,
            sum(size for _name, size in peek.devices), reason is None, reason,
            protection.is_protected(peek.path)))
    listing.snapshots.sort(key=lambda s: (s.vmid is None, s.vmid or "", s.ctime, s.path))
    listing.skipped.sort()
    return listing


def _shown_name(names: Sequence[str], skipped: list[tuple[str, str]]) -> str | None:
    """The name to list a file under among its names in the directory: a regular one (not a
    symlink), a vzdump name first; the others are skipped. None: only symlinks name it."""
    regular = [n for n in names if not os.path.islink(n)]
    chosen = next((n for n in regular if naming.parse_vzdump_name(os.path.basename(n))),
                  regular[0] if regular else None)
    for n in names:
        if n != chosen:
            skipped.append((n, "not a regular file" if chosen is None or os.path.islink(n)
                            else f"another name of {os.path.basename(chosen)}"))
    return chosen


def _chains(found: Sequence[tuple[chain.Peek, os.stat_result, str | None]]
            ) -> dict[chain.Key, str | None]:
    """Why each incremental archive's chain does not resolve (None: it does); newest first,
    so an ancestor of a chain that resolved is not resolved again."""
    done: dict[chain.Key, str | None] = {}
    for peek, _st, _owner in sorted(found, key=lambda f: -f[0].ctime):
        if peek.parent is None or peek.key in done:
            continue
        try:
            layers = chain.resolve(peek.path)
        except VmafsError as exc:
            done[peek.key] = str(exc)
            continue
        for a in layers:
            try:
                done.setdefault(chain.regular_key(a.path or peek.path), None)
            except (OSError, VmafsError):
                pass
            finally:
                a.close()
        done[peek.key] = None
    return done


def _vmid(path: str) -> str | None:
    """From the vzdump name, else from a NNN.conf config name (one more header read)."""
    by_name = naming.archive_vmid(path, [])
    if by_name is not None:
        return by_name
    try:
        header, _seekable = read_header(path)
    except (VmafsError, OSError):
        return None
    return naming.config_vmid([name for name, _ in header.configs])
