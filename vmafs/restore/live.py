"""Live restore: the VM runs on qcow2 targets backed by the archive's NBD export while QEMU's
`block-stream` copies every cluster into them; when every stream completed the targets no
longer need the archive.

The export is served in-process (serve/nbd.py) at a fixed unix socket, and each target's
backing is a `json:` NBD spec with `reconnect-delay`: if vmafs dies, QEMU holds the reads of
the backing (the guest's and the stream's) until `--resume` serves the export again at the
same path, and QEMU's stream job simply goes on. The guest's own writes are in the targets,
so nothing is lost by an interruption. The archive is only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket as stdsocket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from vmafs.errors import UsageError, VmafsError, leaf
from vmafs.format.names import display, json_name
from vmafs.progress import Progress
from vmafs.restore import RECONNECT_DELAY, SOCKET_NAME
from vmafs.serve.nbd import SUN_PATH_MAX
from vmafs.signals import on_stop_signal

POLL = 0.5                        # seconds between progress polls
HOLE_CHUNK = 1 << 30              # per qemu-io write -z (below QEMU's request limit)
MAX_MARKS = 1 << 20               # qemu-io commands per target (the rest is streamed as zeros)
# Targets have 2 MiB clusters of 64 KiB subclusters (extended L2): a guest write still copies
# 64 KiB, and marking the holes of a 1 TiB sparse disk writes 16 MiB of metadata in ~2 s
# (64 KiB clusters: 128 MiB, ~45 s), after which QEMU's stream passes them in ~5 s.
TARGET_OPTIONS = "cluster_size=2M,extended_l2=on"
TARGET_SUBCLUSTER = 65536


@dataclass
class Options:
    """What `restore --live` was asked to do."""

    archive: str
    to: str
    qmp: str
    bases: list[str] = field(default_factory=list)
    drives: list[str] = field(default_factory=list)
    resume: bool = False
    socket: str | None = None
    speed: int = 0
    reconnect_delay: int = RECONNECT_DELAY
    announce: Callable[[str], None] = print


@dataclass
class Target:
    """One disk: its qcow2 file in DIR and, once attached, QEMU's node and stream job."""

    name: str           # device name (the export name)
    size: int
    file: bytes         # name in DIR
    path: str           # absolute path
    job: str            # our block-job id
    stored: int = 0     # bytes the archive stores for it (what the stream moves)
    done: bool = False  # no backing any more
    node: str | None = None
    offset: int = 0


@dataclass
class Result:
    """What a live restore did: its targets, the configs written, and how it ended."""

    targets: list[Target]
    configs: list[tuple[bytes, str, int]]
    resumed: bool
    seconds: float
    signum: int | None = None


# QEMU's rule for ids and node names (id_wellformed), and what a -drive option value may hold
# without a comma starting another option: a device is named so in the targets
QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


def backing_spec(sock: str, export: str, reconnect_delay: int) -> str:
    """The targets' backing: the export over NBD, reads held across a vmafs restart."""
    return "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "nbd", "server": {"type": "unix", "path": sock}, "export": export,
        "reconnect-delay": reconnect_delay}}, separators=(",", ":"))


