"""Incremental live backups of a real guest: chains that extract and mount exactly as the disks
were at each backup, bitmaps across a restart, and failed incrementals that lose nothing.

The writer guest's writes are replayable (guest_replay): from the images before boot and the
counters an archive holds, the exact disk content at its point in time is known.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import guest_replay as gr
import guestimage as gi
import pytest
import trio
from conftest import fuse_missing
from test_backup import (
    ROOT,
    Lab,
    assert_no_archive,
    check_archive,
    env,
    one_line_error,
    run_vmafs,
    temp_sizes,
    vmafs_cmd,
)

from vmafs.archive.chain import open_chain
from vmafs.backup.live import Backup, BackupError, BackupOptions, run_backup
from vmafs.format import chain

MiB = 1 << 20
PATTERN = (16 * MiB, 16 * MiB)  # host-side write on disk a (outside the guest's region)


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


def backup(lab: Lab, out: Path, *extra: str) -> dict[str, Any]:
    res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out), "--json", *extra)
    assert res.returncode == 0, res.stderr
    summary: dict[str, Any] = json.loads(res.stdout)
    summary["stderr"] = res.stderr
    return summary


def images(path: Path, dest: Path) -> list[bytes]:
    res = run_vmafs("extract", str(path), str(dest))
    assert res.returncode == 0, res.stderr
    return [(dest / f"disk-drive-virtio{i}.raw").read_bytes() for i in (0, 1)]


def assert_point_in_time(got: list[bytes], bases: list[bytes]) -> int:
    counters = [gi.parse_counter(img[:gi.RECORD_SIZE], 0) for img in got]
    return gr.assert_state(got[0], got[1], bases[0], bases[1], counters[0], counters[1])


def mounted_images(path: Path, mnt: Path) -> list[bytes]:
    mnt.mkdir()
    res = run_vmafs("mount", str(path), str(mnt))
    assert res.returncode == 0, res.stderr
    try:
        return [(mnt / f"disk-drive-virtio{i}.raw").read_bytes() for i in (0, 1)]
    finally:
        subprocess.run(vmafs_cmd("umount", str(mnt)), cwd=ROOT, env=env(), check=True)


def our_bitmaps(lab: Lab) -> dict[str, list[str]]:
    return {n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps") or []
                                   if b["name"].startswith("vmafs-"))
            for n in lab.vm.qmp("query-named-block-nodes")
            if n["node-name"] in ("node-virtio1",) or n.get("drv") == "qcow2"}


def more_writes(lab: Lab, n: int = 200) -> None:
    """Let the guest write on (a guard against a stalled guest, not a timing check)."""
    lab.vm.wait_for(f"VMAFS-COUNT {lab.counters() + n}", timeout=120)


def quit_cleanly(lab: Lab) -> None:
    lab.vm.qmp("stop")
    lab.vm.qmp("quit")
    assert lab.vm.wait_exit(timeout=60) == 0


def restart(lab: Lab) -> None:
    lab.vm.start()
    lab.vm.wait_for("VMAFS-READY", timeout=120)
    lab.vm.wait_for("VMAFS-COUNT", timeout=60)


def test_chain_of_five_then_restart(guest: gi.Guest, tmp_path: Path) -> None:
    """Full + 4 incrementals (.vma and .vma.zst) while the guest writes; each one extracts and
    mounts as the disks were; after a clean restart the qcow2 bitmap is still there, the raw
    one is not (a clear error, then --full-if-needed); after QEMU is killed the qcow2 one is
    inconsistent (refused). A third, idle disk is a qcow2 v2 file, which cannot store a
    bitmap: its bitmaps live in memory, like the raw disk's."""
    old = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(old),
                    "8M"], check=True)
    lab = Lab(guest, tmp_path, extra=[gi.Disk(old, dev_id="virtio2")])
    bases = lab.sources()
    store = tmp_path / "chain"
    store.mkdir()
    names = ["full.vma", "i1.vma.zst", "i2.vma", "i3.vma.zst", "i4.vma"]
    paths = [store / n for n in names]
    with lab:
        for i, path in enumerate(paths):
            more_writes(lab)
            summary = backup(lab, path, *(["--incremental", str(paths[i - 1])] if i else []))
            assert summary["incremental"] == bool(i)
        lab.assert_untouched()
        last = chain.bitmap_name(open_chain(str(paths[-1])).uuid)
        assert all(found == [last] for found in our_bitmaps(lab).values()), our_bitmaps(lab)
        quit_cleanly(lab)
        second = lab.sources()  # the disks at the restart: the guest's writer starts over
        restart(lab)
        bitmaps = our_bitmaps(lab)
        assert sorted(bitmaps.values()) == [[], [], [last]], bitmaps  # the qcow2 v3 one stays
        after = store / "after-restart.vma"
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(after),
                        "--incremental", str(paths[-1]))
        assert res.returncode != 0
        line = one_line_error(res.stderr)
        assert "drive-virtio1" in line and "restarted" in line and "--full-if-needed" in line
        assert_no_archive(after)
        more_writes(lab)
        summary = backup(lab, after, "--incremental", str(paths[-1]), "--full-if-needed")
        assert "drive-virtio1" in summary["stderr"] and "whole" in summary["stderr"]
        lab.assert_untouched()
        # QEMU killed while the qcow2 bitmap (stored at a clean quit) is loaded: it comes back
        # marked inconsistent, and is refused
        quit_cleanly(lab)
        restart(lab)
        lab.vm.kill()
        restart(lab)
        res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(store / "after-crash.vma"),
                        "--incremental", str(after))
        assert res.returncode != 0
        line = one_line_error(res.stderr)
        assert "disk drive-virtio0: dirty bitmap" in line and "inconsistent" in line, line
        assert_no_archive(store / "after-crash.vma")
    stored = []
    for i, path in enumerate(paths):
        got = images(path, tmp_path / f"x{i}")
        assert_point_in_time(got, bases)
        if fuse_missing() is None:
            assert mounted_images(path, tmp_path / f"m{i}") == got
        with open_chain(str(path)) as arc:
            assert len(arc.layers) == i + 1
            stored.append(sum(arc.layers[-1].stored_bytes(d.dev_id) for d in arc.devices))
    # the guest writes only its 8 MiB region: every incremental holds a part of that
    assert all(s <= 2 * gi.WRITE_REGION for s in stored[1:]) and stored[0] > 3 * gi.WRITE_REGION
    merged = tmp_path / "merged.vma"
    res = run_vmafs("merge", "-o", str(merged), str(paths[-1]))
    assert res.returncode == 0, res.stderr
    names = sorted(f"drive-virtio{i}" for i in range(3))
    with open_chain(str(merged)) as arc:
        order = [d.name for d in arc.devices]
    assert sorted(order) == names
    check_archive(merged, order, plain=True)  # verify, dissect, every cluster once
    assert images(merged, tmp_path / "x-merged") == images(paths[-1], tmp_path / "x-newest")
    got = images(after, tmp_path / "x-after")
    assert_point_in_time(got, second)
    with open_chain(str(after)) as arc:
        newest = arc.layers[-1]
        ids = {d.name: d.dev_id for d in newest.devices}
        assert newest.stored_bytes(ids["drive-virtio0"]) <= gi.WRITE_REGION  # incremental
        assert newest.stored_bytes(ids["drive-virtio1"]) >= 24 * MiB         # copied whole


