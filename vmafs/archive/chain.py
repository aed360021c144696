"""Incremental chains: finding an archive's ancestors, checking every link, and opening the
chain as one archive (reader.Archive over layers, newest first wins).

A parent is the archive the child was made from, or a proven equal of it, never merely a file
with the same uuid. Candidates are the regular files among the archives in the child's
directory (and --base): a symlink is its target (one archive, by device and inode), and
nothing else is opened (a FIFO never blocks a reader). A candidate serves when it opens through
the archive model (structure, index, completeness) and has the uuid, ctime, device names and
sizes the child's link names, and its identity (format/chain.py) is the digest the link
recorded: its own content digest (the parent, a copy, a conversion), or the `stands-for` of a
merge that folded exactly that parent. Where several serve, the first (full archives first: a
merged base shortens the chain) whose every stored cluster reads back against its checksum is
taken, and a warning says which.

One depth rule (MAX_DEPTH archives in a chain) holds for every reader, and `check_extend` holds
backup --incremental to it; an over-deep chain's error names the archive to merge.

`Prune` answers prune's question, what a staying archive needs, by the same selection: it
relies only on files it opened and checked, and on a stand-in for a file it removes only after
reading all of the stand-in's data.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmafs.archive import walk, walk_cache
from vmafs.archive.reader import MAX_LAYERS, Archive, read_source_header
from vmafs.container.source import open_source
from vmafs.container.streams import open_stream
from vmafs.container.zstd_frames import walk_frame
from vmafs.errors import EXIT_DAMAGED, NotSeekableError, VmafsError
from vmafs.format import chain, vma
from vmafs.format.names import display, format_ctime
from vmafs.format.seektable import SEEKABLE_MAGIC
from vmafs.store import StoredObject, absolute, is_remote, remote_key, store_for
from vmafs.store import names as place_names
from vmafs.store.local import LocalObject

if TYPE_CHECKING:
    from vmafs.archive.retention import Needs

ARCHIVE_SUFFIXES = (".vma", ".vma.zst")
# Archives in one chain: each is held open (one file each, far below the usual 1024 fds), and
# a chain's layers are numbered in one byte (reader.MAX_LAYERS), so a chain this deep still
# merges.
MAX_DEPTH = MAX_LAYERS

Key = tuple[int, int]  # (st_dev, st_ino): a symlink and its target are one archive
_UNREADABLE = "is unreadable: "
log = logging.getLogger("vmafs.chain")


class ChainError(VmafsError):
    """A link of a chain is broken: a parent missing, another archive, or unreadable."""

    exit_code = EXIT_DAMAGED  # the chain is incomplete


@dataclass(frozen=True)
class Peek:
    """An archive's header facts, read without opening its index (cheap: one header)."""

    path: str
    uuid: uuidlib.UUID
    ctime: int
    devices: tuple[tuple[str, int], ...]
    record: chain.ChainRecord | None
    key: Key = (0, 0)

    @property
    def parent(self) -> chain.Link | None:
        return self.record.parent if self.record is not None else None


def regular_key(path: str) -> Key:
    """The file's identity if path (symlinks followed) is a regular file; a VmafsError naming
    it if not, without opening it (opening a FIFO could block)."""
    key = _regular(path)
    if isinstance(key, str):
        raise VmafsError(f"{display(path)}: {key}")
    return key


