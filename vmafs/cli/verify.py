"""`vmafs verify`: every rule Proxmox's reader enforces, completeness, and our checksums; for
an incremental archive, every link of its chain and every archive in it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from vmafs.archive import locate, problems
from vmafs.archive.problems import Problem, problem_of
from vmafs.archive.scan import BadData, ScanResult, read_header, scan_stream
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_base, add_json, add_quiet, progress_for
from vmafs.container.streams import open_stream
from vmafs.errors import (
    EXIT_DAMAGED,
    EXIT_SUPERSEDED_DAMAGE,
    FormatError,
    VmafsError,
    about,
)
from vmafs.format import vma
from vmafs.format.names import display, display_text, json_name
from vmafs.progress import print_json

if TYPE_CHECKING:
    from vmafs.archive.clusterset import ClusterSet


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help=COMMANDS["verify"],
                       description="Read the whole archive and check every rule of Proxmox's "
                                   "VMA reader, that every cluster of every device is present "
                                   "exactly once, and the data checksums of the trailing index. "
                                   "An incremental archive holds only what changed: verify "
                                   "then checks every link of its chain (each parent present, "
                                   "the one it was taken from) and every archive of the chain. "
                                   "Exit status 0 only if everything holds; 3 if the "
                                   "archive or its chain is damaged or incomplete; 4 if the "
                                   "only damage is in clusters of older archives that a "
                                   "newer one replaces (the chain's current data is intact: "
                                   "a warning names each).")
    add_archive_input(p)
    add_base(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def scan_file(path: str, quiet: bool) -> ScanResult:
    """One archive, start to end; a rule broken on the way raises FormatError."""
    with open_stream(path) as stream:  # one pass, so stdin works too
        header = read_header(stream)
        progress = progress_for(argparse.Namespace(quiet=quiet), "verify",
                                sum(d.size for d in header.devices))
        try:
            # no bar (quiet, or not a terminal): no progress counted per extent
            return scan_stream(stream, progress=progress.update if progress.enabled else None,
                               header=header,
                               block_sums=locate.footer_block_sums(path, header))
        finally:
            progress.finish()


def check_chain(path: str, bases: list[str], quiet: bool
                ) -> tuple[list[dict[str, Any]], list[Problem], list[Problem]]:
    """The archives of an incremental archive's chain (oldest first, as `list --json` shows
    them), what is wrong with them, and
    the damage that does not reach the chain's current data: a bad cluster of an ancestor
    that a newer layer has a slot for (data or zeros), which no reader of the chain reads."""
    if path == "-":
        return [], [Problem(problems.CHAIN, "incremental: its chain is verified from its file, "
                            "not from standard input")], []
    from vmafs.archive.chain import resolve  # 20 ms of imports a full archive does without

    try:
        layers = resolve(path, bases)
    except VmafsError as exc:
        return [], [Problem(problems.CHAIN, str(exc))], []
    paths = [a.path or "" for a in layers]
    links = [{"archive": a.path, "uuid": str(a.uuid), "ctime": a.ctime,
              "incremental": a.incremental,
              "stored_bytes": sum(a.stored_bytes(d.dev_id) for d in a.devices)}
             for a in layers]
    # per layer, device name -> the clusters it has slots for (None: a full archive, all)
    held = [{d.name: a.held(d.dev_id) for d in a.devices} for a in layers]
    for archive in layers:
        archive.close()
    found: list[Problem] = []
    superseded: list[Problem] = []
    for k, ancestor in enumerate(paths[:-1]):
        try:
            result = scan_file(ancestor, quiet)
        except FormatError as exc:
            found.append(_in(ancestor, problem_of(exc)))
            continue
        bad = result.bad_data
        if bad is None or not len(bad):
            found += [_in(ancestor, p) for p in result.problems]
            continue
        data = bad.problems(result.header)
        found += [_in(ancestor, p) for p in result.problems if p not in data]
        by = _replaced_by(bad, result.header, held[k + 1:])
        found += [_in(ancestor, p) for p in bad.select(by < 0).problems(result.header)]
        replaced = bad.select(by >= 0)
        newer = [paths[k + 1 + j] for j in by[by >= 0].tolist()]
        superseded += [_superseded(ancestor, p, newer[i] if p.cluster is not None else None)
                       for i, p in enumerate(replaced.problems(result.header))]
    return links, found, superseded


def _replaced_by(bad: BadData, header: vma.Header, newer: list[dict[str, ClusterSet | None]]
                 ) -> np.ndarray:
    """For each bad cluster, which of the newer layers (oldest first) first has a slot for
    it, -1 for none: the chain reads that cluster from there, never from the damaged one."""
    names = {d.dev_id: d.name for d in header.devices}
    by = np.full(len(bad), -1, np.int64)
    clusters = bad.clusters.astype(np.int64)
    for j, sets in enumerate(newer):
        for dev_id in np.unique(bad.dev_ids).tolist():
            held = sets.get(names.get(dev_id, ""))
            if held is None:
                continue
            rows = np.flatnonzero((bad.dev_ids == dev_id) & (by < 0))
            by[rows[held.contains_array(clusters[rows])]] = j
    return by


def _superseded(ancestor: str, problem: Problem, newer: str | None) -> Problem:
    what = (f"which {display(newer)} replaces" if newer is not None
            else "each replaced by a newer layer")
    return _in(ancestor, Problem(problem.kind, f"{problem.message}, {what}: the chain's "
                                 "current data is intact", problem.device, problem.cluster,
                                 problem.offset))


def _in(path: str, problem: Problem) -> Problem:
    return Problem(problem.kind, f"ancestor {display(path)}: {problem.message}",
                   problem.device, problem.cluster, problem.offset)


def run(args: argparse.Namespace) -> int:
    try:
        result = scan_file(args.archive, args.quiet)
    except FormatError as exc:  # one line; with --json the one failure object (vmafs(1))
        raise about(args.archive, exc) from None
    found = list(result.problems)
    chain: list[dict[str, Any]] = []
    superseded: list[Problem] = []
    if result.incremental and not found:
        chain, chain_problems, superseded = check_chain(args.archive, args.base, args.quiet)
        found += chain_problems
    ok = not found and not superseded
    if args.json:  # the vocabulary of vmafs(1); `superseded` only when there is some
        devices = result.header.devices
        print_json({
            "ok": ok, "archive": args.archive,
            "problems": [p.to_json() for p in found],
            **({"superseded": [p.to_json() for p in superseded]} if superseded else {}),
            "devices": [{"dev_id": d.dev_id, **json_name(d.name), "device_bytes": d.size}
                        for d in devices],
            "device_bytes": sum(d.size for d in devices),
            "stored_bytes": result.stored_bytes, "indexed": result.has_index,
            "header_digest": result.header_digest, "block_sums": result.block_sums,
            "incremental": result.incremental, "chain": chain,
        })
    elif ok:
        what = ("no vmafs index: no data checksums" if not result.has_index
                else "data checksums and header digest verified" if result.header_digest
                else "data checksums verified; no header digest")
        if result.block_sums:
            what += ", over 4 KiB block sums"
        if chain:
            what += f"; a chain of {len(chain)} archives, every link and archive checked"
        print(f"{args.archive}: OK ({len(result.header.devices)} devices, "
              f"{result.extents} extents, {result.stored_bytes} bytes stored; {what})")
    else:
        for problem in found:  # a chain problem names the archive it is about
            prefix = "" if problem.kind == problems.CHAIN else f"{args.archive}: "
            print(display_text(f"{prefix}{problem}"), file=sys.stderr)
        for problem in superseded:
            print(display_text(f"vmafs verify: warning: {problem}"), file=sys.stderr)
    if found:
        return EXIT_DAMAGED
    return EXIT_SUPERSEDED_DAMAGE if superseded else 0
