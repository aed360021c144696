"""`vmafs restore --live`: the writer test guest runs on qcow2 targets backed by the archive's
NBD export while QEMU streams the archive into them; afterwards the targets stand alone and
hold the archive plus exactly the guest's writes (tests/guest_replay.py). Once straight
through, once with vmafs killed mid-stream and resumed. Real QEMU (TCG), real guest.

The stream starts rate-limited (--speed) so that it certainly still runs when the guest is up;
the test then lifts the limit through QEMU's other monitor, which vmafs does not hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import guest_replay
import guestimage as gi
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64 << 20
FILL = (4 << 20, 20 << 20)    # data inside and beyond the guest's write region; holes after
SLOW = "128K"                 # the stream's rate until the guest is up

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-system-x86_64")),
    reason="needs qemu-img and qemu-system-x86_64")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _disk(path: Path, seed: int) -> bytes:
    rnd = np.random.default_rng(seed)
    data = bytearray(SIZE)
    data[FILL[0]:FILL[1]] = rnd.integers(0, 256, FILL[1] - FILL[0], dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(FILL[0])
        f.write(data[FILL[0]:FILL[1]])
    return bytes(data)


class Source:
    def __init__(self, tmp: Path) -> None:
        self.base_a = _disk(tmp / "a.raw", 1)
        self.base_b = _disk(tmp / "b.raw", 2)
        self.archive = tmp / "vm.vma.zst"
        subprocess.run([sys.executable, "-m", "vmafs", "create", "-q", "-o", self.archive,
                        f"drive-virtio0={tmp / 'a.raw'}", f"drive-virtio1={tmp / 'b.raw'}"],
                       check=True, env=_env())
        self.sha256 = _sha256(self.archive)


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return Source(tmp_path_factory.mktemp("live"))


class Restore:
    """One `vmafs restore --live` process; stderr collected by a thread."""

    def __init__(self, *args: str | os.PathLike[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmafs", "restore", "--live", "--json", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        self.err: list[str] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_line(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.err:
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from vmafs: {''.join(self.err)}")

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._thread.join(5)
        assert self.proc.returncode == 0, "".join(self.err)
        summary = json.loads(out.strip().splitlines()[-1])
        assert isinstance(summary, dict)
        return summary


def _backing(path: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                     check=True, capture_output=True, text=True).stdout)
    return info.get("backing-filename")


def _unthrottle(vm: gi.QemuVM) -> None:
    """Lift --speed on our jobs through QEMU's own monitor (vmafs holds the other)."""
    for job in vm.qmp("query-block-jobs"):
        vm.qmp("block-job-set-speed", device=job["device"], speed=0)


def _live_restore(guest: gi.Guest, source: Source, tmp: Path, *, kill: bool) -> None:
    out = tmp / "out"
    qmp = tmp / "vmafs-qmp.sock"
    restore = Restore(source.archive, "--to", out, "--qmp", qmp, "--speed", SLOW)
    line = restore.wait_line(r"-drive file=")
    targets = [out / "disk-drive-virtio0.qcow2", out / "disk-drive-virtio1.qcow2"]
    nodes = [json.loads(a) for a in shlex.split(restore.wait_line(r"-blockdev"))
             if a.startswith("{")]
    assert nodes == [{"driver": "qcow2", "node-name": f"drive-virtio{i}",
                      "file": {"driver": "file", "filename": str(t)}}
                     for i, t in enumerate(targets)]
    for t in targets:
        assert f"file={t}," in line
        assert _backing(t) is not None
    # the killed run's VM takes its disks as -blockdev nodes, the other's as -drive
    style: Literal["drive", "blockdev"] = "blockdev" if kill else "drive"
    vm = gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline("writer"),
                   disks=[gi.Disk(t, fmt="qcow2", style=style) for t in targets],
                   extra_args=["-S", "-qmp", f"unix:{qmp},server=on,wait=off"])
    with vm:
        vm.wait_for("VMAFS-READY", timeout=120)      # booted (vmafs continued the -S VM)
        vm.wait_for("VMAFS-COUNT", timeout=60)       # and writing
        assert restore.proc.poll() is None           # while the stream runs
        jobs = vm.qmp("query-block-jobs")
        assert sorted(j["type"] for j in jobs) == ["stream", "stream"], jobs
        assert all(_backing(t) for t in targets)
        if kill:
            restore.proc.kill()
            restore.proc.wait()
            # QEMU holds the reads of the backing (the guest's copy-on-write ones too)
            time.sleep(2)
            assert vm.running() and "VMAFS-ERROR" not in vm.serial()
            mark = vm.serial_mark()
            restore = Restore("--resume", source.archive, "--to", out, "--qmp", qmp)
            vm.wait_for("VMAFS-COUNT", timeout=60, after=mark)   # the guest goes on
            deadline = time.monotonic() + 30
            while restore.proc.poll() is None and not vm.qmp("query-block-jobs") \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        _unthrottle(vm)
        summary = restore.finish()
        assert summary["ok"] is True and summary["resumed"] is kill
        assert [d["name"] for d in summary["devices"]] == ["drive-virtio0", "drive-virtio1"]
        assert vm.qmp("query-block-jobs") == []
        mark = vm.serial_mark()
        vm.wait_for("VMAFS-COUNT", timeout=60, after=mark)       # still writing, standalone
        assert "VMAFS-ERROR" not in vm.serial()
        vm.qmp("stop")
        vm.stop()
    for t in targets:
        assert _backing(t) is None
        subprocess.run(["qemu-img", "check", "-q", t], check=True)
    got_a = _read(targets[0], tmp)
    got_b = _read(targets[1], tmp)
    steps = guest_replay.assert_state(got_a, got_b, source.base_a, source.base_b,
                                      gi.parse_counter(got_a), gi.parse_counter(got_b))
    assert steps > 0
    assert not (out / ".vmafs-live.nbd").exists()
    assert _sha256(source.archive) == source.sha256


