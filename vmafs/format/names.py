"""File names for what an archive holds. Names inside an archive are never trusted as paths."""

from __future__ import annotations

NAME_MAX = 255


def safe_name(raw: str) -> str:
    """One path component, whatever the archive says: no '/', NUL, control chars, '.' or '..'."""
    name = "".join("_" if c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in raw)
    if name in ("", ".", ".."):
        name = "_" + name
    # leave room for "disk-", ".raw", ".part" and a "~N" suffix
    return name.encode("utf-8", "surrogateescape")[:NAME_MAX - 24].decode("utf-8", "ignore")


def disk_file_name(devname: str) -> str:
    """What `vma extract` calls a disk image: disk-<devname>.raw."""
    return f"disk-{safe_name(devname)}.raw"
