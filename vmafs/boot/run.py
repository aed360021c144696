"""`vmafs boot`: the archive served in-process over NBD, a throwaway qcow2 overlay per disk
in a private directory, QEMU started on them as the archive's qemu-server.conf says; all of it
removed when QEMU exits. The archive is only read: the guest's writes go to the overlays.

`check` is the restore test: headless, with a deadline; up means the guest agent answered
guest-ping (where the VM has one) or the console matched a pattern. The time to the first disk
read comes from QEMU's block statistics, polled over QMP.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from vmafs.boot import qemuconf
from vmafs.errors import VmafsError, leaf
from vmafs.signals import on_stop_signal

DEFAULT_EXPECT = r"login: "


@dataclass
class Options:
    """What `boot` was asked to do."""

    archive: str
    bases: list[str] = field(default_factory=list)
    check: bool = False
    timeout: float = 300.0
    expect: str | None = None
    accel: str = "auto"
    net: bool = False
    qemu_args: list[str] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class Result:
    """How a boot went: whether the guest came up, how it was seen, and when."""

    up: bool = False
    by: str = ""                       # guest-agent | serial
    first_read: float | None = None    # seconds from QEMU's start
    up_after: float | None = None
    qemu_exit: int | None = None
    reason: str = ""
    argv: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    signum: int | None = None


def accel_of(choice: str) -> str:
    if choice != "auto":
        return choice
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def run(opts: Options) -> Result:
    try:
        return trio.run(_boot, opts)
    except BaseExceptionGroup as group:
        raise leaf(group) from None


async def _boot(opts: Options) -> Result:
    from vmafs.format.names import json_name
    from vmafs.serve.nbd import open_export

    result = Result()
    if opts.expect is not None:
        try:
            pattern = re.compile(opts.expect.encode())
        except re.error as exc:
            from vmafs.errors import UsageError
            raise UsageError(f"--expect {opts.expect!r}: {exc}") from None
    private = tempfile.mkdtemp(prefix="vmafs-boot-")
    try:
        sock = os.path.join(private, "nbd")
        async with open_export(os.path.abspath(opts.archive), opts.bases,
                               socket=sock) as export:
            session = export.session
            conf = next((data for name, data in session.configs
                         if name == "qemu-server.conf"), None)
            cfg = qemuconf.parse(conf.decode("utf-8", "replace")) if conf is not None \
                else qemuconf.VmConfig()
            if conf is None:
                result.notes.append("no qemu-server.conf in the archive: defaults used")
            disks = []
            # a device named no Proxmox way gets a virtio key no other device has: two
            # disks on one key shared an overlay (the second's replaced the first's)
            taken = {qemuconf.disk_key(d.name) for d in session.devices}
            spare = (k for k in (f"virtio{n}" for n in itertools.count(20)) if k not in taken)
            for dev in session.devices:
                name = dev.name
                key = qemuconf.disk_key(name) or next(spare)
                if qemuconf.disk_key(name) is None:
                    result.notes.append(f"{name}: not a Proxmox drive name; attached as "
                                        f"{key}")
                overlay = os.path.join(private, f"{key}.qcow2")
                disks.append(qemuconf.BootDisk(key, overlay, "qcow2", dev.size))
                result.devices.append({**json_name(dev.name), "device_bytes": dev.size,
                                       "as": key})
                if not opts.dry_run:
                    await trio.to_thread.run_sync(_overlay, export.urls[dev.name], overlay)
            qmp = os.path.join(private, "qmp")
            qga = os.path.join(private, "qga")
            serial = os.path.join(private, "serial") if opts.check else None
            plan = qemuconf.build(cfg, disks, accel=accel_of(opts.accel), qmp=qmp,
                                  serial=serial, qga=qga, net=opts.net,
                                  headless=opts.check)
            result.argv = [*plan.argv, *opts.qemu_args]
            result.notes += plan.notes
            if opts.dry_run:
                return result
            if shutil.which(result.argv[0]) is None:
                raise VmafsError(f"{result.argv[0]} not found (package qemu-system-x86)")
            for arg in result.argv:
                m = re.search(r"file=(/usr/share/OVMF/[^,]+)", arg)
                if m and not os.path.exists(m.group(1)):
                    raise VmafsError(f"{m.group(1)} not found (package ovmf)")
            await _run_qemu(opts, result, cfg, qmp, qga, serial,
                            pattern if opts.expect is not None else None)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return result


def _overlay(url: str, path: str) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", url,
                           path], capture_output=True, text=True)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise VmafsError(f"qemu-img create failed: {lines[-1]}")


async def _run_qemu(opts: Options, result: Result, cfg: qemuconf.VmConfig, qmp: str,
                    qga: str, serial: str | None, pattern: re.Pattern[bytes] | None) -> None:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        log = None if not opts.check else stack.enter_context(
            open(os.path.join(os.path.dirname(qmp), "qemu.log"), "wb"))
        proc = await trio.lowlevel.open_process(
            result.argv, stdin=subprocess.DEVNULL if opts.check else None,
            stdout=log, stderr=subprocess.STDOUT if log is not None else None)
        try:
            async with trio.open_nursery() as nursery:
                def stop(signum: int) -> None:
                    result.signum = signum
                    nursery.cancel_scope.cancel()

                async def exited() -> None:
                    result.qemu_exit = await proc.wait()
                    if opts.check and not result.up and result.by == "serial":
                        # the console may have matched just before QEMU exited
                        _serial_matched(result, serial, pattern, started)
                    nursery.cancel_scope.cancel()

                await nursery.start(on_stop_signal, stop)
                nursery.start_soon(exited)
                if opts.check:
                    async def checked() -> None:
                        with trio.move_on_after(opts.timeout):
                            await _watch(result, cfg, qmp, qga, serial, pattern, started)
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(checked)
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)
    if opts.check and not result.up:
        if result.qemu_exit is not None:
            tail = _tail(os.path.join(os.path.dirname(qmp), "qemu.log"))
            result.reason = (f"QEMU exited ({result.qemu_exit}) before the guest came up"
                             + (f": {tail}" if tail and result.qemu_exit else ""))
        elif result.signum is None:
            result.reason = f"the guest did not come up within {opts.timeout:g} s"


async def _watch(result: Result, cfg: qemuconf.VmConfig, qmp: str, qga: str,
                 serial: str | None, pattern: re.Pattern[bytes] | None,
                 started: float) -> None:
    """Until the guest is up: the first disk read (QMP block stats) and the up signal."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_first_read, result, qmp, started)
        if pattern is None and cfg.agent:
            result.by = "guest-agent"
            await _agent_up(qga)
        else:
            result.by = "serial"
            await _serial_up(serial, pattern or re.compile(DEFAULT_EXPECT.encode()))
        result.up = True
        result.up_after = time.monotonic() - started
        if result.first_read is None:   # the guest read its disk before it came up
            with trio.move_on_after(2):
                while result.first_read is None:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def _serial_matched(result: Result, path: str | None, pattern: re.Pattern[bytes] | None,
                    started: float) -> None:
    with contextlib.suppress(OSError):
        assert path is not None
        with open(path, "rb") as f:
            if (pattern or re.compile(DEFAULT_EXPECT.encode())).search(f.read()):
                result.up = True
                result.up_after = time.monotonic() - started


