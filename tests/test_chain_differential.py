"""The chain differential test: seeded random chains (2-4 archives, plain and seekable zstd,
long zeroed runs, partial clusters, a disk copied whole into an increment), one archive of each
mutated (bit flips, overwrites, cuts, appended bytes, a flip in data a newer layer replaces,
zero-slot edits with and without a resealed extent header, chain records edited, an archive
substituted by another or by a forgery, or converted), then every reader of the chain (verify,
extract, merge, list, a real FUSE mount) against an independent truth: the disks the layers'
writes describe (test_chain.apply), never what a vmafs reader says.

What must hold:
- a reader either fails (one line, no traceback, nothing written) or gives exactly the truth;
- verify passes only an unchanged meaning (a conversion), or the one known limit: an edit of
  the newest increment's zero slots that resealed its extent header (a well-formed archive;
  only a child's link could tell), which every reader then reads the same edited way;
- verify 0 or 4 (damage only where a newer layer replaces it) means every other reader
  succeeds with the truth; extract and merge succeed or fail together, as do list and mount,
  and the mount reads every byte exactly when extract succeeds;
- a conversion keeps the verdict "all good" and the bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from archive_helpers import walk_vma
from conftest import run_vmafs
from mutations import run_cli
from test_chain import (
    NO_FUSE,
    C,
    Chain,
    Layer,
    Op,
    blocky,
    build_chain,
    disk_file,
    is_mounted,
    mutate,
    write_archive,
    zstd_stream,
)

from vmafs.archive.reader import Archive
from vmafs.errors import EXIT_SUPERSEDED_DAMAGE

A, B = "drive-scsi0", "drive-virtio1"
KINDS = ["flip", "overwrite", "cut", "append", "superseded", "zero-drop", "zero-drop-sealed",
         "zero-add-sealed", "record", "substitute", "forge", "convert"]
MUTANTS = 24  # two of each kind, seeded; about a second each with a real mount


# -- random chains --------------------------------------------------------------------------------

def random_ops(rng: random.Random, sizes: dict[str, int], devs: list[str], whole: bool
               ) -> list[Op]:
    """Writes and zeroes over disjoint cluster runs (a writer takes each cluster once)."""
    weights = [1, 6, 1, 1, 1, 1] if whole else [8, 2, 1, 1, 2, 1]
    ops: list[Op] = []
    for dev in devs:
        size = sizes[dev]
        n = -(-size // C)
        c = 0
        while c < n:
            run = min(n - c, rng.randint(1, 6) if rng.random() < 0.85 else rng.randint(30, 70))
            kind = rng.choices(["skip", "write", "blocky", "partial", "zero", "zpart"],
                               weights)[0]
            lo, hi = c * C, min((c + run) * C, size)
            if kind in ("partial", "zpart", "blocky"):
                run, hi = 1, min((c + 1) * C, size)
            if kind == "write":
                ops.append(("write", dev, lo, rng.randbytes(hi - lo)))
            elif kind == "blocky":
                blocks = rng.sample(range(16), rng.randint(1, 5))
                ops.append(("write", dev, lo, blocky(rng, blocks, hi - lo)))
            elif kind == "zero":
                ops.append(("zero", dev, lo, hi - lo))
            elif kind in ("partial", "zpart"):
                off = rng.randrange(hi - lo)
                length = rng.randint(1, hi - lo - off)
                ops.append(("write", dev, lo + off, rng.randbytes(length)) if kind == "partial"
                           else ("zero", dev, lo + off, length))
            c += run
    rng.shuffle(ops)  # any order: the writer sorts it out
    return ops


def random_chain(rng: random.Random, directory: Path) -> Chain:
    sizes = {A: rng.choice([9, 14, 75]) * C, B: rng.randint(3, 6) * C + rng.choice([0, 700])}
    count = rng.randint(2, 4)
    layers = [Layer(f"l0{rng.choice(['.vma', '.vma.zst'])}", [A, B], set(),
                    random_ops(rng, sizes, [A, B], True))]
    for k in range(1, count):
        incremental = {A, B} if rng.random() < 0.75 else {rng.choice([A, B])}
        devices = [A, B] if rng.random() < 0.7 else [B, A]
        ops = [op for dev in devices
               for op in random_ops(rng, sizes, [dev], dev not in incremental)]
        layers.append(Layer(f"l{k}{rng.choice(['.vma', '.vma.zst'])}", devices, incremental,
                            ops))
    return build_chain(directory, layers, sizes)


# -- mutations ------------------------------------------------------------------------------------

@dataclass
class Mutant:
    chain: Chain
    dir: Path
    victim: int          # which archive of the chain
    what: str
    truth: dict[str, bytes]  # what a reader that succeeds must give
    neutral: bool = False    # the meaning is unchanged: every reader must succeed
    sealed_newest: bool = False  # the known limit: verify may pass the edited archive

    @property
    def newest(self) -> Path:
        return self.dir / self.chain.names[-1]


def as_plain(path: Path) -> bytearray:
    """The archive's plain stream, written back in place (a neutral change: parents are found
    by uuid and the container by its magic, not by the name)."""
    data = bytearray(zstd_stream(path) if path.read_bytes()[:4] != b"VMA\0" else
                     path.read_bytes())
    path.write_bytes(data)
    return data


def reseal(data: bytearray, off: int) -> None:
    head = bytearray(data[off:off + 512])
    head[24:40] = bytes(16)
    data[off + 24:off + 40] = hashlib.md5(head).digest()


def slots(data: bytearray) -> list[tuple[int, int]]:
    """(extent offset, slot position) of every slot of the extents with used slots."""
    return [(off, off + 40 + 8 * s) for off, used, _ in walk_vma(data).extents if used
            for s in range(59)]


def zero_edit(m: Mutant, rng: random.Random, add: bool, sealed: bool) -> bool:
    """Drop one zero slot, or turn an empty slot into a zero slot of a cluster this archive
    has no slot for; the truth follows if the newest was edited (the known limit)."""
    path = m.dir / m.chain.names[m.victim]
    data = as_plain(path)
    spots = [(off, at) for off, at in slots(data)
             if (struct.unpack_from(">Q", data, at)[0] == 0) == add
             and (add or (lambda i: i >> 32 & 0xFF and not i >> 48)(
                 struct.unpack_from(">Q", data, at)[0]))]
    if not spots:
        return False
    off, at = rng.choice(spots)
    names = {i: n for i, (n, _) in walk_vma(data).devices.items()}
    if add:
        dev_id = rng.choice(sorted(names))
        with Archive.open(str(path), layer=True) as a:
            held = a.held(dev_id)
            size = a.device(dev_id).size
        # a full archive has every cluster already: the new slot repeats one
        free = [c for c in range(-(-size // C)) if held is None or c not in held]
        if not free:
            return False
        cluster = rng.choice(free)
        struct.pack_into(">Q", data, at, dev_id << 32 | cluster)
    else:
        info = struct.unpack_from(">Q", data, at)[0]
        dev_id, cluster = info >> 32 & 0xFF, info & 0xFFFFFFFF
        struct.pack_into(">Q", data, at, 0)
    if sealed:
        reseal(data, off)
    path.write_bytes(data)
    m.what = (f"{'add' if add else 'drop'} zero slot of cluster {cluster} of "
              f"{names[dev_id]}{' resealed' if sealed else ''}")
    if sealed and m.victim == len(m.chain.paths) - 1:
        m.sealed_newest = True
        name = names[dev_id]
        image = bytearray(m.truth[name])
        end = min((cluster + 1) * C, len(image))
        image[cluster * C:end] = (bytes(end - cluster * C) if add
                                  else m.chain.states[-2][name][cluster * C:end])
        m.truth = {**m.truth, name: bytes(image)}
    return True


def superseded_flip(m: Mutant, rng: random.Random) -> bool:
    """Flip a byte in the stored data of a cluster a newer archive replaces."""
    if m.victim == len(m.chain.paths) - 1:
        return False
    path = m.dir / m.chain.names[m.victim]
    newer = [Archive.open(str(p), layer=True) for p in m.chain.paths[m.victim + 1:]]
    try:
        with Archive.open(str(path), layer=True) as a:
            choices = []
            for dev in a.devices:
                dmap = a._maps[dev.dev_id]
                offsets = dmap.all_byte_offsets()
                for row, cluster in enumerate(dmap.clusters.tolist()):
                    if any((n.held(d.dev_id) is not None and cluster in n.held(d.dev_id))
                           for n in newer for d in n.devices if d.name == dev.name):
                        choices.append((dev.name, cluster, int(offsets[row])))
    finally:
        for n in newer:
            n.close()
    if not choices:
        return False
    data = as_plain(path)
    name, cluster, offset = rng.choice(choices)
    with Archive.open(str(path), layer=True) as a:  # offsets of the plain stream
        dev = next(d for d in a.devices if d.name == name)
        dmap = a._maps[dev.dev_id]
        offset = int(dmap.all_byte_offsets()[int(dmap.clusters.searchsorted(cluster))])
    data[offset + rng.randrange(4096)] ^= 1 << rng.randrange(8)
    path.write_bytes(data)
    m.what = f"flip in superseded cluster {cluster} of {name}"
    return True


def edit_record(m: Mutant, rng: random.Random) -> bool:
    """Change the parent's digest or ctime in the chain record; the header resealed."""
    if m.victim == 0:
        return False
    path = m.dir / m.chain.names[m.victim]
    data = as_plain(path)
    header_size = struct.unpack_from(">I", data, 56)[0]
    if rng.random() < 0.5:
        at = data.find(b'"digest": "', 0, header_size) + 11 + rng.randrange(64)
        data[at] = ord("0") if data[at] != ord("0") else ord("1")
        m.what = "record: parent digest changed"
    else:
        at = data.find(b'"ctime": ', 0, header_size) + 9
        data[at + 2] = ord("0") + (data[at + 2] - ord("0") + 1) % 10
        m.what = "record: parent ctime changed"
    data[32:48] = bytes(16)
    data[32:48] = hashlib.md5(data[:header_size]).digest()
    path.write_bytes(data)
    return True


