"""Retention: vzdump archive names (vmafs.archive.naming), the keep-last/-hourly/-daily/-weekly/
-monthly/-yearly policy as Proxmox applies it plus chain protection (vmafs.archive.retention,
pure), and `vmafs prune` on a directory of real archives.

The expected plans are worked out by hand in the comments, following Proxmox Backup Server's
mark_selections: options in order, archives newest first, an archive already decided on is
skipped, a period an earlier option keeps an archive of counts as seen, and the older archives
of a period an option keeps are marked removed (so later options skip them too).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_vmafs

from vmafs.archive import chain, naming, retention
from vmafs.archive.reader import Archive
from vmafs.archive.retention import Entry, KeepOptions, Needs, Staying
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.errors import VmafsError
from vmafs.format import chain as chain_format

# --- naming -------------------------------------------------------------------------------------


def test_vzdump_name_from_datetime_epoch_and_aware_time() -> None:
    when = datetime(2024, 1, 5, 10, 2, 3)
    assert naming.vzdump_name("100", when, True) == "vzdump-qemu-100-2024_01_05-10_02_03.vma.zst"
    assert naming.vzdump_name("100", when, False) == "vzdump-qemu-100-2024_01_05-10_02_03.vma"
    epoch = 1_700_000_000
    local = time.strftime("%Y_%m_%d-%H_%M_%S", time.localtime(epoch))
    assert naming.vzdump_name("7", epoch, False) == f"vzdump-qemu-7-{local}.vma"
    aware = datetime.fromtimestamp(epoch, UTC)
    assert naming.vzdump_name("7", aware, False) == f"vzdump-qemu-7-{local}.vma"


@pytest.mark.parametrize("vmid", ["", "a/b", "/", ".", "..", "-", "a b", "a\nb", "x" * 129,
                                  "é", "a\\b", "a:b"])
def test_bad_vmids_are_refused(vmid: str) -> None:
    with pytest.raises(VmafsError, match="bad VMID"):
        naming.vzdump_name(vmid, 0, False)
    with pytest.raises(VmafsError):
        naming.check_vmid(vmid)


def test_parse_vzdump_name() -> None:
    when = datetime(2023, 12, 31, 23, 59, 58)
    for vmid in ("100", "web-01", "my.vm_2"):
        for zstd in (False, True):
            name = naming.vzdump_name(vmid, when, zstd)
            assert naming.parse_vzdump_name(name) == (vmid, when)
    for suffix in (".vma.gz", ".vma.lzo"):  # vzdump's other compressions
        assert naming.parse_vzdump_name(f"vzdump-qemu-100-2023_12_31-23_59_58{suffix}") == (
            "100", when)
    for name in ("vzdump-qemu-100-2024_13_01-00_00_00.vma",      # month 13
                 "vzdump-qemu-100-2024_02_30-00_00_00.vma",      # no such day
                 "vzdump-qemu-100-2024_01_01-24_00_00.vma",
                 "vzdump-lxc-100-2024_01_01-00_00_00.tar.zst",   # a container's
                 "vzdump-qemu-100-2024_01_01-00_00_00.vma.part",
                 "vzdump-qemu-100-2024_01_01-00_00_00.log",
                 "vzdump-qemu-100-2024_01_01-00_00_00.vma.notes",
                 ".vzdump-qemu-100-2024_01_01-00_00_00.vma.ab12cd.part",
                 "vzdump-qemu--2024_01_01-00_00_00.vma",
                 "vzdump-qemu-a b-2024_01_01-00_00_00.vma",
                 "vzdump-qemu-100-2024_1_01-00_00_00.vma",
                 "x-vzdump-qemu-100-2024_01_01-00_00_00.vma", "disk.vma"):
        assert naming.parse_vzdump_name(name) is None, name
    assert naming.strip_suffix("vzdump-qemu-1-2024_01_01-00_00_00.vma.zst") == \
        "vzdump-qemu-1-2024_01_01-00_00_00"


def test_default_vmid() -> None:
    assert naming.default_vmid([("100.conf", b"x"), ("other.txt", b"")], "web") == "100"
    assert naming.default_vmid([("qemu-server.conf", b"")], "web-01") == "web-01"
    assert naming.default_vmid([], "../../etc/passwd") == ".._.._etc_passwd"
    assert naming.default_vmid([], "my vm\n") == "my_vm_"
    assert "/" not in naming.default_vmid([], "a/" * 200) and \
        len(naming.default_vmid([], "a/" * 200)) == naming.VMID_MAX
    with pytest.raises(VmafsError, match="several VMIDs"):
        naming.default_vmid([("100.conf", b""), ("101.conf", b"")], None)
    for name in (None, "", "日本", "..", "/"):
        with pytest.raises(VmafsError, match="no VMID"):
            naming.default_vmid([("qemu-server.conf", b"")], name)


def test_output_path(tmp_path: Path) -> None:
    when = datetime(2024, 6, 1, 12, 0, 0)
    name = "vzdump-qemu-100-2024_06_01-12_00_00.vma.zst"
    assert naming.output_path(str(tmp_path), "100", when, True) == str(tmp_path / name)
    assert naming.output_path("missing/", "100", when, True) == "missing/" + name
    assert naming.output_path(str(tmp_path / "x.vma"), "100", when, False) == \
        str(tmp_path / "x.vma")
    assert naming.output_path("-", "100", when, False) == "-"
    with pytest.raises(VmafsError):
        naming.output_path(str(tmp_path), "../x", when, False)


# --- the policy ---------------------------------------------------------------------------------
def plan_of(entries: list[Entry], options: KeepOptions,
            staying: list[Staying] | None = None) -> retention.Plan:
    """retention.plan with parents told by uuid alone (prune asks vmafs.archive.chain, which
    also checks each link): archives that stay first, then full ones, then by path."""
    others = list(staying or [])
    every: list[Entry | Staying] = [*entries, *others]

    def parents(path: str, stays: Callable[[str], bool]) -> Needs:
        child = next(a for a in every if a.path == path)
        if child.parent is None:
            return Needs()
        offered = [a for a in every if a.uuid == child.parent and a.path != path]
        if not offered:
            return Needs(missing=f"{child.name}: its parent is not there")
        best = min(offered, key=lambda a: (not stays(a.path), a.parent is not None, a.path))
        return Needs((best.path,))

    return retention.plan(entries, options, others, parents)



def entries(times: list[datetime], vmid: str = "100") -> list[Entry]:
    return [Entry(f"/b/{naming.vzdump_name(vmid, t, True)}", vmid, t, uuidlib.uuid4())
            for t in times]


def kept(p: retention.Plan) -> dict[datetime, list[str]]:
    return {d.entry.time: d.reasons for d in p.decisions if d.keep}


def test_a_year_of_daily_archives() -> None:
    days = [datetime(2024, 1, 1, 2, 0) + timedelta(days=i) for i in range(366)]  # leap year
    p = plan_of(entries(days), KeepOptions(daily=7, weekly=4, monthly=6))
    # daily 7: Dec 25..31. weekly 4: Dec 30-31 are 2025-W01 and Dec 23-29 2024-W52, both seen,
    # so the Sundays Dec 22 (W51), 15, 8, 1 (W48); Nov 25-30 (W48 too) are marked removed.
    # monthly 6: December seen; November's newest not yet decided is Nov 24; then the last day
    # of Oct, Sep, Aug, Jul, Jun.
    d = datetime
    assert kept(p) == {
        **{d(2024, 12, day, 2): [f"keep-daily 2024-12-{day}"] for day in range(25, 32)},
        d(2024, 12, 22, 2): ["keep-weekly 2024-W51"], d(2024, 12, 15, 2): ["keep-weekly 2024-W50"],
        d(2024, 12, 8, 2): ["keep-weekly 2024-W49"], d(2024, 12, 1, 2): ["keep-weekly 2024-W48"],
        d(2024, 11, 24, 2): ["keep-monthly 2024-11"], d(2024, 10, 31, 2): ["keep-monthly 2024-10"],
        d(2024, 9, 30, 2): ["keep-monthly 2024-09"], d(2024, 8, 31, 2): ["keep-monthly 2024-08"],
        d(2024, 7, 31, 2): ["keep-monthly 2024-07"], d(2024, 6, 30, 2): ["keep-monthly 2024-06"],
    }
    assert len(p.removed) == 366 - 17
    # the order of the plan: newest first
    assert [x.entry.time for x in p.decisions] == sorted(days, reverse=True)
    reasons = {x.entry.time: x.reasons for x in p.decisions}
    assert reasons[d(2024, 11, 30, 2)] == ["keep-weekly keeps a newer archive of 2024-W48"]
    assert reasons[d(2024, 11, 23, 2)] == ["keep-monthly keeps a newer archive of 2024-11"]
    assert reasons[d(2024, 1, 1, 2)] == ["no keep option selects it"]


def test_a_year_with_yearly_and_more_monthly() -> None:
    days = [datetime(2023, 1, 1, 2, 0) + timedelta(days=i) for i in range(365 + 366 + 1)]
    p = plan_of(entries(days), KeepOptions(last=1, monthly=3, yearly=3))
    # last: 2025-01-01. monthly 3: January 2025 seen: Dec, Nov, Oct 2024.
    # yearly 3: 2025 and 2024 seen: 2023's newest, Dec 31; there is no 2022 (years without
    # archives do not count), so 3 is not reached.
    assert kept(p) == {
        datetime(2025, 1, 1, 2): ["keep-last"],
        datetime(2024, 12, 31, 2): ["keep-monthly 2024-12"],
        datetime(2024, 11, 30, 2): ["keep-monthly 2024-11"],
        datetime(2024, 10, 31, 2): ["keep-monthly 2024-10"],
        datetime(2023, 12, 31, 2): ["keep-yearly 2023"],
    }


def test_several_archives_a_day() -> None:
    times = [datetime(2024, 3, day, hour) for day in range(1, 11) for hour in (0, 6, 12, 18)]
    p = plan_of(entries(times), KeepOptions(last=3, hourly=2, daily=3))
    # last 3: the 10th at 18, 12, 6. hourly 2: those hours are seen; the 10th at 0, the 9th at
    # 18. daily 3: the 10th and 9th are seen; the 8th, 7th, 6th at 18 (their earlier archives
    # removed); the 5th would be a 4th day.
    assert kept(p) == {
        datetime(2024, 3, 10, 18): ["keep-last"], datetime(2024, 3, 10, 12): ["keep-last"],
        datetime(2024, 3, 10, 6): ["keep-last"],
        datetime(2024, 3, 10, 0): ["keep-hourly 2024-03-10 00:00"],
        datetime(2024, 3, 9, 18): ["keep-hourly 2024-03-09 18:00"],
        datetime(2024, 3, 8, 18): ["keep-daily 2024-03-08"],
        datetime(2024, 3, 7, 18): ["keep-daily 2024-03-07"],
        datetime(2024, 3, 6, 18): ["keep-daily 2024-03-06"],
    }


def test_a_period_an_earlier_option_keeps_counts_as_seen() -> None:
    d = datetime
    times = [d(2024, 5, 3, 10), d(2024, 5, 3, 8), d(2024, 5, 2, 10), d(2024, 5, 1, 10),
             d(2024, 4, 30, 10)]
    p = plan_of(entries(times), KeepOptions(last=1, daily=2))
    # keep-last takes May 3 10:00, so May 3 is seen: keep-daily keeps May 2 and May 1, and
    # May 3 8:00 is not a day of its own.
    assert set(kept(p)) == {d(2024, 5, 3, 10), d(2024, 5, 2, 10), d(2024, 5, 1, 10)}


def test_iso_weeks_across_the_new_year() -> None:
    d = datetime
    # 2020-12-28 (Mon) .. 2021-01-03 (Sun) is ISO week 2020-W53; 2021-01-04 starts 2021-W01
    times = [d(2020, 12, 27, 1), d(2020, 12, 28, 1), d(2020, 12, 31, 1), d(2021, 1, 3, 1),
             d(2021, 1, 4, 1)]
    p = plan_of(entries(times), KeepOptions(weekly=2))
    assert kept(p) == {d(2021, 1, 4, 1): ["keep-weekly 2021-W01"],
                       d(2021, 1, 3, 1): ["keep-weekly 2020-W53"]}


def test_keep_last_counts_archives_not_times() -> None:
    t = datetime(2024, 1, 1)
    same = [Entry(f"/b/{naming.vzdump_name('100', t, z)}", "100", t, uuidlib.uuid4())
            for z in (False, True)]
    assert len(plan_of(same, KeepOptions(last=2)).kept) == 2
    assert len(plan_of(same, KeepOptions(daily=2)).kept) == 1  # one day


def test_per_vmid() -> None:
    days = [datetime(2024, 1, day, 3) for day in range(1, 6)]
    p = plan_of(entries(days, "100") + entries(days[:2], "200"), KeepOptions(last=2))
    assert [(x.entry.vmid, x.entry.time.day, x.keep) for x in p.decisions] == [
        ("100", 5, True), ("100", 4, True), ("100", 3, False), ("100", 2, False),
        ("100", 1, False), ("200", 2, True), ("200", 1, True)]


def test_protected_archives_stay_and_count_for_nothing() -> None:
    days = [datetime(2024, 1, day, 3) for day in range(1, 5)]
    es = entries(days)
    es[3] = Entry(es[3].path, "100", es[3].time, es[3].uuid, protected=True)  # the newest
    p = plan_of(es, KeepOptions(last=1))
    assert kept(p) == {datetime(2024, 1, 4, 3): ["protected"],
                       datetime(2024, 1, 3, 3): ["keep-last"]}


@pytest.mark.parametrize("options", [KeepOptions(), KeepOptions(last=0, daily=0)])
def test_no_keep_option_is_refused(options: KeepOptions) -> None:
    with pytest.raises(VmafsError, match="no keep option"):
        plan_of(entries([datetime(2024, 1, 1)]), options)


def test_negative_counts_are_refused() -> None:
    with pytest.raises(VmafsError, match="--keep-weekly must be 0 or more"):
        plan_of([], KeepOptions(last=1, weekly=-1))


def chain_entries() -> dict[str, Entry]:
    """full0 (Jan 1) <- inc1 (Jan 2) <- inc2 (Jan 3), and an unrelated full3 (Jan 4) <- inc4."""
    u = {k: uuidlib.uuid4() for k in ("full0", "inc1", "inc2", "full3", "inc4")}
    parents = {"inc1": "full0", "inc2": "inc1", "inc4": "full3"}
    out = {}
    for day, k in enumerate(u, start=1):
        parent = u[parents[k]] if k in parents else None
        out[k] = Entry(f"/b/{k}.vma", "100", datetime(2024, 1, day), u[k], parent)
    return out


def test_a_kept_incremental_keeps_its_ancestors() -> None:
    e = chain_entries()
    # keep-daily 1 keeps inc4 only: full3 is needed by it; full0 <- inc1 <- inc2 go
    p = plan_of(list(e.values()), KeepOptions(daily=1))
    by = {x.entry.path: x for x in p.decisions}
    assert by["/b/inc4.vma"].reasons == ["keep-daily 2024-01-05"]
    assert by["/b/full3.vma"].keep and by["/b/full3.vma"].reasons == ["needed by inc4.vma"]
    assert by["/b/full3.vma"].needed_by == ["/b/inc4.vma"]
    assert [x.entry.path for x in p.removed] == ["/b/inc2.vma", "/b/inc1.vma", "/b/full0.vma"]
    # keep-last takes inc4, keep-daily 2 (Jan 5 seen) full3 and inc2: inc1 and full0 stay
    # too, each with the child that needs it
    p = plan_of(list(e.values()), KeepOptions(last=1, daily=2))
    by = {x.entry.path: x for x in p.decisions}
    assert by["/b/inc4.vma"].reasons == ["keep-last"]
    assert by["/b/inc2.vma"].reasons == ["keep-daily 2024-01-03"]
    assert by["/b/inc1.vma"].reasons == ["needed by inc2.vma"]
    assert by["/b/full0.vma"].reasons == ["needed by inc1.vma"]
    assert by["/b/full3.vma"].reasons == ["keep-daily 2024-01-04", "needed by inc4.vma"]
    assert not p.removed and not p.orphans


def test_a_kept_parent_also_says_who_needs_it() -> None:
    e = chain_entries()
    p = plan_of(list(e.values()), KeepOptions(last=5))
    by = {x.entry.path: x for x in p.decisions}
    assert by["/b/full3.vma"].reasons == ["keep-last", "needed by inc4.vma"]


def test_archives_that_stay_keep_their_ancestors() -> None:
    e = chain_entries()
    # an archive prune does not decide on (another name, another VMID) whose parent is inc1
    other = Staying("/b/manual.vma", uuidlib.uuid4(), e["inc1"].uuid)
    p = plan_of(list(e.values()), KeepOptions(last=1), [other])
    by = {x.entry.path: x for x in p.decisions}
    assert by["/b/inc1.vma"].reasons == ["needed by manual.vma"]
    assert by["/b/full0.vma"].reasons == ["needed by inc1.vma"]
    assert not by["/b/inc2.vma"].keep


def test_a_merged_base_serves_for_the_archives_it_folded() -> None:
    """A kept child's parent uuid is also a merged base's: the base stays, the folded
    incremental (and its own ancestors) can go."""
    u, child, root = uuidlib.uuid4(), uuidlib.uuid4(), uuidlib.uuid4()
    es = [Entry("/b/root.vma", "100", datetime(2023, 12, 31), root),
          Entry("/b/orig.vma", "100", datetime(2024, 1, 1), u, root),
          Entry("/b/merged.vma", "100", datetime(2024, 1, 2), u),
          Entry("/b/child.vma", "100", datetime(2024, 1, 3), child, u)]
    p = plan_of(es, KeepOptions(last=1))
    assert {x.entry.path for x in p.kept} == {"/b/merged.vma", "/b/child.vma"}
    # one that is kept anyway serves, whatever it is
    p = plan_of(es, KeepOptions(last=1, daily=4))
    assert {x.entry.path for x in p.kept} == {e.path for e in es}
    # whatever the resolver offers is kept (chain.Prune offers several when none of the
    # archives that serve reads back whole, or every one when none serves)
    es[2] = Entry("/b/merged.vma", "100", datetime(2024, 1, 2), u, root)
    p = retention.plan(es, KeepOptions(last=1), [], lambda path, stays: Needs(
        ("/b/orig.vma", "/b/merged.vma") if path == "/b/child.vma" else ()))
    assert {x.entry.path for x in p.kept} == {"/b/orig.vma", "/b/merged.vma", "/b/child.vma"}
    assert all(x.reasons == ["needed by child.vma"] for x in p.kept if x.entry.path != es[3].path)


def test_cycles_self_parents_and_orphans() -> None:
    a, b, c = uuidlib.uuid4(), uuidlib.uuid4(), uuidlib.uuid4()
    es = [Entry("/b/a.vma", "1", datetime(2024, 1, 3), a, b),
          Entry("/b/b.vma", "1", datetime(2024, 1, 2), b, a),  # a cycle (a forged record)
          Entry("/b/c.vma", "1", datetime(2024, 1, 1), c, c),
          Entry("/b/o.vma", "1", datetime(2023, 1, 1), uuidlib.uuid4(), uuidlib.uuid4())]
    p = plan_of(es, KeepOptions(last=1))
    assert {x.entry.path for x in p.kept} == {"/b/a.vma", "/b/b.vma"}
    assert p.orphans == []
    p = plan_of(es, KeepOptions(last=4))
    assert p.orphans == ["/b/c.vma", "/b/o.vma"]  # c has no parent but itself
    assert [n for _, n in p.notes] == ["c.vma: its parent is not there",
                                       "o.vma: its parent is not there"]
    assert plan_of(es, KeepOptions(last=4)).decisions[2].reasons == ["keep-last"]  # c: itself


def test_removal_order_children_first() -> None:
    u = [uuidlib.uuid4() for _ in range(4)]
    # times out of chain order on purpose: a child older (by name) than its parent
    es = [Entry("/b/p.vma", "1", datetime(2024, 1, 5), u[0]),
          Entry("/b/c1.vma", "1", datetime(2024, 1, 1), u[1], u[0]),
          Entry("/b/c2.vma", "1", datetime(2024, 1, 3), u[2], u[1]),
          Entry("/b/x.vma", "1", datetime(2024, 1, 4), u[3]),
          Entry("/b/keep.vma", "1", datetime(2024, 2, 1), uuidlib.uuid4())]
    p = plan_of(es, KeepOptions(last=1))
    assert [d.entry.name for d in p.removal_order()] == ["x.vma", "c2.vma", "c1.vma", "p.vma"]


def test_the_same_archive_twice_is_refused() -> None:
    e = entries([datetime(2024, 1, 1)])
    with pytest.raises(VmafsError):
        plan_of(e + e, KeepOptions(last=1))


# --- vmafs prune on real archives ---------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"vmafs prune test" * 100)
    return path


def vzname(vmid: str, day: int, zstd: bool = False, month: int = 1) -> str:
    return naming.vzdump_name(vmid, datetime(2024, month, day, 3, 0, 0), zstd)


def create(directory: Path, name: str, image: Path) -> Path:
    rc, _, err = run_vmafs("create", "-q", "-o", directory / name, f"drive-scsi0={image}")
    assert rc == 0, err
    return directory / name


def write_incremental(path: Path, parent: Path, digest: str | None = None) -> uuidlib.UUID:
    """An archive whose chain record names PARENT (its real link, or one with `digest`)."""
    with Archive.open(str(parent), layer=True) as p:
        link = chain.link_to(p)
    if digest is not None:
        link = chain_format.Link(link.uuid, link.ctime, link.devices, digest)
    facts = chain.peek(str(parent))
    record = chain_format.encode(chain_format.ChainRecord(parent=link))
    new = uuidlib.uuid4()
    with open_output(str(path)) as out:
        writer = ArchiveWriter(out, [DeviceSpec(n, s) for n, s in facts.devices],
                               configs=[(chain_format.CONFIG_NAME, record)], uuid=new.bytes)
        writer.write(1, 0, b"changed!" * 8192)
        writer.finish()
    return new


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def prune(directory: Path, *args: str) -> tuple[int, str, str]:
    rc, out, err = run_vmafs("prune", directory, *args)
    return rc, out.decode(), err


def test_prune_dry_run_json_and_removal(tmp_path: Path, image: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    for day in (1, 2, 3, 4):
        create(d, vzname("100", day), image)
    create(d, vzname("100", 5, zstd=True), image)
    create(d, vzname("200", 1), image)
    old = vzname("100", 1)
    stem = naming.strip_suffix(old)
    (d / f"{stem}.log").write_text("vzdump log\n")
    (d / f"{old}.notes").write_text("notes\n")
    (d / "unrelated.txt").write_text("x")
    before = listing(d)

    rc, out, err = prune(d, "--keep-last", "2", "--dry-run")
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert lines[:5] == [
        f"keep   {vzname('100', 5, True)}: keep-last",
        f"keep   {vzname('100', 4)}: keep-last",
        f"remove {vzname('100', 3)}: no keep option selects it",
        f"remove {vzname('100', 2)}: no keep option selects it",
        f"remove {old}: no keep option selects it",
    ]
    assert lines[5:7] == [f"remove {stem}.log: beside {old}", f"remove {old}.notes: beside {old}"]
    assert lines[7] == f"keep   {vzname('200', 1)}: keep-last"
    assert lines[8] == "dry run: 3 kept, 3 would be removed, nothing removed"
    assert listing(d) == before

    rc, out, err = prune(d, "--keep-last", "2", "--dry-run", "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert doc["dry_run"] is True and doc["kept"] == 3 and doc["remove"] == 3
    assert doc["removed"] == 0 and doc["left_alone"] == [] and doc["orphans"] == []
    first = doc["archives"][0]
    assert first["name"] == vzname("100", 5, True) and first["vmid"] == "100"
    assert first["time"] == "2024-01-05T03:00:00" and first["keep"] is True
    assert first["reasons"] == ["keep-last"] and first["parent"] is None
    assert first["uuid"] == str(chain.peek(str(d / first["name"])).uuid)
    by = {a["name"]: a for a in doc["archives"]}
    assert by[old]["sidecars"] == [{"name": f"{stem}.log"}, {"name": f"{old}.notes"}]
    assert not any(a["removed"] for a in doc["archives"])
    assert listing(d) == before

    # --vmid: only VMID 200's archives are considered
    rc, out, err = prune(d, "--keep-last", "1", "--vmid", "200", "--json")
    assert rc == 0 and [a["name"] for a in json.loads(out)["archives"]] == [vzname("200", 1)]
    assert listing(d) == before

    rc, out, err = prune(d, "--keep-last", "2", "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert doc["removed"] == 3 and doc["dry_run"] is False
    after = {a["name"]: a for a in doc["archives"]}
    assert after[old]["removed"] is True and after[old]["sidecars"] == by[old]["sidecars"]
    assert after[vzname("100", 4)]["removed"] is False
    assert listing(d) == sorted([vzname("100", 5, True), vzname("100", 4), vzname("200", 1),
                                 "unrelated.txt"])
    rc, out, err = prune(d, "--keep-last", "2")  # nothing left to do
    assert rc == 0 and out.splitlines()[-1] == "3 kept, 0 removed"


def test_prune_keeps_what_a_kept_incremental_needs(tmp_path: Path, image: Path) -> None:
    d = tmp_path / "chain"
    d.mkdir()
    full = create(d, vzname("100", 1), image)
    create(d, vzname("100", 2), image)  # an unrelated full, removed
    inc = d / vzname("100", 3)
    inc_uuid = write_incremental(inc, full)
    rc, out, err = prune(d, "--keep-last", "1")
    assert rc == 0 and err == "", err
    assert out.splitlines() == [
        f"keep   {inc.name}: keep-last",
        f"remove {vzname('100', 2)}: no keep option selects it",
        f"keep   {full.name}: needed by {inc.name}",
        "2 kept, 1 removed",
    ]
    assert listing(d) == sorted([full.name, inc.name])
    rc, out, err = prune(d, "--keep-last", "1", "--json")
    doc = json.loads(out)
    by = {a["name"]: a for a in doc["archives"]}
    assert by[inc.name]["parent"] == str(chain.peek(str(full)).uuid)
    assert by[inc.name]["uuid"] == str(inc_uuid)
    assert by[full.name]["needed_by"] == [{"name": inc.name}]
    assert by[full.name]["reasons"] == [f"needed by {inc.name}"]


def test_prune_keeps_the_parents_of_archives_it_does_not_consider(tmp_path: Path,
                                                                   image: Path) -> None:
    d = tmp_path / "others"
    d.mkdir()
    full = create(d, vzname("100", 1), image)
    create(d, vzname("100", 9), image)
    write_incremental(d / "manual.vma", full)  # not a vzdump name: stays, and so does full
    rc, out, err = prune(d, "--keep-last", "1")
    assert rc == 0, err
    assert f"keep   {full.name}: needed by manual.vma" in out.splitlines()
    assert listing(d) == sorted([full.name, vzname("100", 9), "manual.vma"])
    # a parent of another VMID's archive, with --vmid
    inc = d / vzname("300", 5)
    write_incremental(inc, full)
    (d / "manual.vma").unlink()
    rc, out, err = prune(d, "--keep-last", "1", "--vmid", "100")
    assert rc == 0 and f"keep   {full.name}: needed by {inc.name}" in out.splitlines()
    assert full.exists()
    # a child with a hostile name: escaped on the terminal, exact in JSON
    (d / "x\x1b[2J\nkeep fake.vma").write_bytes(inc.read_bytes())
    inc.unlink()
    rc, out, err = prune(d, "--keep-last", "1")
    shown = f"keep   {full.name}: needed by x\\x1b[2J\\nkeep fake.vma"
    assert rc == 0 and shown in out.splitlines()
    assert "\x1b" not in out
    rc, out, err = prune(d, "--keep-last", "1", "--json")
    by = {a["name"]: a for a in json.loads(out)["archives"]}
    assert by[full.name]["needed_by"] == [{"name": "x\x1b[2J\nkeep fake.vma"}]


def test_prune_never_follows_symlinks(tmp_path: Path, image: Path) -> None:
    d = tmp_path / "links"
    d.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = create(outside, "precious.vma", image)
    secret = outside / "secret.txt"
    secret.write_text("keep me")
    create(d, vzname("100", 9), image)
    old = create(d, vzname("100", 2), image)
    link = d / vzname("100", 1)
    link.symlink_to(target)  # a symlink named like an old archive
    (d / f"{naming.strip_suffix(old.name)}.log").symlink_to(secret)  # sidecars as symlinks
    (d / f"{old.name}.notes").symlink_to(secret)
    rc, out, err = prune(d, "--keep-last", "1")
    assert rc == 0
    assert err.splitlines() == [f"vmafs prune: warning: {link.name}: not a regular file; "
                                "left alone"]
    assert f"keep   {link.name}: left alone: not a regular file" in out.splitlines()
    assert f"remove {old.name}: no keep option selects it" in out.splitlines()
    assert not old.exists()
    assert link.is_symlink() and target.exists() and secret.read_text() == "keep me"
    assert (d / f"{old.name}.notes").is_symlink()
    assert (d / f"{naming.strip_suffix(old.name)}.log").is_symlink()
    # a directory with an archive's name is left alone too
    (d / vzname("100", 1, month=2)).mkdir()
    rc, out, err = prune(d, "--keep-last", "1", "--json")
    doc = json.loads(out)
    assert {a["name"] for a in doc["left_alone"]} == {link.name, vzname("100", 1, month=2)}
    assert (d / vzname("100", 1, month=2)).is_dir()


def test_prune_leaves_unreadable_archives_alone(tmp_path: Path, image: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    create(d, vzname("100", 9), image)
    bad = d / vzname("100", 1)
    bad.write_bytes(b"not an archive at all" * 10)
    empty = d / vzname("100", 2, zstd=True)
    empty.write_bytes(b"")
    (d / ".vzdump-qemu-100-2024_01_03-03_00_00.vma.abc123.part").write_bytes(b"")
    before = listing(d)
    rc, out, err = prune(d, "--keep-last", "1")
    assert rc == 0
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("vmafs prune: warning: ") for w in warnings)
    assert any(bad.name in w and "left alone" in w for w in warnings)
    assert listing(d) == before
    rc, out, err = prune(d, "--keep-last", "1", "--json")
    doc = json.loads(out)
    assert [a["name"] for a in doc["left_alone"]] == [bad.name, empty.name]
    assert doc["left_alone"][0]["reason"].startswith("cannot read it (")
    assert listing(d) == before


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_prune_reads_vzdumps_own_archives(tmp_path: Path, image: Path) -> None:
    """vzdump's .vma.zst (one zstd frame, no seek table) and .vma.gz are read from the start."""
    d = tmp_path / "vzdump"
    d.mkdir()
    plain = create(tmp_path, "plain.vma", image)
    one_frame = d / vzname("100", 1, zstd=True)
    subprocess.run(["zstd", "-q", str(plain), "-o", str(one_frame)], check=True)
    gz = d / vzname("100", 2).replace(".vma", ".vma.gz")
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    create(d, vzname("100", 3), image)
    rc, out, err = prune(d, "--keep-last", "1", "--json")
    assert rc == 0 and err == "", err
    doc = json.loads(out)
    assert [(a["name"], a["keep"]) for a in doc["archives"]] == [
        (vzname("100", 3), True), (gz.name, False), (one_frame.name, False)]
    assert doc["archives"][1]["uuid"] == str(chain.peek(str(plain)).uuid)
    assert listing(d) == [vzname("100", 3)]


