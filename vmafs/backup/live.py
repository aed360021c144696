"""Live backup of a running QEMU VM into one archive, copy-before-write, over QMP.

Data flows one way: QEMU's backup jobs -> one NBD export per disk (a thread per connection)
-> a queue bounded in bytes -> ONE writer thread -> ArchiveWriter -> the output.  The NBD
handlers only enqueue and return, so QEMU's copy-before-write requests (which hold up guest
writes) are acknowledged at once; the queue bound is the back-pressure.  The trio loop runs
QMP, the watchdog and the signals: no request of QEMU's passes through it.

What keeps the VM safe whatever happens:

* one QMP `transaction` that starts every disk's `blockdev-backup` (sync=full, or for an
  incremental sync=bitmap from PREV's bitmap) and adds this archive's dirty bitmaps: one
  point in time for all disks and for the bitmaps; any job's failure cancels them all;
* PREV's bitmaps are removed only once the new archive is committed, this archive's own
  when it fails (bitmaps.py): an interrupted incremental loses no change;
* a watchdog: if the writer thread makes no progress for `stall_timeout` seconds, the
  sink stops storing and acknowledges everything (the backup is void anyway), so QEMU never
  waits on us at a drain, which would freeze its monitor;
* on any failure (signal, writer error, QEMU error, watchdog) the sink switches to
  discard mode *before* the jobs are cancelled, so guest writes that trigger a copy never
  see an error; then the jobs are cancelled, the NBD nodes deleted and the guest thawed, all
  in shielded cleanup with time limits; if QEMU does not let go, the NBD connections are
  dropped (the last resort, which may fail guest writes in flight);
* when vmafs itself is killed (SIGKILL, OOM), its guard process (guard.py) takes over: QEMU's
  NBD client (added with `reconnect-delay`) reconnects to the guard, which acknowledges every
  copy, cancels the jobs, deletes the nodes and removes the run's bitmap; and every backup
  first cleans up what a dead run left (runlock.py tells a dead run from a live one);
* the archive is committed (renamed to its final name) only when every job reported
  BLOCK_JOB_COMPLETED without error and the writer finished.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from vmafs.archive import naming
from vmafs.backup import bitmaps, blockgraph, runlock, switching
from vmafs.backup.blockgraph import Disk
from vmafs.backup.guard import (
    RECONNECT_DELAY,
    Guard,
    dead_bitmaps,
    rescue_and_clean,
    thaw_guest,
)
from vmafs.backup.nbd_server import NBDStats, open_listener, serve_nbd_threads
from vmafs.backup.pipe import FINISH, DiskSink, Pipe
from vmafs.backup.prev import PrevReader
from vmafs.backup.qmp import (
    GuestAgent,
    QemuGone,
    Qmp,
    QmpBusy,
    QmpError,
    open_qmp,
    process_started,
    query_types,
)
from vmafs.backup.writer_thread import WriterThread, describe_writer_error
from vmafs.container.output import check_output_name, is_remote
from vmafs.errors import VmafsError
from vmafs.format import chain
from vmafs.format.names import display
from vmafs.progress import Progress
from vmafs.signals import on_stop_signal
from vmafs.store import absolute

MiB = 1 << 20


class BackupError(VmafsError):
    """The backup failed; the VM was left as it was and no archive was written."""


@dataclass(frozen=True)
class BackupOptions:
    """What a backup is asked to do (the command's options).

    Every dataclass of a live backup has a docstring: without one, dataclass() builds it
    from inspect.signature() at import (~0.3 ms a class, at every start)."""

    qmp_socket: str
    output: str                                       # .vma, .vma.zst, "-" or DIR/
    drives: Sequence[tuple[str, str | None]] = ()     # (NODE, DEVNAME or None); () = all
    configs: Sequence[tuple[str, bytes]] = ()
    qga_socket: str | None = None
    zstd: bool | None = None                          # None: from the name
    level: int | None = None                          # zstd level; None: the container's default
    threads: int = 2
    frame_size: int | None = None                     # seekable zstd frame; None: default
    queue_bytes: int = 64 * MiB                       # sink -> writer buffer (back-pressure)
    stall_timeout: float = 30.0                       # watchdog: writer without progress
    max_workers: int | None = 4                       # x-perf max-workers when QEMU has it
    # x-perf max-workers of a job that copies only PREV's dirty clusters (an incremental's
    # disk): scattered clusters, one request each, in a short job; 16 workers instead of 4
    # copied 2 % of a 4 GiB disk in 0.51 s instead of 0.69 s inside vmafs (median of 6
    # interleaved rounds, load 7-9); QEMU alone (to a null target) 62 ms instead of 94.
    # 32 instead of 16 (--max-workers, same tree, alternated, 10 rounds each, load 2-3): the
    # incremental's wall time 0.473 vs 0.514 s and 0.504 vs 0.541 s (faster in 7 of 10), at
    # load 10-14 once faster in 8 of 8, once slower (noise); 64 no better than 32. The disk's
    # own 1311 random 64 KiB O_DIRECT reads: 111 ms at 16 in flight, 89 ms at 32
    incremental_workers: int | None = 32
    # x-perf max-chunk: a guest write's copy-before-write waits behind the copies in flight;
    # QEMU's default 1 MiB chunks made the guest's p99 write latency 0.56-0.96x worse than
    # 512 KiB, at the same throughput (tools/bench_guest_latency.py)
    max_chunk: int = 512 << 10
    freeze_timeout: float = 60.0
    cleanup_timeout: float = 30.0
    progress: bool | None = None                      # None: when stderr is a terminal
    handle_signals: bool = False                      # SIGINT/SIGTERM end the backup cleanly
    incremental: str | None = None                    # PREV: copy only what changed since
    bitmap: bool = True                               # start this archive's dirty bitmaps
    full_if_needed: bool = False                      # PREV unusable: a full backup instead
    vmid: str | None = None                           # DIR/ output: vzdump-qemu-VMID-...
    speed: int | None = None                          # bytes/s per disk QEMU may read
    drop_old_bitmaps: bool = False                    # committed: remove other vmafs- bitmaps
    inherit: bool = False      # an incremental takes PREV's VMID and config files
    bases: Sequence[str] = ()  # where PREV's ancestors may be, besides their children's dirs


@dataclass
class BackupResult:
    """A committed backup (--json: summary())."""

    archive: str
    disks: list[Disk]
    bytes: int                  # the disks' size
    copied: int                 # disk data QEMU sent (an incremental: what changed)
    seconds: float
    x_perf: bool
    frozen: int | None          # filesystems frozen by the guest agent, None without --qga
    uuid: uuidlib.UUID
    parent: uuidlib.UUID | None  # an incremental's parent
    bitmap: str | None           # the dirty bitmap that counts writes since this archive
    notes: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "ok": True,
            "output": self.archive,
            "uuid": str(self.uuid),
            "incremental": self.parent is not None,
            "parent": str(self.parent) if self.parent else None,
            "bitmap": self.bitmap,
            "notes": self.notes,
            "devices": [{"name": d.name, "node": d.node, "device_bytes": d.size}
                        for d in self.disks],
            "device_bytes": self.bytes,
            "copied_bytes": self.copied,
            "seconds": round(self.seconds, 3),
            "rate": round(self.bytes / self.seconds) if self.seconds > 0 else None,
            "x_perf": self.x_perf,
            "frozen": self.frozen,
        }


# --- the backup ------------------------------------------------------------------------------


@dataclass
class _Job:
    """One disk's backup job in QEMU."""

    job_id: str
    disk: Disk
    target: str
    ended: bool = False
    error: str | None = None


@dataclass
class _State:
    """What this run added to QEMU (teardown removes it)."""

    added_nodes: list[str] = field(default_factory=list)
    jobs: list[_Job] = field(default_factory=list)
    maybe_frozen: bool = False


class Backup:
    """One backup run: `trio.run(run_backup, Backup(opts))`."""

    def __init__(self, opts: BackupOptions, prev: PrevReader | None = None) -> None:
        self.opts = opts
        self._prev_reader = prev               # PREV being read already (an incremental)
        self.failure: str | None = None
        self.tag = secrets.token_hex(5)         # in the names of everything we add to QEMU
        self.disks: list[Disk] = []
        self.x_perf = False
        self.frozen: int | None = None
        self.writer: WriterThread | None = None
        self.pipe: Pipe | None = None
        self._st = _State()
        self._scope = trio.CancelScope()
        self._nbd_scope = trio.CancelScope()
        self._qmp: Qmp | None = None
        self._sockdir: str | None = None
        self.progress: Progress | None = None
        #: Set once the jobs run; tests use it to inject failures at the right moment.
        self.jobs_started = trio.Event()
        self._prev_link: chain.Link | None = None
        self._prev_vmid: str | None = None
        self._jobs_maybe = False
        self.uuid = uuidlib.uuid4()
        self.ctime = int(time.time())          # the archive's, and its name's with -o DIR/
        self.parent: chain.Link | None = None  # set when the backup is incremental
        self.notes: list[str] = []             # what the user should know (a fallback)
        self._nodes: list[dict[str, Any]] = []
        self._bitmaps_maybe = False            # ours may exist: remove them if we fail
        self.whole: set[str] = set()           # disks of an incremental copied whole
        self.signalled: int | None = None      # the signal that ended the backup
        self._nbd_stats: list[NBDStats] = []   # per disk: what QEMU sent
        self.exit_code = BackupError.exit_code
        self.lock: runlock.RunLock | None = None
        self.guard: Guard | None = None
        self._listeners: list[trio.socket.SocketType] = []
        self._settled = False                  # our bitmaps are as they must stay
        self._prev_configs: list[tuple[str, bytes]] = []
        self.depth = 1                         # archives in the new archive's chain

    # -- failure plumbing --

    def fail(self, reason: str, exit_code: int = BackupError.exit_code) -> None:
        """Record the first failure reason, stop storing, and stop the main flow."""
        if self.failure is None:
            self.failure = reason
            self.exit_code = exit_code
        if self.pipe is not None:
            self.pipe.discard()
        self._scope.cancel()

    def drop_nbd_connections(self) -> None:
        """Close every NBD connection now (QEMU's jobs then fail with an I/O error)."""
        self._nbd_scope.cancel()

    def _writer_failed(self, exc: BaseException) -> None:
        self.fail(describe_writer_error(exc, self.opts.output))

    # -- entry --

    async def run(self) -> BackupResult:
        opts = self.opts
        if not naming.is_directory_output(opts.output):
            check_output_name(opts.output)
        started = time.monotonic()
        self.lock = runlock.RunLock(opts.qmp_socket, self.tag)
        switching.hold()  # QEMU's requests wait on our replies: short GIL hand-overs
        try:
            async with open_qmp(opts.qmp_socket) as qmp, trio.open_nursery() as nursery:
                self._qmp = qmp
                if opts.handle_signals:
                    await nursery.start(on_stop_signal, self._on_signal)
                ok = False
                try:
                    with self._scope:
                        await self._preflight(qmp)
                        self._start_writer(nursery)
                        await self._start_nbd(nursery)  # while the writer opens the output
                        await self._writer_ready()
                        await self._add_nodes(qmp)
                        await self._start_jobs(qmp)
                        await self._wait_jobs(qmp)
                        ok = True
                except VmafsError as exc:
                    self.fail(str(exc), exc.exit_code)
                finally:
                    if not ok and self.failure is None:
                        self.fail("the backup was interrupted")
                    with trio.CancelScope(shield=True):
                        await self._teardown(qmp)
                if self.failure is None:
                    await self._commit()
                if self.failure is None:
                    self.lock.record.committed = True
                    self.lock.write()
                with trio.CancelScope(shield=True):
                    await self._settle_bitmaps(qmp)
                nursery.cancel_scope.cancel()
        except VmafsError as exc:
            if self.failure is None:
                self.failure = self._busy_reason() if isinstance(exc, QmpBusy) else str(exc)
                self.exit_code = exc.exit_code
        finally:
            switching.release()
            self._finish_progress()
            self._let_go()
        if self.failure is not None:
            error = BackupError(self.failure)
            error.exit_code = self.exit_code
            raise error
        assert self.writer is not None
        total = sum(d.size for d in self.disks)
        copied = sum(s.bytes_written for s in self._nbd_stats)
        return BackupResult(self.opts.output, self.disks, total, copied,
                            time.monotonic() - started,
                            self.x_perf, self.frozen, self.uuid,
                            self.parent.uuid if self.parent else None,
                            chain.bitmap_name(self.uuid) if opts.bitmap else None, self.notes)

    def _busy_reason(self) -> str:
        """QEMU's monitor did not greet us: name the vmafs backup that holds it, if one does."""
        with runlock.scan(exclude=self.tag) as runs:
            for record in runs.live.values():
                if record is not None and runlock.same_socket(record.qmp, self.opts.qmp_socket):
                    if _alive(record.pid):
                        return (f"another vmafs backup (pid {record.pid}) is running on this VM "
                                "(it holds QEMU's monitor); wait for it to finish")
                    return (f"a killed vmafs backup (pid {record.pid}) is being cleaned up by "
                            "its guard; try again in a few seconds")
        return f"QMP socket {self.opts.qmp_socket}: no greeting (another client holds QEMU's " \
               "monitor, which serves one at a time)"

    def _on_signal(self, signum: int) -> None:
        self.signalled = self.signalled or signum
        self.fail(f"interrupted by {signal.Signals(signum).name}")

    # -- phases --

    async def _read_prev(self) -> None:
        """PREV and its whole chain, checked as the readers check it, before anything in QEMU
        is changed: an incremental on a broken chain would be an archive nothing can read.
        Read in a thread (prev.py), usually started by the command before its imports."""
        path = self.opts.incremental
        assert path is not None
        reader = self._prev_reader
        if reader is None or reader.path != path:
            reader = PrevReader(path, self.opts.bases)
        facts = await trio.to_thread.run_sync(reader.result, abandon_on_cancel=True)
        self._prev_link = facts.link
        self.depth = facts.depth
        self._prev_configs = facts.configs
        self._prev_vmid = facts.vmid
        if self.opts.inherit:
            self.opts = replace(self.opts, configs=self._prev_configs)

    async def _preflight(self, qmp: Qmp) -> None:
        """Everything that can refuse the backup, before anything is touched (but what a
        killed backup left, which is cleaned up first)."""
        # What the preflight reads of QEMU, asked at once (one round trip); asked again only
        # when a dead run's leftovers were removed.  Nothing else changes the graph meanwhile:
        # QEMU serves one QMP client at a time, and that is us.  An incremental asks while
        # PREV's thread still reads (QEMU answers meanwhile), and changes nothing in QEMU
        # before PREV has passed.
        jobs, nodes, blocks, status = await self._query(qmp)
        types = await query_types(qmp, blocks)  # still while PREV's thread reads
        if self.opts.incremental is not None:
            await self._read_prev()
        if naming.is_directory_output(self.opts.output):
            vmid = (self.opts.vmid or (self._prev_vmid if self.opts.inherit else None)
                    or naming.default_vmid(self.opts.configs,
                                           (await qmp.execute("query-name")).get("name")))
            zstd = self.opts.zstd is True
            if not is_remote(self.opts.output):
                second = naming.vacant_second(self.opts.output, vmid, self.ctime, zstd,
                                              os.path.lexists)
                await trio.sleep(max(0.0, second - time.time()))
                self.ctime = second
            path = naming.output_path(self.opts.output, vmid, self.ctime, zstd)
            check_output_name(path)
            self.opts = replace(self.opts, output=path, zstd=zstd)
        if self.opts.incremental is not None:
            from vmafs.archive import chain as chains
            reason = chains.extend_refusal(self.opts.incremental, self.depth - 1)
            if reason is not None:
                if not self.opts.full_if_needed:
                    raise chains.ChainError(reason)
                self.notes.append(f"{reason}: taking a full backup instead (--full-if-needed)")
                self.opts = replace(self.opts, incremental=None)
        if await self._clean_leftovers(qmp, jobs, nodes):
            jobs, nodes, blocks, status = await self._query(qmp)
            types = await query_types(qmp, blocks)
        if status.get("status") in ("shutdown", "guest-panicked", "internal-error"):
            raise BackupError(f"the VM is in state {status.get('status')!r}")
        self.disks = blockgraph.select_disks(blocks, nodes, types, self.opts.drives)
        self._nodes = nodes
        if self.opts.incremental is not None:
            self._plan_incremental(nodes, process_started(qmp.peer_pid()))
        blockgraph.check_no_jobs(jobs)
        # x-perf is tried, not looked up: the introspected schema is ~200 KiB of JSON, the
        # slowest QMP answer of a backup; a QEMU without it refuses the whole (atomic)
        # transaction, which is then sent again without it (_start_jobs).
        self.x_perf = self.opts.max_workers is not None
        if self.opts.qga_socket:
            async with GuestAgent.open(self.opts.qga_socket) as agent:
                await agent.execute("guest-ping")
        assert self.lock is not None
        record = self.lock.record
        record.output = absolute(self.opts.output) if self.opts.output != "-" else None
        record.uuid = str(self.uuid)
        record.bitmap = chain.bitmap_name(self.uuid) if self.opts.bitmap else None
        record.parent_bitmap = (chain.bitmap_name(self.parent.uuid)
                                if self.parent is not None else None)
        record.nodes = [d.node for d in self.disks]
        self.lock.write()

    @staticmethod
    async def _query(qmp: Qmp) -> tuple[list[Any], list[Any], list[Any], dict[str, Any]]:
        """query-block-jobs, query-named-block-nodes (flat), query-block, query-status."""
        answers = await qmp.execute_all([
            ("query-block-jobs", None), ("query-named-block-nodes", {"flat": True}),
            ("query-block", None), ("query-status", None)])
        for answer in answers:
            if isinstance(answer, QmpError):
                raise answer
        jobs, nodes, blocks, status = answers
        return jobs, nodes, blocks, status

    async def _clean_leftovers(self, qmp: Qmp, jobs: list[Any], nodes: list[Any]) -> bool:
        """Remove what dead runs left in this VM (jobs, filters, NBD nodes, their uncommitted
        bitmaps) as `jobs` and `nodes` show it; refuse while a live one holds objects here.
        True when QEMU was asked to change anything."""
        changed = False
        with runlock.scan(exclude=self.tag) as runs:
            names = [*(j.get("device", "") for j in jobs), *(n.get("node-name", "") for n in nodes)]
            present = {t for name in names if (t := runlock.tag_of(name)) is not None}
            for tag in sorted(present & runs.live.keys()):
                record = runs.live[tag]
                pid = f" (pid {record.pid})" if record is not None else ""
                alive = record is None or _alive(record.pid)
                raise BackupError(
                    f"another vmafs backup{pid} is running on this VM; wait for it to finish"
                    if alive else f"a killed vmafs backup{pid} is being cleaned up by its "
                    "guard; try again in a few seconds")
            ours = [a for a in runs.abandoned if a.tag in present or (
                a.record is not None and runlock.same_socket(a.record.qmp,
                                                             self.opts.qmp_socket))]
            gone = [a for a in runs.abandoned if a not in ours and a.record is not None
                    and not os.path.exists(a.record.qmp)]
            tags = present - runs.live.keys()
            dead = [b for a in ours for b in dead_bitmaps(a.record)]
            exports = [(str(p), int(n)) for a in ours if a.record is not None
                       and a.tag in present for p, n in a.record.exports]
            for qga in {a.record.qga for a in ours if a.record is not None and a.record.qga}:
                changed = True
                if await thaw_guest(qga):  # a run killed while the guest was frozen
                    self.notes.append("thawed the guest's file systems a killed backup froze")
            if tags or dead:
                changed = True
                done = await rescue_and_clean(qmp.execute, tags, dead, exports)
                if done:
                    self.notes.append("cleaned up after a killed backup: " + ", ".join(done))
            for a in [*ours, *gone]:
                for path, _ in a.record.exports if a.record is not None else ():
                    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                a.release()
        return changed

    def _plan_incremental(self, nodes: list[dict[str, Any]], qemu_started: float | None
                          ) -> None:
        """Refuse (or, with --full-if-needed, fall back to a full backup) before anything is
        touched, unless every disk has PREV's bitmap, usable, and PREV's size."""
        link = self._prev_link
        assert link is not None
        fallback = "take a full backup (without --incremental, or with --full-if-needed)"
        mismatch = bitmaps.chain_mismatch(self.disks, dict(link.devices))
        if mismatch is not None:
            if not self.opts.full_if_needed:
                raise BackupError(f"{mismatch}; {fallback}")
            self.notes.append(f"{mismatch}: taking a full backup instead (--full-if-needed)")
            return
        name = chain.bitmap_name(link.uuid)
        missing = [d for d in self.disks if bitmaps.bitmap_of(nodes, d.node, name) is None]
        successor = self._successor(link.uuid) if missing else None
        unknown = {}
        for d in self.disks:
            why = bitmaps.missing_reason(next((n for n in nodes if n.get("node-name") == d.node),
                                              None), link.ctime, qemu_started, successor)
            if (reason := bitmaps.unusable(d, nodes, link.uuid, why)) is not None:
                unknown[d.name] = reason
        if unknown and not self.opts.full_if_needed:
            raise BackupError("; ".join([*unknown.values(), fallback]))
        for reason in unknown.values():
            self.notes.append(f"{reason}: copying that disk whole (--full-if-needed)")
        self.parent = link
        self.whole = set(unknown)

    def _successor(self, prev: uuidlib.UUID) -> str | None:
        """An archive beside PREV (or among --base) that continued from PREV, if any."""
        from vmafs.archive import chain as chains
        path = self.opts.incremental
        assert path is not None
        with contextlib.suppress(VmafsError):
            pool = chains.candidates(os.path.dirname(path))
            for peek in [*pool.peeks]:
                if peek.parent is not None and peek.parent.uuid == prev:
                    return display(os.path.basename(peek.path))
        return None

    def _start_writer(self, nursery: trio.Nursery) -> None:
        token = trio.lowlevel.current_trio_token()
        self.pipe = Pipe(self.opts.queue_bytes)
        total = sum(d.size for d in self.disks)
        configs = list(self.opts.configs)
        if self.parent is not None:
            total = bitmaps.dirty_bytes(self.disks, self._nodes, self.parent.uuid) + sum(
                d.size for d in self.disks if d.name in self.whole)
            configs.append((chain.CONFIG_NAME,
                            chain.encode(chain.ChainRecord(parent=self.parent))))
        label = "backup" if self.opts.output == "-" else os.path.basename(self.opts.output)
        self.progress = Progress(label, total, enabled=self.opts.progress)
        incremental = ([i for i, d in enumerate(self.disks, start=1) if d.name not in self.whole]
                       if self.parent is not None else [])
        self.writer = WriterThread(self.opts, self.disks, configs, self.uuid, incremental,
                                   self.ctime, self.pipe, self.progress, token,
                                   self._writer_failed)
        self.writer.start()
        nursery.start_soon(self._watchdog)

    async def _writer_ready(self) -> None:
        """The output is open and its header built (else the backup stops here, before QEMU
        is touched)."""
        assert self.writer is not None
        await self.writer.ready.wait()
        if self.writer.error is not None:
            raise BackupError(describe_writer_error(self.writer.error, self.opts.output))

    async def _start_nbd(self, nursery: trio.Nursery) -> None:
        """The sockets QEMU connects to, and the guard that holds a copy of each (it serves
        QEMU's reconnections if this process dies)."""
        self._sockdir = tempfile.mkdtemp(prefix="vmafs-nbd-")
        for i in range(len(self.disks)):
            self._listeners.append(await open_listener(os.path.join(self._sockdir, f"{i}.sock")))
        assert self.lock is not None
        self.lock.record.exports = [(os.path.join(self._sockdir, f"{i}.sock"), d.size)
                                    for i, d in enumerate(self.disks)]
        self.lock.write()
        self.guard = Guard(self.opts.qmp_socket, self.lock, self._sockdir,
                           [(sock.fileno(), d.size)
                            for sock, d in zip(self._listeners, self.disks, strict=True)])
        await nursery.start(self._serve_all)

    async def _serve_all(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        assert self.pipe is not None and self._sockdir is not None
        with self._nbd_scope:
            async with trio.open_nursery() as nursery:
                for i, disk in enumerate(self.disks):
                    path = os.path.join(self._sockdir, f"{i}.sock")
                    self._nbd_stats.append(await nursery.start(partial(
                        serve_nbd_threads, path, disk.size, DiskSink(self.pipe, i + 1),
                        listener=self._listeners[i])))
                task_status.started()

    async def _add_nodes(self, qmp: Qmp) -> None:
        assert self._sockdir is not None
        for i, disk in enumerate(self.disks):
            node = f"vmafs-{self.tag}-t{i}"
            path = os.path.join(self._sockdir, f"{i}.sock")
            self._st.added_nodes.append(node)  # before the call: a timeout may still add it
            await qmp.execute("blockdev-add", {
                "driver": "nbd", "node-name": node,
                "server": {"type": "unix", "path": path},
                # a broken connection holds requests until a sink is back (the guard's)
                "reconnect-delay": RECONNECT_DELAY,
            })
            self._st.jobs.append(_Job(f"vmafs-{self.tag}-{i}", disk, node))

    async def _start_jobs(self, qmp: Qmp) -> None:
        try:
            if self.opts.qga_socket:
                await self._freeze()
            # From here on the jobs may exist (a cancelled wait does not undo the command),
            # so teardown asks QEMU about them.
            self._jobs_maybe = True
            self._bitmaps_maybe = self.opts.bitmap
            try:
                await qmp.execute("transaction", self._transaction())
            except QmpError as exc:
                if not (self.x_perf and "x-perf" in exc.desc):
                    raise
                self.x_perf = False  # an older QEMU: nothing was started, start it without
                await qmp.execute("transaction", self._transaction())
        finally:
            if self._st.maybe_frozen:
                with trio.CancelScope(shield=True):
                    await self._thaw()
        self.jobs_started.set()

    def _transaction(self) -> dict[str, Any]:
        """The one transaction that adds this archive's bitmaps and starts every job."""
        actions = (bitmaps.add_actions(self.disks, self._nodes, self.uuid)
                   if self.opts.bitmap else [])
        for i, job in enumerate(self._st.jobs):
            sync = bitmaps.sync_arguments(self.parent.uuid if self.parent is not None
                                          and job.disk.name not in self.whole else None)
            data: dict[str, Any] = {
                "job-id": job.job_id, "device": job.disk.node, "target": job.target,
                **sync, "auto-finalize": True, "auto-dismiss": True,
                "filter-node-name": f"vmafs-{self.tag}-cbw{i}",
                "on-source-error": "report", "on-target-error": "report",
            }
            if self.x_perf:
                workers = (self.opts.incremental_workers if sync["sync"] == "bitmap"
                           else None) or self.opts.max_workers
                data["x-perf"] = {"max-workers": workers, "max-chunk": self.opts.max_chunk}
            if self.opts.speed:
                data["speed"] = self.opts.speed
            actions.append({"type": "blockdev-backup", "data": data})
        # QEMU refuses grouped completion next to bitmap actions: then the jobs start at
        # one instant and fail together because any failure cancels them all (teardown).
        args: dict[str, Any] = {"actions": actions}
        if not self.opts.bitmap:
            args["properties"] = {"completion-mode": "grouped"}
        return args

    async def _freeze(self) -> None:
        assert self.opts.qga_socket
        self._st.maybe_frozen = True
        if self.lock is not None:  # killed from here on, the guard thaws the guest
            self.lock.record.qga = os.path.abspath(self.opts.qga_socket)
            self.lock.write()
        async with GuestAgent.open(self.opts.qga_socket) as agent:
            self.frozen = int(await agent.execute("guest-fsfreeze-freeze",
                                                  timeout=self.opts.freeze_timeout))

    async def _thaw(self) -> None:
        """Thaw (idempotent); a guest left frozen is worse than a failed backup."""
        assert self.opts.qga_socket
        last: Exception | None = None
        for _ in range(3):
            try:
                with trio.fail_after(self.opts.freeze_timeout + 15):
                    async with GuestAgent.open(self.opts.qga_socket) as agent:
                        await agent.execute("guest-fsfreeze-thaw",
                                            timeout=self.opts.freeze_timeout)
                self._st.maybe_frozen = False
                if self.lock is not None:
                    self.lock.record.qga = None
                    self.lock.write()
                return
            except (VmafsError, trio.TooSlowError) as exc:
                last = exc
                await trio.sleep(0.5)
        if self.failure is None:
            self.failure = f"could not thaw the guest's filesystems: {last}"

    async def _next_event(self, qmp: Qmp) -> dict[str, Any]:
        try:
            return await qmp.events.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise QemuGone("QEMU exited or closed the QMP connection during the backup") from None

    def _note_job_event(self, ev: dict[str, Any]) -> _Job | None:
        name = ev.get("event")
        if name not in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            return None
        data = ev.get("data", {})
        for job in self._st.jobs:
            if job.job_id == data.get("device") and not job.ended:
                job.ended = True
                if name == "BLOCK_JOB_CANCELLED":
                    job.error = "cancelled"
                elif "error" in data:
                    job.error = str(data["error"])
                elif data.get("offset") != data.get("len"):
                    job.error = f"copied {data.get('offset')} of {data.get('len')} bytes"
                return job
        return None

    async def _wait_jobs(self, qmp: Qmp) -> None:
        while not all(job.ended for job in self._st.jobs):
            job = self._note_job_event(await self._next_event(qmp))
            if job is not None and job.error is not None and job.error != "cancelled":
                break
        errors = [j for j in self._st.jobs if j.error not in (None, "cancelled")]
        if errors:
            j = errors[0]
            raise BackupError(f"QEMU's backup job for {j.disk.name} failed: {j.error}")
        if any(j.error for j in self._st.jobs):
            raise BackupError("QEMU cancelled the backup jobs")

    async def _watchdog(self) -> None:
        assert self.pipe is not None
        timeout = self.opts.stall_timeout
        while True:
            await trio.sleep(min(0.5, timeout / 4))
            pipe = self.pipe
            if pipe.discarding or not pipe.pending():
                continue
            idle = time.monotonic() - pipe.last_progress
            if idle > timeout:
                self.fail(f"the archive writer made no progress for {idle:.0f} s "
                          "(output blocked?); backup abandoned")
                return

    # -- cleanup and commit --

    async def _teardown(self, qmp: Qmp) -> None:
        """Leave the VM as we found it: no jobs, no filter, no nodes, guest thawed."""
        opts = self.opts
        failed = self.failure is not None
        if failed and self.pipe is not None:
            self.pipe.discard()
        with trio.move_on_after(opts.cleanup_timeout) as scope:
            try:
                running = [j for j in self._st.jobs if not j.ended] if self._jobs_maybe else []
                if running:
                    await self._cancel_jobs(qmp, running)
                for node in list(self._st.added_nodes):
                    await self._delete_node(qmp, node)
            except QemuGone:
                pass
        self.drop_nbd_connections()
        if self._st.maybe_frozen:
            await self._thaw()
        if scope.cancelled_caught and self.failure is None:
            self.failure = "QEMU did not release the backup nodes in time"
        if not qmp.gone.is_set() and self._st.added_nodes:
            left = ", ".join(self._st.added_nodes)
            self.failure = self.failure or f"could not remove block nodes {left}"

    async def _settle_bitmaps(self, qmp: Qmp) -> None:
        """Committed: PREV's bitmaps have done their job (ours count from here). Failed: ours
        go, PREV's stay and still hold every change since PREV."""
        if not (self._bitmaps_maybe or self.opts.drop_old_bitmaps):
            self._settled = True
            return
        if qmp.gone.is_set():
            return
        with trio.move_on_after(self.opts.cleanup_timeout):
            try:
                # Committed, what goes is bitmaps the preflight saw (PREV's, or with
                # --drop-old-bitmaps every other one): no other client changed them since
                # (QEMU serves one QMP client at a time), so its answer is still right and
                # the round trip is saved. Failed, ours go, which only QEMU can list.
                nodes = (self._nodes if self.failure is None else await qmp.execute(
                    "query-named-block-nodes", {"flat": True}, timeout=10))
                for disk in self.disks:
                    for name in bitmaps.to_remove(
                            disk, nodes, self.uuid, started=self._bitmaps_maybe,
                            committed=self.failure is None, parent=self.parent,
                            drop_old=self.opts.drop_old_bitmaps):
                        await self._remove_bitmap(qmp, disk, name)
                self._settled = True
            except (QemuGone, QmpError):
                return

    async def _remove_bitmap(self, qmp: Qmp, disk: Disk, name: str) -> None:
        try:
            await qmp.execute("block-dirty-bitmap-remove", {"node": disk.node, "name": name},
                              timeout=10)
        except QmpError as exc:
            if self.failure is None:
                self.notes.append(f"could not remove the dirty bitmap {name} of {disk.name}: "
                                  f"{exc.desc}")

    async def _delete_node(self, qmp: Qmp, node: str) -> None:
        for attempt in range(2):
            try:
                await qmp.execute("blockdev-del", {"node-name": node}, timeout=15)
            except QmpError as exc:
                if "Failed to find node" not in exc.desc:
                    if attempt == 0:
                        # Still in use: QEMU cannot let go of the connection; drop it.
                        self.drop_nbd_connections()
                        await trio.sleep(0.5)
                        continue
                    return
            self._st.added_nodes.remove(node)
            return

    async def _cancel_jobs(self, qmp: Qmp, running: list[_Job]) -> None:
        """Cancel our jobs and wait for them to end; drop NBD if QEMU cannot let go."""
        for job in running:
            with contextlib.suppress(QmpError):
                await qmp.execute("block-job-cancel", {"device": job.job_id, "force": True},
                                  timeout=10)
        live = {j["device"] for j in await qmp.execute("query-block-jobs", timeout=10)}
        for job in running:
            if job.job_id not in live and not job.ended:
                job.ended = True
        with trio.move_on_after(10):
            while not all(j.ended for j in running):
                self._note_job_event(await self._next_event(qmp))
        if not all(j.ended for j in running):
            self.drop_nbd_connections()
            while not all(j.ended for j in running):
                self._note_job_event(await self._next_event(qmp))

    async def _commit(self) -> None:
        """Every job completed: let the writer finish the archive and rename it."""
        assert self.pipe is not None and self.writer is not None
        self.pipe.put_control(FINISH)
        with self._scope_for_commit():
            await self.writer.done.wait()
        if self.failure is None and self.writer.error is not None:
            self.failure = describe_writer_error(self.writer.error, self.opts.output)
        if self.failure is None and not self.writer.committed:
            self.failure = "the archive writer stopped without finishing"

    @contextlib.contextmanager
    def _scope_for_commit(self) -> Any:
        # The watchdog (still running in the nursery) cancels this scope via fail().
        self._scope = trio.CancelScope()
        with self._scope:
            yield

    def _finish_progress(self) -> None:
        if self.progress is not None and self.failure is None:
            self.progress.finish()
        elif self.progress is not None and self.progress.enabled:
            self.progress.stream.write("\n")

    def _let_go(self) -> None:
        """The run ends: when it left nothing in QEMU, its lock file goes and the guard just
        exits; else both stay, and the guard (once this process let go of QEMU's monitor) or
        the next backup cleans up."""
        running = self._jobs_maybe and any(not j.ended for j in self._st.jobs)
        clean = not self._st.added_nodes and not running and (
            self._settled or not self._bitmaps_maybe)
        if self.guard is not None:
            self.guard.done(clean)
        if self.lock is not None:
            if clean:
                self.lock.release()
            else:
                self.lock.abandon()
        if clean or self.guard is None:
            self._remove_sockdir()
        for sock in self._listeners:
            sock.close()

    def _remove_sockdir(self) -> None:
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    async def abort_writer(self) -> None:
        """Wait (briefly) for an aborted writer thread; it may be stuck in a blocked write."""
        if self.writer is None:
            return
        if self.pipe is not None:
            self.pipe.discard()
        with trio.move_on_after(5):
            await self.writer.done.wait()

    @property
    def writer_stuck(self) -> bool:
        return self.writer is not None and self.writer.alive


async def run_backup(job: Backup) -> BackupResult:
    """Run a backup inside the current trio run; a failed one waits (briefly) for its writer."""
    try:
        return await job.run()
    finally:
        if job.failure is not None:
            with trio.CancelScope(shield=True):
                await job.abort_writer()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
