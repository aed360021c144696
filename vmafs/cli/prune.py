"""`vmafs prune`: remove the archives of a directory that a retention policy (keep-last,
-hourly, -daily, -weekly, -monthly, -yearly, as vzdump and PBS apply it) does not keep, never an
ancestor of an incremental archive that stays.

Only archives named as vzdump names them are considered (vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS
.vma, .vma.zst, .vma.gz, .vma.lzo), each by the VMID and local time in its name, as vzdump's own
prune does. Every other archive in the directory stays, and so do its ancestors.

What an archive that stays needs is asked of vmafs.archive.chain (chain.Prune), which chooses
parents as every reader does and opens and checks each file relied on: a file carrying a
parent's uuid (a symlink, a copy, a look-alike) is never a stand-in on that alone. The dry run
decides exactly as the run does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from vmafs.archive import chain, naming, retention
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_json, int_in
from vmafs.errors import VmafsError
from vmafs.format.names import display, json_name
from vmafs.progress import print_json
from vmafs.store.place import GONE, Place

PROTECTED = ".protected"  # vzdump's mark of an archive prune must not remove: ARCHIVE.protected


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help=COMMANDS["prune"],
                       description="Remove the archives in DIR that the keep options do not "
                                   "keep, per VMID, as vzdump and Proxmox Backup Server "
                                   "prune; an archive that a kept incremental archive needs "
                                   "(its parent, and theirs) is kept. Only archives named "
                                   "vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo] "
                                   "are considered, by the VMID and time in the name.")
    p.add_argument("dir", help="directory of archives")
    p.add_argument("--vmid", metavar="ID", help="consider only the archives of this VMID")
    for option, what in (("last", "the N newest archives"),
                         ("hourly", "the newest archive of each of the last N hours"),
                         ("daily", "the newest archive of each of the last N days"),
                         ("weekly", "the newest archive of each of the last N ISO weeks"),
                         ("monthly", "the newest archive of each of the last N months"),
                         ("yearly", "the newest archive of each of the last N years")):
        p.add_argument(f"--keep-{option}", type=int_in(0, 1 << 20), default=0, metavar="N",
                       dest=option,
                       help=f"keep {what}" + ("" if option == "last" else
                                              " that have archives"))
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print what would be kept and removed; remove nothing")
    add_json(p)
    p.set_defaults(run=run)


@dataclass
class _Scan:
    """The archives of a place as prune reads them, and what it leaves alone and why."""

    entries: list[retention.Entry] = field(default_factory=list)
    staying: list[retention.Staying] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    identity: dict[str, bytes] = field(default_factory=dict)  # path -> the file or object read
    names: list[str] = field(default_factory=list)


def _warn(message: str) -> None:
    print(f"vmafs prune: warning: {message}", file=sys.stderr)


def _scan(directory: str, place: Place, vmid: str | None) -> _Scan:
    found = _Scan()
    found.names = place.names()  # a directory's entries, or the objects of an S3 prefix
    for name in found.names:
        parsed = naming.parse_vzdump_name(name)
        considered = parsed is not None and (vmid is None or parsed[0] == vmid)
        if not considered and (name.startswith(".") or not name.endswith(chain.ARCHIVE_SUFFIXES)):
            continue
        path = place.path(name)
        kind = place.kind(name)  # never opens it (a FIFO never blocks)
        if kind is None:
            continue  # gone since the listing
        regular = kind[0] == "regular"
        if considered and not regular:
            found.left_alone.append((name, "not a regular file"))
        if not regular and kind[0] != "link":  # a symlink to a regular file is read, stays
            continue
        try:
            facts = chain.peek(path)
        except (VmafsError, OSError) as exc:
            if considered and regular:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                found.left_alone.append((name, f"cannot read it ({why})"))
            continue
        parent = facts.parent.uuid if facts.parent is not None else None
        if considered and regular and parsed is not None:
            protected = place.exists(name + PROTECTED)
            found.entries.append(retention.Entry(path, parsed[0], parsed[1], facts.uuid, parent,
                                                 protected))
            found.identity[path] = kind[1]
        else:  # another VM's, a name vzdump would not give, a symlink: it stays
            found.staying.append(retention.Staying(path, facts.uuid, parent))
    return found


UPLOAD_STALE = 24 * 3600  # s: an upload without a new part this long is a killed run's


def _hold_uploading(place: Place, found: _Scan, now: float) -> None:
    """A backup being uploaded to a store (a multipart upload) may be an incremental whose
    chain must stay, and what it needs cannot be read before it completes: every archive of
    its VM (of every VM, when its name says none) is left alone. An upload that got no part
    for UPLOAD_STALE is a killed run's, and only named."""
    held: set[str | None] = set()
    for name, last in place.uploads(lambda final: final.endswith(chain.ARCHIVE_SUFFIXES)):
        if now - last > UPLOAD_STALE:
            _warn(f"{display(name)}: an upload a killed run left unfinished (no part for "
                  f"{(now - last) / 3600:.0f} hours); not waited for")
            continue
        parsed = naming.parse_vzdump_name(name)
        held.add(parsed[0] if parsed is not None else None)
    if not held:
        return
    for e in list(found.entries):
        if None in held or e.vmid in held:
            found.entries.remove(e)
            found.staying.append(retention.Staying(e.path, e.uuid, e.parent))
            found.left_alone.append((e.name, "an archive of its VM is being uploaded here, "
                                     "whose chain is not known until it completes"))


