"""Finding an archive's trailing index from the tail, and trusting it only where it agrees with
the stream it sits in.

The footer is the last extent; it says where the index's null extents start. An index is used
only if all of this holds, checked at open time:
- the footer and every index extent are valid null extents of this archive, and the index
  matches its checksum; a header digest in the footer is this header's (so a header
  rewritten with a resealed md5 is refused: the data checksums do not cover it);
- the extent chain it describes is whole: data extents in order from the header on, each
  ending where the next begins or where a run of data-less 512-byte extents does, up to the
  index itself;
- every data extent's header, read at the offset the index gives, lists exactly the slots the
  index lists for it, with the block count they need; every position in the runs between them
  (block sums, an increment's zero slots, Proxmox's null extents) holds a whole data-less
  extent of this archive, md5 included: Proxmox's reader stops at a broken one, so a random
  reader must not serve what lies beyond it;
- all those slots keep every VMA rule (rules.ClusterRules: known devices, in range, no mask
  bit past the end) and hold every cluster exactly once.
So each extent boundary the index relies on is one the stream walk also reaches: an index
written into a guest's data, or one that disagrees with the extent headers, is refused, and
with it the archive (never a silent fall-back to reading without checksums).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from vmafs.archive import problems
from vmafs.archive.extent_check import ExtentChain, check_extent, extent_chain, unusable
from vmafs.archive.rules import ClusterRules
from vmafs.archive.walk import Extent, decode_extent
from vmafs.container.source import ByteSource, open_source
from vmafs.errors import ChecksumError, FormatError, NotSeekableError, VmafsError
from vmafs.format import index, vma

HEAD = vma.EXTENT_HEADER_SIZE
GAP_CHUNK = 8 << 20  # bytes of data-less extents checked per read
SHORT_GAP = 64 << 10  # a run read beside its extent's header (block sums: 5 KiB an extent)
CONFIRM_THREADS = 4  # header reads in flight: a cold disk answers several at once
READ_MAX = 8 << 20  # neighbouring headers (and the runs between them) read at once
MERGE_SLACK = 1 << 20  # bytes a remote plain object's read takes in rather than ask again
BATCH_RUNS = 1024  # extents read ahead of the rules' check
BATCH_BYTES = 64 << 20


def find_footer(source: ByteSource, header: vma.Header) -> index.Footer | None:
    """The footer, if the last extent is a valid vmafs footer of this archive; else None.
    A header digest it carries must be this header's (checked here, so by every random
    access reader, before any cache is asked)."""
    footer_offset = source.size - HEAD
    if footer_offset < header.header_size:
        return None
    raw = source.pread(footer_offset, HEAD)
    try:
        ext = decode_extent(raw, header.uuid, footer_offset)
    except FormatError:
        return None
    if not ext.is_null:
        return None
    try:
        footer = index.decode_footer(ext.payload())
    except FormatError as exc:
        raise unusable(f"its footer is damaged: {exc}", footer_offset) from None
    if footer is not None:
        check_header(footer, header)
    return footer


def footer_block_sums(path: str, header: vma.Header) -> bool | None:
    """Whether the footer, read first where the archive can be read at random, says its
    checks are over block sums: a stream that does not carry them (zstd, an archive from
    before them) is then hashed one way only. None: not known (stdin, a stream, no footer,
    a damaged one: the full read says what is wrong)."""
    if path == "-":
        return None
    try:
        source, _kind = open_source(path)
    except (VmafsError, OSError):
        return None
    try:
        footer = find_footer(source, header)
    except VmafsError:
        return None
    finally:
        source.close()
    return None if footer is None else footer.block_sums


def check_header(footer: index.Footer, header: vma.Header) -> bool:
    """index.check_header_digest as an archive problem (for every reader: locate, scan)."""
    try:
        return index.check_header_digest(footer, header)
    except ChecksumError as exc:
        raise problems.error(problems.CHECKSUM, str(exc), offset=0) from None


def check_header_at_tail(path: str, header: vma.Header) -> bool | None:
    """For commands that read only the header (list, config): the header digest in the
    footer, if the archive can be read at random (plain, seekable zstd). True: checked and
    matched; False: no index or no digest; None: a stream (stdin, gzip, one-frame zstd),
    where only a full read (verify) can tell. A mismatch raises, like every reader."""
    if path == "-":
        return None
    try:
        source, _kind = open_source(path)
    except NotSeekableError:
        return None
    try:
        footer = find_footer(source, header)
    finally:
        source.close()
    return footer is not None and footer.header_digest is not None


def load_index(source: ByteSource, header: vma.Header, footer: index.Footer) -> index.IndexTable:
    """The index the footer points to, checked against its checksum (confirm_index then
    checks it against the stream)."""
    footer_offset = source.size - HEAD
    try:
        span = index.index_extent_span(footer, footer_offset)
    except FormatError as exc:
        raise unusable(str(exc), footer_offset) from None
    if footer.index_offset < header.header_size:
        raise unusable("the index starts inside the archive header", footer_offset)
    raw = source.pread(footer.index_offset, span)
    if len(raw) != span:
        raise unusable("the archive ends inside its index", footer.index_offset + len(raw))
    # all its extents checked at once (an incremental backup waits for its PREV's: 888
    # extents for a 4 GiB disk, ~20 ms one by one)
    at = footer.index_offset + HEAD * np.arange(span // HEAD)
    try:
        used = _check_null_headers(raw, at, header.uuid)[0]
    except problems.ArchiveError as exc:
        if exc.problem.kind == problems.INDEX:
            raise
        raise unusable(f"index extent damaged ({exc.problem.message})",
                       exc.problem.offset or footer.index_offset) from None
    if len(used):
        raise unusable("an index extent holds data", footer.index_offset)
    try:
        table = index.decode_index(index.check_index_blob(vma.null_payloads(raw), footer))
    except ChecksumError as exc:
        raise unusable(str(exc), footer.index_offset, problems.CHECKSUM) from None
    except FormatError as exc:
        raise unusable(str(exc), footer.index_offset) from None
    if header.vmstate is not None and (table.dev_ids == header.vmstate.dev_id).any():
        raise unusable("the index lists vmstate data", footer.index_offset)
    return table


def confirm_index(source: ByteSource, header: vma.Header, table: index.IndexTable,
                  index_offset: int, *, complete: bool = True) -> tuple[int, ClusterRules]:
    """Check that the index's extent chain is the stream's (see the module docstring), and
    that the slots of all its extents keep every rule: each cluster at most once, and (unless
    an incremental archive, `complete=False`) exactly once. Returns how many extents that
    took and the rules, whose `seen` sets are the clusters the archive holds."""
    chain = extent_chain(header, table, index_offset)
    rules = ClusterRules(header)
    try:
        _confirm_extents(source, header, table, chain, rules)
    except problems.ArchiveError as exc:
        if exc.problem.kind == problems.INDEX:
            raise
        raise unusable(exc.problem.message, exc.problem.offset or index_offset) from None
    missing = rules.missing() if complete else []
    if missing:
        raise unusable(missing[0].message, index_offset)
    return (len(chain.starts) + int((chain.gap_ends - chain.gap_starts).sum()) // HEAD,
            rules)


Slots = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # dev_ids, clusters, masks, at


def _confirm_extents(source: ByteSource, header: vma.Header, table: index.IndexTable,
                     chain: ExtentChain, rules: ClusterRules) -> None:
    """Each data extent's header and the short run of data-less extents before it (the last
    run up to the index) are one span; neighbouring spans are read together (_reads), the
    reads in a pool: a cold disk answers several at once, a store a request each. The short
    runs of a batch are checked together (one numpy pass); a long run (a sparse disk's zero
    slots, hundreds of MB for TiBs) is read and checked a chunk at a time, in order, so memory
    stays bounded. All slots go through the rules in stream order: a duplicate is reported
    where a stream walk would meet it."""
    uuid = header.uuid
    starts, gap_starts, gap_ends = chain.starts, chain.gap_starts, chain.gap_ends
    n = len(starts)
    # a plain object in a store: a request costs what ~1 MiB of its bytes does, so spans that
    # far apart are read as one (a compressed source decodes whatever frames a read spans)
    slack = MERGE_SLACK if getattr(source, "remote", False) and not hasattr(
        source, "frame_of") else 0
    short = gap_ends - gap_starts <= max(SHORT_GAP, slack)
    # run i's span: its short gap and the header after it (they touch); the last run's gap,
    # if short (if long, an empty span where the last header ends)
    last_hi = np.append(starts[-1:] + HEAD, header.header_size)[0]
    lo = np.append(np.where(short[:n], gap_starts[:n], starts),
                   gap_starts[n] if short[n] else last_hi)
    hi = np.append(starts + HEAD, gap_ends[n] if short[n] else last_hi)
    bounds = _reads(lo, hi, slack)

    def read(k: int) -> list[tuple[bytes | memoryview | None, Extent | None]]:
        """The runs of read k: each one's short gap (None: a long one) and extent."""
        first, last = int(bounds[k]), int(bounds[k + 1])
        start, end = int(lo[first]), int(hi[last - 1])
        data = source.pread(start, end - start) if end > start else b""
        out: list[tuple[bytes | memoryview | None, Extent | None]] = []
        for i in range(first, last):
            gap = None
            if short[i]:
                a, b = int(gap_starts[i]) - start, int(gap_ends[i]) - start
                gap = data[a:b]
                if len(gap) != b - a:
                    raise unusable("the archive ends inside the extents the index describes",
                               int(gap_starts[i]))
            b = int(hi[i]) - start
            ext = check_extent(data[b - HEAD:b], uuid, table, chain, i) if i < n else None
            out.append((gap, ext))
        return out

    def feed(lo: int, found: list[tuple[bytes | memoryview | None, Extent | None]]) -> None:
        heads: list[bytes | memoryview] = []
        at: list[np.ndarray] = []
        extents: list[Slots] = []

        def flush() -> None:
            parts = extents + ([_check_null_headers(b"".join(heads), np.concatenate(at), uuid)]
                               if heads else [])
            parts = [p for p in parts if len(p[0])]
            if parts:
                merged = _concat(parts)
                order = np.argsort(merged[3], kind="stable")  # stream order
                rules.check(*(column[order] for column in merged))
            heads.clear()
            at.clear()
            extents.clear()

        for i, (gap, ext) in enumerate(found, lo):
            if gap is None:
                flush()
                for pos, chunk in _chunks(source, int(gap_starts[i]), int(gap_ends[i])):
                    rules.check(*_check_null_headers(
                        chunk, pos + HEAD * np.arange(len(chunk) // HEAD), uuid))
            elif len(gap):
                heads.append(gap)
                at.append(int(gap_starts[i]) + HEAD * np.arange(len(gap) // HEAD))
            if ext is not None:
                extents.append((ext.dev_ids, ext.clusters, ext.masks,
                                np.full(len(ext.dev_ids), ext.offset, np.int64)))
        flush()

    reads = len(bounds) - 1
    if reads == 1:
        feed(0, read(0))
        return
    # batches of about BATCH_RUNS runs and BATCH_BYTES bytes read, checked in order
    cuts = [0]
    size = 0
    for k in range(reads):
        size += int(hi[bounds[k + 1] - 1] - lo[bounds[k]])
        if (bounds[k + 1] - bounds[cuts[-1]] >= BATCH_RUNS or size >= BATCH_BYTES
                or k + 1 == reads):
            cuts.append(k + 1)
            size = 0
    from concurrent.futures import ThreadPoolExecutor  # 3 ms (logging) most commands skip

    with ThreadPoolExecutor(CONFIRM_THREADS) as pool:
        for a, b in zip(cuts, cuts[1:], strict=False):
            found = [run for part in pool.map(read, range(a, b)) for run in part]
            feed(int(bounds[a]), found)


def _reads(lo: np.ndarray, hi: np.ndarray, slack: int) -> np.ndarray:
    """Where the reads of spans [lo, hi) (in order, not overlapping) start and end, as
    indices: spans at most `slack` apart are read together, READ_MAX bytes at most (plus the
    last span's own size)."""
    apart = np.ones(len(lo), bool)
    apart[1:] = lo[1:] - hi[:-1] > slack
    base = lo[np.flatnonzero(apart)][np.cumsum(apart) - 1]  # where each one's read starts
    part = (lo - base) // READ_MAX
    apart[1:] |= part[1:] != part[:-1]
    return np.append(np.flatnonzero(apart), len(lo))


def _concat(parts: list[Slots]) -> Slots:
    if not parts:
        return (np.zeros(0, np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.uint16),
                np.zeros(0, np.int64))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))


def _check_null_headers(heads: bytes | memoryview, at: np.ndarray, uuid: bytes) -> Slots:
    """Each 512 bytes of HEADS (at stream offsets AT) is a whole header of this archive with
    no data; returns their used slots (an increment's zero clusters) for the rules.

    Checked as 64 little-endian words per header, all at once: word 0 is magic, reserved and
    block_count (b"VMAE" and six zero bytes), words 1-2 the uuid, no used slot may have a
    mask; then each header's md5 (the one step a header; hashlib needs no more)."""
    first = np.frombuffer(vma.EXTENT_MAGIC + bytes(4), "<u8")[0]
    uuid_words = np.frombuffer(uuid, "<u8")
    words = np.frombuffer(heads, "<u8").reshape(-1, HEAD // 8)
    ok = (words[:, 0] == first) & (words[:, 1] == uuid_words[0]) \
        & (words[:, 2] == uuid_words[1])
    dev, clusters, masks = vma.slot_columns(heads)
    used = dev != 0
    ok &= ~(used & (masks != 0)).any(axis=1)
    if not ok.all():
        offset = int(at[np.flatnonzero(~ok)[0]])
        raise unusable(f"where it says the stream has no data, offset {offset} holds an "
                   "extent with data or none at all", offset)
    copy = np.frombuffer(heads, np.uint8).reshape(-1, HEAD).copy()
    want = copy[:, 24:40].tobytes()
    copy[:, 24:40] = 0
    flat = copy.data.cast("B")
    md5 = hashlib.md5
    got = b"".join([md5(flat[k:k + HEAD]).digest() for k in range(0, len(flat), HEAD)])
    if got != want:
        bad = np.flatnonzero((np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
                             .reshape(-1, 16).any(axis=1))[0]
        raise problems.error(problems.CHECKSUM, "wrong vma extent header chechsum "
                             "(md5 mismatch)", offset=int(at[bad]))
    return (dev[used], clusters[used].astype(np.uint32), masks[used].astype(np.uint16),
            np.repeat(at, used.sum(axis=1)))


def _chunks(source: ByteSource, start: int, end: int
            ) -> Iterator[tuple[int, bytes | memoryview]]:
    pos = start
    while pos < end:
        n = min(GAP_CHUNK, end - pos)
        data = source.pread(pos, n)
        if len(data) != n:
            raise unusable("the archive ends inside the extents the index describes", pos)
        yield pos, data
        pos += n
