"""The NBD export as a reading path of the differential mutation test: a mutant served by the
real `vmafs serve`, every piece read by a minimal NBD client (simple replies, as the oldest
clients use), judged like the FUSE mount (tests/mutations.py): the same bytes, or an error."""

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
from pathlib import Path

import mutations as mu

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
EIO = 5


class NBDClientError(Exception):
    """The server answered with an error (or broke the protocol)."""


class Client:
    """One connection to one export; `read` returns bytes or raises NBDClientError."""

    def __init__(self, path: str, export: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        magic, opt, _ = struct.unpack(">QQH", self._recv(18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT):
            raise NBDClientError("bad greeting")
        name = export.encode()
        self.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO,
                                                             len(name) + 6)
                          + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        self.size = -1
        while True:
            _, _, rep, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if rep == REP_INFO and data[:2] == b"\0\0":
                self.size = struct.unpack_from(">Q", data, 2)[0]
            elif rep == REP_ACK:
                break
            elif rep >= 1 << 31:
                raise NBDClientError(f"GO refused: {data.decode(errors='replace')}")
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NBDClientError("connection closed")
            buf += chunk
        return bytes(buf)

    def read(self, offset: int, length: int) -> bytes:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, self.handle, offset,
                                      length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NBDClientError("bad reply")
        if error:
            raise NBDClientError(f"error {error}")
        return self._recv(length)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 0, 0, 0))
        self.sock.close()


def check_nbd(m: mu.Mutant, base: mu.Base, work: Path, inproc: mu.Outcome) -> list[mu.Failure]:
    """`vmafs serve` of a mutant: refused only where the mount may refuse, and every piece of
    every disk (clipped to the export) the bytes extract gives, or an error."""
    fails: list[mu.Failure] = []
    out = mu.Outcome(m)
    path = work / ("n" + base.name[base.name.index("."):])
    path.write_bytes(m.data)
    sock = work / "nbd.sock"
    dec = mu.decode(base.container, m.data)
    ref = mu.reference(dec.stream, dec.clean, dec.why)
    rc, err, info = _serve(path, sock)
    if rc == -9:
        return [mu.Failure("nbd", "hang", "vmafs serve")]
    if "Traceback" in err:
        fails.append(mu.Failure("nbd", "traceback", err.strip().splitlines()[-1]))
    if rc != 0:
        if inproc.verify_ok and base.random_access:
            fails.append(mu.Failure("nbd", "refuses-verified", err.strip()[-200:]))
        return fails
    xdir = work / "nx"
    stack = contextlib.ExitStack()
    try:
        images: dict[int, object] = {}
        if inproc.verify_ok:
            mu.run_cli(["extract", "-q", str(path), str(xdir)])
            images = dict(mu._open_extracted(stack, xdir, ref))
        expect = mu.Expect(bool(inproc.verify_ok), images, ref)  # type: ignore[arg-type]
        rng = random.Random(f"pieces|{m.id}")
        devs = {d: r.size for d, r in ref.devices.items()}
        clients: dict[int, Client] = {}
        for dev_id, off, length in mu.pieces(devs, rng):
            length = min(length, devs[dev_id] - off)
            if length <= 0:
                continue
            client = clients.get(dev_id)
            if client is None:
                try:
                    client = clients[dev_id] = Client(str(sock), ref.devices[dev_id].name)
                except (OSError, NBDClientError) as e:
                    out.fail("nbd", "missing-export", f"{ref.devices[dev_id].name}: {e}")
                    break
                if client.size != devs[dev_id]:
                    out.fail("nbd", "header-disagrees", f"export size {client.size}")
            try:
                got: bytes | None = client.read(off, length)
                text = ""
            except NBDClientError as e:
                got, text = None, str(e)
                if "closed" in text or "bad reply" in text:
                    out.fail("nbd", "connection-broken", text)
                    clients.pop(dev_id).close()
            mu._judge(out, "nbd", expect, dev_id, off, length, got, text)
        for c in clients.values():
            c.close()
    finally:
        stack.close()
        shutil.rmtree(xdir, ignore_errors=True)
        if info is not None:
            _stop(int(info["pid"]))
            if sock.exists():
                fails.append(mu.Failure("nbd", "socket-left", str(sock)))
    return fails + out.failures


def _serve(path: Path, sock: Path) -> tuple[int, str, dict[str, object] | None]:
    """(rc, stderr, its --json) of `vmafs serve` (daemonized once ready); rc -9 on a hang."""
    try:
        proc = subprocess.run([sys.executable, "-m", "vmafs", "serve", "--json", "--socket",
                               str(sock), str(path)], env=mu._env(), capture_output=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -9, "TIMEOUT", None
    err = proc.stderr.decode(errors="replace")
    if proc.returncode:
        return proc.returncode, err, None
    return 0, err, json.loads(proc.stdout)


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)


