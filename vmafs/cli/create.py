"""`vmafs create`: back up image files (any format QEMU reads) into one archive."""

from __future__ import annotations

import argparse
import os
import time

from vmafs.archive import naming
from vmafs.archive.configs import read_configs
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.backup import images
from vmafs.cli import COMMANDS
from vmafs.cli.common import (
    add_compression,
    add_configs,
    add_json,
    add_quiet,
    frame_bytes,
    progress_for,
)
from vmafs.container.output import open_output
from vmafs.errors import VmafsError
from vmafs.format.names import json_name
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help=COMMANDS["create"],
                       description="Back up disk images of any format QEMU reads into one "
                                   "archive. ARCHIVE ending in .vma is plain, .vma.zst is "
                                   "seekable zstd; - writes to stdout.")
    p.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                   help="archive to write (.vma, .vma.zst, - for stdout, or DIR/ for a "
                        "vzdump name in DIR)")
    p.add_argument("--vmid", metavar="ID",
                   help="with -o DIR/: the VMID in the archive's name (default: from a "
                        "NNN.conf config file)")
    add_configs(p)
    p.add_argument("drives", nargs="+", metavar="[format=FMT:]DEVNAME=IMAGE",
                   help="a disk: device name (like drive-scsi0) and image file")
    add_compression(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    parsed = [images.parse_drive(arg) for arg in args.drives]
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise VmafsError("each device name may appear only once")
    specs = [images.probe(*p) for p in parsed]
    configs = read_configs(args.config)
    if naming.is_directory_output(args.output):
        vmid = args.vmid or configs.vmid
        vmid = naming.check_vmid(vmid) if vmid else naming.default_vmid([], None)  # says why
        now = int(time.time())
        second = naming.vacant_second(args.output, vmid, now, bool(args.zstd), os.path.lexists)
        time.sleep(max(0.0, second - time.time()))
        args.output = naming.output_path(args.output, vmid, second, bool(args.zstd))
        args.zstd = False  # the name says it now
    total = sum(s.size for s in specs)
    progress = progress_for(args, "create", total)
    with open_output(args.output, zstd=args.zstd or None, level=args.level,
                     threads=args.threads, frame_size=frame_bytes(args)) as out:
        writer = ArchiveWriter(out, [DeviceSpec(s.devname, s.size) for s in specs], configs.files,
                               progress=progress.update)
        for dev_id, spec in enumerate(specs, start=1):
            if spec.format == "raw":
                images.copy_raw(writer, dev_id, spec.path, spec.size)
            else:
                from vmafs.backup.qemu_img_feed import copy_with_qemu_img  # imports trio
                copy_with_qemu_img(writer, dev_id, spec)
        writer.finish()
    progress.finish()
    if args.json:
        print_json({"ok": True, "output": args.output, "archive_bytes": out.bytes_out,
                    "device_bytes": total, "seconds": round(progress.elapsed, 3),
                    "devices": [{**json_name(s.devname), "device_bytes": s.size,
                                 "format": s.format, **json_name(s.path, "image")}
                                for s in specs]})
    return 0
