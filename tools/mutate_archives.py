#!/usr/bin/env python3
"""Differential mutation run: seeded mutants of archives of every kind through every reading
path of vmafs (verify, extract, list, config, the Archive model, VmaFS without a kernel, and on
request the real command and a real FUSE mount), judged by the oracle in tests/mutations.py.

    tools/mutate_archives.py --seed 0 --count 20                 # 20 seeds per kind and base
    tools/mutate_archives.py --kinds reseal,forge --large        # also the 10 MB Proxmox vectors
    tools/mutate_archives.py --base vmafs.vma --kind combo --seed 3 -v   # one reproducer
    tools/mutate_archives.py --save DIR ...                      # keep each failing mutant
    tools/mutate_archives.py --vmafs /tmp/head ...    # another tree (`git archive HEAD | tar x`)

Prints a table of failing mutants per kind and reading path, then each failure class with a
reproducer line. Exit status: 0 no failure, 1 failures found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mutations as mu  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--count", type=int, default=10, help="seeds per kind and base")
    ap.add_argument("--kinds", default=",".join(mu.KINDS), help="comma-separated kinds")
    ap.add_argument("--kind", help="one kind (same as --kinds KIND)")
    ap.add_argument("--base", action="append", default=[], help="only these bases")
    ap.add_argument("--large", action="store_true", help="also the 10 MB Proxmox vectors")
    ap.add_argument("--vectors", type=Path, default=mu.VECTORS)
    ap.add_argument("--vmafs", type=Path, metavar="DIR",
                    help="test the vmafs package in DIR (e.g. an unpacked `git archive HEAD`)")
    ap.add_argument("--subprocess", type=int, default=0, metavar="N",
                    help="also run the first N mutants through `python3 -m vmafs`")
    ap.add_argument("--mount", type=int, default=0, metavar="N",
                    help="also read the first N mutants through a real FUSE mount")
    ap.add_argument("--no-fs", action="store_true", help="skip the VmaFS path")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per mutant")
    ap.add_argument("--save", type=Path, help="write each failing mutant into this directory")
    ap.add_argument("--json", action="store_true", help="a JSON summary instead of the table")
    ap.add_argument("-v", "--verbose", action="store_true", help="every failure of every mutant")
    args = ap.parse_args(argv)
    if args.vmafs:
        if "vmafs" in sys.modules:
            ap.error("--vmafs must be given before vmafs is imported")
        sys.path.insert(0, str(args.vmafs.resolve()))
        mu.SRC = args.vmafs.resolve()
    kinds = [args.kind] if args.kind else [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in mu.KINDS]
    if unknown:
        ap.error(f"unknown kind {unknown[0]!r} (kinds: {', '.join(mu.KINDS)})")

    with tempfile.TemporaryDirectory(prefix="vmafs-mutate-") as tmp:
        work = Path(tmp)
        bases = mu.build_bases(work / "bases", args.vectors, large=args.large)
        if args.base:
            missing = [b for b in args.base if b not in bases]
            if missing:
                ap.error(f"no base {missing[0]!r} (bases: {', '.join(bases)})")
            bases = {n: b for n, b in bases.items() if n in args.base}
        infos = {n: mu.base_info(b) for n, b in bases.items()}
        dog = mu.Watchdog(args.timeout)
        outcomes: list[mu.Outcome] = []
        t0 = time.monotonic()
        seeds = range(args.seed, args.seed + args.count)
        for i, m in enumerate(mu.mutants(infos, kinds, seeds)):
            base = bases[m.base]
            with dog.arm(m.id):
                out = mu.check_mutant(m, base, work, fs=not args.no_fs)
                if i < args.subprocess:
                    out.failures += mu.check_subprocess(m, base, work, out)
                if i < args.mount:
                    out.failures += mu.check_mount(m, base, work, out)
            if out.failures and args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / m.id.replace(":", "_")).write_bytes(m.data)
            out.mutant = dataclasses.replace(m, data=b"")  # keep the run's memory flat
            outcomes.append(out)
            if args.verbose and out.failures:
                print(f"{m.id}  verify={'ok' if out.verify_ok else 'rejects'}  {m.params}")
                for f in out.failures[:12]:
                    print(f"    {f.path}/{f.klass}: {f.detail}")
                if len(out.failures) > 12:
                    print(f"    ... {len(out.failures) - 12} more")
        seconds = time.monotonic() - t0
    rss_mib = _peak_rss_mib()
    failing = [o for o in outcomes if o.failures]
    if args.json:
        json.dump({
            "mutants": len(outcomes), "failing": len(failing), "seconds": round(seconds, 1),
            "max_rss_mib": round(rss_mib, 1),
            "failures": [{"mutant": o.mutant.id, "params": o.mutant.params,
                          "verify_ok": o.verify_ok,
                          "failures": _firsts(o.failures)}
                         for o in failing],
        }, sys.stdout, indent=1)
        print()
    else:
        print(mu.summarize(outcomes))
        print(f"\n{len(outcomes)} mutants, {len(failing)} failing, {seconds:.1f} s, "
              f"max RSS {rss_mib:.0f} MiB")
    return 1 if failing else 0


def _peak_rss_mib() -> float:
    """This process's peak RSS. Not ru_maxrss: after fork+exec that also counts the parent
    (pytest) as it was when it forked."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _firsts(failures: list[mu.Failure], per_class: int = 3) -> list[dict[str, str]]:
    """The first few failures of each (path, class) of a mutant."""
    kept: dict[tuple[str, str], int] = {}
    out = []
    for f in failures:
        n = kept.get((f.path, f.klass), 0)
        if n < per_class:
            kept[(f.path, f.klass)] = n + 1
            out.append(dict(vars(f)))
    return out


if __name__ == "__main__":
    sys.exit(main())
