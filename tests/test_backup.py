"""`vmafs backup`: disk selection on recorded QMP JSON, then live backups of a real guest.

The live tests boot a tiny Linux guest (TCG) whose `writer` workload writes a counter to
both disks, in order, and scribbles inside a known region, all through the backup.  Each
failure (signals, full file system, QEMU killed, NBD dropped, stalled output, a busy disk)
is injected for real, and every test ends by checking that the VM is as we found it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import guestimage as gi
import numpy as np
import pytest
import trio
from test_cli_consistency import undocumented_json_keys

from vmafs.archive import walk
from vmafs.archive.reader import Archive
from vmafs.backup import blockgraph
from vmafs.backup.blockgraph import Disk, SelectionError
from vmafs.backup.live import Backup, BackupError, BackupOptions, run_backup
from vmafs.backup.qmp import has_member, open_qmp
from vmafs.format import vma

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
CLUSTER = vma.CLUSTER_SIZE

# --- recorded QMP answers (QEMU 7.2: -drive id=drive-scsi0 + virtio-blk id=scsi0, -blockdev
#     bdisk + virtio-blk id=virtio1, an anonymous virtio-blk on cdisk, an IDE CD-ROM with and
#     without medium, a read-only -drive) -------------------------------------------------------


def _inserted(node: str, size: int, ro: bool = False) -> dict[str, Any]:
    return {"node-name": node, "ro": ro, "drv": "raw",
            "image": {"virtual-size": size, "format": "raw"}}


RECORDED_BLOCKS: list[dict[str, Any]] = [
    {"device": "drive-scsi0", "removable": False, "type": "unknown",
     "qdev": "/machine/peripheral/scsi0/virtio-backend",
     "inserted": _inserted("#block118", 67108864)},
    {"device": "drive-ide2", "removable": True, "tray_open": False, "type": "unknown",
     "qdev": "ide2", "inserted": _inserted("#block323", 1048576, ro=True)},
    {"device": "drive-ide3", "removable": True, "tray_open": False, "type": "unknown",
     "qdev": "ide3"},
    {"device": "rodisk", "removable": False, "type": "unknown",
     "qdev": "/machine/peripheral/virtio5/virtio-backend",
     "inserted": _inserted("#block517", 16777216, ro=True)},
    {"device": "", "removable": False, "type": "unknown",
     "qdev": "/machine/peripheral/virtio1/virtio-backend",
     "inserted": _inserted("bdisk", 33554432)},
    {"device": "", "removable": False, "type": "unknown",
     "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
     "inserted": _inserted("cdisk", 16777216)},
]
RECORDED_NODES = [
    {"node-name": n, "drv": d, "ro": ro, "image": {"virtual-size": s}}
    for n, d, ro, s in [
        ("#block517", "raw", True, 16777216), ("#block496", "file", True, 16777216),
        ("#block323", "raw", True, 1048576), ("#block246", "file", True, 1048576),
        ("#block118", "qcow2", False, 67108864), ("#block050", "file", False, 197120),
        ("cdisk", "raw", False, 16777216), ("cfile", "file", False, 16777216),
        ("bdisk", "raw", False, 33554432), ("bfile", "file", False, 33554432),
    ]
]
RECORDED_TYPES = {
    "/machine/peripheral/scsi0/virtio-backend": "virtio-blk-device",
    "ide2": "ide-cd",
    "/machine/peripheral/virtio5/virtio-backend": "virtio-blk-device",
    "/machine/peripheral/virtio1/virtio-backend": "virtio-blk-device",
    "/machine/peripheral-anon/device[0]/virtio-backend": "virtio-blk-device",
}
# query-qmp-schema, the parts that matter (type names are masked numbers in QEMU 7.2)
RECORDED_SCHEMA = [
    {"name": "blockdev-backup", "ret-type": "0", "meta-type": "command", "arg-type": "31"},
    {"name": "31", "meta-type": "object", "members": [
        {"name": "job-id", "default": None, "type": "str"},
        {"name": "device", "type": "str"},
        {"name": "x-perf", "default": None, "type": "282", "features": ["unstable"]},
        {"name": "target", "type": "str"}]},
    {"name": "282", "meta-type": "object", "members": [
        {"name": "use-copy-range", "default": None, "type": "bool"},
        {"name": "max-workers", "default": None, "type": "int"},
        {"name": "max-chunk", "default": None, "type": "int"}]},
    {"name": "str", "json-type": "string", "meta-type": "builtin"},
]


def test_device_id_from_qdev() -> None:
    assert blockgraph.device_id("/machine/peripheral/scsi0/virtio-backend") == "scsi0"
    assert blockgraph.device_id("ide2") == "ide2"
    assert blockgraph.device_id("/machine/peripheral-anon/device[0]/virtio-backend") is None
    assert blockgraph.device_id("") is None


def test_default_selection_on_recorded_json() -> None:
    disks = blockgraph.select_disks(RECORDED_BLOCKS, RECORDED_NODES, RECORDED_TYPES)
    assert disks == [
        Disk("drive-scsi0", "#block118", 67108864),   # -drive id=drive-… kept as it is
        Disk("drive-virtio1", "bdisk", 33554432),     # -blockdev + -device id=virtio1
        Disk("drive-cdisk", "cdisk", 16777216),       # no device id: the node name
    ]                                                 # CD-ROMs and read-only drives left out


def test_explicit_selection_on_recorded_json() -> None:
    sel = blockgraph.select_disks(
        RECORDED_BLOCKS, RECORDED_NODES, RECORDED_TYPES,
        [("virtio1", None), ("drive-scsi0", "drive-virtio0"), ("rodisk", None),
         ("cfile", None)])
    assert sel == [
        Disk("drive-virtio1", "bdisk", 33554432),      # by -device id
        Disk("drive-virtio0", "#block118", 67108864),  # by -drive id, renamed
        Disk("drive-virtio5", "#block517", 16777216),  # read-only, but asked for
        Disk("drive-cfile", "cfile", 16777216),        # any named node
    ]
    assert blockgraph.select_disks(RECORDED_BLOCKS, RECORDED_NODES, RECORDED_TYPES,
                                   [("bdisk", None)])[0].name == "drive-virtio1"
    for wanted, msg in [
        ([("drive-ide2", None)], "CD-ROM"),
        ([("drive-ide3", None)], "no medium"),
        ([("nope", None)], "no drive or node named 'nope'"),
        ([("bdisk", "a b")], "bad device name"),
        ([("bdisk", None), ("virtio1", "x")], "selected twice"),
        ([("bdisk", "d"), ("cdisk", "d")], "both be named"),
    ]:
        with pytest.raises(SelectionError, match=msg):
            blockgraph.select_disks(RECORDED_BLOCKS, RECORDED_NODES, RECORDED_TYPES, wanted)


def test_selection_errors_and_jobs() -> None:
    only_cd = [b for b in RECORDED_BLOCKS if b["device"].startswith("drive-ide")]
    with pytest.raises(SelectionError, match="no writable disk"):
        blockgraph.select_disks(only_cd, [], RECORDED_TYPES)
    blockgraph.check_no_jobs([])
    with pytest.raises(SelectionError, match="another block job is running: m0 \\(mirror\\)"):
        blockgraph.check_no_jobs([{"device": "m0", "type": "mirror"}])
    nodes = [*RECORDED_NODES, {"node-name": "f", "drv": "copy-before-write"},
             {"node-name": "vmafs-x-t0", "drv": "nbd"}]
    assert blockgraph.leftovers(nodes, ["vmafs-x-t0"]) == ["f", "vmafs-x-t0"]


def test_schema_probe_on_recorded_json() -> None:
    assert has_member(RECORDED_SCHEMA, "blockdev-backup", "x-perf", "max-workers")
    assert has_member(RECORDED_SCHEMA, "blockdev-backup", "x-perf")
    assert not has_member(RECORDED_SCHEMA, "blockdev-backup", "x-perf", "nope")
    assert not has_member(RECORDED_SCHEMA, "drive-backup", "x-perf")
    assert not has_member(RECORDED_SCHEMA[:1], "blockdev-backup", "x-perf")


# --- live guest helpers -------------------------------------------------------------------------

DISK_SIZE = 48 * MiB
FILL = (16 * MiB, 40 * MiB)          # random data outside the guest's write region
BIG_SIZE = 160 * MiB                  # failure tests: more data than the sink's queue holds
BIG_FILL = (16 * MiB, 144 * MiB)


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


def make_disk(path: Path, size: int, fill: tuple[int, int], fmt: str, seed: int) -> Path:
    """A disk with pseudo-random data in `fill` and holes elsewhere (qcow2 via qemu-img)."""
    raw = path.with_suffix(".src.raw") if fmt != "raw" else path
    rnd = np.random.default_rng(seed)
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(fill[0])
        f.write(rnd.integers(0, 256, fill[1] - fill[0], dtype=np.uint8).tobytes())
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, raw, path],
                       check=True)
        raw.unlink()
    return path


def read_image(path: Path, fmt: str) -> bytes:
    if fmt == "raw":
        return path.read_bytes()
    out = path.with_suffix(".check.raw")
    subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", path, out], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


class Lab:
    """A running writer guest with two virtio disks: drive-virtio0 (-drive, qcow2) and
    drive-virtio1 (-blockdev, raw)."""

    def __init__(self, guest: gi.Guest, tmp: Path, *, size: int = DISK_SIZE,
                 fill: tuple[int, int] = FILL, mode: str = "writer", qga: bool = False,
                 extra: list[gi.Disk] | None = None) -> None:
        self.tmp = tmp
        self.a = make_disk(tmp / "a.qcow2", size, fill, "qcow2", 1)
        self.b = make_disk(tmp / "b.raw", size, fill, "raw", 2)
        self.disks = [gi.Disk(self.a, fmt="qcow2"),
                      gi.Disk(self.b, fmt="raw", style="blockdev"), *(extra or [])]
        self.vm = gi.QemuVM(kernel=guest.kernel, initrd=guest.initrd,
                            append=guest.cmdline(mode), disks=self.disks, qga=qga)
        self.mode = mode

    def __enter__(self) -> Lab:
        for attempt in range(3):
            self.vm.start()
            try:
                self.vm.wait_for("VMAFS-READY", timeout=120)
                if self.mode == "writer":
                    self.vm.wait_for("VMAFS-COUNT", timeout=60)
                if self.vm.qga_path is not None:
                    # qemu-ga sometimes does not come up in the tiny guest: boot again.
                    self.vm.wait_for_agent(timeout=20 if attempt < 2 else 60)
                return self
            except gi.GuestError:
                self.vm.stop(timeout=5)
                if attempt == 2:
                    self.vm.close()
                    raise
            except BaseException:
                self.vm.close()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.vm.close()

    @property
    def qmp(self) -> str:
        return str(self.vm.qmp_path)

    def assert_untouched(self, *, guest_errors_ok: bool = False) -> None:
        """The VM runs, no job, no copy-before-write filter, no nbd node is left."""
        assert self.vm.running()
        assert self.vm.qmp("query-block-jobs") == []
        drvs = {n["node-name"]: n["drv"] for n in self.vm.qmp("query-named-block-nodes")}
        assert not [n for n, d in drvs.items() if d in ("copy-before-write", "nbd")], drvs
        assert not [n for n in drvs if n.startswith("vmafs-")], drvs
        assert self.vm.qmp("query-status")["status"] == "running"
        if not guest_errors_ok:
            assert "VMAFS-ERROR" not in self.vm.serial()   # no guest write failed

    def counters(self) -> int:
        """The guest's current counter (from the serial log), to see it kept writing."""
        counts = [int(m) for m in re.findall(r"VMAFS-COUNT (\d+)", self.vm.serial())]
        return counts[-1] if counts else 0

    def sources(self) -> list[bytes]:
        """Both images' bytes; call after the VM stopped."""
        return [read_image(self.a, "qcow2"), read_image(self.b, "raw")]