def _read(image: Path, tmp: Path) -> bytes:
    raw = tmp / (image.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", image, raw],
                   check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def test_live_restore_guest_runs_and_writes(guest: gi.Guest, source: Source,
                                            tmp_path: Path) -> None:
    _live_restore(guest, source, tmp_path, kill=False)


def test_live_restore_killed_and_resumed(guest: gi.Guest, source: Source,
                                         tmp_path: Path) -> None:
    _live_restore(guest, source, tmp_path, kill=True)


def test_live_restore_refusals(source: Source, tmp_path: Path) -> None:
    """Bad input is one line and a non-zero exit; existing targets are never replaced."""
    def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmafs", "restore", *map(str, args)],
                              capture_output=True, text=True, env=_env(), timeout=60)

    out = tmp_path / "out"
    r = run("--live", source.archive, "--to", out)
    assert r.returncode == 2 and "--qmp" in r.stderr and "Traceback" not in r.stderr
    r = run("--live", "--force", source.archive, "--to", out, "--qmp", tmp_path / "q")
    assert r.returncode == 2
    out.mkdir()
    (out / "disk-drive-virtio1.qcow2").symlink_to(tmp_path / "elsewhere")
    r = run("--live", source.archive, "--to", out, "--qmp", tmp_path / "q")
    assert r.returncode == 1 and "exists" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(out)) == ["disk-drive-virtio1.qcow2"]
    r = run("--live", "--resume", source.archive, "--to", tmp_path / "none", "--qmp",
            tmp_path / "q")
    assert r.returncode == 1 and "nothing to resume" in r.stderr
    assert _sha256(source.archive) == source.sha256


def test_target_names_its_backing_while_holes_are_marked(tmp_path: Path) -> None:
    """A target file that exists always names the export as its backing (a SIGKILL between
    its creation and the hole marking must not leave one --resume takes for finished), and
    the holes are marked as zero clusters without reaching the export."""
    from vmafs.restore import live

    target = tmp_path / "t.qcow2"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        spec = live.backing_spec(str(tmp_path / "nobody.sock"), "drive-scsi0", 5)
        live.create_target(fd, 1 << 40, spec)
        assert _backing(target) == spec
        live._mark_holes(fd, [(0, 1 << 30), (2 << 30, 1 << 30)])
    finally:
        os.close(fd)
    assert _backing(target) == spec
    image = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                  "file": {"driver": "file", "filename": str(target)}})
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", image],
                                        check=True, capture_output=True, text=True).stdout)
    marked = [(e["start"], e["length"]) for e in extents if e["present"] and e["zero"]]
    assert marked == [(0, 1 << 30), (2 << 30, 1 << 30)]
