"""The store layer: a local directory lists regular files only (never blocking on a FIFO, a
symlink is its target); remote objects are read by ranged requests, a random read fetching only
what it asks for, a sequential reader keeping several requests in flight in bounded memory;
S3 multipart parts grow so 10,000 of them hold more than 10 TB, and an upload holds at most
its parts in flight in memory."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vmafs.errors import VmafsError
from vmafs.store import (
    absolute,
    basename,
    exists,
    is_remote,
    join,
    lstat,
    names,
    parent_of,
    remote_key,
    store_for,
)
from vmafs.store import ranged as ranged_mod
from vmafs.store.local import LocalStore
from vmafs.store.place import GONE, REPLACED, Place
from vmafs.store.ranged import RangedObject
from vmafs.store.s3 import MAX_PARTS, PART_MAX, S3Upload, part_size

MiB = 1 << 20

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env


def test_locations() -> None:
    assert is_remote("s3://b/k.vma") and is_remote("https://h/x?sig") and not is_remote("/x")
    assert parent_of("s3://bucket/a/b/k.vma") == "s3://bucket/a/b/"
    assert parent_of("s3://bucket/k.vma") == "s3://bucket/"
    assert join("s3://bucket/a/", "k.vma") == "s3://bucket/a/k.vma"
    assert join("s3://bucket/a", "k.vma") == "s3://bucket/a/k.vma"
    assert basename("https://h/p/k.vma.zst?X-Amz-Signature=1") == "k.vma.zst"
    assert type(store_for("/tmp")).__name__ == "LocalStore"


def test_local_store_lists_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a.vma").write_bytes(b"x" * 10)
    os.mkfifo(tmp_path / "fifo.vma")  # listed never, opened never: no blocking
    (tmp_path / "dir.vma").mkdir()
    (tmp_path / "link.vma").symlink_to(tmp_path / "a.vma")
    (tmp_path / "dangling.vma").symlink_to(tmp_path / "none")
    entries = LocalStore().list(str(tmp_path))
    assert [e.name for e in entries] == ["a.vma", "link.vma"]
    assert entries[0].size == entries[1].size == 10
    assert entries[0].identity == entries[1].identity  # a symlink is its target
    with pytest.raises(VmafsError, match="not a regular file"):
        LocalStore().stat(str(tmp_path / "fifo.vma"))


def test_local_store_removes_only_what_was_read(tmp_path: Path) -> None:
    path = tmp_path / "a.vma"
    path.write_bytes(b"one")
    store = LocalStore()
    seen = store.stat(str(path))
    assert seen is not None
    path.unlink()
    path.write_bytes(b"other content")
    with pytest.raises(VmafsError, match="replaced"):
        store.remove(str(path), seen.identity)
    store.remove(str(path))
    assert not path.exists()


def test_marks_are_created_only_where_nothing_is(s3: S3Env, tmp_path: Path) -> None:
    """A store's mark (vzdump's ARCHIVE.protected) is an empty object created atomically only
    if nothing is there: never over another object or file, never through a symlink."""
    marker = tmp_path / "a.vma.protected"
    assert LocalStore().mark(str(marker)) is True and marker.read_bytes() == b""
    assert LocalStore().mark(str(marker)) is False
    (tmp_path / "b.vma.protected").symlink_to(tmp_path / "elsewhere")
    assert LocalStore().mark(str(tmp_path / "b.vma.protected")) is False
    assert not (tmp_path / "elsewhere").exists()
    store = store_for(s3.url("m/a.vma.protected"))
    assert store.mark(s3.url("m/a.vma.protected")) is True
    assert store.mark(s3.url("m/a.vma.protected")) is False
    s3.put("m/b.vma.protected", b"something else")
    assert store.mark(s3.url("m/b.vma.protected")) is False
    assert s3.get("m/a.vma.protected") == b"" and s3.get("m/b.vma.protected") == b"something else"


def test_part_sizes_hold_ten_terabytes() -> None:
    sizes = [part_size(n) for n in range(1, MAX_PARTS + 1)]
    assert sizes[0] == 8 * MiB and max(sizes) <= PART_MAX
    assert all(s >= 5 * MiB for s in sizes)  # S3's minimum for every part but the last
    assert sum(sizes) > 10 * 10**12
    assert sum(sizes[:1000]) < 20 * 2**30  # small archives keep small parts


class _Fake:
    """An object in memory behind a slow fetch that records what it was asked."""

    def __init__(self, size: int, delay: float = 0.01) -> None:
        self.data = bytes(os.urandom(size))
        self.asked: list[tuple[int, int]] = []
        self.delay = delay
        self.active = 0
        self.most = 0
        self.lock = threading.Lock()

    def fetch(self, start: int, end: int) -> bytes:
        with self.lock:
            self.asked.append((start, end))
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return self.data[start:end]

    def open(self) -> RangedObject:
        tail = ranged_mod.TAIL
        return RangedObject("fake", len(self.data), b"v1", self.fetch,
                            (len(self.data) - tail, self.data[-tail:]))


def test_random_reads_fetch_only_what_they_ask() -> None:
    fake = _Fake(64 * MiB, delay=0)
    obj = fake.open()
    assert obj.read(40 * MiB, 4096) == fake.data[40 * MiB:40 * MiB + 4096]
    assert obj.read(10 * MiB + 5, 65536) == fake.data[10 * MiB + 5:10 * MiB + 5 + 65536]
    assert fake.asked == [(40 * MiB, 40 * MiB + 4096), (10 * MiB + 5, 10 * MiB + 5 + 65536)]
    assert obj.read(len(fake.data) - 100, 1000) == fake.data[-100:]  # from the opening tail
    assert obj.read(100, 50) == fake.data[100:150]  # the head, fetched once
    assert obj.read(200, 50) == fake.data[200:250]
    assert len(fake.asked) == 3
    obj.close()


def test_a_sequential_reader_keeps_requests_in_flight_in_bounded_memory() -> None:
    fake = _Fake(96 * MiB)
    obj = fake.open()
    stream = obj.stream()
    got = bytearray()
    buf = bytearray(MiB)
    while n := stream.readinto(buf):
        got += buf[:n]
        assert len(obj._chunks) <= ranged_mod.STREAM_AHEAD + ranged_mod.STREAM_KEEP + 1
    assert bytes(got) == fake.data
    assert fake.most >= 3  # several ranged requests at once
    assert all(e - s <= ranged_mod.STREAM_CHUNK for s, e in fake.asked)
    stream.close()


def test_views_give_what_reads_do_a_sequential_reader_without_a_copy() -> None:
    """RangedObject.view (a zstd frame's compressed bytes): the bytes read() gives; a
    sequential reader's read inside one chunk is a view of that chunk, not a copy."""
    fake = _Fake(40 * MiB + 12345, delay=0)
    obj = fake.open()
    chunk = ranged_mod.CHUNK
    assert bytes(obj.view(100, 5000)) == fake.data[100:5100]  # the head
    assert bytes(obj.view(len(fake.data) - 300, 1000)) == fake.data[-300:]  # the tail
    assert bytes(obj.view(30 * MiB + 7, 4096)) == fake.data[30 * MiB + 7:30 * MiB + 4103]
    shared = 0
    at, step = 2 * MiB, 700 * 1024 + 13
    while at < len(fake.data):
        view = obj.view(at, step)
        assert bytes(view) == fake.data[at:at + step]
        inside = at // chunk == (min(at + step, len(fake.data)) - 1) // chunk
        shared += inside and len(memoryview(view.obj)) == chunk
        at += step
    assert shared > 30  # of 55 reads, 5 across chunks and the run's first few
    obj.close()


class _Cut:
    """A body of the fake object that ends (or raises, as a dropped connection does) after
    `cut` bytes; a readinto answers at most 1 MiB, as a socket does."""

    def __init__(self, data: bytes, start: int, end: int, cut: int, raises: bool) -> None:
        self.view = memoryview(data)[start:min(end, start + cut)]
        self.raises = raises and start + cut < end
        self.closed = False

    def readinto(self, view: memoryview) -> int:
        if not self.view and self.raises:
            raise ranged_mod.BodyBroke("fake: the connection broke off")
        n = min(len(view), len(self.view), MiB)
        view[:n] = self.view[:n]
        self.view = self.view[n:]
        return n

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("direct", [False, True])
def test_a_stream_is_one_request_resumed_where_it_broke_off(direct: bool) -> None:
    """stream() of a store that streams bodies: one request for the whole object, read ahead
    in bounded pieces (or, direct, read by the reader's own calls straight into its buffers);
    a body that ends early or breaks off is asked for again from where it stopped, and the
    bytes are exact."""
    fake = _Fake(40 * MiB + 12345, delay=0)
    opened: list[tuple[int, int]] = []
    bodies: list[_Cut] = []

    def open_body(start: int, end: int) -> _Cut:
        opened.append((start, end))
        cut = 9 * MiB + 7 if len(opened) < 4 else end  # the first three break off
        bodies.append(_Cut(fake.data, start, end, cut, raises=len(opened) % 2 == 1))
        return bodies[-1]

    tail = ranged_mod.TAIL
    obj = RangedObject("fake", len(fake.data), b"v1", fake.fetch,
                       (len(fake.data) - tail, fake.data[-tail:]), open_body)
    stream = obj.stream(direct=direct)
    got = bytearray()
    buf = bytearray(3 * MiB + 5)
    while n := stream.readinto(buf):
        assert direct is False or n == min(len(buf), len(fake.data) - len(got))  # filled
        got += buf[:n]
    assert bytes(got) == fake.data
    assert [s for s, _ in opened] == [0, 9 * MiB + 7, 18 * MiB + 14, 27 * MiB + 21]
    assert all(e == len(fake.data) for _, e in opened) and fake.asked == []
    stream.close()
    assert all(b.closed for b in bodies)


def test_a_sequential_reader_gets_its_chunks_from_one_streamed_request() -> None:
    """A reader that goes through the object in order (a mount's sequential read) is served
    chunk by chunk from one streamed request, resumed where it breaks off; a read far from it
    is its own ranged request, and the stream goes on after it."""
    fake = _Fake(80 * MiB, delay=0)
    opened: list[int] = []

    def open_body(start: int, end: int) -> _Cut:
        opened.append(start)
        return _Cut(fake.data, start, end, 20 * MiB + 3 if len(opened) == 1 else end,
                    raises=True)

    tail = ranged_mod.TAIL
    obj = RangedObject("fake", len(fake.data), b"v1", fake.fetch,
                       (len(fake.data) - tail, fake.data[-tail:]), open_body)
    got = bytearray()
    view = memoryview(bytearray(256 << 10))
    for at in range(2 * MiB, 60 * MiB, len(view)):
        n = obj.readinto(at, view)
        got += view[:n]
        if at == 30 * MiB:  # a read elsewhere meanwhile
            assert obj.read(70 * MiB + 5, 4096) == fake.data[70 * MiB + 5:70 * MiB + 5 + 4096]
    assert bytes(got) == fake.data[2 * MiB:60 * MiB]
    assert len(opened) == 2 and opened[1] == 20 * MiB + 3 + opened[0]
    # ranged requests: the run's first reads (before it counts as sequential), the side read
    assert [r for r in fake.asked if r[0] >= 2 * MiB + ranged_mod.RUN] == [
        (70 * MiB + 5, 70 * MiB + 5 + 4096)]
    obj.close()


@pytest.mark.parametrize("direct", [False, True])
def test_a_stream_that_keeps_breaking_is_one_error(direct: bool) -> None:
    fake = _Fake(8 * MiB, delay=0)

    def open_body(start: int, end: int) -> _Cut:
        return _Cut(fake.data, start, end, 0, raises=True)

    tail = ranged_mod.TAIL
    obj = RangedObject("fake", len(fake.data), b"v1", fake.fetch,
                       (len(fake.data) - tail, fake.data[-tail:]), open_body)
    stream = obj.stream(direct=direct)
    with pytest.raises(VmafsError, match="broke off"):
        stream.readinto(bytearray(MiB))
    stream.close()


def test_an_upload_holds_only_its_parts_in_flight(s3: S3Env) -> None:
    upload = S3Upload(s3.url("mem.bin"), base_part=5 * MiB, in_flight=2)
    block = os.urandom(MiB)
    tracemalloc.start()
    try:
        for _ in range(60):
            upload.write(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    upload.commit()
    assert peak < (2 + 2) * 5 * MiB + 4 * MiB, peak  # parts in flight, one filling, slack
    assert len(s3.get("mem.bin")) == 60 * MiB and s3.uploads() == []


def test_a_side_read_does_not_disturb_a_stream() -> None:
    """A stream's reader that also reads elsewhere (verify of a .vma.zst reads its seek table
    near the end as the frames pass) gets that read alone: no chunks there, none evicted."""
    fake = _Fake(128 * MiB, delay=0)
    obj = fake.open()
    stream = obj.stream()
    buf = bytearray(MiB)
    for _ in range(20):
        stream.readinto(buf)
    at = 120 * MiB + 12345
    assert obj.read(at, 65536) == fake.data[at:at + 65536]
    assert [r for r in fake.asked if r[0] <= at < r[1]] == [(at, at + 65536)]  # alone, exact
    got = bytearray(buf)
    while n := stream.readinto(buf):
        got += buf[:n]
    assert bytes(got) == fake.data[19 * MiB:]
    chunks = [(s, e) for s, e in fake.asked if e - s == ranged_mod.STREAM_CHUNK]
    assert len(chunks) == len(set(chunks))  # none fetched twice
    stream.close()


def test_s3_store_lists_a_prefix_and_removes(s3: S3Env) -> None:
    for key in ("p/a.vma", "p/b.vma.zst", "p/sub/c.vma", "q.vma"):
        s3.put(key, b"x" * 3)
    store = store_for(s3.url("p/"))
    entries = store.list(s3.url("p/"))
    assert [e.name for e in entries] == ["a.vma", "b.vma.zst"]
    assert entries[0].location == s3.url("p/a.vma") and entries[0].size == 3
    assert store.list(s3.url("p")) == entries
    seen = store.stat(s3.url("p/a.vma"))
    assert seen is not None and seen.identity == entries[0].identity
    s3.put("p/a.vma", b"changed")
    with pytest.raises(VmafsError, match="replaced"):
        store.remove(s3.url("p/a.vma"), seen.identity)
    store.remove(s3.url("p/a.vma"))
    assert store.stat(s3.url("p/a.vma")) is None


def test_a_directory_place(tmp_path: Path) -> None:
    (tmp_path / "a.vma").write_bytes(b"x")
    (tmp_path / "b.vma").write_bytes(b"y")
    os.mkfifo(tmp_path / "f.vma")
    (tmp_path / "l.vma").symlink_to("a.vma")
    with Place(str(tmp_path)) as place:
        assert place.names() == ["a.vma", "b.vma", "f.vma", "l.vma"]
        kinds = {n: place.kind(n) for n in place.names()}
        assert kinds["a.vma"] is not None and kinds["a.vma"][0] == "regular"
        assert kinds["l.vma"] == ("link", kinds["a.vma"][1])  # the target's identity
        assert kinds["f.vma"] == ("other", b"")
        assert place.remove("l.vma", None) == REPLACED  # never a symlink
        seen = kinds["b.vma"]
        assert seen is not None
        (tmp_path / "new").write_bytes(b"z")
        (tmp_path / "new").rename(tmp_path / "b.vma")  # another file (inode) under the name
        assert place.remove("b.vma", seen[1]) == REPLACED
        assert place.remove("a.vma", kinds["a.vma"][1]) is None
        assert place.remove("a.vma", None) == GONE
        place.sync()


def test_an_s3_place(s3: S3Env) -> None:
    s3.put("p/a.vma", b"1")
    s3.put("p/a.vma.protected", b"")
    with Place(s3.url("p/")) as place:
        assert place.names() == ["a.vma", "a.vma.protected"]
        assert place.exists("a.vma.protected") and not place.exists("b.vma")
        kind = place.kind("a.vma")
        assert kind is not None and kind[0] == "regular"
        assert place.path("a.vma") == s3.url("p/a.vma")
        s3.put("p/a.vma", b"2")
        assert place.remove("a.vma", kind[1]) == REPLACED
        assert place.remove("a.vma", None) is None
        assert place.remove("a.vma", None) == GONE
    assert s3.keys("p/") == ["p/a.vma.protected"]


def test_place_helpers_for_paths_and_objects(s3: S3Env, tmp_path: Path) -> None:
    (tmp_path / "a.vma").write_bytes(b"abc")
    assert names(str(tmp_path)) == ["a.vma"] and exists(str(tmp_path / "a.vma"))
    assert absolute("x.vma") == os.path.abspath("x.vma")
    s3.put("h/a.vma", b"abcd")
    assert absolute(s3.url("h/a.vma")) == s3.url("h/a.vma")
    assert names(s3.url("h/")) == ["a.vma"] and names(s3.url("h")) == ["a.vma"]
    assert exists(s3.url("h/a.vma")) and not exists(s3.url("h/b.vma"))
    st = lstat(s3.url("h/a.vma"))
    assert st is not None and st.st_size == 4 and (st.st_dev, st.st_ino) == remote_key(
        s3.url("h/a.vma"))
    assert lstat(s3.url("h/none.vma")) is None


def test_several_readers_in_order_and_a_long_advise_read_whole_chunks() -> None:
    """Readers each going through their own span of the object (a zstd layout check's
    threads, a small read every 128 KiB after an advise of the span) are each a sequential
    reader: whole chunks, no run of small requests first, memory bounded; a short advise on
    a fresh object (one frame) starts nothing."""
    fake = _Fake(64 * MiB, delay=0.002)
    obj = fake.open()
    obj.advise(8 * MiB, 4 * MiB)
    assert fake.asked == []
    errors: list[BaseException] = []
    most = [0]

    def walk(start: int) -> None:
        try:
            obj.advise(start, 16 * MiB)
            for at in range(start, start + 16 * MiB, 128 << 10):
                assert obj.read(at, 3) == fake.data[at:at + 3]
                most[0] = max(most[0], len(obj._chunks))
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    threads = [threading.Thread(target=walk, args=(start,))
               for start in (8 * MiB, 24 * MiB, 40 * MiB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    chunk = ranged_mod.CHUNK
    assert all(s % chunk == 0 and e - s == chunk for s, e in fake.asked), fake.asked
    assert len(fake.asked) == len(set(fake.asked))  # each chunk once (and some read ahead)
    assert most[0] <= ranged_mod.RUNS * (ranged_mod.AHEAD + ranged_mod.KEEP + 1)
    obj.close()


class _Counting:
    """A plain archive file as a store's object would be read: `remote`, each pread counted."""

    remote = True
    checked_by_reader = False

    def __init__(self, source: object) -> None:
        self.source = source
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.source.size  # type: ignore[attr-defined, no-any-return]

    def pread(self, offset: int, length: int) -> bytes | memoryview:
        self.reads.append((offset, length))
        return self.source.pread(offset, length)  # type: ignore[attr-defined, no-any-return]


def test_confirming_an_increment_reads_each_header_with_the_runs_beside_it(
        tmp_path: Path) -> None:
    """Opening an increment in a store confirms its index against the extent headers: each
    header is read with the data-less extents before it (its block sums) in one request,
    one more for the last run (up to the index), and the clusters it holds are what a local
    open finds."""
    import random

    import numpy as np
    from prune_fuzz import write

    from vmafs.archive import locate
    from vmafs.archive.chain import link_to
    from vmafs.archive.reader import Archive, read_source_header
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output
    from vmafs.container.plain import PlainSource
    from vmafs.container.source import open_file
    from vmafs.format import chain

    rng = random.Random(3)
    write(tmp_path / "base.vma", {})
    with Archive.open(str(tmp_path / "base.vma"), layer=True) as base:
        link = chain.encode(chain.ChainRecord(parent=link_to(base)))
    with open_output(str(tmp_path / "inc.vma")) as out:  # 3 extents of 59 clusters at most
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", 256 * 65536)],
                               [(chain.CONFIG_NAME, link)], incremental=[1])
        for c in sorted(rng.sample(range(256), 150)):
            writer.write(1, c * 65536, rng.randbytes(65536))
        writer.finish()
    seen = []
    for remote in (False, True):
        source = PlainSource(open_file(str(tmp_path / "inc.vma")))
        header, _ = read_source_header(source)
        footer = locate.find_footer(source, header)
        assert footer is not None
        table = locate.load_index(source, header, footer)
        counted = _Counting(source)
        counted.remote = remote
        _, rules = locate.confirm_index(counted, header, table,  # type: ignore[arg-type]
                                        footer.index_offset, complete=False)
        seen.append({dev: np.concatenate(list(held.iter_present())).tolist()
                     for dev, held in rules.seen.items()})
        assert len(table.ext_offsets) == 3
        assert len(counted.reads) <= len(table.ext_offsets) + 1  # the last run: its own
        source.close()
    assert seen[0] == seen[1] and len(seen[0][1]) == 150
