"""`vmafs extract`: sparse disk images and config files, renamed into place only when the
whole archive has been read and every check (checksums included) has passed."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO

from vmafs.archive.chain import open_chain
from vmafs.archive.configs import vm_configs
from vmafs.archive.copier import WriteBehind, copy_device, write_extent
from vmafs.archive.locate import footer_block_sums
from vmafs.archive.problems import MISSING
from vmafs.archive.reader import Archive
from vmafs.archive.scan import StoredCluster, read_header, scan_stream
from vmafs.archive.walk import Extent, read_by_offset
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_base, add_json, add_quiet, progress_for
from vmafs.container.output import (
    WRITEBACK_STEP,
    TempFile,
    is_locked,
    open_dir,
    open_existing,
    start_writeback,
)
from vmafs.container.streams import open_stream
from vmafs.errors import FormatError, VmafsError, about
from vmafs.format import chain, vma
from vmafs.format.names import display, file_names, json_name, raw
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help=COMMANDS["extract"],
                       description="Extract every disk as a sparse raw image "
                                   "disk-<devname>.raw of the exact device size, plus the config "
                                   "files, into DIR (created if missing). Files appear under "
                                   "their final names only after the whole archive was checked. "
                                   "An incremental archive is extracted with its ancestors: "
                                   "the disks as of its point in time.")
    add_archive_input(p)
    p.add_argument("dir", help="target directory")
    p.add_argument("-d", "--drive", action="append", metavar="DEVNAME", default=[],
                   help="extract only this device (repeatable); configs are always written")
    p.add_argument("--force", action="store_true", help="replace files that already exist")
    add_base(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stream(args.archive) as stream:  # one pass: stdin cannot be opened twice
        try:
            header = read_header(stream)
        except FormatError as exc:
            raise about(args.archive, exc) from None
        if not chain.is_incremental(header.configs):
            return _run(args, header, stream)
    if args.archive == "-":
        raise VmafsError("an incremental archive is extracted with its chain: give its file")
    with open_chain(args.archive, args.base) as archive:
        return _run(args, header, archive)


def _run(args: argparse.Namespace, header: vma.Header, source: BinaryIO | Archive) -> int:
    by_name = {raw(d.name) for d in header.devices}
    unknown = [n for n in args.drive if os.fsencode(n) not in by_name]
    if unknown:
        raise VmafsError(f"no device '{display(unknown[0])}' in the archive (it has: "
                         f"{', '.join(sorted(display(d.name) for d in header.devices)) or 'none'})")
    chosen = {os.fsencode(n) for n in args.drive}
    wanted = [d for d in header.devices if not args.drive or raw(d.name) in chosen]
    # the names of every item, whatever -d picks, so they are the names the mount shows
    vm_files = vm_configs(header.configs)  # the chain record is vmafs's, not the VM's
    names = file_names(header.devices, [name for name, _ in vm_files],
                       vmstate=header.vmstate is not None)
    targets = {d.dev_id: names.disks[d.dev_id] for d in wanted}
    sizes = {d.dev_id: d.size for d in wanted}
    extracted = [d.name for d in wanted]
    if header.vmstate is not None and not args.drive and names.vmstate is not None:
        targets[header.vmstate.dev_id] = names.vmstate
        sizes[header.vmstate.dev_id] = header.vmstate.size
        extracted.append(header.vmstate.name)
    configs = list(zip(names.configs, vm_files, strict=True))  # (file, (name, data))
    with made_dir(args.dir) as dir_fd:
        for fname in [*targets.values(), *(f for f, _ in configs)]:
            check_target(dir_fd, os.path.join(args.dir, os.fsdecode(fname)), fname, args.force)
        label = getattr(args, "label", "extract")  # restore writes raw images through here
        progress = progress_for(args, label, sum(d.size for d in wanted))
        temps: list[TempFile] = []
        try:
            fds: dict[int, int] = {}
            for dev_id, fname in targets.items():
                tmp = temp_file(dir_fd, args.dir, fname)
                temps.append(tmp)
                fds[dev_id] = tmp.fd
                os.ftruncate(tmp.fd, sizes[dev_id])

            written = 0

            def kick(total: int) -> None:
                nonlocal written
                if total // WRITEBACK_STEP != written // WRITEBACK_STEP:
                    for fd in fds.values():  # overlap the disk writes with reading
                        start_writeback(fd)
                written = total

            def on_extent(slots: list[StoredCluster]) -> None:
                kick(written + write_extent(fds, slots, sizes))

            gc.freeze()  # what is made by now lives to the end: collections skip it (the
            # botocore client's objects made each one cost ~3 % of extract's CPU)
            try:
                if isinstance(source, Archive):
                    indexed = True
                    for dev_id, fd in fds.items():
                        copy_device(source, dev_id, fd, progress.update)
                elif read_by_offset(source):  # the walk reads the file itself: writes in line
                    indexed = _scan(source, header, on_extent, progress.update, extracted,
                                    footer_block_sums(args.archive, header))
                else:  # a decoder or a remote stream: written behind, while the next is read
                    behind = WriteBehind(fds, sizes, kick=kick)
                    try:
                        indexed = _scan(behind.fenced(source), header,
                                        None, progress.update, extracted,
                                        footer_block_sums(args.archive, header),
                                        on_data=behind.put_extent)
                        behind.finish()
                    finally:
                        behind.close()
            except FormatError as exc:
                raise about(args.archive, exc) from None
            finally:
                gc.unfreeze()  # (a process that goes on, the tests, collects them again)
            commit_all(dir_fd, args.dir, configs, temps, args.force)
        finally:
            for tmp in temps:
                tmp.discard()  # a no-op for those committed
    progress.finish()
    if args.json:
        print_json({"ok": True, "archive": args.archive, "output": args.dir,
                    "device_bytes": sum(d.size for d in wanted),
                    "seconds": round(progress.elapsed, 3),
                    "devices": [{**json_name(d.name), "device_bytes": d.size,
                                 **json_name(targets[d.dev_id], "file")} for d in wanted],
                    "configs": [{**json_name(name), "size": len(data),
                                 **json_name(fname, "file")}
                                for fname, (name, data) in configs],
                    "indexed": indexed})
    return 0


def _scan(stream: BinaryIO, header: vma.Header,
          on_extent: Callable[[list[StoredCluster]], None] | None,
          progress: Callable[[int], None], extracted: list[str],
          block_sums: bool | None,
          on_data: Callable[[Extent, memoryview], None] | None = None) -> bool:
    """Every rule checked as the stream's extents are written; whether it has an index.
    `block_sums`: what the footer, read first, says (a .vma.zst's data is then hashed the one
    way its index checks, not both ways: 0.1 s of CPU a GiB)."""
    result = scan_stream(stream, on_extent, progress, header=header, block_sums=block_sums,
                         on_data=on_data)
    problems = [p for p in result.problems if _concerns(p, extracted)]
    if problems:
        raise FormatError(str(problems[0]))
    return result.has_index


@contextlib.contextmanager
def made_dir(path: str) -> Iterator[int]:
    """The target directory's fd, the directory created (with its parents) if missing; what
    was created is removed again when the extract fails and it is still empty."""
    created: list[str] = []
    missing = os.path.abspath(path)
    while not os.path.lexists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    try:
        for directory in reversed(created):
            os.mkdir(directory)
        with open_dir(path) as dir_fd:
            yield dir_fd
    except BaseException:
        for directory in created:  # the deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def check_target(dir_fd: int, path: str, name: bytes, force: bool) -> None:
    """Before any work: an existing file is an error without --force; a directory always,
    and so is a file a process holds a lock on (a VM running on the image: replaced, its
    writes from then on would go to a file no name reaches, and be lost)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise VmafsError(f"{display(path)} exists and is a directory")
    if not force:
        raise VmafsError(f"{display(path)} exists (use --force to replace it)")
    if stat.S_ISREG(st.st_mode):
        fd = open_existing(dir_fd, name)
        if fd is None:
            return
        try:
            if is_locked(fd):
                raise VmafsError(f"{display(path)} is in use (a process holds a lock on it, "
                                 "such as a VM running on it); not replaced")
        finally:
            os.close(fd)


