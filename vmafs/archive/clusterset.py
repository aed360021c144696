"""A set of cluster numbers whose memory follows the clusters added, not the device size.

A header may claim a 2^48-byte device (2^32 clusters); a real 16 TiB sparse disk has 2^28. A
per-cluster array over the whole device is the wrong structure for both, so the set is split into
pages of 2^16 clusters, each allocated on first touch and kept in the cheapest form for its
contents (as in roaring bitmaps):

- a sorted uint16 array of the members while a page holds few (2 bytes per cluster),
- a packed bitmap (8 KiB) once it holds more than ``_ARRAY_MAX``,
- the shared marker ``_FULL`` (nothing) once every cluster of the page is present.

So memory is at most ~2 bytes per cluster added plus a small constant per touched page, and a
fully present device costs nothing per page. Array operations are numpy work per touched page,
never a Python loop per cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PAGE_BITS = 16
PAGE = 1 << PAGE_BITS  # clusters per page
_LOCAL = PAGE - 1
_BITMAP_BYTES = PAGE // 8
_ARRAY_MAX = _BITMAP_BYTES // 2  # a uint16 array longer than this is bigger than the bitmap
_EMPTY = np.zeros(0, np.int64)


class _Full:
    """Marker for a page whose every cluster is present (shared, holds no data)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FULL"


_FULL = _Full()

_Page = np.ndarray | _Full


