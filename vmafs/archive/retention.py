"""Which archives a retention policy keeps: Proxmox's keep-last/-hourly/-daily/-weekly/-monthly/
-yearly (vzdump and Proxmox Backup Server decide alike), applied per VMID, then widened so no
incremental archive that stays loses an ancestor. Entries in, a plan out, no I/O of its own.

The options are applied in that order. Each walks the VM's archives newest first, skipping
archives an earlier option already decided on, and periods (hour, day, ISO week, month, year of
the archive's local time) an earlier option already keeps an archive of; it keeps the first
archive of each other period, marks the older ones of that period removed, and stops when it
keeps archives of N periods. Archives no option keeps are removed. As in PBS, a period without
archives does not count, and an option sees only what earlier options left over: keep-daily 7
keeps the newest archive of each of the 7 newest days that keep-last did not already cover.

One difference: keep-last N keeps N archives. (Proxmox counts distinct times, so of two archives
with the same time in their names, such as NAME.vma and NAME.vma.zst, it keeps one.)

Protected archives (vzdump's NAME.protected) are kept and count for no option.

An archive with the uuid of one that is kept is the same backup under another name (a copy,
NAME.vma converted to NAME.vma.zst): it is kept with it and counts for no option, so that a
copy never takes the place of an older backup.

Then the chains: an archive that is to be removed, but that an archive which stays (a kept one,
or one the plan does not cover, such as one of another VM or not named by vzdump) needs for its
chain, is kept, and so on up the chain: "needed by CHILD". What an archive needs is not decided
here but asked of the caller (`parents`: prune asks vmafs.archive.chain, which chooses a parent
as every reader does, preferring archives that stay anyway); when no parent can be told to be
the one, everything offered is kept.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from vmafs.errors import UsageError, VmafsError

OPTIONS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
NEEDED_BY = "needed by "  # the reason of an archive kept for a kept archive's chain
SAME_BACKUP = "the same backup as "  # the reason of a copy of a kept archive (its uuid)


@dataclass(frozen=True)
class KeepOptions:
    """How many archives (last) or periods (the others) to keep; 0 means the option is off."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def check(self) -> None:
        """A VmafsError unless every count is >= 0 and at least one is > 0: with none, every
        archive would be removed, and prune refuses that (as PBS wants an option)."""
        for name in OPTIONS:
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must be 0 or more")
        if not any(getattr(self, name) for name in OPTIONS):
            raise UsageError("no keep option given (at least one --keep-... greater than 0): "
                             "prune does not remove every archive")


@dataclass(frozen=True)
class Entry:
    """An archive the policy decides on."""

    path: str
    vmid: str
    time: datetime  # local wall-clock time (from the name, as vzdump reads it)
    uuid: uuidlib.UUID
    parent: uuidlib.UUID | None = None
    protected: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Staying:
    """An archive that stays whatever the policy says (not named by vzdump, another VMID ...):
    it can still need its ancestors."""

    path: str
    uuid: uuidlib.UUID
    parent: uuidlib.UUID | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Needs:
    """What an archive needs so that its chain resolves: the paths of its parent (several when
    none can be told to be the one), none for a full archive; `missing` says why its chain does
    not resolve now, `note` anything else worth saying about the choice."""

    paths: tuple[str, ...] = ()
    missing: str | None = None
    note: str | None = None


# (path of an archive that stays, whether a path stays anyway) -> what that archive needs
Parents = Callable[[str, Callable[[str], bool]], Needs]


@dataclass
class Decision:
    """Whether one archive stays, why, and which kept archives need it as their parent."""

    entry: Entry
    keep: bool
    reasons: list[str]
    needed_by: list[str] = field(default_factory=list)  # paths of kept archives: their parent


@dataclass
class Plan:
    """What prune decided for every archive of a place."""

    decisions: list[Decision]  # grouped by VMID (sorted), newest first within a VMID
    orphans: list[str] = field(default_factory=list)  # paths: they stay, their parent is gone
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what to say about it)

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    def removal_order(self) -> list[Decision]:
        """The removed archives, children before their parents (so an interrupted prune never
        leaves an archive without its parent), newest first otherwise."""
        pending = _newest_first([d.entry for d in self.removed])
        order: list[Entry] = []
        while pending:
            wanted = {e.parent for e in pending if e.parent != e.uuid}
            ready = [e for e in pending if e.uuid not in wanted] or pending[:1]  # [:1]: a cycle
            order += ready
            pending = [e for e in pending if e not in ready]
        by_path = {d.entry.path: d for d in self.decisions}
        return [by_path[e.path] for e in order]


def _newest_first(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.time, e.path), reverse=True)


# (option, the period an archive falls in, how a reason names that period)
_PERIODS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:00",
    "daily": lambda t: f"{t.year:04d}-{t.month:02d}-{t.day:02d}",
    "weekly": lambda t: "{:04d}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: f"{t.year:04d}-{t.month:02d}",
    "yearly": lambda t: f"{t.year:04d}",
}


