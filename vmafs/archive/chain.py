"""Incremental chains: finding an archive's ancestors, checking every link, and opening the
chain as one archive (reader.Archive over layers, newest first wins).

A link holds when the parent found (by uuid among the archives in the child's directory, or
given with --base) has the uuid, ctime, device names and sizes the child's record names, and
its identity digest (format/chain.py) is the one the child recorded.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass

from vmafs.archive import walk
from vmafs.archive.reader import Archive, read_source_header
from vmafs.container.source import open_source
from vmafs.container.streams import open_stream
from vmafs.errors import EXIT_DAMAGED, NotSeekableError, VmafsError
from vmafs.format import chain, vma
from vmafs.format.names import display, format_ctime

ARCHIVE_SUFFIXES = (".vma", ".vma.zst")


@dataclass(frozen=True)
class Peek:
    """An archive's header facts, read without opening its index (cheap: one header)."""

    path: str
    uuid: uuidlib.UUID
    ctime: int
    devices: tuple[tuple[str, int], ...]
    record: chain.ChainRecord | None

    @property
    def parent(self) -> chain.Link | None:
        return self.record.parent if self.record is not None else None


def read_header(path: str) -> vma.Header:
    """By random access, else (vzdump's one-frame .vma.zst, .vma.gz, .vma.lzo) from the start
    of the stream."""
    try:
        source, _kind = open_source(path)
    except NotSeekableError:
        with open_stream(path) as stream:
            return walk.read_header(stream)
    try:
        return read_source_header(source)[0]
    finally:
        source.close()


def peek(path: str) -> Peek:
    header = read_header(path)
    return Peek(path, uuidlib.UUID(bytes=header.uuid), header.ctime,
                tuple((d.name, d.size) for d in header.devices), chain.find(header.configs))


@dataclass
class Pool:
    """The archives a parent may be among: those read, and those that could not be (named
    when a parent is not found: it may be one of them)."""

    peeks: list[Peek]
    unreadable: list[tuple[str, str]]


def candidates(directory: str) -> Pool:
    """Every archive in a directory, read or not."""
    pool = Pool([], [])
    try:
        names = sorted(os.listdir(directory or "."))
    except OSError as exc:
        raise VmafsError(f"cannot list {directory}: {exc.strerror}") from None
    for name in names:
        if name.startswith(".") or not name.endswith(ARCHIVE_SUFFIXES):
            continue
        path = os.path.join(directory, name)
        try:
            pool.peeks.append(peek(path))
        except (VmafsError, OSError) as exc:
            pool.unreadable.append((path, str(exc)))
    return pool


class ChainError(VmafsError):
    """A link of a chain is broken: a parent missing, another archive, or unreadable."""

    exit_code = EXIT_DAMAGED  # the chain is incomplete


def open_chain(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False) -> Archive:
    """The archive at path as one Archive: a full one as it is, an incremental one stacked
    on its ancestors (every link checked)."""
    layers = resolve(path, bases, drop_behind=drop_behind)
    return layers[0] if len(layers) == 1 else Archive.stack(layers)


def resolve(path: str, bases: Sequence[str] = (), *, drop_behind: bool = False
            ) -> list[Archive]:
    """The chain ending at path, oldest (a full archive) first, each link checked. Parents
    are looked for among `bases` and in the directory of their child."""
    newest = Archive.open(path, layer=True, drop_behind=drop_behind)
    layers = [newest]
    given = [peek(b) for b in bases]
    pools: dict[str, Pool] = {}
    try:
        while layers[-1].incremental:
            child = layers[-1]
            if len(layers) > MAX_DEPTH:
                raise ChainError(f"{_name(child)}: chain deeper than {MAX_DEPTH} archives "
                                 "(merge it)")
            assert child.record is not None and child.record.parent is not None
            directory = os.path.dirname(child.path or path)
            if directory not in pools:
                pools[directory] = candidates(directory)
            pool = Pool(given + pools[directory].peeks, pools[directory].unreadable)
            layers.append(_parent_of(child, child.record.parent, pool, directory,
                                     bool(given), drop_behind))
            if any(a.uuid == layers[-1].uuid for a in layers[:-1]):
                raise ChainError(f"{_name(child)}: the chain loops back to {_name(layers[-1])}")
    except BaseException:
        for archive in layers:
            archive.close()
        raise
    return layers[::-1]


MAX_DEPTH = 256  # archives held open at once (one file each): far below the usual 1024 fds


def _parent_of(child: Archive, link: chain.Link, pool: Pool, directory: str,
               given: bool, drop_behind: bool) -> Archive:
    """The parent the link names: among the pool's archives with its uuid (full archives
    first, so a merged base is preferred), the first whose identity matches."""
    matches = sorted((p for p in pool.peeks if p.uuid == link.uuid and p.path != child.path),
                     key=lambda p: p.parent is not None)
    if not matches:
        where = display(os.path.abspath(directory or "."))
        hint = " nor among the --base archives" if given else "; give it with --base"
        if pool.unreadable:
            path, why = pool.unreadable[0]
            more = f" and {len(pool.unreadable) - 1} more" if len(pool.unreadable) > 1 else ""
            hint = f" (unreadable there: {display(path)}: {why}{more})"
        raise ChainError(f"{_name(child)}: incremental: needs its parent {link.uuid} (from "
                         f"{format_ctime(link.ctime)}), which is not in {where}{hint}")
    why = ""
    for candidate in matches:
        try:
            parent = Archive.open(candidate.path, layer=True, drop_behind=drop_behind)
        except VmafsError as exc:
            why = f"its parent {display(candidate.path)} is unreadable: {exc}"
            continue
        mismatch = _mismatch(child, parent, link)
        if mismatch is None:
            return parent
        parent.close()
        why = f"its parent {display(candidate.path)} {mismatch}"
    raise ChainError(f"{_name(child)}: broken link: {why}")


def _mismatch(child: Archive, parent: Archive, link: chain.Link) -> str | None:
    """Why parent is not the archive the link names (None: it is)."""
    if parent.ctime != link.ctime:
        return "has another creation time than the one the link names"
    devices = tuple((d.name, d.size) for d in parent.devices)
    if devices != link.devices:
        return "has other devices than the link names"
    if sorted((d.name, d.size) for d in child.devices) != sorted(devices):
        return "has other devices (names or sizes) than its child"
    if parent.identity() != link.digest:
        return "is another archive with the same uuid (its content digest differs)"
    return None


def _name(archive: Archive) -> str:
    return display(archive.path or str(archive.uuid))


def link_to(parent: Archive) -> chain.Link:
    """The link a child of this archive records."""
    return chain.Link(parent.uuid, parent.ctime,
                      tuple((d.name, d.size) for d in parent.devices), parent.identity())
