"""Differential mutation test (issue 8): seeded mutants of archives of every kind through every
reading path — verify, extract, list, config, the Archive model, VmaFS without a kernel, the real
command, a real FUSE mount, the NBD export, restore (raw and qcow2) and S3 — must agree: the same
bytes, or an error; never other bytes, never a traceback, a hang or unbounded memory. The
mutations and the oracle are in tests/mutations.py (restore and S3: tests/mutations_paths.py);
`tools/mutate_archives.py` runs many more and prints a reproducer for each failure."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import VECTORS, fuse_missing

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mutations as mu  # noqa: E402
import mutations_nbd  # noqa: E402
import mutations_paths  # noqa: E402

if TYPE_CHECKING:
    from rgw import S3Env

pytest_plugins = ["rgw"]  # the S3 path reads mutants from the session's Ceph gateway

# base group -> (bases, seeds per kind): about 300 mutants in all, for CI
GROUPS: dict[str, tuple[list[str], int]] = {
    "vmafs-plain": (["vmafs.vma"], 12),
    "vmafs-zstd": (["vmafs.vma.zst"], 8),
    "proxmox-plain": (["spec-two-disks.vma", "spec-two-disks-59.vma",
                       "pve-legacy-positional.vma", "pve-odd-1000b.vma"], 4),
    "seekable-unindexed": (["spec-two-disks.seekable.vma.zst"], 5),
    "legacy": (["spec-two-disks.vma.zst", "spec-two-disks.vma.gz"], 3),
}
WATCHDOG_SECONDS = 120.0


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mu.Base]:
    """vmafs's own archives (plain, seekable zstd) and the vectors there are."""
    return mu.build_bases(tmp_path_factory.mktemp("mutation-bases"))


@pytest.fixture(scope="session")
def infos(bases: dict[str, mu.Base]) -> dict[str, mu.BaseInfo]:
    return {name: mu.base_info(base) for name, base in bases.items()}


def _group(infos: dict[str, mu.BaseInfo], group: str) -> dict[str, mu.BaseInfo]:
    names, _ = GROUPS[group]
    chosen = {n: infos[n] for n in names if n in infos}
    assert chosen, f"no archive of group {group} (test vectors at {VECTORS})"
    return chosen


def _report(outcomes: list[mu.Outcome]) -> str:
    failing = [o for o in outcomes if o.failures]
    lines = [f"{len(failing)} of {len(outcomes)} mutants fail:"]
    for o in failing[:15]:
        first = o.failures[0]
        lines.append(f"  {o.mutant.repro}\n      {first.path}/{first.klass}: {first.detail}"
                     + (f" (+{len(o.failures) - 1} more)" if len(o.failures) > 1 else ""))
    return "\n".join(lines) + "\n\n" + mu.summarize(outcomes)


def _run(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base], seeds: int,
         work: Path) -> list[mu.Outcome]:
    dog = mu.Watchdog(WATCHDOG_SECONDS)
    outcomes = []
    for m in mu.mutants(infos, mu.KINDS, range(seeds)):
        with dog.arm(m.id):
            outcomes.append(mu.check_mutant(m, bases[m.base], work))
    return outcomes


# -- the oracle itself -------------------------------------------------------------------------

def test_reference_reads_the_vectors(vectors: Path, proxmox_manifest: dict[str, Any],
                                     spec_manifest: dict[str, Any]) -> None:
    """The independent reference gets every Proxmox-made and spec archive right (sha256 of
    each device) and rejects exactly the bad vectors the real `vma extract` rejects."""
    import hashlib

    def images(path: Path) -> tuple[mu.Reference, dict[str, str]]:
        ref = mu.reference(path.read_bytes())
        return ref, {d.name: hashlib.sha256(d.read(0, d.size)).hexdigest()
                     for d in ref.devices.values()}

    for name, facts in proxmox_manifest.items():
        if "devices" not in facts:
            continue
        ref, got = images(vectors / "proxmox" / name)
        assert ref.clean, (name, ref.problems)
        assert got == {n: d["sha256"] for n, d in facts["devices"].items()}, name
    for name, facts in spec_manifest["samples"].items():
        if name == "vmstate.vma":
            continue  # the reference leaves vmstate aside
        ref, got = images(vectors / "spec" / name)
        assert ref.clean, (name, ref.problems)
        assert got == {d["name"]: d["sha256"] for d in facts["devices"]}, name
    for name, facts in spec_manifest["bad"].items():
        ref = mu.reference((vectors / "spec" / "bad" / name).read_bytes())
        assert ref.clean == (facts["expect"].startswith("ok")), (name, ref.problems, ref.why)


