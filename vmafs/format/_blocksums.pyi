"""vmafs/format/_blocksums.c: index.py's block sums and checks, hashed with the GIL released."""

from collections.abc import Sequence

import numpy as np

def block_sums(*parts: bytes | bytearray | memoryview) -> bytes: ...
def checks(data: bytes | bytearray | memoryview, ends: Sequence[int] | np.ndarray,
           summed: bool = False) -> bytes: ...