def test_prune_removes_nothing_protected(tmp_path: Path, image: Path) -> None:
    d = tmp_path / "protected"
    d.mkdir()
    create(d, vzname("100", 9), image)
    old = create(d, vzname("100", 1), image)
    (d / f"{old.name}.protected").write_text("")
    rc, out, err = prune(d, "--keep-last", "1")
    assert rc == 0 and f"keep   {old.name}: protected" in out.splitlines()
    assert old.exists()


def test_prune_errors(tmp_path: Path) -> None:
    rc, _, err = prune(tmp_path)
    assert_one_line_error(rc, err, "vmafs prune: error:", "no keep option")
    rc, _, err = prune(tmp_path, "--keep-daily", "0")
    assert_one_line_error(rc, err, "no keep option")
    assert rc == 2
    rc, _, err = prune(tmp_path, "--keep-daily", "-1")
    assert_one_line_error(rc, err, "--keep-daily", "-1 is not from 0")
    assert rc == 2
    rc, _, err = prune(tmp_path / "missing", "--keep-last", "1")
    assert_one_line_error(rc, err, "cannot open directory", "No such file or directory")
    (tmp_path / "file").write_text("")
    rc, _, err = prune(tmp_path / "file", "--keep-last", "1")
    assert_one_line_error(rc, err, "cannot open directory", "Not a directory")
    rc, _, err = prune(tmp_path, "--keep-last", "1", "--vmid", "../etc")
    assert_one_line_error(rc, err, "bad VMID")
    assert rc == 2
    rc, out, err = prune(tmp_path, "--keep-last", "1", "--json")  # an empty directory
    assert rc == 0 and json.loads(out)["archives"] == []