def test_mutants_reproduce(infos: dict[str, mu.BaseInfo]) -> None:
    """(base, kind, seed) always gives the same bytes: a reported seed is a reproducer."""
    for info in infos.values():
        for kind in mu.KINDS:
            a, b = mu.make_mutant(info, kind, 5), mu.make_mutant(info, kind, 5)
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert a.data == b.data and a.params == b.params


def test_reference_judges_the_index(infos: dict[str, mu.BaseInfo]) -> None:
    """Our own archives verify by the reference with their index; a data flip is undecided."""
    info = infos["vmafs.vma"]
    ref = mu.reference(info.stream)
    assert ref.clean and ref.index_claimed and ref.index_sound
    ext = info.lay.data_extents[0]
    off, _ = ext.slot_data(0)
    bad = bytearray(info.stream)
    bad[off + 100] ^= 1
    ref = mu.reference(bytes(bad))
    _, dev_id, cluster, _ = ext.slots[0]
    assert not ref.clean and ref.piece(dev_id, cluster * mu.CLUSTER, 10) is None
    assert ref.piece(dev_id, (cluster + 1) * mu.CLUSTER, 10) is not None


# -- agreement, in-process (the bulk) ----------------------------------------------------------

@pytest.mark.parametrize("group", [
    "vmafs-plain",
    "vmafs-zstd",
    "proxmox-plain",
    "seekable-unindexed",
    "legacy",
])
def test_agreement(group: str, infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base],
                   tmp_path: Path) -> None:
    """Every mutant through verify, extract, list, config, Archive and VmaFS in-process."""
    outcomes = _run(_group(infos, group), bases, GROUPS[group][1], tmp_path)
    assert outcomes
    assert not any(o.failures for o in outcomes), _report(outcomes)


# -- a few through the real command and a real mount -------------------------------------------

# (base, kind, wanted params): the first seed whose params contain these is used
SUBPROCESS_PICKS = [
    ("vmafs.vma", "none", {}),
    ("vmafs.vma", "forge", {"op": "offset-2^64"}),
    ("vmafs.vma", "truncate", {"how": "in-footer"}),
    ("vmafs.vma.zst", "seektable", {"op": "merge"}),
    ("spec-two-disks.vma", "reseal", {"op": "beyond"}),
    ("spec-two-disks.vma.gz", "truncate", {"how": "file-random"}),
    ("spec-two-disks.vma.zst", "flip", {"level": "file"}),
]
MOUNT_PICKS = [
    ("vmafs.vma", "none", {}),
    ("vmafs.vma", "combo", {"how": "append-512-zeros"}),
    ("vmafs.vma", "forge", {"op": "row-swap"}),
    ("vmafs.vma", "forge", {"op": "offset-2^64"}),
    ("spec-two-disks.vma", "truncate", {"how": "extent-boundary"}),
    ("spec-two-disks.vma", "forge", {"op": "in-last-cluster", "lie": "swap"}),
    ("spec-two-disks.vma", "reseal", {"op": "dup"}),
    ("vmafs.vma.zst", "seektable", {"op": "merge"}),
    ("vmafs.vma.zst", "combo", {"how": "footer-flip"}),
]


def _pick(infos: dict[str, mu.BaseInfo], picks: list[tuple[str, str, dict[str, Any]]]
          ) -> list[mu.Mutant]:
    chosen = []
    for base, kind, want in picks:
        if base not in infos:
            continue
        for seed in range(60):
            m = mu.make_mutant(infos[base], kind, seed)
            if m is not None and all(json.loads(m.params).get(k) == v for k, v in want.items()):
                chosen.append(m)
                break
        else:
            raise AssertionError(f"no seed of {base}/{kind} gives {want}")
    return chosen


def test_real_command(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base],
                      tmp_path: Path) -> None:
    """`python3 -m vmafs` for real: no traceback, no hang, the in-process verdicts."""
    _for_real(infos, bases, tmp_path, SUBPROCESS_PICKS, mu.check_subprocess)


@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
def test_real_mount(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base],
                    tmp_path: Path) -> None:
    """A handful of mutants mounted for real and read with pread, judged like VmaFS."""
    _for_real(infos, bases, tmp_path, MOUNT_PICKS, mu.check_mount)


# a few mutants of every kind through `vmafs serve` and an NBD client (kind: bases)
NBD_KINDS = {"none": ["vmafs.vma", "vmafs.vma.zst", "spec-two-disks.vma"],
             "flip": ["vmafs.vma", "vmafs.vma.zst"], "overwrite": ["vmafs.vma"],
             "truncate": ["vmafs.vma", "spec-two-disks.vma"], "append": ["vmafs.vma"],
             "reseal": ["spec-two-disks.vma"], "forge": ["vmafs.vma"],
             "seektable": ["vmafs.vma.zst"], "combo": ["vmafs.vma", "vmafs.vma.zst"],
             "header": ["vmafs.vma"]}


