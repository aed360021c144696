"""`vmafs list`: what an archive holds, as `vma list` prints it (or JSON)."""

from __future__ import annotations

import argparse
import io
import sys
import uuid
from typing import Any

from vmafs.archive.chain import resolve
from vmafs.archive.configs import vm_configs
from vmafs.archive.locate import check_header_at_tail
from vmafs.archive.scan import read_header
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_base, add_json
from vmafs.container.streams import open_stream
from vmafs.errors import VmafsError
from vmafs.format import chain
from vmafs.format.names import display, format_ctime, json_name
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help=COMMANDS["list"],
                       description="List the config files and devices of an archive, like "
                                   "Proxmox's `vma list`. Reads only the header; for an "
                                   "incremental archive also its chain (CHAIN lines, oldest "
                                   "first), every link checked.")
    add_archive_input(p)
    add_base(p)
    add_json(p)
    p.set_defaults(run=run)


def chain_of(path: str, bases: list[str]) -> list[dict[str, Any]]:
    """The archives of an incremental archive's chain, oldest first (every link checked)."""
    if path == "-":
        raise VmafsError("an incremental archive's chain is listed from its file, not stdin")
    layers = resolve(path, bases)
    try:
        return [{"archive": a.path, "uuid": str(a.uuid), "ctime": a.ctime,
                 "incremental": a.incremental,
                 "stored_bytes": sum(a.stored_bytes(d.dev_id) for d in a.devices)}
                for a in layers]
    finally:
        for a in layers:
            a.close()


def run(args: argparse.Namespace) -> int:
    with open_stream(args.archive) as stream:
        header = read_header(stream)
    check_header_at_tail(args.archive, header)  # the footer's digest, if it has one
    links = chain_of(args.archive, args.base) if chain.is_incremental(header.configs) else []
    if args.json:  # exact names (json_name: non-UTF-8 bytes also as hex)
        record = chain.find(header.configs)
        parent = record.parent if record is not None else None
        print_json({
            "ok": True, "archive": args.archive,
            "uuid": str(uuid.UUID(bytes=header.uuid)),
            "ctime": header.ctime,
            "configs": [{**json_name(n), "size": len(d)} for n, d in vm_configs(header.configs)],
            "devices": [{"dev_id": d.dev_id, **json_name(d.name), "device_bytes": d.size}
                        for d in header.devices],
            "device_bytes": sum(d.size for d in header.devices),
            "incremental": parent is not None,
            "parent": str(parent.uuid) if parent is not None else None,
            "vmstate": ({"dev_id": header.vmstate.dev_id, "size": header.vmstate.size}
                        if header.vmstate else None),
            "chain": links,
        })
        return 0
    # every name escaped: a newline in a name must not forge a line, nor ESC reach the terminal
    lines = [f"{'CHAIN-RECORD' if name == chain.CONFIG_NAME else 'CFG'}: size: {len(data)} "
             f"name: {display(name)}" for name, data in header.configs]
    lines += [f"DEV: dev_id={d.dev_id} size: {d.size} devname: {display(d.name)}"
              for d in header.devices]
    if header.vmstate:
        lines.append(f"VMSTATE: dev_id={header.vmstate.dev_id} memory: {header.vmstate.size}")
    lines.append(f"CTIME: {format_ctime(header.ctime)}")
    for i, link in enumerate(links):
        kind = "incremental" if link["incremental"] else "full"
        lines.append(f"CHAIN: {i} {kind} uuid: {link['uuid']} ctime: "
                     f"{format_ctime(link['ctime'])} stored: {link['stored_bytes']} "
                     f"file: {display(link['archive'])}")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a terminal that cannot show a character
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 0
