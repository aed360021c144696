"""`vmafs restore`: a VM back as ready-to-boot disk images (sparse raw, or qcow2) plus its
config files, or a disk straight onto a block device.

Raw images are what `vmafs extract` writes, so restore runs extract for them (one engine, one
set of checks, the same names). Block devices and qcow2 images are written by the copy engine
(archive/copier.py) from the archive model: stored data only, holes zeroed on a device; a
qcow2 image is laid out from the index (restore/qcow2.py: its metadata, then the stored
clusters in disk order), so nothing but the data is written. Every file appears under its
final name only when all of them were written; nothing existing is replaced without --force.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from vmafs.archive.chain import open_chain
from vmafs.archive.configs import vm_configs
from vmafs.archive.copier import copy_device
from vmafs.archive.reader import Archive, Device
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_base, add_json, add_quiet, int_in, progress_for
from vmafs.cli.extract import check_target, commit_all, made_dir, temp_file
from vmafs.container.output import TempFile, lock_whole
from vmafs.errors import UsageError, VmafsError
from vmafs.format.names import FileNames, display, file_names, json_name, raw
from vmafs.progress import Progress, print_json
from vmafs.restore import RECONNECT_DELAY, SOCKET_NAME, qcow2

PROBE = 1 << 20  # bytes at each end of a device that must be zero unless --force: what
# lies past the first 4 KiB counts too (btrfs's superblock at 64 KiB with zeros before it,
# bcache's at 4 KiB, a ZFS label's blank first 8 KiB; md 0.90/1.0 superblocks, ZFS's last
# labels and a GPT's backup at the end)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help=COMMANDS["restore"],
        description="Restore the VM in ARCHIVE: every disk (or those chosen with -d) as a "
                    "ready-to-boot image in DIR, disk-<devname>.qcow2 (sparse qcow2, the "
                    "default) or disk-<devname>.raw (sparse raw), plus the config files; "
                    "with --to-device, a disk is written straight onto a block device or "
                    "LVM volume instead (what the archive has as holes is discarded or "
                    "zeroed there, as qemu-img convert does). An incremental archive is "
                    "restored with its ancestors, as of its point in time. Files appear "
                    "under their final names only when everything was written; nothing "
                    "that exists is replaced without --force.")
    p.add_argument("archive", metavar="ARCHIVE",
                   help="the .vma or seekable .vma.zst archive (a vzdump .vma.gz or .vma.lzo "
                        "needs vmafs convert first)")
    p.add_argument("--to", metavar="DIR", help="directory for the images and config files "
                                               "(created if missing)")
    p.add_argument("--format", choices=["qcow2", "raw"], default="qcow2",
                   help="image format in DIR (default qcow2)")
    p.add_argument("-d", "--drive", action="append", metavar="DEVNAME", default=[],
                   help="restore only this disk (repeatable); configs are always written")
    p.add_argument("--to-device", action="append", metavar="DEVNAME=DEVICE", default=[],
                   help="write disk DEVNAME onto the block device DEVICE (repeatable); it "
                        "must be at least as large as the disk and not in use")
    p.add_argument("--force", action="store_true",
                   help="replace files that exist in DIR, and write onto a device whose "
                        "first or last MiB is not zero (it holds something)")
    live = p.add_argument_group(
        "live restore", "--live: the VM runs on qcow2 targets in DIR, backed by the archive's "
        "NBD export, while QEMU streams every cluster into them (block-stream); vmafs exits "
        "0 when the targets no longer need the archive")
    live.add_argument("--live", action="store_true",
                      help="restore live: create the targets, serve the archive, print the "
                           "QEMU -drive arguments, then stream through QEMU's QMP socket")
    live.add_argument("--qmp", metavar="SOCK",
                      help="QMP socket of the QEMU that runs on the targets (waited for; a "
                           "VM started with -S is continued once the streams run)")
    live.add_argument("--resume", action="store_true",
                      help="continue an interrupted live restore in DIR: serve the export "
                           "again at the same socket and finish the streams; no guest write "
                           "is lost")
    live.add_argument("--socket", metavar="PATH",
                      help=f"unix socket of the export (default DIR/{SOCKET_NAME})")
    live.add_argument("--speed", type=_rate, default=0, metavar="RATE",
                      help="limit each stream to RATE bytes/s (K, M, G suffixes); the "
                           "default is as fast as QEMU goes")
    live.add_argument("--reconnect-delay", type=int_in(0, 86400), default=RECONNECT_DELAY,
                      metavar="SECONDS",
                      help="how long QEMU holds reads of the archive while vmafs is away "
                           f"(interrupted, before --resume; default {RECONNECT_DELAY})")
    add_base(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def _rate(text: str) -> int:
    """RATE for --speed: bytes per second, with an optional K/M/G (binary) suffix."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    num, unit = text[:-1], text[-1:].upper()
    if unit not in units or unit == "":
        num, unit = text, ""
    if not num.isdigit() or not 0 < int(num) * units[unit] < 1 << 63:  # QEMU's int64
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (like 50M)")
    return int(num) * units[unit]