def _backing_export(backing: str) -> tuple[str, str] | None:
    """(socket path, export) of a backing as backing_spec writes it; None for any other
    (a target's header is read back by --resume: malformed JSON is no traceback)."""
    if not backing.startswith("json:"):
        return None
    try:
        nbd = json.loads(backing[5:])["file"]
        path, export = nbd["server"]["path"], nbd["export"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return (path, export) if isinstance(path, str) and isinstance(export, str) else None


def qemu_args(targets: list[Target]) -> list[list[str]]:
    """The -drive arguments that run a VM on the targets (ids as Proxmox names them)."""
    return [["-drive", f"file={t.path.replace(',', ',,')},format=qcow2,if=none,"
             f"id={t.name},cache=writeback"] for t in targets]


def blockdev_args(targets: list[Target]) -> list[list[str]]:
    """The same as -blockdev nodes (node names as the -drive ids; QEMU opens each target's
    backing, the export, from its header)."""
    return [["-blockdev", json.dumps({
        "driver": "qcow2", "node-name": t.name,
        "file": {"driver": "file", "filename": t.path}}, separators=(",", ":"))]
        for t in targets]


def run(opts: Options, progress_of: Callable[[int], Progress]) -> Result:
    """The whole live restore (or its resumption); returns when every stream completed or
    a signal stopped it (Result.signum)."""
    async def main() -> Result:
        return await _LiveRestore(opts, progress_of).run()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:   # nurseries group errors: the user sees the one
        raise leaf(group) from None


class _LiveRestore:
    def __init__(self, opts: Options, progress_of: Callable[[int], Progress]) -> None:
        self.opts = opts
        self.progress_of = progress_of
        self.dir = os.path.abspath(opts.to)
        self.started = time.monotonic()
        self.signum: int | None = None

    async def run(self) -> Result:
        async with trio.open_nursery() as nursery:
            def stop(signum: int) -> None:
                self.signum = signum
                nursery.cancel_scope.cancel()
            await nursery.start(on_stop_signal, stop)
            result = await self._restore()
            nursery.cancel_scope.cancel()
        if self.signum is not None:
            return Result([], [], self.opts.resume, time.monotonic() - self.started,
                          self.signum)
        assert result is not None
        return result

    async def _restore(self) -> Result:
        from vmafs.archive.serving import open_session
        from vmafs.serve.nbd import serving

        opts = self.opts
        _check_qmp(opts.qmp)
        async with open_session(os.path.abspath(opts.archive), opts.bases) as session:
            targets = self._targets(session)
            dir_fd = self._dir_fd()
            try:
                if opts.resume:
                    sock = self._resume_state(targets)
                    configs: list[tuple[bytes, str, int]] = []
                else:
                    sock = self._socket_path()
                    self._check_new(dir_fd, targets, session)
            finally:
                os.close(dir_fd)
            if len(os.fsencode(sock)) > SUN_PATH_MAX:
                raise UsageError(f"socket path {display(sock)} is longer than "
                                 f"{SUN_PATH_MAX} bytes: give a shorter one with --socket")
            async with serving(session, socket=sock):
                if not opts.resume:
                    configs = await trio.to_thread.run_sync(
                        self._create, targets, session, sock)
                    args = " ".join(shlex.join(a) for a in qemu_args(targets))
                    opts.announce(f"start QEMU on the targets (add -qmp unix:{opts.qmp},"
                                  f"server=on,wait=off; -S to start it paused): {args}")
                    nodes = " ".join(f"{a} {shlex.quote(v)}" for a, v in blockdev_args(targets))
                    opts.announce(f"or, as -blockdev nodes: {nodes}")
                if not all(t.done for t in targets):
                    await self._stream(targets)
        return Result(targets, configs, opts.resume, time.monotonic() - self.started)

    # -- targets ---------------------------------------------------------------------------

    def _targets(self, session: Any) -> list[Target]:
        from vmafs.format.names import raw
        devices = session.devices
        wanted = {os.fsencode(d) for d in self.opts.drives}
        names = {raw(d.name) for d in devices}
        for w in wanted - names:
            raise VmafsError(f"no device '{display(os.fsdecode(w))}' in the archive (it has: "
                             f"{', '.join(sorted(display(d.name) for d in devices))})")
        out = []
        for i, d in enumerate(devices):
            if wanted and raw(d.name) not in wanted:
                continue
            if not QEMU_ID.fullmatch(d.name):
                raise VmafsError(f"device '{display(d.name)}' cannot be a QEMU drive id (a "
                                 "letter, then letters, digits, '-', '.', '_'), which a live "
                                 "restore names it by: restore it with vmafs restore")
            fname = session.names.disks[d.dev_id].removesuffix(b".raw") + b".qcow2"
            out.append(Target(d.name, d.size, fname,
                              os.path.join(self.dir, os.fsdecode(fname)),
                              f"vmafs-stream-{i}",
                              stored=session.archive.stored_bytes(d.dev_id)))
        return out

    def _dir_fd(self) -> int:
        if not self.opts.resume:
            with contextlib.suppress(FileExistsError):
                os.makedirs(self.dir)
        try:
            return os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (nothing to resume)" if self.opts.resume else ""
            raise VmafsError(f"{display(self.dir)}: {exc.strerror}{hint}") from None

    def _socket_path(self) -> str:
        return os.path.abspath(self.opts.socket or os.path.join(self.dir, SOCKET_NAME))

    def _check_new(self, dir_fd: int, targets: list[Target], session: Any) -> None:
        for fname in [*(t.file for t in targets), *session.names.configs]:
            if _lexists(dir_fd, fname):
                raise VmafsError(
                    f"{display(os.path.join(self.dir, os.fsdecode(fname)))} exists (a live "
                    "restore never replaces files; --resume continues one)")

    def _create(self, targets: list[Target], session: Any, sock: str
                ) -> list[tuple[bytes, str, int]]:
        """Each target made whole under a hidden temporary name (never through a symlink),
        a qcow2 overlay of its export with the holes marked, and only then given its name
        (never replacing a file); the config files likewise. A run killed half-way leaves a
        hidden .part, never a file under a target's name that --resume would take for a
        finished one. Undone when anything fails."""
        made: list[bytes] = []
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for t in targets:
                with _temp(dir_fd, t.file, self.dir) as tmp:
                    create_target(tmp.fd, t.size,
                                  backing_spec(sock, t.name, self.opts.reconnect_delay))
                    _mark_holes(tmp.fd, _holes(session, t))
                    keep = os.dup(tmp.fd)
                    try:
                        tmp.commit()
                        made.append(t.file)
                        os.fchmod(keep, 0o600)  # the guest's writes will be in it
                    finally:
                        os.close(keep)
            configs = []
            for fname, (name, data) in zip(session.names.configs, session.configs,
                                           strict=True):
                with _temp(dir_fd, fname, self.dir) as tmp:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(tmp.fd, view):]
                    tmp.commit()
                    made.append(fname)
                configs.append((fname, name, len(data)))
            return configs
        except BaseException:
            for fname in made:
                with contextlib.suppress(OSError):
                    os.unlink(fname, dir_fd=dir_fd)
            raise
        finally:
            os.close(dir_fd)

    def _resume_state(self, targets: list[Target]) -> str:
        """The socket the targets' backing names; which targets are complete already."""
        sock = None
        for t in targets:
            try:
                st = os.stat(t.path, follow_symlinks=False)
            except OSError as exc:
                raise VmafsError(f"{display(t.path)}: {exc.strerror} (nothing to resume)"
                                 ) from None
            if not stat.S_ISREG(st.st_mode):
                raise VmafsError(f"{display(t.path)} is not a regular file")
            info = json.loads(_qemu_img(["info", "-U", "--output=json", t.path]))
            if info.get("format") != "qcow2" or info.get("virtual-size") != t.size:
                # an empty or half-written file (a run killed while making it, before
                # targets were made whole under a temporary name) has no backing either
                raise VmafsError(f"{display(t.path)} is not a live restore target (a "
                                 f"{info.get('format')} image of {info.get('virtual-size')} "
                                 f"bytes, not a qcow2 of {t.size}): remove it and restore "
                                 "again")
            backing = info.get("full-backing-filename") or info.get("backing-filename")
            if not backing:
                t.done = True
                continue
            named = _backing_export(backing)
            if named is None:
                raise VmafsError(f"{display(t.path)} is not a live restore target (its "
                                 f"backing is {display(backing)})")
            path, export = named
            if export != t.name:
                raise VmafsError(f"{display(t.path)} is backed by export {export}, not "
                                 f"{t.name}")
            if sock is not None and path != sock:
                raise VmafsError("the targets name different export sockets")
            sock = path
        if self.opts.socket is not None and sock is not None \
                and os.path.abspath(self.opts.socket) != sock:
            raise UsageError(f"the targets are backed by {display(sock)}, not --socket "
                             f"{display(self.opts.socket)}")
        return sock or self._socket_path()

    # -- QEMU ------------------------------------------------------------------------------

    async def _stream(self, targets: list[Target]) -> None:
        from vmafs.backup.qmp import open_qmp
        await _wait_for_socket(self.opts.qmp, self.opts.announce)
        async with open_qmp(self.opts.qmp) as qmp:
            await self._find_nodes(qmp, targets)
            jobs = {j["device"]: j for j in await qmp.execute("query-block-jobs")}
            pending = [t for t in targets if not t.done]
            for t in pending:
                if t.job not in jobs:
                    args: dict[str, Any] = {"job-id": t.job, "device": t.node}
                    if self.opts.speed:
                        args["speed"] = self.opts.speed
                    await qmp.execute("block-stream", args)
            status = await qmp.execute("query-status")
            if status.get("status") == "prelaunch":
                await qmp.execute("cont")
            progress = self.progress_of(sum(t.size for t in pending))
            waiting = {t.job: t for t in pending}
            failed: list[str] = []
            async with trio.open_nursery() as nursery:
                async def poll() -> None:
                    while True:
                        for j in await qmp.execute("query-block-jobs"):
                            t = waiting.get(j["device"])
                            if t is not None and j["offset"] > t.offset:
                                progress.update(j["offset"] - t.offset)
                                t.offset = j["offset"]
                        await trio.sleep(POLL)
                nursery.start_soon(poll)
                async for event in qmp.events:
                    data = event.get("data", {})
                    job = waiting.get(data.get("device", ""))
                    if job is None:
                        continue
                    # One stream ending badly (a damaged cluster: EIO) must not take the
                    # export from the others: they still read it, and a job left reading
                    # a vanished export holds QEMU's monitor for the reconnect delay
                    # (stop, savevm wait on it). The others are served to their end first.
                    if event["event"] == "BLOCK_JOB_CANCELLED":
                        failed.append(f"the stream of {display(job.name)} was cancelled")
                    elif event["event"] == "BLOCK_JOB_COMPLETED" and "error" in data:
                        failed.append(f"the stream of {display(job.name)} failed: "
                                      f"{data['error']}")
                    elif event["event"] == "BLOCK_JOB_COMPLETED":
                        progress.update(job.size - job.offset)
                        job.offset, job.done = job.size, True
                    else:
                        continue
                    del waiting[job.job]
                    if not waiting:
                        break
                else:
                    raise VmafsError("QEMU exited before the stream completed: the targets "
                                     "still need the archive; start QEMU on them again and "
                                     "run vmafs restore --live --resume")
                nursery.cancel_scope.cancel()
            if failed:
                raise VmafsError("; ".join(failed) + "; vmafs restore --live --resume "
                                 "starts it again")
            progress.finish()
            await self._find_nodes(qmp, targets)   # the backing links are gone now
            for t in targets:
                if not t.done:
                    raise VmafsError(f"{display(t.path)} still has its backing file")

    async def _find_nodes(self, qmp: Any, targets: list[Target]) -> None:
        """QEMU's qcow2 node of each target (by inode); a target without backing is done."""
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        for t in targets:
            st = os.stat(t.path)
            for n in nodes:
                if n.get("drv") != "qcow2":
                    continue
                try:
                    other = os.stat(n["file"])
                except (OSError, KeyError, ValueError):
                    continue
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    t.node = n["node-name"]
                    t.done = t.done or not n.get("backing_file")
                    break
            else:
                if not t.done:
                    raise VmafsError(f"QEMU at {display(self.opts.qmp)} has no drive on "
                                     f"{display(t.path)}: start it with the -drive arguments "
                                     "vmafs printed")