def vmafs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmafs", *args]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def run_vmafs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vmafs_cmd(*args), capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=timeout)


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmafs backup: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def temp_files(path: Path) -> list[Path]:
    """The writer's temporary files for path (.NAME.XXXXXX.part)."""
    return list(path.parent.glob(f".{path.name}.*.part"))


def temp_sizes(path: Path) -> list[int]:
    """The sizes of path's temporary files; one renamed or removed between the listing and
    its stat (the run committed, or gave up, just then) is passed over, not an error."""
    sizes = []
    for p in temp_files(path):
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:
            continue
    return sizes


def assert_no_archive(path: Path) -> None:
    assert not path.exists()
    assert not temp_files(path)


def check_archive(path: Path, names: list[str], *, plain: bool) -> Archive:
    """vmafs verify passes; dissect.archive reads the same bytes; plain: each cluster once."""
    res = run_vmafs("verify", str(path))
    assert res.returncode == 0, res.stderr
    arc = Archive.open(str(path))
    assert [d.name for d in arc.devices] == names
    if plain:
        with open(path, "rb") as f:
            header = walk.read_header(f)
            seen = {d.dev_id: np.zeros(d.clusters, np.int64) for d in header.devices}
            for ext, _data in walk.iter_stream(f, header):
                for dev_id, cluster in zip(ext.dev_ids.tolist(), ext.clusters.tolist(),
                                           strict=True):
                    seen[dev_id][cluster] += 1
        for dev_id, counts in seen.items():
            assert (counts == 1).all(), (dev_id, np.flatnonzero(counts != 1)[:10])
        from dissect.archive.vma import VMA
        with open(path, "rb") as f:
            dis = VMA(f)
            for dev in arc.devices:
                stream = dis.device(dev.dev_id).open()
                for off in range(0, dev.size, 8 * MiB):
                    n = min(8 * MiB, dev.size - off)
                    stream.seek(off)
                    assert stream.read(n) == arc.read(dev.dev_id, off, n), (dev.name, off)
    return arc