@dataclass
class _Target:
    """Where one disk is restored to, and how much of it is written so far."""

    device: Device
    fd: int
    path: str                    # what the user sees: the file in DIR or the device
    temp: TempFile | None = None  # an image in DIR
    on_device: bool = False
    copied: int = 0


def run(args: argparse.Namespace) -> int:
    if args.live or args.resume or args.qmp:
        return _run_live(args)
    if args.socket or args.speed:
        raise UsageError("--socket and --speed belong to --live")
    if not args.to and not args.to_device:
        raise UsageError("give --to DIR, --to-device DEVNAME=DEVICE, or both")
    to_device: dict[bytes, str] = {}
    for item in args.to_device:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--to-device {item!r}: give DEVNAME=DEVICE")
        to_device[os.fsencode(name)] = path
    if args.format == "raw" and not to_device:
        # sparse raw images and configs are what extract writes: its engine, its checks
        from vmafs.cli import extract
        return extract.run(argparse.Namespace(
            archive=args.archive, dir=args.to, drive=args.drive, force=args.force,
            base=args.base, json=args.json, quiet=args.quiet, label="restore"))
    with open_chain(args.archive, args.base) as archive:
        return _restore(args, archive, to_device)


def _run_live(args: argparse.Namespace) -> int:
    """--live (and --resume): the engine is vmafs/restore/live.py."""
    import sys

    from vmafs.cli import Signalled
    from vmafs.restore import live

    if not (args.live and args.to and args.qmp):
        raise UsageError("a live restore needs --live, --to DIR and --qmp SOCK")
    if args.to_device or args.format != "qcow2" or args.force:
        raise UsageError("--live writes qcow2 targets in DIR and replaces nothing: "
                         "--to-device, --format raw and --force do not go with it")
    out = sys.stderr if args.json else sys.stdout

    def announce(line: str) -> None:
        print(f"vmafs restore: {line}", file=out, flush=True)

    opts = live.Options(
        archive=args.archive, to=args.to, qmp=os.path.abspath(args.qmp),
        bases=[os.path.abspath(b) for b in args.base], drives=args.drive,
        resume=args.resume, socket=args.socket, speed=args.speed,
        reconnect_delay=args.reconnect_delay, announce=announce)
    result = live.run(opts, lambda total: progress_for(args, "live restore", total))
    if result.signum is not None:
        print(f"vmafs restore: stopped; QEMU holds its reads of the archive for "
              f"{args.reconnect_delay} s: run vmafs restore --live --resume with the same "
              "ARCHIVE, --to and --qmp to continue", file=sys.stderr)
        raise Signalled(result.signum)
    if args.json:
        print_json(live.summary(opts, result))
    else:
        print(f"vmafs restore: done: the targets in {display(args.to)} no longer need "
              "the archive", file=out)
    return 0


@dataclass
class _VM:
    """What a restore writes: the disks (by dev_id), the VM's config files, their names
    (the names extract and the mount give)."""

    devices: list[Device]
    configs: list[tuple[str, bytes]]
    names: FileNames

    @classmethod
    def of(cls, archive: Archive) -> _VM:
        devices = sorted(archive.devices, key=lambda d: d.dev_id)
        configs = vm_configs(archive.configs)
        return cls(devices, configs, file_names(devices, [n for n, _ in configs]))


