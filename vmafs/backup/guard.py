"""The guard: a small process every live backup starts in a session of its own, which outlives
a killed vmafs (SIGKILL, OOM) and gives the VM back what the run held, within seconds.

Why a process: QEMU 7.2's `blockdev-backup` has no `on-cbw-error` for its copy-before-write
filter, so a sink that vanishes fails the guest writes waiting on a copy (EIO), and nothing in
QEMU ends the job, its filter, the NBD nodes or the new dirty bitmap when the QMP client dies.
So vmafs adds its NBD nodes with `reconnect-delay`: when the sink's connection breaks, QEMU's
NBD client keeps the requests in flight and retries them on a new connection.  The guard holds
a copy of every listening NBD socket (never accepting while vmafs lives) and a pipe to vmafs.
When the pipe ends without vmafs's "done", the guard accepts QEMU's reconnections with a sink
that acknowledges and drops everything (the archive is void anyway), so no guest write fails;
then it takes the QMP monitor (QEMU serves the next client once the dead one's connection is
closed), force-cancels the run's jobs, deletes its nodes and removes its uncommitted bitmap,
and removes the run's lock file (runlock.py).  If the guard cannot finish (killed too, QEMU's
monitor busy), the lock file stays and the next vmafs backup cleans up instead: it serves the
dead run's NBD sockets again the same way first (rescue_and_clean), so a backup started within
`reconnect-delay` still saves the guest writes waiting on a copy, and QEMU's monitor does not
freeze while a node waits out its reconnect delay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from vmafs.errors import VmafsError

if TYPE_CHECKING:
    import argparse
    import subprocess

    import trio

    from vmafs.backup import runlock
    from vmafs.backup.runlock import RunRecord

# The guard process sleeps on its pipe for the whole backup, on the same two cores: it imports
# trio and the rest only once it has to take over (the functions below import what they use).

RECONNECT_DELAY = 15
"""Seconds QEMU's NBD client keeps requests waiting for a sink to come back (the guard's)."""


class Execute(Protocol):
    async def __call__(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                       timeout: float | None = 120.0) -> Any: ...


# --- cleaning up after a dead run (used by the guard and by every backup's preflight) ---------


def dead_bitmaps(record: RunRecord | None) -> list[str]:
    """The bitmaps a dead run leaves that must go: its own when its archive was not committed
    (they count from a point in time no archive has), else PREV's (which it replaced)."""
    if record is None:
        return []
    if record.committed or _archive_is(record.output, record.uuid):
        return [record.parent_bitmap] if record.parent_bitmap else []
    return [record.bitmap] if record.bitmap else []


def _archive_is(path: str | None, uuid: str | None) -> bool:
    """Whether the archive `path` exists and is the one with `uuid` (the run committed it)."""
    if not path or not uuid:
        return False
    from vmafs.archive.chain import peek
    try:
        return str(peek(path).uuid) == uuid
    except (VmafsError, OSError):
        return False


async def clean_run(execute: Execute, tags: set[str], bitmaps: Sequence[str]) -> list[str]:
    """Force-cancel the jobs and delete the nodes of the runs `tags`, and remove the named
    bitmaps from every node holding one; what was done, one phrase each."""
    import trio

    from vmafs.backup import runlock
    done: list[str] = []
    jobs = [j["device"] for j in await execute("query-block-jobs")
            if runlock.tag_of(j.get("device", "")) in tags]
    for job in jobs:
        with contextlib.suppress(VmafsError):
            await execute("block-job-cancel", {"device": job, "force": True}, timeout=10)
        done.append(f"cancelled job {job}")
    with trio.move_on_after(30):
        while any(runlock.tag_of(j.get("device", "")) in tags
                  for j in await execute("query-block-jobs")):
            await trio.sleep(0.1)
    nodes = await execute("query-named-block-nodes", {"flat": True})
    for node in nodes:
        name = node.get("node-name", "")
        if runlock.tag_of(name) not in tags or node.get("drv") == "copy-before-write":
            continue
        for _ in range(20):
            try:
                await execute("blockdev-del", {"node-name": name}, timeout=15)
            except VmafsError as exc:
                if "Failed to find node" in str(exc):
                    break
                await trio.sleep(0.25)   # still in use by a job that is ending
                continue
            done.append(f"deleted node {name}")
            break
    wanted = set(bitmaps)
    for node in nodes:
        for bitmap in node.get("dirty-bitmaps") or []:
            if bitmap.get("name") in wanted:
                with contextlib.suppress(VmafsError):
                    await execute("block-dirty-bitmap-remove",
                                  {"node": node["node-name"], "name": bitmap["name"]},
                                  timeout=10)
                    done.append(f"removed bitmap {bitmap['name']}")
    return done


