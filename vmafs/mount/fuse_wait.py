"""A cheaper wait for the next FUSE request when one task serves a plain archive in order.

pyfuse3's session loop waits for each request under a trio lock, then in trio's epoll: two
scheduler passes and an epoll_ctl per request, ~17 µs of CPU here, more than the archive
read itself (a cold 4 KiB read in all: ~140 µs). With one worker task (reads answered inline,
in order) nothing else is waiting on that lock, so the wait is a blocking poll(2) of the
FUSE fd for a short while (~4 µs a request), and trio's own wait only when the mount idles.
The trio loop is held only while requests keep coming: every CHECKPOINT_EVERY requests, and
after POLL_MS without one, the task yields to trio, so signals, cancellation and an unmount
are seen as before (a signal is handled at most POLL_MS late).

It replaces pyfuse3's private `_wait_fuse_readable` for as long as `lean_wait` is entered,
only when that hook is there (pyfuse3 3.x) and the FUSE fd pyfuse3.init opened is found;
otherwise pyfuse3 waits its own way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
from collections.abc import Iterator
from typing import Any

import trio

log = logging.getLogger("vmafs.mount")

POLL_MS = 20            # blocking wait for the next request before yielding to trio
CHECKPOINT_EVERY = 64   # requests answered back to back before trio gets a turn anyway
_HOOK = "_wait_fuse_readable"


def fuse_fds() -> set[int]:
    """This process's open descriptors of /dev/fuse."""
    try:
        rdev = os.stat("/dev/fuse").st_rdev
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    found = set()
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(int(name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
                found.add(int(name))
    return found


def _waiter(fd: int) -> Any:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    served = 0

    async def wait_fuse_readable() -> bool:
        """pyfuse3's contract: True when a request can be read, False to end the loop."""
        nonlocal served
        served += 1
        if served % CHECKPOINT_EVERY and poller.poll(POLL_MS):
            return True  # readable, or an error the read reports (unmounted: the loop ends)
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:  # pyfuse3.terminate()
            return False
        return True

    return wait_fuse_readable


@contextlib.contextmanager
def lean_wait(pyfuse3: Any, before: set[int]) -> Iterator[bool]:
    """Inside the block, pyfuse3's loop waits through `_waiter` (yields True) when its hook
    exists and exactly one /dev/fuse descriptor was opened since BEFORE (fuse_fds() taken
    before pyfuse3.init); else nothing changes (yields False)."""
    original = getattr(pyfuse3, _HOOK, None)
    opened = fuse_fds() - before
    if original is None or len(opened) != 1:
        log.debug("FUSE requests are waited for by pyfuse3 itself")
        yield False
        return
    setattr(pyfuse3, _HOOK, _waiter(opened.pop()))
    try:
        yield True
    finally:
        setattr(pyfuse3, _HOOK, original)