@contextlib.contextmanager
def _temp(dir_fd: int, name: bytes, dir_path: str) -> Any:
    """A TempFile for `name` in the directory, removed unless committed."""
    from vmafs.container.output import TempFile

    tmp = TempFile(dir_fd, name, label=display(os.path.join(dir_path, os.fsdecode(name))))
    try:
        yield tmp
    finally:
        tmp.discard()


def create_target(fd: int, size: int, backing: str) -> None:
    """A qcow2 target in the empty file fd, its backing named from the start (-u: not opened
    now), so a target that exists always needs the archive until its stream ends: --resume
    takes one without backing for finished."""
    _qemu_img(["create", "-q", "-u", "-f", "qcow2", "-o", TARGET_OPTIONS, "-F", "raw",
               "-b", backing, f"/proc/self/fd/{fd}", str(size)], fd)


def _holes(session: Any, t: Target) -> list[tuple[int, int]]:
    """The archive's holes in the disk, whole target subclusters, at most MAX_MARKS pieces."""
    dev_id = next(d.dev_id for d in session.devices if d.name == t.name)
    holes: list[tuple[int, int]] = []
    pos = 0
    while pos < t.size:
        runs = session.allocation(dev_id, pos, t.size - pos)
        if not runs:
            break
        for length, is_hole in runs:
            lo = -(-pos // TARGET_SUBCLUSTER) * TARGET_SUBCLUSTER
            hi = (pos + length) // TARGET_SUBCLUSTER * TARGET_SUBCLUSTER
            if is_hole and hi > lo:
                for start in range(lo, hi, HOLE_CHUNK):
                    holes.append((start, min(HOLE_CHUNK, hi - start)))
            pos += length
            if len(holes) >= MAX_MARKS:
                return holes[:MAX_MARKS]
    return holes


def _mark_holes(fd: int, holes: list[tuple[int, int]]) -> None:
    """Mark the archive's holes as zero clusters in the new target (metadata only): QEMU's
    stream then skips them instead of reading zeros over NBD and writing them. Same content:
    a hole reads as zeros either way. Done before QEMU opens the target, so no guest write
    can be overwritten. The commands go on qemu-io's stdin: there may be many. No flushes
    (cache unsafe): the caller syncs the file once."""
    if not holes:
        return
    script = "".join(f"write -z {off} {n}\n" for off, n in holes)
    # the backing left closed ("backing": null): qemu-io need not reach the export (1 TiB of
    # holes: 0.14 s instead of 1.7 s), and zero clusters are written all the same
    image = "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {
        "driver": "file", "filename": f"/proc/self/fd/{fd}"}})
    try:
        proc = subprocess.run(["qemu-io", "-t", "unsafe", image], input=script,
                              pass_fds=(fd,), capture_output=True, text=True)
    except FileNotFoundError:
        return          # an optimisation only: without qemu-io the stream copies zeros
    if proc.returncode or "error" in proc.stderr.lower() or "error" in proc.stdout.lower():
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["failed"]
        raise VmafsError(f"qemu-io write -z failed: {lines[-1]}")