def _plan(found: _Scan, options: retention.KeepOptions, resolver: chain.Prune
          ) -> retention.Plan:
    """The plan, in which no archive that does not open (a copy killed half-way under a
    vzdump name) counts as a kept backup: each is left alone (it stays, and so does what it
    needs), and the options are applied again without it, until every archive they keep
    opens."""
    while True:
        plan = retention.plan(found.entries, options, found.staying, resolver.needs)
        broken = [(d.entry, why) for d in plan.kept if _counted(d)
                  and (why := resolver.unreadable(d.entry.path)) is not None]
        if not broken:
            return plan
        for e, why in broken:
            found.entries.remove(e)
            found.staying.append(retention.Staying(e.path, e.uuid, e.parent))
            found.left_alone.append((e.name, f"it does not open ({why}); counted by no "
                                     "keep option"))


def _counted(d: retention.Decision) -> bool:
    """Whether a kept archive counts for a keep option (not protected, nor kept only because
    a kept archive needs it)."""
    return not d.entry.protected and not all(r.startswith(retention.NEEDED_BY)
                                             for r in d.reasons)


def _sidecars(place: Place, name: str, remaining_stems: set[str]) -> list[str]:
    """vzdump's files beside an archive, removed with it: NAME.notes, and STEM.log unless an
    archive that stays has the same stem (NAME.vma beside NAME.vma.zst)."""
    stem = naming.strip_suffix(name)
    out = []
    for side in ([stem + ".log"] if stem not in remaining_stems else []) + [name + ".notes"]:
        kind = place.kind(side)
        if kind is not None and kind[0] == "regular":
            out.append(side)
    return out


def run(args: argparse.Namespace) -> int:
    options = retention.KeepOptions(args.last, args.hourly, args.daily, args.weekly,
                                    args.monthly, args.yearly)
    options.check()  # before reading anything
    vmid = naming.check_vmid(args.vmid) if args.vmid is not None else None
    with Place(args.dir) as place:  # a directory, or an S3 prefix (s3://BUCKET/PREFIX/)
        return _run(args, place, options, vmid)


def _run(args: argparse.Namespace, place: Place, options: retention.KeepOptions,
         vmid: str | None) -> int:
    found = _scan(args.dir, place, vmid)
    resolver = chain.Prune(args.dir)  # every file a kept chain relies on is checked there
    for path in place.live_temps(lambda final: final.endswith(chain.ARCHIVE_SUFFIXES)):
        facts = resolver.add(path)  # a backup being written: it will need its chain
        if facts is None:
            raise VmafsError(f"{display(os.path.basename(path))}: an archive is being written "
                             "here and its header is not on disk yet, so what it needs is not "
                             "known: run prune again when it is done")
        if facts.parent is not None:
            found.staying.append(retention.Staying(path, facts.uuid, facts.parent.uuid))
    _hold_uploading(place, found, time.time())
    plan = _plan(found, options, resolver)
    removing = {d.entry.name for d in plan.removed}
    remaining_stems = {naming.strip_suffix(n) for n in found.names
                       if naming.parse_vzdump_name(n) is not None and n not in removing}
    sidecars: dict[str, list[str]] = {}
    claimed: set[str] = set()
    for d in plan.removal_order():  # a log two removed archives share goes with one of them
        sidecars[d.entry.name] = [s for s in _sidecars(place, d.entry.name, remaining_stems)
                                  if s not in claimed]
        claimed.update(sidecars[d.entry.name])
    for name, reason in found.left_alone:
        _warn(f"{display(name)}: {reason}; left alone")
    considered = {e.path for e in found.entries}
    orphans = [p for p in plan.orphans if p in considered]  # not the others' business
    for _path, note in plan.notes:
        _warn(note)
    if not args.json:
        _print_plan(plan, found, sidecars)
    removed: dict[str, list[str]] = {}
    if not args.dry_run:
        removed = _remove(args, place, plan, found, sidecars, resolver)
    for name in place.remove_stale_temps(lambda final: final.endswith(chain.ARCHIVE_SUFFIXES),
                                         dry_run=args.dry_run):
        _warn(f"{display(name)}: the temporary file of a run that was killed; "
              + ("would be removed" if args.dry_run else "removed"))
    if args.json:
        _print_json(args, plan, found, orphans, sidecars, removed)
    elif args.dry_run:
        print(f"dry run: {len(plan.kept)} kept, {len(plan.removed)} would be removed, "
              "nothing removed")
    else:
        print(f"{len(plan.kept)} kept, {len(removed)} removed")
    return 0


