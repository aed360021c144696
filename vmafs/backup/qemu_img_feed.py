"""Images of any format QEMU reads, fed to the archive writer: `qemu-img convert` writes them,
holes as WRITE_ZEROES, into an NBD sink of ours, just as QEMU's backup job does when live."""

from __future__ import annotations

import os
import tempfile

import trio

from vmafs.archive.writer import ArchiveWriter
from vmafs.backup.images import ImageSpec
from vmafs.backup.nbd_server import serve_nbd
from vmafs.errors import VmafsError


class _WriterSink:
    """NBD export handler feeding one device of the writer from a worker thread."""

    def __init__(self, writer: ArchiveWriter, dev_id: int) -> None:
        self.writer = writer
        self.dev_id = dev_id
        self.limiter = trio.CapacityLimiter(1)

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        await trio.to_thread.run_sync(self.writer.write, self.dev_id, offset, data,
                                      limiter=self.limiter)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await trio.to_thread.run_sync(self.writer.write_zeroes, self.dev_id, offset, length,
                                      limiter=self.limiter)

    async def flush(self) -> None:
        pass


def copy_with_qemu_img(writer: ArchiveWriter, dev_id: int, image: ImageSpec) -> None:
    """Let qemu-img read any format and write it, holes as WRITE_ZEROES, into our NBD sink."""
    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="vmafs-") as tmp:
            sock = os.path.join(tmp, "nbd.sock")
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_nbd, sock, image.size, _WriterSink(writer, dev_id))
                proc = await trio.run_process(
                    ["qemu-img", "convert", "-U", "-n", "-f", image.format, "-O", "raw",
                     "-m", "4", "-W", image.path, f"nbd+unix:///?socket={sock}"],
                    capture_stderr=True, check=False)
                nursery.cancel_scope.cancel()
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise VmafsError(f"{image.path}: qemu-img failed: {err[-1] if err else 'unknown'}")

    trio.run(main)
