"""`vmafs serve`: the NBD codec's read-only side on bytes, then the real command against real
clients: qemu-img (convert, compare, map), libnbd's nbdinfo --map and nbdcopy, qemu-io, and
QEMU booting the test guest from an export through a qcow2 overlay; plain, seekable zstd, a
Proxmox archive without an index and an incremental chain; parallel clients, a client killed
mid-request, a client sending garbage, a damaged cluster."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from vmafs.format import nbd

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1 << 20
CLUSTER = 65536
DISK0_SIZE = 24 * MiB + 3 * 512
DISK1_SIZE = 4 * MiB


def _missing(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (tools/setup.sh installs it)"
    return None


needs_qemu = pytest.mark.skipif(_missing("qemu-img", "qemu-io") is not None,
                                reason=str(_missing("qemu-img", "qemu-io")))
needs_libnbd = pytest.mark.skipif(_missing("nbdinfo", "nbdcopy") is not None,
                                  reason=str(_missing("nbdinfo", "nbdcopy")))


# -- the codec: bytes in, events out ----------------------------------------------------------

def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def _meta(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def _go(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def _req(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def _events(conn: nbd.ExportServer) -> list[Any]:
    out = []
    while (ev := conn.next_event()) is not nbd.NEED_DATA:
        out.append(ev)
        if isinstance(ev, nbd.Disconnect):
            break
    return out


def _replies(data: bytes) -> list[tuple[int, int, bytes]]:
    found, pos = [], 0
    while pos < len(data):
        _, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        found.append((opt, rep, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return found


def _negotiated(exports: dict[str, int], name: str = "a") -> nbd.ExportServer:
    conn = nbd.ExportServer(exports)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_STRUCTURED_REPLY)
                      + _opt(nbd.OPT_SET_META_CONTEXT, _meta(name, "base:allocation"))
                      + _opt(nbd.OPT_GO, _go(name)))
    assert [type(e) for e in _events(conn)] == [nbd.TransmissionStarted]
    replies = _replies(conn.data_to_send())
    assert (nbd.OPT_SET_META_CONTEXT, nbd.REP_META_CONTEXT) in [(o, r) for o, r, _ in replies]
    return conn


def test_codec_handshake_lists_and_chooses_exports() -> None:
    conn = nbd.ExportServer({"a": 1000, "b": 5 * MiB})
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_LIST)
                      + _opt(nbd.OPT_SET_META_CONTEXT, _meta("a", "base:allocation"))
                      + _opt(nbd.OPT_GO, _go("")) + _opt(nbd.OPT_GO, _go("b")))
    events = _events(conn)
    assert events == [nbd.TransmissionStarted("b", "GO")]
    replies = _replies(conn.data_to_send())
    servers = [d[4:] for o, r, d in replies if r == nbd.REP_SERVER]
    assert servers == [b"a", b"b"]
    # meta contexts need structured replies; the empty name is no export with two disks
    errors = [(o, r) for o, r, _ in replies if r >= 1 << 31]
    assert errors == [(nbd.OPT_SET_META_CONTEXT, nbd.REP_ERR_INVALID),
                      (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN)]
    assert conn.size == 5 * MiB and not conn.allocation and not conn.structured


def test_codec_reads_block_status_and_refusals() -> None:
    conn = _negotiated({"a": 10 * CLUSTER})
    conn.receive_data(_req(nbd.CMD_READ, 1, 100, 4096)
                      + _req(nbd.CMD_BLOCK_STATUS, 2, 0, 10 * CLUSTER, nbd.CMD_FLAG_REQ_ONE)
                      + _req(nbd.CMD_WRITE, 3, 0, 5) + b"hello"
                      + _req(nbd.CMD_READ, 4, 10 * CLUSTER - 1, 2)
                      + _req(nbd.CMD_TRIM, 5, 0, 10) + _req(nbd.CMD_CACHE, 6, 0, 10)
                      + _req(nbd.CMD_READ, 7, 0, nbd.MAX_READ + 1)
                      + _req(nbd.CMD_DISC, 8, 0, 0))
    events = _events(conn)
    assert events[0] == nbd.Read(1, 100, 4096, 0)
    assert events[1] == nbd.BlockStatus(2, 0, 10 * CLUSTER, True)
    assert [(e.handle, e.error) for e in events if isinstance(e, nbd.BadRequest)] == [
        (3, nbd.EPERM), (4, nbd.EINVAL), (5, nbd.EPERM), (7, nbd.EINVAL)]
    assert events[5] == nbd.Cache(6, 0, 10)
    assert isinstance(events[-1], nbd.Disconnect)
    head = conn.reply_read(1, 100, 4096)
    assert struct.unpack(">IHHQIQ", head) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE,
                                             nbd.REPLY_TYPE_OFFSET_DATA, 1, 4104, 100)
    extents = nbd.allocation_extents([(CLUSTER, False), (CLUSTER, False), (CLUSTER, True)],
                                     one=False)
    assert extents == [(2 * CLUSTER, 0), (CLUSTER, nbd.STATE_HOLE | nbd.STATE_ZERO)]
    status = conn.reply_block_status(2, extents[:1])
    assert struct.unpack(">IHHQIIII", status)[4:] == (12, nbd.ALLOCATION_CONTEXT_ID,
                                                      2 * CLUSTER, 0)
    err = conn.reply_error(3, nbd.EPERM, "read-only")
    assert struct.unpack_from(">IHHQIIH", err)[2] == nbd.REPLY_TYPE_ERROR
    with pytest.raises(nbd.LocalProtocolError):
        conn.reply_ok(3)                       # answered already


def test_codec_garbage_is_a_protocol_error() -> None:
    conn = _negotiated({"a": CLUSTER})
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()
    conn = nbd.ExportServer({"a": CLUSTER})
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + b"GET / HTTP/1.1\r\n\r\n" * 3)
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()


# -- archives ------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def vmafs(*args: str | os.PathLike[str], timeout: float = 120,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "vmafs", *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"vmafs {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def _write_disk0(path: Path) -> None:
    rnd = random.Random(42)
    with open(path, "wb") as f:
        f.truncate(DISK0_SIZE)
        f.seek(0)
        f.write(rnd.randbytes(3 * MiB))
        for _ in range(60):
            f.seek(rnd.randrange(4 * MiB, 20 * MiB) // 4096 * 4096)
            f.write(rnd.randbytes(4096))
        f.seek(9 * MiB + 12345)
        f.write(b"vmafs odd write" * 3)
        f.seek(12 * MiB)
        f.write(bytes(2 * MiB))
        f.seek(DISK0_SIZE - 70000)
        f.write(rnd.randbytes(70000))


@dataclass(frozen=True)
class Source:
    disk0: Path
    disk1: Path
    plain: Path
    zstd: Path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    d = tmp_path_factory.mktemp("serve-src")
    disk0, disk1 = d / "disk0.raw", d / "disk1.raw"
    _write_disk0(disk0)
    disk1.write_bytes(random.Random(7).randbytes(DISK1_SIZE))
    conf = d / "qemu-server.conf"
    conf.write_text("boot: order=scsi0\n")
    plain, zstd = d / "vm.vma", d / "vm.vma.zst"
    for out in (plain, zstd):
        vmafs("create", "-q", "-o", out, "-c", conf, f"drive-scsi0={disk0}",
              f"drive-virtio1={disk1}", check=True)
    return Source(disk0, disk1, plain, zstd)


@dataclass
class Served:
    info: dict[str, Any]
    pid: int

    def url(self, export: str) -> str:
        return next(d["url"] for d in self.info["devices"] if d["export"] == export)


@contextlib.contextmanager
def served(archive: Path, where: Path | str, *args: str) -> Iterator[Served]:
    """`vmafs serve --json` (daemonized) on a unix socket path or --listen HOST:PORT."""
    flag = ["--listen", where] if isinstance(where, str) else ["--socket", str(where)]
    proc = vmafs("serve", "--json", *flag, *args, archive)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    pid = info["pid"]
    try:
        yield Served(info, pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid), "the server did not stop on SIGTERM"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _compare(url: str, image: Path, tmp: Path, fmt: str = "raw") -> None:
    out = tmp / f"copy.{fmt}"
    out.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, url, str(out)], check=True)
    subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(out), str(image)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(image)],
                   check=True, capture_output=True)


def _data_ranges(image: Path) -> list[tuple[int, int]]:
    """Where an image has non-zero 64 KiB clusters, as merged (start, end) ranges."""
    data = image.read_bytes()
    zero = bytes(CLUSTER)
    ranges: list[tuple[int, int]] = []
    for off in range(0, len(data), CLUSTER):
        if data[off:off + CLUSTER] != zero[:len(data[off:off + CLUSTER])]:
            end = min(off + CLUSTER, len(data))
            if ranges and ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((off, end))
    return ranges


# -- real clients --------------------------------------------------------------------------------

@needs_qemu
@needs_libnbd
@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_clients_read_exact_bytes_and_skip_holes(source: Source, kind: str,
                                                 tmp_path: Path) -> None:
    archive = source.plain if kind == "plain" else source.zstd
    sock = tmp_path / "nbd.sock"
    with served(archive, sock) as srv:
        assert srv.info["ok"] and srv.info["archive"] == str(archive)
        assert [(d["export"], d["device_bytes"]) for d in srv.info["devices"]] == [
            ("drive-scsi0", DISK0_SIZE), ("drive-virtio1", DISK1_SIZE)]
        assert (os.stat(sock).st_mode & 0o777) == 0o600
        url0, url1 = srv.url("drive-scsi0"), srv.url("drive-virtio1")
        _compare(url0, source.disk0, tmp_path, "qcow2")
        _compare(url1, source.disk1, tmp_path)
        # block status: exactly the clusters with data are data (written zeros are stored
        # as zero clusters: holes), through qemu-img map and nbdinfo --map
        want = _data_ranges(source.disk0)
        mapped = json.loads(subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json",
                                            url0], check=True, capture_output=True,
                                           text=True).stdout)
        assert [(m["start"], m["start"] + m["length"]) for m in mapped if m["data"]] == want
        assert all(m["zero"] for m in mapped if not m["data"])
        info = subprocess.run(["nbdinfo", "--map", "--json", url0], check=True,
                              capture_output=True, text=True).stdout
        extents = json.loads(info)
        assert [(e["offset"], e["offset"] + e["length"]) for e in extents
                if e["type"] == 0] == want
        assert sum(e["length"] for e in extents) == DISK0_SIZE
        out = tmp_path / "nbdcopy.raw"
        subprocess.run(["nbdcopy", "--connections=4", url0, str(out)], check=True)
        assert out.read_bytes() == source.disk0.read_bytes()
        # the copies are sparse: holes were skipped, not written
        assert os.stat(out).st_blocks * 512 < DISK0_SIZE // 2
        listed = subprocess.run(["nbdinfo", "--list", "--json",
                                 f"nbd+unix://?socket={sock}"], check=True,
                                capture_output=True, text=True).stdout
        assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == [
            "drive-scsi0", "drive-virtio1"]
    assert not sock.exists()


@needs_qemu
@pytest.mark.parametrize("name", ["sample-2disks.vma", "sample-odd-size-1000b.vma"])
def test_proxmox_archive(name: str, tmp_path: Path) -> None:
    """An un-indexed Proxmox archive (walked), every disk by its name."""
    import hashlib

    manifest = json.loads((VECTORS / "proxmox" / "MANIFEST.json").read_text())[name]
    with served(VECTORS / "proxmox" / name, tmp_path / "s") as srv:
        for dev, facts in manifest["devices"].items():
            out = tmp_path / f"{dev}.raw"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.url(dev),
                            str(out)], check=True)
            assert out.stat().st_size == facts["size"]
            assert hashlib.sha256(out.read_bytes()).hexdigest() == facts["sha256"], dev


def _chain(tmp_path: Path) -> tuple[Path, bytes]:
    """A full archive and an increment that changes, zeroes and adds clusters: the newest
    archive and the disk it stands for."""
    from vmafs.archive.chain import link_to
    from vmafs.archive.reader import Archive
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output
    from vmafs.format import chain

    rnd = random.Random(3)
    size = 64 * CLUSTER
    disk = bytearray(size)
    full, inc = tmp_path / "c0.vma", tmp_path / "c1.vma.zst"
    with open_output(str(full)) as out:
        w = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)], [])
        first = rnd.randbytes(20 * CLUSTER)
        w.write(1, 0, first)
        disk[:20 * CLUSTER] = first
        w.finish()
    with Archive.open(str(full)) as parent:
        record = chain.encode(chain.ChainRecord(parent=link_to(parent)))
    with open_output(str(inc)) as out:
        w = ArchiveWriter(out, [DeviceSpec("drive-scsi0", size)],
                          [(chain.CONFIG_NAME, record)], incremental=[1])
        changed = rnd.randbytes(2 * CLUSTER)
        w.write(1, 3 * CLUSTER, changed)
        disk[3 * CLUSTER:5 * CLUSTER] = changed
        w.write_zeroes(1, 8 * CLUSTER, 4 * CLUSTER)
        disk[8 * CLUSTER:12 * CLUSTER] = bytes(4 * CLUSTER)
        added = rnd.randbytes(CLUSTER)
        w.write(1, 40 * CLUSTER, added)
        disk[40 * CLUSTER:41 * CLUSTER] = added
        w.finish()
    return inc, bytes(disk)


@needs_qemu
@needs_libnbd
def test_chain_newest_archive(tmp_path: Path) -> None:
    newest, disk = _chain(tmp_path)
    image = tmp_path / "want.raw"
    image.write_bytes(disk)
    with served(newest, tmp_path / "s") as srv:
        url = srv.url("drive-scsi0")
        _compare(url, image, tmp_path)
        extents = json.loads(subprocess.run(["nbdinfo", "--map", "--json", url], check=True,
                                            capture_output=True, text=True).stdout)
        data = [(e["offset"] // CLUSTER, (e["offset"] + e["length"]) // CLUSTER)
                for e in extents if e["type"] == 0]
        assert data == [(0, 8), (12, 20), (40, 41)]   # the zeroed clusters are holes now


@needs_qemu
def test_tcp_listen_and_errors(source: Source, tmp_path: Path) -> None:
    with served(source.plain, "127.0.0.1:0") as srv:
        host, port = srv.info["listen"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert srv.url("drive-virtio1") == f"nbd://127.0.0.1:{port}/drive-virtio1"
        _compare(srv.url("drive-virtio1"), source.disk1, tmp_path)
        # a second server on the same socket path is refused, the first keeps serving
    sock = tmp_path / "s"
    with served(source.plain, sock):
        proc = vmafs("serve", "--socket", sock, source.plain)
        assert proc.returncode == 1 and "already listening" in proc.stderr
    (tmp_path / "file").write_text("x")
    cases: list[tuple[list[str | Path], int, str]] = [
            (["--socket", tmp_path / "file", source.plain], 1, "not a socket"),
            (["--socket", sock, tmp_path / "nope.vma"], 1, "nope.vma"),
            (["--listen", "nowhere", source.plain], 2, "HOST:PORT"),
            (["--socket", sock, "--listen", "127.0.0.1:1", source.plain], 2, "not allowed"),
            (["--socket", sock, VECTORS / "proxmox" / "sample-2disks.vma.gz"], 1, "convert")]
    for args, code, text in cases:
        proc = vmafs("serve", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and text in lines[0], proc.stderr
    assert (tmp_path / "file").read_text() == "x" and not sock.exists()


# -- hostile and failing clients -------------------------------------------------------------

def _handshake(sock: socket.socket, export: str) -> None:
    assert len(sock.recv(18)) == 18
    sock.sendall(struct.pack(">I", 3) + _opt(nbd.OPT_GO, _go(export)))
    data = b""
    while not data.endswith(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, nbd.OPT_GO,
                                        nbd.REP_ACK, 0)):
        chunk = sock.recv(4096)
        assert chunk
        data += chunk


@needs_qemu
@needs_libnbd
def test_parallel_clients_one_killed_and_garbage(source: Source, tmp_path: Path) -> None:
    """Four clients at once, one killed mid-request, raw sockets sending garbage or vanishing
    with requests in flight: the others get their bytes, and the server serves on."""
    sock = tmp_path / "s"
    with served(source.zstd, sock) as srv:
        url = srv.url("drive-scsi0")
        procs = [subprocess.Popen(["nbdcopy", "--connections=2", url, str(tmp_path / f"c{i}")])
                 for i in range(4)]
        time.sleep(0.1)
        procs[0].kill()
        for junk in (os.urandom(5000), b"NBDMAGIC" * 100, b""):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(junk)
        with socket.socket(socket.AF_UNIX) as s:           # requests, then gone
            s.connect(str(sock))
            _handshake(s, "drive-scsi0")
            s.sendall(b"".join(_req(nbd.CMD_READ, i, 0, 8 * MiB) for i in range(40)))
        with socket.socket(socket.AF_UNIX) as s:           # garbage after the handshake
            s.connect(str(sock))
            _handshake(s, "drive-scsi0")
            s.sendall(os.urandom(100))
            assert s.recv(100) == b""                      # dropped
        for i, p in enumerate(procs):
            p.wait(timeout=120)
            if i:
                assert p.returncode == 0
                assert (tmp_path / f"c{i}").read_bytes() == source.disk0.read_bytes()
        _compare(srv.url("drive-virtio1"), source.disk1, tmp_path)
        assert _alive(srv.pid)


@needs_qemu
@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_damaged_cluster_fails_only_its_reads(source: Source, kind: str,
                                              tmp_path: Path) -> None:
    archive = source.plain if kind == "plain" else source.zstd
    data = bytearray(archive.read_bytes())
    disk0 = source.disk0.read_bytes()
    needle = disk0[20 * CLUSTER + 900:20 * CLUSTER + 1100]
    pos = data.find(needle)
    assert pos > 0
    data[pos + 100] ^= 0xFF
    bad = tmp_path / archive.name.replace("vm.", "bad.")
    bad.write_bytes(bytes(data))
    log = tmp_path / "serve.log"
    with served(bad, tmp_path / "s", "--log", str(log)) as srv:
        url = srv.url("drive-scsi0")

        def read(offset: int, length: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["qemu-io", "-r", "-f", "raw", "-c",
                                   f"read -v {offset} {length}", url],
                                  capture_output=True, text=True)

        failed = read(20 * CLUSTER, 4096)
        assert "Input/output error" in failed.stdout + failed.stderr
        good = [0, 19, 21, 100, 300] if kind == "plain" else [100, 300]
        for cluster in good:
            r = read(cluster * CLUSTER, 512)
            assert r.returncode == 0 and "error" not in r.stdout + r.stderr, r.stdout
        # a whole copy fails rather than carrying wrong bytes; the other disk is whole
        conv = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url,
                               str(tmp_path / "x.raw")], capture_output=True, text=True)
        assert conv.returncode != 0
        _compare(srv.url("drive-virtio1"), source.disk1, tmp_path)
    text = log.read_text()
    assert "drive-scsi0" in text and "EIO" in text and "checksum" in text


# -- in-process, and QEMU on top ------------------------------------------------------------------

def test_random_reads_of_a_compressed_archive_follow_the_loop_cpu(source: Source) -> None:
    """A local .vma.zst's random reads go to the session's own thread (Session.near), moved to
    the CPU the loop runs on; the bytes are the disk's. Where the system refuses to move it,
    reads go on through the other workers."""
    from vmafs.archive.serving import open_session

    disk = source.disk0.read_bytes()
    rnd = random.Random(3)

    async def main() -> None:
        async with open_session(str(source.zstd)) as session:
            near = session.near
            assert near is not None
            dev = next(d.dev_id for d in session.devices if d.name == "drive-scsi0")
            for _ in range(20):
                off = rnd.randrange(0, DISK0_SIZE - 4096)
                got = await session.read(session.reader(dev), off, 4096)
                assert bytes(got) == disk[off:off + 4096]
                assert near.busy == 0
            assert len(near._threads) == 1 and near._cpu >= 0
            cpus = os.sched_getaffinity(near._threads[0].native_id or 0)
            assert len(cpus) == 1 and cpus <= os.sched_getaffinity(0)
            assert not near.follow(1 << 20)  # no such CPU: refused, left where it was
            assert os.sched_getaffinity(near._threads[0].native_id or 0) == cpus
        async with open_session(str(source.plain)) as session:
            assert session.near is None  # read inline, no thread

    trio.run(main)


@needs_qemu
def test_open_export_in_process(source: Source, tmp_path: Path) -> None:
    """What live restore and boot will use: `async with open_export(...)` serves while the
    block runs, and leaves nothing behind."""
    from vmafs.serve.nbd import open_export

    sock = tmp_path / "in.sock"

    async def main() -> None:
        async with open_export(str(source.zstd), socket=str(sock)) as export:
            assert set(export.urls) == {"drive-scsi0", "drive-virtio1"}
            out = tmp_path / "x.raw"
            await trio.run_process(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                    export.urls["drive-scsi0"], str(out)])
            assert out.read_bytes() == source.disk0.read_bytes()

    trio.run(main)
    assert not sock.exists()


@needs_qemu
def test_boot_from_export(tmp_path: Path) -> None:
    """QEMU (TCG) boots the backed-up test guest from the export through a qcow2 overlay."""
    import guestimage

    try:
        boot = guestimage.build_boot_disk()
    except guestimage.GuestUnavailable as exc:
        pytest.skip(str(exc))
    archive = tmp_path / "boot.vma.zst"
    vmafs("create", "-q", "-o", archive, f"drive-virtio0={boot}", check=True)
    with served(archive, tmp_path / "s") as srv:
        overlay = tmp_path / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        srv.url("drive-virtio0"), str(overlay)], check=True)
        with guestimage.QemuVM(disks=[guestimage.Disk(overlay, fmt="qcow2", bootindex=0)]) as vm:
            vm.wait_for(guestimage.BOOT_MARKER, timeout=240)
