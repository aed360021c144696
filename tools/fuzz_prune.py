#!/usr/bin/env python3
"""Prune over many seeded random backup directories (tests/prune_fuzz.py: chains, symlinks,
exact, truncated and damaged copies, look-alikes, merged bases): every chain readable before
a prune must be readable after it, and the dry run must decide as the run does. Prints each
failing seed with what the directory held, and how many failed.

    tools/fuzz_prune.py --count 150 [--start 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import prune_fuzz as pf  # noqa: E402
from mutations import run_cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="build the directories here (kept)")
    args = parser.parse_args()
    logging.getLogger("vmafs").setLevel(logging.ERROR)  # readers' choice notes: not findings
    root = Path(args.keep or tempfile.mkdtemp(prefix="fuzz-prune-"))
    failed = 0
    for seed in range(args.start, args.start + args.count):
        case = pf.random_dir(root, seed)

        def cli(argv: list[str]) -> tuple[int, bytes, str]:
            rc, out, err, exc = run_cli(argv)
            return (99, out, f"{exc!r}") if exc is not None else (rc, out, err)

        problems = pf.check_prune(case, cli)
        if problems:
            failed += 1
            print(f"seed {seed}: {'; '.join(case.made)}; {' '.join(case.args)}")
            for p in problems:
                print(f"    {p}")
    print(f"{failed} of {args.count} directories failed (seeds {args.start}.."
          f"{args.start + args.count - 1}; directories under {root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
