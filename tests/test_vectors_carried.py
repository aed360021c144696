"""The test vectors travel with the repository: a bare clone runs every vector test.

The vectors are a copy of the project's shared set (archives made by the real Proxmox `vma` and
spec archives with the real reader's verdicts). No test may reach outside the repository for them.
"""

from __future__ import annotations

import json
import re

from conftest import ROOT, VECTORS


def test_every_manifest_entry_is_in_the_repository() -> None:
    assert VECTORS == ROOT / "tests" / "vectors"
    proxmox = json.loads((VECTORS / "proxmox" / "MANIFEST.json").read_text())
    spec = json.loads((VECTORS / "spec" / "MANIFEST.json").read_text())
    names = [VECTORS / "proxmox" / n for n in proxmox]
    names += [VECTORS / "spec" / n for n in spec["samples"]]
    names += [VECTORS / "spec" / "bad" / n for n in spec["bad"]]
    missing = [str(p.relative_to(ROOT)) for p in names if not p.is_file()]
    assert not missing, missing
    assert len(names) > 20


def test_no_test_reads_outside_the_repository() -> None:
    """What made the vectors fail on a bare clone (read from the project's shared folder
    beside the repository) cannot come back."""
    folder = "sha" + "red"  # spelled apart, so this test does not find itself
    outside = re.compile(rf"""\.\./{folder}|["']{folder}["']|/work/{folder}""")
    files = [p for p in [*ROOT.glob("tests/*.py"), *ROOT.glob("tools/*")]
             if p.is_file() and p.suffix in (".py", ".sh", "")]
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if outside.search(p.read_text(errors="replace"))]
    assert not offenders, offenders
