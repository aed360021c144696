"""`vmafs config`: print one config file of an archive (default qemu-server.conf)."""

from __future__ import annotations

import argparse
import os
import sys

from vmafs.archive.locate import check_header_at_tail
from vmafs.archive.scan import read_header
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_json
from vmafs.container.streams import open_stream
from vmafs.errors import VmafsError
from vmafs.format.names import display, display_text, json_name, raw
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help=COMMANDS["config"],
                       description="Print a config file stored in an archive, like "
                                   "Proxmox's `vma config`: its exact bytes, except on a "
                                   "terminal, where control characters other than newline "
                                   "and tab are shown escaped. Reads only the header.")
    add_archive_input(p)
    p.add_argument("name", nargs="?", default="qemu-server.conf",
                   help="config file name (default qemu-server.conf)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stream(args.archive) as stream:
        header = read_header(stream)
    check_header_at_tail(args.archive, header)  # the footer's digest, if it has one
    wanted = os.fsencode(args.name)
    # by bytes, the first match, like `vma config` (strcmp over the config slots in order)
    data = next((d for n, d in header.configs if raw(n) == wanted), None)
    if data is None:
        have = ", ".join(display(n) for n, _ in header.configs) or "none"
        raise VmafsError(f"no config file '{display(args.name)}' in the archive (it has: {have})")
    if args.json:  # the text, exact when it is UTF-8; else also its bytes in hex
        print_json({"ok": True, "archive": args.archive, **json_name(args.name),
                    "size": len(data), **json_name(data, "text")})
        return 0
    sys.stdout.buffer.write(for_terminal(data) if sys.stdout.isatty() else data)
    sys.stdout.buffer.flush()
    return 0


def for_terminal(data: bytes) -> bytes:
    """A config's text as a terminal may show it: its lines and tabs as they are, every
    other control or format character (ESC, CR, bidi overrides) and byte that is not UTF-8
    escaped as names.display_text does, so a crafted archive cannot drive the terminal
    (retitle it, clear it, fake lines). Only on a terminal: `config > FILE` and a pipe get
    the exact bytes, as `vma config` gives them."""
    text = data.decode("utf-8", "surrogateescape")
    return "\n".join("\t".join(display_text(part) for part in line.split("\t"))
                     for line in text.split("\n")).encode()
