"""Real-guest fixtures for the vmafs tests: a tiny Linux guest, a bootable disk and a QEMU runner.

Everything is built from Debian packages fetched with ``apt-get download`` (kernel from
``linux-image-*-amd64``, ``busybox-static``, ``qemu-guest-agent``) plus a small static C
workload (``tests/guest/vmafs-guest.c``).  Nothing is installed on the host.  Artefacts are
cached under ``$VMAFS_TEST_CACHE`` (default ``~/.cache/vmafs-tests``) in a directory named by a
hash of every input, built in a temporary directory and renamed into place, under a file lock,
so concurrent pytest processes share one build.

Guest modes (kernel command line ``vmafs.mode=``; markers on ttyS0):

``writer``
    ``VMAFS-READY``, then forever: N += 1, write the counter record N at ``COUNTER_OFFSET`` of
    /dev/vda (O_DIRECT + fdatasync), scribble pseudo-random data inside the write region of vda,
    then the same for /dev/vdb.  Every ``REPORT_EVERY`` iterations ``VMAFS-COUNT N``.  Only
    ``[0, WRITE_REGION)`` of each disk is ever written.  A point-in-time copy of both disks
    has ``counter(vdb) in (counter(vda), counter(vda) - 1)``.
``idle``
    ``VMAFS-READY``, then sleeps.
``latency``
    ``VMAFS-READY``, then ``vmafs.count`` timed 4 KiB O_DIRECT writes at random offsets over
    /dev/vda (``vmafs.interval_ms`` apart), one ``VMAFS-LAT <us>`` line each, then
    ``VMAFS-DONE``.  The same program is in the guest as ``/bin/vmafs-guest`` for
    ``guest-exec`` (``latency DEV COUNT INTERVAL_MS SEED``; output to /dev/ttyS0).

qemu-ga runs on the virtio-serial port ``org.qemu.guest_agent.0`` when the VM has one
(``QemuVM(qga=True)``); the guest prints ``VMAFS-QGA <dev>`` once it started.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
GUEST_SRC = HERE / "guest"

# ---------------------------------------------------------------------------------------------
# Writer layout (shared with the C workload through a generated header)

#: Every guest write of the writer workload lands in [0, WRITE_REGION) of each disk.
WRITE_REGION = 8 * 1024 * 1024
#: The counter record lives here, alone in its own 64 KiB cluster.
COUNTER_OFFSET = 0
#: Size of one counter record (one O_DIRECT write).
RECORD_SIZE = 4096
#: Pseudo-random scribbles go to 4 KiB-aligned offsets in [SCRIBBLE_START, WRITE_REGION).
SCRIBBLE_START = 64 * 1024
#: Largest scribble (bytes); each is 4 KiB .. this.
SCRIBBLE_MAX = 64 * 1024
#: The writer prints ``VMAFS-COUNT N`` every this many iterations.
REPORT_EVERY = 100
#: Record = head line at byte 0, zeros, tail line ending at byte RECORD_SIZE (detects tearing).
RECORD_HEAD = "VMAFSCTR %016llu\n"
RECORD_TAIL = "VMAFSEND %016llu\n"
_RECORD_LINE_LEN = 26
_HEAD_RE = re.compile(rb"VMAFSCTR (\d{16})\n")
_TAIL_RE = re.compile(rb"VMAFSEND (\d{16})\n")

# ---------------------------------------------------------------------------------------------
# Boot disk layout

BOOT_DISK_SIZE = 64 * 1024 * 1024
#: Byte offset of the single ext4 partition (MBR partition 1, bootable).
BOOT_PARTITION_OFFSET = 1024 * 1024
BOOT_PARTITION_SIZE = BOOT_DISK_SIZE - BOOT_PARTITION_OFFSET
BOOT_FS_UUID = "2f0d5a3e-6a1c-4f3b-9f1e-7a5c0b1d2e3f"
BOOT_MARKER = "VMAFS-BOOT-OK"
_BOOT_RANDOM_SEED = 20240601
_BOOT_RANDOM_SIZE = 1536 * 1024

#: Kernel command line shared by every guest; keep it minimal, TCG boot time matters.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 mitigations=off 8250.nr_uarts=1 "
    "cryptomgr.notests random.trust_cpu=on no_timer_check tsc=reliable"
)

WANTED_MODULES = ("virtio_blk", "virtio_pci", "virtio_console", "crc32c_generic", "ext4")
GUEST_PACKAGES = ("busybox-static", "qemu-guest-agent")
KERNEL_META = "linux-image-amd64"

# Bump when the build recipe changes in a way the hashed inputs do not show.
_RECIPE_VERSION = "1"


class GuestUnavailable(RuntimeError):
    """The guest cannot be built on this machine (packages, tools or privileges missing).

    Tests turn this into a skip with the message as reason.
    """


class GuestError(RuntimeError):
    """The VM did not do what was expected (marker not seen, QEMU died, agent silent)."""


def boot_disk_files() -> dict[str, bytes]:
    """Known files on the boot disk's ext4 partition: path inside the fs -> content."""
    rnd = random.Random(_BOOT_RANDOM_SEED)
    return {
        "/data/hello.txt": b"hello from vmafs\n",
        "/data/random.bin": rnd.randbytes(_BOOT_RANDOM_SIZE),
    }