def check_consistent(arc: Archive, sources: list[bytes]) -> tuple[int, int]:
    """Counters of both disks are from one instant; untouched clusters equal the source."""
    a = gi.parse_counter(arc.read(1, 0, gi.RECORD_SIZE), 0)
    b = gi.parse_counter(arc.read(2, 0, gi.RECORD_SIZE), 0)
    assert a is not None and b is not None
    assert b in (a, a - 1), (a, b)
    for dev_id, src in enumerate(sources, start=1):
        size = len(src)
        for off in range(gi.WRITE_REGION, size, 4 * MiB):
            n = min(4 * MiB, size - off)
            assert arc.read(dev_id, off, n) == src[off:off + n], (dev_id, off)
    return a, b


# --- live: disk selection and successful backups ------------------------------------------------


def test_blockgraph_on_live_qemu(guest: gi.Guest, tmp_path: Path) -> None:
    ro = gi.create_disk(tmp_path / "ro.raw", 4 * MiB, "raw")
    extra = [gi.Disk(ro, fmt="raw", readonly=True, dev_id="virtio7"),
             gi.Disk(ro, fmt="raw", media="cdrom", dev_id="ide2")]
    with Lab(guest, tmp_path, mode="idle", extra=extra) as lab:

        async def probe() -> list[Disk]:
            async with open_qmp(lab.qmp) as qmp:
                blocks = await qmp.execute("query-block")
                nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
                types = {p: await qmp.execute("qom-get", {"path": p, "property": "type"})
                         for p in blockgraph.type_queries(blocks)}
                schema = await qmp.schema()
                for member in ("max-workers", "max-chunk"):   # what a backup sets
                    assert has_member(schema, "blockdev-backup", "x-perf", member)
                return blockgraph.select_disks(blocks, nodes, types)

        disks = trio.run(probe)
        assert disks == [Disk("drive-virtio0", disks[0].node, DISK_SIZE),
                         Disk("drive-virtio1", "node-virtio1", DISK_SIZE)]
        lab.assert_untouched()


