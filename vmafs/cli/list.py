"""`vmafs list`: what an archive holds, as `vma list` prints it (or JSON)."""

from __future__ import annotations

import argparse
import io
import sys
import uuid

from vmafs.archive.scan import read_header
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_json, format_ctime
from vmafs.container.streams import open_stream
from vmafs.format.names import display, json_name
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help=COMMANDS["list"],
                       description="List the config files and devices of an archive, like "
                                   "Proxmox's `vma list`. Reads only the header.")
    add_archive_input(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stream(args.archive) as stream:
        header = read_header(stream)
    if args.json:  # exact names (json_name: non-UTF-8 bytes also as hex)
        print_json({
            "uuid": str(uuid.UUID(bytes=header.uuid)),
            "ctime": header.ctime,
            "configs": [{**json_name(n), "size": len(d)} for n, d in header.configs],
            "devices": [{"dev_id": d.dev_id, **json_name(d.name), "size": d.size}
                        for d in header.devices],
            "vmstate": ({"dev_id": header.vmstate.dev_id, "size": header.vmstate.size}
                        if header.vmstate else None),
        })
        return 0
    # every name escaped: a newline in a name must not forge a line, nor ESC reach the terminal
    lines = [f"CFG: size: {len(data)} name: {display(name)}" for name, data in header.configs]
    lines += [f"DEV: dev_id={d.dev_id} size: {d.size} devname: {display(d.name)}"
              for d in header.devices]
    if header.vmstate:
        lines.append(f"VMSTATE: dev_id={header.vmstate.dev_id} memory: {header.vmstate.size}")
    lines.append(f"CTIME: {format_ctime(header.ctime)}")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a terminal that cannot show a character
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 0
