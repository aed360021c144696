"""The guest never pays for a dead backup: `vmafs backup` killed outright (SIGKILL, full and
incremental, with and without --bwlimit, at random moments) while the guest writes; then what
a dead run left is recognised with certainty and cleaned up by the next backup, and never a
live run's; `vmafs bitmaps`; an incremental's refusals and what it inherits from its parent.

One writer guest serves the whole module (TCG guests boot slowly). Its writes are replayable
(guest_replay), so every archive is checked byte for byte against the disks at its point in
time, which holds only while the guest never saw a write error.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestimage as gi
import pytest
from conftest import assert_one_line_error
from test_backup import (
    ROOT,
    Lab,
    assert_no_archive,
    env,
    one_line_error,
    run_vmafs,
    temp_sizes,
    vmafs_cmd,
)
from test_incremental import assert_point_in_time, images, more_writes

from vmafs.archive import chain as chains
from vmafs.backup.runlock import RunLock
from vmafs.format import chain

MiB = 1 << 20


class KillLab(Lab):
    """The module's guest, and its disks before it booted (the replay's start)."""

    def __init__(self, guest: gi.Guest, tmp: Path) -> None:
        super().__init__(guest, tmp)
        self.bases = self.sources()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillLab]:
    guest = gi.guest_or_skip()
    tmp = tmp_path_factory.mktemp("kill")
    run_dir = tmp / "run"       # this module's lock files, apart from other tests' backups
    old = os.environ.get("VMAFS_RUN_DIR")
    os.environ["VMAFS_RUN_DIR"] = str(run_dir)
    the_lab = KillLab(guest, tmp)
    try:
        with the_lab:
            yield the_lab
    finally:
        if old is None:
            del os.environ["VMAFS_RUN_DIR"]
        else:
            os.environ["VMAFS_RUN_DIR"] = old


def run_dir() -> Path:
    return Path(os.environ["VMAFS_RUN_DIR"])


def backup(lab: Lab, out: Path | str, *extra: str) -> dict[str, Any]:
    res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(out), "--json", *extra)
    assert res.returncode == 0, res.stderr
    summary: dict[str, Any] = json.loads(res.stdout)
    summary["stderr"] = res.stderr
    return summary


def vm_bitmaps(lab: Lab) -> dict[str, list[str]]:
    """The vmafs bitmaps of each disk node."""
    return {n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps") or []
                                   if b.get("name", "").startswith("vmafs-"))
            for n in lab.vm.qmp("query-named-block-nodes")
            if n["drv"] == "qcow2" or n["node-name"] == "node-virtio1"}


def leftovers(lab: Lab) -> list[str]:
    """Jobs, filters and NBD nodes a backup added, and lock files of runs not cleaned up."""
    found = [j["device"] for j in lab.vm.qmp("query-block-jobs")]
    found += [n["node-name"] for n in lab.vm.qmp("query-named-block-nodes")
              if n["drv"] in ("copy-before-write", "nbd") or n["node-name"].startswith("vmafs-")]
    found += [p.name for p in run_dir().glob("*.lock") if held(p)]
    return found


def held(path: Path) -> bool:
    """A lock file still held: its run (or its guard) is at work. One left unlocked (a run
    killed before it touched QEMU) is harmless: the next backup removes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_clean(lab: Lab, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while left := leftovers(lab):
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            pytest.fail(f"still there: {left}")
        time.sleep(0.2)


def kill_at_random(lab: Lab, out: Path, rnd: random.Random, *extra: str) -> bool:
    """Start a backup, SIGKILL it at a random moment (after a random time, or once a random
    amount of data is out); True if it had committed its archive by then."""
    proc = subprocess.Popen(vmafs_cmd("backup", "--qmp", lab.qmp, "-o", str(out), "-q",
                                      *extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=env())
    try:
        if rnd.random() < 0.3:
            time.sleep(rnd.uniform(0.2, 1.5))   # anywhere, from connecting to QMP on
        else:
            want = rnd.randrange(64 * 1024, 4 * MiB)
            deadline = time.monotonic() + 60
            while proc.poll() is None and not any(size > want for size in temp_sizes(out)):
                if time.monotonic() > deadline:  # a hang guard, not a speed check
                    pytest.fail("the backup wrote no data")
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return out.exists()


def test_sigkill_never_fails_the_guest(lab: KillLab, tmp_path: Path) -> None:
    """Eight kills, full and incremental, with and without --bwlimit: no guest write fails,
    nothing of the run stays (its bitmap neither; PREV's keeps every change), and the next
    incremental from the last good archive is exact."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    store = tmp_path / "store"
    store.mkdir()
    good = store / "full.vma"
    backup(lab, good)
    wait_clean(lab)
    cases = [(incremental, bwlimit) for incremental in (False, True)
             for bwlimit in (["--bwlimit", "1024"], [])] * 2
    for n, (incremental, bwlimit) in enumerate(cases):
        before = vm_bitmaps(lab)
        out = store / f"killed{n}.vma"
        extra = [*bwlimit, *(["--incremental", str(good)] if incremental else [])]
        committed = kill_at_random(lab, out, rnd, *extra)
        wait_clean(lab)
        lab.assert_untouched()      # no guest write failed, no job, filter or node
        if committed:               # it finished before the kill: a good archive
            good = out if incremental else good
            continue
        assert not out.exists()     # (its .part stays: nothing removes a killed run's file)
        assert vm_bitmaps(lab) == before, (n, extra)
    more_writes(lab)
    last = store / "next.vma"
    summary = backup(lab, last, "--incremental", str(good))
    assert summary["incremental"]
    lab.assert_untouched()
    uuid = uuidlib.UUID(summary["uuid"])
    assert chain.bitmap_name(uuid) in next(iter(vm_bitmaps(lab).values()))
    assert_point_in_time(images(last, tmp_path / "x"), lab.bases)


def test_refusals_give_the_true_reason(lab: KillLab, tmp_path: Path) -> None:
    """An incremental from an archive a later one continued says so (not "restarted?"); one
    whose chain is broken is refused before QEMU is asked, with the readers' message."""
    store = tmp_path / "store"
    store.mkdir()
    full = store / "full.vma"
    backup(lab, full)
    inc = store / "inc.vma"
    backup(lab, inc, "--incremental", str(full))
    res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(store / "again.vma"),
                    "--incremental", str(full))
    line = one_line_error(res.stderr)
    assert res.returncode == 1
    assert "drive-virtio1" in line and "restarted" not in line, line   # the raw disk
    assert "inc.vma" in line and "moved the bitmap on" in line, line
    assert_no_archive(store / "again.vma")

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(inc, alone / "inc.vma")             # its parent stays behind
    res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(alone / "next.vma"),
                    "--incremental", str(alone / "inc.vma"))
    reader = run_vmafs("list", str(alone / "inc.vma"))
    assert reader.returncode == res.returncode == 3
    assert one_line_error(res.stderr).removeprefix("vmafs backup: ") == \
        reader.stderr.strip().removeprefix("vmafs list: ")
    assert "needs its parent" in res.stderr
    assert_no_archive(alone / "next.vma")
    # with its parent given, it continues
    summary = backup(lab, alone / "next.vma", "--incremental", str(alone / "inc.vma"),
                     "--base", str(full))
    assert summary["incremental"]
    lab.assert_untouched()
    shutil.copy(full, alone / "full.vma")           # so that the chain reads without --base
    assert_point_in_time(images(alone / "next.vma", tmp_path / "x"), lab.bases)