def test_backup_is_consistent_vma(guest: gi.Guest, tmp_path: Path) -> None:
    out = tmp_path / "vm.vma"
    conf = tmp_path / "100.conf"
    conf.write_text("name: test\n")
    with Lab(guest, tmp_path) as lab:
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out), "-c", str(conf), "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["x_perf"] is True
        assert [d["name"] for d in summary["devices"]] == ["drive-virtio0", "drive-virtio1"]
        assert summary["ok"] and summary["output"] == str(out)
        assert summary["device_bytes"] == sum(d["device_bytes"] for d in summary["devices"])
        assert 0 < summary["copied_bytes"] <= summary["device_bytes"]
        assert summary["archive_bytes"] == out.stat().st_size
        assert not undocumented_json_keys("backup", summary)
        before = lab.counters()
        lab.vm.wait_for(f"VMAFS-COUNT {before + 200}", timeout=60)  # the guest goes on writing
        lab.assert_untouched()
        lab.vm.stop()
        sources = lab.sources()
    arc = check_archive(out, ["drive-virtio0", "drive-virtio1"], plain=True)
    assert dict(arc.configs) == {"qemu-server.conf": b"name: test\n"}  # as Proxmox names it
    check_consistent(arc, sources)


def test_backup_zstd_and_stdout(guest: gi.Guest, tmp_path: Path) -> None:
    zst = tmp_path / "vm.vma.zst"
    piped = tmp_path / "piped.vma"
    with Lab(guest, tmp_path) as lab:
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(zst), "--level", "5",
                        "--threads", "2", "-q")
        assert res.returncode == 0, res.stderr
        lab.assert_untouched()
        with open(piped, "wb") as f:
            proc = subprocess.run(vmafs_cmd("backup", "--qmp", lab.qmp, "-o", "-", "--json",
                                            "--drive", "node-virtio1=drive-scsi1"),
                                  stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stderr)["devices"][0]["name"] == "drive-scsi1"
        lab.assert_untouched()
        lab.vm.stop()
        sources = lab.sources()
    check_consistent(check_archive(zst, ["drive-virtio0", "drive-virtio1"], plain=False),
                     sources)
    arc = check_archive(piped, ["drive-scsi1"], plain=True)
    assert arc.read(1, FILL[0], FILL[1] - FILL[0]) == sources[1][FILL[0]:FILL[1]]


