"""The one thread that owns the archive output and its ArchiveWriter, fed by the pipe."""

from __future__ import annotations

import contextlib
import errno
import threading
import uuid as uuidlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.backup.blockgraph import Disk
from vmafs.backup.pipe import FINISH, WRITE, ZEROES, Pipe
from vmafs.container.output import open_output
from vmafs.errors import VmafsError
from vmafs.progress import Progress

if TYPE_CHECKING:
    from vmafs.backup.live import BackupOptions


class WriterThread:
    """The one thread that owns the output and the ArchiveWriter."""

    def __init__(self, opts: BackupOptions, disks: Sequence[Disk],
                 configs: Sequence[tuple[str, bytes]], uuid: uuidlib.UUID,
                 incremental: Sequence[int], ctime: int,
                 pipe: Pipe, progress: Progress, token: trio.lowlevel.TrioToken,
                 on_error: Callable[[BaseException], None]) -> None:
        self._opts = opts
        self._disks = disks
        self._configs = configs
        self._uuid = uuid
        self._incremental = incremental
        self._ctime = ctime
        self._pipe = pipe
        self._progress = progress
        self._token = token
        self._on_error = on_error
        self.ready = trio.Event()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.committed = False
        self.bytes_out = 0
        self._thread = threading.Thread(target=self._main, name="vmafs-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _beat(self, nbytes: int) -> None:
        self._pipe.heartbeat()
        self._progress.update(nbytes)

    def _main(self) -> None:
        opts = self._opts
        try:
            with open_output(opts.output, zstd=opts.zstd, level=opts.level,
                             threads=opts.threads, frame_size=opts.frame_size,
                             paced=True) as out:
                writer = ArchiveWriter(out, [DeviceSpec(d.name, d.size) for d in self._disks],
                                       self._configs, uuid=self._uuid.bytes, ctime=self._ctime,
                                       incremental=self._incremental, progress=self._beat)
                self._token.run_sync_soon(self.ready.set)
                pipe = self._pipe
                while True:
                    item = pipe.get()
                    kind = item[0]
                    if kind == WRITE:
                        writer.write(item[1], item[2], item[3])
                        pipe.done(len(item[3]))
                    elif kind == ZEROES:
                        writer.write_zeroes(item[1], item[2], item[3])
                        pipe.done(0)
                    elif kind == FINISH:
                        writer.finish()
                        pipe.done(0)
                        if pipe.discarding:  # failed meanwhile: never under the final name
                            raise Aborted
                        break
                    else:
                        raise Aborted
            self.bytes_out = out.bytes_out  # after close: the seek table and the last frame
            self.committed = True
        except Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported to the trio side, one line
            self.error = exc
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._on_error, exc)
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self.ready.set)
                self._token.run_sync_soon(self.done.set)


class Aborted(Exception):
    pass


def describe_writer_error(exc: BaseException, output: str) -> str:
    if isinstance(exc, VmafsError):
        return str(exc)
    if isinstance(exc, OSError):
        where = "standard output" if output == "-" else (exc.filename or output)
        if exc.errno == errno.ENOSPC:
            return f"writing {where}: no space left on device"
        if exc.errno == errno.EPIPE:
            return f"writing {where}: the reader went away (broken pipe)"
        return f"writing {where}: {exc.strerror or exc}"
    return f"archive writer failed: {exc!r}"
