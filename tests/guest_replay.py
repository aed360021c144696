"""The exact content of the writer guest's disks at any point of its write sequence.

The ``writer`` workload of tests/guest/vmafs-guest.c is deterministic given its seed: iteration
N (N = 1, 2, ...) is four steps, in this order, each finished before the next starts::

    record_a(N)  scribble_a(N)  record_b(N)  scribble_b(N)

(counter record N at COUNTER_OFFSET, then 4 KiB .. SCRIBBLE_MAX of pseudo-random data at a
pseudo-random offset in [SCRIBBLE_START, WRITE_REGION); ``_a`` is vda, ``_b`` vdb).  The same
program, compiled for the host, replays the first STEPS steps onto copies of the disks as they
were before the guest started (``vmafs-guest replay``), so a test can compute what a
point-in-time copy of the disks must hold, byte for byte::

    base_a, base_b = read_image(a, "qcow2"), read_image(b, "raw")   # before boot
    ...                                                            # guest writes, backup runs
    assert_state(arc_a, arc_b, base_a, base_b, counter_a, counter_b)

Which steps a copy holds follows from its two counter records: counter_b == counter_a == N
means record_b(N) is in and scribble_b(N) may be (steps 4(N-1)+3 or 4(N-1)+4); counter_b ==
counter_a - 1 means record_a(N) is in and scribble_a(N) may be (4(N-1)+1 or 4(N-1)+2).  The
write in flight at that instant may be split by the guest kernel, so each 4 KiB block of the
pending scribble may be old or new on its own.

The guests the tests boot get no ``vmafs.seed=``: init.sh then passes 1 (``SEED``).  A writer
restarted after a write error (``VMAFS-ERROR writer exited; restarting`` on the console)
starts again from N = 1 over what it already wrote: its disks are not a replay of one seed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import guestimage as gi

#: The seed init.sh gives the writer when the kernel command line has no vmafs.seed=.
SEED = 1
#: Granularity at which a pending scribble may be half written.
BLOCK = 4096

StepKind = Literal["none", "record_a", "scribble_a", "record_b", "scribble_b"]
_STEP_RE = re.compile(rb"^STEP (none|record_a|scribble_a|record_b|scribble_b) (\d+) (\d+)\n\Z")


@dataclass(frozen=True)
class Step:
    """One write of the writer: what (``kind``, "none" for no step) and where on its disk."""

    kind: StepKind
    offset: int
    length: int

    @property
    def disk(self) -> Literal["a", "b"] | None:
        return None if self.kind == "none" else "a" if self.kind.endswith("_a") else "b"


# ---------------------------------------------------------------------------------------------
# The host build of vmafs-guest


_binary: Path | None = None


def binary(cache: Path | None = None) -> Path:
    """vmafs-guest built for this host (gcc -O2), cached by a hash of its inputs; once a session.

    Raises gi.GuestUnavailable when gcc is missing.
    """
    global _binary
    if _binary is not None and cache is None:
        return _binary
    root = gi.default_cache() if cache is None else cache
    csrc = (gi.GUEST_SRC / "vmafs-guest.c").read_bytes()
    header = gi._layout_header()
    key = gi._inputs_key(["replay 1", csrc, header, gi._tool_version(["gcc", "--version"])])
    final = root / f"replay-{key}"
    with gi._locked(root, "replay"):
        if not (final / "complete").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".replay-", dir=root))
            try:
                (tmp / "vmafs_layout.h").write_text(header)
                (tmp / "vmafs-guest.c").write_bytes(csrc)
                gi._run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-include",
                         tmp / "vmafs_layout.h", "-o", tmp / "vmafs-guest", tmp / "vmafs-guest.c"])
                (tmp / "complete").touch()
                tmp.chmod(0o755)
                gi._publish(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            gi._mark_used(final)
    if cache is None:
        _binary = final / "vmafs-guest"
    return final / "vmafs-guest"


def _scratch_dir() -> str | None:
    """Where the replay's two region-sized files go: RAM if there is a /dev/shm."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# ---------------------------------------------------------------------------------------------
# Replay


def replay_step(base_a: bytes, base_b: bytes, steps: int,
                seed: int = SEED) -> tuple[bytes, bytes, Step]:
    """Both disks after the first ``steps`` writer steps over ``base_a``/``base_b``, and the
    last step applied (``Step("none", 0, 0)`` for steps == 0).

    The bases are the disks' whole raw content before the writer started (at least
    WRITE_REGION bytes each; nothing beyond WRITE_REGION is ever written).
    """
    if steps < 0:
        raise ValueError(f"negative step count {steps}")
    for name, base in (("a", base_a), ("b", base_b)):
        if len(base) < gi.WRITE_REGION:
            raise ValueError(f"base_{name} is {len(base)} bytes, less than the write region")
    region = gi.WRITE_REGION
    with tempfile.TemporaryDirectory(prefix="vmafs-replay-", dir=_scratch_dir()) as tmp:
        fa, fb = Path(tmp) / "a", Path(tmp) / "b"
        fa.write_bytes(base_a[:region])
        fb.write_bytes(base_b[:region])
        proc = subprocess.run([str(binary()), "replay", str(fa), str(fb), str(steps), str(seed)],
                              capture_output=True, check=False)
        m = _STEP_RE.match(proc.stdout)
        if proc.returncode != 0 or m is None:
            raise gi.GuestError(f"vmafs-guest replay failed ({proc.returncode}): "
                                f"{(proc.stdout + proc.stderr).decode(errors='replace').strip()}")
        a = fa.read_bytes() + base_a[region:]
        b = fb.read_bytes() + base_b[region:]
    kind: StepKind = m.group(1).decode()  # type: ignore[assignment]
    return a, b, Step(kind, int(m.group(2)), int(m.group(3)))