def test_qga_freeze_and_thaw(guest: gi.Guest, tmp_path: Path) -> None:
    out = tmp_path / "vm.vma"
    with Lab(guest, tmp_path, qga=True) as lab:
        assert lab.vm.qga_path is not None
        res = run_vmafs("backup", "--qmp", lab.qmp, "--qga", str(lab.vm.qga_path), "-o",
                        str(out), "--json")
        assert res.returncode == 0, res.stderr
        assert isinstance(json.loads(res.stdout)["frozen"], int)   # the freeze ran
        assert lab.vm.qga("guest-fsfreeze-status") == "thawed"
        lab.assert_untouched()

        # The transaction fails inside QEMU after the freeze: thawed all the same.
        lab.vm.qmp("blockdev-add", driver="null-co", **{"node-name": "vmafs-fixed-cbw0"},
                   size=DISK_SIZE)
        job = Backup(BackupOptions(lab.qmp, str(tmp_path / "fail.vma"),
                                   qga_socket=str(lab.vm.qga_path), progress=False))
        job.tag = "fixed"
        with pytest.raises(BackupError, match="Duplicate nodes with node-name"):
            trio.run(run_backup, job)
        assert job.frozen is not None
        assert lab.vm.qga("guest-fsfreeze-status") == "thawed"
        assert_no_archive(tmp_path / "fail.vma")
        lab.vm.qmp("blockdev-del", **{"node-name": "vmafs-fixed-cbw0"})
        lab.assert_untouched()


# --- live: failures -----------------------------------------------------------------------------


