"""Archive.iter_stored (archive/stored.py: worker threads read windows ahead) and
Archive.stored_clusters, on a real chain of plain and seekable zstd layers (test_chain's):
every stored cluster of every point in time once, in order, checked and equal to what the
model reads, whatever the window and read-ahead; the first bad cluster is the error, after
exactly the clusters before it; no reader thread outlives the iteration."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
from test_chain import SIZES, Chain, build_chain, main_layers

from vmafs.archive import problems, stored
from vmafs.archive.chain import open_chain
from vmafs.archive.reader import Archive
from vmafs.container import zstd_source
from vmafs.container.zstd_output import SeekableZstdOutput
from vmafs.container.zstd_source import SeekableZstdSource
from vmafs.format import index, vma

C = vma.CLUSTER_SIZE


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("stored"), main_layers(), SIZES)


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vmafs-read")]


def rows(archive: Archive, dev_id: int) -> list[tuple[int, int, bytes, int | None]]:
    return [(c, m, bytes(d), k) for c, m, d, k in archive.iter_stored(dev_id)]


@pytest.mark.parametrize("window, ahead", [(1, 1), (3, 1), (5, 1 << 30), (256, 96 << 20)])
def test_iter_stored_every_point(ch: Chain, monkeypatch: pytest.MonkeyPatch, window: int,
                                 ahead: int) -> None:
    monkeypatch.setattr(stored, "WINDOW", window)
    monkeypatch.setattr(stored, "AHEAD_BYTES", ahead)
    for path, images in zip(ch.paths, ch.states, strict=True):
        with open_chain(str(path)) as archive:
            for dev in archive.devices:
                got = rows(archive, dev.dev_id)
                clusters = [c for c, *_ in got]
                assert clusters == sorted(set(clusters))
                image = images[dev.name]
                for cluster, mask, data, check in got:
                    assert check is None or check == index.checksum(data)  # None: summed
                    assert len(data) == int(vma.POPCOUNT16[mask]) * vma.BLOCK_SIZE
                    full = vma.expand_blocks(data, mask) if mask != vma.FULL_MASK else data
                    want = image[cluster * C:(cluster + 1) * C]
                    assert bytes(full[:len(want)]) == want
                    assert bytes(archive.read(dev.dev_id, cluster * C, C)) == want
                # every cluster not yielded reads as zeros
                rest = np.ones(-(-dev.size // C), bool)
                rest[clusters] = False
                for cluster in np.flatnonzero(rest).tolist():
                    assert image[cluster * C:(cluster + 1) * C].count(0) == len(
                        image[cluster * C:(cluster + 1) * C])
    assert not reader_threads()


def test_stored_clusters(ch: Chain) -> None:
    rng = random.Random(5)
    for path in ch.paths:
        with open_chain(str(path)) as archive:
            for dev in archive.devices:
                data = [c for c, m, _, _ in archive.iter_stored(dev.dev_id) if m]
                count = -(-dev.size // C)
                got = archive.stored_clusters(dev.dev_id, 0, count - 1)
                assert got.dtype == np.int64 and got.tolist() == data
                assert archive.stored_clusters(dev.dev_id, -5, 1 << 40).tolist() == data
                assert archive.stored_clusters(dev.dev_id, 3, 2).tolist() == []
                assert archive.stored_clusters(dev.dev_id, count, 1 << 33).tolist() == []
                for _ in range(30):
                    first = rng.randrange(count)
                    last = rng.randrange(first, count)
                    assert archive.stored_clusters(dev.dev_id, first, last).tolist() == [
                        c for c in data if first <= c <= last]


def test_early_close_ends_the_readers(ch: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stored, "WINDOW", 2)
    with open_chain(str(ch.paths[-1])) as archive:
        it = archive.iter_stored(archive.devices[0].dev_id)
        next(it)
        assert reader_threads()
        it.close()  # what a consumer's exception (a full disk) does to the generator
    assert not reader_threads()


@pytest.mark.parametrize("layer", [0, 2])  # a plain base, a plain increment
def test_first_bad_cluster_is_the_error(ch: Chain, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, layer: int) -> None:
    """A damaged cluster that the newest point reads: the error names it and its stream
    offset, raised after exactly the clusters before it (reads ahead change nothing)."""
    monkeypatch.setattr(stored, "WINDOW", 3)
    monkeypatch.setattr(stored, "AHEAD_BYTES", 1 << 30)
    copy = ch.copy(tmp_path / "chain")
    with open_chain(str(copy / ch.names[-1])) as archive:
        dev = archive.devices[0]
        dmap = archive._maps[dev.dev_id]  # noqa: SLF001 - which rows come from `layer`
        assert dmap.layers is not None
        mine = np.flatnonzero((dmap.layers == layer) & (dmap.masks != 0))
        row = int(mine[len(mine) // 2])
        cluster, offset = int(dmap.clusters[row]), int(dmap.all_byte_offsets()[row])
        before = [c for c, *_ in archive.iter_stored(dev.dev_id)]
    with open(copy / ch.names[layer], "r+b") as f:  # plain layers: stream offset = file offset
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_chain(str(copy / ch.names[-1])) as archive:
        seen = []
        with pytest.raises(problems.ArchiveError) as err:
            for c, *_ in archive.iter_stored(dev.dev_id):
                seen.append(c)
    assert err.value.problem.kind == problems.CHECKSUM
    assert str(err.value) == (f"data checksum mismatch in cluster {cluster} of {dev.name} "
                              f"(stream offset {offset})")
    assert seen == before[:before.index(cluster)]
    assert not reader_threads()


def test_zstd_frames_cut_inside_clusters(ch: Chain, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose frames end mid-cluster (another seekable writer's framing): the same
    clusters."""
    monkeypatch.setattr(stored, "WINDOW", 4)
    want = {}
    with open_chain(str(ch.paths[-1])) as archive:
        for dev in archive.devices:
            want[dev.name] = rows(archive, dev.dev_id)
    copy = ch.copy(tmp_path / "chain")
    base = copy / ch.names[0]
    assert base.suffix == ".vma"
    stream = base.read_bytes()
    with open(copy / (ch.names[0] + ".zst"), "wb") as f:
        out = SeekableZstdOutput(f, frame_size=1 << 20)
        rng = random.Random(3)
        pos = 0
        while pos < len(stream):
            n = rng.randrange(20_000, 150_000)
            out.write(stream[pos:pos + n])
            out.end_frame()
            pos += n
        out.close()
    base.unlink()
    with open_chain(str(copy / ch.names[-1])) as archive:
        assert archive.layers[0].compressed
        for dev in archive.devices:
            assert rows(archive, dev.dev_id) == want[dev.name]