class ClusterSet:
    """A set of cluster numbers in [0, limit); memory grows with the clusters added, not with limit."""

    __slots__ = ("limit", "_pages", "_bitcounts", "_count")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"negative cluster limit {limit}")
        self.limit = int(limit)
        # page number -> sorted unique uint16 array | uint8 bitmap (little bit order) | _FULL
        self._pages: dict[int, _Page] = {}
        self._bitcounts: dict[int, int] = {}  # members of each bitmap page
        self._count = 0

    # --- single clusters ------------------------------------------------------------------------

    def add(self, cluster: int) -> bool:
        """Add one cluster; True if it was not there yet."""
        cluster = self._check(cluster)
        number, local = cluster >> PAGE_BITS, cluster & _LOCAL
        page = self._pages.get(number)
        if page is _FULL:
            return False
        if page is None:
            self._store(number, np.array([local], np.uint16), 1)
            return True
        assert isinstance(page, np.ndarray)
        if page.dtype == np.uint16:
            at = int(np.searchsorted(page, local))
            if at < len(page) and page[at] == local:
                return False
            self._store(number, np.insert(page, at, np.uint16(local)), len(page) + 1)
            return True
        byte, bit = local >> 3, 1 << (local & 7)
        if page[byte] & bit:
            return False
        page[byte] |= bit
        self._store(number, page, self._bitcounts[number] + 1)
        return True

    def __contains__(self, cluster: object) -> bool:
        if not isinstance(cluster, int | np.integer) or not 0 <= cluster < self.limit:
            return False
        cluster = int(cluster)
        page = self._pages.get(cluster >> PAGE_BITS)
        if page is None:
            return False
        if page is _FULL:
            return True
        assert isinstance(page, np.ndarray)
        local = cluster & _LOCAL
        if page.dtype == np.uint16:
            at = int(np.searchsorted(page, local))
            return at < len(page) and int(page[at]) == local
        return bool(page[local >> 3] >> (local & 7) & 1)

    def __len__(self) -> int:
        return self._count

    def missing_count(self) -> int:
        return self.limit - self._count

    # --- arrays ---------------------------------------------------------------------------------

    def add_array(self, clusters: np.ndarray) -> np.ndarray:
        """Add all; return (in input order) the elements already present or repeated earlier in
        the array, so a caller can report duplicates exactly. Raises ValueError on values outside
        [0, limit) before changing anything."""
        values = self._check_array(clusters)
        if not len(values):
            return _EMPTY
        dup = np.zeros(len(values), bool)
        for number, where in _by_page(values):
            local = (values if where is None else values[where]) & _LOCAL
            page_dup = self._add_page(number, local)
            if where is None:
                dup = page_dup
            else:
                dup[where] = page_dup
        return values[dup]

    def contains_array(self, clusters: np.ndarray) -> np.ndarray:
        """A bool per element; values outside [0, limit) are simply absent."""
        values = np.asarray(clusters)
        if values.dtype.kind not in "iu":
            raise TypeError(f"cluster numbers must be integers, not {values.dtype}")
        values = values.astype(np.int64, copy=False).ravel()
        result = np.zeros(len(values), bool)
        valid = (values >= 0) & (values < self.limit)
        if not valid.all():
            inside = np.flatnonzero(valid)
            result[inside] = self.contains_array(values[inside])
            return result
        if not len(values):
            return result
        for number, where in _by_page(values):
            page = self._pages.get(number)
            if page is None:
                continue
            if page is _FULL:
                hit: np.ndarray | bool = True
            else:
                local = (values if where is None else values[where]) & _LOCAL
                hit = _page_contains(page, local)  # type: ignore[arg-type]
            if where is None:
                result[:] = hit
            else:
                result[where] = hit
        return result

    def all_in(self, lo: int, hi: int) -> bool:
        """Every cluster in [lo, hi) present (True for an empty range)."""
        lo, hi = max(0, int(lo)), int(hi)
        if lo >= hi:
            return True
        if hi > self.limit:
            return False
        for number in range(lo >> PAGE_BITS, ((hi - 1) >> PAGE_BITS) + 1):
            page = self._pages.get(number)
            if page is _FULL:
                continue
            if page is None:
                return False
            assert isinstance(page, np.ndarray)
            base = number << PAGE_BITS
            a, b = max(lo, base) - base, min(hi, base + PAGE) - base
            if page.dtype == np.uint16:
                # sorted and unique: [a, b) is all there iff b - a members fall in it
                if int(np.searchsorted(page, b)) - int(np.searchsorted(page, a)) != b - a:
                    return False
            elif not _unpack(page)[a:b].all():
                return False
        return True

    # --- what is missing ------------------------------------------------------------------------

    def first_missing(self) -> int | None:
        """Smallest cluster in [0, limit) not present, None if the set is complete."""
        for chunk in self.iter_missing(1):
            return int(chunk[0])
        return None

    def iter_missing(self, chunk: int = 1 << 22, lo: int = 0, hi: int | None = None
                     ) -> Iterator[np.ndarray]:
        """The absent clusters of [lo, hi) in ascending order, as int64 arrays of at most chunk
        elements: bounded memory however large the device."""
        return self._iter(False, chunk, lo, hi)

    def iter_present(self, chunk: int = 1 << 22, lo: int = 0, hi: int | None = None
                     ) -> Iterator[np.ndarray]:
        """The present clusters of [lo, hi) in ascending order, in arrays of at most chunk."""
        return self._iter(True, chunk, lo, hi)

    def _iter(self, present: bool, chunk: int, lo: int, hi: int | None) -> Iterator[np.ndarray]:
        if chunk < 1:
            raise ValueError("chunk must be positive")
        hi = self.limit if hi is None else min(int(hi), self.limit)
        lo = max(0, int(lo))
        pending: list[np.ndarray] = []
        pending_len = 0
        number = lo >> PAGE_BITS
        while lo < hi:
            base = number << PAGE_BITS
            a, b = max(lo, base) - base, min(hi, base + PAGE) - base
            span = _page_members(self._pages.get(number), a, b, present)
            if span is None:  # the whole of [a, b) is in the answer: emit it as ranges
                start = base + a
                while start < base + b:
                    take = min(base + b - start, chunk - pending_len)
                    pending.append(np.arange(start, start + take, dtype=np.int64))
                    pending_len += take
                    start += take
                    if pending_len == chunk:
                        yield np.concatenate(pending)
                        pending, pending_len = [], 0
            elif len(span):
                span = span + base
                while len(span):
                    take = chunk - pending_len
                    pending.append(span[:take])
                    pending_len += len(span[:take])
                    span = span[take:]
                    if pending_len == chunk:
                        yield np.concatenate(pending)
                        pending, pending_len = [], 0
            number += 1
            lo = number << PAGE_BITS
        if pending_len:
            yield np.concatenate(pending)

    # --- internals ------------------------------------------------------------------------------

    def _check(self, cluster: int) -> int:
        if not isinstance(cluster, int | np.integer) or isinstance(cluster, bool):
            raise TypeError(f"cluster number must be an integer, not {type(cluster).__name__}")
        cluster = int(cluster)
        if not 0 <= cluster < self.limit:
            raise ValueError(f"cluster {cluster} outside [0, {self.limit})")
        return cluster

    def _check_array(self, clusters: np.ndarray) -> np.ndarray:
        values = np.asarray(clusters)
        if values.dtype.kind not in "iu":
            raise TypeError(f"cluster numbers must be integers, not {values.dtype}")
        values = values.ravel()
        if len(values):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.limit:
                bad = low if low < 0 else high
                raise ValueError(f"cluster {bad} outside [0, {self.limit})")
        return values.astype(np.int64, copy=False)

    def _page_len(self, number: int) -> int:
        return min(PAGE, self.limit - (number << PAGE_BITS))

    def _store(self, number: int, page: np.ndarray, count: int) -> None:
        """Keep a page in its cheapest form for count members; updates the total."""
        old = self._pages.get(number)
        before = 0 if old is None else len(old) if old.dtype == np.uint16 else self._bitcounts[number]  # type: ignore[union-attr]
        self._count += count - before
        if count == self._page_len(number):
            self._pages[number] = _FULL
            self._bitcounts.pop(number, None)
        elif page.dtype == np.uint16 and count > _ARRAY_MAX:
            bits = np.zeros(PAGE, bool)
            bits[page] = True
            self._pages[number] = np.packbits(bits, bitorder="little")
            self._bitcounts[number] = count
        else:
            self._pages[number] = page
            if page.dtype == np.uint8:
                self._bitcounts[number] = count

    def _add_page(self, number: int, local: np.ndarray) -> np.ndarray:
        """Add local offsets (int64, any order, repeats) to one page; the duplicate mask."""
        page = self._pages.get(number)
        if page is _FULL:
            return np.ones(len(local), bool)
        if len(local) == 1:
            present = page is not None and bool(_page_contains(page, local)[0])  # type: ignore[arg-type]
            if not present:
                self._add_unique(number, page, local)  # type: ignore[arg-type]
            return np.array([present])
        unique, first = np.unique(local, return_index=True)
        dup = np.ones(len(local), bool)
        dup[first] = False
        if page is not None:
            assert isinstance(page, np.ndarray)
            already = _page_contains(page, local)
            dup |= already
            new = unique[~_page_contains(page, unique)]
        else:
            new = unique
        if len(new):
            self._add_unique(number, page, new)  # type: ignore[arg-type]
        return dup

    def _add_unique(self, number: int, page: np.ndarray | None, new: np.ndarray) -> None:
        """Add sorted local offsets none of which is present yet."""
        if page is None:
            self._store(number, new.astype(np.uint16), len(new))
        elif page.dtype == np.uint16:
            merged = np.union1d(page, new.astype(np.uint16)).astype(np.uint16, copy=False)
            self._store(number, merged, len(merged))
        else:
            bits = _unpack(page)
            bits[new] = True
            page[:] = np.packbits(bits, bitorder="little")
            self._store(number, page, self._bitcounts[number] + len(new))


