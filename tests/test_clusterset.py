"""ClusterSet: the same answers as a plain Python set, with memory that follows what was added."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmafs.archive.clusterset import _ARRAY_MAX, PAGE, ClusterSet

LIMITS = [1, 7, PAGE - 1, PAGE, PAGE + 3, 3 * PAGE + 17]


def reference_duplicates(ref: set[int], values: list[int]) -> list[int]:
    """What add_array must return: each element already present when its turn comes."""
    dups = []
    for v in values:
        if v in ref:
            dups.append(v)
        ref.add(v)
    return dups


def check_same(cs: ClusterSet, ref: set[int]) -> None:
    assert len(cs) == len(ref)
    assert cs.missing_count() == cs.limit - len(ref)
    missing = next((c for c in range(cs.limit) if c not in ref), None)
    assert cs.first_missing() == missing
    present = np.concatenate([np.zeros(0, np.int64), *cs.iter_present(chunk=1000)])
    assert present.tolist() == sorted(ref)
    absent = np.concatenate([np.zeros(0, np.int64), *cs.iter_missing(chunk=777)])
    assert len(absent) == cs.limit - len(ref)
    assert not set(absent.tolist()) & ref


def ops_strategy(limit: int) -> st.SearchStrategy[list[tuple[str, list[int]]]]:
    """Single adds and array adds, clustered around a few spots so pages fill and change form."""
    spot = st.sampled_from(sorted({0, limit // 2, max(0, limit - 50), min(limit - 1, PAGE)}))
    value = st.one_of(
        st.integers(0, limit - 1),
        st.builds(lambda s, d: min(limit - 1, s + d), spot, st.integers(0, 40)),
    )
    op = st.one_of(
        st.tuples(st.just("add"), st.lists(value, min_size=1, max_size=1)),
        st.tuples(st.just("array"), st.lists(value, max_size=60)),
        st.tuples(st.just("range"), st.lists(st.integers(0, limit - 1), min_size=2,
                                             max_size=2)),
    )
    return st.lists(op, max_size=25)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), limit=st.sampled_from(LIMITS))
def test_matches_python_set(data: st.DataObject, limit: int) -> None:
    cs = ClusterSet(limit)
    ref: set[int] = set()
    for kind, values in data.draw(ops_strategy(limit)):
        if kind == "add":
            assert cs.add(values[0]) == (values[0] not in ref)
            ref.add(values[0])
        elif kind == "array":
            expected = reference_duplicates(ref, values)
            got = cs.add_array(np.array(values, np.int64))
            assert got.tolist() == expected
        else:  # a whole range at once, as write_zeroes would
            lo, hi = sorted(values)
            present = sorted(ref & set(range(lo, hi + 1)))
            assert cs.first_present(lo, hi + 1) == (present[0] if present else None)
            expected = reference_duplicates(ref, list(range(lo, hi + 1)))
            if data.draw(st.booleans()):
                assert cs.add_array(np.arange(lo, hi + 1)).tolist() == expected
            else:
                assert cs.add_range(lo, hi + 1) == hi + 1 - lo - len(expected)
        probe = data.draw(st.lists(st.integers(-3, limit + 3), max_size=20))
        assert cs.contains_array(np.array(probe, np.int64)).tolist() == [p in ref for p in probe]
        assert [p in cs for p in probe] == [p in ref for p in probe]
        lo = data.draw(st.integers(0, limit))
        hi = data.draw(st.integers(lo, limit))
        assert cs.all_in(lo, hi) == all(c in ref for c in range(lo, hi))
    check_same(cs, ref)


@pytest.mark.parametrize("limit", [PAGE, 2 * PAGE + 5])
def test_page_forms(limit: int) -> None:
    """Sparse array, then bitmap, then the shared full marker; answers unchanged across them."""
    cs = ClusterSet(limit)
    ref: set[int] = set()
    rng = np.random.default_rng(1)
    for size in (10, _ARRAY_MAX - 20, 50, 3000, 20000):
        values = rng.integers(0, limit, size)
        assert cs.add_array(values).tolist() == reference_duplicates(ref, values.tolist())
        check_same(cs, ref)
    rest = np.concatenate(list(cs.iter_missing()))
    assert len(cs.add_array(rest)) == 0
    assert cs.first_missing() is None and cs.missing_count() == 0
    assert cs.all_in(0, limit)
    assert all(p is cs._pages[0] for p in cs._pages.values())  # all the one shared marker
    assert len(cs.add_array(np.arange(limit))) == limit
    assert not cs.add(limit - 1)


def test_last_partial_page_becomes_full() -> None:
    cs = ClusterSet(PAGE + 3)
    cs.add_array(np.arange(PAGE, PAGE + 3))
    assert cs.all_in(PAGE, PAGE + 3) and not cs.all_in(PAGE - 1, PAGE + 3)
    assert cs.first_missing() == 0
    assert cs.missing_count() == PAGE


def test_out_of_range_raises_and_changes_nothing() -> None:
    cs = ClusterSet(100)
    cs.add(5)
    for bad in (-1, 100, 1 << 40):
        with pytest.raises(ValueError):
            cs.add(bad)
        with pytest.raises(ValueError):
            cs.add_array(np.array([1, 2, bad], np.int64))
    assert len(cs) == 1 and 1 not in cs and 2 not in cs
    assert (1 << 70) not in cs and -5 not in cs and "x" not in cs
    assert cs.contains_array(np.array([5, -1, 100], np.int64)).tolist() == [True, False, False]
    with pytest.raises(TypeError):
        cs.add_array(np.array([1.5]))
    assert cs.add_array(np.zeros(0, np.int64)).tolist() == []
    assert cs.all_in(7, 7) and not cs.all_in(0, 101)


def test_ranges_over_whole_pages() -> None:
    cs = ClusterSet(5 * PAGE + 10)
    cs.add_array(np.array([7, PAGE + 3, 3 * PAGE]))
    assert cs.first_present(8, 5 * PAGE) == PAGE + 3
    assert cs.first_present(PAGE + 4, 3 * PAGE) is None
    assert cs.add_range(5, 5 * PAGE + 10) == 5 * PAGE + 5 - 3
    assert cs.first_missing() == 0 and cs.all_in(5, 5 * PAGE + 10)
    assert cs.add_range(0, 5 * PAGE + 10) == 5
    assert cs.first_missing() is None and len(cs) == 5 * PAGE + 10
    assert cs.add_range(9, 9) == 0
    with pytest.raises(ValueError):
        cs.add_range(0, 5 * PAGE + 11)


def test_unsigned_and_uint64_input() -> None:
    cs = ClusterSet(1 << 32)
    values = np.array([0, (1 << 32) - 1, 12345], np.uint64)
    assert cs.add_array(values).tolist() == []
    assert cs.contains_array(values).all()
    assert cs.add_array(values.astype(np.uint32)).tolist() == values.tolist()


def test_memory_follows_contents_not_limit() -> None:
    """A 2^48-byte device (2^32 clusters): nothing allocated for the limit, a few bytes per
    cluster added, nothing per page once full."""
    tracemalloc.start()
    try:
        cs = ClusterSet(1 << 32)
        assert tracemalloc.get_traced_memory()[0] < 10_000
        assert cs.first_missing() == 0 and cs.missing_count() == 1 << 32
        assert not cs.all_in(0, 1 << 32)
        # one cluster on each of 4096 pages, spread over the whole range: small per page
        cs.add_array(np.arange(0, 1 << 32, 1 << 20, dtype=np.int64))
        assert tracemalloc.get_traced_memory()[0] < 4096 * 400
        # 2^28 clusters (a 16 TiB disk) present: full pages cost nothing
        before = tracemalloc.get_traced_memory()[0]
        cs.add_array(np.arange(1 << 22, dtype=np.int64))  # sorted: split into page slices
        cs.add_range(0, 1 << 28)
        assert len(cs) == (1 << 28) + 4096 - 256
        assert tracemalloc.get_traced_memory()[0] - before < 4096 * 400
        assert cs.all_in(0, 1 << 28) and cs.first_missing() == (1 << 28) + 1
    finally:
        tracemalloc.stop()


def test_iter_chunks_are_bounded_and_ranges() -> None:
    cs = ClusterSet(10 * PAGE)
    cs.add_array(np.arange(3, 2 * PAGE + 9, 2))
    chunks = list(cs.iter_missing(chunk=5000, lo=1, hi=9 * PAGE))
    assert all(len(c) <= 5000 for c in chunks)
    flat = np.concatenate(chunks)
    assert (np.diff(flat) > 0).all() and flat[0] == 1 and flat[-1] == 9 * PAGE - 1
    assert not cs.contains_array(flat).any()
    assert len(flat) + int(cs.contains_array(np.arange(1, 9 * PAGE)).sum()) == 9 * PAGE - 1
    with pytest.raises(ValueError):
        list(cs.iter_missing(chunk=0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), dense=st.booleans(),
       ranges=st.lists(st.tuples(st.integers(0, 2 * PAGE + 99), st.integers(0, 300)),
                       min_size=1, max_size=12))
def test_ranges_on_array_and_bitmap_pages(seed: int, dense: bool,
                                          ranges: list[tuple[int, int]]) -> None:
    """add_range, first_present and add_array of runs agree with a set on both page forms."""
    limit = 2 * PAGE + 100
    rng = np.random.default_rng(seed)
    cs = ClusterSet(limit)
    start = rng.integers(0, limit, 3 * _ARRAY_MAX if dense else 50)  # bitmaps when dense
    cs.add_array(start)
    ref = set(start.tolist())
    for i, (lo, n) in enumerate(ranges):
        hi = min(limit, lo + n)
        present = sorted(ref & set(range(lo, hi)))
        assert cs.first_present(lo, hi) == (present[0] if present else None)
        if i % 2:
            assert cs.add_range(lo, hi) == hi - lo - len(present)
            ref |= set(range(lo, hi))
        else:
            expected = reference_duplicates(ref, list(range(lo, hi)))
            assert cs.add_array(np.arange(lo, hi)).tolist() == expected
        assert cs.all_in(lo, hi)
    check_same(cs, ref)


def runs_of(cs: ClusterSet, pages: int = 1024) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    for starts, ends in cs.iter_runs(pages):
        got += zip(starts.tolist(), ends.tolist(), strict=True)
    return got


def reference_runs(members: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for c in sorted(members):
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


@settings(max_examples=100, deadline=None)
@given(data=st.data(), limit=st.sampled_from(LIMITS), pages=st.sampled_from([1, 2, 1024]))
def test_runs_match_the_members(data: st.DataObject, limit: int, pages: int) -> None:
    """iter_runs: the members as maximal runs, whatever form each page is in."""
    cs = ClusterSet(limit)
    for kind, values in data.draw(ops_strategy(limit)):
        if kind == "range":
            cs.add_range(min(values), max(values) + 1)
        else:
            cs.add_array(np.array(values, np.int64))
    members = np.concatenate([np.zeros(0, np.int64), *cs.iter_present()]).tolist()
    assert runs_of(cs, pages) == reference_runs(members)


def test_runs_of_a_whole_device_cost_nothing_per_cluster() -> None:
    """A 16 TiB device copied whole is one run; pieces across page edges are joined."""
    cs = ClusterSet(1 << 28)
    cs.add_range(0, 1 << 28)
    tracemalloc.start()
    try:
        assert runs_of(cs, pages=7) == [(0, 1 << 28)]
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    cs = ClusterSet(3 * PAGE + 17)
    cs.add_range(PAGE - 5, 2 * PAGE + 3)          # array, full, array pages
    cs.add_array(np.arange(0, 2 * _ARRAY_MAX + 2, 2, dtype=np.int64))  # a bitmap page
    cs.add(3 * PAGE + 16)
    want = [(2 * k, 2 * k + 1) for k in range(_ARRAY_MAX + 1)]
    assert runs_of(cs) == [*want, (PAGE - 5, 2 * PAGE + 3), (3 * PAGE + 16, 3 * PAGE + 17)]
    assert runs_of(ClusterSet(10)) == []


@settings(max_examples=40, deadline=None)
@given(data=st.data(), limit=st.sampled_from(LIMITS), chunk=st.sampled_from([4099, 1 << 20]))
def test_held_zeros_from_runs(data: st.DataObject, limit: int, chunk: int) -> None:
    """An increment's zero clusters (held less stored), built from runs in chunks: exactly the
    sorted difference, the array the content digest hashes (its bytes must not change)."""
    from vmafs.archive.reader import _zero_chunks

    cs = ClusterSet(limit)
    for kind, values in data.draw(ops_strategy(limit)):
        if kind == "range":
            cs.add_range(min(values), max(values) + 1)
        else:
            cs.add_array(np.array(values, np.int64))
    members = np.concatenate([np.zeros(0, np.int64), *cs.iter_present()])
    picked = data.draw(st.sets(st.sampled_from(members.tolist())) if len(members)
                       else st.just(set()))
    stored = np.array(sorted(picked), np.uint32)
    want = np.setdiff1d(members, stored.astype(np.int64)).astype(np.uint32)
    pieces = list(_zero_chunks(cs, stored, chunk))
    assert all(p.dtype == np.uint32 for p in pieces)
    assert np.concatenate([np.zeros(0, np.uint32), *pieces]).tolist() == want.tolist()
