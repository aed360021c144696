"""Random backup directories for prune: chains of tiny archives under vzdump names, plus what
people leave beside them (symlinks, exact, truncated and damaged copies, look-alikes with a
parent's uuid, merged bases, a FIFO), and the check that matters: every chain readable before
a prune is readable after it, with the same bytes. Used by tests/test_prune_safety.py (a few
dozen seeded directories) and tools/fuzz_prune.py (as many as asked).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from vmafs.archive import naming
from vmafs.archive.chain import link_to, open_chain
from vmafs.archive.reader import Archive
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import open_output
from vmafs.errors import VmafsError
from vmafs.format import chain

C = 65536
DEV = "drive-scsi0"
SIZE = 4 * C
CONF = ("qemu-server.conf", b"scsi0: local:vm-100-disk-0\n")
T0 = datetime(2024, 1, 1, 3, 0, 0)


def vzname(day: int, vmid: str = "100", zstd: bool = False) -> str:
    return naming.vzdump_name(vmid, T0 + timedelta(days=day), zstd)


def write(path: Path, clusters: dict[int, bytes], *, parent: Path | None = None,
          uuid: bytes | None = None, ctime: int | None = None) -> None:
    """A full archive (parent None) or an increment of parent holding `clusters`."""
    configs = [CONF]
    if parent is not None:
        with Archive.open(str(parent), layer=True) as p:
            configs.append((chain.CONFIG_NAME,
                            chain.encode(chain.ChainRecord(parent=link_to(p)))))
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec(DEV, SIZE)], configs, uuid=uuid, ctime=ctime,
                          incremental=[1] if parent is not None else [])
        for c, data in sorted(clusters.items()):
            w.write(1, c * C, data)
        w.finish()


def build_chain(d: Path, names: list[str], rng: random.Random) -> list[Path]:
    """A full archive and increments under these names, each changing a random cluster."""
    paths: list[Path] = []
    for k, name in enumerate(names):
        path = d / name
        if k == 0:
            data = {c: rng.randbytes(C) for c in range(SIZE // C) if rng.random() < .7}
            write(path, data or {0: rng.randbytes(C)})  # some data: a copy of it is damaged
        else:
            write(path, {rng.randrange(SIZE // C): rng.randbytes(C)}, parent=paths[-1])
        paths.append(path)
    return paths


def data_offset(path: Path) -> int:
    """The file offset of a stored cluster's data (a plain .vma): flipping a byte there leaves
    the archive's structure and index intact, only that cluster's checksum fails."""
    with Archive.open(str(path), layer=True) as a:
        offsets = a._maps[1].all_byte_offsets()
        assert len(offsets) and not a.compressed
        return int(offsets[len(offsets) // 2]) + 100


def damage_data(path: Path) -> None:
    at = data_offset(path)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def look_alike(path: Path, of: Path, rng: random.Random) -> None:
    """A full archive with `of`'s uuid and ctime but other data (another backup)."""
    with Archive.open(str(of), layer=True) as a:
        write(path, {0: rng.randbytes(C)}, uuid=a.uuid.bytes, ctime=a.ctime)


def merge(of: Path, out: Path) -> None:
    from vmafs.cli.merge import write_full
    from vmafs.progress import Progress

    with open_chain(str(of)) as view, open_output(str(out)) as o:
        write_full(view, view.layers[-1], o, Progress("merge", 0, enabled=False))


def contents(path: Path) -> str | None:
    """A digest of what the archive at path reads as (its chain), None if it does not read."""
    try:
        with open_chain(str(path)) as a:
            h = hashlib.sha256()
            for dev in a.devices:
                h.update(bytes(a.read(dev.dev_id, 0, dev.size)))
            return h.hexdigest()
    except (VmafsError, OSError):
        return None


def readable(d: Path) -> dict[str, str]:
    """Every archive name in d (a symlink too) that reads, and what it reads as."""
    out = {}
    for name in sorted(os.listdir(d)):
        if name.endswith((".vma", ".vma.zst")) and not name.startswith("."):
            try:
                if not stat.S_ISREG(os.stat(d / name).st_mode):
                    continue
            except OSError:
                continue
            got = contents(d / name)
            if got is not None:
                out[name] = got
    return out


@dataclass
class Case:
    seed: int
    dir: Path
    args: list[str]
    made: list[str] = field(default_factory=list)  # what was put in the directory, for repro