def test_pread_stream_is_pread_without_the_cache(ch: Chain) -> None:
    """pread_stream gives pread's bytes and leaves the cache alone: a merge holds at most
    STREAM_FRAMES frames of each layer, not a cache of each."""
    zst = next(p for p in ch.paths if p.name.endswith(".vma.zst"))
    source = SeekableZstdSource(str(zst))
    try:
        size = source.size
        rng = random.Random(11)
        spans = [(0, size), (size - 1, 5), (size, 3)]
        spans += [(a, rng.randrange(1, 400_000)) for a in
                  sorted(rng.randrange(size) for _ in range(40))]
        for offset, length in spans:
            got = bytes(source.pread_stream(offset, length))
            assert source.cache_used == 0
            assert len(source._stream) <= zstd_source.STREAM_FRAMES  # noqa: SLF001
            assert got == source.pread(offset, length)
            source.close()  # empties the cache that pread filled
            source = SeekableZstdSource(str(zst))
    finally:
        source.close()


def one_window_plan(lo: int, hi: int, layers: np.ndarray, offsets: np.ndarray,
                    nbytes: np.ndarray) -> list[tuple[int, int, int, list[int], list[int],
                                                      list[int]]]:
    """The rule, one window at a time: per layer (ascending), rows by offset, runs less than
    GAP apart together, cut where a run passes SPAN from the layer's first row."""
    reads = []
    for layer in sorted(set(layers[lo:hi].tolist())):
        rows = sorted((r for r in range(lo, hi) if layers[r] == layer),
                      key=lambda r: int(offsets[r]))
        group: list[int] = []
        for r in rows:
            start = int(offsets[r])
            if group:
                prev_end = int(offsets[group[-1]]) + int(nbytes[group[-1]])
                base = int(offsets[rows[0]])
                if (start - prev_end > stored.GAP or (start + int(nbytes[r]) - base)
                        // stored.SPAN != (prev_end - base) // stored.SPAN):
                    reads.append(group)
                    group = []
            group.append(r)
        reads.append(group)
    out = []
    for g in reads:
        first = int(offsets[g[0]])
        out.append((int(layers[g[0]]), first, int(offsets[g[-1]]) + int(nbytes[g[-1]]) - first,
                    [r - lo for r in g], [int(offsets[r]) - first for r in g],
                    [int(nbytes[r]) for r in g]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_one_window_rule(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """The numpy plan of many windows at once reads what the rule says, window by window."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(stored, "WINDOW", int(rng.integers(1, 40)))
    monkeypatch.setattr(stored, "GAP", int(rng.choice([0, 5000, 1 << 20])))
    monkeypatch.setattr(stored, "SPAN", int(rng.choice([C, 3 * C, 16 << 20])))
    count, nlayers = int(rng.integers(1, 400)), int(rng.integers(1, 5))
    layers = rng.integers(0, nlayers, count).astype(np.uint8)
    nbytes = rng.integers(0, 17, count).astype(np.int64) * vma.BLOCK_SIZE
    offsets = np.zeros(count, np.uint64)
    for layer in range(nlayers):  # each layer's rows in a stream of its own, shuffled a bit
        mine = np.flatnonzero(layers == layer)
        rng.shuffle(mine[: len(mine) // 3])
        gaps = rng.choice([0, 512, 3 * C, 2 << 20], len(mine))
        ends = np.cumsum(nbytes[mine] + gaps)
        offsets[mine] = (ends - nbytes[mine]).astype(np.uint64)
    lo = 0
    while lo < count:
        hi = min(lo + 7 * stored.WINDOW, count)
        plans = stored._plan(lo, hi, layers, offsets, nbytes)  # noqa: SLF001
        for k, reads in enumerate(plans):
            wlo = lo + k * stored.WINDOW
            want = one_window_plan(wlo, min(wlo + stored.WINDOW, count), layers, offsets,
                                   nbytes)
            assert [(r.layer, r.first, r.length, r.rows, r.at, r.sizes) for r in reads] == want
        lo = hi
