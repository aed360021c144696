"""Measure the NBD sink: qemu-img convert (and optionally QEMU's backup job) into a
handler that discards, against qemu-img convert to a raw file in the same run.

    python tools/bench_nbd.py [--size-mib 1024] [--backup] [--workdir DIR]

Prints MB/s (10^6 bytes per second) and what the client sent (request kinds, sizes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmafs import nbd  # noqa: E402
from vmafs.backup.nbd_server import NBDStats, serve_nbd  # noqa: E402


class DiscardHandler:
    def __init__(self) -> None:
        self.sizes: collections.Counter[tuple[str, int]] = collections.Counter()

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        self.sizes["write", len(data)] += 1

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.sizes["zeroes", length] += 1

    async def flush(self) -> None:
        self.sizes["flush", 0] += 1


def make_source(path: Path, size: int) -> None:
    """A fully allocated qcow2 of incompressible-looking data (one random MiB repeated)."""
    raw = path.with_suffix(".raw")
    block = os.urandom(1 << 20)
    with raw.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def report(label: str, nbytes: int, seconds: float) -> None:
    print(f"{label:<40} {nbytes / seconds / 1e6:8.0f} MB/s  ({seconds:.2f} s)")


def describe(stats: NBDStats, handler: DiscardHandler) -> None:
    kinds = {
        f"{nbd.COMMAND_NAMES.get(c, c)}/flags={f}": n for (c, f), n in stats.request_kinds.items()
    }
    print("   requests:", kinds)
    common = sorted(handler.sizes.items(), key=lambda kv: -kv[1])[:6]
    print("   most common (kind, length): count:", common)


async def convert_to_nbd(src: Path, sock: Path, size: int) -> tuple[float, NBDStats, Any]:
    handler = DiscardHandler()
    async with trio.open_nursery() as nursery:
        stats = await nursery.start(serve_nbd, str(sock), size, handler)
        t0 = time.perf_counter()
        await trio.run_process(
            ["qemu-img", "convert", "-n", "-O", "raw", str(src), f"nbd+unix:///?socket={sock}"]
        )
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return elapsed, stats, handler


async def backup_to_nbd(
    src: Path, workdir: Path, size: int, null_co: bool = False
) -> tuple[float, NBDStats, Any]:
    """QEMU's real backup job (sync=full) into the discarding sink (or QEMU's null-co)."""
    sock = workdir / "backup.sock"
    qmp_path = workdir / "qmp.sock"
    handler = DiscardHandler()
    proc = await trio.lowlevel.open_process(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "none",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            "-blockdev",
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={src}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                stream = await trio.open_unix_socket(str(qmp_path))
                break
            except OSError:
                await trio.sleep(0.05)
        buf = b""

        async def read() -> dict[str, Any]:
            nonlocal buf
            while b"\n" not in buf:
                buf += await stream.receive_some(65536)
            line, buf = buf.split(b"\n", 1)
            msg: dict[str, Any] = json.loads(line)
            return msg

        async def execute(cmd: str, **args: Any) -> dict[str, Any]:
            await stream.send_all(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
            while True:
                msg = await read()
                if "event" not in msg:
                    if "error" in msg:
                        raise RuntimeError(msg)
                    return msg

        await read()
        await execute("qmp_capabilities")
        async with trio.open_nursery() as nursery:
            stats = await nursery.start(serve_nbd, str(sock), size, handler)
            if null_co:
                await execute("blockdev-add", driver="null-co", size=size, **{"node-name": "t0"})
            else:
                await execute(
                    "blockdev-add",
                    driver="nbd",
                    **{"node-name": "t0"},
                    server={"type": "unix", "path": str(sock)},
                )
            t0 = time.perf_counter()
            await execute(
                "blockdev-backup", **{"job-id": "j0"}, device="disk0", target="t0", sync="full"
            )
            while True:
                msg = await read()
                if msg.get("event") == "BLOCK_JOB_COMPLETED":
                    assert "error" not in msg["data"], msg
                    break
            elapsed = time.perf_counter() - t0
            await execute("blockdev-del", **{"node-name": "t0"})
            nursery.cancel_scope.cancel()
        await execute("quit")
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    return elapsed, stats, handler


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backup", action="store_true", help="also time QEMU's backup job")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src = work / "src.qcow2"
        make_source(src, size)
        # Warm the page cache so both runs read the source from memory.
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
        for _ in range(args.rounds):
            dst = work / "dst.raw"
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(dst)], check=True)
            report("qemu-img convert -> raw file", size, time.perf_counter() - t0)
            dst.unlink()
            cpu = time.process_time()
            elapsed, stats, handler = await convert_to_nbd(src, work / "nbd.sock", size)
            report("qemu-img convert -> vmafs NBD (discard)", size, elapsed)
            print(f"   server CPU: {(time.process_time() - cpu) / (size / 1e9):.2f} s per GB")
        describe(stats, handler)
        if args.backup:
            for _ in range(args.rounds):
                cpu = time.process_time()
                elapsed, stats, handler = await backup_to_nbd(src, work, size)
                report("QEMU blockdev-backup -> vmafs NBD", size, elapsed)
                print(f"   server CPU: {(time.process_time() - cpu) / (size / 1e9):.2f} s per GB")
                elapsed, _, _ = await backup_to_nbd(src, work, size, null_co=True)
                report("QEMU blockdev-backup -> null-co (in QEMU)", size, elapsed)
            describe(stats, handler)


if __name__ == "__main__":
    trio.run(main)
