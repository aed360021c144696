#!/usr/bin/env python3
"""Write man/vmafs-<command>.1 from the argparse definitions, so pages and --help agree.

Usage: tools/gen_man.py [COMMAND...]   (default: every command that has no page yet)
Pages may be edited by hand afterwards; tests/test_man.py checks they still match the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vmafs import __version__  # noqa: E402
from vmafs.cli import build_parser  # noqa: E402


def esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("\n.", "\n\\&.")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """name -> (parser, one-line help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {n: (p, helps.get(n, "")) for n, p in action.choices.items()}
    return {}


def render(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [
        f'.TH VMAFS\\-{name.upper()} 1 "" "vmafs {__version__}" "vmafs manual"',
        ".SH NAME",
        f"vmafs\\-{name} \\- {esc(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        esc(" ".join(usage.split())),
        ".fi",
        ".SH DESCRIPTION",
        esc(parser.description or ""),
        ".SH OPTIONS",
    ]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            flags = ", ".join(
                f"\\fB{esc(s)}\\fR" + (f" \\fI{esc(action.metavar or action.dest.upper())}\\fR"
                                       if action.nargs != 0 else "")
                for s in action.option_strings)
        else:
            flags = f"\\fI{esc(str(action.metavar or action.dest))}\\fR"
        lines += [".TP", flags, esc(action.help or "")]
    lines += [".SH EXIT STATUS", "0 on success; 1 with a one-line message on stderr otherwise.",
              ".SH SEE ALSO", "\\fBvmafs\\fR(1)", ""]
    return "\n".join(lines)


def main() -> None:
    subs = subparsers(build_parser())
    names = sys.argv[1:] or [n for n in subs if not os.path.exists(f"man/vmafs-{n}.1")]
    for name in names:
        with open(f"man/vmafs-{name}.1", "w") as f:
            f.write(render(name, *subs[name]))
        print(f"man/vmafs-{name}.1")


if __name__ == "__main__":
    main()
