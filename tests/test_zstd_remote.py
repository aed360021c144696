"""A seekable .vma.zst in S3 (a real Ceph RADOS Gateway, tests/rgw.py), read at random: a small
first read of a frame fetches its prefix, not the whole frame, and the bytes stay exact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import run_vmafs

from vmafs.archive.chain import open_chain
from vmafs.container.zstd_source import SeekableZstdSource
from vmafs.store import ranged

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env

MiB = 1 << 20


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every ranged request's [start, end), in order."""
    got: list[tuple[int, int]] = []
    orig = ranged.RangedObject._get

    def get(self: ranged.RangedObject, start: int, end: int) -> bytes:
        got.append((start, end))
        return orig(self, start, end)

    monkeypatch.setattr(ranged.RangedObject, "_get", get)
    return got


def test_small_cold_read_fetches_a_frame_prefix(s3: S3Env, tmp_path: Path,
                                                fetched: list[tuple[int, int]]) -> None:
    image = tmp_path / "disk.raw"
    rng = random.Random(3)
    data = rng.randbytes(12 * MiB)  # incompressible: compressed offsets follow the data's
    image.write_bytes(data)
    local = tmp_path / "a.vma.zst"
    rc, _, err = run_vmafs("create", "-q", "-o", local, f"drive-scsi0={image}")
    assert rc == 0, err
    s3.put("a.vma.zst", local.read_bytes())
    with SeekableZstdSource(local) as src:
        frames = [src.table.compressed_range(i) for i in range(src.num_frames)]
    largest = max(e - s for s, e in frames)
    for off in (3 * MiB + 4096, 5 * MiB + 8192, 7 * MiB - 4096):  # past HEAD, before TAIL
        with open_chain(s3.url("a.vma.zst")) as archive:
            fetched.clear()
            got = archive.read(archive.devices[0].dev_id, off, 4096)
            assert bytes(got) == data[off:off + 4096]
        # one request, and one for its extent's header (a first read there: extent_check.py)
        assert 1 <= len(fetched) <= 2, fetched
        for start, end in fetched:
            frame = next((s, e) for s, e in frames if s <= start < e)
            assert start == frame[0] and end < frame[1], (fetched, frame)
            assert end - start < largest
    with open_chain(s3.url("a.vma.zst")) as archive:  # then whole frames: checked, exact
        dev = archive.devices[0].dev_id
        assert bytes(archive.read(dev, 0, len(data))) == data
