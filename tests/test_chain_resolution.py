"""How a chain's parents are found (issue 13, items 2, 4, 8, 10), through the real commands:
a symlink is the archive it points to, a truncated or damaged copy is passed over (and the
warning says which archive was taken), a damaged merged base gives way to the intact original
chain, a FIFO named like an archive blocks nothing (a real FUSE mount too), and one depth limit
holds for every command: a chain of MAX_DEPTH archives reads and merges, a deeper one is one
line naming the archive to merge, and merging it is the way out.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, fuse_missing, run_vmafs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_fuzz as pf  # noqa: E402

from vmafs.archive import chain  # noqa: E402
from vmafs.archive.reader import MAX_LAYERS, Archive  # noqa: E402

NO_FUSE = fuse_missing()
DISK = f"disk-{pf.DEV}.raw"


def small_chain(tmp_path: Path, n: int = 3, seed: int = 3) -> tuple[Path, list[Path]]:
    d = tmp_path / "d"
    d.mkdir()
    return d, pf.build_chain(d, [f"c{k}.vma" for k in range(n)], random.Random(seed))


def image_of(path: Path) -> bytes:
    with chain.open_chain(str(path)) as a:
        return bytes(a.read(1, 0, pf.SIZE))


def chain_names(path: Path) -> list[str]:
    layers = chain.resolve(str(path))
    for a in layers:
        a.close()
    return [os.path.basename(a.path or "") for a in layers]


def extracted(path: Path, dest: Path) -> bytes:
    rc, _, err = run_vmafs("extract", "-q", path, dest, timeout=120)
    assert rc == 0, err
    return (dest / DISK).read_bytes()


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@contextlib.contextmanager
def mounted(archive: Path, mnt: Path) -> Iterator[Path]:
    """A real, detached vmafs mount (its daemon resolves the chain itself)."""
    mnt.mkdir(exist_ok=True)
    rc, _, err = run_vmafs("mount", archive, mnt, timeout=60)
    assert rc == 0, err
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            rc, _, err = run_vmafs("umount", mnt, timeout=60)
            if rc:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            deadline = time.monotonic() + 10
            while is_mounted(mnt) and time.monotonic() < deadline:
                time.sleep(0.02)


# -- item 2: what carries a parent's uuid is not a parent for that ------------------------------

def test_a_symlink_is_its_target(tmp_path: Path) -> None:
    d, paths = small_chain(tmp_path)
    (d / "a-alias.vma").symlink_to(paths[0].name)  # sorts first
    rc, _, err = run_vmafs("extract", "-q", paths[-1], tmp_path / "x")
    assert rc == 0 and err == "", err  # one archive: no choice to report
    assert chain_names(paths[-1]) == ["c0.vma", "c1.vma", "c2.vma"]
    assert (tmp_path / "x" / DISK).read_bytes() == image_of(paths[-1])


@pytest.mark.parametrize("how", ["truncated", "damaged"])
def test_a_broken_copy_is_passed_over_and_named(tmp_path: Path, how: str) -> None:
    d, paths = small_chain(tmp_path)
    want = image_of(paths[-1])
    shutil.copyfile(paths[0], d / "a-copy.vma")  # sorts before the real one
    (pf.truncate if how == "truncated" else pf.damage_data)(d / "a-copy.vma")
    assert chain_names(paths[-1]) == ["c0.vma", "c1.vma", "c2.vma"]
    rc, _, err = run_vmafs("extract", "-q", paths[-1], tmp_path / "x")
    assert rc == 0, err
    assert (tmp_path / "x" / DISK).read_bytes() == want
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "c0.vma chosen" in warning[0] and "a-copy.vma" in warning[0]


def test_an_exact_copy_serves_when_the_original_is_gone(tmp_path: Path) -> None:
    d, paths = small_chain(tmp_path)
    want = image_of(paths[-1])
    shutil.copyfile(paths[0], d / "copy.vma")
    paths[0].unlink()
    assert chain_names(paths[-1]) == ["copy.vma", "c1.vma", "c2.vma"]
    assert extracted(paths[-1], tmp_path / "x") == want


def test_a_look_alike_is_refused(tmp_path: Path) -> None:
    d, paths = small_chain(tmp_path)
    pf.look_alike(d / "other.vma", paths[0], random.Random(1))
    paths[0].unlink()
    rc, _, err = run_vmafs("extract", "-q", paths[-1], tmp_path / "x")
    assert_one_line_error(rc, err, "other.vma", "another archive with the same uuid")
    assert rc == 3


# -- item 10: a damaged merged base gives way to the intact chain ---------------------------------

def test_a_damaged_merged_base_gives_way(tmp_path: Path) -> None:
    d, paths = small_chain(tmp_path, 4)
    want = image_of(paths[-1])
    rc, _, err = run_vmafs("merge", "-q", "-o", d / "base.vma", paths[2])
    assert rc == 0, err
    assert chain_names(paths[-1]) == ["base.vma", "c3.vma"]  # intact: it is preferred
    pf.damage_data(d / "base.vma")
    assert chain_names(paths[-1]) == ["c0.vma", "c1.vma", "c2.vma", "c3.vma"]
    rc, _, err = run_vmafs("verify", "-q", paths[-1])
    assert rc == 0, err
    assert "base.vma" in err and "does not read back" in err
    assert extracted(paths[-1], tmp_path / "x") == want
    if NO_FUSE is None:
        with mounted(paths[-1], tmp_path / "m") as mnt:
            assert (mnt / DISK).read_bytes() == want


def test_a_whole_read_is_remembered_for_the_unchanged_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Readers of a merged base beside the chain it folded read it whole once (the walk
    cache remembers the pass for the unchanged file); a changed file is read again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(chain, "READ_WHOLE_WORTH", 0)  # tiny archives are worth it here
    d, paths = small_chain(tmp_path, 4)
    rc, _, err = run_vmafs("merge", "-q", "-o", d / "base.vma", paths[2])
    assert rc == 0, err
    written = set((tmp_path / "cache").rglob("*.ok"))  # what writing them remembered
    assert chain_names(paths[-1]) == ["base.vma", "c3.vma"]
    assert len(set((tmp_path / "cache").rglob("*.ok")) - written) == 1
    assert chain_names(paths[-1]) == ["base.vma", "c3.vma"]  # from the cache
    before = os.stat(d / "base.vma")
    pf.damage_data(d / "base.vma")
    if os.stat(d / "base.vma").st_mtime_ns == before.st_mtime_ns:  # a coarse clock's tick
        os.utime(d / "base.vma", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert chain_names(paths[-1]) == ["c0.vma", "c1.vma", "c2.vma", "c3.vma"]


# -- item 8: a FIFO named like an archive --------------------------------------------------------

@pytest.fixture
def fifo_dir(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """A chain beside FIFOs named like archives, each held open by a writer that writes
    nothing (a reader that opened one would block for ever)."""
    d, paths = small_chain(tmp_path)
    fds = []
    for name in ("a.vma", "c1-copy.vma.zst", "z.vma"):
        os.mkfifo(d / name)
        fds.append(os.open(d / name, os.O_RDWR | os.O_NONBLOCK))
    try:
        yield d, paths
    finally:
        for fd in fds:
            os.close(fd)


def test_a_fifo_blocks_no_command(fifo_dir: tuple[Path, list[Path]], tmp_path: Path) -> None:
    d, paths = fifo_dir
    newest = paths[-1]
    want = image_of(newest)
    for args in (["list", newest], ["verify", "-q", newest],
                 ["merge", "-q", "-o", tmp_path / "m.vma", newest],
                 ["prune", d, "--keep-last", "9", "--dry-run"],
                 ["list", newest, "--base", d / "a.vma"]):
        rc, _, err = run_vmafs(*args, timeout=60)  # a hang is a TimeoutExpired: a failure
        if "--base" in args:
            assert_one_line_error(rc, err, "a.vma", "not a regular file")
        else:
            assert rc == 0 and "Traceback" not in err, (args, err)
    assert extracted(newest, tmp_path / "x") == want
    if NO_FUSE is None:
        with mounted(newest, tmp_path / "mnt") as mnt:
            assert (mnt / DISK).read_bytes() == want


# -- item 4: one depth limit ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A chain of MAX_DEPTH + 2 tiny archives: paths[k]'s chain has k + 1 archives."""
    d = tmp_path_factory.mktemp("deep")
    rng = random.Random(9)
    paths = [d / "c000.vma"]
    pf.write(paths[0], {0: rng.randbytes(pf.C)})
    for k in range(1, chain.MAX_DEPTH + 2):
        paths.append(d / f"c{k:03d}.vma")
        pf.write(paths[-1], {k % 4: rng.randbytes(64)}, parent=paths[-2])
    return paths