async def thaw_guest(path: str, *, attempts: int = 3) -> bool:
    """Thaw the file systems a dead run froze through the guest agent at path (thaw is
    idempotent; the dead run's connection is closed, so the agent serves this one); True
    when the agent thawed them, False when it could not be reached."""
    import trio

    from vmafs.backup.qmp import GuestAgent
    for _ in range(attempts):
        try:
            with trio.fail_after(30):
                async with GuestAgent.open(path) as agent:
                    await agent.execute("guest-fsfreeze-thaw", timeout=20)
            _log(f"thawed the guest through {path}")
            return True
        except (VmafsError, OSError, trio.TooSlowError) as exc:
            _log(f"thaw through {path}: {exc}")
            await trio.sleep(0.5)
    return False


async def rescue_and_clean(execute: Execute, tags: set[str], bitmaps: Sequence[str],
                           exports: Sequence[tuple[str, int]]) -> list[str]:
    """clean_run() for runs whose guard died too: first serve their NBD sockets again with a
    sink that drops everything and let QEMU reconnect to it, so that cancelling the jobs fails
    no guest write still waiting (and deleting the nodes does not wait out reconnect-delay
    with QEMU's monitor frozen)."""
    import trio

    from vmafs.backup.nbd_server import open_listener, serve_nbd
    error: BaseException | None = None
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        for path, size in exports:
            if not os.path.isdir(os.path.dirname(path)):
                continue
            try:
                listener = await open_listener(path)
            except OSError:
                continue
            nursery.start_soon(partial(serve_nbd, path, size, _Discard(), listener=listener))
        # errors leave here, not through the nursery (which would group them)
        try:
            if exports:
                await reconnect(execute, tags)
            done = await clean_run(execute, tags, bitmaps)
        except (VmafsError, trio.TooSlowError) as exc:
            error = exc
        nursery.cancel_scope.cancel()
    for directory in {os.path.dirname(p) for p, _ in exports}:
        shutil.rmtree(directory, ignore_errors=True)
    if error is not None:
        raise error
    return done


# --- a minimal trio QMP client (the guard imports nothing asyncio) ----------------------------


class QmpLine:
    """QMP over a unix socket, one JSON object a line; events are skipped."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, path: str, timeout: float) -> QmpLine:
        import trio

        stream = await trio.open_unix_socket(path)
        qmp = cls(stream)
        try:
            with trio.fail_after(timeout):
                greeting = await qmp._read()
                if "QMP" not in greeting:
                    raise VmafsError(f"unexpected QMP greeting from {path}")
                await qmp.execute("qmp_capabilities")
        except BaseException:
            await stream.aclose()
            raise
        return qmp

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float | None = 120.0) -> Any:
        import trio

        from vmafs.backup.qmp import QmpError
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = dict(arguments)
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            await self._stream.send_all(json.dumps(msg).encode() + b"\n")
            while True:
                reply = await self._read()
                if reply.get("id") != ident:
                    continue
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError(command, err.get("class", ""), err.get("desc", ""))
                return reply.get("return")

    async def _read(self) -> dict[str, Any]:
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[:idx + 1]
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        return obj
                continue
            data = await self._stream.receive_some(65536)
            if not data:
                raise VmafsError("QEMU closed the QMP connection")
            self._buf += data

    async def aclose(self) -> None:
        await self._stream.aclose()


# --- the guard process ------------------------------------------------------------------------


class _Discard:
    """The sink after vmafs died: every write acknowledged and dropped."""

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        return

    async def write_zeroes(self, offset: int, length: int) -> None:
        return

    async def flush(self) -> None:
        return


class Guard:
    """vmafs's side: start the guard, tell it when the run cleaned up after itself."""

    def __init__(self, qmp: str, lock: runlock.RunLock, sockdir: str,
                 exports: Sequence[tuple[int, int]]) -> None:
        import subprocess

        read, self._write = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # -S: no site-packages (and their .pth files) at start, ~40 ms less of the guard's
        # interpreter start on the backup's two cores; they are added if it takes over. -c,
        # not -m: no runpy (guard_start.py)
        args = [sys.executable, "-S", "-c",
                "from vmafs.backup.guard_start import main; main()", "--qmp", qmp,
                "--pipe", str(read),
                "--lock", str(lock.fd), "--lock-path", lock.path, "--sockdir", sockdir]
        for fd, size in exports:
            args += ["--export", f"{fd}:{size}"]
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args, pass_fds=(read, lock.fd, *(fd for fd, _ in exports)),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        finally:
            os.close(read)

    def done(self, clean: bool) -> None:
        """The run ends. clean: it left nothing behind (the guard just exits); else the guard
        takes over once this process has let go of QEMU's monitor."""
        if self._write < 0:
            return
        with contextlib.suppress(OSError):
            if clean:
                os.write(self._write, b"d")
        os.close(self._write)
        self._write = -1


