"""The hand-off from the NBD sinks (one thread a connection) to the one writer thread: a queue
bounded in bytes.

The sinks only enqueue and return, so QEMU's copy-before-write requests are acknowledged at
once; the bound is the back-pressure. On failure the pipe switches to discarding, so guest
writes that trigger a copy never see an error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

WRITE, ZEROES, FINISH, ABORT = range(4)

WAKE_ROOM = 2 << 20
"""A full queue lets its sinks go on once this much is free (QEMU writes at most 1 MiB).

Not at half full: a copy-before-write request that finds the queue full then waited for the
writer to store half the queue (32 MiB, 80 ms and more at the disk) before a byte moved
(issue 17: guest write latency)."""


SMALL_WRITE = 64 << 10
"""A write this small is, in a full backup, a guest write's copy-before-write (a cluster;
the background copy sends max-chunk pieces): it may go over the bound, ..."""
SMALL_RESERVE = 4 << 20
"""... by at most this much in all, so that a guest write waits for the archive's disk only
when copy-before-writes alone have filled this reserve too."""


class Pipe:
    """Queue from the NBD sinks' threads to the writer thread, bounded in bytes.

    `put` blocks while the queue is full (a small write, SMALL_WRITE, only once the reserve
    beyond the bound is full too); after `discard()` it drops everything and returns at once,
    which is what frees QEMU when the backup is void.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._wake_room = min(capacity // 2, WAKE_ROOM)
        lock = threading.Lock()
        self._ready = threading.Condition(lock)   # the writer waits for an item
        self._room = threading.Condition(lock)    # full: the sinks wait for room
        self._waiting = 0                          # sinks waiting for room
        self._items: deque[tuple[Any, ...]] = deque()
        self._bytes = 0
        self.discarding = False
        self.last_progress = time.monotonic()
        self.busy = False      # the writer thread holds an item it has not finished

    def put(self, item: tuple[Any, ...], nbytes: int) -> None:
        with self._ready:
            bound = self._capacity + (SMALL_RESERVE if nbytes <= SMALL_WRITE else 0)
            while not (self.discarding or self._bytes == 0 or self._bytes + nbytes <= bound):
                self._waiting += 1
                try:
                    self._room.wait()
                finally:
                    self._waiting -= 1
            if self.discarding:
                return
            items = self._items
            if not items and not self.busy:
                self.last_progress = time.monotonic()  # the stall clock starts now
            elif item[0] == ZEROES and items and _extends(items[-1], item):
                # Empty space comes as a run of adjacent zero requests: one item.
                last = items[-1]
                items[-1] = (ZEROES, last[1], last[2], last[3] + item[3])
                return
            items.append(item)
            self._bytes += nbytes
            self._ready.notify()

    def put_control(self, kind: int) -> None:
        with self._ready:
            if kind == ABORT:
                self._items.clear()
                self._items.appendleft((ABORT,))
            else:
                self._items.append((kind,))
            self._ready.notify()

    def discard(self) -> None:
        """Stop storing: wake every waiting put, drop the queue, tell the writer to abort."""
        with self._ready:
            self.discarding = True
            self._bytes = 0
            self._room.notify_all()
        self.put_control(ABORT)

    def pending(self) -> bool:
        with self._ready:
            return bool(self._items) or self.busy

    # writer-thread side

    def get(self) -> tuple[Any, ...]:
        with self._ready:
            while not self._items:
                self._ready.wait()
            self.busy = True
            return self._items.popleft()

    def done(self, nbytes: int) -> None:
        with self._ready:
            self.busy = False
            self.last_progress = time.monotonic()
            if self.discarding:
                return
            self._bytes -= nbytes
            if self._waiting and self._bytes <= self._capacity - self._wake_room:
                self._room.notify_all()

    def heartbeat(self) -> None:
        self.last_progress = time.monotonic()


def _extends(last: tuple[Any, ...], item: tuple[Any, ...]) -> bool:
    return bool(last[0] == ZEROES and last[1] == item[1] and last[2] + last[3] == item[2])


class DiskSink:
    """The NBD BlockingHandler of one disk: enqueue and return."""

    def __init__(self, pipe: Pipe, dev_id: int) -> None:
        self._pipe = pipe
        self._dev_id = dev_id

    def write(self, offset: int, data: bytes | bytearray) -> None:
        # nbd_server hands us a buffer nobody else references: no copy needed.
        self._pipe.put((WRITE, self._dev_id, offset, data), len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._pipe.put((ZEROES, self._dev_id, offset, length), 0)

    def flush(self) -> None:
        # Durability is decided at commit (fsync + rename), not per NBD flush; waiting here
        # would only let a slow output hold up QEMU's blockdev-del.
        return
