"""How often the interpreter hands the GIL over while a backup runs: every 0.5 ms, not 5.

A live backup's threads each block on small I/O many times a second (the trio thread on QEMU's
NBD requests and their replies, PREV's reader on one small read per extent header) and must
get the GIL back after each from a thread that computes (the imports, the archive writer's
checksums): at Python's default 5 ms a hand-over, every QEMU request (a guest write's
copy-before-write among them) and every read of PREV could wait that long. Measured
(interleaved, load 5-10): a cold 4 GiB PREV read beside the imports 0.51 s vs 0.61 s
(start-up, median of 16); guest write p99 during a backup 46.7 vs 53.5 ms (median of 6
rounds' p99, tools/bench_guest_latency.py switch05), backup throughput 1.05x.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SWITCH_INTERVAL = 0.0005

_lock = threading.Lock()
_holders = 0
_saved = 0.0


def hold() -> None:
    """Short hand-overs from now until the matching release() (holders nest)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, SWITCH_INTERVAL))
        _holders += 1


def release() -> None:
    """The last holder's release puts back the interval found by the first hold()."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            sys.setswitchinterval(_saved)


@contextmanager
def short_switches() -> Iterator[None]:
    hold()
    try:
        yield
    finally:
        release()