async def _serial_up(path: str | None, pattern: re.Pattern[bytes]) -> None:
    assert path is not None
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            if pattern.search(f.read()):
                return
        await trio.sleep(0.1)


async def _agent_up(path: str) -> None:
    from vmafs.backup.qmp import GuestAgent, GuestAgentError
    while True:
        if os.path.exists(path):
            with contextlib.suppress(GuestAgentError):
                async with GuestAgent.open(path, timeout=5) as agent:
                    await agent.execute("guest-ping", timeout=5)
                    return
        await trio.sleep(0.5)


async def _first_read(result: Result, qmp_path: str, started: float) -> None:
    from vmafs.backup.qmp import open_qmp
    while not os.path.exists(qmp_path):
        await trio.sleep(0.02)
    with contextlib.suppress(VmafsError):
        async with open_qmp(qmp_path) as qmp:
            while True:
                stats = await qmp.execute("query-blockstats")
                if any(s.get("stats", {}).get("rd_operations", 0) for s in stats):
                    result.first_read = time.monotonic() - started
                    return
                await trio.sleep(0.05)


async def _stop(proc: trio.Process) -> None:
    """QEMU gone: SIGTERM (it quits cleanly), then SIGKILL."""
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def describe(opts: Options, result: Result) -> str:
    """The one line of --check."""
    if result.up:
        how = "the guest agent answered" if result.by == "guest-agent" else \
            "the console matched"
        first = f", first disk read after {result.first_read:.1f} s" \
            if result.first_read is not None else ""
        return f"UP: {how} after {result.up_after:.1f} s{first}"
    return f"NOT UP: {result.reason}"


def summary(opts: Options, result: Result) -> dict[str, Any]:
    return {"ok": result.up, "archive": opts.archive, "up": result.up,
            "by": result.by or None, "reason": result.reason or None,
            "first_read_seconds": None if result.first_read is None
            else round(result.first_read, 3),
            "up_seconds": None if result.up_after is None else round(result.up_after, 3),
            "timeout": opts.timeout, "devices": result.devices, "notes": result.notes,
            "qemu": result.argv}
