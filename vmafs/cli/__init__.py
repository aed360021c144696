"""The `vmafs` command: one module per subcommand, each with add_parser() and run()."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmafs import __version__
from vmafs.errors import VmafsError

# Subcommand modules under vmafs.cli; each defines add_parser(subparsers) and run(args) -> int.
# The one-line helps live here so `vmafs --help` need not import every command's dependencies.
COMMANDS = {
    "backup": "back up a running QEMU VM (live, copy-before-write) into an archive",
    "create": "back up disk image files into an archive",
    "list": "list the devices and config files of an archive",
    "config": "print a config file stored in an archive",
    "verify": "check an archive completely",
    "extract": "restore disk images and config files into a directory",
    "convert": "rewrite an archive as an indexed (mountable) one",
    "prune": "remove the archives of a directory that keep options do not keep",
    "merge": "fold an incremental chain into one full archive (or a new base)",
    "mount": "mount an archive read-only: one raw image file per disk",
    "umount": "unmount an archive mounted by vmafs mount",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, only that subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="vmafs",
        description="Back up QEMU VMs into Proxmox-compatible VMA archives and mount them.",
    )
    parser.add_argument("--version", action="version", version=f"vmafs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"vmafs.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; VmafsError becomes a one-line message and its exit code."""
    words = [*(sys.argv[1:] if argv is None else argv)]  # `list` is also a subcommand module
    chosen = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(words)
    try:
        return int(args.run(args) or 0)
    except VmafsError as exc:
        print(f"vmafs {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vmafs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        name = f": {exc.filename}" if exc.filename else ""
        print(f"vmafs {args.command}: error: {exc.strerror or exc}{name}", file=sys.stderr)
        return 1