def _check_qmp(path: str) -> None:
    """A QMP socket QEMU can never listen at is a usage error now, not a wait without end
    for it (after the targets were made)."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise UsageError(f"--qmp {display(path)}: a unix socket path is at most "
                         f"{SUN_PATH_MAX} bytes")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--qmp {display(path)}: no directory {display(parent)}")


async def _wait_for_socket(path: str, announce: Callable[[str], None]) -> None:
    """Until something listens at the QMP socket (QEMU may be started after us)."""
    told = False
    while True:
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            if not told:
                announce(f"waiting for QEMU's QMP socket {display(path)}")
                told = True
        finally:
            probe.close()
        await trio.sleep(0.1)


def _lexists(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _qemu_img(argv: list[str], fd: int | None = None) -> str:
    try:
        proc = subprocess.run(["qemu-img", *argv], pass_fds=(fd,) if fd is not None else (),
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise VmafsError("qemu-img is needed for a live restore") from None
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise VmafsError(f"qemu-img {argv[0]} failed: {lines[-1]}")
    return proc.stdout


def summary(opts: Options, result: Result) -> dict[str, Any]:
    """--json: the vocabulary of vmafs(1)."""
    return {"ok": True, "archive": opts.archive, "output": opts.to, "live": True,
            "resumed": result.resumed,
            "device_bytes": sum(t.size for t in result.targets),
            "copied_bytes": sum(t.stored for t in result.targets),
            "seconds": round(result.seconds, 3),
            "devices": [{**json_name(t.name), "device_bytes": t.size,
                         **json_name(t.file, "file"), "format": "qcow2",
                         "copied_bytes": t.stored} for t in result.targets],
            "configs": [{**json_name(name), "size": size, **json_name(fname, "file")}
                        for fname, name, size in result.configs]}
