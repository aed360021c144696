"""Red-team findings on the live side (serving, boot, live restore), each a test that failed
before its fix: a hostile NBD client, a crafted archive config or a killed run must cost
neither the server's memory nor the host's safety."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_vmafs

from vmafs.format import nbd

MiB = 1 << 20


def _archive(d: Path, size: int, conf: str = "boot: order=scsi0\n") -> Path:
    """A one-disk plain archive of `size` random bytes."""
    disk, config, out = d / "disk.raw", d / "qemu-server.conf", d / "vm.vma"
    disk.write_bytes(random.Random(1).randbytes(size))
    config.write_text(conf)
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", config, f"drive-scsi0={disk}")
    assert rc == 0, err
    return out


@contextlib.contextmanager
def _serving(archive: Path, sock: Path) -> Iterator[int]:
    rc, out, err = run_vmafs("serve", "--json", "--socket", sock, archive)
    assert rc == 0, err
    pid = int(json.loads(out)["pid"])
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the server did not stop on SIGTERM")


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def _connect(sock: Path, export: str = "drive-scsi0") -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(sock))
    assert len(s.recv(18)) == 18
    name = export.encode()
    s.sendall(struct.pack(">I", 3)
              + _opt(nbd.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
    end = struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ACK, 0)
    data = b""
    while not data.endswith(end):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return s


def _anon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def _settled_rss(pid: int) -> int:
    """The server's anonymous memory once it stops growing (it waits on its clients)."""
    last, same = -1, 0
    for _ in range(200):
        now = _anon_rss(pid)
        same = same + 1 if now == last else 0
        if same == 5:
            break
        last = now
        time.sleep(0.1)
    return last


def test_serve_on_a_socket_path_too_long_says_so(tmp_path: Path) -> None:
    """A --socket path longer than a unix socket's was 'PATH: None' (the kernel's error
    has no strerror); now one line says what is wrong."""
    rc, _, err = run_vmafs("serve", "--socket", tmp_path / ("s" * 120), _archive(tmp_path, MiB))
    assert_one_line_error(rc, err, "at most 107 bytes")


def test_a_client_that_never_reads_holds_its_budget_not_more(tmp_path: Path) -> None:
    """A plain archive's connections are served from a thread whose sender queued up to 4
    replies of 32 MiB, plus the one it sent and the one just read: a client that sends
    32 MiB reads and never reads a reply made the server hold ~210 MiB, 64 such connections
    13 GiB. Now the next read waits until it fits the connection's 64 MiB reply budget (what
    the compressed path's loop already kept to)."""
    archive = _archive(tmp_path, 40 * MiB)
    sock = tmp_path / "s"
    clients = 2
    with _serving(archive, sock) as pid:
        before = _settled_rss(pid)
        conns = []
        try:
            for _ in range(clients):
                s = _connect(sock)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ,
                                               h, 0, 32 * MiB) for h in range(24)))
                conns.append(s)
            grown = _settled_rss(pid) - before
            # budget (64 MiB) + the socket's send buffer + allocator slack, per client
            assert grown < clients * 128 * MiB, f"{grown / MiB:.0f} MiB for {clients} clients"
            s = _connect(sock)            # and the server still answers others
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 7, 0, 8))
            reply = s.recv(24, socket.MSG_WAITALL)
            assert reply[:16] == struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, 7)
            assert reply[16:] == random.Random(1).randbytes(8)
            s.close()
        finally:
            for s in conns:
                s.close()


def _query_name(name_arg: str) -> dict[str, object]:
    """What QEMU makes of `-name name_arg` (query-name over QMP on stdio)."""
    qmp = ('{"execute":"qmp_capabilities"}\n{"execute":"query-name"}\n'
           '{"execute":"quit"}\n')
    proc = subprocess.run(["qemu-system-x86_64", "-name", name_arg, "-nodefaults",
                           "-machine", "none", "-display", "none", "-S", "-qmp", "stdio"],
                          input=qmp, capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return next(r["return"] for r in replies[2:] if "return" in r)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
def test_boot_gives_qemu_the_archives_vm_name_as_a_name_only(tmp_path: Path) -> None:
    """`name: process=pwned` in the archive's qemu-server.conf went to QEMU as `-name
    process=pwned`, which QEMU reads as its process= option (and debug-threads=on as that
    one): archive text as QEMU options. It is the guest's name now, whatever it says; and
    `--timeout nan` is one line, not trio's traceback once QEMU had started."""
    archive = _archive(tmp_path, MiB, "name: process=pwned,debug-threads=on\nmemory: 64\n")
    rc, out, err = run_vmafs("boot", "--print", "--json", archive)
    assert rc == 0, err
    argv = json.loads(out)["qemu"]
    assert _query_name(argv[argv.index("-name") + 1]) == {
        "name": "process=pwned,debug-threads=on"}
    rc, _, err = run_vmafs("boot", "--check", "--timeout", "nan", archive)
    assert_one_line_error(rc, err, "--timeout")


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if path.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert path.exists(), proc.communicate()


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("qemu-img", "qemu-io")),
                    reason="no qemu-img, qemu-io")
