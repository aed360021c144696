"""vmafs/format/_blocksums.c: index.py's block sums and checks, hashed with the GIL released."""

from collections.abc import Sequence

import numpy as np

def block_sums(*parts: bytes | bytearray | memoryview) -> bytes: ...
def checks(data: bytes | bytearray | memoryview, ends: Sequence[int] | np.ndarray,
           summed: bool = False) -> bytes: ...
def read_pieces(fd: int, buffer: bytearray | memoryview, offset: int, ends: np.ndarray,
                bounds: np.ndarray, state: np.ndarray, data_out: np.ndarray | None,
                summed_out: np.ndarray | None) -> int: ...
