"""`vmafs extract`: sparse disk images and config files, renamed into place only when the
whole archive has been read and every check (checksums included) has passed."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import BinaryIO

from vmafs.archive.scan import StoredCluster, read_header, scan_stream
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_json, add_quiet, progress_for
from vmafs.container.output import WRITEBACK_STEP, current_umask, start_writeback
from vmafs.container.streams import open_stream
from vmafs.errors import FormatError, VmafsError
from vmafs.format import vma
from vmafs.format.names import disk_file_name, safe_name
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help=COMMANDS["extract"],
                       description="Extract every disk as a sparse raw image "
                                   "disk-<devname>.raw of the exact device size, plus the config "
                                   "files, into DIR (created if missing). Files appear under "
                                   "their final names only after the whole archive was checked.")
    add_archive_input(p)
    p.add_argument("dir", help="target directory")
    p.add_argument("-d", "--drive", action="append", metavar="DEVNAME", default=[],
                   help="extract only this device (repeatable); configs are always written")
    p.add_argument("--force", action="store_true", help="replace files that already exist")
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stream(args.archive) as stream:  # one pass: stdin cannot be opened twice
        return _run(args, stream)


def _run(args: argparse.Namespace, stream: BinaryIO) -> int:
    try:
        header = read_header(stream)
    except FormatError as exc:
        raise VmafsError(f"{args.archive}: {exc}") from None
    names = {d.name for d in header.devices}
    unknown = [n for n in args.drive if n not in names]
    if unknown:
        raise VmafsError(f"no device {unknown[0]!r} in the archive (it has: "
                         f"{', '.join(sorted(names)) or 'none'})")
    wanted = [d for d in header.devices if not args.drive or d.name in args.drive]
    targets = {d.dev_id: disk_file_name(d.name) for d in wanted}
    if header.vmstate is not None and not args.drive:
        targets[header.vmstate.dev_id] = "vmstate.bin"
    configs = {safe_name(name): data for name, data in header.configs}
    finals = list(targets.values()) + list(configs)
    if len(set(finals)) != len(finals):
        raise VmafsError("two items of the archive map to the same file name")
    os.makedirs(args.dir, exist_ok=True)
    for name in finals:
        if os.path.lexists(os.path.join(args.dir, name)) and not args.force:
            raise VmafsError(f"{os.path.join(args.dir, name)} exists (use --force to replace it)")
    sizes = {d.dev_id: d.size for d in header.devices}
    if header.vmstate is not None:
        sizes[header.vmstate.dev_id] = header.vmstate.size
    fds: dict[int, int] = {}
    parts = [os.path.join(args.dir, name + ".part") for name in finals]
    progress = progress_for(args, "extract", sum(d.size for d in wanted))
    try:
        for dev_id, name in targets.items():
            fd = os.open(os.path.join(args.dir, name + ".part"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fds[dev_id] = fd
            os.ftruncate(fd, sizes[dev_id])

        written = 0

        def on_extent(slots: list[StoredCluster]) -> None:
            nonlocal written
            before = written // WRITEBACK_STEP
            written += write_extent(fds, slots, sizes)
            if written // WRITEBACK_STEP != before:  # overlap the disk writes with the reading
                for fd in fds.values():
                    start_writeback(fd)

        try:
            result = scan_stream(stream, on_extent, progress.update, header=header)
        except FormatError as exc:
            raise VmafsError(f"{args.archive}: {exc}") from None
        problems = [p for p in result.problems if _concerns(p, wanted)]
        if problems:
            raise VmafsError(f"{args.archive}: {problems[0]}")
        for name, data in configs.items():
            with open(os.path.join(args.dir, name + ".part"), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        for fd in fds.values():
            os.fsync(fd)
        for name in finals:
            os.chmod(os.path.join(args.dir, name + ".part"), 0o644 & ~current_umask())
            os.replace(os.path.join(args.dir, name + ".part"), os.path.join(args.dir, name))
    finally:
        for fd in fds.values():
            os.close(fd)
        for part in parts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
    progress.finish()
    if args.json:
        print_json({"archive": args.archive, "dir": args.dir,
                    "devices": [{"name": d.name, "size": d.size,
                                 "file": targets[d.dev_id]} for d in wanted],
                    "configs": list(configs), "indexed": result.has_index})
    return 0


def write_extent(fds: dict[int, int], slots: list[StoredCluster], sizes: dict[int, int]) -> int:
    """Write an extent's stored data, runs of whole adjacent clusters in one pwritev; returns
    the bytes written."""
    written = sum(len(s.data) for s in slots if s.dev_id in fds)
    run: list[memoryview] = []
    run_fd, run_start, run_end = -1, 0, 0
    for slot in slots:
        fd = fds.get(slot.dev_id)
        if fd is None or not slot.mask:
            continue
        start = slot.cluster * vma.CLUSTER_SIZE
        if slot.mask != vma.FULL_MASK:
            write_cluster(fd, slot, sizes[slot.dev_id])
            continue
        data = slot.data[:sizes[slot.dev_id] - start]
        if run and (fd != run_fd or start != run_end):
            os.pwritev(run_fd, run, run_start)
            run = []
        if not run:
            run_fd, run_start = fd, start
        run.append(data)
        run_end = start + len(data)
    if run:
        os.pwritev(run_fd, run, run_start)
    return written


def write_cluster(fd: int, slot: StoredCluster, size: int) -> None:
    """Write the stored blocks of one cluster; clear blocks stay holes in the sparse file."""
    base = slot.cluster * vma.CLUSTER_SIZE
    pos = 0
    j = 0
    while j < vma.BLOCKS_PER_CLUSTER:
        if not slot.mask >> j & 1:
            j += 1
            continue
        run = j
        while run < vma.BLOCKS_PER_CLUSTER and slot.mask >> run & 1:
            run += 1
        n = (run - j) * vma.BLOCK_SIZE
        start = base + j * vma.BLOCK_SIZE
        os.pwrite(fd, slot.data[pos:pos + min(n, size - start)], start)
        pos += n
        j = run


def _concerns(problem: str, wanted: list[vma.Device]) -> bool:
    """Missing clusters of devices not extracted do not matter (like `vma extract -d`)."""
    if "missing cluster" not in problem:
        return True
    return any(problem.endswith(f"stream {d.name}") or f"stream {d.name} (" in problem
               for d in wanted)

