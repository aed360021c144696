"""`vmafs verify`: every rule Proxmox's reader enforces, completeness, and our checksums."""

from __future__ import annotations

import argparse
import sys

from vmafs.archive.problems import problem_of
from vmafs.archive.scan import read_header, scan_stream
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_json, add_quiet, progress_for
from vmafs.container.streams import open_stream
from vmafs.errors import FormatError, VmafsError
from vmafs.progress import Progress, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help=COMMANDS["verify"],
                       description="Read the whole archive and check every rule of Proxmox's "
                                   "VMA reader, that every cluster of every device is present "
                                   "exactly once, and the data checksums of the trailing index. "
                                   "Exit status 0 only if everything holds.")
    add_archive_input(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    progress: Progress | None = None
    with open_stream(args.archive) as stream:  # one pass, so stdin works too
        try:
            header = read_header(stream)
            progress = progress_for(args, "verify", sum(d.size for d in header.devices))
            result = scan_stream(stream, progress=progress.update, header=header)
        except FormatError as exc:
            if progress is not None:
                progress.finish()
            if args.json:
                print_json({"archive": args.archive, "ok": False,
                            "problems": [problem_of(exc).to_json()]})
            raise VmafsError(f"{args.archive}: {exc}") from None
    progress.finish()
    ok = not result.problems
    if args.json:
        print_json({
            "archive": args.archive, "ok": ok,
            "problems": [p.to_json() for p in result.problems],
            "devices": len(result.header.devices), "extents": result.extents,
            "stored_bytes": result.stored_bytes, "indexed": result.has_index,
        })
    elif ok:
        what = ("data checksums verified" if result.has_index
                else "no vmafs index: no data checksums")
        print(f"{args.archive}: OK ({len(result.header.devices)} devices, "
              f"{result.extents} extents, {result.stored_bytes} bytes stored; {what})")
    else:
        for problem in result.problems:
            print(f"{args.archive}: {problem}", file=sys.stderr)
    return 0 if ok else 1
