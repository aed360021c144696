"""What `vmafs mount` is asked for and what is mounted: `-o` options and /proc/self/mountinfo."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmafs.errors import VmafsError

FSNAME = "vmafs"
# Options vmafs sets itself, or that would break a read-only image mount.
_REFUSED = {
    "rw": "the mount is read-only",
    "fsname": "vmafs sets fsname itself",
    "subtype": "vmafs sets subtype itself",
    "max_read": "max_read breaks FUSE mounts on this kernel",
    "blkdev": "vmafs is not a block-device file system",
}


class MountError(VmafsError):
    """The archive or mount point cannot be mounted."""


@dataclass
class MountOptions:
    """Parsed `-o` options: our own (uid=, gid=, direct_io) and the FUSE ones passed through."""

    fuse: set[str] = field(default_factory=set)
    uid: int | None = None
    gid: int | None = None
    direct_io: bool = False
    nonempty: bool = False  # mount over a directory that has files (they are hidden)


def parse_options(values: Iterable[str], source: str = FSNAME) -> MountOptions:
    """Split `-o a,b=c` lists; keep uid/gid for file ownership; pass the rest to FUSE.

    The mount's source (fsname, what `mount` and `df` show) is the archive's path.
    """
    escaped = source.replace("\\", "\\\\").replace(",", "\\,")
    result = MountOptions(fuse={"ro", "default_permissions", f"fsname={escaped}",
                                f"subtype={FSNAME}"})
    for value in values:
        for opt in value.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, _, arg = opt.partition("=")
            if key in ("uid", "gid"):
                try:
                    number = int(arg)
                except ValueError:
                    raise MountError(f"-o {opt}: expected a number") from None
                setattr(result, key, number)
            elif opt in ("direct_io", "nonempty"):
                setattr(result, opt, True)
            elif key in _REFUSED:
                raise MountError(f"-o {opt}: not supported ({_REFUSED[key]})")
            elif key in ("ro", "default_permissions"):
                continue
            else:
                result.fuse.add(opt)
    return result


# -- /proc/self/mountinfo ----------------------------------------------------------------------

@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo, the fields unmount and mount checks need."""

    mountpoint: str
    device: str             # "major:minor"
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field_):
        code = field_[i + 1:i + 4]
        if field_[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        parts = line.split(" ")
        if "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        mounts.append(MountInfo(_unescape(parts[4]), parts[2], parts[sep + 1],
                                _unescape(parts[sep + 2])))
    return mounts


def resolve(path: str) -> str:
    """Absolute, symlinks resolved, without stat'ing the last component: stat'ing our own mount
    point from the daemon before it serves would deadlock, and a dead mount fails ENOTCONN."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail) if tail else path


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount at this path, if any."""
    path = resolve(mountpoint)
    try:
        with open("/proc/self/mountinfo", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return None
    found = None
    for m in parse_mountinfo(text):
        if m.mountpoint == path:
            found = m
    return found