# ---------------------------------------------------------------------------------------------
# Counter records


def counter_record(n: int) -> bytes:
    """The RECORD_SIZE bytes the writer puts at COUNTER_OFFSET for counter value n."""
    head = (RECORD_HEAD.replace("%016llu", "%016d") % n).encode()
    tail = (RECORD_TAIL.replace("%016llu", "%016d") % n).encode()
    return head + bytes(RECORD_SIZE - len(head) - len(tail)) + tail


def parse_counter(data: bytes | bytearray | memoryview, offset: int = COUNTER_OFFSET) -> int | None:
    """Counter value of a writer disk (raw bytes of the disk, or of just the record).

    ``data`` is the raw disk content starting at byte 0 (``offset`` is where the record is),
    or pass ``offset=0`` with the record itself.  Returns None when the block was never
    written (all zeros); raises ValueError for anything else that is not a whole record.
    """
    rec = bytes(data[offset : offset + RECORD_SIZE])
    if len(rec) != RECORD_SIZE:
        raise ValueError(f"short counter record: {len(rec)} bytes")
    if rec.count(0) == RECORD_SIZE:
        return None
    head = _HEAD_RE.fullmatch(rec[:_RECORD_LINE_LEN])
    tail = _TAIL_RE.fullmatch(rec[-_RECORD_LINE_LEN:])
    if head is None or tail is None or head.group(1) != tail.group(1):
        raise ValueError(f"not a (whole) counter record: {rec[:32]!r}...{rec[-32:]!r}")
    if rec != counter_record(int(head.group(1))):
        raise ValueError("counter record has garbage between head and tail")
    return int(head.group(1))


def read_counter(image: Path, fmt: str = "raw") -> int | None:
    """Counter value of a writer disk image file (any format qemu-img reads)."""
    if fmt == "raw":
        with open(image, "rb") as f:
            f.seek(COUNTER_OFFSET)
            return parse_counter(f.read(RECORD_SIZE), 0)
    with tempfile.TemporaryDirectory(prefix="vmafs-ctr-") as tmp:
        out = Path(tmp) / "rec"
        _run(
            [
                "qemu-img",
                "dd",
                "-f",
                fmt,
                "-O",
                "raw",
                f"bs={RECORD_SIZE}",
                "count=1",
                f"skip={COUNTER_OFFSET // RECORD_SIZE}",
                f"if={image}",
                f"of={out}",
            ]
        )
        return parse_counter(out.read_bytes(), 0)