def commit_all(dir_fd: int, dir_path: str, configs: list[tuple[bytes, tuple[str, bytes]]],
               temps: list[TempFile], force: bool) -> None:
    """Write the config files beside the disks' temporaries, then commit them all under their
    final names (the last step of extract and restore, once every check passed)."""
    for fname, (_, data) in configs:
        tmp = temp_file(dir_fd, dir_path, fname)
        temps.append(tmp)
        write_all(tmp.fd, data)
    for tmp in temps:
        tmp.commit(replace=force)


def temp_file(dir_fd: int, dir_path: str, name: bytes) -> TempFile:
    return TempFile(dir_fd, name, label=display(os.path.join(dir_path, os.fsdecode(name))))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _concerns(problem: object, extracted: list[str]) -> bool:
    """Missing clusters of devices not extracted do not matter (like `vma extract -d`).

    Problems are structured (archive.problems.Problem: kind, device) or, from older scans,
    text; both are understood.
    """
    kind = getattr(problem, "kind", None)
    if kind is not None:
        device = getattr(problem, "device", None)
        return kind != MISSING or device is None or device in extracted
    text = str(problem)
    if "missing cluster" not in text:
        return True
    return any(text.endswith(f"stream {name}") or f"stream {name} (" in text
               for name in extracted)