def make_mutant(seed: int, work: Path) -> Mutant:
    """Mutant `seed` (its kind: KINDS[seed % len(KINDS)]); a chain the kind cannot apply to
    (no zero slot to drop, nothing superseded) is replaced by the next one tried."""
    for attempt in range(20):
        m = _try_mutant(seed, attempt, work / f"a{attempt}")
        if m is not None:
            return m
    raise AssertionError(f"seed {seed}: no chain the mutation applies to")


def _try_mutant(seed: int, attempt: int, work: Path) -> Mutant | None:
    rng = random.Random(seed * 1000 + attempt)
    kind = KINDS[seed % len(KINDS)]
    ch = random_chain(rng, work / f"c{seed}")
    d = ch.copy(work / f"m{seed}")
    victim = rng.randrange(len(ch.paths))
    m = Mutant(ch, d, victim, kind, ch.states[-1])
    path = d / ch.names[victim]
    if kind in ("flip", "overwrite", "cut"):
        data, m.what = mutate(path.read_bytes(), rng, kind)
        path.write_bytes(data)
    elif kind == "append":
        path.write_bytes(path.read_bytes() + rng.randbytes(rng.randint(1, 2000)))
        m.what = "appended bytes"
    elif kind == "superseded":
        m.victim = rng.randrange(len(ch.paths) - 1)
        if not superseded_flip(m, rng):
            return None
    elif kind.startswith("zero-"):
        if not zero_edit(m, rng, "add" in kind, "sealed" in kind):
            return None
    elif kind == "record":
        if not edit_record(m, rng):
            return None
    elif kind in ("substitute", "forge"):
        if victim == len(ch.paths) - 1:
            m.victim = victim = max(0, victim - 1)
            path = d / ch.names[victim]
        other = random_chain(random.Random(seed + 10**6), work / f"o{seed}")
        donor = other.paths[min(victim, len(other.paths) - 1)]
        if kind == "forge":  # the victim's uuid, time, devices and parent, other data
            with Archive.open(str(path), layer=True) as a:
                uuid, ctime = a.uuid.bytes, a.ctime
                devices = [dv.name for dv in a.devices]
            donor = work / f"forged{seed}{''.join(path.suffixes)}"
            write_archive(donor, Layer(donor.name, devices, set(devices) if victim else set(),
                                       random_ops(rng, ch.sizes, devices, victim == 0)),
                          ch.sizes, ctime=ctime, uuid=uuid,
                          parent=d / ch.names[victim - 1] if victim else None)
        os.unlink(path)
        shutil.copyfile(donor, path)
        m.what = f"{kind}: {ch.names[victim]} replaced by {donor.name}"
    elif kind == "convert":
        src = ch.paths[victim]
        os.unlink(path)
        how = rng.choice(["zstd<->plain", "gzip"])
        if how == "gzip":
            plain = work / f"g{seed}.vma"
            plain.write_bytes(zstd_stream(src) if src.suffix == ".zst" else src.read_bytes())
            gz = work / f"g{seed}.vma.gz"
            gz.write_bytes(gzip.compress(plain.read_bytes(), 1))
            src = gz
        out = path.with_name(path.name.replace(".vma.zst", ".vma") if path.suffix == ".zst"
                             else path.name + ".zst")
        rc, _, err, exc = run_cli(["convert", "-q", str(src), str(out)])
        assert rc == 0 and exc is None, err
        if out.name != path.name:
            os.rename(out, path)  # the name is kept, the container changes
        m.what, m.neutral = f"converted ({how})", True
    return m


