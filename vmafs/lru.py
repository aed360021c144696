"""A thread-safe cache of byte strings bounded by their total size, least recently used out
first: the sums cache of block-summed archives and a .vma.zst's decompressed frames."""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ByteLRU(Generic[K]):
    """At most `limit` bytes of values; a value larger than that is never kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: collections.OrderedDict[K, bytes] = collections.OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> bytes | None:
        with self._lock:
            got = self._entries.get(key)
            if got is not None:
                self._entries.move_to_end(key)
            return got

    def put(self, key: K, value: bytes) -> None:
        if len(value) > self.limit:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._used += len(value)
            while self._used > self.limit:
                self._used -= len(self._entries.popitem(last=False)[1])

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._entries

    @property
    def used(self) -> int:
        """Bytes held."""
        with self._lock:
            return self._used

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0