def _restore(args: argparse.Namespace, archive: Archive, to_device: dict[bytes, str]) -> int:
    vm = _VM.of(archive)
    devices = {raw(d.name): d for d in vm.devices}
    for name in [*map(os.fsencode, args.drive), *to_device]:
        if name not in devices:
            raise VmafsError(f"no device '{display(os.fsdecode(name))}' in the archive (it has: "
                             f"{', '.join(sorted(display(d.name) for d in vm.devices))})")
    chosen = {os.fsencode(n) for n in args.drive}
    if args.to:
        wanted = [d for d in vm.devices if not chosen or raw(d.name) in chosen]
    else:
        wanted = [d for d in vm.devices if raw(d.name) in to_device]
    suffix = b".qcow2" if args.format == "qcow2" else b".raw"
    files = {d.dev_id: vm.names.disks[d.dev_id].removesuffix(b".raw") + suffix
             for d in wanted if raw(d.name) not in to_device}
    targets: list[_Target] = []
    progress = progress_for(args, "restore", sum(d.size for d in wanted))
    with contextlib.ExitStack() as stack:
        for dev in wanted:          # devices first: every check before any work
            if raw(dev.name) in to_device:
                fd = _open_device(to_device[raw(dev.name)], dev, args.force)
                stack.callback(os.close, fd)
                targets.append(_Target(dev, fd, to_device[raw(dev.name)], on_device=True))
        configs: list[tuple[bytes, tuple[str, bytes]]] = []
        if args.to:
            dir_fd = stack.enter_context(made_dir(args.to))
            configs = list(zip(vm.names.configs, vm.configs, strict=True))
            for fname in [*files.values(), *(f for f, _ in configs)]:
                check_target(dir_fd, os.path.join(args.to, os.fsdecode(fname)), fname,
                             args.force)
        temps: list[TempFile] = []
        try:
            for dev in wanted:
                if dev.dev_id in files:
                    tmp = temp_file(dir_fd, args.to, files[dev.dev_id])
                    temps.append(tmp)
                    path = os.path.join(args.to, os.fsdecode(files[dev.dev_id]))
                    targets.append(_Target(dev, tmp.fd, path, temp=tmp))
            for t in targets:
                if t.on_device or args.format == "raw":
                    if not t.on_device:
                        os.ftruncate(t.fd, t.device.size)
                    t.copied = copy_device(archive, t.device.dev_id, t.fd, progress.update,
                                           dense=t.on_device)
                else:
                    t.copied = _write_qcow2(archive, t.device, t.fd, progress)
                os.fsync(t.fd)
            if args.to:  # files in a directory (--to-device alone writes none)
                commit_all(dir_fd, args.to, configs, temps, args.force)
        finally:
            for tmp in temps:
                tmp.discard()
    progress.finish()
    if args.json:
        print_json(_summary(args, targets, configs, progress))
    return 0


def _summary(args: argparse.Namespace, targets: list[_Target],
             configs: list[tuple[bytes, tuple[str, bytes]]], progress: Progress
             ) -> dict[str, Any]:
    devices = []
    for t in sorted(targets, key=lambda t: t.device.dev_id):
        where = {"target": t.path} if t.on_device else {**json_name(
            os.fsencode(os.path.basename(t.path)), "file"), "format": args.format}
        devices.append({**json_name(t.device.name), "device_bytes": t.device.size, **where,
                        "copied_bytes": t.copied})
    return {"ok": True, "archive": args.archive, "output": args.to,
            "device_bytes": sum(t.device.size for t in targets),
            "copied_bytes": sum(t.copied for t in targets),
            "seconds": round(progress.elapsed, 3), "devices": devices,
            "configs": [{**json_name(name), "size": len(data), **json_name(fname, "file")}
                        for fname, (name, data) in configs]}


def _open_device(path: str, dev: Device, force: bool) -> int:
    """The block device to restore a disk onto, opened exclusively (not mounted, not in use
    by the kernel), large enough, and empty at both ends unless --force."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise VmafsError(f"{display(path)}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise VmafsError(f"{display(path)} is not a block device (--to DIR writes image "
                         "files)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise VmafsError(f"{display(path)}: {exc.strerror}"
                         + (" (mounted or in use)" if exc.errno == errno.EBUSY else "")) from None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):  # the path was replaced since the stat
            raise VmafsError(f"{display(path)} is not a block device")
        _lock_device(fd, path)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < dev.size:
            raise VmafsError(f"{display(path)} has {size} bytes, disk {display(dev.name)} "
                             f"needs {dev.size}")
        if not force and _holds_data(fd, size):
            raise VmafsError(f"{display(path)} holds data (its first or last MiB is not "
                             "zero); use --force to write over it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_device(fd: int, path: str) -> None:
    """Refuse a device a process holds a lock on, and lock all of it for the restore. O_EXCL
    refuses a mounted device, not one a running VM uses: QEMU opens its disks without it,
    and marks them with byte-range locks instead."""
    if not lock_whole(fd):
        raise VmafsError(f"{display(path)} is in use (a process holds a lock on it, such as "
                         "a VM running on it)")


def _holds_data(fd: int, size: int) -> bool:
    """Whether the first or last PROBE bytes of the device are not all zero."""
    for at in sorted({0, max(0, size - PROBE)}):
        if os.pread(fd, min(PROBE, size - at), at).strip(b"\0"):
            return True
    return False


def _write_qcow2(archive: Archive, device: Device, fd: int, progress: Progress) -> int:
    """The disk as a qcow2 image in fd (a fresh file): its metadata from the index, then the
    stored clusters by the copy engine. Returns the data bytes the archive stores for it."""
    clusters = archive.stored_clusters(device.dev_id, 0,
                                       max(0, device.size - 1) // qcow2.CLUSTER)
    lay = qcow2.layout(device.size, clusters)
    for offset, data in qcow2.metadata(lay):
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    os.ftruncate(fd, lay.file_size())
    copy_device(archive, device.dev_id, fd, progress.update, packed=clusters,
                packed_at=lay.data_at)
    return archive.stored_bytes(device.dev_id)
