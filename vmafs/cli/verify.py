"""`vmafs verify`: every rule Proxmox's reader enforces, completeness, and our checksums; for
an incremental archive, every link of its chain and every archive in it."""

from __future__ import annotations

import argparse
import sys

from vmafs.archive import problems
from vmafs.archive.chain import resolve
from vmafs.archive.problems import Problem, problem_of
from vmafs.archive.scan import ScanResult, read_header, scan_stream
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_archive_input, add_base, add_json, add_quiet, progress_for
from vmafs.container.streams import open_stream
from vmafs.errors import EXIT_DAMAGED, FormatError, VmafsError, about
from vmafs.format.names import display
from vmafs.progress import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help=COMMANDS["verify"],
                       description="Read the whole archive and check every rule of Proxmox's "
                                   "VMA reader, that every cluster of every device is present "
                                   "exactly once, and the data checksums of the trailing index. "
                                   "An incremental archive holds only what changed: verify "
                                   "then checks every link of its chain (each parent present, "
                                   "the one it was taken from) and every archive of the chain. "
                                   "Exit status 0 only if everything holds.")
    add_archive_input(p)
    add_base(p)
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def scan_file(path: str, quiet: bool) -> ScanResult:
    """One archive, start to end; a rule broken on the way raises FormatError."""
    with open_stream(path) as stream:  # one pass, so stdin works too
        header = read_header(stream)
        progress = progress_for(argparse.Namespace(quiet=quiet), "verify",
                                sum(d.size for d in header.devices))
        try:
            return scan_stream(stream, progress=progress.update, header=header)
        finally:
            progress.finish()


def check_chain(path: str, bases: list[str], quiet: bool) -> tuple[list[str], list[Problem]]:
    """The ancestors of an incremental archive (oldest first) and what is wrong with them."""
    if path == "-":
        return [], [Problem(problems.CHAIN, "incremental: its chain is verified from its file, "
                            "not from standard input")]
    try:
        layers = resolve(path, bases)
    except VmafsError as exc:
        return [], [Problem(problems.CHAIN, str(exc))]
    paths = [a.path or "" for a in layers]
    for archive in layers:
        archive.close()
    found: list[Problem] = []
    for ancestor in paths[:-1]:
        try:
            result = scan_file(ancestor, quiet)
        except FormatError as exc:
            found.append(_in(ancestor, problem_of(exc)))
            continue
        found += [_in(ancestor, p) for p in result.problems]
    return paths, found


def _in(path: str, problem: Problem) -> Problem:
    return Problem(problem.kind, f"ancestor {display(path)}: {problem.message}",
                   problem.device, problem.cluster, problem.offset)


def run(args: argparse.Namespace) -> int:
    try:
        result = scan_file(args.archive, args.quiet)
    except FormatError as exc:
        if args.json:
            print_json({"archive": args.archive, "ok": False,
                        "problems": [problem_of(exc).to_json()]})
        raise about(args.archive, exc) from None
    found = list(result.problems)
    chain: list[str] = []
    if result.incremental and not found:
        chain, chain_problems = check_chain(args.archive, args.base, args.quiet)
        found += chain_problems
    ok = not found
    if args.json:
        print_json({
            "archive": args.archive, "ok": ok,
            "problems": [p.to_json() for p in found],
            "devices": len(result.header.devices), "extents": result.extents,
            "stored_bytes": result.stored_bytes, "indexed": result.has_index,
            "incremental": result.incremental, "chain": chain,
        })
    elif ok:
        what = ("data checksums verified" if result.has_index
                else "no vmafs index: no data checksums")
        if chain:
            what += f"; a chain of {len(chain)} archives, every link and archive checked"
        print(f"{args.archive}: OK ({len(result.header.devices)} devices, "
              f"{result.extents} extents, {result.stored_bytes} bytes stored; {what})")
    else:
        for problem in found:  # a chain problem names the archive it is about
            prefix = "" if problem.kind == problems.CHAIN else f"{args.archive}: "
            print(f"{prefix}{problem}", file=sys.stderr)
    return 0 if ok else EXIT_DAMAGED
