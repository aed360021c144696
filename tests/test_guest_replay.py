"""guest_replay: the host replay of the writer guest equals a plain re-implementation of the
writer, and the disks of a real writer guest, paused at a random instant, byte for byte."""

from __future__ import annotations

import re
import time
from pathlib import Path

import guest_replay as gr
import guestimage as gi
import numpy as np
import pytest
from test_backup import Lab, read_image

MASK = (1 << 64) - 1


class RefWriter:
    """The writer of vmafs-guest.c, step by step, in Python (slow; for a few dozen steps)."""

    def __init__(self, a: bytes, b: bytes, seed: int) -> None:
        self.disks = [bytearray(a), bytearray(b)]
        self.state = seed or 1
        self.k = 0

    def rng(self) -> int:
        x = self.state
        x ^= x >> 12
        x ^= (x << 25) & MASK
        x ^= x >> 27
        self.state = x
        return (x * 2685821657736338717) & MASK

    def step(self) -> gr.Step:
        k, self.k = self.k, self.k + 1
        disk = self.disks[(k // 2) % 2]
        kind = ["record_a", "scribble_a", "record_b", "scribble_b"][k % 4]
        if k % 2 == 0:
            disk[gi.COUNTER_OFFSET:gi.COUNTER_OFFSET + gi.RECORD_SIZE] = gi.counter_record(
                k // 4 + 1)
            return gr.Step(kind, gi.COUNTER_OFFSET, gi.RECORD_SIZE)  # type: ignore[arg-type]
        blocks = 1 + self.rng() % (gi.SCRIBBLE_MAX // 4096)
        first = gi.SCRIBBLE_START // 4096
        span = gi.WRITE_REGION // 4096 - first - blocks + 1
        off = (first + self.rng() % span) * 4096
        data = b"".join(self.rng().to_bytes(8, "little") for _ in range(blocks * 512))
        disk[off:off + len(data)] = data
        return gr.Step(kind, off, len(data))  # type: ignore[arg-type]


def _bases(size: int = gi.WRITE_REGION + 64 * 1024) -> tuple[bytes, bytes]:
    rnd = np.random.default_rng(7)
    return (rnd.integers(0, 256, size, dtype=np.uint8).tobytes(), bytes(size))


def test_replay_matches_reference() -> None:
    try:
        gr.binary()
    except gi.GuestUnavailable as e:
        pytest.skip(str(e))
    base_a, base_b = _bases()
    for seed in (gr.SEED, 0, 12345):
        ref = RefWriter(base_a, base_b, seed)
        want = gr.Step("none", 0, 0)
        for steps in range(0, 41):
            a, b, step = gr.replay_step(base_a, base_b, steps, seed)
            assert step == want, (seed, steps)
            assert a == bytes(ref.disks[0]), (seed, steps)
            assert b == bytes(ref.disks[1]), (seed, steps)
            want = ref.step()
    assert gr.replay(base_a, base_b, 40, 0) == gr.replay(base_a, base_b, 40, 1)  # 0 means 1
    t0 = time.monotonic()
    gr.replay(base_a, base_b, 4 * 100_000)
    assert time.monotonic() - t0 < 2.0


def test_states_and_assert_state() -> None:
    try:
        gr.binary()
    except gi.GuestUnavailable as e:
        pytest.skip(str(e))
    base_a, base_b = _bases()
    assert gr.states_at(base_a, base_b, None, None) == [(base_a, base_b)]
    assert gr.assert_state(base_a, base_b, base_a, base_b, None, None) == 0
    assert [gr.steps_at(*c) for c in [(1, None), (1, 1), (5, 4), (5, 5)]] == [
        (1, 2), (3, 4), (17, 18), (19, 20)]
    with pytest.raises(AssertionError, match="not from one instant"):
        gr.steps_at(5, 3)
    for counters in [(1, 0), (1, 1), (7, 6), (7, 7)]:
        lo, hi = gr.steps_at(*counters)
        (a0, b0), (a1, b1) = gr.states_at(base_a, base_b, *counters)
        step = gr.replay_step(base_a, base_b, hi)[2]
        assert step.kind.startswith("scribble") and step.length >= 4096
        assert (a0, b0) == gr.replay(base_a, base_b, lo)
        for state in [(a0, b0), (a1, b1)]:
            assert gr.assert_state(*state, base_a, base_b, *counters) == lo
        # the pending scribble half in: every other 4 KiB block old
        half = [bytearray(a1), bytearray(b1)]
        disk = 0 if step.disk == "a" else 1
        old = (a0, b0)[disk]
        for off in range(step.offset, step.offset + step.length, 8192):
            half[disk][off:off + 4096] = old[off:off + 4096]
        gr.assert_state(bytes(half[0]), bytes(half[1]), base_a, base_b, *counters)
        # ... but not a block torn inside
        torn = bytearray(half[disk])
        mid = step.offset + 2048
        torn[mid:mid + 2048] = (a1, b1)[disk][mid:mid + 2048]
        if bytes(torn) != (a1, b1)[disk]:
            got = [bytes(half[0]), bytes(half[1])]
            got[disk] = bytes(torn)
            with pytest.raises(AssertionError, match=rf"disk {step.disk} .*offset {step.offset}"):
                gr.assert_state(got[0], got[1], base_a, base_b, *counters)
    # a byte outside the write region, and in the counter record
    a, b = gr.replay(base_a, base_b, 10)
    bad = bytearray(b)
    bad[gi.WRITE_REGION + 5] ^= 1
    with pytest.raises(AssertionError, match=f"disk b .*first difference at offset "
                                             f"{gi.WRITE_REGION + 5}:"):
        gr.assert_state(a, bytes(bad), base_a, base_b, 3, 2)
    with pytest.raises(AssertionError, match=r"disk a .*offset 24\b"):  # the digit of N
        gr.assert_state(a, b, base_a, base_b, 2, 2)   # a's record says 3, not 2


def _flip(data: bytes, off: int) -> bytes:
    out = bytearray(data)
    out[off] ^= 0x40
    return bytes(out)


def test_replay_equals_real_guest(tmp_path: Path) -> None:
    guest = gi.guest_or_skip()
    lab = Lab(guest, tmp_path)
    base_a, base_b = read_image(lab.a, "qcow2"), read_image(lab.b, "raw")
    with lab:
        time.sleep(3)
        lab.vm.qmp("stop")
        assert lab.vm.qmp("query-status")["status"] == "paused"
        lab.vm.qmp("quit")
        assert lab.vm.wait_exit(timeout=30) == 0
        serial = lab.vm.serial()
    assert "VMAFS-ERROR" not in serial
    got_a, got_b = read_image(lab.a, "qcow2"), read_image(lab.b, "raw")
    ca, cb = gi.parse_counter(got_a), gi.parse_counter(got_b)
    assert ca is not None and cb is not None
    reported = [int(n) for n in re.findall(r"VMAFS-COUNT (\d+)", serial)]
    assert reported and ca >= reported[-1] > 0
    steps = gr.assert_state(got_a, got_b, base_a, base_b, ca, cb)
    assert steps >= 4 * (reported[-1] - 1)
    # one byte changed anywhere is caught, and named: in the last scribble of each disk, in
    # the counter record, in the data outside the write region
    hi = gr.steps_at(ca, cb)[1]
    last: dict[str, gr.Step] = {}
    for k in range(max(0, hi - 8), hi):
        st = gr.replay_step(base_a, base_b, k + 1)[2]
        if st.kind.startswith("scribble") and st.disk is not None:
            last[st.disk] = st
    for name, st in last.items():
        off = st.offset + st.length - 1
        bad = (_flip(got_a, off), got_b) if name == "a" else (got_a, _flip(got_b, off))
        with pytest.raises(AssertionError, match=rf"disk {name} .*offset {off}\b"):
            gr.assert_state(*bad, base_a, base_b, ca, cb)
    with pytest.raises(AssertionError, match=r"disk a .*offset 100\b"):
        gr.assert_state(_flip(got_a, 100), got_b, base_a, base_b, ca, cb)
    far = 30 * 1024 * 1024
    with pytest.raises(AssertionError, match=rf"disk b .*offset {far}\b"):
        gr.assert_state(got_a, _flip(got_b, far), base_a, base_b, ca, cb)
