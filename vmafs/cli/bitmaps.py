"""`vmafs bitmaps`: the vmafs dirty bitmaps of a running VM's disks, and removing them.

Each `vmafs-<uuid>` bitmap counts the guest's writes since the archive with that uuid, so an
incremental can continue from it. Bitmaps nobody continues from cost QEMU memory and a little
write time; a killed backup's own (recognised through its lock file, runlock.py) are marked.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import trio

from vmafs.backup import bitmaps, blockgraph, runlock
from vmafs.backup.guard import dead_bitmaps
from vmafs.backup.qmp import Qmp, open_qmp, query_graph
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_json
from vmafs.errors import UsageError, VmafsError, leaf
from vmafs.progress import human_bytes, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bitmaps", help=COMMANDS["bitmaps"],
        description="List the vmafs dirty bitmaps (vmafs-UUID) of the disks of the running VM "
                    "whose QMP monitor listens on SOCKET: the archive each one continues "
                    "from, how much the guest changed since, whether QEMU stores it in the "
                    "image; a killed backup's leftover is marked. --drop and --drop-all "
                    "remove bitmaps (the next backup from their archive must then be full).")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP unix socket")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--drop", action="append", default=[], metavar="UUID",
                       help="remove the bitmaps of the archive with this uuid (or this bitmap "
                            "name) from every disk; repeatable")
    group.add_argument("--drop-all", action="store_true",
                       help="remove every vmafs bitmap of every disk")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    wanted = [_bitmap_name(w) for w in args.drop]
    try:
        found, dropped = trio.run(partial(_main, args.qmp, wanted, args.drop_all))
    except BaseExceptionGroup as group:
        raise leaf(group) from None
    if args.json:
        print_json({"ok": True, "bitmaps": found, "dropped": dropped})
        return 0
    if not found:
        print("no vmafs bitmaps")
    for entry in found:
        flags = ["persistent" if entry["persistent"] else "in memory"]
        flags += [f for f in ("busy", "inconsistent") if entry[f]]
        if not entry["recording"]:
            flags.append("disabled")
        if entry["state"]:
            flags.append(entry["state"])
        print(f"{entry['disk']}\t{entry['name']}\t{human_bytes(entry['count'])} changed\t"
              f"{', '.join(flags)}")
    for entry in dropped:
        print(f"dropped {entry['name']} of {entry['disk']}")
    return 0


def _bitmap_name(text: str) -> str:
    name = text if text.startswith("vmafs-") else f"vmafs-{text}"
    if bitmaps.archive_of(name) is None:
        raise UsageError(f"--drop {text!r}: not an archive uuid or a vmafs bitmap name")
    return name


async def _main(socket: str, wanted: list[str], drop_all: bool
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return await _session(socket, wanted, drop_all)


async def _session(socket: str, wanted: list[str], drop_all: bool
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    error: VmafsError | None = None
    async with open_qmp(socket) as qmp:
        # (an error leaving open_qmp's nursery would come out as an exception group)
        try:
            return await _work(qmp, socket, wanted, drop_all)
        except VmafsError as exc:
            error = exc
    assert error is not None
    raise error


async def _work(qmp: Qmp, socket: str, wanted: list[str], drop_all: bool
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    blocks, nodes, types = await query_graph(qmp)
    try:
        disks = blockgraph.select_disks(blocks, nodes, types)
    except VmafsError:
        disks = []
    found = bitmaps.inventory(disks, nodes)
    live, leftover = _states(socket)
    for entry in found:
        entry["state"] = (f"started by a running backup (pid {live[entry['name']]})"
                          if entry["name"] in live else
                          "left by a killed backup" if entry["name"] in leftover else None)
    targets = [e for e in found if drop_all or e["name"] in wanted]
    missing = sorted(set(wanted) - {e["name"] for e in found})
    if missing:
        have = ", ".join(sorted({e["name"] for e in found})) or "none"
        raise VmafsError(f"no bitmap {', '.join(missing)} on this VM (it has: {have})")
    busy = [e for e in targets if e["name"] in live]
    if busy:
        raise VmafsError(f"{busy[0]['name']} belongs to a running backup "
                         f"(pid {live[busy[0]['name']]}); wait for it to finish")
    dropped = []
    for entry in targets:
        await qmp.execute("block-dirty-bitmap-remove",
                          {"node": entry["node"], "name": entry["name"]})
        dropped.append(entry)
    return found, dropped


def _states(socket: str) -> tuple[dict[str, int], set[str]]:
    """The bitmaps live backups of this VM are starting (name -> pid), and those dead runs
    left that must go (their archive was never committed)."""
    live: dict[str, int] = {}
    leftover: set[str] = set()
    with runlock.scan() as runs:
        for record in runs.live.values():
            if record is not None and record.bitmap and runlock.same_socket(record.qmp, socket):
                live[record.bitmap] = record.pid
        for dead in runs.abandoned:
            if dead.record is not None and runlock.same_socket(dead.record.qmp, socket):
                leftover.update(dead_bitmaps(dead.record))
    return live, leftover