def test_a_backup_in_the_same_second_takes_the_next_name(lab: KillLab, tmp_path: Path) -> None:
    """vzdump names have one-second resolution: a backup started in the second of an archive
    that is there already takes the next second's name; the file there is left alone."""
    from vmafs.archive.naming import vzdump_name

    store = tmp_path / "store"
    store.mkdir()
    now = time.time()
    taken = [store / vzdump_name("101", now + k, False) for k in (0, 1)]
    for path in taken:
        path.write_bytes(b"a user's file")
    out = Path(backup(lab, f"{store}/", "--vmid", "101")["output"])
    assert out not in taken and out.parent == store
    assert all(p.read_bytes() == b"a user's file" for p in taken)


def test_incremental_inherits_the_vm(lab: KillLab, tmp_path: Path) -> None:
    """Without -c/--vmid an incremental takes its parent's VMID and config files; with them
    the new ones win. -o DIR/ writes vzdump's NAME.log beside each archive."""
    conf = tmp_path / "101.conf"
    conf.write_text("name: vm101\nmemory: 256\n")
    store = tmp_path / "store"
    store.mkdir()
    full = Path(backup(lab, f"{store}/", "-c", str(conf))["output"])
    assert full.name.startswith("vzdump-qemu-101-")
    more_writes(lab)
    inc = Path(backup(lab, f"{store}/", "--incremental", str(full))["output"])
    assert inc.name.startswith("vzdump-qemu-101-") and inc != full
    res = run_vmafs("config", str(inc))
    assert res.returncode == 0 and res.stdout == "name: vm101\nmemory: 256\n", res
    log = inc.with_name(inc.name.removesuffix(".vma") + ".log")
    text = log.read_text()
    assert "Starting Backup of VM 101" in text and "incremental" in text
    assert "drive-virtio0" in text and "Finished Backup of VM 101" in text
    other = tmp_path / "other.conf"
    other.write_text("name: renamed\n")
    more_writes(lab)
    newer = Path(backup(lab, f"{store}/", "--incremental", str(inc), "--vmid", "202",
                        "-c", str(other))["output"])
    assert newer.name.startswith("vzdump-qemu-202-")
    res = run_vmafs("config", str(newer))
    assert res.returncode == 0 and res.stdout == "name: renamed\n", res
    lab.assert_untouched()


