"""Pieces shared by the subcommands: flags, safe file names, progress."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from vmafs.format.names import json_name
from vmafs.progress import Progress


def add_archive_input(parser: argparse.ArgumentParser, dest: str = "archive") -> None:
    parser.add_argument(dest, help="archive to read: .vma, .vma.zst, .vma.gz, .vma.lzo "
                                   "(any vzdump archive), or - for stdin")


def add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", action="append", default=[], metavar="ARCHIVE",
                        help="an ancestor of an incremental archive that is not in its "
                             "child's directory (repeatable; the directory is searched too)")


def add_configs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", action="append", default=[], metavar="[NAME=]FILE",
                        help="add a config file: any *.conf (like 101.conf) is stored as "
                             "qemu-server.conf and *.fw as qemu-server.fw, the names Proxmox "
                             "reads; NAME=FILE stores it as NAME; others by base name "
                             "(repeatable)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable JSON summary on stdout")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high (else a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value
    return parse


def add_compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", type=int_in(1, 22), default=None, metavar="N",
                        help="zstd level for .vma.zst output, 1 to 22 (default 4)")
    parser.add_argument("--threads", type=int_in(1, 64), default=2, metavar="N",
                        help="zstd compression threads, 1 to 64 (default 2)")
    parser.add_argument("--frame-size", type=int_in(64, 8192), metavar="KIB",
                        help="seekable zstd frame size in KiB, 64 to 8192 (default 1536: within "
                             "1%% of vzdump's zstd -3 size on an ext4 image of /usr at the "
                             "default level; smaller frames read a random 4 KiB faster "
                             "through a mount, for more size: 1024 is about 3%% bigger)")
    parser.add_argument("--zstd", action="store_true",
                        help="compress (seekable zstd) even when writing to stdout")


def progress_for(args: argparse.Namespace, label: str, total: int) -> Progress:
    return Progress(label, total, enabled=False if getattr(args, "quiet", False) else None)


def device_list(devices: Iterable[Any]) -> list[dict[str, Any]]:
    """`devices` in --json: one object per disk, its name exact (json_name) and its size."""
    return [{**json_name(d.name), "device_bytes": d.size} for d in devices]


def frame_bytes(args: argparse.Namespace) -> int | None:
    """--frame-size in bytes, or None for the container's default."""
    return args.frame_size * 1024 if args.frame_size else None