def replay(base_a: bytes, base_b: bytes, steps: int, seed: int = SEED) -> tuple[bytes, bytes]:
    """Both disks after the first ``steps`` writer steps over the bases (see replay_step)."""
    a, b, _ = replay_step(base_a, base_b, steps, seed)
    return a, b


def steps_at(counter_a: int | None, counter_b: int | None) -> tuple[int, int]:
    """(fewest, most) steps done when the disks' counter records read counter_a/counter_b.

    None (never written, what gi.parse_counter returns) counts as 0.  The two differ by the
    one scribble that may be pending; (0, 0) before the first write.
    """
    a = counter_a or 0
    b = counter_b or 0
    if a < 0 or b < 0:
        raise ValueError(f"negative counter ({a}, {b})")
    if a == 0 and b == 0:
        return 0, 0
    if b == a:
        return 4 * (a - 1) + 3, 4 * (a - 1) + 4
    if b == a - 1:
        return 4 * (a - 1) + 1, 4 * (a - 1) + 2
    raise AssertionError(f"counters a={a} b={b} are not from one instant (b must be a or a-1)")


def states_at(base_a: bytes, base_b: bytes, counter_a: int | None, counter_b: int | None,
              seed: int = SEED) -> list[tuple[bytes, bytes]]:
    """The candidate (a, b) contents for those counters: before and after the pending scribble
    (one candidate for counters 0/0).  A copy may also mix the two per 4 KiB block of the
    scribble: assert_state accepts that."""
    lo, hi = steps_at(counter_a, counter_b)
    states = [replay(base_a, base_b, lo, seed)]
    if hi != lo:
        states.append(replay(base_a, base_b, hi, seed))
    return states


def _first_difference(got: bytes, want: bytes) -> int | None:
    """First offset where the two differ (a length difference counts), None if equal."""
    if got == want:
        return None
    n = min(len(got), len(want))
    lo = 0
    for step in (1 << 20, 1 << 12, 1):  # narrow down: MiB, 4 KiB, byte
        for off in range(lo, n, step):
            if got[off:off + step] != want[off:off + step]:
                lo = off
                break
        else:
            return n
    return lo


def _show(data: bytes, off: int) -> str:
    return data[off:off + 16].hex(" ")


def assert_state(got_a: bytes, got_b: bytes, base_a: bytes, base_b: bytes,
                 counter_a: int | None, counter_b: int | None, seed: int = SEED) -> int:
    """Assert (got_a, got_b) is the disks at one instant of the writer whose counter records
    read counter_a/counter_b: every byte as replayed, except that each 4 KiB block of the
    pending scribble may hold its old or its new content.  Returns the number of steps the
    copy holds fully (the pending scribble, if any, not counted).

    The failure message names the disk and the first offset that fits no candidate.
    """
    lo, hi = steps_at(counter_a, counter_b)
    before = replay(base_a, base_b, lo, seed)
    after_a, after_b, step = replay_step(base_a, base_b, hi, seed)
    after = (after_a, after_b)
    pending = step if hi != lo else Step("none", 0, 0)
    for i, (name, got) in enumerate((("a", got_a), ("b", got_b))):
        old, new = before[i], after[i]
        where = f"disk {name} (counters a={counter_a} b={counter_b}, steps {lo}..{hi})"
        if len(got) != len(old):
            raise AssertionError(f"{where}: {len(got)} bytes, expected {len(old)}")
        if pending.disk != name:
            off = _first_difference(got, old)
            if off is not None:
                raise AssertionError(
                    f"{where}: first difference at offset {off}: got {_show(got, off)}, "
                    f"expected {_show(old, off)}")
            continue
        start, end = pending.offset, pending.offset + pending.length
        for lo_off, hi_off in ((0, start), (end, len(got))):
            off = _first_difference(got[lo_off:hi_off], old[lo_off:hi_off])
            if off is not None:
                off += lo_off
                raise AssertionError(
                    f"{where}: first difference at offset {off} (outside the pending "
                    f"{pending.kind} at {start}+{pending.length}): got {_show(got, off)}, "
                    f"expected {_show(old, off)}")
        for blk in range(start, end, BLOCK):
            g = got[blk:blk + BLOCK]
            if g == old[blk:blk + BLOCK] or g == new[blk:blk + BLOCK]:
                continue
            off_old = blk + (_first_difference(g, old[blk:blk + BLOCK]) or 0)
            off_new = blk + (_first_difference(g, new[blk:blk + BLOCK]) or 0)
            raise AssertionError(
                f"{where}: block at offset {blk} of the pending {pending.kind} at "
                f"{start}+{pending.length} is neither before nor after it: first difference "
                f"at offset {off_old} from before ({_show(old, off_old)}), at offset "
                f"{off_new} from after ({_show(new, off_new)}); got {_show(got, off_old)}")
    return lo


__all__ = ["SEED", "Step", "assert_state", "binary", "replay", "replay_step", "states_at",
           "steps_at"]