def _regular(path: str) -> Key | str:
    """The file's identity, or why it is not a regular file (an object in a store is one,
    keyed by its location)."""
    if is_remote(path):
        return remote_key(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot open it: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return st.st_dev, st.st_ino


def read_header(path: str) -> vma.Header:
    """By random access, else (vzdump's one-frame .vma.zst, .vma.gz, .vma.lzo) from the start
    of the stream; either way only from a regular file."""
    try:
        source, _kind = open_source(path)  # refuses anything but a regular file or a disk
    except NotSeekableError:
        if is_remote(path):
            with open_stream(path) as stream:
                return walk.read_header(stream)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VmafsError(f"{display(path)}: not a regular file") from None
            with open_stream(f"/proc/self/fd/{fd}") as stream:  # the file checked, by its fd
                return walk.read_header(stream)
        finally:
            os.close(fd)
    try:
        return read_source_header(source)[0]
    finally:
        source.close()


def peek(path: str) -> Peek:
    key = regular_key(path)
    header = read_header(path)
    return Peek(path, uuidlib.UUID(bytes=header.uuid), header.ctime,
                tuple((d.name, d.size) for d in header.devices), chain.find(header.configs), key)


@dataclass
class Pool:
    """The archives a parent may be among: those read (one per file), and those that could not
    be (named when a parent is not found: it may be one of them)."""

    peeks: list[Peek]
    unreadable: list[tuple[str, str]]
    names: dict[Key, list[str]] = field(default_factory=dict)  # every name of each file


def candidates(directory: str) -> Pool:
    """Every archive in a directory, read or not: regular files only (symlinks followed), each
    file once, under its own name rather than a symlink's."""
    pool = Pool([], [])
    names = place_names(directory)  # a directory's entries, or the objects of an S3 prefix
    seen: dict[Key, int] = {}
    for name in names:
        if name.startswith(".") or not name.endswith(ARCHIVE_SUFFIXES):
            continue
        path = os.path.join(directory, name)
        key = _regular(path)
        if isinstance(key, str):
            pool.unreadable.append((path, key))
            continue
        try:
            pool.names.setdefault(key, []).append(path)
            if key in seen:
                if os.path.islink(pool.peeks[seen[key]].path) and not os.path.islink(path):
                    old = pool.peeks[seen[key]]
                    pool.peeks[seen[key]] = Peek(path, old.uuid, old.ctime, old.devices,
                                                 old.record, key)
                continue
            facts = peek(path)
        except (VmafsError, OSError) as exc:
            pool.unreadable.append((path, str(exc)))
            continue
        seen[key] = len(pool.peeks)
        pool.peeks.append(facts)
    return pool


def _merged(first: Pool, second: Pool) -> Pool:
    keys = {p.key for p in first.peeks}
    return Pool(first.peeks + [p for p in second.peeks if p.key not in keys],
                first.unreadable + second.unreadable)


# -- choosing a parent ---------------------------------------------------------------------------

@dataclass
class _Tried:
    """A candidate parent as far as it was tried: open while it may be chosen, else why not."""

    peek: Peek
    archive: Archive | None = None  # open (readers) while it may be chosen
    why: str | None = None           # why it cannot serve


@dataclass(frozen=True)
class _Facts:
    """What a link is checked against, from an archive opened through the model."""

    ctime: int
    devices: tuple[tuple[str, int], ...]
    identity: str

    @classmethod
    def of(cls, archive: Archive) -> _Facts:
        return cls(archive.ctime, tuple((d.name, d.size) for d in archive.devices),
                   archive.identity())


def _mismatch(child_devices: Sequence[tuple[str, int]], parent: _Facts,
              link: chain.Link) -> str | None:
    """Why parent is not the archive the link names (None: it is, or a proven equal)."""
    if parent.ctime != link.ctime:
        return "has another creation time than the one the link names"
    if parent.devices != link.devices:
        return "has other devices than the link names"
    if sorted(child_devices) != sorted(parent.devices):
        return "has other devices (names or sizes) than its child"
    if parent.identity != link.digest:
        return "is another archive with the same uuid (its content digest differs)"
    return None


READ_WHOLE_WORTH = 64 << 20  # stored bytes from which a reader remembers a whole read


def data_problem(archive: Archive, *, remember: bool = False) -> str | None:
    """Why not every stored cluster of one archive reads back against its checksum (None:
    all do). Reads the whole archive: only where a choice depends on it. `remember`: a pass
    is kept in the walk cache for the unchanged file (its identity: device, inode, size,
    mtime, ctime), so readers of a merged base beside the chain it folded (between a merge
    and the prune that removes the folded archives) read it whole once; prune never asks."""
    key = None
    identity = archive.source.identity() if remember else None
    if identity is not None:
        key = walk_cache.key_of(identity, b"vmafs-read-whole\0" + archive.uuid.bytes
                                + archive.digest().encode())
        if walk_cache.confirmed(key):
            return None
    try:
        for dev in archive.devices:
            for _ in archive.iter_stored(dev.dev_id):
                pass
    except (VmafsError, OSError) as exc:
        return f"its data does not read back ({exc})"
    if key is not None and sum(archive.stored_bytes(d.dev_id)
                               for d in archive.devices) >= READ_WHOLE_WORTH:
        walk_cache.remember_confirmed(key, walk_cache.MIN_EXTENTS)
    return None


def _try(peek: Peek, child_devices: Sequence[tuple[str, int]], link: chain.Link,
         drop_behind: bool) -> _Tried:
    try:
        archive = Archive.open(peek.path, layer=True, drop_behind=drop_behind)
    except (VmafsError, OSError) as exc:
        return _Tried(peek, why=f"is unreadable: {exc}")
    try:
        why = _mismatch(child_devices, _Facts.of(archive), link)
    except (VmafsError, OSError) as exc:
        why = f"is unreadable: {exc}"
    if why is not None:
        archive.close()
        return _Tried(peek, why=why)
    return _Tried(peek, archive)


def _order(matches: list[Peek], prefer: Callable[[Peek], bool]) -> list[Peek]:
    """Preferred first, then full archives (a merged base needs no ancestors), then by name."""
    return sorted(matches, key=lambda p: (not prefer(p), p.parent is not None, p.path))


@dataclass
class Choice:
    """How a link was resolved: the archive chosen (None: none serves), the others that
    serve, and those that do not, with why."""

    chosen: _Tried | None
    serving: list[_Tried]
    refused: list[_Tried]

    def note(self, child: str) -> str | None:
        """A line naming the choice when another candidate was passed over."""
        passed = [t for t in self.serving + self.refused if t is not self.chosen]
        if self.chosen is None or not passed:
            return None
        why = "; ".join(f"{display(t.peek.path)} {t.why or 'also serves'}" for t in passed)
        return (f"{child}: parent {display(self.chosen.peek.path)} chosen among "
                f"{len(passed) + 1} archives with uuid {self.chosen.peek.uuid} ({why})")


def choose(child_key: Key, child_devices: Sequence[tuple[str, int]], link: chain.Link,
           pool: Pool, *, prefer: Callable[[Peek], bool] = lambda p: False,
           drop_behind: bool = False, check: Callable[[Peek], _Tried] | None = None,
           data: Callable[[_Tried], str | None] | None = None) -> Choice:
    """The archive that serves as the link's parent, by the rules in the module docstring."""
    matches = _order([p for p in pool.peeks if p.uuid == link.uuid and p.key != child_key],
                     prefer)
    tried = [check(p) if check is not None else _try(p, child_devices, link, drop_behind)
             for p in matches]
    serving = [t for t in tried if t.why is None]
    refused = [t for t in tried if t.why is not None]
    if len(serving) <= 1:
        return Choice(serving[0] if serving else None, serving, refused)
    read_whole = data if data is not None else (
        lambda t: data_problem(t.archive, remember=True) if t.archive is not None
        else "was not opened")
    for t in serving:
        why = read_whole(t)
        if why is None:
            return Choice(t, serving, refused)
        t.why = why
    return Choice(None, serving, refused)  # none reads whole: the caller decides


def _not_found(child: str, link: chain.Link, pool: Pool, directory: str, given: bool) -> str:
    where = display(absolute(directory or "."))
    hint = " nor among the --base archives" if given else "; give it with --base"
    if pool.unreadable:
        path, why = pool.unreadable[0]
        more = f" and {len(pool.unreadable) - 1} more" if len(pool.unreadable) > 1 else ""
        hint = f" (unreadable there: {display(path)}: {why}{more})"
    return (f"{child}: incremental: needs its parent {link.uuid} (from "
            f"{format_ctime(link.ctime)}), which is not in {where}{hint}")


def _broken(child: str, choice: Choice) -> str:
    t = (choice.serving + choice.refused)[0]  # serving, but not read whole: say so first
    return f"{child}: broken link: its parent {display(t.peek.path)} {t.why}"


# -- readers -------------------------------------------------------------------------------------

def open_chain(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False) -> Archive:
    """The archive at path as one Archive: a full one as it is, an incremental one stacked
    on its ancestors (every link checked)."""
    layers = resolve(path, bases, drop_behind=drop_behind)
    return layers[0] if len(layers) == 1 else Archive.stack(layers)


class _Walk:
    """Parents found one link at a time, the directories' candidates read once each."""

    def __init__(self, bases: Sequence[str], drop_behind: bool) -> None:
        self.given = Pool([], [])
        for b in bases:
            facts = peek(b)
            if facts.key not in {p.key for p in self.given.peeks}:
                self.given.peeks.append(facts)
        self.pools: dict[str, Pool] = {}
        self.drop_behind = drop_behind

    def parent(self, child: Archive, key: Key, fallback_dir: str) -> tuple[Archive, Key]:
        assert child.record is not None and child.record.parent is not None
        link = child.record.parent
        directory = os.path.dirname(child.path or fallback_dir)
        if directory not in self.pools:
            self.pools[directory] = candidates(directory)
        pool = _merged(self.given, self.pools[directory])
        name = _name(child)
        choice = choose(key, [(d.name, d.size) for d in child.devices], link, pool,
                        drop_behind=self.drop_behind)
        for t in choice.serving + choice.refused:
            if t is not choice.chosen and t.archive is not None:
                t.archive.close()
        if choice.chosen is None:
            if not choice.serving and not choice.refused:
                raise ChainError(_not_found(name, link, pool, directory,
                                            bool(self.given.peeks)))
            raise ChainError(_broken(name, choice))
        note = choice.note(name)
        if note is not None:
            log.warning("vmafs: warning: %s", note)
        assert choice.chosen.archive is not None
        return choice.chosen.archive, choice.chosen.peek.key


def resolve(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False
            ) -> list[Archive]:
    """The chain ending at path, oldest (a full archive) first, each link checked. Parents
    are looked for among `bases` and in the directory of their child."""
    newest = Archive.open(path, layer=True, drop_behind=drop_behind)  # a disk too
    layers = [newest]
    try:
        first = _regular(path) if is_remote(path) else None  # an object: its location's key
        if first is None:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise VmafsError(f"cannot open {display(path)}: {exc.strerror}") from None
            first = (st.st_dev, st.st_ino)
        assert not isinstance(first, str)
        walker = _Walk(bases, drop_behind)
        keys: list[Key] = [first]
        while layers[-1].incremental:
            if len(layers) >= MAX_DEPTH:
                raise ChainError(_too_deep(layers, keys[-1], walker, path))
            parent, parent_key = walker.parent(layers[-1], keys[-1], path)
            layers.append(parent)
            keys.append(parent_key)
            if any(a.uuid == parent.uuid for a in layers[:-1]):
                raise ChainError(f"{_name(layers[-2])}: the chain loops back to "
                                 f"{_name(parent)}")
    except BaseException:
        for archive in layers:
            archive.close()
        raise
    return layers[::-1]


def _too_deep(layers: list[Archive], key: Key, walker: _Walk, path: str) -> str:
    """The error for a chain over MAX_DEPTH: the rest of it is walked one archive open at a
    time, to name the archive whose chain is MAX_DEPTH long (merging it is the way out)."""
    names = [a.path or "" for a in layers]
    child, opened = layers[-1], False
    seen = {a.uuid for a in layers}
    try:
        while child.incremental and len(names) < 1 << 20:
            try:
                parent, key = walker.parent(child, key, path)
            except VmafsError as exc:
                return (f"{_name(layers[0])}: chain deeper than {MAX_DEPTH} archives, and "
                        f"broken further up: {exc}")
            if opened:
                child.close()
            child, opened = parent, True
            names.append(child.path or "")
            if child.uuid in seen:
                return f"{_name(layers[0])}: the chain loops back to {_name(child)}"
            seen.add(child.uuid)
    finally:
        if opened:
            child.close()
    point = names[::-1][MAX_DEPTH - 1]
    return (f"{_name(layers[0])}: its chain has {len(names)} archives, more than the "
            f"{MAX_DEPTH} a chain may have; merge its oldest {MAX_DEPTH} into a new base "
            f"beside them: vmafs merge -o BASE.vma {display(point)}")


def check_extend(path: str, bases: Sequence[str] = ()) -> int:
    """The depth of PATH's chain, if an incremental on it keeps within MAX_DEPTH (backup
    --incremental asks before doing any work); a ChainError otherwise."""
    layers = resolve(path, bases)
    for archive in layers:
        archive.close()
    refusal = extend_refusal(path, len(layers))
    if refusal is not None:
        raise ChainError(refusal)
    return len(layers)


def extend_refusal(path: str, depth: int) -> str | None:
    """Why one more archive cannot continue PATH's chain of `depth` archives (None: it can)."""
    if depth < MAX_DEPTH:
        return None
    return (f"{display(path)}: its chain has {depth} archives, the most a chain may have: "
            f"merge it first (vmafs merge --keep N -o BASE.vma {display(path)}), or take a "
            "full backup")


def _name(archive: Archive) -> str:
    return display(archive.path or str(archive.uuid))


def link_to(parent: Archive) -> chain.Link:
    """The link a child of this archive records."""
    return chain.Link(parent.uuid, parent.ctime,
                      tuple((d.name, d.size) for d in parent.devices), parent.identity())


# -- prune ---------------------------------------------------------------------------------------

class Prune:
    """Prune's view of a directory: each archive file opened and checked once (and read whole
    once where a removal depends on it), and parents chosen as readers choose them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pool = candidates(directory)
        self.by_path: dict[str, Peek] = {}
        for p in self.pool.peeks:
            for name in self.pool.names.get(p.key, [p.path]):
                self.by_path[name] = p
        self._opened: dict[Key, _Facts | str] = {}
        self._streams: set[Key] = set()  # not seekable (vzdump's one-frame .vma.zst)
        self._data: dict[Key, str | None] = {}

    def _open(self, p: Peek) -> _Facts | str:
        """The archive opened once through the model (structure, index, completeness, its
        digest), then closed: its facts, or why it cannot serve."""
        if p.key not in self._opened:
            try:
                with Archive.open(p.path, layer=True) as archive:
                    self._opened[p.key] = _Facts.of(archive)
            except (VmafsError, OSError) as exc:
                if isinstance(exc, NotSeekableError):
                    self._streams.add(p.key)
                self._opened[p.key] = f"{_UNREADABLE}{exc}"
        return self._opened[p.key]

    def unreadable(self, path: str) -> str | None:
        """Why the archive file at path does not open through the model (truncated: a copy
        killed half-way, damaged structure or index), None when it opens or cannot be told
        without reading it whole (a stream, not among the candidates, a symlink)."""
        p = self.by_path.get(path)
        if p is None or os.path.islink(path):
            return None
        facts = self._open(p)
        if not isinstance(facts, str):
            return None
        if p.key in self._streams:
            return lost_seek_table(path)
        return facts.removeprefix(_UNREADABLE)

    def _check(self, devices: Sequence[tuple[str, int]], link: chain.Link) -> Callable[
            [Peek], _Tried]:
        def check(p: Peek) -> _Tried:
            facts = self._open(p)
            if isinstance(facts, str):
                return _Tried(p, why=facts)
            return _Tried(p, why=_mismatch(devices, facts, link))
        return check

    def _read_whole(self, t: _Tried) -> str | None:
        if t.peek.key not in self._data:
            try:
                with Archive.open(t.peek.path, layer=True) as archive:
                    self._data[t.peek.key] = data_problem(archive)
            except (VmafsError, OSError) as exc:
                self._data[t.peek.key] = f"is unreadable: {exc}"
        return self._data[t.peek.key]

    def add(self, path: str) -> Peek | None:
        """An archive prune must keep what it needs of, though it is no candidate parent (a
        backup being written, under its temporary name): its header facts, None if its
        header cannot be read yet."""
        try:
            facts = peek(path)
        except (VmafsError, OSError):
            return None
        self.by_path[path] = facts
        return facts

    def needs(self, path: str, stays: Callable[[str], bool]) -> Needs:
        """What the archive at path needs; `stays` says which files stay anyway (they are
        preferred, so that nothing else is kept for them)."""
        from vmafs.archive.retention import Needs  # prune's: not imported by every reader

        child = self.by_path.get(path)
        if child is None:
            return Needs()
        # a symlink is its target: the file itself must stay
        own = tuple(n for n in self._names(child) if n != path) if os.path.islink(path) else ()
        needs = self._parent_needs(path, child, stays)
        return Needs(own + needs.paths, needs.missing, needs.note)

    def _parent_needs(self, path: str, child: Peek, stays: Callable[[str], bool]) -> Needs:
        from vmafs.archive.retention import Needs

        if child.parent is None:
            return Needs()
        link = child.parent
        name = display(os.path.basename(path))
        choice = choose(child.key, child.devices, link, self.pool,
                        prefer=lambda p: any(stays(n) for n in self._names(p)),
                        check=self._check(child.devices, link), data=self._read_whole)
        if choice.chosen is not None:
            return Needs(self._names(choice.chosen.peek), note=choice.note(name))
        if choice.serving:  # several serve, none reads whole: which one will be read is open
            paths = tuple(n for t in choice.serving for n in self._names(t.peek))
            return Needs(paths, note=f"{name}: none of the archives with uuid {link.uuid} "
                         "reads back whole; all of them kept")
        why = (_broken(name, choice) if choice.refused else
               _not_found(name, link, self.pool, self.directory, False))
        # its chain does not resolve now: every archive with the uuid stays (one may be
        # repaired), and so do their ancestors
        paths = tuple(n for t in choice.refused for n in self._names(t.peek))
        return Needs(paths, missing=why)

    def _names(self, p: Peek) -> tuple[str, ...]:
        return tuple(self.pool.names.get(p.key, [p.path]))

    def checked(self) -> Iterator[str]:
        """The files prune relied on, each opened and checked."""
        for p in self.pool.peeks:
            if p.key in self._opened:
                yield p.path


FIRST_FRAME_BLOCKS = 64  # vmafs's first frame is the VMA header alone: a few blocks


def lost_seek_table(path: str) -> str | None:
    """Why a .vma.zst that is not seekable is a vmafs archive cut short (None: it may be
    vzdump's one-frame .vma.zst, which only a whole read can check): vmafs writes the VMA
    header as a frame of its own and ends the stream with a seek table, so a file whose first
    frame is exactly the header and is followed by more, but has no seek table, lost its
    end (a copy killed half-way). Reads the first frame's headers only; an object in a store
    is told the same way (prune and snapshots decide alike on a prefix and a directory)."""
    if not path.endswith(".vma.zst"):
        return None
    obj = _raw_object(path)
    if obj is None:
        return None
    try:
        size = obj.size
        if size < 4:
            return None
        if int.from_bytes(obj.read(size - 4, 4), "little") == SEEKABLE_MAGIC:
            return None  # it ends in a seek table
        info, _ = walk_frame(obj.read, 0, size, max_blocks=FIRST_FRAME_BLOCKS)
        if info is None or info.skippable or info.end >= size:
            return None
        fd = getattr(obj, "fd", None)
        header = read_header(path if fd is None else f"/proc/self/fd/{fd}")
        if info.content_size != header.header_size:
            return None
    except (VmafsError, OSError):
        return None
    finally:
        obj.close()
    return ("zstd frames without the seek table vmafs ends a .vma.zst with: the archive is "
            "cut short")


def _raw_object(path: str) -> StoredObject | None:
    """The file's or object's stored bytes to read at random (a local file only if regular,
    opened without waiting on a FIFO); None if it cannot be opened."""
    if is_remote(path):
        try:
            return store_for(path).open(path)
        except (VmafsError, OSError):
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return LocalObject(fd, path)
    except OSError:
        pass
    os.close(fd)
    return None
