"""Names from an archive: the file names mount and extract give them, and how a terminal or JSON
shows them. The one home of these rules, so every command names and shows things alike.

A name is a `str` holding the archive's exact bytes (decoded as UTF-8 with surrogateescape, so
a byte that is not UTF-8 stays that byte: `raw(name)` gives them back). Names inside an archive
are never trusted as paths.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NAME_MAX = 255
VMSTATE_FILE = b"vmstate.bin"
# room left for "disk-", ".raw" and a "~N" suffix; the temporary name has its own budget
_STEM_MAX = NAME_MAX - 24
_SAFE = bytes(0x5F if b < 0x20 or b == 0x7F or b in b"/\\" else b for b in range(256))  # -> "_"


def raw(name: str) -> bytes:
    """The exact bytes of an archive name (the inverse of `decode`)."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a str that did not come from decode(): other lone surrogates
        return name.encode("utf-8", "replace")


def decode(data: bytes) -> str:
    """An archive name's bytes as str; bytes that are not UTF-8 survive as lone surrogates."""
    return data.decode("utf-8", "surrogateescape")


# --- file names ---------------------------------------------------------------------------------


def safe_name(name: str) -> bytes:
    """One path component, whatever the archive says: no '/', '\\', NUL, control characters,
    '.' or '..', at most 231 bytes. Other bytes (non-UTF-8 ones too) are kept as they are."""
    out = _cut(raw(name).translate(_SAFE), _STEM_MAX)
    return b"_" + out if out in (b"", b".", b"..") else out


def _cut(data: bytes, limit: int) -> bytes:
    """data cut to limit bytes, without leaving half a UTF-8 sequence at the end."""
    if len(data) <= limit:
        return data
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    decoder.decode(data[:limit], final=False)
    pending = decoder.getstate()[0]  # the start of a character the cut splits
    return data[:limit - len(pending)]


def disk_file_name(devname: str) -> bytes:
    """What `vma extract` calls a disk image: disk-<devname>.raw (sanitised)."""
    return b"disk-" + safe_name(devname) + b".raw"


class Named(Protocol):
    @property
    def dev_id(self) -> int: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class FileNames:
    """The file name of every item of an archive, all distinct."""

    disks: dict[int, bytes]      # dev_id -> disk-<devname>.raw
    configs: list[bytes]         # parallel to the config names given
    vmstate: bytes | None        # vmstate.bin, when asked for


def file_names(devices: Sequence[Named], configs: Sequence[str],
               vmstate: bool = False) -> FileNames:
    """Unique file names for the disks (by dev_id), then the configs (in archive order), then
    vmstate.bin; an item whose sanitised name is taken gets "~2", "~3", ... before its
    extension. mount and extract both call this, so they show the same names."""
    taken: set[bytes] = set()
    disks = {dev.dev_id: _unique(disk_file_name(dev.name), taken, b".raw")
             for dev in sorted(devices, key=lambda d: d.dev_id)}
    names = [_unique(safe_name(c), taken) for c in configs]
    state = _unique(VMSTATE_FILE, taken, b".bin") if vmstate else None
    return FileNames(disks, names, state)


def _unique(name: bytes, taken: set[bytes], suffix: bytes = b"") -> bytes:
    stem = name[: len(name) - len(suffix)] if suffix else name
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = stem + b"~%d" % n + suffix
    taken.add(candidate)
    return candidate


# --- showing names ------------------------------------------------------------------------------

_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display(name: str) -> str:
    """A name safe to print on a terminal, and unambiguous: printable characters stay as they
    are; a backslash, control and format characters (ESC, newline, bidi overrides ...) become
    \\n, \\xHH, \\uXXXX escapes, and a byte that is not UTF-8 becomes \\xHH of that byte."""
    out = []
    for c in name:
        o = ord(c)
        if c in _SHORT:
            out.append(_SHORT[c])
        elif 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the raw byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def display_text(text: str) -> str:
    """A message safe to print on a terminal whatever names it quotes: its control and format
    characters escaped as display() escapes them (what display() already escaped stays)."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else display(c) for c in text)


def json_name(name: str | bytes, key: str = "name") -> dict[str, str]:
    """A name for JSON output, exact: {key: text} when its bytes are UTF-8; otherwise
    {key: text with U+FFFD for each bad byte, key + "_hex": the exact bytes in hex}."""
    data = name if isinstance(name, bytes) else raw(name)
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: data.decode("utf-8", "replace"), key + "_hex": data.hex()}


def format_ctime(ctime: int) -> str:
    """Like C's ctime() without the newline, as `vma list` prints it; the plain number when the
    platform cannot represent that time (the header's ctime is any int64)."""
    try:
        return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(ctime))
    except (OverflowError, OSError, ValueError):
        return str(ctime)


_URL_QUERY = re.compile(r"(https?://[^\s?\"']*)\?[^\s\"']*")


def hide_url_queries(text: str) -> str:
    """text with every http(s) URL's query replaced by "?…": a presigned URL's query carries
    a signature and an access key id, which vmafs never prints."""
    return _URL_QUERY.sub(r"\1?…", text) if "://" in text else text