def _remove(args: argparse.Namespace, place: Place, plan: retention.Plan, found: _Scan,
            sidecars: dict[str, list[str]], resolver: chain.Prune) -> dict[str, list[str]]:
    """Unlink the plan's removals, children first. An archive that could not be removed
    (replaced since it was read) still needs its chain: what it needs is not removed."""
    removed: dict[str, list[str]] = {}
    planned = {d.entry.path for d in plan.removed}
    held: set[str] = set()  # what archives that were not removed after all need

    def stays(path: str) -> bool:
        return path not in planned or path in held

    for d in plan.removal_order():
        name = d.entry.name
        if d.entry.path in held:
            _warn(f"{display(name)}: an archive that needs it was not removed; not removed")
            held.update(resolver.needs(d.entry.path, stays).paths)
            continue
        if place.exists(name + PROTECTED, fresh=True):
            _warn(f"{display(name)}: protected since it was read; not removed")
            held.add(d.entry.path)
            held.update(resolver.needs(d.entry.path, stays).paths)
            continue
        try:
            skipped = place.remove(name, found.identity.get(d.entry.path))
        except VmafsError as exc:
            raise VmafsError(f"{exc} (prune stopped; {len(removed)} removed before "
                             "it)") from None
        if skipped is not None:
            _warn(f"{display(name)}: {skipped}; not removed")
            if skipped != GONE:
                held.add(d.entry.path)
                held.update(resolver.needs(d.entry.path, stays).paths)
            continue
        removed[name] = [s for s in sidecars[name] if place.remove(s, None) is None]
    if removed:
        place.sync()
    return removed


def _print_plan(plan: retention.Plan, found: _Scan, sidecars: dict[str, list[str]]) -> None:
    lines = []
    for d in plan.decisions:
        lines.append(f"{'keep' if d.keep else 'remove':<6} {display(d.entry.name)}: "
                     f"{display(', '.join(d.reasons))}")
        lines += [f"remove {display(s)}: beside {display(d.entry.name)}"
                  for s in sidecars.get(d.entry.name, ())]
    lines += [f"keep   {display(name)}: left alone: {display(why)}"
              for name, why in found.left_alone]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def _print_json(args: argparse.Namespace, plan: retention.Plan, found: _Scan, orphans: list[str],
                sidecars: dict[str, list[str]], removed: dict[str, list[str]]) -> None:
    archives = []
    for d in plan.decisions:
        e = d.entry
        archives.append({
            **json_name(e.name), "vmid": e.vmid, "time": e.time.isoformat(),
            "uuid": str(e.uuid), "parent": str(e.parent) if e.parent else None,
            "protected": e.protected, "keep": d.keep,
            "reasons": [display(r) for r in d.reasons],
            "needed_by": [json_name(os.path.basename(p)) for p in d.needed_by],
            "removed": e.name in removed,
            "sidecars": [json_name(s) for s in (removed.get(e.name, []) if not args.dry_run
                                                else sidecars.get(e.name, []))],
        })
    print_json({
        "ok": True, "directory": args.dir, "dry_run": args.dry_run, "archives": archives,
        "left_alone": [{**json_name(n), "reason": display(why)} for n, why in found.left_alone],
        "orphans": [json_name(os.path.basename(p)) for p in orphans],
        "notes": [{**json_name(os.path.basename(p)), "note": display(n)} for p, n in plan.notes],
        "kept": len(plan.kept), "remove": len(plan.removed), "removed": len(removed),
    })