def test_a_live_restore_killed_while_making_its_targets_leaves_none_resume_takes(
        tmp_path: Path) -> None:
    """`restore --live` created each target under its final name, then ran qemu-img create
    and qemu-io in it: SIGKILLed in between, it left an empty file there, and --resume took
    it for a finished target (no backing: "done: the targets no longer need the archive",
    exit 0, with QEMU never asked). Targets and configs are now made under hidden temporary
    names and named when whole; --resume refuses a target that is no qcow2 of the disk's
    size. (The qemu-io on PATH runs the real one after a pause: the moment of the kill.)"""
    disk, archive = tmp_path / "disk.raw", tmp_path / "vm.vma"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)          # holes: qemu-io marks them in the target
    rc, _, err = run_vmafs("create", "-q", "-o", archive, f"drive-scsi0={disk}")
    assert rc == 0, err
    shim = tmp_path / "bin"
    shim.mkdir()
    real = shutil.which("qemu-io")
    (shim / "qemu-io").write_text(f"#!/bin/sh\ntouch {tmp_path}/in-qemu-io\nsleep 30\n"
                                  f"exec {real} \"$@\"\n")
    (shim / "qemu-io").chmod(0o755)
    out = tmp_path / "out"
    args = ["restore", "--live", archive, "--to", out, "--qmp", tmp_path / "qmp"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "vmafs", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(tmp_path / "in-qemu-io", proc)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    rc, _, err = run_vmafs(*args[:1], "--resume", *args[1:])
    assert_one_line_error(rc, err, "nothing to resume")
    # what a killed run left before the fix: an empty file under the target's name
    (out / "disk-drive-scsi0.qcow2").touch()
    rc, _, err = run_vmafs(*args[:1], "--resume", *args[1:])
    assert_one_line_error(rc, err, "not a live restore target")


CLUSTER = 65536


def _damage(archive: Path, dev_id: int, clusters: range) -> None:
    """Flip a byte of each of these clusters of the device in a plain archive (its extents
    walked: a 512-byte header of 59 slots, then the slots' 4 KiB blocks)."""
    data = bytearray(archive.read_bytes())
    pos = struct.unpack_from(">I", data, 56)[0]          # header size
    hit = 0
    while data[pos:pos + 4] == b"VMAE":
        blocks = struct.unpack_from(">H", data, pos + 6)[0]
        at = pos + 512
        for slot in range(59):
            info = struct.unpack_from(">Q", data, pos + 40 + 8 * slot)[0]
            if info >> 32 & 0xFF == dev_id and info & 0xFFFFFFFF in clusters \
                    and info >> 48 & 1:
                data[at] ^= 0xFF
                hit += 1
            at += 4096 * (info >> 48).bit_count() if info >> 32 & 0xFF else 0
        pos += 512 + 4096 * blocks
    assert hit, "no cluster of the device there"
    archive.write_bytes(data)


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("qemu-img", "qemu-system-x86_64")),
                    reason="needs qemu-img and qemu-system-x86_64")
