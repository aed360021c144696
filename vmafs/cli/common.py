"""Pieces shared by the subcommands: flags, safe file names, progress."""

from __future__ import annotations

import argparse

from vmafs.progress import Progress


def add_archive_input(parser: argparse.ArgumentParser, dest: str = "archive") -> None:
    parser.add_argument(dest, help="archive to read: .vma, .vma.zst, .vma.gz, .vma.lzo "
                                   "(any vzdump archive), or - for stdin")


def add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", action="append", default=[], metavar="ARCHIVE",
                        help="an ancestor of an incremental archive that is not in its "
                             "child's directory (repeatable; the directory is searched too)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable JSON summary on stdout")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def add_compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", type=int, default=3, metavar="N",
                        help="zstd level for .vma.zst output (default 3)")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="zstd compression threads (default 2)")
    parser.add_argument("--zstd", action="store_true",
                        help="compress (seekable zstd) even when writing to stdout")


def progress_for(args: argparse.Namespace, label: str, total: int) -> Progress:
    return Progress(label, total, enabled=False if getattr(args, "quiet", False) else None)
