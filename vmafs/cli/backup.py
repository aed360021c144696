"""`vmafs backup`: a consistent live backup of a running QEMU VM over QMP."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from vmafs.cli.common import (
    add_base,
    add_compression,
    add_configs,
    add_json,
    add_quiet,
    frame_bytes,
    int_in,
)
from vmafs.errors import FormatError, UsageError, VmafsError

if TYPE_CHECKING:
    from vmafs.backup.live import Backup, BackupResult

# What a backup runs on (trio, QMP, the archive writer, numpy...) is imported by run(), not
# here: `vmafs backup --help` and a usage error need none of it.


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="back up a running QEMU VM (live, copy-before-write) into an archive",
        description="Back up the disks of the running VM whose QMP monitor listens on SOCKET "
                    "into one archive, all disks at one point in time; the VM keeps running. "
                    "ARCHIVE ending in .vma is plain, .vma.zst is seekable zstd; - writes to "
                    "stdout; DIR/ names it vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst] in DIR. "
                    "Every backup also starts a dirty bitmap per disk, so that the next one can "
                    "be incremental (--incremental).")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket")
    p.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                   help="archive to write (.vma, .vma.zst, - for stdout, or DIR/)")
    p.add_argument("--incremental", metavar="PREV",
                   help="copy only what the guest changed since the archive PREV (its dirty "
                        "bitmaps must still be there); the new archive links to PREV")
    p.add_argument("--full-if-needed", action="store_true",
                   help="with --incremental: take a full backup when PREV's bitmaps are gone "
                        "or unusable, instead of failing")
    p.add_argument("--no-bitmap", action="store_true",
                   help="start no dirty bitmap (no later incremental from this archive)")
    p.add_argument("--protected", action="store_true",
                   help="mark the archive protected once written (vzdump's ARCHIVE.protected: "
                        "prune never removes it, nor what it needs)")
    p.add_argument("--drop-old-bitmaps", action="store_true",
                   help="once the archive is written, remove every other vmafs dirty bitmap "
                        "of its disks (ends older chains: their next backup is a full one)")
    p.add_argument("--bwlimit", type=int_in(1, 1 << 40), metavar="KIB/S",
                   help="limit how fast QEMU reads each disk for the backup, in KiB/s (guest "
                        "writes that must copy old data first are never slowed)")
    p.add_argument("--vmid", metavar="ID",
                   help="with -o DIR/: the VMID in the archive's name (default: from a "
                        "NNN.conf config file, else the VM's name)")
    p.add_argument("--drive", action="append", default=[], metavar="NODE[=DEVNAME]",
                   help="back up only this drive (node name, -drive id or -device id), "
                        "optionally under another device name; repeatable. Default: every "
                        "writable disk that is not a CD-ROM")
    add_configs(p)
    add_base(p)
    p.add_argument("--qga", metavar="SOCKET",
                   help="freeze the guest's filesystems through this QEMU guest agent socket "
                        "while the backup starts")
    p.add_argument("--stall-timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="abandon the backup when the archive output makes no progress for "
                        "this long (default 30)")
    p.add_argument("--max-workers", type=int_in(0, 1024), default=None, metavar="N",
                   help="QEMU copy workers per disk (x-perf, if QEMU has it; 0: QEMU's "
                        "default). Fewer workers keep guest write latency low (default 4; "
                        "32 for a disk of an incremental, whose copy is short and scattered)")
    add_compression(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run, exit_fast=True)


def _workers(given: int | None, default: int | None) -> int | None:
    """A job's x-perf max-workers: the default for its kind, or --max-workers for every job
    (0: QEMU's own default, None)."""
    if given is None:
        return default
    return given or None


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return value


def parse_drive(arg: str) -> tuple[str, str | None]:
    from vmafs.format import vma
    node, sep, name = arg.partition("=")
    if not node or (sep and not name):
        raise UsageError(f"--drive {arg!r}: expected NODE or NODE=DEVNAME")
    if sep:
        try:
            vma.check_device_name(name)  # a name the user chooses: Proxmox's kind
        except FormatError as exc:
            raise UsageError(f"--drive {arg!r}: {exc}") from None
    return node, (name if sep else None)


def run(args: argparse.Namespace) -> int:
    drives = [parse_drive(a) for a in args.drive]
    if args.full_if_needed and not args.incremental:
        raise UsageError("--full-if-needed goes with --incremental")
    import gc

    from vmafs.cli import importing
    try:
        with importing():
            prev = None
            if args.incremental:  # read while the rest is imported (prev.py)
                from vmafs.backup.prev import PrevReader
                prev = PrevReader(args.incremental, args.base)
            import trio

            from vmafs.archive import naming
            from vmafs.archive.configs import read_configs
            from vmafs.backup.live import Backup, BackupOptions, run_backup
            from vmafs.format.names import display
            from vmafs.progress import print_json
        configs = read_configs(args.config)
        opts = BackupOptions(
            qmp_socket=args.qmp, output=args.output, drives=drives,
            configs=configs.files, qga_socket=args.qga,
            zstd=True if args.zstd else None, level=args.level, threads=args.threads,
            frame_size=frame_bytes(args),
            stall_timeout=args.stall_timeout,
            max_workers=_workers(args.max_workers, BackupOptions.max_workers),
            incremental_workers=_workers(args.max_workers, BackupOptions.incremental_workers),
            progress=False if args.quiet else None, handle_signals=True,
            incremental=args.incremental, bitmap=not args.no_bitmap,
            full_if_needed=args.full_if_needed,
            speed=args.bwlimit * 1024 if args.bwlimit else None,
            drop_old_bitmaps=args.drop_old_bitmaps,
            vmid=naming.check_vmid(args.vmid) if args.vmid else configs.vmid,
            inherit=not args.config and not args.vmid, bases=args.base,
        )
        if args.protected and args.output == "-":
            raise UsageError("--protected marks an archive file; stdout has none")
        job = Backup(opts, prev)
        log = None
        try:
            result = trio.run(run_backup, job)
            if naming.is_directory_output(args.output):
                log = _write_log(job, result)
            if args.protected and result.archive != "-":
                from vmafs.archive.protection import protect
                protect(result.archive)
            for note in result.notes:
                print(f"vmafs backup: {note}", file=sys.stderr)
            if result.archive != args.output and not args.json:  # -o DIR/: say which file
                print(f"vmafs backup: wrote {display(result.archive)}", file=sys.stderr)
        except VmafsError as exc:
            if job.signalled is not None:  # as every command ends on a signal: 128+N
                exc.exit_code = 128 + job.signalled
            if job.writer_stuck:
                # The writer thread is blocked in a write that will never return (a stalled
                # pipe or file system); exiting normally would wait for it forever.
                print(f"vmafs backup: error: {exc}", file=sys.stderr, flush=True)
                os._exit(exc.exit_code)
            raise
        if args.json:
            summary = result.summary()
            summary["archive_bytes"] = job.writer.bytes_out if job.writer else None
            summary["log"] = log
            print_json(summary, sys.stderr if args.output == "-" else sys.stdout)
        return 0
    finally:
        gc.unfreeze()  # what the imports made (importing()): collected again in a process
        # that goes on (the tests)


def _write_log(job: Backup, result: BackupResult) -> str | None:
    """vzdump's NAME.log beside the archive (a failure to write it is a note, not an error)."""
    from vmafs.archive import naming
    from vmafs.backup import backup_log
    parsed = naming.parse_vzdump_name(os.path.basename(result.archive))
    path = backup_log.log_path(result.archive)
    try:
        text = backup_log.render(result.archive, parsed[0] if parsed else "?", job.ctime,
                                 time.time(), result.disks,
                                 str(result.parent) if result.parent else None, result.notes,
                                 os.path.getsize(result.archive))
        backup_log.write_log(path, text)
    except (VmafsError, OSError) as exc:
        result.notes.append(f"no log written: {exc}")
        return None
    return path
