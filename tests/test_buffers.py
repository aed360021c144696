"""vmafs.buffers: a buffer's address, and buffers on huge pages (the walk's extent buffers,
which O_DIRECT writes read: page-aligned whatever the kernel's THP setting)."""

from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import pytest

from vmafs.buffers import HUGE_PAGE, address, on_huge_pages


@pytest.mark.parametrize("size", [1, 4096, 3867136, HUGE_PAGE, 5 << 20])
def test_on_huge_pages_is_aligned_zeroed_writable(size: int) -> None:
    buf = on_huge_pages(size)
    assert buf.dtype == np.uint8 and buf.shape == (size,)
    assert address(buf.data) % HUGE_PAGE == 0
    assert not buf.any()
    buf[:] = 0xA5
    assert buf.all() and buf[-1] == 0xA5
    view = buf.data
    assert len(view) == size and not view.readonly


def test_on_huge_pages_holds_its_memory_while_viewed() -> None:
    """A view of the buffer keeps its mapping: the memory goes with the last reference."""
    buf = on_huge_pages(1 << 20)
    buf[:] = 7
    view = buf.data[4096:8192]
    del buf
    gc.collect()
    assert bytes(view) == b"\x07" * 4096


def test_on_huge_pages_takes_o_direct_writes(tmp_path: object) -> None:
    """Its memory is what an O_DIRECT write needs (where the file system has O_DIRECT)."""
    path = os.path.join(str(tmp_path), "f")
    buf = on_huge_pages(1 << 20)
    buf[:] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT here")
    try:
        try:
            assert os.pwrite(fd, buf.data, 0) == 1 << 20
        except OSError as exc:  # tmpfs and others refuse O_DIRECT writes
            pytest.skip(f"O_DIRECT write refused: {exc}")
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == buf.tobytes()


def test_address_of_every_kind() -> None:
    data = bytearray(b"abcdef")
    ro = bytes(8)
    area = mmap.mmap(-1, 4096)
    try:
        assert address(memoryview(data)[2:]) == address(data) + 2
        assert address(ro) == address(memoryview(ro))
        assert address(area) % mmap.PAGESIZE == 0
    finally:
        area.close()
