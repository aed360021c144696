"""`vmafs backup`: a consistent live backup of a running QEMU VM over QMP."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from vmafs.backup.live import Backup, BackupOptions, run_backup
from vmafs.cli.common import add_compression, add_json, add_quiet
from vmafs.cli.create import read_configs
from vmafs.errors import VmafsError
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="back up a running QEMU VM (live, copy-before-write) into an archive",
        description="Back up the disks of the running VM whose QMP monitor listens on SOCKET "
                    "into one archive, all disks at one point in time; the VM keeps running. "
                    "ARCHIVE ending in .vma is plain, .vma.zst is seekable zstd; - writes to "
                    "stdout.")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket")
    p.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                   help="archive to write (.vma, .vma.zst, or - for stdout)")
    p.add_argument("--drive", action="append", default=[], metavar="NODE[=DEVNAME]",
                   help="back up only this drive (node name, -drive id or -device id), "
                        "optionally under another device name; repeatable. Default: every "
                        "writable disk that is not a CD-ROM")
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="add a config file (stored by its base name; repeatable)")
    p.add_argument("--qga", metavar="SOCKET",
                   help="freeze the guest's filesystems through this QEMU guest agent socket "
                        "while the backup starts")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="abandon the backup when the archive output makes no progress for "
                        "this long (default 30)")
    p.add_argument("--max-workers", type=int, default=4, metavar="N",
                   help="QEMU copy workers per disk (x-perf, if QEMU has it; 0: QEMU's "
                        "default). Fewer workers keep guest write latency low (default 4)")
    add_compression(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def parse_drive(arg: str) -> tuple[str, str | None]:
    node, sep, name = arg.partition("=")
    if not node or (sep and not name):
        raise VmafsError(f"--drive {arg!r}: expected NODE or NODE=DEVNAME")
    return node, (name if sep else None)


def run(args: argparse.Namespace) -> int:
    drives = [parse_drive(a) for a in args.drive]
    if args.stall_timeout <= 0:
        raise VmafsError("--stall-timeout must be positive")
    if args.output == "-" and sys.stdout.isatty():
        raise VmafsError("refusing to write an archive to a terminal; redirect stdout")
    opts = BackupOptions(
        qmp_socket=args.qmp, output=args.output, drives=drives,
        configs=read_configs(args.config), qga_socket=args.qga,
        zstd=True if args.zstd else None, level=args.level, threads=args.threads,
        stall_timeout=args.stall_timeout,
        max_workers=args.max_workers if args.max_workers > 0 else None,
        progress=False if args.quiet else None, handle_signals=True,
    )
    job = Backup(opts)
    try:
        result = trio.run(run_backup, job)
    except VmafsError as exc:
        if job.writer_stuck:
            # The writer thread is blocked in a write that will never return (a stalled
            # pipe or file system); exiting normally would wait for it forever.
            print(f"vmafs backup: error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        raise
    if args.json:
        summary = result.summary()
        summary["bytes_out"] = job.writer.bytes_out if job.writer else None
        print_json(summary, sys.stderr if args.output == "-" else sys.stdout)
    return 0
