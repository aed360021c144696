"""The mount daemon: daemonizing once the mount is ready, logging, the trio loop, signals.

The parent process returns only when the outcome is known: exit 0 once the file system is mounted
(the child then serves it in the background), or the one-line reason it could not be mounted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmafs.errors import VmafsError
from vmafs.format.names import display, json_name
from vmafs.mount.options import (
    FSNAME,
    MountError,
    MountOptions,
    find_mount,
    parse_options,
    resolve,
)
from vmafs.progress import print_json

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


# -- logging ------------------------------------------------------------------------------------

def _setup_logging(foreground: bool, log_file: str | None, debug: bool) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s vmafs[%(process)d] %(levelname)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vmafs mount: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vmafs[%(process)d]: %(message)s"))
    elif os.access("/dev/kmsg", os.W_OK):
        # No syslog (containers): the kernel log still shows what a daemon refused to read.
        handler = logging.StreamHandler(open("/dev/kmsg", "w", buffering=1))  # noqa: SIM115
        handler.setFormatter(logging.Formatter("vmafs[%(process)d]: %(message)s"))
        handler.setLevel(logging.WARNING)
    else:
        handler = logging.NullHandler()
    root = logging.getLogger("vmafs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


# -- mounting and serving -----------------------------------------------------------------------

@dataclass
class MountRequest:
    archive: str
    mountpoint: str
    options: Sequence[str] = ()
    foreground: bool = False
    log_file: str | None = None
    debug: bool = False
    bases: Sequence[str] = ()
    json: bool = False  # print what is mounted (--json) once the mount is ready


def _open_archive(path: str, opts: MountOptions, bases: Sequence[str]) -> Any:
    from vmafs.archive.chain import open_chain
    try:
        # Served through the page cache, the data is cached there: drop the archive's copy.
        return open_chain(path, bases, drop_behind=not opts.direct_io)
    except OSError as exc:
        raise MountError(f"{path}: {exc.strerror or exc}") from None


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


def _init_fuse(archive: Any, req: MountRequest, opts: MountOptions) -> Any:
    """Mount (synchronously): from here on the kernel queues requests for us."""
    import pyfuse3

    from vmafs.mount.fs import VmaFS

    ops = VmaFS(archive, uid=opts.uid, gid=opts.gid, direct_io=opts.direct_io)
    fuse_opts = set(opts.fuse)
    if req.debug:
        fuse_opts.add("debug")
    try:
        pyfuse3.init(ops, req.mountpoint, fuse_opts)
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {req.mountpoint}: {exc} "
                         f"(options: {','.join(sorted(opts.fuse))})") from None
    log.info("mounted %s on %s (%s)", req.archive, req.mountpoint,
             "indexed: every read is checked against its checksum" if archive.indexed
             else "walked: it has no index, so no data checksums")
    for note in _notes(archive):
        log.warning("%s", note)
    return ops


def _notes(archive: Any) -> list[str]:
    """What a user should know about how the archive is served."""
    if len(archive.layers) > 1:
        return [f"a chain of {len(archive.layers)} archives: each read comes from the newest "
                "that holds the cluster"]
    if archive.indexed:
        return []
    return ["this archive has no vmafs index: reads are not checked against data checksums "
            "(vmafs convert writes an archive that has them)"]


async def _serve(ops: Any, mountpoint: str, on_ready: Callable[[], None] | None) -> None:
    import pyfuse3
    import trio

    initialized = trio.Event()
    ops.on_init = initialized.set

    async def on_signal(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("%s: unmounting", signal.Signals(signum).name)
                scope.cancel()
                return

    async def when_ready() -> None:
        await initialized.wait()
        # Once the INIT reply is through: the kernel clamps read-ahead to what INIT offered.
        await trio.sleep(0)
        set_read_ahead(mountpoint)
        if on_ready is not None:
            on_ready()

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        nursery.start_soon(on_signal, nursery.cancel_scope)
        nursery.start_soon(when_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()       # unmounted from outside: stop the other tasks


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Decompressing threads each get a glibc malloc arena by default, and freed 1 MiB buffers
    linger in them; two arenas keep the daemon's RSS near its caches' size."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, arenas)       # M_ARENA_MAX


def _run_loop(ops: Any, mountpoint: str, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until unmounted or signalled; always leave no mount behind."""
    import pyfuse3
    import trio

    _limit_malloc_arenas()
    code = 0
    try:
        trio.run(_serve, ops, mountpoint, on_ready)
    except BaseException:
        log.exception("mount daemon failed")
        code = 1
    finally:
        # Lazily unmounts if still mounted (signal, crash); a no-op after an external unmount.
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)
    return code


