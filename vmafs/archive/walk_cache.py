"""A cache of what opening an archive learnt, kept outside the archives: a large archive without
an index is walked once (seconds for a TiB), and opened again in a fraction of a second while
unchanged; a large index checked against its stream once (seconds for a sparse 16 TiB disk) is
not checked again while the file is unchanged.

An entry is keyed by what changes when the archive does (for a file: device and inode, size,
mtime and ctime in ns) plus the whole header, and checked against its own XXH3 when loaded; it
holds the walk's columns exactly as index_by_walking built them, after every rule passed.
Anything odd about an entry makes it a miss. The directory is private to the user (0700).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct

import numpy as np
import xxhash

from vmafs.archive.clusterset import ClusterSet
from vmafs.format import index, vma

MIN_EXTENTS = 4096  # smaller walks take well under a second: not worth a file
MAX_ENTRIES = 256  # a chain is up to MAX_LAYERS deep: its layers must not evict each other
MAX_BYTES = 1 << 30  # and walks of large archives (11 bytes a cluster) not fill the disk
_MAGIC = b"VMAFSWC2"
_HEAD = struct.Struct("<8s32sQQB7x")  # magic, key, extents, stored clusters, offset bytes


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmafs", "walks")


def key_of(identity: bytes, raw_header: bytes) -> bytes:
    """identity: what the source says changes with the file (ByteSource.identity)."""
    return hashlib.sha256(identity + hashlib.sha256(raw_header).digest()).digest()


def load(key: bytes, header: vma.Header) -> index.IndexTable | None:
    """The cached walk for key, or None. The entry is mapped, not read: its columns are used
    in place (each aligned for its type), so a cached TiB costs no more memory than the walk."""
    path = os.path.join(cache_dir(), key.hex())
    try:
        with open(path, "rb") as f:
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    view = memoryview(blob)
    if len(view) < _HEAD.size + 8 or xxhash.xxh3_64_digest(view[:-8]) != view[-8:]:
        return None
    magic, got_key, n_ext, n_slots, width = _HEAD.unpack_from(view)
    if (magic != _MAGIC or got_key != key or width not in (4, 8)
            or len(view) != _HEAD.size + 10 * n_ext + (7 + width) * n_slots + 8):
        return None
    pos = _HEAD.size
    cols = []
    for dtype, count in _layout(n_ext, n_slots, width):
        cols.append(np.frombuffer(view, dtype, count, pos))
        pos += cols[-1].nbytes
    ext_offsets, offsets, clusters, ext_counts, masks, dev_ids = cols
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept longest
    return index.IndexTable(dev_ids, clusters, masks, offsets, None, ext_offsets, ext_counts,
                            sector_base=header.header_size)


def _layout(n_ext: int, n_slots: int, width: int) -> list[tuple[str, int]]:
    """The columns of an entry, widest first, so each starts aligned after the 64-byte head."""
    return [("<u8", n_ext), (f"<u{width}", n_slots), ("<u4", n_slots), ("<u2", n_ext),
            ("<u2", n_slots), ("u1", n_slots)]


def store(key: bytes, table: index.IndexTable) -> None:
    """Remember a walk; failing to is never an error (a read-only home, a full disk)."""
    if len(table.ext_offsets) < MIN_EXTENTS or table.sector_base is None:
        return
    columns = [table.ext_offsets, table.offsets, table.clusters, table.ext_counts, table.masks,
               table.dev_ids]
    parts: list[bytes | memoryview] = [_HEAD.pack(_MAGIC, key, len(table.ext_offsets),
                                                  len(table.clusters), table.offsets.itemsize)]
    parts += [np.ascontiguousarray(c).data.cast("B") for c in columns]  # views, no copies
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    _write(key.hex(), [*parts, hasher.digest()])


def confirmed(key: bytes) -> bool:
    """True if the index with this key was checked against its unchanged stream before."""
    path = os.path.join(cache_dir(), key.hex() + ".ok")
    try:
        with open(path, "rb") as f:
            ok = f.read() == key
    except OSError:
        return False
    if ok:
        with contextlib.suppress(OSError):
            os.utime(path)
    return ok


def remember_confirmed(key: bytes, extents: int) -> None:
    """Remember a checked index, if checking it took long enough to be worth a file."""
    if extents >= MIN_EXTENTS:
        _write(key.hex() + ".ok", [key])


def remember_written(raw_header_and_footer: bytes, identity: bytes) -> None:
    """Remember as checked a full archive this process has just written and committed: its
    index and its stream agree by construction, so its first open need not read every
    extent header (an incremental's PREV, opened right after its backup)."""
    key = key_of(identity, raw_header_and_footer)
    _write(key.hex() + ".ok", [key])


def _write(name: str, parts: list[bytes | memoryview]) -> None:
    """An entry, whole or not at all (a private temporary file renamed into place); failing
    to write one is never an error (a read-only home, a full disk)."""
    directory = cache_dir()
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.part")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
        os.rename(tmp, os.path.join(directory, name))
        _evict(directory)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _evict(directory: str) -> None:
    entries = []
    for name in os.listdir(directory):
        if len(name.removesuffix(".ok").removesuffix(".held")) == 64 and not name.startswith("."):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(directory, name))
                entries.append((st.st_mtime, st.st_size, name))
    entries.sort(reverse=True)  # newest first: kept while within both limits
    total = 0
    for count, (_, size, name) in enumerate(entries):
        total += size
        if count and (count >= MAX_ENTRIES or total > MAX_BYTES):  # the newest is kept
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


_HELD_MAGIC = b"VMAFSHS1"
MAX_HELD_RUNS = 1 << 20  # a scattered increment's runs are not worth a file: it opens fast


def remember_held(key: bytes, held: dict[int, ClusterSet], extents: int) -> None:
    """Remember a checked increment with the clusters it holds, as (dev_id, start, end)
    runs; only if checking it took long and the runs are few."""
    if extents < MIN_EXTENTS:
        return
    rows = []
    for dev_id, cs in held.items():
        for starts, ends in cs.iter_runs():
            rows.append(np.stack([np.full(len(starts), dev_id, np.int64), starts, ends], 1))
            if sum(len(r) for r in rows) > MAX_HELD_RUNS:
                return
    body = (np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)).astype("<u8")
    parts: list[bytes | memoryview] = [_HELD_MAGIC + key, body.tobytes()]
    _write(key.hex() + ".held", [*parts, xxhash.xxh3_64_digest(b"".join(parts))])


def load_held(key: bytes, header: vma.Header) -> dict[int, ClusterSet] | None:
    """The held sets remembered for key (the increment passed its check unchanged), or None."""
    path = os.path.join(cache_dir(), key.hex() + ".held")
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    head = len(_HELD_MAGIC) + len(key)
    if (len(blob) < head + 8 or blob[:head] != _HELD_MAGIC + key
            or xxhash.xxh3_64_digest(blob[:-8]) != blob[-8:] or (len(blob) - head - 8) % 24):
        return None
    runs = np.frombuffer(blob[head:-8], "<u8").reshape(-1, 3)
    held = {d.dev_id: ClusterSet(d.clusters) for d in header.devices}
    try:
        for dev_id, start, end in runs.tolist():
            held[dev_id].add_range(start, end)
    except (KeyError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)
    return held
