"""`vmafs umount`: unmount an archive mounted by `vmafs mount`."""

from __future__ import annotations

import argparse
from typing import Any

from vmafs.cli.common import add_json
from vmafs.progress import print_json

DESCRIPTION = """\
Unmount a vmafs mount; its daemon then exits. If a file in it is still open the unmount fails,
unless --lazy is given: then the mount point is detached at once and the daemon keeps serving the
open files until they are closed."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("umount", help="unmount an archive mounted by vmafs mount",
                              description=DESCRIPTION)
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="the directory the archive is mounted on")
    p.add_argument("-l", "-z", "--lazy", action="store_true",
                   help="detach now, even if files are open; finish when they are closed")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vmafs.mount.daemon import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    if args.json:
        print_json({"ok": True, "mountpoint": args.mountpoint, "lazy": args.lazy})
    return 0
