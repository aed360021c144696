"""`vmafs protect`: mark an archive as vzdump does (ARCHIVE.protected), so that prune (vmafs's
and vzdump's) never removes it; `--remove` takes the mark away."""

from __future__ import annotations

import argparse

from vmafs.archive import naming, protection
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_json
from vmafs.format.names import display
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("protect", help=COMMANDS["protect"],
                       description="Protect an archive from prune: create ARCHIVE.protected "
                                   "beside it, the empty marker vzdump and Proxmox write "
                                   "(created exclusively, never through a symlink; for an "
                                   "archive in S3 an empty object beside it, put only if the "
                                   "key is free). With "
                                   "--remove, remove the marker (only a regular file). "
                                   "Either way, nothing to do is not an error.")
    p.add_argument("archive", help="archive file (or s3://BUCKET/KEY): .vma, .vma.zst, "
                                   ".vma.gz, .vma.lzo")
    p.add_argument("--remove", action="store_true",
                   help="remove the protection marker instead")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    marker = naming.protected_marker(args.archive)
    if args.remove:
        changed = protection.unprotect(args.archive)
        message = "removed" if changed else "not protected (no"
    else:
        changed = protection.protect(args.archive)
        message = "created" if changed else "already protected (existing"
    if args.json:
        print_json({"ok": True, "archive": args.archive, "marker": marker,
                    "output": marker if changed and not args.remove else None,
                    "protected": not args.remove, "changed": changed})
    elif changed:
        print(f"{display(marker)}: {message}")
    else:
        print(f"{display(args.archive)}: {message} {display(marker)})")
    return 0
