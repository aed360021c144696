"""The dirty-bitmap rules of incremental backups, on recorded QMP JSON (no QEMU)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from vmafs.backup import bitmaps
from vmafs.backup.blockgraph import Disk
from vmafs.format import chain

PREV = uuid.UUID("11111111-2222-3333-4444-555555555555")
NEW = uuid.UUID("66666666-7777-8888-9999-000000000000")
A = Disk("drive-virtio0", "#block123", 1 << 30)
B = Disk("drive-virtio1", "node-virtio1", 1 << 30)


def bitmap(**over: Any) -> dict[str, Any]:
    return {"name": chain.bitmap_name(PREV), "recording": True, "persistent": False,
            "busy": False, "granularity": 65536, "count": 131072, **over}


def nodes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    qcow2_v3 = {"format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}
    return [{"node-name": "#block123", "drv": "qcow2", "dirty-bitmaps": a, "image": qcow2_v3},
            {"node-name": "#block000", "drv": "file"},
            {"node-name": "node-virtio1", "drv": "raw", "dirty-bitmaps": b}]


def test_usable_bitmaps() -> None:
    found = nodes([bitmap(persistent=True)], [bitmap(), {"name": "other", "count": 5}])
    assert bitmaps.unusable(A, found, PREV) is None
    assert bitmaps.unusable(B, found, PREV) is None
    assert bitmaps.dirty_bytes([A, B], found, PREV) == 2 * 131072
    assert bitmaps.sync_arguments(PREV) == {
        "sync": "bitmap", "bitmap": f"vmafs-{PREV}", "bitmap-mode": "never"}
    assert bitmaps.sync_arguments(None) == {"sync": "full"}


def test_each_unusable_bitmap_says_which_disk_and_why() -> None:
    gone = nodes([], [])
    assert "restarted?" in (bitmaps.unusable(B, gone, PREV) or "")  # raw: in memory only
    assert "restarted uncleanly" in (bitmaps.unusable(A, gone, PREV) or "")
    cases = {"inconsistent": bitmap(inconsistent=True), "in use": bitmap(busy=True),
             "disabled": bitmap(recording=False), "granularity 131072":
             bitmap(granularity=131072)}
    for words, info in cases.items():
        why = bitmaps.unusable(A, nodes([info], []), PREV) or ""
        assert why.startswith("disk drive-virtio0: ") and words in why, why


def test_chain_mismatch() -> None:
    prev = {A.name: A.size, B.name: B.size}
    assert bitmaps.chain_mismatch([A, B], prev) is None
    assert "resized" in (bitmaps.chain_mismatch([A, Disk(B.name, B.node, 2 << 30)], prev) or "")
    assert "new disk" in (bitmaps.chain_mismatch([A, B, Disk("drive-x", "x", 1)], prev) or "")
    assert "not backed up now" in (bitmaps.chain_mismatch([A], prev) or "")


def test_new_bitmaps_are_persistent_on_qcow2_only() -> None:
    actions = bitmaps.add_actions([A, B], nodes([], []), NEW)
    assert [a["type"] for a in actions] == ["block-dirty-bitmap-add"] * 2
    assert [(a["data"]["node"], a["data"]["persistent"]) for a in actions] == [
        ("#block123", True), ("node-virtio1", False)]
    assert {a["data"]["name"] for a in actions} == {f"vmafs-{NEW}"}
    assert {a["data"]["granularity"] for a in actions} == {65536}
    # a qcow2 v2 file cannot store one: QEMU would refuse the whole transaction
    old = [{"node-name": "#block123", "drv": "qcow2", "image": {"format-specific": {
        "type": "qcow2", "data": {"compat": "0.10"}}}}]
    assert bitmaps.add_actions([A], old, NEW)[0]["data"]["persistent"] is False
    assert "qcow2 v2" in (bitmaps.unusable(A, old, PREV) or "")


def test_which_bitmaps_go_when_the_backup_ends() -> None:
    mine, prev = chain.bitmap_name(NEW), chain.bitmap_name(PREV)
    other = "vmafs-aaaaaaaa-0000-0000-0000-000000000000"
    found = nodes([{"name": n} for n in (mine, prev, other, "user")], [{"name": mine}])
    link = chain.Link(PREV, 0, ((A.name, A.size),), "0" * 64)

    def gone(disk: Disk, **kw: Any) -> list[str]:
        args: dict[str, Any] = {"started": True, "committed": True, "parent": link,
                                "drop_old": False, **kw}
        return bitmaps.to_remove(disk, found, NEW, **args)

    assert gone(A) == [prev]                       # an incremental moved the chain on
    assert gone(B) == []                           # copied whole: PREV's bitmap was not there
    assert gone(A, parent=None) == []              # a full backup leaves other chains alone
    assert gone(A, committed=False) == [mine]      # failed: ours go, PREV's stay
    assert gone(A, committed=False, started=False) == []
    assert gone(A, started=False) == []            # --no-bitmap: PREV's bitmap still counts
    assert gone(A, drop_old=True) == [prev, other]  # never the user's own


def test_a_missing_bitmap_gets_its_true_reason() -> None:
    raw = nodes([], [])[2]
    qcow2 = nodes([], [])[0]
    later = bitmaps.missing_reason(raw, 1000, 500.0, "vzdump-qemu-101-x.vma")
    assert "vzdump-qemu-101-x.vma" in later and "moved the bitmap on" in later
    assert "restarted" not in later
    assert "restarted after that backup" in bitmaps.missing_reason(raw, 1000, 2000.0, None)
    assert "stopped uncleanly" in bitmaps.missing_reason(qcow2, 1000, 2000.0, None)
    kept = bitmaps.missing_reason(raw, 1000, 500.0, None)   # QEMU older than PREV
    assert "removed" in kept and "restarted" not in kept
    assert "restarted?" in bitmaps.missing_reason(raw, 1000, None, None)  # unknown: ask
    why = bitmaps.unusable(B, nodes([], []), PREV, later) or ""
    assert why.startswith(f"disk drive-virtio1: no dirty bitmap vmafs-{PREV} (a later backup")


def test_inventory_names_disk_archive_and_flags() -> None:
    found = nodes([bitmap(persistent=True), {"name": "user", "count": 1}],
                  [bitmap(busy=True), {"name": "vmafs-not-a-uuid"}])
    listed = bitmaps.inventory([A], found)
    assert [(e["disk"], e["archive"], e["persistent"], e["busy"]) for e in listed] == [
        ("drive-virtio0", str(PREV), True, False), ("node-virtio1", str(PREV), False, True)]
    assert bitmaps.archive_of(chain.bitmap_name(NEW)) == NEW
    assert bitmaps.archive_of("vmafs-x") is None and bitmaps.archive_of("user") is None


def test_a_dead_runs_bitmaps(tmp_path: Path) -> None:
    """Uncommitted: its own go; committed (said, or its archive is there): PREV's go."""
    from vmafs.backup.guard import dead_bitmaps
    from vmafs.backup.runlock import RunRecord
    record = RunRecord("0123456789", 1, "/q", bitmap=chain.bitmap_name(NEW),
                       parent_bitmap=chain.bitmap_name(PREV), output=str(tmp_path / "a.vma"),
                       uuid=str(NEW))
    assert dead_bitmaps(record) == [chain.bitmap_name(NEW)]
    record.committed = True
    assert dead_bitmaps(record) == [chain.bitmap_name(PREV)]
    assert dead_bitmaps(None) == []