# -- readers --------------------------------------------------------------------------------------

@dataclass
class Verdicts:
    verify: int
    extract: int
    merge: int
    list: int
    mount: int | None  # None: no FUSE here
    mount_read_all: bool
    wrong: list[str]


def read_back(archive: Path) -> dict[str, bytes]:
    with Archive.open(str(archive)) as a:
        return {d.name: bytes(a.read(d.dev_id, 0, d.size)) for d in a.devices}


def every_reader(m: Mutant, work: Path) -> Verdicts:
    newest = str(m.newest)
    wrong: list[str] = []

    def cli(*args: str) -> int:
        rc, _, err, exc = run_cli(list(args))
        if exc is not None or "Traceback" in err:
            wrong.append(f"{args[0]} escaped: {exc!r} {err[-300:]}")
        elif rc:
            errors = [ln for ln in err.splitlines() if ": warning: " not in ln]
            if len(errors) != (0 if rc == EXIT_SUPERSEDED_DAMAGE else 1):
                wrong.append(f"{args[0]} rc {rc} with {len(errors)} error lines: {err[-300:]}")
        return rc

    rc_v = cli("verify", "-q", newest)
    xdir = work / "x"
    rc_x = cli("extract", "-q", newest, str(xdir))
    if rc_x == 0:
        for name, want in m.truth.items():
            if (xdir / disk_file(name)).read_bytes() != want:
                wrong.append(f"extract wrote other bytes of {name}")
    elif xdir.exists() and os.listdir(xdir):
        wrong.append(f"a failed extract left {os.listdir(xdir)}")
    merged = work / "merged.vma"
    rc_m = cli("merge", "-q", "-o", str(merged), newest)
    if rc_m == 0 and read_back(merged) != m.truth:
        wrong.append("merge wrote other bytes")
    elif rc_m and merged.exists():
        wrong.append("a failed merge left its output")
    rc_l = cli("list", newest)
    rc_mount: int | None = None
    read_all = False
    if NO_FUSE is None:
        mnt = work / "mnt"
        mnt.mkdir()
        rc_mount, _, err = run_vmafs("mount", newest, mnt, timeout=60)
        if rc_mount == 0:
            try:
                read_all = True
                for name, want in m.truth.items():
                    try:
                        got = (mnt / disk_file(name)).read_bytes()
                    except OSError:
                        read_all = False
                        continue
                    if got != want:
                        wrong.append(f"the mount served other bytes of {name}")
            finally:
                rc, _, err = run_vmafs("umount", mnt, timeout=60)
                if rc or is_mounted(mnt):
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        elif "Traceback" in err or len(err.splitlines()) != 1:
            wrong.append(f"mount failed without one line: {err[-300:]}")
    return Verdicts(rc_v, rc_x, rc_m, rc_l, rc_mount, read_all, wrong)


