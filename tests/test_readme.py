"""README "Daily backups: full, incrementals, chains", plain QEMU, as real commands in order.

A writer guest (test_backup.Lab: a qcow2 and a raw disk, both written all the time) is backed
up into a directory: a full archive named by --vmid, then two incrementals, each continuing
the newest archive. Then list (the chain), mount (compared with extract), a rolling full with
merge --keep 1, and prune --dry-run, which keeps what the kept incrementals need.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import guestimage as gi
import pytest
from conftest import fuse_missing
from test_backup import ROOT, Lab, env, run_vmafs, vmafs_cmd

from vmafs.archive import naming

VMID = "101"


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


def ok(*args: str) -> str:
    res = run_vmafs(*args)
    assert res.returncode == 0, f"vmafs {' '.join(args)}: {res.stderr}"
    return res.stdout


def archives(store: Path) -> list[Path]:
    """The vzdump-named archives of the VM, oldest first (the names sort by time)."""
    return sorted(p for p in store.iterdir() if p.name.startswith(f"vzdump-qemu-{VMID}-")
                  and p.name.endswith((".vma", ".vma.zst")))  # not vzdump's NAME.log


def next_second() -> None:
    """Archive names have a one-second resolution: two backups in one second would collide."""
    time.sleep(1.05 - time.time() % 1)


def chain_lines(newest: Path) -> list[str]:
    return [ln for ln in ok("list", str(newest)).splitlines() if ln.startswith("CHAIN: ")]


def test_readme_daily_backups(guest: gi.Guest, tmp_path: Path) -> None:
    if (why := fuse_missing()) is not None:
        pytest.skip(why)
    store = tmp_path / "vm1"
    store.mkdir()
    with Lab(guest, tmp_path) as lab:
        # the full backup, named like vzdump names it
        ok("backup", "--qmp", lab.qmp, "--vmid", VMID, "--zstd", "-q", "-o", f"{store}/")
        [full] = archives(store)
        assert naming.parse_vzdump_name(full.name) is not None and full.name.endswith(".vma.zst")
        # two incrementals, each from the newest archive
        for _ in range(2):
            lab.vm.wait_for(f"VMAFS-COUNT {lab.counters() + 100}", timeout=60)
            next_second()
            newest = archives(store)[-1]
            summary = json.loads(ok("backup", "--qmp", lab.qmp, "--vmid", VMID, "--zstd", "-q",
                                    "-o", f"{store}/", "--incremental", str(newest), "--json"))
            written = archives(store)[-1]  # --json names the file the directory got
            assert summary["output"] == str(written) and summary["incremental"]
            assert summary["archive_bytes"] == written.stat().st_size
        lab.assert_untouched()
    paths = archives(store)
    assert len(paths) == 3
    newest = paths[-1]
    sizes = [p.stat().st_size for p in paths]
    assert max(sizes[1:]) < sizes[0] / 2, sizes  # the incrementals hold only what changed

    # browse the chain
    lines = chain_lines(newest)
    assert len(lines) == 3, lines
    assert [ln.split()[2] for ln in lines] == ["full", "incremental", "incremental"]
    assert [ln.rsplit("file: ", 1)[1] for ln in lines] == [str(p) for p in paths]
    assert "a chain of 3 archives" in ok("verify", "-q", str(newest))
    ok("extract", "-q", str(newest), str(tmp_path / "restore"))
    extracted = {n: (tmp_path / "restore" / n).read_bytes()
                 for n in ("disk-drive-virtio0.raw", "disk-drive-virtio1.raw")}
    a, b = (gi.parse_counter(img[:gi.RECORD_SIZE], 0) for img in extracted.values())
    assert a is not None and b in (a, a - 1)  # both disks from one instant
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok("mount", str(newest), str(mnt))
    try:
        assert {n: (mnt / n).read_bytes() for n in extracted} == extracted
    finally:
        subprocess.run(vmafs_cmd("umount", str(mnt)), cwd=ROOT, env=env(), check=True)

    # a rolling full: the two oldest folded into a new base for the newest increment
    base = store / "base.vma.zst"
    merged = json.loads(ok("merge", "--keep", "1", "-q", "--json", "-o", str(base), str(newest)))
    assert merged["merged"] == [str(p) for p in paths[:2]]
    assert merged["kept"] == [str(newest)]
    lines = chain_lines(newest)  # the newest now resolves onto the base (full archives first)
    assert len(lines) == 2 and lines[0].endswith(f"file: {base}"), lines

    # prune keeps what a kept incremental needs: a dry run removes nothing
    res = run_vmafs("prune", str(store), "--keep-last", "2", "--dry-run")
    assert res.returncode == 0, res.stderr
    decisions = {m[2]: (m[1], m[3]) for m in re.finditer(r"^(keep|remove) +(\S+): (.*)$",
                                                          res.stdout, re.M)}
    assert decisions[newest.name][0] == "keep"
    assert decisions[paths[1].name][0] == "keep"
    assert decisions[full.name] == ("keep", f"needed by {paths[1].name}"), res.stdout
    assert "base.vma.zst" not in decisions  # not named by vzdump: prune leaves it alone
    assert [p.name for p in archives(store)] == [p.name for p in paths]  # nothing removed

    # the folded archives can go: the newest still restores the same disks from the base
    for path in merged["merged"]:
        os.unlink(path)
    assert len(chain_lines(newest)) == 2
    ok("extract", "-q", str(newest), str(tmp_path / "again"))
    assert {n: (tmp_path / "again" / n).read_bytes() for n in extracted} == extracted
