"""`vmafs convert`: any archive these commands read (Proxmox's included) into an indexed vmafs
archive, plain or seekable zstd, in one streaming pass without a temporary file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from vmafs.archive import locate
from vmafs.archive.scan import StoredCluster, read_header, scan_stream
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.cli import COMMANDS
from vmafs.cli.common import (
    add_archive_input,
    add_compression,
    add_json,
    add_quiet,
    frame_bytes,
    progress_for,
)
from vmafs.container.output import open_output
from vmafs.container.streams import open_stream
from vmafs.errors import FormatError, UsageError, about
from vmafs.format import chain, vma
from vmafs.format.names import json_name
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help=COMMANDS["convert"],
                       description="Rewrite any archive vmafs reads (plain, zstd, gzip or lzo "
                                   "Proxmox archives included) into an indexed vmafs archive: "
                                   "OUT ending in .vma is plain, .vma.zst seekable zstd. One "
                                   "streaming pass, no temporary file; the input is fully "
                                   "checked and OUT appears only if it passes.")
    add_archive_input(p, "input")
    p.add_argument("-o", "--output", dest="output_option", metavar="OUT",
                   help="archive to write (.vma, .vma.zst, or - for stdout), as every command "
                        "that writes an archive takes it")
    p.add_argument("output", nargs="?", metavar="OUT", help="the same, given in place")
    add_compression(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.output is None) == (args.output_option is None):
        raise UsageError("give the archive to write once: -o OUT (or OUT after the input)")
    args.output = args.output or args.output_option
    with open_stream(args.input) as stream:  # one pass: stdin cannot be opened twice
        return _run(args, stream)


def _run(args: argparse.Namespace, stream: BinaryIO) -> int:
    header = read_header(stream)
    if header.vmstate is not None:
        print(f"vmafs convert: warning: dropping the {header.vmstate.size}-byte vmstate "
              "(RAM state) device; vmafs never writes one", file=sys.stderr)
    # Device ids may have gaps in the input; the output numbers them 1..n.
    new_ids = {d.dev_id: i for i, d in enumerate(header.devices, start=1)}
    sizes = {d.dev_id: d.size for d in header.devices}
    incremental = chain.is_incremental(header.configs)
    progress = progress_for(args, "convert", sum(sizes.values()))
    # An archive's content digest (what its children link to) covers its index's checks, so
    # the output checks the way the input does: data checksums for an archive written before
    # block sums, read from its footer first where it can be read at random
    said = locate.footer_block_sums(args.input, header)
    block_sums = said is not False
    with open_output(args.output, zstd=args.zstd or None, level=args.level,
                     threads=args.threads, frame_size=frame_bytes(args)) as out:
        writer = ArchiveWriter(out, [DeviceSpec(d.name, d.size) for d in header.devices],
                               header.configs, uuid=header.uuid, ctime=header.ctime,
                               progress=progress.update, block_sums=block_sums,
                               incremental=new_ids.values() if incremental else ())

        def on_extent(slots: list[StoredCluster]) -> None:
            for slot in slots:
                dev_id = new_ids.get(slot.dev_id)
                if dev_id is None:
                    continue
                start = slot.cluster * vma.CLUSTER_SIZE
                length = min(vma.CLUSTER_SIZE, sizes[slot.dev_id] - start)
                if not slot.mask:  # finish() emits them; an incremental names each one
                    if incremental:
                        writer.write_zeroes(dev_id, start, length)
                    continue
                # copy: the scan reuses its buffer, the writer keeps what it is given
                data = (bytes(slot.data[:length]) if slot.mask == vma.FULL_MASK
                        else vma.expand_blocks(slot.data, slot.mask)[:length])
                writer.write(dev_id, start, data)

        def on_zeros(dev_ids: np.ndarray, clusters: np.ndarray) -> None:
            """An increment's zero slots of the extents without data, as ranges: in an
            increment they replace the parent's data (a full archive's need no care: every
            cluster not written becomes one at finish)."""
            for dev_id, lo, hi in cluster_runs(dev_ids, clusters):
                new_id = new_ids.get(dev_id)
                if new_id is not None:
                    start = lo * vma.CLUSTER_SIZE
                    writer.write_zeroes(new_id, start,
                                        min(hi * vma.CLUSTER_SIZE, sizes[dev_id]) - start)

        try:
            result = scan_stream(stream, on_extent, header=header, block_sums=said,
                                 on_zeros=on_zeros if incremental else None)
        except FormatError as exc:
            raise about(args.input, exc) from None
        if result.problems:
            raise FormatError(f"{args.input}: {result.problems[0]}")
        if result.has_index and result.block_sums != block_sums:  # a stream: known only now
            raise FormatError(f"{args.input}: its index checks data, not block sums (written "
                              "by an older vmafs); convert it from a file, not a stream, so "
                              "that archives linked to it still find it")
        writer.finish()
    progress.finish()
    if args.json:
        print_json({"ok": True, "archive": args.input, "output": args.output,
                    "archive_bytes": out.bytes_out,
                    "devices": [{"dev_id": new_ids[d.dev_id], **json_name(d.name),
                                 "device_bytes": d.size} for d in header.devices],
                    "device_bytes": sum(sizes.values()),
                    "seconds": round(progress.elapsed, 3)})
    return 0


def cluster_runs(dev_ids: np.ndarray, clusters: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(dev_id, first, end) of each run of consecutive clusters of one device, in the order
    given: a zero-slot run of 59 slots an extent is one range, not 59 calls."""
    dev = dev_ids.astype(np.int64)
    cl = clusters.astype(np.int64)
    cuts = np.flatnonzero((np.diff(cl) != 1) | (np.diff(dev) != 0)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(cl)]))
    yield from zip(dev[starts].tolist(), cl[starts].tolist(),
                   (cl[ends - 1] + 1).tolist(), strict=True)
