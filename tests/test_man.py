"""Every subcommand has a man page in man/, and the page names exactly the options --help has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from vmafs.cli import build_parser

MAN = Path(__file__).resolve().parent.parent / "man"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_man_page_matches_help(name: str) -> None:
    page = MAN / f"vmafs-{name}.1"
    assert page.exists(), f"missing {page}; write it (tools/gen_man.py {name} drafts one)"
    text = re.sub(r"\\f[BIRP]", "", page.read_text()).replace("\\-", "-")
    parser = subcommands()[name]
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert options - {"--help"} <= documented, f"undocumented: {options - documented}"
    assert documented <= options | {"--help"}, f"not in --help: {documented - options}"


def test_overview_page_lists_every_command() -> None:
    text = (MAN / "vmafs.1").read_text().replace("\\-", "-")
    for name in subcommands():
        assert f"vmafs-{name}" in text
