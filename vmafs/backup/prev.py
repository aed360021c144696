"""What an incremental backup needs of PREV, read in a thread of its own from the moment the
command starts.

PREV and its whole chain are opened and checked as the readers check them (chains.resolve)
before anything in QEMU is changed: an incremental on a broken chain would be an archive
nothing can read.  That is file I/O (cold, when PREV's pages are not cached: its index, and
the extent headers of a layer not remembered as checked) and the import of the readers; in a
thread started before the command imports trio, QMP and the writer, it overlaps them instead
of following them (and QEMU's first answers, live.py).  This module imports nothing heavy
itself, so that the thread starts at once.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmafs.errors import VmafsError

if TYPE_CHECKING:
    from vmafs.format.chain import Link


@dataclass(frozen=True)
class PrevFacts:
    """What the new archive takes from PREV."""

    link: Link                          # PREV as the new archive's chain record names it
    depth: int                          # archives in the new archive's chain
    configs: list[tuple[str, bytes]]    # PREV's config files (but its chain record)
    vmid: str | None                    # the VMID PREV's name or configs give


def read_prev(path: str, bases: Sequence[str]) -> PrevFacts:
    """PREV's chain resolved and checked; a broken link raises ChainError, anything else
    that stops PREV being read a VmafsError naming --incremental."""
    from vmafs.archive import chain as chains
    from vmafs.archive import naming
    from vmafs.format import chain
    from vmafs.format.names import display

    try:
        layers = chains.resolve(path, bases)
    except chains.ChainError:
        raise
    except VmafsError as exc:
        raise VmafsError(f"--incremental {display(path)}: {exc}") from None
    try:
        prev = layers[-1]
        configs = [(n, d) for n, d in prev.configs if n != chain.CONFIG_NAME]
        return PrevFacts(chains.link_to(prev), len(layers) + 1, configs,
                         naming.archive_vmid(path, [n for n, _ in configs]))
    finally:
        for layer in layers:
            layer.close()


PREFETCH_HEAD = 64 << 10   # the VMA header (12 KiB and its config files) and the first extent
PREFETCH_TAIL = 1 << 20    # the footer and the index before it (0.45 MiB at 4 GiB)


def prefetch(path: str) -> None:
    """Ask the kernel for the start and the end of a local PREV (its header, footer and index)
    at once, before the readers are imported: those reads then find them in the page cache
    instead of each waiting for the disk (four reads of a 4 GiB PREV; its whole read, cold, 8
    runs interleaved at load 7: median 23.6 ms prefetched 0.1 s before, 29.3 ms not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO never waits
    except (OSError, ValueError):  # not a local file (a store URL), or not there: no matter
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        size = st.st_size
        os.posix_fadvise(fd, 0, min(size, PREFETCH_HEAD), os.POSIX_FADV_WILLNEED)
        if size > PREFETCH_HEAD:
            tail = max(PREFETCH_HEAD, size - PREFETCH_TAIL)
            os.posix_fadvise(fd, tail, size - tail, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class PrevReader:
    """read_prev() in a daemon thread, started at once; result() waits for it."""

    def __init__(self, path: str, bases: Sequence[str]) -> None:
        self.path = path
        self._bases = list(bases)
        self._facts: PrevFacts | None = None
        self._error: BaseException | None = None
        # Python's own GIL hand-overs (5 ms), not switching.py's short ones: PREV's headers are
        # a few reads now (a full archive this vmafs wrote is remembered as checked, an
        # increment is small), and the two threads mostly import, which at 0.5 ms hand-overs
        # cost more CPU (imports and PREV read of a 4 GiB backup, 8 runs each interleaved,
        # load 9: CPU median 0.249 s vs 0.272 s)
        self._thread = threading.Thread(target=self._main, name="vmafs-prev", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            prefetch(self.path)
            self._facts = read_prev(self.path, self._bases)
        except BaseException as exc:  # noqa: BLE001 - handed to result()'s caller
            self._error = exc

    def result(self) -> PrevFacts:
        """PREV's facts, or what read_prev raised (blocks until the thread is done)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._facts is not None
        return self._facts
