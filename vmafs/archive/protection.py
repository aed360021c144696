"""vzdump's protection mark: an empty `ARCHIVE.protected` beside an archive, which vzdump's and
vmafs's prune never remove (naming.protected_marker is the name rule).

The marker is created exclusively (O_EXCL: never through a symlink, never over another file)
and removed only when it is a regular file; both work on names inside the archive's directory
(one directory descriptor), and the directory is synced so the mark survives a crash.

An archive in a store (s3://BUCKET/KEY) gets its marker as an object beside it, put only if
the key is free (the store's `mark`), removed only if it is still the marker that was seen.
"""

from __future__ import annotations

import os
import stat

from vmafs.archive import naming
from vmafs.errors import UsageError, VmafsError
from vmafs.format.names import display
from vmafs.store import basename, display_location, exists, is_remote, store_for


def _split(archive: str) -> tuple[str, str]:
    """(directory, base name) of an archive path that names an archive file."""
    directory, name = os.path.split(archive)
    _check_name(archive, name)
    return directory or ".", name


def _check_name(archive: str, name: str) -> None:
    if not name.endswith(naming.SUFFIXES):
        raise UsageError(f"{display(archive)}: not an archive name (one ending in "
                         f"{', '.join(naming.SUFFIXES)})")


def _open_dir(directory: str) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise VmafsError(f"cannot open directory {display(directory)}: {exc.strerror}") from None


def is_protected(archive: str) -> bool:
    """True when the archive's marker exists (whatever it is: prune honours any)."""
    return exists(naming.protected_marker(archive))  # a path, or an object in a store


def protect(archive: str) -> bool:
    """Create the archive's marker; False when it is protected already. The archive must be a
    regular file (not a symlink: prune considers only regular files)."""
    if is_remote(archive):
        return _protect_stored(archive)
    directory, name = _split(archive)
    marker = naming.protected_marker(name)
    dir_fd = _open_dir(directory)
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise VmafsError(f"cannot protect {display(archive)}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise VmafsError(f"cannot protect {display(archive)}: not a regular file")
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            _check_regular(dir_fd, marker, archive)
            return False
        except OSError as exc:
            raise VmafsError(f"cannot create {display(naming.protected_marker(archive))}: "
                             f"{exc.strerror}") from None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(dir_fd)
        return True
    finally:
        os.close(dir_fd)


def unprotect(archive: str) -> bool:
    """Remove the archive's marker; False when there is none. Only a regular file is removed
    (anything else there was not written as a marker: it is left alone, an error)."""
    if is_remote(archive):
        return _unprotect_stored(archive)
    directory, name = _split(archive)
    marker = naming.protected_marker(name)
    dir_fd = _open_dir(directory)
    try:
        if not _check_regular(dir_fd, marker, archive):
            return False
        try:
            os.unlink(marker, dir_fd=dir_fd)  # the name only: unlink never follows a symlink
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise VmafsError(f"cannot remove {display(naming.protected_marker(archive))}: "
                             f"{exc.strerror}") from None
        os.fsync(dir_fd)
        return True
    finally:
        os.close(dir_fd)


def _check_regular(dir_fd: int, marker: str, archive: str) -> bool:
    """True when the marker is a regular file, False when it is absent; an error otherwise."""
    try:
        st = os.stat(marker, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise VmafsError(f"cannot read {display(naming.protected_marker(archive))}: "
                         f"{exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VmafsError(f"{display(naming.protected_marker(archive))} exists and is not a "
                         "regular file; left alone")
    return True


def _protect_stored(archive: str) -> bool:
    """The marker object beside an archive in a store (the archive must be there)."""
    _check_name(archive, basename(archive))
    store = store_for(archive)
    if store.stat(archive) is None:
        raise VmafsError(f"cannot protect {display_location(archive)}: no such object")
    return store.mark(naming.protected_marker(archive))


def _unprotect_stored(archive: str) -> bool:
    """Remove the marker object if there is one (only the one seen: by its identity)."""
    _check_name(archive, basename(archive))
    store = store_for(archive)
    marker = naming.protected_marker(archive)
    entry = store.stat(marker)
    if entry is None:
        return False
    store.remove(marker, entry.identity)
    return True
