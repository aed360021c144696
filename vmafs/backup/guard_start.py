"""The guard process's entry (guard.py): it waits on its pipe with nothing imported beyond what
the interpreter itself starts with, and imports the guard only to take over.

The guard starts while the backup sets QEMU up (blockdev-add, the transaction) and begins to
copy, on the same two cores: `python -S -m vmafs.backup.guard` cost 32 ms of CPU (runpy, json,
typing, shutil, argparse, re...), this entry 10 ms (the bare `python -S` 8.5 ms; 15 runs each,
load ~8).
"""

import os
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    log = os.environ.get("VMAFS_GUARD_LOG")
    if log:  # debugging: the guard's own errors (it has no terminal)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        print(f"{time.time():.3f} guard {os.getpid()}: started", file=sys.stderr, flush=True)
    if wait_for_parent(int(argv[argv.index("--pipe") + 1])):
        return
    if sys.flags.no_site:  # started with -S (Guard): trio is in site-packages
        import site
        site.main()
    from vmafs.backup import guard
    guard.main(argv)


def wait_for_parent(fd: int) -> bool:
    """True when vmafs said it is done; False when it died (the pipe ended without a word).
    A plain blocking read, before anything else is imported: the guard costs the backup
    nothing but its interpreter's start."""
    said = b""
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        if not data:
            os.close(fd)
            return b"d" in said
        said += data
