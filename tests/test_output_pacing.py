"""Paced writeback of a live backup's archive (container/output.py: WritebackFile, Pacer).

The pacer changes when the archive reaches the disk, never what is written: a paced archive is
byte for byte the unpaced one, the writer is never more than PACE_AHEAD ahead of the disk, all
of it is written out by the pacer before the commit, and no writeback thread outlives its
output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmafs.container.output as output
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import Pacer, open_output

MiB = 1 << 20


def _write_archive(path: Path, paced: bool, size: int, data: bytes) -> None:
    with open_output(str(path), paced=paced) as out:
        writer = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], uuid=b"u" * 16, ctime=1)
        for off in range(0, size // 2, MiB):  # half data (in 1 MiB writes, as QEMU's), half zero
            writer.write(1, off, data[off % 7:] + data[:off % 7])
        writer.finish()


def _pacers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vmafs-writeback"]


@pytest.mark.parametrize("suffix", [".vma", ".vma.zst"])
def test_paced_archive_is_the_unpaced_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          suffix: str) -> None:
    monkeypatch.setattr(output, "PACE_STEP", 1 * MiB)  # many steps in a small archive
    monkeypatch.setattr(output, "PACE_AHEAD", 4 * MiB)
    size = 48 * MiB + 4096  # a short last cluster too
    data = os.urandom(MiB)
    _write_archive(tmp_path / f"paced{suffix}", True, size, data)
    _write_archive(tmp_path / f"plain{suffix}", False, size, data)
    assert (tmp_path / f"paced{suffix}").read_bytes() == (tmp_path / f"plain{suffix}").read_bytes()
    assert not _pacers()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"paced{suffix}",
                                                                f"plain{suffix}"])


def test_pacer_keeps_the_writer_near_the_disk(tmp_path: Path) -> None:
    step, ahead = 256 << 10, MiB
    chunk = os.urandom(100_000)  # not a divisor of the step: steps end inside writes
    with open(tmp_path / "f", "wb", buffering=0) as f:
        pacer = Pacer(f.fileno(), step=step, window=2, ahead=ahead)
        written = 0
        try:
            for _ in range(200):
                written += f.write(chunk) or 0
                pacer.advance(written)
                assert written - pacer.flushed <= ahead
            assert pacer.flushed >= written - ahead > 0
        finally:
            pacer.stop()
        pacer.check()
    assert (tmp_path / "f").stat().st_size == written
    assert not _pacers()


def test_failed_output_stops_the_pacer_and_leaves_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "PACE_STEP", 1 * MiB)
    with pytest.raises(RuntimeError), open_output(str(tmp_path / "a.vma"), paced=True) as out:
        out.write(os.urandom(8 * MiB))
        raise RuntimeError("the backup failed")
    assert not _pacers()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def failing_fs(tmp_path: Path) -> Iterator[Path]:
    """A real ext4 whose disk runs out under it: a loop device over a sparse file on a tmpfs
    smaller than the file, so writeback fails (EIO) after write() succeeded."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount")):
        pytest.skip("needs root, losetup, mkfs.ext4 and mount")
    small, mnt = tmp_path / "small", tmp_path / "mnt"
    small.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    loop = None
    try:
        backing = small / "disk"
        with open(backing, "wb") as f:
            f.truncate(256 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1",
                        "-O", "^has_journal", str(backing)], check=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-o", "errors=continue", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_write_error_met_by_the_pacer_fails_the_output(failing_fs: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The pacer's wait is where the error shows first (and it consumes it for the file, so
    # a later fsync may not see it): the output fails and nothing is committed.
    monkeypatch.setattr(output, "PACE_STEP", 1 * MiB)
    monkeypatch.setattr(output, "PACE_AHEAD", 4 * MiB)
    with pytest.raises(OSError), open_output(str(failing_fs / "a.vma"), paced=True) as out:
        for _ in range(96):
            out.write(os.urandom(MiB))
    assert not _pacers()
    assert not (failing_fs / "a.vma").exists()


def test_finish_writes_the_rest_out_paced(tmp_path: Path) -> None:
    # close() hands the pacer the final size: everything, the short last step too, is written
    # and dropped from the cache by the pacer, so the commit's fsync has no data left to send
    step = 256 << 10
    chunk = os.urandom(100_000)
    with open(tmp_path / "f", "wb", buffering=0) as f:
        pacer = Pacer(f.fileno(), step=4 * step, window=2, ahead=8 * step, min_step=step)
        written = 0
        for _ in range(50):
            written += f.write(chunk) or 0
            pacer.advance(written)
        pacer.finish(written)
        pacer.check()
    assert written % step and pacer.flushed == written
    assert pacer.rate is not None and step <= pacer.step() <= 4 * step  # whole grains
    assert pacer.step() % step == 0
    assert not _pacers()
