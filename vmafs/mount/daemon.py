"""The mount: checking the mount point, mounting the serving session with FUSE, unmounting.

The process shell (daemonizing once mounted, logging, the trio loop, signals) is the one every
front end shares (vmafs/serve/daemon.py); the parent returns only when the outcome is known:
exit 0 once the file system is mounted (the child then serves it in the background), or the
one-line reason it could not be mounted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmafs.format.names import display, json_name
from vmafs.mount.options import (
    FSNAME,
    MountError,
    MountOptions,
    find_mount,
    parse_options,
    resolve,
)

log = logging.getLogger("vmafs.mount")

READ_AHEAD_KB = 1024        # 1 MiB FUSE read requests instead of 128 KiB: about 2x throughput


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Best effort, needs root: larger kernel read-ahead means larger FUSE read requests."""
    m = find_mount(mountpoint)
    if m is None or os.geteuid() != 0:
        return
    path = f"/sys/class/bdi/{m.device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)


# -- mounting and serving -----------------------------------------------------------------------

@dataclass
class MountRequest:
    """What `mount` was asked to do."""

    archive: str
    mountpoint: str
    options: Sequence[str] = ()
    foreground: bool = False
    log_file: str | None = None
    debug: bool = False
    bases: Sequence[str] = ()
    json: bool = False  # print what is mounted (--json) once the mount is ready


def _check_mountpoint(mountpoint: str, nonempty: bool) -> None:
    existing = find_mount(mountpoint)
    if existing is not None and existing.fstype == f"fuse.{FSNAME}":
        try:
            os.stat(mountpoint)
        except OSError:
            raise MountError(f"{mountpoint}: its vmafs daemon is gone; clear it with "
                             f"`fusermount3 -u {mountpoint}`") from None
        raise MountError(f"{mountpoint}: a vmafs archive is already mounted there")
    if not os.path.lexists(mountpoint):
        raise MountError(f"{display(mountpoint)}: mount point does not exist")
    if not os.path.isdir(mountpoint):
        raise MountError(f"{display(mountpoint)}: mount point is not a directory")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                has_files = next(entries, None) is not None
        except OSError as exc:
            raise MountError(f"{display(mountpoint)}: {exc.strerror}") from None
        if has_files:
            raise MountError(f"{display(mountpoint)}: mount point is not empty (its files "
                             "would be hidden; -o nonempty mounts anyway)")


def _init_fuse(session: Any, req: MountRequest, opts: MountOptions) -> Any:
    """Mount (synchronously): from here on the kernel queues requests for us."""
    import pyfuse3

    from vmafs.mount.fs import VmaFS

    ops = VmaFS(session, uid=opts.uid, gid=opts.gid, direct_io=opts.direct_io)
    fuse_opts = set(opts.fuse)
    if req.debug:
        fuse_opts.add("debug")
    try:
        pyfuse3.init(ops, req.mountpoint, fuse_opts)
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {req.mountpoint}: {exc} "
                         f"(options: {','.join(sorted(opts.fuse))})") from None
    log.info("mounted %s on %s (%s)", req.archive, req.mountpoint, session.mode())
    for note in session.notes():
        log.warning("%s", note)
    return ops


async def _serve(req: MountRequest, opts: MountOptions, task_status: Any) -> None:
    """Open the session, mount it, say so once the kernel's INIT is answered, serve until
    unmounted (from outside, or cancelled by a signal); never leave a mount behind."""
    import pyfuse3
    import trio

    from vmafs.archive.serving import open_session
    from vmafs.mount.fuse_wait import fuse_fds, lean_wait
    from vmafs.serve.daemon import Ready

    # Served through the page cache, the data is cached there: drop the archive's copy.
    async with open_session(req.archive, req.bases,
                            drop_behind=not opts.direct_io) as session:
        fds_before = fuse_fds()
        ops = _init_fuse(session, req, opts)
        try:
            initialized = trio.Event()
            ops.on_init = initialized.set
            async with trio.open_nursery() as nursery:
                async def fuse_main() -> None:
                    # A plain archive's reads never wait (the session reads them inline): one
                    # worker task answers them in order, waiting for each request the lean
                    # way (fuse_wait.py). More would only hand the FUSE fd's read lock from
                    # task to task on every request.
                    if session.inline:
                        with lean_wait(pyfuse3, fds_before):
                            await pyfuse3.main(max_tasks=1)
                    else:
                        await pyfuse3.main(max_tasks=99)
                    nursery.cancel_scope.cancel()       # unmounted from outside

                nursery.start_soon(fuse_main)
                await initialized.wait()
                # Once the INIT reply is through: the kernel clamps read-ahead to what INIT
                # offered.
                await trio.sleep(0)
                set_read_ahead(req.mountpoint)
                task_status.started(Ready(_mounted(req, ops, os.getpid()), session.notes()))
        finally:
            # Lazily unmounts if still mounted (signal, crash); a no-op after an external
            # unmount.
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", req.mountpoint)


def mount(req: MountRequest) -> int:
    """`vmafs mount`: returns (in the parent) 0 once mounted, or raises MountError."""
    from vmafs.serve import daemon
    from vmafs.store import absolute, display_location

    req.archive = absolute(req.archive)  # an s3:// or https:// location stays as it is
    req.bases = [absolute(b) for b in req.bases]  # the daemon works from /
    req.mountpoint = os.path.realpath(req.mountpoint)
    opts = parse_options(req.options, display_location(req.archive))  # no URL query shown
    _check_mountpoint(req.mountpoint, opts.nonempty)

    async def main(task_status: Any) -> None:
        await _serve(req, opts, task_status)

    return daemon.run(daemon.Shell("vmafs mount", foreground=req.foreground,
                                   log_file=req.log_file, debug=req.debug, json=req.json),
                      main)


def _mounted(req: MountRequest, ops: Any, pid: int) -> dict[str, Any]:
    """What --json says once the mount is ready: the files it shows."""
    disks = [e for e in ops.entries if e.dev_id]
    devices = {d.dev_id: d for d in ops.archive.devices}
    return {"ok": True, "archive": req.archive, "mountpoint": req.mountpoint, "pid": pid,
            "devices": [{**json_name(devices[e.dev_id].name), "device_bytes": e.size,
                         **json_name(e.name, "file")} for e in disks],
            "configs": [{**json_name(e.name, "file"), "size": e.size}
                        for e in ops.entries if not e.dev_id]}


# -- unmounting -----------------------------------------------------------------------------------

def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = 10.0) -> None:
    """`vmafs umount`: unmount a vmafs mount; busy mounts fail unless lazy."""
    path = resolve(mountpoint)
    m = find_mount(path)
    if m is None:
        raise MountError(f"{mountpoint}: not mounted")
    if m.fstype != f"fuse.{FSNAME}":
        raise MountError(f"{mountpoint}: not a vmafs mount (it is {m.fstype})")
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", path]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        detail = (result.stderr.strip().splitlines() or ["failed"])[-1]
        if "busy" in detail.lower():
            raise MountError(f"{mountpoint}: busy (a file in it is open); close it, "
                             f"or use --lazy to detach now and unmount when it is closed")
        raise MountError(f"{mountpoint}: cannot unmount: {detail}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = find_mount(path)
        if now is None or now.device != m.device:
            return
        time.sleep(0.02)
    raise MountError(f"{mountpoint}: still mounted after {timeout:.0f} s")