def test_the_depth_limit_is_what_a_stack_can_number() -> None:
    assert chain.MAX_DEPTH == MAX_LAYERS == 256


def test_a_chain_at_the_limit_reads_and_merges(deep: list[Path], tmp_path: Path) -> None:
    at = deep[chain.MAX_DEPTH - 1]
    with chain.open_chain(str(at)) as a:
        assert len(a.layers) == chain.MAX_DEPTH
        want = bytes(a.read(1, 0, pf.SIZE))
    assert extracted(at, tmp_path / "x") == want
    rc, _, err = run_vmafs("merge", "-q", "-o", tmp_path / "m.vma", at, timeout=120)
    assert rc == 0, err
    with Archive.open(str(tmp_path / "m.vma")) as m:
        assert bytes(m.read(1, 0, pf.SIZE)) == want
    # backup --incremental asks check_extend: one more archive would be too many
    assert chain.check_extend(str(deep[chain.MAX_DEPTH - 2])) == chain.MAX_DEPTH - 1
    with pytest.raises(chain.ChainError, match="the most a chain may have"):
        chain.check_extend(str(at))


@pytest.mark.parametrize("over", [1, 2])
def test_a_deeper_chain_is_one_line_naming_the_way_out(deep: list[Path], tmp_path: Path,
                                                        over: int) -> None:
    newest = deep[chain.MAX_DEPTH - 1 + over]
    point = deep[chain.MAX_DEPTH - 1]  # the archive whose chain is MAX_DEPTH long
    fragments = (newest.name, f"{chain.MAX_DEPTH + over} archives", "merge", str(point))
    commands = [["list", newest], ["verify", "-q", newest],
                ["extract", "-q", newest, tmp_path / "x"],
                ["merge", "-q", "-o", tmp_path / "m.vma", newest]]
    if NO_FUSE is None:
        (tmp_path / "mnt").mkdir()
        commands.append(["mount", newest, tmp_path / "mnt"])
    for args in commands:
        rc, _, err = run_vmafs(*args, timeout=120)
        assert_one_line_error(rc, err, *fragments)
        assert rc == 3, (args, err)
    assert not (tmp_path / "m.vma").exists() and not (tmp_path / "x").exists()
    if NO_FUSE is None:
        assert not is_mounted(tmp_path / "mnt")


def test_merging_the_named_archive_is_the_way_out(deep: list[Path], tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for p in deep:
        os.link(p, d / p.name)
    newest = d / deep[-1].name
    with chain.open_chain(str(deep[-3])) as a:
        want_at = bytes(a.read(1, 0, pf.SIZE))
    rc, _, err = run_vmafs("merge", "-q", "-o", d / "base.vma", d / deep[-3].name, timeout=120)
    assert rc == 0, err
    assert chain_names(newest) == ["base.vma", deep[-2].name, deep[-1].name]
    with Archive.open(str(d / "base.vma")) as b:
        assert bytes(b.read(1, 0, pf.SIZE)) == want_at
    rc, _, err = run_vmafs("extract", "-q", newest, tmp_path / "x", timeout=120)
    assert rc == 0, err
