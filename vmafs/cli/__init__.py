"""The `vmafs` command: one module per subcommand, each with add_parser() and run()."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmafs import __version__
from vmafs.errors import VmafsError

# Subcommand modules under vmafs.cli; each defines add_parser(subparsers) and run(args) -> int.
COMMANDS = (
    "create", "backup", "list", "config", "verify", "extract", "convert", "mount", "umount",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmafs",
        description="Back up QEMU VMs into Proxmox-compatible VMA archives and mount them.",
    )
    parser.add_argument("--version", action="version", version=f"vmafs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vmafs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vmafs.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; VmafsError becomes a one-line message and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except VmafsError as exc:
        print(f"vmafs {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vmafs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        name = f": {exc.filename}" if exc.filename else ""
        print(f"vmafs {args.command}: error: {exc.strerror or exc}{name}", file=sys.stderr)
        return 1