def parse_latencies(log: str) -> list[int]:
    """Per-write latencies (µs) from a latency-mode serial log."""
    return [int(m) for m in re.findall(r"^VMAFS-LAT (\d+)\s*$", log, re.M)]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _run(argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a build command; failure -> GuestError with its stderr."""
    try:
        return subprocess.run(
            [str(a) for a in argv], check=True, capture_output=True, text=True, **kw
        )
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{argv[0]} not found: install it") from e
    except subprocess.CalledProcessError as e:
        msg = (e.stderr or e.stdout or "").strip().splitlines()
        raise GuestError(f"{' '.join(map(str, argv))} failed: {' / '.join(msg[-3:])}") from e


def default_cache() -> Path:
    """Cache root: $VMAFS_TEST_CACHE or ~/.cache/vmafs-tests."""
    env = os.environ.get("VMAFS_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmafs-tests"


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """Exclusive lock across processes (so parallel pytest runs build once)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: Builds unused for this long are deleted when a new build of the same kind is published.
_PRUNE_AFTER = 3 * 24 * 3600


def _mark_used(final: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(final / "complete")


def _prune(final: Path) -> None:
    """Delete old builds of the same kind (same name prefix) that nobody used lately."""
    prefix = final.name.rsplit("-", 1)[0] + "-"
    now = time.time()
    for other in final.parent.glob(prefix + "*"):
        if other == final or other.name.startswith("."):
            continue
        try:
            if now - (other / "complete").stat().st_mtime > _PRUNE_AFTER:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            continue


def _publish(tmpdir: Path, final: Path) -> None:
    """Rename a finished build into place; another process may have won the race."""
    try:
        os.rename(tmpdir, final)
    except OSError:
        if not (final / "complete").exists():
            raise
        shutil.rmtree(tmpdir, ignore_errors=True)
    _prune(final)


# ---------------------------------------------------------------------------------------------
# Debian packages


@dataclass(frozen=True)
class DebPackage:
    """One .deb as apt would download it now (from the local package lists, no network)."""

    name: str
    url: str
    filename: str
    sha256: str


def _apt(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{argv[0]} not found: need a Debian host") from e


def _apt_state() -> str:
    """Fingerprint of apt's package lists and config: resolutions are valid while it holds."""
    h = hashlib.sha256()
    for top in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if not top.is_dir():
            continue
        for p in sorted(top.rglob("*")):
            if p.is_file() and "partial" not in p.parts and p.name != "lock":
                st = p.stat()
                h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()[:20]


def _resolve_uncached() -> dict[str, DebPackage]:
    out = _apt(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"^\s*Depends: (linux-image-\S+-amd64)\s*$", out.stdout, re.M)
    if m is None:
        raise GuestUnavailable(f"apt offers no {KERNEL_META} (run apt-get update?)")
    names = [m.group(1), *GUEST_PACKAGES]
    out = _apt(["apt-get", "download", "--print-uris", *names])
    found: dict[str, DebPackage] = {}
    for line in out.stdout.splitlines():
        mm = re.fullmatch(r"'(\S+)' (\S+\.deb) \d+ SHA256:([0-9a-f]{64})", line.strip())
        if mm:
            name = mm.group(2).split("_", 1)[0]
            found[name] = DebPackage(name, mm.group(1), mm.group(2), mm.group(3))
    missing = [n for n in names if n not in found]
    if missing:
        err = out.stderr.strip().splitlines()
        raise GuestUnavailable(
            f"apt cannot offer {', '.join(missing)} (run apt-get update?): {' / '.join(err[-2:])}"
        )
    return {"kernel": found[names[0]], **{n: found[n] for n in GUEST_PACKAGES}}


_resolved: dict[str, dict[str, DebPackage]] = {}


def _resolve_packages(cache: Path) -> dict[str, DebPackage]:
    """The .debs apt offers now: keys "kernel" and GUEST_PACKAGES.

    Each apt call costs >1 s where apt keeps no pkgcache.bin (Docker images), so the answer
    is remembered in the cache, keyed by the state of apt's lists.
    """
    state = _apt_state()
    if state in _resolved:
        return _resolved[state]
    memo = cache / f"apt-{state}.json"
    try:
        raw = json.loads(memo.read_text())
        result = {k: DebPackage(**v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError):
        result = _resolve_uncached()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({k: vars(v) for k, v in result.items()}))
        os.replace(tmp, memo)
    _resolved[state] = result
    return result


def _fetch(cache: Path, deb: DebPackage) -> Path:
    """The .deb file in cache/debs, downloading it with apt-get if missing."""
    debs = cache / "debs"
    path = debs / deb.filename
    if path.exists():
        return path
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=debs) as tmp:
        out = subprocess.run(
            ["apt-get", "download", f"{deb.name}"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        got = Path(tmp) / deb.filename
        if out.returncode != 0 or not got.exists():
            err = [ln for ln in out.stderr.splitlines() if not ln.startswith("W: Download is")]
            raise GuestUnavailable(f"cannot download {deb.name}: {' / '.join(err[-2:])}")
        if hashlib.sha256(got.read_bytes()).hexdigest() != deb.sha256:
            raise GuestUnavailable(f"downloaded {deb.filename} has the wrong sha256")
        os.replace(got, path)
    return path


def _extract(deb: Path, dest: Path, members: Sequence[str] | None = None) -> None:
    """Unpack a .deb (``dpkg-deb -x``), or only the members matching the glob patterns."""
    dest.mkdir(parents=True, exist_ok=True)
    if members is None:
        _run(["dpkg-deb", "-x", deb, dest])
        return
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if any(fnmatch.fnmatchcase(name, pat) for pat in members):
                    tar.extract(member, dest, filter="data")
    finally:
        proc.stdout.close()
        if proc.wait() not in (0, -signal.SIGPIPE):
            raise GuestError(f"dpkg-deb --fsys-tarfile {deb.name} failed")


# ---------------------------------------------------------------------------------------------
# cpio (newc) initramfs, written here so it is deterministic and needs no root for /dev nodes


class _Cpio:
    """Minimal newc writer: uid/gid 0, mtime 0, inode numbers in order."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nm = name.lstrip("/").encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self._ino,
                mode,
                0,
                0,
                1,
                0,
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(nm),
                0,
            )
        )
        self._ino += 1
        blob = hdr.encode() + nm
        blob += bytes(-len(blob) % 4) + data
        blob += bytes(-len(blob) % 4)
        self._parts.append(blob)

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        parent = path.rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        self._dirs.add(path)
        self._entry(path, 0o040755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(path.strip("/").rpartition("/")[0])
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(path.strip("/").rpartition("/")[0])
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        self.mkdir(path.strip("/").rpartition("/")[0])
        self._entry(path, 0o020600, rdev=(major, minor))

    def gzip(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        raw = b"".join(self._parts)
        return gzip.compress(raw, compresslevel=6, mtime=0)


def _base_initramfs(busybox: Path, init: bytes) -> _Cpio:
    cp = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
        cp.mkdir(d)
    cp.chardev("/dev/console", 5, 1)
    cp.chardev("/dev/ttyS0", 4, 64)
    cp.file("/bin/busybox", busybox.read_bytes(), 0o755)
    cp.symlink("/bin/sh", "busybox")
    cp.file("/init", init, 0o755)
    return cp


# ---------------------------------------------------------------------------------------------
# Kernel modules


def _elf_section(data: bytes, wanted: str) -> bytes:
    """Contents of one section of an ELF64 little-endian object (for .modinfo)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestError("kernel module is not ELF64 LE")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sec(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = sec(shstrndx)
    for i in range(shnum):
        name, off, size = sec(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end].decode() == wanted:
            return data[off : off + size]
    raise GuestError(f"no {wanted} section")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    return data


def _module_deps(path: Path) -> list[str]:
    for item in _elf_section(_read_module(path), ".modinfo").split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[8:].decode().split(",") if d]
    return []


def _module_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Loadable modules needed for ``wanted``, dependencies first; builtins left out.

    Debian's package ships no modules.dep (depmod makes it at install time), so the
    dependency list comes from each module's own ``depends=`` modinfo (what depmod reads).
    """
    builtin = {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    index: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index[p.name.split(".ko")[0].replace("-", "_")] = p
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise GuestError(f"kernel module {name} neither builtin nor in the package")
        for dep in _module_deps(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


# ---------------------------------------------------------------------------------------------
# Guest build


@dataclass(frozen=True)
class Guest:
    """A built test guest: boot it with ``QemuVM(kernel=..., initrd=..., append=...)``."""

    kernel: Path  # what to pass to -kernel: the PVH vmlinux if possible, else the bzImage
    initrd: Path
    kernel_version: str
    build_dir: Path
    bzimage: Path  # Debian's vmlinuz as shipped
    build_seconds: float = 0.0  # 0 when it came from the cache

    def cmdline(self, mode: str, **params: int | str) -> str:
        """Kernel command line for a guest mode (writer|idle|latency) and its parameters."""
        extra = "".join(f" vmafs.{k}={v}" for k, v in params.items())
        return f"{BASE_CMDLINE} vmafs.mode={mode}{extra}"


def _layout_header() -> str:
    consts = {
        "VMAFS_RECORD_SIZE": RECORD_SIZE,
        "VMAFS_COUNTER_OFFSET": COUNTER_OFFSET,
        "VMAFS_REGION_SIZE": WRITE_REGION,
        "VMAFS_SCRIBBLE_START": SCRIBBLE_START,
        "VMAFS_SCRIBBLE_MAX": SCRIBBLE_MAX,
        "VMAFS_REPORT_EVERY": REPORT_EVERY,
    }
    lines = [f"#define {k} {v}" for k, v in consts.items()]
    lines.append(f"#define VMAFS_RECORD_HEAD {json.dumps(RECORD_HEAD)}")
    lines.append(f"#define VMAFS_RECORD_TAIL {json.dumps(RECORD_TAIL)}")
    return "\n".join(lines) + "\n"


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{argv[0]} not found: install it") from e
    return out.stdout.strip()


def _inputs_key(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:20]


def _ldd(binary: Path) -> list[Path]:
    """Shared libraries (and the loader) ldd reports for binary, as host paths."""
    out = _run(["ldd", binary]).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            lib = line.split()[0]
            raise GuestUnavailable(f"qemu-ga needs {lib}, not installed on this host")
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def build_guest(cache: Path | None = None) -> Guest:
    """Build (or find in the cache) the test guest kernel + initramfs."""
    cache = default_cache() if cache is None else cache
    pkgs = _resolve_packages(cache)
    debs = [pkgs["kernel"]] + [pkgs[p] for p in GUEST_PACKAGES]
    csrc = (GUEST_SRC / "vmafs-guest.c").read_bytes()
    init = (GUEST_SRC / "init.sh").read_bytes()
    key = _inputs_key(
        [
            _RECIPE_VERSION,
            Path(__file__).read_bytes(),
            csrc,
            init,
            _layout_header(),
            _tool_version(["gcc", "--version"]),
            *(d.filename + d.sha256 for d in debs),
        ]
    )
    final = cache / f"guest-{key}"
    with _locked(cache, "guest"):
        if not (final / "complete").exists():
            t0 = time.monotonic()
            files = [_fetch(cache, d) for d in debs]
            tmp = Path(tempfile.mkdtemp(prefix=".guest-", dir=cache))
            try:
                _build_guest_into(tmp, files, csrc, init)
                (tmp / "build.json").write_text(
                    json.dumps(
                        {"seconds": time.monotonic() - t0, "debs": [d.filename for d in debs]}
                    )
                )
                (tmp / "complete").touch()
                tmp.chmod(0o755)
                _publish(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            build_seconds = float(json.loads((final / "build.json").read_text())["seconds"])
        else:
            build_seconds = 0.0
            _mark_used(final)
    kernel = final / "vmlinux"
    return Guest(
        kernel=kernel if kernel.exists() else final / "vmlinuz",
        bzimage=final / "vmlinuz",
        initrd=final / "initrd.gz",
        kernel_version=(final / "kernel-version").read_text().strip(),
        build_dir=final,
        build_seconds=build_seconds,
    )


def _unpack_kernel(work: Path, kernel_deb: Path, modules: bool = True) -> tuple[Path, Path, str]:
    """Unpack the kernel package (only /boot unless modules); (vmlinuz, module dir, version)."""
    root = work / "kernel"
    _extract(kernel_deb, root, None if modules else ["boot/*"])
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestError(f"{kernel_deb.name} has no /boot/vmlinuz-*")
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    return vmlinuz[0], root / "lib" / "modules" / version, version


def _pvh_vmlinux(bzimage: Path, config: Path) -> bytes | None:
    """The uncompressed ELF kernel inside an xz bzImage, if it has a PVH entry point.

    QEMU boots such an ELF directly (``-kernel vmlinux``), skipping the in-guest xz
    decompression, which under TCG costs ~4 of ~9 s of boot time.
    """
    try:
        if "CONFIG_PVH=y" not in config.read_text().splitlines():
            return None
    except OSError:
        return None
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def _build_guest_into(out: Path, debs: list[Path], csrc: bytes, init: bytes) -> None:
    kernel_deb, busybox_deb, qga_deb = debs
    work = out / "work"
    vmlinuz, moddir, version = _unpack_kernel(work, kernel_deb)
    _extract(busybox_deb, work / "busybox")
    _extract(qga_deb, work / "qga")
    busybox = work / "busybox" / "bin" / "busybox"
    qga = work / "qga" / "usr" / "sbin" / "qemu-ga"

    (work / "vmafs_layout.h").write_text(_layout_header())
    (work / "vmafs-guest.c").write_bytes(csrc)
    prog = work / "vmafs-guest"
    _run(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-include",
            work / "vmafs_layout.h",
            "-o",
            prog,
            work / "vmafs-guest.c",
        ]
    )

    cp = _base_initramfs(busybox, init)
    cp.file("/bin/vmafs-guest", prog.read_bytes(), 0o755)
    cp.file("/usr/bin/qemu-ga", qga.read_bytes(), 0o755)
    for lib in _ldd(qga):
        cp.file(str(lib), lib.resolve().read_bytes(), 0o755)
    cp.symlink("/etc/mtab", "/proc/self/mounts")
    modlist = []
    for mod in _module_order(moddir, WANTED_MODULES):
        inside = f"/lib/modules/{version}/{mod.relative_to(moddir)}"
        if mod.name.endswith(".xz"):  # busybox insmod takes plain modules
            inside = inside.removesuffix(".xz")
        cp.file(inside, _read_module(mod))
        modlist.append(inside)
    cp.file("/etc/vmafs-modules", "".join(m + "\n" for m in modlist).encode())

    (out / "initrd.gz").write_bytes(cp.gzip())
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    elf = _pvh_vmlinux(vmlinuz, moddir.parent.parent.parent / "boot" / f"config-{version}")
    if elf is not None:
        (out / "vmlinux").write_bytes(elf)
    (out / "kernel-version").write_text(version + "\n")
    (out / "modules.txt").write_text("\n".join(modlist) + "\n")
    shutil.rmtree(work)


# ---------------------------------------------------------------------------------------------
# Boot disk


def build_boot_disk(cache: Path | None = None) -> Path:
    """Build (or find in the cache) a raw disk that SeaBIOS boots to ``VMAFS-BOOT-OK``.

    MBR (syslinux mbr.bin) + partition 1 at BOOT_PARTITION_OFFSET (ext4, bootable) holding
    extlinux, the guest kernel, a busybox initramfs that prints BOOT_MARKER on ttyS0 and
    powers off, and ``boot_disk_files()``.  Needs root (loop mount for extlinux --install).
    The returned image is shared: attach it read-only, with snapshot=on, or copy it.
    """
    cache = default_cache() if cache is None else cache
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin")
    for tool in ("sfdisk", "mkfs.ext4", "extlinux", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found (packages fdisk, e2fsprogs, extlinux)")
    if not mbr.exists():
        raise GuestUnavailable(f"{mbr} missing (package syslinux-common)")
    if os.geteuid() != 0:
        raise GuestUnavailable("building the boot disk needs root (loop mount for extlinux)")
    pkgs = _resolve_packages(cache)
    debs = [pkgs["kernel"], pkgs["busybox-static"]]
    init = (GUEST_SRC / "init.sh").read_bytes()
    key = _inputs_key(
        [
            _RECIPE_VERSION,
            "boot",
            Path(__file__).read_bytes(),
            init,
            mbr.read_bytes(),
            _tool_version(["extlinux", "--version"]),
            *(d.filename + d.sha256 for d in debs),
        ]
    )
    final = cache / f"bootdisk-{key}"
    with _locked(cache, "bootdisk"):
        if not (final / "complete").exists():
            files = [_fetch(cache, d) for d in debs]
            tmp = Path(tempfile.mkdtemp(prefix=".bootdisk-", dir=cache))
            try:
                _build_boot_disk_into(tmp, files, init, mbr)
                (tmp / "complete").touch()
                tmp.chmod(0o755)
                _publish(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            _mark_used(final)
    return final / "boot.raw"


_EXTLINUX_CONF = f"""\
SERIAL 0 115200
DEFAULT vmafs
PROMPT 0
TIMEOUT 0
LABEL vmafs
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.gz
  APPEND {BASE_CMDLINE} vmafs.mode=bootok
"""


def _build_boot_disk_into(out: Path, debs: list[Path], init: bytes, mbr: Path) -> None:
    kernel_deb, busybox_deb = debs
    work = out / "work"
    vmlinuz, _moddir, _version = _unpack_kernel(work, kernel_deb, modules=False)
    _extract(busybox_deb, work / "busybox")
    cp = _base_initramfs(work / "busybox" / "bin" / "busybox", init)

    root = work / "root"
    (root / "boot").mkdir(parents=True)
    shutil.copyfile(vmlinuz, root / "boot" / "vmlinuz")
    (root / "boot" / "initrd.gz").write_bytes(cp.gzip())
    (root / "boot" / "extlinux.conf").write_text(_EXTLINUX_CONF)
    for name, content in boot_disk_files().items():
        p = root / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)

    img = out / "boot.raw.tmp"
    with open(img, "wb") as f:
        f.truncate(BOOT_DISK_SIZE)
    sector = 512
    table = (
        "label: dos\nlabel-id: 0x766d6166\n"
        f"start={BOOT_PARTITION_OFFSET // sector}, size={BOOT_PARTITION_SIZE // sector}, "
        "type=83, bootable\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", img], input=table)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    # syslinux 6.04 fails ("Loading /boot/vmlinuz failed: I/O error") on the extent trees
    # mkfs -d writes for an 8 MB kernel, and cannot read 64bit: ext4 without those two
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "vmafsboot",
            "-U",
            BOOT_FS_UUID,
            "-E",
            f"offset={BOOT_PARTITION_OFFSET},hash_seed={BOOT_FS_UUID}",
            "-O",
            "^64bit,^extent",
            "-d",
            root,
            img,
            f"{BOOT_PARTITION_SIZE // 1024}k",
        ],
        env=env,
    )
    with open(img, "r+b") as f:
        f.write(mbr.read_bytes()[:440])
    _extlinux_install(img, work / "mnt")
    os.rename(img, out / "boot.raw")
    shutil.rmtree(work)


def _extlinux_install(img: Path, mnt: Path) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    loop = _run(
        [
            "losetup",
            "-f",
            "--show",
            "-o",
            str(BOOT_PARTITION_OFFSET),
            "--sizelimit",
            str(BOOT_PARTITION_SIZE),
            img,
        ]
    ).stdout.strip()
    try:
        _run(["mount", "-t", "ext4", loop, mnt])
        try:
            _run(["extlinux", "--install", mnt / "boot"])
        finally:
            _run(["umount", mnt])
    finally:
        _run(["losetup", "-d", loop])


# ---------------------------------------------------------------------------------------------
# QEMU


def create_disk(path: Path, size: int, fmt: str = "qcow2") -> Path:
    """An empty disk image made by qemu-img."""
    _run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)])
    return path


@dataclass
class Disk:
    """One drive of a QemuVM.

    ``style="drive"``: ``-drive if=none,id=drive-<dev_id>`` + ``-device ...,drive=drive-<dev_id>``
    (block backend named by the drive id, as Proxmox does).  ``style="blockdev"``:
    ``-blockdev node-name=<node_name>`` + ``-device ...,drive=<node_name>`` (no backend name;
    only the node name and the device id identify it).  ``media="cdrom"`` makes an IDE CD-ROM
    (``path=None``: empty tray).
    """

    path: Path | None
    fmt: str = "qcow2"
    style: Literal["drive", "blockdev"] = "drive"
    dev_id: str | None = None  # default virtio<N> / ide<N>
    node_name: str | None = None  # blockdev style; default node-<dev_id>
    readonly: bool = False
    media: Literal["disk", "cdrom"] = "disk"
    cache: str | None = None  # e.g. "none", "writeback"
    snapshot: bool = False
    bootindex: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def drive_id(self) -> str:
        """Backend id of a -drive style disk (``drive-<dev_id>``)."""
        return f"drive-{self.dev_id}"


def _qopt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _disk_args(disk: Disk) -> list[str]:
    assert disk.dev_id is not None
    if disk.media == "cdrom":
        opts = [f"if=none,id={disk.drive_id},media=cdrom"]
        if disk.path is not None:
            opts.append(f"file={_qopt(disk.path)},format={disk.fmt},readonly=on")
        m = re.fullmatch(r"ide(\d)", disk.dev_id)
        index = int(m.group(1)) if m else 2
        dev = f"ide-cd,bus=ide.{index // 2},unit={index % 2},drive={disk.drive_id},id={disk.dev_id}"
        if disk.bootindex is not None:
            dev += f",bootindex={disk.bootindex}"
        return ["-drive", ",".join(opts), "-device", dev]
    if disk.path is None:
        raise ValueError("a disk needs a path")
    if disk.style == "drive":
        opts = [f"file={_qopt(disk.path)},format={disk.fmt},if=none,id={disk.drive_id}"]
        if disk.readonly:
            opts.append("readonly=on")
        if disk.cache:
            opts.append(f"cache={disk.cache}")
        if disk.snapshot:
            opts.append("snapshot=on")
        opts += [f"{k}={_qopt(v)}" for k, v in disk.extra.items()]
        backend = disk.drive_id
        args = ["-drive", ",".join(opts)]
    else:
        if disk.snapshot:
            raise ValueError("snapshot=on exists only for -drive style disks")
        node = disk.node_name or f"node-{disk.dev_id}"
        disk.node_name = node
        spec: dict[str, Any] = {
            "driver": disk.fmt,
            "node-name": node,
            "file": {"driver": "file", "filename": str(disk.path)},
        }
        if disk.readonly:
            spec["read-only"] = True
        if disk.cache:
            spec["cache"] = {
                "direct": disk.cache in ("none", "directsync"),
                "no-flush": disk.cache == "unsafe",
            }
            if disk.cache in ("none", "directsync"):
                spec["file"]["cache"] = {"direct": True}
        spec.update(disk.extra)
        backend = node
        args = ["-blockdev", json.dumps(spec)]
    dev = f"virtio-blk-pci,drive={backend},id={disk.dev_id}"
    if disk.bootindex is not None:
        dev += f",bootindex={disk.bootindex}"
    return [*args, "-device", dev]


class QemuVM:
    """A qemu-system-x86_64 (TCG) process with serial log, QMP socket and optional qemu-ga.

    Use as a context manager; the process is always gone afterwards.  ``disks`` get their
    ``dev_id`` (virtio0, virtio1, ... / ide2, ide3 for CD-ROMs) and, blockdev style, their
    ``node_name`` (node-<dev_id>) filled in when not given.  KVM does not boot Linux guests
    on the development machine, hence TCG by default.  Sockets and logs live
    in a short private directory under /tmp (unix socket paths are limited to 107 bytes)
    unless ``workdir`` is given.
    """

    def __init__(
        self,
        *,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        disks: Sequence[Disk] = (),
        qga: bool = False,
        memory: str = "256M",
        accel: str = "tcg",
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        name: str = "vmafs-test",
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vmafs-vm-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.qga_path: Path | None = self.workdir / "qga.sock" if qga else None
        self.disks = list(disks)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        n_virtio = n_ide = 0
        for d in self.disks:
            if d.dev_id is None:
                if d.media == "cdrom":
                    d.dev_id = f"ide{2 + n_ide}"
                    n_ide += 1
                else:
                    d.dev_id = f"virtio{n_virtio}"
                    n_virtio += 1
        argv = [
            "qemu-system-x86_64",
            "-name",
            name,
            "-accel",
            accel,
            "-cpu",
            "max",
            "-m",
            memory,
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-no-reboot",
            "-chardev",
            f"file,id=serial0,path={_qopt(self.serial_log)}",
            "-serial",
            "chardev:serial0",
            "-qmp",
            f"unix:{_qopt(self.qmp_path)},server=on,wait=off",
        ]
        if kernel is not None:
            argv += ["-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append is not None:
            argv += ["-append", append]
        if self.qga_path is not None:
            argv += [
                "-chardev",
                f"socket,id=qga0,path={_qopt(self.qga_path)},server=on,wait=off",
                "-device",
                "virtio-serial-pci,id=virtio-serial0",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]
        for d in self.disks:
            argv += _disk_args(d)
        argv += list(extra_args)
        self.argv = argv

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> QemuVM:
        """Start QEMU and wait until its QMP socket exists."""
        if shutil.which("qemu-system-x86_64") is None:
            raise GuestUnavailable("qemu-system-x86_64 not found (package qemu-system-x86)")
        self.serial_log.write_bytes(b"")
        with open(self.qemu_log, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            self._check_alive("before its QMP socket appeared")
            if time.monotonic() > deadline:
                raise GuestError("QEMU did not create its QMP socket within 30 s")
            time.sleep(0.02)
        return self

    def __enter__(self) -> QemuVM:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the VM (politely, then by force) and remove the private work directory."""
        try:
            self.stop(timeout=5)
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL QEMU now (simulates a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Quit via QMP; SIGTERM, then SIGKILL, if QEMU does not go away within timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError, GuestError):
            self.qmp("quit", timeout=min(timeout, 3.0))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                self.proc.send_signal(sig)
        self.proc.wait()

    def _check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise GuestError(
                f"QEMU exited ({self.proc.returncode}) {when}: {self._tail(self.qemu_log)}"
                f" | serial: {self._tail(self.serial_log)}"
            )

    @staticmethod
    def _tail(path: Path, n: int = 600) -> str:
        try:
            data = path.read_bytes()[-n:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip().replace("\n", " / ")

    # -- serial console ----------------------------------------------------------------------

    def serial(self) -> str:
        """Everything the guest printed on ttyS0 so far."""
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_mark(self) -> int:
        """Current length of the serial log: pass as ``after`` to wait for a new marker."""
        try:
            return self.serial_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for(self, marker: str, timeout: float = 120.0, after: int = 0) -> float:
        """Wait for ``marker`` in the serial log (from byte ``after``); seconds since start.

        Raises GuestError if QEMU exits first, or the guest reports ``VMAFS-ERROR``, or on
        timeout.
        """
        needle = marker.encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.serial_log.read_bytes()[after:]
            except FileNotFoundError:
                data = b""
            if needle in data:
                return time.monotonic() - self.started_at
            err = data.find(b"VMAFS-ERROR")
            if err >= 0:
                line = data[err:].split(b"\n", 1)[0].decode(errors="replace")
                raise GuestError(f"guest failed: {line}")
            if self.proc is not None and self.proc.poll() is not None:
                # read once more: the marker may have been written just before exit
                if needle in self.serial_log.read_bytes()[after:]:
                    return time.monotonic() - self.started_at
                self._check_alive(f"while waiting for {marker!r}")
            if time.monotonic() > deadline:
                raise GuestError(
                    f"no {marker!r} within {timeout:.0f} s; serial: {self._tail(self.serial_log)}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself (guest poweroff); its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"QEMU still running after {timeout:.0f} s") from e

    # -- QMP and guest agent (tiny synchronous clients; vmafs has its own) --------------------

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """One QMP command over a fresh connection; its ``return`` value.

        QEMU serves one QMP client at a time: do not call this while another client (e.g. a
        running vmafs backup) holds the socket.
        """
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        for attempt in range(5):
            with _JsonLines(self.qmp_path, timeout) as conn:
                try:
                    greeting = conn.recv()
                    if "QMP" not in greeting:
                        raise GuestError(f"unexpected QMP greeting {greeting}")
                    conn.call({"execute": "qmp_capabilities"})
                except (ConnectionResetError, BrokenPipeError):
                    # The previous client (often a vmafs backup that just ended) is still being
                    # torn down by QEMU, which serves one client at a time: the command was not
                    # sent yet, so connecting again is safe.
                    if attempt == 4:
                        raise
                    time.sleep(0.2)
                    continue
                try:
                    return conn.call(msg)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    time.sleep(0.5)
                    state = "running" if self.proc is None or self.proc.poll() is None \
                        else f"exited with {self.proc.returncode}"
                    raise GuestError(f"QMP connection lost during {command} (QEMU {state}): "
                                     f"{self._tail(self.qemu_log)}") from exc
        raise AssertionError("unreachable")

    def qga(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """One guest-agent command (after a guest-sync handshake); its ``return`` value."""
        if self.qga_path is None:
            raise GuestError("this VM has no guest agent channel (qga=False)")
        deadline = time.monotonic() + timeout
        with _JsonLines(self.qga_path, timeout) as conn:
            # 0xff makes the agent drop partial input; guest-sync-delimited skips stale replies.
            # Resend it: bytes sent before the agent opened its port can be lost.
            tokens: set[int] = set()
            synced = False
            while not synced:
                if time.monotonic() > deadline:
                    raise GuestError(f"guest agent did not sync within {timeout:.0f} s")
                token = random.randrange(1, 2**31)
                tokens.add(token)
                conn.send_raw(b"\xff")
                conn.send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
                conn.sock.settimeout(1.0)
                with contextlib.suppress(GuestError):
                    while not synced:
                        synced = conn.recv().get("return") in tokens
            conn.sock.settimeout(max(0.1, deadline - time.monotonic()))
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            if command in ("guest-shutdown", "guest-suspend-disk", "guest-suspend-ram"):
                conn.send(msg)  # these never answer on success
                return None
            return conn.call(msg)

    def wait_for_agent(self, timeout: float = 60.0) -> float:
        """Retry ``guest-ping`` until the agent answers; seconds since VM start."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive("while waiting for the guest agent")
            try:
                self.qga("guest-ping", timeout=min(3.0, max(0.5, deadline - time.monotonic())))
                return time.monotonic() - self.started_at
            except (OSError, GuestError, ValueError) as e:
                last = e
                time.sleep(0.2)
        raise GuestError(f"guest agent silent for {timeout:.0f} s: {last}")


class _JsonLines:
    """Blocking JSON-per-line exchange over a unix socket, for QMP and qemu-ga."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> _JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as e:
                raise GuestError("no answer on the socket in time") from e
            if not chunk:
                raise GuestError("socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip().lstrip(b"\xff")
        if not line:
            return self.recv()
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise GuestError(f"unexpected reply {obj!r}")
        return obj

    def call(self, msg: dict[str, Any]) -> Any:
        self.send(msg)
        while True:
            reply = self.recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise GuestError(f"{msg['execute']}: {reply['error']}")
            return reply.get("return")


# ---------------------------------------------------------------------------------------------
# pytest conveniences (imported lazily so the module works without pytest)


def guest_or_skip(cache: Path | None = None) -> Guest:
    """build_guest(), turning GuestUnavailable into a pytest skip with its reason."""
    import pytest

    try:
        return build_guest(cache)
    except GuestUnavailable as e:
        pytest.skip(str(e))


def boot_disk_or_skip(cache: Path | None = None) -> Path:
    """build_boot_disk(), turning GuestUnavailable into a pytest skip with its reason."""
    import pytest

    try:
        return build_boot_disk(cache)
    except GuestUnavailable as e:
        pytest.skip(str(e))