def _nbd_picks(infos: dict[str, mu.BaseInfo]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each kind on its bases ({} matches any params)."""
    return [(base, kind, {}) for kind, bases in NBD_KINDS.items() if kind in mu.KINDS
            for base in bases if base in infos]


def test_real_nbd_export(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base],
                         tmp_path: Path) -> None:
    """A few mutants of every kind served by `vmafs serve`, read over NBD, judged like the
    mount: the same bytes as extract, or an error; never a refusal of a verified archive."""
    outcomes = _through(_kind_mutants(infos), bases, tmp_path, mutations_nbd.check_nbd)
    assert len(outcomes) >= 12
    assert not any(o.failures for o in outcomes), _report(outcomes)


def _kind_mutants(infos: dict[str, mu.BaseInfo], *, legacy: bool = False) -> list[mu.Mutant]:
    """The first mutant of each kind on NBD_KINDS's bases (and a flip of each legacy
    container's)."""
    picks = _nbd_picks(infos)
    if legacy:
        picks += [(b, "flip", {}) for b in GROUPS["legacy"][0] if b in infos]
    return [m for m in (mu.make_mutant(infos[base], kind, 0) for base, kind, _ in picks)
            if m is not None]


def test_restore_path(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base],
                      tmp_path: Path) -> None:
    """A few mutants of every kind restored as raw and qcow2 images: each disk whole and the
    bytes extract gives (or the reference decides), or an error that leaves no image."""
    outcomes = _through(_kind_mutants(infos, legacy=True), bases, tmp_path,
                        mutations_paths.check_restore)
    assert len(outcomes) >= 12
    assert not any(o.failures for o in outcomes), _report(outcomes)


# forged indexes a store's archive must catch as it reads (it confirms extents lazily)
S3_PICKS = [
    ("vmafs.vma", "forge", {"op": "row-swap"}),
    ("vmafs.vma.zst", "forge", {"op": "row-swap"}),
    ("vmafs.vma", "forge", {"op": "row-drop"}),
    ("spec-two-disks.vma", "forge", {"op": "in-last-cluster", "lie": "swap"}),
    ("spec-two-disks.vma", "forge", {"op": "appended", "lie": "swap"}),
    ("vmafs.vma", "header", {"what": "size"}),
]


def test_s3_path(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base], tmp_path: Path,
                 s3: S3Env) -> None:
    """The same mutants, and forged indexes, read from the Ceph gateway: verify and extract
    get the local verdicts and bytes, and the model's ranged reads are judged as the local
    model's."""
    def through_s3(m: mu.Mutant, base: mu.Base, work: Path, out: mu.Outcome
                   ) -> list[mu.Failure]:
        suffix = base.name[base.name.index("."):]
        key = f"m/{hashlib.sha256(m.id.encode()).hexdigest()[:16]}{suffix}"
        return mutations_paths.check_s3(m, base, work, out, s3.url(key),
                                        lambda data: s3.put(key, data))

    mutants = _kind_mutants(infos, legacy=True) + _pick(infos, S3_PICKS)
    outcomes = _through(mutants, bases, tmp_path, through_s3)
    assert len(outcomes) >= 18
    assert not any(o.failures for o in outcomes), _report(outcomes)


def _through(mutants: list[mu.Mutant], bases: dict[str, mu.Base], tmp_path: Path,
             check: Callable[..., list[Any]]) -> list[mu.Outcome]:
    """The in-process verdicts of each mutant, then `check` through one more reading path."""
    outcomes = []
    for m in mutants:
        out = mu.check_mutant(m, bases[m.base], tmp_path, fs=False)
        out.failures = [f for f in out.failures if f.path not in ("model", "fs")]
        out.failures += check(m, bases[m.base], tmp_path, out)
        outcomes.append(out)
    return outcomes


def _for_real(infos: dict[str, mu.BaseInfo], bases: dict[str, mu.Base], tmp_path: Path,
              picks: list[tuple[str, str, dict[str, Any]]],
              check: Callable[..., list[Any]]) -> None:
    """The in-process verdicts of the picked mutants, then `check` through the real thing."""
    outcomes = _through(_pick(infos, picks), bases, tmp_path, check)
    assert not any(o.failures for o in outcomes), _report(outcomes)


def test_memory_and_tool(tmp_path: Path) -> None:
    """One seed of every kind on every base in a fresh process (the tool): no hang, and the
    whole run stays far below 256 MiB."""
    proc = subprocess.run(
        [sys.executable, str(mu.ROOT / "tools" / "mutate_archives.py"), "--count", "1",
         "--seed", "11", "--json", "--save", str(tmp_path / "failing")],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode in (0, 1, 3), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["mutants"] > 50
    assert summary["max_rss_mib"] < 200, summary["max_rss_mib"]