def _mark(group: list[Entry], marks: dict[int, tuple[bool, str]], kept: dict[uuidlib.UUID, str],
          option: str, count: int, period: Callable[[int], str]) -> None:
    """One option over one VM's archives (newest first), as PBS's mark_selections; an
    archive with the uuid of one already kept (`kept`: uuid -> its name) is that backup again
    (a copy, a conversion) and counts for nothing."""
    if count <= 0:
        return
    covered = {period(i) for i, (keep, _) in marks.items() if keep}
    chosen: set[str] = set()
    for i in range(len(group)):
        if i in marks:
            continue
        same = kept.get(group[i].uuid)
        if same is not None:
            marks[i] = (True, f"{SAME_BACKUP}{same}")
            continue
        p = period(i)
        if p in covered:
            continue
        if p not in chosen:
            if len(chosen) >= count:
                break
            chosen.add(p)
            marks[i] = (True, f"keep-{option}" if option == "last" else f"keep-{option} {p}")
            kept[group[i].uuid] = group[i].name
        else:
            marks[i] = (False, f"keep-{option} keeps a newer archive of {p}")


def _by_time(group: list[Entry], period: Callable[[datetime], str]) -> Callable[[int], str]:
    return lambda i: period(group[i].time)


def _retain(group: list[Entry], options: KeepOptions) -> list[tuple[bool, str]]:
    """Each archive's mark. Archives with one uuid are the same backup under other names (a
    copy, NAME.vma converted to NAME.vma.zst): kept with it and counted once, so that a copy
    does not cost an older backup its place (keep-last 2 kept a backup and its copy and
    removed the backup before them)."""
    marks: dict[int, tuple[bool, str]] = {i: (True, "protected")
                                          for i, e in enumerate(group) if e.protected}
    kept: dict[uuidlib.UUID, str] = {}
    for i in sorted(marks):
        kept.setdefault(group[i].uuid, group[i].name)
    _mark(group, marks, kept, "last", options.last, str)  # every archive its own "period"
    for option, period in _PERIODS.items():
        _mark(group, marks, kept, option, getattr(options, option), _by_time(group, period))
    for i, e in enumerate(group):  # a copy an option passed over before it kept its backup
        if not marks.get(i, (False, ""))[0] and e.uuid in kept:
            marks[i] = (True, f"{SAME_BACKUP}{kept[e.uuid]}")
    return [marks.get(i, (False, "no keep option selects it")) for i in range(len(group))]


def plan(entries: Sequence[Entry], options: KeepOptions, staying: Sequence[Staying],
         parents: Parents) -> Plan:
    """What to keep and what to remove of `entries`; `staying` are the other archives (beside
    them) that stay whatever: their ancestors stay too; `parents` says what an archive
    needs."""
    options.check()
    paths = [e.path for e in entries] + [s.path for s in staying]
    if len(set(paths)) != len(paths):
        raise VmafsError("an archive is given twice")
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.vmid, []).append(e)
    decisions: list[Decision] = []
    for vmid in sorted(groups):
        group = _newest_first(groups[vmid])
        for e, (keep, reason) in zip(group, _retain(group, options), strict=True):
            decisions.append(Decision(e, keep, [reason]))
    result = Plan(decisions)
    _protect_chains(result, staying, parents)
    return result


def _protect_chains(result: Plan, staying: Sequence[Staying], parents: Parents) -> None:
    """Keep everything an archive that stays needs, up every chain; note the archives that
    stay although their chain does not resolve (orphans) and why."""
    by_path = {d.entry.path: d for d in result.decisions}
    staying_paths = {s.path for s in staying}

    def stays(path: str) -> bool:
        return path in staying_paths or (path in by_path and by_path[path].keep)

    todo = [s.path for s in staying][::-1] + [d.entry.path for d in result.decisions
                                              if d.keep][::-1]
    done: set[str] = set()
    rescued: set[str] = set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        needs = parents(path, stays)
        if needs.missing is not None:
            result.orphans.append(path)
            result.notes.append((path, needs.missing))
        if needs.note is not None:
            result.notes.append((path, needs.note))
        for parent in needs.paths:
            if parent == path:  # an archive naming itself as its parent needs nothing else
                continue
            d = by_path.get(parent)
            if d is not None:
                if not d.keep:
                    d.keep = True
                    rescued.add(parent)
                if path not in d.needed_by:
                    d.needed_by.append(path)
            todo.append(parent)
    for d in result.decisions:
        if d.needed_by:
            d.needed_by.sort()
            d.reasons = [] if d.entry.path in rescued else d.reasons
            d.reasons += [f"{NEEDED_BY}{os.path.basename(p)}" for p in d.needed_by]
    result.orphans.sort()
