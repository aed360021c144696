"""Where a buffer's bytes are in memory: what a C call through ctypes and an O_DIRECT write
(whose memory must be aligned) need to know."""

from __future__ import annotations

import numpy as np


def address(view: memoryview | bytes | bytearray) -> int:
    """The address of the buffer's first byte (valid while its object lives and is not
    resized), read-only buffers included."""
    return int(np.frombuffer(view, np.uint8).ctypes.data)
