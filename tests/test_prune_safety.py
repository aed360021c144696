"""prune never removes what a kept chain needs (issue 13, item 2): another file carrying an
ancestor's uuid (a symlink to it, a truncated, damaged or exact copy, a merged base) is never
taken as a stand-in on its uuid alone; what prune relies on it has opened and checked, and read
whole where a removal depends on it. A prune killed at any removal leaves every chain readable,
and a seeded fuzzer over random directories checks that every chain readable before a prune is
readable after it, dry run and run deciding alike.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_vmafs

from vmafs.archive.chain import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_fuzz as pf  # noqa: E402
from mutations import run_cli  # noqa: E402


def chain_dir(tmp_path: Path, seed: int = 1) -> tuple[Path, list[Path]]:
    """full (day 1) <- inc (day 2) <- inc (day 3), under vzdump names."""
    d = tmp_path / "dump"
    d.mkdir()
    return d, pf.build_chain(d, [pf.vzname(day) for day in (1, 2, 3)], random.Random(seed))


def chain_paths(path: Path) -> list[Path]:
    layers = resolve(str(path))
    for a in layers:
        a.close()
    return [Path(a.path or "") for a in layers]


def prune_json(d: Path, *args: str, real: bool = True) -> tuple[dict[str, Any], str]:
    """`vmafs prune D ARGS --json`: the real command, or (real=False) in-process."""
    rc, out, err = (run_vmafs if real else _cli)("prune", str(d), *args, "--json")
    assert rc == 0 and "Traceback" not in err, err
    return json.loads(out), err


def pruned(d: Path, *args: str) -> tuple[dict[str, bool], str]:
    """Prune (dry run first: it must decide alike) and check every chain that read before
    reads after with the same bytes; what was kept, and stderr."""
    before = pf.readable(d)
    dry, _ = prune_json(d, *args, "--dry-run", real=False)
    done, err = prune_json(d, *args)
    keep = {a["name"]: a["keep"] for a in done["archives"]}
    assert {a["name"]: a["keep"] for a in dry["archives"]} == keep
    after = pf.readable(d)
    for name, what in before.items():
        if os.path.lexists(d / name):
            assert after.get(name) == what, f"{name} read before the prune, not after"
    return keep, err


@pytest.mark.parametrize("named", ["other", "vzdump"])
@pytest.mark.parametrize("kind", ["symlink", "truncated", "damaged"])
def test_a_file_with_the_ancestors_uuid_is_no_stand_in(tmp_path: Path, kind: str,
                                                        named: str) -> None:
    d, (full, inc1, inc2) = chain_dir(tmp_path)
    name = "alias.vma" if named == "other" else pf.vzname(0)  # older than the chain
    if kind == "symlink":
        (d / name).symlink_to(full.name)
    else:
        shutil.copyfile(full, d / name)
        (pf.truncate if kind == "truncated" else pf.damage_data)(d / name)
    want = pf.contents(inc2)
    assert want is not None
    keep, err = pruned(d, "--keep-last", "1")
    assert keep[inc2.name] and keep[inc1.name] and keep[full.name], (keep, err)
    assert full.exists() and pf.contents(inc2) == want
    assert chain_paths(inc2) == [full, inc1, inc2]


def test_an_exact_copy_serves_once_read_whole(tmp_path: Path) -> None:
    """A stand-in that is proven equal (its digest) and reads back whole may replace the
    archive it copies."""
    d, (full, inc1, inc2) = chain_dir(tmp_path)
    shutil.copyfile(full, d / "copy.vma")
    want = pf.contents(inc2)
    keep, err = pruned(d, "--keep-last", "1")
    assert keep == {inc2.name: True, inc1.name: True, full.name: False}, err
    assert not full.exists() and pf.contents(inc2) == want


@pytest.mark.parametrize("damaged", [False, True])
def test_a_merged_base_serves_only_when_it_reads_whole(tmp_path: Path, damaged: bool) -> None:
    """Items 2 and 10: a merged base stands for the archive it folds up to; damaged, the
    original chain is kept (and readers read through it)."""
    d, (full, inc1, inc2) = chain_dir(tmp_path)
    pf.merge(inc1, d / "base.vma")
    if damaged:
        pf.damage_data(d / "base.vma")
    want = pf.contents(inc2)
    keep, err = pruned(d, "--keep-last", "1")
    assert keep == {inc2.name: True, inc1.name: damaged, full.name: damaged}, err
    assert pf.contents(inc2) == want
    if damaged:
        assert "base.vma" in err and "does not read back" in err


def test_a_chain_that_does_not_resolve_keeps_every_candidate(tmp_path: Path) -> None:
    """When no archive with the parent's uuid checks out, prune cannot tell which one the
    chain needs: all of them stay, and it says why."""
    d, (full, inc1, inc2) = chain_dir(tmp_path)
    pf.damage_data(full)  # data only: it still opens, and its digest holds
    pf.truncate(inc1)
    keep, err = pruned(d, "--keep-last", "1")
    assert keep == {inc2.name: True, inc1.name: True, full.name: True}, err
    assert inc2.name in err and "unreadable" in err


KILL_HOOK = '''import os, signal
_after = int(os.environ["VMAFS_TEST_KILL_AFTER"])
_unlink = os.unlink
_count = [0]
def unlink(*args, **kwargs):
    if _count[0] >= _after:
        os.kill(os.getpid(), signal.SIGKILL)
    _count[0] += 1
    return _unlink(*args, **kwargs)
os.unlink = unlink
'''


def test_sigkill_during_prune_leaves_every_chain_readable(tmp_path: Path) -> None:
    """SIGKILL before each removal in turn (a hook kills the process at its k-th unlink):
    whatever is left reads as before, and prune run again ends where an unkilled one does."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    pf.build_chain(src, [pf.vzname(day) for day in range(1, 7)], rng)
    pf.build_chain(src, [pf.vzname(day) for day in (10, 11)], rng)
    (src / (pf.vzname(1)[:-4] + ".log")).write_text("log\n")
    shutil.copyfile(src / pf.vzname(2), src / "copy.vma")
    before = pf.readable(src)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    rc, _, err = run_vmafs("prune", ref, "--keep-last", "1")
    assert rc == 0, err
    final = sorted(os.listdir(ref))
    assert len(final) < len(os.listdir(src)) - 4
    for k in range(8):
        d = tmp_path / f"k{k}"
        shutil.copytree(src, d)
        env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "VMAFS_TEST_KILL_AFTER": str(k)}
        rc, _, err = run_vmafs("prune", d, "--keep-last", "1", env=env)
        assert rc in (0, -signal.SIGKILL), err
        after = pf.readable(d)
        for name, what in before.items():
            if os.path.lexists(d / name):
                assert after.get(name) == what, f"killed at unlink {k}: {name} no longer reads"
        rc, _, err = _cli("prune", str(d), "--keep-last", "1")
        assert rc == 0, err
        assert sorted(os.listdir(d)) == final, k


FUZZ_SEEDS = range(24)


def test_prune_fuzzer(tmp_path: Path) -> None:
    """Seeded random directories (chains, symlinks, exact, truncated and damaged copies,
    look-alikes, merged bases, damaged or not): every chain readable before a prune is
    readable after it; tools/fuzz_prune.py runs more."""
    failures = []
    for seed in FUZZ_SEEDS:
        case = pf.random_dir(tmp_path, seed)
        found = pf.check_prune(case, lambda argv: _cli(*argv))
        failures += [f"seed {seed} ({'; '.join(case.made)}; {case.args}): {f}" for f in found]
    assert not failures, "\n".join(failures)


def _cli(*args: str) -> tuple[int, bytes, str]:
    """vmafs in-process (nothing may escape main)."""
    rc, out, err, exc = run_cli(list(args))
    assert exc is None, exc
    return rc, out, err


def test_the_man_page_says_what_prune_does() -> None:
    """Item 12: the page said archives sharing a uuid "are all kept"; prune keeps the one a
    chain resolves through (all of them only when it cannot tell)."""
    page = (ROOT / "man" / "vmafs-prune.1").read_text()
    assert "are all kept" not in page
    assert "never by uuid alone" in page and "all of them are kept" in page
