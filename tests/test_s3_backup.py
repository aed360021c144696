"""Live backups of a running guest straight into S3 (a real RADOS Gateway), full then
incremental under a prefix, read back from S3: verify, extract, the chain found under the same
prefix, and every disk byte equal to the same archives read from local copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import guestimage as gi
import pytest
from conftest import run_vmafs
from test_backup import Lab, check_consistent

from vmafs.archive.chain import open_chain

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env


@pytest.fixture(scope="module")
def guest() -> gi.Guest:
    return gi.guest_or_skip()


def _backup(lab: Lab, s3: S3Env, *extra: str) -> str:
    rc, out, err = run_vmafs("backup", "--qmp", lab.qmp, "--vmid", "100", "--zstd", "-o",
                             s3.url("vm/"), "--json", *extra)
    assert rc == 0, err
    key = json.loads(out)["output"]
    assert key.startswith(s3.url("vm/vzdump-qemu-100-")) and key.endswith(".vma.zst")
    return str(key)


def test_live_backup_full_and_incremental_to_s3(guest: gi.Guest, s3: S3Env,
                                                tmp_path: Path) -> None:
    with Lab(guest, tmp_path) as lab:
        full = _backup(lab, s3)
        before = lab.counters()
        lab.vm.wait_for(f"VMAFS-COUNT {before + 100}", timeout=60)
        lab.vm.wait_for("VMAFS-COUNT", timeout=5)
        import time

        time.sleep(1.1)  # vzdump names have whole seconds
        incr = _backup(lab, s3, "--incremental", full)
        lab.assert_untouched()
        lab.vm.stop()
        sources = lab.sources()
    assert s3.uploads() == []
    for archive in (full, incr):
        rc, _, err = run_vmafs("verify", archive)
        assert rc == 0, err
    # the chain is found under the prefix; the newest reads as the disks were at its time
    arc = open_chain(incr)
    try:
        assert len(arc.layers) == 2
        check_consistent(arc, sources)
        # the same bytes as local copies of both objects give
        local = tmp_path / "local"
        local.mkdir()
        for url in (full, incr):
            (local / url.rpartition("/")[2]).write_bytes(s3.get(url.split("/", 3)[3]))
        rc, _, err = run_vmafs("extract", local / incr.rpartition("/")[2], tmp_path / "want")
        assert rc == 0, err
        rc, _, err = run_vmafs("extract", incr, tmp_path / "got")
        assert rc == 0, err
        for want in (tmp_path / "want").iterdir():
            assert (tmp_path / "got" / want.name).read_bytes() == want.read_bytes(), want.name
    finally:
        arc.close()