def test_bitmaps_command(lab: KillLab, tmp_path: Path) -> None:
    """vmafs bitmaps lists what QEMU has, --drop removes one archive's, --drop-all the rest."""
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--drop-all")
    assert res.returncode == 0, res.stderr
    a = uuidlib.UUID(backup(lab, tmp_path / "a.vma")["uuid"])
    b = uuidlib.UUID(backup(lab, tmp_path / "b.vma")["uuid"])
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--json")
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["bitmaps"]
    assert sorted((e["disk"], e["archive"]) for e in found) == sorted(
        (d, str(u)) for d in ("drive-virtio0", "drive-virtio1") for u in (a, b))
    assert {e["disk"]: e["persistent"] for e in found} == {"drive-virtio0": True,
                                                           "drive-virtio1": False}
    assert all(e["recording"] and e["state"] is None for e in found)
    text = run_vmafs("bitmaps", "--qmp", lab.qmp)
    assert text.returncode == 0 and text.stdout.count(chain.bitmap_name(a)) == 2, text.stdout
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--drop", str(a))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("dropped") == 2
    assert all(names == [chain.bitmap_name(b)] for names in vm_bitmaps(lab).values())
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--drop", str(a))
    assert_one_line_error(res.returncode, res.stderr, "no bitmap", chain.bitmap_name(a))
    assert res.returncode == 1
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--drop", "nope")
    assert_one_line_error(res.returncode, res.stderr, "not an archive uuid")
    assert res.returncode == 2
    res = run_vmafs("bitmaps", "--qmp", lab.qmp, "--drop-all", "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)["dropped"]) == 2
    assert all(names == [] for names in vm_bitmaps(lab).values())
    assert run_vmafs("bitmaps", "--qmp", lab.qmp).stdout == "no vmafs bitmaps\n"


def test_a_live_runs_objects_are_never_touched(lab: KillLab, tmp_path: Path) -> None:
    """A node whose run holds its lock is a live backup's: refused, left alone. Once the lock
    can be taken, the next backup removes it (and the run's recorded bitmap)."""
    holder = RunLock(lab.qmp, "0123456789")
    node = "vmafs-0123456789-t0"
    lab.vm.qmp("blockdev-add", driver="null-co", **{"node-name": node}, size=MiB)
    orphan = chain.bitmap_name(uuidlib.uuid4())
    lab.vm.qmp("block-dirty-bitmap-add", node="node-virtio1", name=orphan, granularity=65536)
    holder.record.bitmap = orphan
    holder.write()
    res = run_vmafs("backup", "--qmp", lab.qmp, "-o", str(tmp_path / "x.vma"))
    assert res.returncode == 1
    assert f"another vmafs backup (pid {os.getpid()}) is running" in one_line_error(res.stderr)
    assert node in [n["node-name"] for n in lab.vm.qmp("query-named-block-nodes")]
    listed = json.loads(run_vmafs("bitmaps", "--qmp", lab.qmp, "--json").stdout)["bitmaps"]
    assert [e["state"] for e in listed if e["name"] == orphan] == [
        f"started by a running backup (pid {os.getpid()})"]
    holder.abandon()            # the run dies: its lock file stays, unlocked
    listed = json.loads(run_vmafs("bitmaps", "--qmp", lab.qmp, "--json").stdout)["bitmaps"]
    assert [e["state"] for e in listed if e["name"] == orphan] == ["left by a killed backup"]
    summary = backup(lab, tmp_path / "x.vma")
    assert f"deleted node {node}" in summary["stderr"]
    assert f"removed bitmap {orphan}" in summary["stderr"]
    assert orphan not in vm_bitmaps(lab)["node-virtio1"]
    wait_clean(lab)
    lab.assert_untouched()


def test_guard_killed_too(lab: KillLab, tmp_path: Path) -> None:
    """vmafs and its guard both killed (an OOM kill of the whole service): nothing serves QEMU
    until the next backup, which serves the dead run's sockets, cleans up and succeeds; guest
    writes waiting longer than reconnect-delay would fail, so errors are allowed. Last in the
    module: the guest's writer restarts after an error, which ends exact replays."""
    full = tmp_path / "full.vma"
    backup(lab, full)
    before = vm_bitmaps(lab)
    # megabytes to copy at 1 MiB/s, so the kill lands mid-copy: an incremental of what the
    # guest wrote in the moment since the full, ~100 KiB, had committed by then in one CI run
    more_writes(lab)
    out = tmp_path / "killed.vma"
    proc = subprocess.Popen(vmafs_cmd("backup", "--qmp", lab.qmp, "-o", str(out), "-q",
                                      "--bwlimit", "1024", "--incremental", str(full)),
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=env())
    deadline = time.monotonic() + 60
    while not any(size > 64 * 1024 for size in temp_sizes(out)):
        assert proc.poll() is None
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            pytest.fail("the backup wrote no data")
        time.sleep(0.02)
    guards = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
              and _ppid(p) == proc.pid]
    assert guards, "no guard process"
    for pid in guards:
        os.kill(pid, signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run committed before the kill: the test needs more to copy"
    assert leftovers(lab)       # jobs or nodes, and the lock file
    more = backup(lab, tmp_path / "next.vma", "--incremental", str(full))
    assert "cleaned up after a killed backup" in more["stderr"]
    wait_clean(lab)
    lab.assert_untouched(guest_errors_ok=True)
    ours, prev = (chain.bitmap_name(uuidlib.UUID(more[k])) for k in ("uuid", "parent"))
    assert vm_bitmaps(lab) == {node: sorted({*names, ours} - {prev})
                               for node, names in before.items()}
    with chains.open_chain(str(tmp_path / "next.vma")) as arc:
        assert len(arc.layers) == 2


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
