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
    """A set of cluster numbers in [0, limit); memory grows with the clusters added, not limit."""

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
            at = int(page.searchsorted(local))
            if at < len(page) and page[at] == local:
                return False
            merged = np.empty(len(page) + 1, np.uint16)
            merged[:at] = page[:at]
            merged[at] = local
            merged[at + 1:] = page[at:]
            self._store(number, merged, len(merged))
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
            at = int(page.searchsorted(local))
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
        lo, hi = int(values[0]), int(values[-1]) + 1
        if hi - lo == len(values) > 1 and bool((values[1:] - values[:-1] == 1).all()):
            # a run (the slots of one extent, usually): range operations, no sort
            if self.first_present(lo, hi) is None:
                dups = _EMPTY
            else:
                dups = np.concatenate(list(self.iter_present(len(values), lo, hi)))
            self.add_range(lo, hi)
            return dups
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

    def add_range(self, lo: int, hi: int) -> int:
        """Add every cluster of [lo, hi); how many were not there yet. A whole page costs one
        marker, so zeroing a 16 TiB disk is 4096 steps; a few clusters cost no sort."""
        lo, hi = int(lo), int(hi)
        if lo >= hi:
            return 0
        if lo < 0 or hi > self.limit:
            raise ValueError(f"clusters [{lo}, {hi}) outside [0, {self.limit})")
        if hi - lo == 1:
            return int(self.add(lo))
        before = self._count
        for number in range(lo >> PAGE_BITS, ((hi - 1) >> PAGE_BITS) + 1):
            base = number << PAGE_BITS
            a, b = max(lo, base) - base, min(hi, base + PAGE) - base
            page = self._pages.get(number)
            if page is _FULL:
                continue
            if b - a == self._page_len(number):
                self._count += b - a - self._page_size(number)
                self._pages[number] = _FULL
                self._bitcounts.pop(number, None)
            elif page is None:
                self._store(number, np.arange(a, b, dtype=np.uint16), b - a)
            else:
                assert isinstance(page, np.ndarray)
                if page.dtype == np.uint16:
                    # sorted: what lies in [a, b) is replaced by the whole run
                    i, j = np.searchsorted(page, (a, b)).tolist()
                    merged = np.concatenate((page[:i], np.arange(a, b, dtype=np.uint16),
                                             page[j:]))
                    self._store(number, merged, len(merged))
                else:
                    word, mask = _word(page, a, b)
                    had = (word & mask).bit_count()
                    _put_word(page, a, b, word | mask)
                    self._store(number, page, self._bitcounts[number] + b - a - had)
        return self._count - before

    def first_present(self, lo: int, hi: int) -> int | None:
        """Smallest present cluster in [lo, hi), None if there is none."""
        lo, hi = max(0, int(lo)), min(int(hi), self.limit)
        if lo >= hi:
            return None
        if hi - lo == 1:
            return lo if lo in self else None
        for number in range(lo >> PAGE_BITS, ((hi - 1) >> PAGE_BITS) + 1):
            page = self._pages.get(number)
            if page is None:
                continue
            base = number << PAGE_BITS
            a, b = max(lo, base) - base, min(hi, base + PAGE) - base
            if page is _FULL:
                return base + a
            assert isinstance(page, np.ndarray)
            if page.dtype == np.uint16:
                i = int(np.searchsorted(page, a))
                if i < len(page) and int(page[i]) < b:
                    return base + int(page[i])
            else:
                word, mask = _word(page, a, b)
                hits = word & mask
                if hits:
                    return base + 8 * (a >> 3) + (hits & -hits).bit_length() - 1
        return None

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

    def iter_runs(self, pages: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The present clusters as runs: (starts, ends) int64 arrays, ascending, runs that
        meet merged (across pages too), `pages` pages' worth at a time. A whole page is one
        run, so a disk copied whole is a few runs, however large: no array per cluster."""
        if pages < 1:
            raise ValueError("pages must be positive")
        numbers = sorted(self._pages)
        carry: tuple[int, int] | None = None  # the last run so far: it may go on
        for at in range(0, len(numbers), pages):
            starts_parts: list[np.ndarray] = []
            ends_parts: list[np.ndarray] = []
            for number in numbers[at:at + pages]:
                base = number << PAGE_BITS
                page = self._pages[number]
                if page is _FULL:
                    a, b = np.array([base], np.int64), np.array([base + self._page_len(number)])
                else:
                    assert isinstance(page, np.ndarray)
                    local = (page.astype(np.int64) if page.dtype == np.uint16
                             else np.flatnonzero(_unpack(page)).astype(np.int64))
                    cuts = np.flatnonzero(np.diff(local) != 1) + 1
                    a = base + local[np.concatenate(([0], cuts))]
                    b = base + local[np.concatenate((cuts - 1, [len(local) - 1]))] + 1
                starts_parts.append(a)
                ends_parts.append(b)
            starts = np.concatenate(starts_parts)
            ends = np.concatenate(ends_parts)
            # runs that meet (a page boundary) become one
            join = np.flatnonzero(starts[1:] == ends[:-1]) + 1
            if len(join):
                keep = np.ones(len(starts), bool)
                keep[join] = False
                first = np.flatnonzero(keep)
                starts = starts[first]
                ends = ends[np.concatenate((first[1:] - 1, [len(ends) - 1]))]
            if carry is not None:
                if starts[0] == carry[1]:
                    starts[0] = carry[0]
                else:
                    yield np.array([carry[0]]), np.array([carry[1]])
            carry = (int(starts[-1]), int(ends[-1]))
            if len(starts) > 1:
                yield starts[:-1], ends[:-1]
        if carry is not None:
            yield np.array([carry[0]]), np.array([carry[1]])

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

    def _page_size(self, number: int) -> int:
        """Members of one page now."""
        page = self._pages.get(number)
        if page is None:
            return 0
        if page is _FULL:
            return self._page_len(number)
        assert isinstance(page, np.ndarray)
        return len(page) if page.dtype == np.uint16 else self._bitcounts[number]

    def _store(self, number: int, page: np.ndarray, count: int) -> None:
        """Keep a page in its cheapest form for count members; updates the total."""
        self._count += count - self._page_size(number)
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
        if (local[1:] > local[:-1]).all():  # strictly increasing: no repeats, no sort needed
            unique, dup = local, np.zeros(len(local), bool)
        else:
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
            self._add_unique(number, page, new)
        return dup

    def _add_unique(self, number: int, page: np.ndarray | None, new: np.ndarray) -> None:
        """Add sorted local offsets none of which is present yet."""
        if page is None:
            self._store(number, new.astype(np.uint16), len(new))
        elif page.dtype == np.uint16:
            merged = np.insert(page, np.searchsorted(page, new), new.astype(np.uint16))
            self._store(number, merged, len(merged))
        else:
            if len(new) < _ARRAY_MAX:
                np.bitwise_or.at(page, new >> 3, (1 << (new & 7)).astype(np.uint8))
            else:
                bits = _unpack(page)
                bits[new] = True
                page[:] = np.packbits(bits, bitorder="little")
            self._store(number, page, self._bitcounts[number] + len(new))


def _by_page(values: np.ndarray) -> Iterator[tuple[int, np.ndarray | slice | None]]:
    """(page number, where in values) per touched page; None for "all of them"."""
    pages = values >> PAGE_BITS
    if int(pages.min()) == int(pages.max()):
        yield int(pages[0]), None
        return
    if (pages[1:] >= pages[:-1]).all():  # sorted input (the usual case): slices, no copies
        cuts = np.flatnonzero(pages[1:] != pages[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(values)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            yield int(pages[a]), slice(a, b)
        return
    order = np.argsort(pages, kind="stable")
    sorted_pages = pages[order]
    cuts = np.flatnonzero(np.diff(sorted_pages)) + 1
    for group in np.split(order, cuts):
        yield int(pages[group[0]]), group


def _word(bitmap: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """The bytes of a bitmap that hold bits [a, b) as one Python int (bit 0 = bit 8*(a//8)),
    and the mask of [a, b) in it: a few int operations instead of unpacking the page."""
    word = int.from_bytes(bitmap[a >> 3:(b + 7) >> 3].tobytes(), "little")
    return word, ((1 << (b - a)) - 1) << (a & 7)


def _put_word(bitmap: np.ndarray, a: int, b: int, word: int) -> None:
    lo, hi = a >> 3, (b + 7) >> 3
    bitmap[lo:hi] = np.frombuffer(word.to_bytes(hi - lo, "little"), np.uint8)


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
