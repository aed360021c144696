"""vzdump's NAME.log beside an archive written with `-o DIR/`: what was backed up, sizes, times
and warnings, in vzdump's line format, so tools and people that read vzdump's logs find one."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from vmafs.archive import naming
from vmafs.backup.blockgraph import Disk
from vmafs.errors import VmafsError
from vmafs.format.names import display
from vmafs.progress import human_bytes


def log_path(archive: str) -> str:
    """DIR/NAME.log for DIR/NAME.vma[.zst]."""
    return naming.strip_suffix(archive) + ".log"


def render(archive: str, vmid: str, started: float, ended: float, disks: Sequence[Disk],
           parent: str | None, notes: Sequence[str], size: int) -> str:
    def line(when: float, level: str, text: str) -> str:
        return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} {level}: {text}\n"

    out = [line(started, "INFO", f"Starting Backup of VM {vmid} (qemu)"),
           line(started, "INFO", "backup mode: snapshot (vmafs live backup, copy-before-write)")]
    out += [line(started, "INFO", f"include disk '{d.name}' '{d.node}' {human_bytes(d.size)}")
            for d in disks]
    if parent is not None:
        out.append(line(started, "INFO", f"incremental: changes since archive {parent}"))
    out.append(line(started, "INFO", f"creating vzdump archive '{display(archive)}'"))
    out += [line(ended, "WARN", note) for note in notes]
    out.append(line(ended, "INFO", f"archive file size: {human_bytes(size)}"))
    spent = int(ended - started)
    took = f"{spent // 3600:02d}:{spent // 60 % 60:02d}:{spent % 60:02d}"
    out.append(line(ended, "INFO", f"Finished Backup of VM {vmid} ({took})"))
    return "".join(out)


def write_log(path: str, text: str) -> None:
    """Created exclusively (never replacing a file, never through a symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:
        raise VmafsError(f"cannot write the log {display(path)}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