def dirty_disk_a(lab: Lab, bases: list[bytes], byte: int) -> list[bytes]:
    """Write a pattern through QEMU's block layer (HMP qemu-io on the -drive), outside the
    guest's region: the bitmap counts it, and the bases (the replay's start) get it too."""
    offset, length = PATTERN
    lab.vm.qmp("human-monitor-command", **{
        "command-line": f'qemu-io drive-virtio0 "write -P {byte} {offset} {length}"'})
    a = bytearray(bases[0])
    a[offset:offset + length] = bytes([byte]) * length
    return [bytes(a), bases[1]]


def wait_for_data(out: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not any(size > 256 * 1024 for size in temp_sizes(out)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            pytest.fail("the backup wrote no data")
        time.sleep(0.02)


class CancelledByQemu(Backup):
    """A backup whose first QEMU job is cancelled through QMP once the jobs run (as an
    operator's block-job-cancel would)."""

    async def _wait_jobs(self, qmp: Any) -> None:
        await trio.sleep(0.5)
        await qmp.execute("block-job-cancel", {"device": self._st.jobs[0].job_id, "force": True})
        await super()._wait_jobs(qmp)


def cancelled_in_process(lab: Lab, out: Path, prev: Path) -> BackupError:
    job = CancelledByQemu(BackupOptions(lab.qmp, str(out), incremental=str(prev),
                                        progress=False, speed=1 * MiB))
    with pytest.raises(BackupError) as info:
        trio.run(run_backup, job)
    return info.value


def test_failed_incrementals_lose_nothing(guest: gi.Guest, tmp_path: Path) -> None:
    """SIGTERM, a cancelled QEMU job and a full file system in the middle of incrementals:
    PREV's bitmaps stay, ours go, and the next incremental from PREV has every change."""
    lab = Lab(guest, tmp_path)
    bases = lab.sources()
    full = tmp_path / "full.vma"
    small = tmp_path / "small"
    small.mkdir()
    with lab:
        backup(lab, full)
        prev_bitmap = chain.bitmap_name(open_chain(str(full)).uuid)
        bases = dirty_disk_a(lab, bases, 0x5A)

        out = tmp_path / "term.vma"
        proc = subprocess.Popen(vmafs_cmd("backup", "--qmp", lab.qmp, "-o", str(out),
                                          "--incremental", str(full), "--bwlimit", "1024"),
                                stderr=subprocess.PIPE, cwd=ROOT, env=env())
        wait_for_data(out, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "interrupted by SIGTERM" in one_line_error(err.decode())
        assert_no_archive(out)
        assert all(b == [prev_bitmap] for b in our_bitmaps(lab).values()), our_bitmaps(lab)

        bases = dirty_disk_a(lab, bases, 0x6B)
        out = tmp_path / "cancel.vma.zst"
        error = cancelled_in_process(lab, out, full)
        assert "cancel" in str(error), error
        assert_no_archive(out)
        assert all(b == [prev_bitmap] for b in our_bitmaps(lab).values()), our_bitmaps(lab)

        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                             capture_output=True, text=True)
        if res.returncode == 0:
            try:
                out = small / "full-fs.vma"
                res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out),
                                "--incremental", str(full))
                assert res.returncode != 0
                assert "no space left on device" in one_line_error(res.stderr)
                assert os.listdir(small) == []
            finally:
                subprocess.run(["umount", str(small)], check=False)
        assert all(b == [prev_bitmap] for b in our_bitmaps(lab).values()), our_bitmaps(lab)
        lab.assert_untouched()

        more_writes(lab)
        good = tmp_path / "good.vma"
        summary = backup(lab, good, "--incremental", str(full))
        assert all(b == [chain.bitmap_name(uuidlib.UUID(summary["uuid"]))]
                   for b in our_bitmaps(lab).values()), our_bitmaps(lab)
        lab.assert_untouched()
        # a new full leaves the chain's bitmap alone, unless told to end older chains
        summary = backup(lab, tmp_path / "full2.vma")
        assert all(len(b) == 2 for b in our_bitmaps(lab).values()), our_bitmaps(lab)
        summary = backup(lab, tmp_path / "full3.vma", "--drop-old-bitmaps")
        assert all(b == [chain.bitmap_name(uuidlib.UUID(summary["uuid"]))]
                   for b in our_bitmaps(lab).values()), our_bitmaps(lab)
    got = images(good, tmp_path / "x")
    assert got[0][PATTERN[0]:PATTERN[0] + 4] == b"\x6b" * 4
    assert_point_in_time(got, bases)