def test_a_damaged_stream_does_not_take_the_export_from_the_others(tmp_path: Path) -> None:
    """A live restore whose archive is damaged under one disk's stream: that stream fails
    (EIO), and vmafs exited at once, taking the export away while the other disk's stream
    still ran in QEMU, reading it: that job then waited out the reconnect delay (300 s),
    and QEMU's monitor with it (`stop` got no answer). Now the others are served to their
    end, then vmafs fails with one line naming the stream to --resume; the guest writes on."""
    import guestimage as gi
    from test_live_restore import SLOW, Restore, _backing, _disk, _env

    guest = gi.guest_or_skip()
    _disk(tmp_path / "a.raw", 1)
    _disk(tmp_path / "b.raw", 2)
    archive = tmp_path / "vm.vma"
    subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", archive,
                    f"drive-virtio0={tmp_path / 'a.raw'}", f"drive-virtio1={tmp_path / 'b.raw'}"],
                   check=True, env=_env())
    out, qmp = tmp_path / "out", tmp_path / "q.sock"
    restore = Restore(archive, "--to", out, "--qmp", qmp, "--speed", SLOW)
    restore.wait_line(r"-drive file=")
    targets = [out / "disk-drive-virtio0.qcow2", out / "disk-drive-virtio1.qcow2"]
    vm = gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline("writer"),
                   disks=[gi.Disk(t, fmt="qcow2") for t in targets],
                   extra_args=["-S", "-qmp", f"unix:{qmp},server=on,wait=off"])
    try:
        with vm:
            vm.wait_for("VMAFS-READY", timeout=120)
            vm.wait_for("VMAFS-COUNT", timeout=60)
            _damage(archive, 1, range(8 * MiB // CLUSTER, 20 * MiB // CLUSTER))
            jobs = {j["device"]: j for j in vm.qmp("query-block-jobs")}
            assert sorted(jobs) == ["vmafs-stream-0", "vmafs-stream-1"], jobs
            vm.qmp("block-job-set-speed", device="vmafs-stream-0", speed=0)
            while "vmafs-stream-0" in {j["device"] for j in vm.qmp("query-block-jobs")}:
                time.sleep(0.05)                        # failed on the damage
            vm.qmp("block-job-set-speed", device="vmafs-stream-1", speed=0)
            restore.proc.wait(timeout=180)
            restore._thread.join(5)
            err = "".join(restore.err)
            assert restore.proc.returncode == 1, err
            last = err.strip().splitlines()[-1]
            assert "drive-virtio0" in last and "--resume" in last, err
            assert vm.qmp("query-block-jobs") == []    # no stream left reading a dead export
            assert _backing(targets[1]) is None and _backing(targets[0]) is not None
            mark = vm.serial_mark()
            vm.wait_for("VMAFS-COUNT", timeout=60, after=mark)
            assert "VMAFS-ERROR" not in vm.serial()
            vm.qmp("stop")                              # the monitor answers
            vm.stop()
    finally:
        if restore.proc.poll() is None:
            restore.proc.kill()
            restore.proc.wait()


def test_a_live_restore_refuses_a_qmp_socket_qemu_can_never_make(tmp_path: Path) -> None:
    """--qmp in a directory that does not exist, or longer than a unix socket path may be:
    QEMU can never listen there, and `restore --live` made its targets, then waited for the
    socket without end (its probe's 'path too long' taken for 'not yet'). A --speed beyond
    QEMU's int64 passed too. Each is one line now, before anything is made."""
    archive = _archive(tmp_path, MiB)
    out = tmp_path / "out"
    for extra, what in (([tmp_path / "no" / "q"], "no directory"),
                        ([tmp_path / ("q" * 120)], "at most"),
                        ([tmp_path / "q", "--speed", str(1 << 70)], "--speed")):
        rc, _, err = run_vmafs("restore", "--live", archive, "--to", out, "--qmp", *extra,
                               timeout=30)
        assert_one_line_error(rc, err, what)
        assert not out.exists()


def test_boot_gives_each_disk_its_own_overlay(tmp_path: Path) -> None:
    """A device named no Proxmox way became virtio{20 + its index}: beside a drive-virtio20
    both disks got virtio20.qcow2 (the second overlay replaced the first) and the same
    QEMU ids, so QEMU refused the VM (duplicate ID). Each gets a key of its own now."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    archive = tmp_path / "vm.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", archive, f"foo={disk}",
                           f"drive-virtio20={disk}")
    assert rc == 0, err
    rc, out, err = run_vmafs("boot", "--print", "--json", archive)
    assert rc == 0, err
    argv = json.loads(out)["qemu"]
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    files = [d.split(",")[0] for d in drives]
    assert len(files) == 2 and len(set(files)) == 2, drives


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")
@pytest.mark.parametrize("backing", ["json:{x", 'json:{"file":{"server":{"path":5},'
                                                 '"export":"drive-scsi0"}}'])
def test_live_restore_resume_reads_a_foreign_backing_as_bad_input(tmp_path: Path,
                                                                  backing: str) -> None:
    """--resume reads the socket back from each target's backing: malformed JSON there, or
    a path that is no string, was a traceback (JSONDecodeError, TypeError in fsencode)."""
    archive = _archive(tmp_path, MiB)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                    out / "disk-drive-scsi0.qcow2", str(MiB)], check=True)
    rc, _, err = run_vmafs("restore", "--live", "--resume", archive, "--to", out, "--qmp",
                           tmp_path / "q", timeout=30)
    assert_one_line_error(rc, err, "not a live restore target")


def test_boot_with_a_vm_name_no_argument_can_hold(tmp_path: Path) -> None:
    """A NUL in the config's VM name went into QEMU's argv: `boot` died in fork_exec with
    a ValueError traceback. Such a name is left out now, with a note."""
    archive = _archive(tmp_path, MiB, "name: a\0b\nmemory: 64\n")
    rc, out, err = run_vmafs("boot", "--print", "--json", archive)
    assert rc == 0, err
    assert not [a for a in json.loads(out)["qemu"] if "\0" in a]
    assert "name" in err and "Traceback" not in err