class SlowReader(threading.Thread):
    """Reads a child's stdout at a limited rate; `pause()` stops reading entirely."""

    def __init__(self, stream: Any, rate: float) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.rate = rate
        self.total = 0
        self.running = threading.Event()
        self.running.set()
        self.fast = False

    def run(self) -> None:
        while True:
            self.running.wait()
            data = self.stream.read1(64 * 1024)
            if not data:
                return
            self.total += len(data)
            if not self.fast:
                time.sleep(len(data) / self.rate)

    def pause(self) -> None:
        self.running.clear()

    def drain(self) -> None:
        self.fast = True
        self.running.set()

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
        """Drain until the child exits; its stderr."""
        self.drain()
        proc.wait(timeout=timeout)
        self.join(timeout=30)
        assert proc.stderr is not None
        return proc.stderr.read().decode()

    def wait_for(self, nbytes: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.total < nbytes:
            if time.monotonic() > deadline:  # a hang guard, not a speed check
                pytest.fail(f"only {self.total} bytes arrived")
            time.sleep(0.02)


@pytest.fixture()
def big_lab(guest: gi.Guest, tmp_path: Path) -> Iterator[Lab]:
    with Lab(guest, tmp_path, size=BIG_SIZE, fill=BIG_FILL) as lab:
        yield lab


def start_piped(lab: Lab, *extra: str, rate: float = 8 * MiB) -> tuple[subprocess.Popen[bytes],
                                                                         SlowReader]:
    proc = subprocess.Popen(vmafs_cmd("backup", "--qmp", lab.qmp, "-o", "-", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env())
    reader = SlowReader(proc.stdout, rate)
    reader.start()
    return proc, reader


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_backup(big_lab: Lab, sig: signal.Signals) -> None:
    proc, reader = start_piped(big_lab)
    reader.wait_for(4 * MiB)       # the jobs are running: data flows
    proc.send_signal(sig)
    err = reader.finish(proc)
    assert proc.returncode != 0
    assert f"interrupted by {sig.name}" in one_line_error(err)
    big_lab.assert_untouched()


def test_signal_to_file_output(big_lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "sig.vma.zst"
    proc = subprocess.Popen(vmafs_cmd("backup", "--qmp", big_lab.qmp, "-o", str(out),
                                      "--level", "19", "--threads", "1"),
                            stderr=subprocess.PIPE, cwd=ROOT, env=env())
    deadline = time.monotonic() + 60
    while not any(size > 64 * 1024 for size in temp_sizes(out)):
        assert proc.poll() is None
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            pytest.fail("the backup wrote no data")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted by SIGTERM" in one_line_error(err.decode())
    assert_no_archive(out)
    big_lab.assert_untouched()


def test_full_filesystem(big_lab: Lab, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        out = mnt / "vm.vma"
        res = run_vmafs("backup", "--qmp", big_lab.qmp, "-o", str(out))
        assert res.returncode != 0
        assert "no space left on device" in one_line_error(res.stderr)
        assert_no_archive(out)
        assert os.listdir(mnt) == []
        big_lab.assert_untouched()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_qemu_dies(big_lab: Lab) -> None:
    proc, reader = start_piped(big_lab)
    reader.wait_for(4 * MiB)
    big_lab.vm.kill()
    err = reader.finish(proc)
    assert proc.returncode != 0
    line = one_line_error(err)
    assert "QEMU" in line or "QMP" in line, line


def test_stalled_output(big_lab: Lab) -> None:
    proc, reader = start_piped(big_lab, "--stall-timeout", "2")
    reader.wait_for(1 * MiB)
    reader.pause()                   # the archive's reader stops: the writer thread blocks
    try:
        rc = proc.wait(timeout=120)   # a hang guard, not a timing assertion
    finally:
        err = reader.finish(proc)
    assert rc != 0
    assert "made no progress" in one_line_error(err)
    big_lab.assert_untouched()
    before = big_lab.counters()
    big_lab.vm.wait_for(f"VMAFS-COUNT {before + 100}", timeout=60)   # the guest still writes


def test_nbd_connection_drops(big_lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "drop.vma"
    job = Backup(BackupOptions(big_lab.qmp, str(out), progress=False,
                               queue_bytes=4 * MiB))

    errors: list[BackupError] = []

    async def main() -> None:
        async def dropper() -> None:
            await job.jobs_started.wait()
            job.drop_nbd_connections()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dropper)
            try:
                await run_backup(job)
            except BackupError as exc:
                errors.append(exc)
            finally:
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(errors) == 1
    assert re.search("backup job for drive-virtio.* failed", str(errors[0])), errors
    assert_no_archive(out)
    # Guest writes waiting on a copy-before-write at the moment the sink dies fail (EIO):
    # that is QEMU's behaviour, and why vmafs itself never drops connections but as a last
    # resort.  The VM itself keeps running.
    big_lab.assert_untouched(guest_errors_ok=True)


def test_refuses_while_another_job_runs(guest: gi.Guest, tmp_path: Path) -> None:
    out = tmp_path / "busy.vma"
    with Lab(guest, tmp_path, mode="idle") as lab:
        lab.vm.qmp("blockdev-add", driver="null-co", **{"node-name": "slow"}, size=DISK_SIZE)
        lab.vm.qmp("blockdev-backup", **{"job-id": "other", "device": "node-virtio1",
                                         "target": "slow", "sync": "full", "speed": 1})
        nodes_before = sorted(n["node-name"] for n in lab.vm.qmp("query-named-block-nodes"))
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out))
        assert res.returncode != 0
        assert "another block job is running: other (backup)" in one_line_error(res.stderr)
        assert_no_archive(out)
        assert sorted(n["node-name"] for n in lab.vm.qmp("query-named-block-nodes")) \
            == nodes_before
        lab.vm.qmp("block-job-cancel", device="other", force=True)
        deadline = time.monotonic() + 30
        while lab.vm.qmp("query-block-jobs"):
            if time.monotonic() > deadline:  # a hang guard, not a speed check
                pytest.fail("the other block job did not go away")
            time.sleep(0.1)
        lab.vm.qmp("blockdev-del", **{"node-name": "slow"})
        lab.assert_untouched()


def test_one_tib_empty_disk(guest: gi.Guest, tmp_path: Path) -> None:
    """A 1 TiB sparse qcow2 disk: zeros travel as WRITE_ZEROES, so this is quick."""
    big = gi.create_disk(tmp_path / "huge.qcow2", 1 << 40, "qcow2")
    out = tmp_path / "huge.vma"
    with Lab(guest, tmp_path, mode="idle", extra=[gi.Disk(big, dev_id="virtio5")]) as lab:
        t0 = time.monotonic()
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out), "--drive", "virtio5",
                        "--json", timeout=900)
        elapsed = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        lab.assert_untouched()
    print(f"\n1 TiB empty disk: {elapsed:.1f} s, archive {out.stat().st_size / MiB:.0f} MiB")
    arc = Archive.open(str(out))
    assert arc.devices[0].size == 1 << 40
    assert arc.read(1, (1 << 40) - 4 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert [d["name"] for d in json.loads(res.stdout)["devices"]] == ["drive-virtio5"]


# --- the sink's threaded NBD server, with qemu-img as its client -----------------------------


class _Collect:
    """A BlockingHandler that keeps the image; `gate` (when set) holds every write."""

    def __init__(self, size: int, gate: threading.Event | None = None) -> None:
        self.image = bytearray(size)
        self.zeroed = 0
        self.gate = gate
        self.entered = threading.Event()

    def write(self, offset: int, data: bytes | bytearray) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.image[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.zeroed += length

    def flush(self) -> None:
        pass


def test_threaded_nbd_sink_with_qemu_img(tmp_path: Path) -> None:
    """qemu-img convert into serve_nbd_threads: data as WRITEs, holes as WRITE_ZEROES; then a
    write held in its handler: cancelling the server ends the connection, and the client
    sees it fail instead of waiting forever."""
    from vmafs.backup.nbd_server import serve_nbd_threads

    size = 8 * MiB
    src = tmp_path / "src.raw"
    rng = np.random.default_rng(3)
    with open(src, "wb") as f:
        f.truncate(size)
        for at in (0, 3 * MiB + 4096, size - 64 * 1024):
            f.seek(at)
            f.write(rng.integers(1, 256, 64 * 1024, dtype=np.uint8).tobytes())
    sock = tmp_path / "nbd.sock"  # short enough for a unix socket under pytest's tmp
    convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
               f"nbd+unix:///?socket={sock}"]

    async def copy(handler: _Collect) -> Any:
        async with trio.open_nursery() as nursery:
            stats = await nursery.start(serve_nbd_threads, str(sock), size, handler)
            await trio.run_process(convert, capture_stderr=True)
            nursery.cancel_scope.cancel()
        return stats

    handler = _Collect(size)
    stats = trio.run(copy, handler)
    assert bytes(handler.image) == src.read_bytes()
    assert stats.bytes_written == 3 * 64 * 1024 and stats.errors == 0
    assert stats.bytes_written + handler.zeroed >= size

    gate = threading.Event()
    held = _Collect(size, gate=gate)

    async def cancelled() -> int:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as server:
                await server.start(serve_nbd_threads, str(sock), size, held)
                proc = await nursery.start(partial(trio.run_process, convert, check=False,
                                                   capture_stderr=True))
                await trio.to_thread.run_sync(held.entered.wait)
                server.cancel_scope.cancel()  # the server only: the write is still held
            with trio.fail_after(60):
                code = int(await proc.wait())
            gate.set()
        return code

    assert trio.run(cancelled) != 0  # the client saw its connection end, and gave up
