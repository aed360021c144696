"""`vmafs snapshots`: the backups in a directory, by VM, oldest first, as `restic snapshots` or
`proxmox-backup-client snapshot list` show theirs, with whether each one's chain is complete."""

from __future__ import annotations

import argparse
import io
import os
import sys
from datetime import datetime
from typing import Any

from vmafs.archive import naming
from vmafs.archive.describe import Listing, Snapshot, snapshots
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_json
from vmafs.cli.info import iso_time
from vmafs.errors import UsageError, VmafsError
from vmafs.format.names import display, json_name
from vmafs.progress import human_bytes, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshots", help=COMMANDS["snapshots"],
                       description="List the archives (.vma, .vma.zst) in DIR, grouped by VMID "
                                   "(from the vzdump name, else a config file named like "
                                   "101.conf), oldest first: time, kind (full or incremental), "
                                   "archive size, parent, and whether the chain is complete "
                                   "(every ancestor found and its link checked). Only regular "
                                   "files are listed; an archive that cannot be read is shown "
                                   "as unreadable.")
    p.add_argument("dir", help="directory of archives")
    p.add_argument("--vmid", metavar="ID", help="only the archives of this VMID")
    add_json(p)
    p.set_defaults(run=run)


def _snapshot_json(s: Snapshot) -> dict[str, Any]:
    return {"archive": s.path, **json_name(os.path.basename(s.path)), "vmid": s.vmid,
            "uuid": str(s.uuid), "ctime": s.ctime, "time": iso_time(s.ctime),
            "incremental": s.incremental, "parent": str(s.parent) if s.parent else None,
            "archive_bytes": s.archive_bytes, "device_bytes": s.device_bytes,
            "complete": s.complete, "chain_error": s.chain_error, "protected": s.protected}


def _local(ctime: int) -> str:
    try:
        return datetime.fromtimestamp(ctime).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ctime)


def lines_of(listing: Listing) -> list[str]:
    out: list[str] = []
    group: object = ()
    for s in listing.snapshots:
        if s.vmid != group:
            group = s.vmid
            out.append(f"VMID {display(s.vmid) if s.vmid is not None else 'unknown'}:")
        kind = "incremental" if s.incremental else "full"
        line = (f"  {_local(s.ctime)}  {kind:<11}  {human_bytes(s.archive_bytes):>10}  "
                f"{display(os.path.basename(s.path))}")
        if s.parent is not None:
            line += f"  parent {s.parent}"
            line += ", complete" if s.complete else ", INCOMPLETE"
        if s.protected:
            line += "  protected"
        out.append(line)
        if s.chain_error is not None:
            out.append(f"      chain broken: {display(s.chain_error)}")
    out += [f"unreadable: {display(os.path.basename(p))}: {display(why)}"
            for p, why in listing.unreadable]
    out += [f"skipped: {display(os.path.basename(p))}: {display(why)}"
            for p, why in listing.skipped]
    vms = len({s.vmid for s in listing.snapshots})
    broken = sum(not s.complete for s in listing.snapshots)
    out.append(f"{len(listing.snapshots)} archives of {vms} VMs, {broken} with an incomplete "
               f"chain, {len(listing.unreadable)} unreadable")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        vmid = naming.check_vmid(args.vmid) if args.vmid is not None else None
    except VmafsError as exc:
        raise UsageError(str(exc)) from None
    listing = snapshots(args.dir, vmid)
    if args.json:
        print_json({
            "ok": True, "directory": args.dir,
            "snapshots": [_snapshot_json(s) for s in listing.snapshots],
            "unreadable": [{"archive": p, **json_name(os.path.basename(p)), "error": why}
                           for p, why in listing.unreadable],
            "skipped": [{"archive": p, **json_name(os.path.basename(p)), "reason": why}
                        for p, why in listing.skipped],
        })
        return 0
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write("\n".join(lines_of(listing)) + "\n")
    sys.stdout.flush()
    return 0
