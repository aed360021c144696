"""The VMA slot rules, in one place for every reader: the forward scan (verify, extract,
convert), the walk of an un-indexed archive, and the check of a trailing index.

Proxmox's reader (vma-reader.c restore_extent) checks each used slot: a known device, vmstate in
order, no cluster past the device end (zero slots inside its bitmap's rounding are ignored), no
cluster twice, no mask bit past the end. vmafs adds completeness: every cluster once. Checks are
vectorised over any number of slots, so a caller may batch extents; the first bad slot in stream
order is the one reported, with Proxmox's message.
"""

from __future__ import annotations

import functools

import numpy as np

from vmafs.archive import problems
from vmafs.archive.clusterset import ClusterSet
from vmafs.format import vma


class ClusterRules:
    """Slot rules plus completeness for one archive; memory follows the clusters seen."""

    def __init__(self, header: vma.Header) -> None:
        self.header = header
        self.devices = {d.dev_id: d for d in header.devices}
        self.seen = {d.dev_id: ClusterSet(d.clusters) for d in header.devices}
        self.vmstate_id = header.vmstate.dev_id if header.vmstate is not None else -1
        self.vmstate_next = 0
        # per dev_id: cluster count, bitmap capacity (rounded up to 64), last cluster's end mask
        self._clusters = np.zeros(256, np.int64)
        self._capacity = np.zeros(256, np.int64)
        self._known = np.zeros(256, bool)
        self._last_mask = np.zeros(256, np.int64)
        for d in header.devices:
            self._known[d.dev_id] = True
            self._clusters[d.dev_id] = d.clusters
            self._capacity[d.dev_id] = -(-d.clusters // 64) * 64
            self._last_mask[d.dev_id] = vma.end_mask(d.size, d.clusters - 1)

    def check(self, dev_ids: np.ndarray, clusters: np.ndarray, masks: np.ndarray,
              offsets: np.ndarray) -> None:
        """Check used slots (in stream order) and record them; offsets: each slot's extent.

        Raises the ArchiveError of the first slot that breaks a rule; then nothing is recorded.
        """
        if not len(dev_ids):
            return
        if self._ascending_run(dev_ids, clusters, masks, offsets):
            return
        dev = dev_ids.astype(np.intp)
        cl = clusters.astype(np.int64)
        mk = masks.astype(np.int64)
        # one device (the usual run of slots): its limits as scalars, not gathered per slot
        per_dev = int(dev[0]) if dev.min() == dev.max() else dev
        vmstate = np.broadcast_to(per_dev == self.vmstate_id, dev.shape)
        known = np.broadcast_to(self._known[per_dev], dev.shape)
        unknown = ~known & ~vmstate
        bad_vmstate = np.zeros(len(dev), bool)
        if vmstate.any():
            where = np.flatnonzero(vmstate)
            expected = self.vmstate_next + np.arange(len(where))
            bad_vmstate[where] = cl[where] != expected
        limit = self._clusters[per_dev]
        beyond = known & (cl >= limit)
        ignored = beyond & (mk == 0) & (cl < self._capacity[per_dev])
        beyond &= ~ignored
        past_end = known & (cl == limit - 1) & ((mk & ~self._last_mask[per_dev]) != 0)
        counted = known & ~beyond & ~ignored
        ids = np.flatnonzero(np.bincount(dev[counted], minlength=256)).tolist()
        groups = {d: (slice(None) if len(ids) == 1 and counted.all()
                      else np.flatnonzero(counted & (dev == d))) for d in ids}
        duplicate = np.zeros(len(dev), bool)
        for dev_id, rows in groups.items():
            duplicate[rows] = _duplicates(self.seen[dev_id], cl[rows])
        bad = unknown | bad_vmstate | beyond | duplicate | past_end
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._error(i, dev, cl, mk, offsets, unknown, bad_vmstate, beyond, duplicate)
        for dev_id, rows in groups.items():
            self.seen[dev_id].add_array(cl[rows])
        self.vmstate_next += int(vmstate.sum())

    def _ascending_run(self, dev_ids: np.ndarray, clusters: np.ndarray, masks: np.ndarray,
                       offsets: np.ndarray) -> bool:
        """The slots a writer emits, data or zero, checked as a few ranges: one device,
        ascending clusters inside it, no mask bit past its end. True if they were (and are
        kept); anything else (including every broken rule but a duplicate) takes the general
        check, which reports it."""
        dev_id = int(dev_ids[0])
        first, last, n = int(clusters[0]), int(clusters[-1]), len(clusters)
        limit = int(self._clusters[dev_id])
        if (not self._known[dev_id] or last >= limit
                or (last == limit - 1 and int(masks[-1]) & ~int(self._last_mask[dev_id]))
                or dev_ids.tobytes() != bytes((dev_id,)) * n):
            return False
        if (last - first == n - 1 and clusters.dtype == np.uint32
                and (clusters - np.uint32(first)).tobytes() == _counting(n)):
            starts, ends = [0], [n]  # one run (a data extent): no numpy step by step
        else:
            steps = np.diff(clusters.astype(np.int64))
            breaks = np.flatnonzero(steps != 1)
            if len(breaks) > 4096 or (steps[breaks] <= 0).any():
                return False  # not ascending, or too scattered for ranges: the general check
            starts = np.concatenate(([0], breaks + 1)).tolist()
            ends = np.concatenate((breaks + 1, [n])).tolist()
        seen = self.seen[dev_id]
        for lo, hi in zip(starts, ends, strict=True):
            first = int(clusters[lo])
            again = seen.first_present(first, first + hi - lo)
            if again is not None:
                name = self.devices[dev_id].name
                raise problems.error(problems.DUPLICATE,
                                     f"found duplicated cluster {again} for stream {name}",
                                     device=name, cluster=again,
                                     offset=int(offsets[lo + again - first]))
        for lo, hi in zip(starts, ends, strict=True):
            seen.add_range(int(clusters[lo]), int(clusters[lo]) + hi - lo)
        return True

    def _error(self, i: int, dev: np.ndarray, cl: np.ndarray, mk: np.ndarray,
               offsets: np.ndarray, unknown: np.ndarray, bad_vmstate: np.ndarray,
               beyond: np.ndarray, duplicate: np.ndarray) -> problems.ArchiveError:
        dev_id, cluster, mask, offset = int(dev[i]), int(cl[i]), int(mk[i]), int(offsets[i])
        if unknown[i]:
            return problems.error(problems.FORMAT, f"got wrong dev id {dev_id}", offset=offset)
        if bad_vmstate[i]:
            return problems.error(problems.FORMAT, "found out of order vmstate data",
                                  device=vma.VMSTATE, cluster=cluster, offset=offset)
        name = self.devices[dev_id].name
        if beyond[i] and mask == 0:
            return problems.error(problems.FORMAT,
                                  f"cluster {cluster} beyond the end of stream {name}",
                                  device=name, cluster=cluster, offset=offset)
        if duplicate[i]:
            return problems.error(problems.DUPLICATE,
                                  f"found duplicated cluster {cluster} for stream {name}",
                                  device=name, cluster=cluster, offset=offset)
        return problems.error(problems.FORMAT, "got wrong block address - write beyond end "
                              f"(cluster {cluster} of stream {name})",
                              device=name, cluster=cluster, offset=offset)

    def missing(self) -> list[problems.Problem]:
        """One problem per device that lacks clusters: the first one and how many."""
        found = []
        for dev_id, seen in self.seen.items():
            first = seen.first_missing()
            if first is None:
                continue
            name = self.devices[dev_id].name
            count = seen.missing_count()
            found.append(problems.Problem(
                problems.MISSING,
                f"detected missing cluster {first} for stream {name}"
                + (f" ({count} clusters missing)" if count > 1 else ""),
                device=name, cluster=first))
        return found


@functools.lru_cache(maxsize=16)
def _counting(n: int) -> bytes:
    """0, 1, ... n - 1 as native u32: a run of consecutive clusters, less its first."""
    return np.arange(n, dtype=np.uint32).tobytes()


def _duplicates(seen: ClusterSet, clusters: np.ndarray) -> np.ndarray:
    """Per element: already seen, or an earlier element of the same array has it."""
    dup = seen.contains_array(clusters)
    if len(clusters) > 1 and not (clusters[1:] > clusters[:-1]).all():
        order = np.argsort(clusters, kind="stable")
        ordered = clusters[order]
        repeat = np.zeros(len(clusters), bool)
        repeat[1:] = ordered[1:] == ordered[:-1]
        dup[order[repeat]] = True
    return dup


def stored_blocks(masks: np.ndarray) -> int:
    """4 KiB blocks the slots with these masks store."""
    return int(vma.POPCOUNT16[masks].sum(dtype=np.int64))