def mount(req: MountRequest) -> int:
    """`vmafs mount`: returns (in the parent) 0 once mounted, or raises MountError."""
    req.archive = os.path.abspath(req.archive)
    req.log_file = os.path.abspath(req.log_file) if req.log_file else None
    req.mountpoint = os.path.realpath(req.mountpoint)
    opts = parse_options(req.options, req.archive)
    _check_mountpoint(req.mountpoint, opts.nonempty)
    if req.foreground:
        _setup_logging(True, req.log_file, req.debug)
        archive = _open_archive(req.archive, opts, req.bases)
        try:
            ops = _init_fuse(archive, req, opts)
            ready = (lambda: print_json(_mounted(req, ops, os.getpid()))) if req.json else None
            return _run_loop(ops, req.mountpoint, ready)
        finally:
            archive.close()
    return _daemonize(req, opts)


def _daemonize(req: MountRequest, opts: MountOptions) -> int:
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            status = pipe.read()
        if status.startswith(b"OK"):
            lines = status.decode(errors="replace").splitlines()
            for line in lines[2:]:
                print(f"vmafs mount: note: {line}", file=sys.stderr)
            if req.json:
                print_json({**json.loads(lines[1]), "pid": pid})
            return 0
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        message = status.decode(errors="replace").strip()
        raise MountError(message or "the mount daemon died before the mount was ready")

    # The daemon: its own session, no terminal, stdio to /dev/null (or the log file).
    os.close(rfd)
    code = 1
    try:
        os.setsid()
        _setup_logging(False, req.log_file, req.debug)
        _detach_stdio(req.log_file)
        archive = _open_archive(req.archive, opts, req.bases)
        ops = _init_fuse(archive, req, opts)
        os.chdir("/")

        def ready() -> None:
            nonlocal wfd
            with contextlib.suppress(OSError):      # the parent may be gone: serve anyway
                mounted = json.dumps(_mounted(req, ops, os.getpid()))
                os.write(wfd, "\n".join(["OK", mounted, *_notes(archive)]).encode())
            os.close(wfd)
            wfd = -1

        code = _run_loop(ops, req.mountpoint, ready)
    except VmafsError as exc:
        _report(wfd, str(exc))
    except BaseException as exc:
        log.exception("mount failed")
        _report(wfd, f"internal error: {exc!r}")
    finally:
        logging.shutdown()
        os._exit(code)


def _mounted(req: MountRequest, ops: Any, pid: int) -> dict[str, Any]:
    """What --json says once the mount is ready: the files it shows."""
    disks = [e for e in ops.entries if e.dev_id]
    devices = {d.dev_id: d for d in ops.archive.devices}
    return {"ok": True, "archive": req.archive, "mountpoint": req.mountpoint, "pid": pid,
            "devices": [{**json_name(devices[e.dev_id].name), "device_bytes": e.size,
                         **json_name(e.name, "file")} for e in disks],
            "configs": [{**json_name(e.name, "file"), "size": e.size}
                        for e in ops.entries if not e.dev_id]}


def _report(wfd: int, message: str) -> None:
    if wfd >= 0:
        with contextlib.suppress(OSError):
            os.write(wfd, message.splitlines()[0].encode() if message else b"")


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log_file else null
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


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