def random_dir(root: Path, seed: int) -> Case:
    """One random backup directory and keep options (seeded: the same seed, the same case)."""
    rng = random.Random(seed)
    d = root / f"d{seed}"
    d.mkdir(parents=True)
    case = Case(seed, d, [])
    days = iter(rng.sample(range(1, 60), 20))
    chains: list[list[Path]] = []
    for _ in range(rng.randint(1, 2)):
        n = rng.randint(2, 5)
        chains.append(build_chain(d, [vzname(next(days)) for _ in range(n)], rng))
    every = [p for ch in chains for p in ch]
    extras: list[Callable[[], str]] = []

    def name_for(base: str) -> str:
        if rng.random() < .5:
            return vzname(next(days))
        name = f"{base}-{rng.randrange(999)}.vma"
        while os.path.lexists(d / name):  # drawn twice (seed 5045): another one
            name = f"{base}-{rng.randrange(999)}.vma"
        return name

    def symlink() -> str:
        target = rng.choice(every)
        name = name_for("alias")
        (d / name).symlink_to(target.name if rng.random() < .5 else target)
        return f"symlink {name} -> {target.name}"

    def copy(kind: str) -> Callable[[], str]:
        def make() -> str:
            src = rng.choice(every)
            # a copy killed half-way is often the newest name (an archive copied back)
            name = (vzname(60 + len(case.made)) if kind == "truncated" and rng.random() < .5
                    else name_for("copy"))
            shutil.copyfile(src, d / name)
            if kind == "truncated":
                truncate(d / name, rng.choice([0.3, 0.6, 0.95]))
            elif kind == "damaged":
                damage_data(d / name)
            return f"{kind} copy {name} of {src.name}"
        return make

    def lookalike() -> str:
        src = rng.choice(every)
        name = name_for("other")
        look_alike(d / name, src, rng)
        return f"look-alike {name} of {src.name}"

    def merged() -> str:
        ch = rng.choice(chains)
        point = rng.choice(ch[1:])
        name = name_for("base")
        try:
            merge(point, d / name)
        except VmafsError as exc:  # the chain does not read (a copy chosen over the real one)
            (d / name).unlink(missing_ok=True)
            return f"no merged base of {point.name} ({exc})"
        if rng.random() < .3:
            damage_data(d / name)
            return f"damaged merged base {name} of {point.name}"
        return f"merged base {name} of {point.name}"

    extras = [symlink, copy("exact"), copy("truncated"), copy("damaged"), lookalike, merged]
    for _ in range(rng.randint(1, 4)):
        case.made.append(rng.choice(extras)())
    option = rng.choice(["last", "daily", "weekly"])
    case.args = [f"--keep-{option}", str(rng.randint(1, 3))]
    return case


def check_prune(case: Case, run: Callable[[list[str]], tuple[int, bytes, str]]) -> list[str]:
    """Prune the case's directory (dry run, then for real) and say what went wrong: a chain
    readable before and not after (or other bytes), or a dry run that differs."""
    import json

    before = readable(case.dir)
    rc, dry, err = run(["prune", str(case.dir), *case.args, "--dry-run", "--json"])
    if rc != 0 or "Traceback" in err:
        return [f"dry run failed: {rc} {err}"]
    rc, real, err = run(["prune", str(case.dir), *case.args, "--json"])
    if rc != 0 or "Traceback" in err:
        return [f"prune failed: {rc} {err}"]
    plan = [(a["name"], a["keep"]) for a in json.loads(dry)["archives"]]
    done = [(a["name"], a["keep"]) for a in json.loads(real)["archives"]]
    problems = [] if plan == done else [f"dry run {plan} differs from the run {done}"]
    after = readable(case.dir)
    for name, what in before.items():
        if not os.path.lexists(case.dir / name):
            continue
        if after.get(name) != what:
            problems.append(f"{name} read before the prune and not after (or other bytes)")
    # a kept archive that does not read counts for no keep option: some backup that read
    # stays (unless one whose data is damaged but whose structure holds was kept for it:
    # only a whole read tells, which prune does not do for every archive)
    named = [n for n in before if naming.parse_vzdump_name(n) is not None]
    if named and not any(naming.parse_vzdump_name(n) is not None for n in after) \
            and not any(m.startswith("damaged") for m in case.made):
        problems.append(f"no vzdump-named archive reads after the prune ({named} did)")
    return problems