def _by_page(values: np.ndarray) -> Iterator[tuple[int, np.ndarray | None]]:
    """(page number, indices into values) per touched page; None for "all of them"."""
    pages = values >> PAGE_BITS
    first, last = int(pages[0]), int(pages[-1])
    if first == last and int(pages.min()) == int(pages.max()):
        yield first, None
        return
    order = np.argsort(pages, kind="stable")
    sorted_pages = pages[order]
    cuts = np.flatnonzero(np.diff(sorted_pages)) + 1
    for group in np.split(order, cuts):
        yield int(pages[group[0]]), group


def _unpack(bitmap: np.ndarray) -> np.ndarray:
    return np.unpackbits(bitmap, bitorder="little").view(bool)


def _page_contains(page: np.ndarray, local: np.ndarray) -> np.ndarray:
    if page.dtype == np.uint16:
        at = np.searchsorted(page, local)
        inside = at < len(page)
        hit = np.zeros(len(local), bool)
        hit[inside] = page[at[inside]] == local[inside]
        return hit
    return ((page[local >> 3] >> (local & 7).astype(np.uint8)) & 1).astype(bool)


def _page_members(page: _Page | None, a: int, b: int, present: bool) -> np.ndarray | None:
    """Local offsets in [a, b) that are present (or absent); None means all of [a, b)."""
    if page is None:
        return _EMPTY if present else None
    if page is _FULL:
        return None if present else _EMPTY
    assert isinstance(page, np.ndarray)
    if page.dtype == np.uint16:
        members = page[int(np.searchsorted(page, a)):int(np.searchsorted(page, b))]
        if present:
            return members.astype(np.int64)
        keep = np.ones(b - a, bool)
        keep[members.astype(np.int64) - a] = False
        return np.flatnonzero(keep) + a
    bits = _unpack(page)[a:b]
    return (np.flatnonzero(bits) if present else np.flatnonzero(~bits)) + a
