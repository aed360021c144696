"""Which vmafs objects in a VM belong to a live backup, and which a killed one left behind.

Every backup run has a tag (10 hex digits) in the names of everything it adds to QEMU
(`vmafs-TAG-t0` NBD nodes, `vmafs-TAG-0` jobs, `vmafs-TAG-cbw0` filters) and holds an
exclusive flock on `RUN_DIR/TAG.lock` from before it touches QEMU until it has cleaned up.
The lock file also records what only the run knows: the VM's QMP socket, the dirty bitmap it
starts (`vmafs-<archive uuid>`) and whether its archive was committed.  The flock is held by
an open file description, so it dies with the last process holding it (the run and its guard)
whatever killed them: a lock that can be taken belongs to an abandoned run, with certainty,
and a held one to a live run, whose objects nobody else touches.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from vmafs.errors import VmafsError

_TAG = re.compile(r"vmafs-([0-9a-f]{6}|[0-9a-f]{10})-(?:t|cbw)?[0-9]+")


def run_dir() -> str:
    """Where the lock files live: $VMAFS_RUN_DIR, else /run/vmafs (tmpfs: a reboot, which
    ends every QEMU process too, clears it)."""
    return os.environ.get("VMAFS_RUN_DIR") or "/run/vmafs"


def tag_of(name: str) -> str | None:
    """The run tag in one of our node or job names (None: not ours)."""
    m = _TAG.fullmatch(name)
    return m[1] if m else None


@dataclass
class RunRecord:
    """What a run writes into its lock file."""

    tag: str
    pid: int
    qmp: str                      # realpath of the VM's QMP socket
    bitmap: str | None = None     # the bitmap this run starts, removed unless committed
    parent_bitmap: str | None = None  # an incremental's PREV bitmap, removed once committed
    nodes: list[str] = field(default_factory=list)  # the disks' nodes (bitmaps live there)
    output: str | None = None     # the archive's final path (None: stdout)
    uuid: str | None = None
    committed: bool = False
    exports: list[tuple[str, int]] = field(default_factory=list)  # NBD sockets: (path, size)
    qga: str | None = None        # the guest agent's socket while the guest may be frozen

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> RunRecord | None:
        try:
            obj = json.loads(data)
            return cls(**obj) if isinstance(obj, dict) else None
        except (ValueError, TypeError):
            return None


def same_socket(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class RunLock:
    """This run's lock file: created exclusively, flocked, rewritten as the run learns more,
    removed when the run (or its guard) has cleaned up."""

    def __init__(self, qmp: str, tag: str) -> None:
        directory = run_dir()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise VmafsError(f"cannot create the lock directory {directory}: "
                             f"{exc.strerror} (set VMAFS_RUN_DIR)") from None
        path = os.path.join(directory, f"{tag}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmafsError(f"cannot create the lock file {path}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
        self.fd = fd
        self.path = path
        self.record = RunRecord(tag, os.getpid(), os.path.realpath(qmp))
        self.write()

    @property
    def tag(self) -> str:
        return self.record.tag

    def write(self) -> None:
        data = self.record.encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Cleaned up: the file goes first, so nobody sees it unlocked."""
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.abandon()

    def abandon(self) -> None:
        """Not cleaned up: the file stays (unlocked once the guard is gone too), for the guard
        or the next backup."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_record(fd: int) -> RunRecord | None:
    size = os.fstat(fd).st_size
    return RunRecord.decode(os.pread(fd, max(size, 1), 0))


@dataclass
class Abandoned:
    """A dead run's lock file, locked by us while we clean up after it."""

    path: str
    tag: str
    fd: int
    record: RunRecord | None

    def release(self) -> None:
        """Cleaned up after it: the lock file goes."""
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.keep()

    def keep(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Runs:
    """The runs the lock directory knows: live ones (tag -> record) and dead ones."""

    live: dict[str, RunRecord | None]
    abandoned: list[Abandoned]

    def close(self) -> None:
        for a in self.abandoned:
            a.keep()


@contextlib.contextmanager
def scan(exclude: str | None = None) -> Iterator[Runs]:
    """Every lock file: held ones are live runs; those we can lock are abandoned (and stay
    locked by us until the context ends, so two cleaners never race)."""
    directory = run_dir()
    runs = Runs({}, [])
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise VmafsError(f"cannot list {directory}: {exc.strerror}") from None
    try:
        for name in names:
            tag = name.removesuffix(".lock")
            if not name.endswith(".lock") or tag == exclude:
                continue
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                record = read_record(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    runs.live[tag] = record
                continue
            if os.fstat(fd).st_nlink == 0:   # released while we opened it
                os.close(fd)
                continue
            runs.abandoned.append(Abandoned(path, tag, fd, read_record(fd)))
        yield runs
    finally:
        runs.close()