def judge(m: Mutant, v: Verdicts) -> list[str]:
    bad = list(v.wrong)
    changed = not m.neutral
    if v.verify not in (0, 3, EXIT_SUPERSEDED_DAMAGE):
        bad.append(f"verify exit {v.verify}")
    if v.verify == 0 and changed and not m.sealed_newest:
        bad.append("verify passed a changed chain")
    if m.neutral and (v.verify, v.extract, v.merge, v.list) != (0, 0, 0, 0):
        bad.append(f"a conversion changed a verdict: {v}")
    if v.verify in (0, EXIT_SUPERSEDED_DAMAGE) and (v.extract, v.merge, v.list) != (0, 0, 0):
        bad.append(f"verify {v.verify} but extract {v.extract} merge {v.merge} list {v.list}")
    if (v.extract == 0) != (v.merge == 0):
        bad.append(f"extract {v.extract} but merge {v.merge}")
    if v.mount is not None:
        if (v.mount == 0) != (v.list == 0):
            bad.append(f"list {v.list} but mount {v.mount}")
        if v.mount == 0 and v.mount_read_all != (v.extract == 0):
            bad.append(f"mount read everything: {v.mount_read_all}, extract {v.extract}")
    if m.what.startswith("flip in superseded") and v.verify != EXIT_SUPERSEDED_DAMAGE:
        bad.append(f"superseded damage: verify {v.verify}, not {EXIT_SUPERSEDED_DAMAGE}")
    return bad


def test_chain_differential(tmp_path: Path) -> None:
    failures: list[str] = []
    seen: dict[str, int] = {}
    for seed in range(MUTANTS):
        work = tmp_path / f"s{seed}"
        m = make_mutant(seed, work)
        v = every_reader(m, work)
        key = f"{KINDS[seed % len(KINDS)]}: verify={v.verify} extract={v.extract}"
        seen[key] = seen.get(key, 0) + 1
        repro = f"seed {seed}: {m.chain.names[m.victim]} of {len(m.chain.paths)}: {m.what}"
        failures += [f"{repro}: {b}" for b in judge(m, v)]
        shutil.rmtree(work, ignore_errors=True)
    summary = "\n".join(f"  {k}: {n}" for k, n in sorted(seen.items()))
    assert not failures, "\n".join(failures) + "\n" + summary