async def _take_over(qmp_path: str, lock_fd: int) -> bool:
    """Clean up after the dead run; True when done, or when QEMU is gone and the run's
    bitmap with it (one a qcow2 image may have stored at a clean exit keeps the lock file,
    so that the next backup of the VM removes it)."""
    import trio

    from vmafs.backup import runlock
    record = runlock.read_record(lock_fd)
    if record is None:
        return False
    # first the guest's file systems, if the run died with them frozen; if the agent does
    # not answer, the lock file stays and the next backup of the VM tries again
    thawed = record.qga is None or await thaw_guest(record.qga)
    with trio.move_on_after(120):
        while True:
            try:
                qmp = await QmpLine.connect(qmp_path, timeout=10)
            except (FileNotFoundError, ConnectionRefusedError):
                return not dead_bitmaps(record)  # QEMU is gone, and every node and job
            except (OSError, VmafsError, trio.TooSlowError):
                await trio.sleep(0.5)  # the monitor is busy with another client
                continue
            try:
                record = runlock.read_record(lock_fd) or record  # committed since?
                _log("QMP connected")
                await reconnect(qmp.execute, {record.tag})
                _log("reconnected")
                done = await clean_run(qmp.execute, {record.tag}, dead_bitmaps(record))
                _log(f"cleaned: {done}")
                return thawed
            except (OSError, VmafsError, trio.TooSlowError, trio.BrokenResourceError):
                await trio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await qmp.aclose()
    return False


async def reconnect(execute: Execute, tags: set[str]) -> None:
    """Make QEMU's NBD client of every node of the run reconnect, to the guard, before the
    jobs are cancelled: cancelling a backup job cancels what its target has in flight, and a
    client still waiting to reconnect then fails its requests, with them the guest writes
    waiting on a copy. A flush through the node finds a dead connection and waits for the new
    one (HMP qemu-io: QMP has no I/O command); once it returns, the client is the guard's."""
    import trio

    from vmafs.backup import runlock
    for node in await execute("query-named-block-nodes", {"flat": True}):
        name = node.get("node-name", "")
        if node.get("drv") == "nbd" and runlock.tag_of(name) in tags:
            with contextlib.suppress(VmafsError, trio.TooSlowError):
                out = await execute("human-monitor-command",
                                    {"command-line": f'qemu-io {name} "flush"'},
                                    timeout=RECONNECT_DELAY + 10)
                _log(f"flush {name}: {out!r}")


def _log(text: str) -> None:
    """What the guard does, when VMAFS_GUARD_LOG names a file (it has no terminal)."""
    if os.environ.get("VMAFS_GUARD_LOG"):
        print(f"{time.time():.3f} guard {os.getpid()}: {text}", file=sys.stderr, flush=True)


async def _guard(args: argparse.Namespace) -> None:
    """vmafs died: serve its NBD sockets with a sink that drops everything, and clean up."""
    import socket as stdsocket

    import trio
    _log("vmafs died: taking over")
    cleaned = False
    async with trio.open_nursery() as nursery:
        from vmafs.backup.nbd_server import serve_nbd
        for spec in args.export:
            fd, size = (int(x) for x in spec.split(":"))
            listener = trio.socket.fromfd(fd, stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            os.close(fd)
            path = listener.getsockname()
            nursery.start_soon(partial(serve_nbd, path, size, _Discard(), listener=listener))
        cleaned = await _take_over(args.qmp, args.lock)
        _log(f"took over: {cleaned}")
        nursery.cancel_scope.cancel()
    if cleaned:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.lock_path)
        shutil.rmtree(args.sockdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """vmafs died (guard_start.py saw its pipe end without a word): take over."""
    import argparse
    parser = argparse.ArgumentParser(prog="vmafs-guard")
    parser.add_argument("--qmp", required=True)
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--lock", type=int, required=True)
    parser.add_argument("--lock-path", required=True)
    parser.add_argument("--sockdir", required=True)
    parser.add_argument("--export", action="append", default=[])
    args = parser.parse_args(argv)
    import trio
    trio.run(_guard, args)


if __name__ == "__main__":  # the guard's entry is guard_start.py (what Guard starts)
    from vmafs.backup.guard_start import main as start
    start()
