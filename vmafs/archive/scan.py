"""Reading a VMA stream from start to end, for verify, extract and convert.

Works on any input (a pipe, gzip, lzo, one-frame zstd): it only ever reads forward. The rules are
those of every reader: walk.py accepts each extent, rules.ClusterRules each slot, and the
trailing index (if any) must describe exactly what the stream holds, checksums included,
and in a block-summed archive every data extent is followed by exactly its blocks' sums.
A reader thread reads ahead (walk.READ_AHEAD extents) while this thread checks: verify uses
both cores. Reading a file, both threads read and hash an extent's data piece by piece
(walk.Hashing: each piece hashed right after its read, in C without the GIL when built); a
stream (a decoder, a pipe) is hashed here. (A third thread that hashed while this one
checked was slower on two cores: 1 GiB dense, 0.206 s vs 0.176 s.)
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, cast

import numpy as np

from vmafs.archive import problems
from vmafs.archive.locate import check_header
from vmafs.archive.problems import Problem
from vmafs.archive.rules import ClusterRules
from vmafs.archive.walk import (
    READ_AHEAD,
    Extent,
    ExtentChecks,
    Hashing,
    HeaderBatch,
    decode_extent,
    iter_stream_checked,
    read_header,
    slot_offsets,
)
from vmafs.errors import ChecksumError, FormatError
from vmafs.format import chain, index, vma

__all__ = ["BadData", "ScanResult", "StoredCluster", "read_header", "scan_stream"]


@dataclass(frozen=True)
class StoredCluster:
    """One used slot of an extent, with a view of its stored blocks."""

    dev_id: int
    cluster: int
    mask: int
    offset: int  # stream offset of its first stored block
    data: memoryview


def stored_clusters(ext: Extent, data: memoryview) -> Iterator[StoredCluster]:
    """The used slots of an (already checked) extent with views of their data."""
    base = ext.offset + vma.EXTENT_HEADER_SIZE
    offsets = (slot_offsets(ext) - base).tolist()
    for dev_id, cluster, mask, pos in zip(ext.dev_ids.tolist(), ext.clusters.tolist(),
                                          ext.masks.tolist(), offsets, strict=True):
        n = vma.POPCOUNT16_LIST[mask] * vma.BLOCK_SIZE
        yield StoredCluster(dev_id, cluster, mask, base + pos, data[pos:pos + n])


class TrailerCheck:
    """Collects the null extents at the end of a stream and checks our index against the data."""

    def __init__(self, header: vma.Header, block_sums: bool | None = None) -> None:
        self.header = header
        self.hint = block_sums  # what the footer says, if read first: only those checks
        self.index = index.IndexBuilder()
        # the trailing null extents so far, as runs of (stream offsets, 512-byte headers):
        # their payloads are gathered at the end (every data extent's sums are such a run)
        self.null_run: list[tuple[np.ndarray, np.ndarray]] = []
        self.tail = b""  # the stream's last 512 bytes, when they are data
        self.header_digest = False  # the footer carries a header digest, and it matched
        self.bad: BadData | None = None  # the clusters whose data fails its checksum
        # Block sums (format/index.py). Whether the stream carries them is seen from what
        # follows its first data extent (None until then); the sums after each data extent
        # then give each cluster a carried check, which the index must confirm as it
        # confirms the data's: sums and data are damaged apart. A stream without them (zstd,
        # or from before block sums) is hashed both ways: only its footer, at the end, says
        # which checks its index holds.
        self.summed: bool | None = None
        self.pending: tuple[int, int, np.ndarray] | None = None
        """(where its sums start, its blocks, where each stored cluster's data ends) of the
        data extent whose sums come next"""
        # None: not wanted (the stream carries sums, or the footer said block sums)
        self.data_checks: array[int] | None = None if block_sums else array("I")
        self.carried = array("I")  # per stored cluster: checksum of the sums carried for it
        self.sums_problem: Problem | None = None  # the first data extent without its sums
        self.block_sums = False  # the footer says the checks are over block sums
        # what the walk hashes as it reads (the data's checks: until the sums are seen)
        self.hashing = Hashing(data=self.data_checks is not None, summed=self.hint is not False)

    def add_extent(self, ext: Extent, data: memoryview, checks: ExtentChecks) -> None:
        """The next extent of the stream, with its data and the checks the walk hashed of its
        stored clusters (as self.hashing asked). A data extent's index columns come with
        add_columns."""
        if ext.is_null:
            raw = np.frombuffer(ext.raw, np.uint8).reshape(1, vma.EXTENT_HEADER_SIZE)
            self._sums_follow(raw)
            self.null_run.append((np.array([ext.offset], np.int64), raw))
            self.tail = b""
            return
        self._sums_follow(None)
        self.null_run = []
        self.tail = bytes(data[-vma.EXTENT_HEADER_SIZE:]) if len(data) else b""
        if len(checks.ends) and self.summed is not False:
            self.pending = (ext.offset + ext.size, len(data) // vma.BLOCK_SIZE, checks.ends)

    def add_columns(self, extents: list[Extent], checks: list[ExtentChecks],
                    dev_ids: np.ndarray, clusters: np.ndarray, masks: np.ndarray) -> None:
        """The index columns of data extents given to add_extent (in stream order; their used
        slots' columns joined): several extents a call, a few steps for them all."""
        built = self.index
        counts = [len(c.ends) for c in checks]  # each extent's stored clusters
        built.ext_offsets.extend([e.offset for e, n in zip(extents, counts, strict=True) if n])
        built.ext_counts.extend([n for n in counts if n])
        if sum(counts) == len(masks):  # every used slot stores data (Extent's dtypes are these)
            built.dev_ids.frombytes(dev_ids.tobytes())
            built.clusters.frombytes(clusters.tobytes())
            built.masks.frombytes(masks.tobytes())
        else:
            stored = masks != 0
            built.dev_ids.frombytes(dev_ids[stored].astype(np.uint8).tobytes())
            built.clusters.frombytes(clusters[stored].astype(np.uint32).tobytes())
            built.masks.frombytes(masks[stored].astype(np.uint16).tobytes())
        if self.data_checks is not None:  # asked for until data_checks is dropped
            self.data_checks.extend(_u32(b"".join(cast(np.ndarray, c.data).data
                                                  for c in checks)))
        built.checksums.extend(_u32(b"".join(  # data checksums only: these are never compared
            bytes(4 * len(c.ends)) if c.summed is None else c.summed.data for c in checks)))

    def _sums_follow(self, nulls: np.ndarray | None) -> None:
        """What follows a data extent (the headers of the null extents right after it, in
        order; None: anything else, or the end): its block sums, if the stream carries them.
        Whether it does is decided after the first data extent, from the shape alone (its
        data may be damaged): enough null extents, zero after the sums, and no index there
        (index.carried_checks)."""
        if self.pending is None:
            return
        at, blocks, ends = self.pending
        self.pending = None
        carried = None if nulls is None else index.carried_checks(nulls, blocks, ends)
        if self.summed is None:
            self.summed = carried is not None
            if carried is None:
                return
            self.data_checks = None  # carried sums: the index's checks are over them
            self.hashing.data = False
        if carried is None:
            if self.sums_problem is None:
                self.sums_problem = Problem(problems.INDEX, "the block sums after the data "
                                            f"extent ending at offset {at} are missing",
                                            offset=at)
            self.carried.extend(array("I", bytes(4 * len(ends))))
            return
        self.carried.extend(_u32(carried))

    def add_run(self, batch: HeaderBatch, used: bool = True) -> None:
        """A run of extents without data: null extents (a trailer, block sums) or zero slots
        (used: whether it may have any; False: all null, as the block sums after each data
        extent are)."""
        if self.pending is not None:
            n = index.sums_extents(self.pending[1])
            self._sums_follow(None if used and np.count_nonzero(batch.dev_ids[:n])
                              else batch.raw[:n])
        self.tail = b""
        if not used:
            self.null_run.append((batch.offsets, batch.raw))
            return
        continues, rows = batch.trailing_nulls()
        if not continues:
            self.null_run = []
        if len(rows):
            self.null_run.append((batch.offsets[rows[0]:], batch.raw[rows[0]:]))

    def verify(self) -> tuple[bool, list[Problem]]:
        """(has_index, problems): the trailing index must list exactly what the data holds."""
        self._sums_follow(None)
        if not self.null_run:
            return False, self._forged_tail()
        offsets = np.concatenate([o for o, _ in self.null_run])
        payloads = _payloads(np.concatenate([r for _, r in self.null_run]))
        size = vma.NULL_PAYLOAD_SIZE
        footer_offset = int(offsets[-1])
        try:
            footer = index.decode_footer(payloads[-size:])
        except FormatError as exc:
            return True, [_index_problem(f"trailing index: {exc}", footer_offset)]
        if footer is None:
            if any(payloads.startswith(index.INDEX_MAGIC, at)
                   for at in range(0, len(payloads), size)):
                # our index is there but its footer (the last extent) is not: cut short
                return True, [Problem(problems.TRUNCATED, "trailing index has no footer: the "
                                      "archive is truncated", offset=footer_offset)]
            return False, []
        try:
            self.header_digest = check_header(footer, self.header)
        except problems.ArchiveError as exc:
            return True, [exc.problem]
        try:
            index.index_extent_span(footer, footer_offset)
            first = int(np.searchsorted(offsets, footer.index_offset))
            blob = payloads[first * size:-size]
            table = index.decode_index(index.check_index_blob(blob, footer))
        except ChecksumError as exc:
            return True, [Problem(problems.CHECKSUM, f"trailing index: {exc}",
                                  offset=footer.index_offset)]
        except FormatError as exc:
            return True, [_index_problem(f"trailing index: {exc}", footer.index_offset)]
        self.block_sums = footer.block_sums
        if self.hint is not None and self.hint != footer.block_sums:
            return True, [_index_problem("trailing index: its footer changed while the archive "
                                         "was read", footer_offset)]
        carried = bool(self.summed)
        if len(self.index.clusters) and (carried != footer.sums_carried
                                         or (carried and not footer.block_sums)):
            say = ("its index announces block sums the stream does not carry"
                   if footer.sums_carried else
                   "the stream carries block sums its index does not announce")
            return True, [_index_problem(f"trailing index: {say}", footer.index_offset)]
        if not footer.block_sums and self.data_checks is not None:
            self.index.checksums = self.data_checks  # an index of data checksums
        seen = index.decode_index(self.index.encode())
        for name in ("dev_ids", "clusters", "masks", "offsets"):
            if not np.array_equal(getattr(seen, name), getattr(table, name)):
                return True, [_index_problem(
                    f"trailing index does not match the data ({name} differ)",
                    footer.index_offset)]
        assert seen.checksums is not None and table.checksums is not None
        bad = np.flatnonzero(seen.checksums != table.checksums)
        self.bad = BadData(seen.dev_ids[bad], seen.clusters[bad], seen.offsets[bad])
        found = self.bad.problems(self.header)
        if self.sums_problem is None and footer.sums_carried:
            wrong = np.flatnonzero(np.frombuffer(self.carried, np.uint32) != table.checksums)
            if len(wrong):
                row = int(wrong[0])
                self.sums_problem = Problem(
                    problems.INDEX, f"the block sums of {len(wrong)} cluster(s) do not match "
                    f"the index, first of cluster {int(seen.clusters[row])} (data at stream "
                    f"offset {int(seen.offsets[row])})", offset=int(seen.offsets[row]))
        if self.sums_problem is not None:
            found.append(self.sums_problem)
        return True, found

    def _forged_tail(self) -> list[Problem]:
        """A stream without an index whose last data bytes look like a vmafs footer: a random
        access reader would find an index there that the stream does not have."""
        if len(self.tail) < vma.EXTENT_HEADER_SIZE:
            return []
        try:
            ext = decode_extent(self.tail, self.header.uuid, 0)
            if not ext.is_null or not ext.payload().startswith(index.FOOTER_MAGIC):
                return []
        except FormatError:
            return []
        return [_index_problem("the archive's last data bytes look like a vmafs footer: an "
                               "index that is not part of the stream", None)]


@dataclass(frozen=True)
class BadData:
    """Every stored cluster whose data does not match the index's checksum, in stream order
    (verify tells those a newer layer of a chain replaces from those it still serves)."""

    dev_ids: np.ndarray
    clusters: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.clusters)

    def select(self, rows: np.ndarray) -> BadData:
        return BadData(self.dev_ids[rows], self.clusters[rows], self.offsets[rows])

    def problems(self, header: vma.Header, limit: int = 10) -> list[Problem]:
        """One problem each for the first `limit`, then one saying how many more."""
        names = {d.dev_id: d.name for d in header.devices}
        found = [Problem(problems.CHECKSUM,
                         f"data checksum mismatch in cluster {cluster} of "
                         f"{names.get(dev_id, dev_id)} (stream offset {offset})",
                         device=names.get(dev_id), cluster=cluster, offset=offset)
                 for dev_id, cluster, offset in zip(self.dev_ids[:limit].tolist(),
                                                    self.clusters[:limit].tolist(),
                                                    self.offsets[:limit].tolist(), strict=True)]
        if len(self) > limit:
            found.append(Problem(problems.CHECKSUM, f"... and {len(self) - limit} more bad "
                                 "clusters"))
        return found


def _payloads(headers: np.ndarray) -> bytes:
    """The payloads of null extents, joined, from their headers (rows of 512 bytes)."""
    return vma.null_payloads(np.ascontiguousarray(headers).data.cast("B"))


def _u32(little: bytes) -> array[int]:
    """index.checks' LE u32 values as the index builder's (native) array."""
    out = array("I", little)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out


def _covered(sizes: np.ndarray, dev_ids: np.ndarray, clusters: np.ndarray) -> int:
    """Device bytes these slots account for (for progress), clipped at each device's end."""
    left = sizes[dev_ids.astype(np.intp)] - clusters.astype(np.int64) * vma.CLUSTER_SIZE
    return int(np.clip(left, 0, vma.CLUSTER_SIZE).sum())


def _index_problem(message: str, offset: int | None) -> Problem:
    return Problem(problems.INDEX, message, offset=offset)


_Walked = HeaderBatch | tuple[Extent, memoryview, ExtentChecks]  # iter_stream_checked's items
RULES_BATCH = 16
"""Data extents whose slots go to the rules, and whose columns to the index, in one call
(~20 us of numpy and Python a call, in the thread that also waits for the reader)."""


class _PendingSlots:
    """Data extents whose slots the rules, and whose columns the trailer's index, have not
    had yet, in stream order."""

    def __init__(self, rules: ClusterRules, trailer: TrailerCheck, limit: int) -> None:
        self.rules = rules
        self.trailer = trailer
        self.limit = limit
        self.extents: list[Extent] = []
        self.checks: list[ExtentChecks] = []

    def add(self, ext: Extent, checks: ExtentChecks) -> None:
        self.extents.append(ext)
        self.checks.append(checks)
        if len(self.extents) >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Check the slots held (their first broken rule raises, as one call a slot would),
        then give their columns to the index."""
        held, checks = self.extents, self.checks
        if not held:
            return
        self.extents, self.checks = [], []
        if len(held) == 1:
            ext = held[0]
            dev_ids, clusters, masks = ext.dev_ids, ext.clusters, ext.masks
            offsets = np.full(len(dev_ids), ext.offset, np.int64)
        else:
            dev_ids = np.concatenate([e.dev_ids for e in held])
            clusters = np.concatenate([e.clusters for e in held])
            masks = np.concatenate([e.masks for e in held])
            offsets = np.repeat(np.array([e.offset for e in held], np.int64),
                                [len(e.dev_ids) for e in held])
        self.rules.check(dev_ids, clusters, masks, offsets)
        self.trailer.add_columns(held, checks, dev_ids, clusters, masks)

    def first(self, items: Iterator[_Walked]) -> Iterator[_Walked]:
        """The walk's items; an error of the walk comes after the held slots' (earlier in the
        stream) are checked."""
        try:
            yield from items
        except Exception:
            self.flush()
            raise


@dataclass
class ScanResult:
    header: vma.Header
    extents: int = 0
    stored_bytes: int = 0
    stream_bytes: int = 0
    has_index: bool = False
    problems: list[Problem] = field(default_factory=list)
    incremental: bool = False  # its chain record names a parent: missing clusters are its
    header_digest: bool = False  # its index carries the header's digest, and it matched
    bad_data: BadData | None = None  # data checksum mismatches (also among problems)
    block_sums: bool = False  # its index's checks are over 4 KiB block sums


def scan_stream(
    stream: BinaryIO,
    on_extent: Callable[[list[StoredCluster]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    header: vma.Header | None = None,
    on_zeros: Callable[[np.ndarray, np.ndarray], None] | None = None,
    block_sums: bool | None = None,
    on_data: Callable[[Extent, memoryview], None] | None = None,
) -> ScanResult:
    """Read a whole archive, checking every rule; on_extent sees each extent's checked slots,
    on_zeros (dev_ids, clusters) the zero slots of the extents without data, as arrays (an
    increment's zero slots mean "now zeros": a converter must keep them).

    A broken extent or slot raises ArchiveError (nothing after it can be trusted); missing
    clusters and a trailing index that disagrees with the data are collected in
    ScanResult.problems. Pass the header if it was already read from this stream (stdin cannot
    be opened twice), and `block_sums` if the footer was read first (a file): a stream without
    carried sums is then hashed only the way its index checks, not both ways. on_data sees
    each data extent (its slots checked) and a view of its data: on_extent's without an
    object a slot.
    """
    if header is None:
        header = read_header(stream)
    result = ScanResult(header, incremental=chain.is_incremental(header.configs))
    rules = ClusterRules(header)
    trailer = TrailerCheck(header, block_sums)
    sizes = np.zeros(256, np.int64)  # per dev_id; 0 for vmstate and unknown ids
    for dev in header.devices:
        sizes[dev.dev_id] = dev.size
    end = header.header_size
    # a data extent's slots are checked with the next ones' (one rules call for several):
    # before anything later in the stream is (zero slots, an error of the walk, the end), so
    # the first broken rule in stream order is still the one reported; at once for on_extent
    pending = _PendingSlots(rules, trailer, 1 if on_extent is not None or on_data is not None
                            else RULES_BATCH)
    with contextlib.closing(iter_stream_checked(stream, header, trailer.hashing,
                                                ahead=READ_AHEAD)) as items:
        for item in pending.first(items):
            if isinstance(item, HeaderBatch):
                any_used = bool(np.count_nonzero(item.dev_ids))
                if any_used:  # zero slots (not null extents: a trailer, block sums)
                    used = item.dev_ids != 0
                    pending.flush()
                    rules.check(item.dev_ids[used], item.clusters[used], item.masks[used],
                                np.repeat(item.offsets, used.sum(axis=1)))
                    if on_zeros is not None:
                        on_zeros(item.dev_ids[used], item.clusters[used])
                    if progress is not None:
                        done = _covered(sizes, item.dev_ids[used], item.clusters[used])
                        if done:
                            progress(done)
                trailer.add_run(item, any_used)
                result.extents += len(item.offsets)
                end = int(item.offsets[-1]) + vma.EXTENT_HEADER_SIZE
                continue
            ext, data, checks = item
            pending.add(ext, checks)
            if on_extent is not None:
                on_extent(list(stored_clusters(ext, data)))
            if on_data is not None:
                on_data(ext, data)
            if progress is not None:
                done = _covered(sizes, ext.dev_ids, ext.clusters)
                if done:
                    progress(done)
            trailer.add_extent(ext, data, checks)
            result.extents += 1
            result.stored_bytes += len(data)
            end = ext.offset + ext.size
        pending.flush()
    result.stream_bytes = end
    if not result.incremental:
        result.problems.extend(rules.missing())
    result.has_index, index_problems = trailer.verify()
    result.problems.extend(index_problems)
    result.header_digest = trailer.header_digest
    result.bad_data = trailer.bad
    result.block_sums = trailer.block_sums
    return result