def test_lock_files_tell_live_runs_from_dead_ones(tmp_path: Path, monkeypatch: Any) -> None:
    from vmafs.backup import runlock
    monkeypatch.setenv("VMAFS_RUN_DIR", str(tmp_path))
    live = runlock.RunLock("/q.sock", "aaaaaaaaaa")
    dead = runlock.RunLock("/q.sock", "bbbbbbbbbb")
    dead.abandon()                                   # its process died: the file stays
    with runlock.scan(exclude="cccccccccc") as runs:
        assert list(runs.live) == ["aaaaaaaaaa"]
        assert [a.tag for a in runs.abandoned] == ["bbbbbbbbbb"]
        with runlock.scan() as again:                # a second cleaner waits its turn
            assert list(again.live) == ["aaaaaaaaaa", "bbbbbbbbbb"] and not again.abandoned
        runs.abandoned[0].release()
    live.release()
    assert list(tmp_path.iterdir()) == []
    assert runlock.tag_of("vmafs-aaaaaaaaaa-cbw1") == "aaaaaaaaaa"
    assert runlock.tag_of("vmafs-aaaaaaaaaa-t0") == "aaaaaaaaaa"
    assert runlock.tag_of("vmafs-aaaaaaaaaa-0") == "aaaaaaaaaa"
    assert runlock.tag_of(chain.bitmap_name(NEW)) is None and runlock.tag_of("user") is None
