"""`vmafs merge`: an incremental chain folded into one full archive, streaming, no temporary
file; with --keep N, all but the newest N increments become a new base for them."""

from __future__ import annotations

import argparse
import sys

from vmafs.archive.chain import resolve
from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.cli import COMMANDS
from vmafs.cli.common import (
    add_base,
    add_compression,
    add_json,
    add_quiet,
    device_list,
    frame_bytes,
    int_in,
    progress_for,
)
from vmafs.container.output import check_output_name, open_output
from vmafs.container.zstd_output import Output
from vmafs.errors import VmafsError
from vmafs.format import chain
from vmafs.format.names import display
from vmafs.progress import Progress, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help=COMMANDS["merge"],
                       description="Write the chain that ends at NEWEST as one ordinary full "
                                   "archive (the disks as of NEWEST's point in time; Proxmox's "
                                   "vma extract restores it). OUT ending in .vma is plain, "
                                   ".vma.zst seekable zstd. With --keep N, fold all but the "
                                   "newest N increments instead: OUT is a new base that those "
                                   "N link to, so the folded archives can be deleted.")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="archive to write (.vma, .vma.zst, or - for stdout)")
    p.add_argument("--keep", type=int_in(0, 1 << 16), default=0, metavar="N",
                   help="leave the newest N increments out of the merge (default 0); a chain "
                        "of N or fewer increments is left as it is")
    p.add_argument("newest", metavar="NEWEST", help="the newest archive of the chain")
    add_base(p)
    add_compression(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output_name(args.output)
    layers = resolve(args.newest, args.base)
    try:
        if len(layers) == 1:
            raise VmafsError(f"{display(args.newest)}: a full archive: nothing to merge")
        if args.keep >= len(layers) - 1:  # a nightly `--keep N` on day 2
            return _nothing_to_do(args, layers)
        folded = layers[:len(layers) - args.keep]
        view = Archive.stack(folded)
        total = sum(d.size for d in view.devices)
        progress = progress_for(args, "merge", total)
        with open_output(args.output, zstd=args.zstd or None, level=args.level,
                         threads=args.threads, frame_size=frame_bytes(args)) as out:
            write_full(view, folded[-1], out, progress)
        progress.finish()
    finally:
        for archive in layers:
            archive.close()
    if args.json:
        print_json({"ok": True, "archive": args.newest, "output": args.output,
                    "archive_bytes": out.bytes_out, "device_bytes": total,
                    "devices": device_list(view.devices),
                    "merged": [a.path for a in folded],
                    "kept": [a.path for a in layers[len(folded):]],
                    "uuid": str(folded[-1].uuid), "seconds": round(progress.elapsed, 3)})
    return 0


def _nothing_to_do(args: argparse.Namespace, layers: list[Archive]) -> int:
    increments = len(layers) - 1
    if args.json:
        print_json({"ok": True, "archive": args.newest, "output": None, "merged": [],
                    "kept": [a.path for a in layers[1:]], "archive_bytes": 0})
    else:
        print(f"{display(args.newest)}: nothing to merge: its chain has {increments} "
              f"increment{'s' if increments != 1 else ''}, --keep {args.keep} keeps them all",
              file=sys.stderr)
    return 0


def write_full(view: Archive, point: Archive, out: Output, progress: Progress) -> None:
    """Every cluster of the chain view as one full archive that stands for `point`: same uuid
    and time, so children of `point` link to it."""
    configs = [(n, d) for n, d in point.configs if n != chain.CONFIG_NAME]
    configs.append((chain.CONFIG_NAME,
                    chain.encode(chain.ChainRecord(stands_for=point.identity()))))
    writer = ArchiveWriter(out, [DeviceSpec(d.name, d.size) for d in view.devices], configs,
                           uuid=point.uuid.bytes, ctime=point.ctime, progress=progress.update)
    for number, dev in enumerate(view.devices, start=1):
        for cluster, mask, data, check in view.iter_stored(dev.dev_id):
            writer.write_stored(number, cluster, mask, data, check)
    writer.finish()
