"""A place where archives live (a directory, an S3 prefix), for the commands that go through
all of it (prune, snapshots, chain resolution): names, what each is, and removal only of the
object that was read. A directory is held open (every name resolved in the same directory, as
rename and unlink need); a prefix is listed once."""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Literal

from vmafs.errors import VmafsError
from vmafs.format.names import display
from vmafs.store import Entry, UploadsInProgress, is_remote, join, store_for


def stat_identity(st: os.stat_result) -> bytes:
    """The file itself (device and inode), as prune tells a replaced file from the one read."""
    return struct.pack("<QQ", st.st_dev, st.st_ino)

Kind = Literal["regular", "link", "other"]
GONE = "gone already"
REPLACED = "replaced since it was read"


class Place:
    """The objects directly under one place."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.remote = is_remote(where)
        self._fd = -1
        self._entries: dict[str, Entry] = {}
        if self.remote:
            self._entries = {e.name: e for e in store_for(where).list(where)}
        else:
            try:
                self._fd = os.open(where or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise VmafsError(f"cannot open directory {display(where)}: "
                                 f"{exc.strerror}") from None

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def path(self, name: str) -> str:
        return join(self.where, name) if self.remote else os.path.join(self.where, name)

    def names(self) -> list[str]:
        if self.remote:
            return sorted(self._entries)
        try:
            return sorted(os.listdir(self._fd))
        except OSError as exc:
            raise VmafsError(f"cannot list {display(self.where)}: {exc.strerror}") from None

    def kind(self, name: str) -> tuple[Kind, bytes] | None:
        """What name is ("link": a symlink to a regular file) and its identity; None if it is
        gone. Never opens anything (a FIFO never blocks)."""
        if self.remote:
            entry = self._entries.get(name)
            return ("regular", entry.identity) if entry is not None else None
        try:
            st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return "regular", stat_identity(st)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.stat(name, dir_fd=self._fd)
            except OSError:
                return "other", b""
            if stat.S_ISREG(target.st_mode):
                return "link", stat_identity(target)
        return "other", b""

    def exists(self, name: str, *, fresh: bool = False) -> bool:
        """Whether name is here (anything, a dangling symlink too); `fresh`: asked of the
        store now, not of the listing (a mark made since)."""
        if self.remote:
            if fresh:
                return store_for(self.where).stat(self.path(name)) is not None
            return name in self._entries
        try:
            os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def remove(self, name: str, identity: bytes | None) -> str | None:
        """Remove name (never what a symlink points to) if it still is the regular file or
        object read (identity), or any regular one (None); why not, when it is not removed."""
        if self.remote:
            if name not in self._entries:
                return GONE
            store = store_for(self.where)
            now = store.stat(self.path(name))
            if now is None:
                return GONE
            if identity is not None and now.identity != identity:
                return REPLACED
            store.remove(self.path(name))
            del self._entries[name]
            return None
        try:
            st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return GONE
        if not stat.S_ISREG(st.st_mode) or (identity is not None
                                            and stat_identity(st) != identity):
            return REPLACED
        try:
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            return GONE
        except OSError as exc:
            raise VmafsError(f"cannot remove {display(name)}: {exc.strerror}") from None
        return None

    def remove_stale_temps(self, wanted: Callable[[str], bool], *, dry_run: bool = False
                           ) -> list[str]:
        """Remove the temporary files (.FINAL.XXXXXX.part) of the final names `wanted`
        accepts that killed commands left here, never one being written
        (container/output.remove_stale_temp); their names. A store has none (an upload
        appears only when complete)."""
        from vmafs.container.output import remove_stale_temp

        now = time.time()
        return [name for name in self._temps(wanted)
                if remove_stale_temp(self._fd, name, now=now, dry_run=dry_run)]

    def live_temps(self, wanted: Callable[[str], bool]) -> list[str]:
        """The temporary files of the final names `wanted` accepts that running commands
        are writing here (a backup in progress): their paths."""
        from vmafs.container.output import temp_in_use

        return [self.path(name) for name in self._temps(wanted) if temp_in_use(self._fd, name)]

    def uploads(self, wanted: Callable[[str], bool]) -> UploadsInProgress:
        """The uploads in progress here (Store.uploads) of the names `wanted` accepts: their
        data cannot be read before they complete. A directory has none (its temporary files
        are live_temps)."""
        if not self.remote:
            return []
        return [(name, last) for name, last in store_for(self.where).uploads(self.where)
                if wanted(name)]

    def _temps(self, wanted: Callable[[str], bool]) -> list[str]:
        """The names of the temporary files here of the final names `wanted` accepts (a store
        has none: an upload appears only when complete)."""
        if self.remote:
            return []
        from vmafs.container.output import temp_final

        return [name for name in self.names()
                if (final := temp_final(name)) is not None and wanted(final)]

    def sync(self) -> None:
        """Make removals durable (a directory's fsync; an object store's are already)."""
        if self._fd >= 0:
            os.fsync(self._fd)
