"""NBD sink: the pure state machine on bytes, then the trio server against real QEMU."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket as stdsocket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from vmafs.backup.nbd_server import NBDStats, serve_nbd
from vmafs.backup.pipe import SMALL_RESERVE, SMALL_WRITE, WRITE, Pipe
from vmafs.format import nbd

MiB = 1024 * 1024

# --- client-side helpers for driving the state machine ----------------------------


def client_flags(flags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data


def go_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def request(cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def parse_opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == nbd.OPT_REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def events(conn: nbd.NBDServer) -> list[nbd.Event]:
    out: list[nbd.Event] = []
    while True:
        ev = conn.next_event()
        if ev is nbd.NEED_DATA:
            return out
        assert not isinstance(ev, nbd._NeedData)
        out.append(ev)
        if isinstance(ev, nbd.Disconnect):
            return out


def greeted(size: int = 16 * MiB) -> nbd.NBDServer:
    conn = nbd.NBDServer(size)
    greeting = conn.data_to_send()
    assert greeting == b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3)
    return conn


def transmitting(size: int = 16 * MiB) -> nbd.NBDServer:
    conn = greeted(size)
    conn.receive_data(client_flags() + option(nbd.OPT_GO, go_data()))
    assert events(conn) == [nbd.TransmissionStarted("", "GO")]
    conn.data_to_send()
    return conn


def simple_reply(data: bytes) -> tuple[int, int]:
    magic, error, handle = struct.unpack(">IIQ", data)
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    return error, handle


# --- handshake ------------------------------------------------------------------



def test_events_are_values() -> None:
    """Events compare by class and fields (never equal to another class's with the same
    fields), hash alike when equal, cannot be changed, and show their fields."""
    assert nbd.Write(1, 4096, b"x", 0) == nbd.Write(1, 4096, b"x", 0)
    assert nbd.Write(1, 4096, b"x", 0) != nbd.Write(1, 4096, b"y", 0)
    assert nbd.Read(1, 0, 512, 0) != nbd.WriteZeroes(1, 0, 512, 0)
    assert len({nbd.Flush(3), nbd.Flush(3), nbd.Cache(3, 0, 1)}) == 2
    ev = nbd.BlockStatus(2, 0, 10, True)
    assert (ev.handle, ev.offset, ev.length, ev.one) == (2, 0, 10, True)
    with pytest.raises(AttributeError):
        setattr(ev, "handle", 5)  # noqa: B010 - the point: it refuses
    with pytest.raises(AttributeError):
        del ev.handle
    with pytest.raises(AttributeError):
        setattr(ev, "other", 1)  # noqa: B010
    assert repr(nbd.Disconnect("EOF")) == "Disconnect(reason='EOF')"
    assert repr(nbd.Write(1, 2, b"", 0)) == "Write(handle=1, offset=2, data=b'', flags=0)"

def test_go_with_block_size() -> None:
    conn = greeted(5 * MiB + 512)
    conn.receive_data(
        client_flags() + option(nbd.OPT_GO, go_data("", (nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)))
    )
    assert events(conn) == [nbd.TransmissionStarted("", "GO")]
    replies = parse_opt_replies(conn.data_to_send())
    assert [r[:2] for r in replies] == [
        (nbd.OPT_GO, nbd.REP_INFO),
        (nbd.OPT_GO, nbd.REP_INFO),
        (nbd.OPT_GO, nbd.REP_ACK),
    ]
    assert struct.unpack(">HQH", replies[0][2]) == (
        nbd.INFO_EXPORT,
        5 * MiB + 512,
        nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_WRITE_ZEROES,
    )
    assert struct.unpack(">HIII", replies[1][2]) == (nbd.INFO_BLOCK_SIZE, 1, 65536, 32 * MiB)
    assert conn.state is nbd.State.TRANSMISSION


def test_go_without_block_size_request_sends_only_export_info() -> None:
    conn = greeted()
    conn.receive_data(client_flags() + option(nbd.OPT_GO, go_data()))
    events(conn)
    replies = parse_opt_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [nbd.REP_INFO, nbd.REP_ACK]


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = greeted(1234 * 512)
    flags = nbd.FLAG_C_FIXED_NEWSTYLE | (nbd.FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(client_flags(flags) + option(nbd.OPT_EXPORT_NAME))
    assert events(conn) == [nbd.TransmissionStarted("", "EXPORT_NAME")]
    out = conn.data_to_send()
    assert out[:10] == struct.pack(">QH", 1234 * 512, nbd.TRANSMISSION_FLAGS)
    assert out[10:] == (b"" if no_zeroes else bytes(124))


def test_export_name_unknown_ends_session() -> None:
    conn = greeted()
    conn.receive_data(client_flags() + option(nbd.OPT_EXPORT_NAME, b"nope"))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], nbd.Disconnect)
    assert conn.data_to_send() == b""


def test_info_list_unsupported_then_go() -> None:
    conn = greeted()
    unsupported = [
        nbd.OPT_STRUCTURED_REPLY,
        nbd.OPT_STARTTLS,
        nbd.OPT_LIST_META_CONTEXT,
        nbd.OPT_SET_META_CONTEXT,
        11,  # extended headers
        4242,
    ]
    conn.receive_data(
        client_flags()
        + b"".join(option(o) for o in unsupported)
        + option(nbd.OPT_INFO, go_data("", (nbd.INFO_BLOCK_SIZE,)))
        + option(nbd.OPT_LIST)
        + option(nbd.OPT_LIST, b"x")
        + option(nbd.OPT_GO, go_data("other"))
        + option(nbd.OPT_GO, go_data()[:-1])  # malformed
        + option(nbd.OPT_GO, go_data())
    )
    assert events(conn) == [nbd.TransmissionStarted("", "GO")]
    replies = parse_opt_replies(conn.data_to_send())
    assert [(o, r) for o, r, _ in replies] == [(o, nbd.REP_ERR_UNSUP) for o in unsupported] + [
        (nbd.OPT_INFO, nbd.REP_INFO),
        (nbd.OPT_INFO, nbd.REP_INFO),
        (nbd.OPT_INFO, nbd.REP_ACK),
        (nbd.OPT_LIST, nbd.REP_SERVER),
        (nbd.OPT_LIST, nbd.REP_ACK),
        (nbd.OPT_LIST, nbd.REP_ERR_INVALID),
        (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN),
        (nbd.OPT_GO, nbd.REP_ERR_INVALID),
        (nbd.OPT_GO, nbd.REP_INFO),
        (nbd.OPT_GO, nbd.REP_ACK),
    ]
    server_reply = [d for o, r, d in replies if r == nbd.REP_SERVER][0]
    assert server_reply == struct.pack(">I", 0)


def test_named_export() -> None:
    conn = nbd.NBDServer(MiB, export_name="drive-scsi0")
    conn.data_to_send()
    conn.receive_data(
        client_flags()
        + option(nbd.OPT_GO, go_data(""))
        + option(nbd.OPT_GO, go_data("drive-scsi0"))
    )
    assert events(conn) == [nbd.TransmissionStarted("drive-scsi0", "GO")]
    replies = parse_opt_replies(conn.data_to_send())
    assert replies[0][1] == nbd.REP_ERR_UNKNOWN


def test_abort() -> None:
    conn = greeted()
    conn.receive_data(client_flags() + option(nbd.OPT_ABORT))
    assert events(conn) == [nbd.Disconnect("NBD_OPT_ABORT")]
    assert parse_opt_replies(conn.data_to_send()) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]


def test_bad_client_flags() -> None:
    conn = greeted()
    conn.receive_data(client_flags(0x10))
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()
    assert isinstance(conn.next_event(), nbd.Disconnect)


def test_bad_option_magic_and_huge_option() -> None:
    conn = greeted()
    conn.receive_data(client_flags() + struct.pack(">QII", 0x1234, nbd.OPT_GO, 0))
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()
    conn = greeted()
    conn.receive_data(client_flags() + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 1 << 30))
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()


def test_eof_during_handshake() -> None:
    conn = greeted()
    conn.receive_data(client_flags())
    conn.receive_data(b"")
    assert events(conn) == [nbd.Disconnect("EOF")]
    conn = greeted()
    conn.receive_data(client_flags() + option(nbd.OPT_GO, go_data())[:10])
    conn.receive_data(b"")
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()


# --- transmission ---------------------------------------------------------------


def test_each_command() -> None:
    conn = transmitting(16 * MiB)
    payload = bytes(range(256)) * 256
    conn.receive_data(
        request(nbd.CMD_WRITE, 1, 4096, len(payload))
        + payload
        + request(nbd.CMD_WRITE_ZEROES, 2, MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
        + request(nbd.CMD_WRITE_ZEROES, 3, 3 * MiB, 512)
        + request(nbd.CMD_FLUSH, 4)
        + request(nbd.CMD_READ, 5, 0, 4096)
        + request(nbd.CMD_TRIM, 6, 0, 4096)
        + request(nbd.CMD_BLOCK_STATUS, 7, 0, 4096)
        + request(99, 8)
        + request(nbd.CMD_DISC, 9)
        + b"ignored after DISC"
    )
    evs = events(conn)
    assert evs[:4] == [
        nbd.Write(1, 4096, payload, 0),
        nbd.WriteZeroes(2, MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE),
        nbd.WriteZeroes(3, 3 * MiB, 512, 0),
        nbd.Flush(4),
    ]
    bad = evs[4:8]
    assert all(isinstance(e, nbd.BadRequest) for e in bad)
    assert [(e.handle, e.error) for e in bad if isinstance(e, nbd.BadRequest)] == [
        (5, nbd.ENOTSUP),
        (6, nbd.EINVAL),
        (7, nbd.EINVAL),
        (8, nbd.EINVAL),
    ]
    assert evs[8] == nbd.Disconnect("NBD_CMD_DISC")
    assert conn.inflight == 8
    assert simple_reply(conn.reply(1)) == (0, 1)
    assert simple_reply(conn.reply(5, nbd.ENOTSUP)) == (nbd.ENOTSUP, 5)
    with pytest.raises(nbd.LocalProtocolError):
        conn.reply(1)
    with pytest.raises(nbd.LocalProtocolError):
        conn.reply(12345)
    assert conn.next_event() == nbd.Disconnect("NBD_CMD_DISC")


def test_handles_are_64_bit() -> None:
    conn = transmitting()
    handle = 0xFEDCBA9876543210
    conn.receive_data(request(nbd.CMD_FLUSH, handle))
    assert events(conn) == [nbd.Flush(handle)]
    assert simple_reply(conn.reply(handle)) == (0, handle)


def test_out_of_range_and_bad_flags_keep_the_stream_in_sync() -> None:
    size = 4 * MiB
    conn = transmitting(size)
    big = b"\x01" * 8192
    conn.receive_data(
        request(nbd.CMD_WRITE, 1, size - 4096, len(big))  # crosses the end
        + big
        + request(nbd.CMD_WRITE, 2, 0, 512, nbd.CMD_FLAG_FUA)  # FUA not advertised
        + b"\x02" * 512
        + request(nbd.CMD_WRITE_ZEROES, 3, size, 1)
        + request(nbd.CMD_WRITE_ZEROES, 4, 0, 512, nbd.CMD_FLAG_FAST_ZERO)
        + request(nbd.CMD_WRITE, 5, 0, 0)
        + request(nbd.CMD_FLUSH, 6, 0, 1)
        + request(nbd.CMD_WRITE, 7, size - 3, 3)
        + b"end"
    )
    evs = events(conn)
    errors = [(e.handle, e.error) for e in evs if isinstance(e, nbd.BadRequest)]
    assert errors == [
        (1, nbd.ENOSPC),
        (2, nbd.EINVAL),
        (3, nbd.ENOSPC),
        (4, nbd.EINVAL),
        (5, nbd.EINVAL),
        (6, nbd.EINVAL),
    ]
    assert evs[-1] == nbd.Write(7, size - 3, b"end", 0)


def test_refused_payload_is_skipped_across_chunks() -> None:
    conn = transmitting(MiB)
    conn.receive_data(request(nbd.CMD_WRITE, 1, MiB, 100) + b"x" * 10)
    assert events(conn) == []
    conn.receive_data(b"x" * 50)
    assert events(conn) == []
    conn.receive_data(b"x" * 40 + request(nbd.CMD_FLUSH, 2))
    evs = events(conn)
    assert [type(e) for e in evs] == [nbd.BadRequest, nbd.Flush]


def test_oversized_write_is_refused_without_buffering() -> None:
    conn = transmitting(1 << 40)
    length = nbd.MAX_BLOCK + 1
    conn.receive_data(request(nbd.CMD_WRITE, 1, 0, length))
    assert events(conn) == []
    chunk = bytes(MiB)
    for _ in range(length // MiB):
        conn.receive_data(chunk)
        assert events(conn) == []
        assert len(conn._buf) == 0  # discarded as it streams by
    conn.receive_data(b"z" + request(nbd.CMD_FLUSH, 2))
    evs = events(conn)
    assert len(evs) == 2 and evs[1] == nbd.Flush(2)
    assert isinstance(evs[0], nbd.BadRequest) and (evs[0].handle, evs[0].error) == (1, nbd.EINVAL)


def test_bad_request_magic() -> None:
    conn = transmitting()
    conn.receive_data(struct.pack(">IHHQQI", 0xDEADBEEF, 0, nbd.CMD_WRITE, 1, 0, 512))
    with pytest.raises(nbd.NBDProtocolError, match="magic"):
        conn.next_event()
    assert conn.state is nbd.State.CLOSED


def test_eof_mid_payload_and_at_boundary() -> None:
    conn = transmitting()
    conn.receive_data(request(nbd.CMD_WRITE, 1, 0, 4096) + b"a" * 100)
    conn.receive_data(b"")
    with pytest.raises(nbd.NBDProtocolError):
        conn.next_event()
    conn = transmitting()
    conn.receive_data(request(nbd.CMD_FLUSH, 1))
    conn.receive_data(b"")
    assert events(conn) == [nbd.Flush(1), nbd.Disconnect("EOF")]


def _session() -> bytes:
    payload_a = os.urandom(200_000)
    payload_b = bytes([7]) * 65536
    return (
        client_flags()
        + option(nbd.OPT_STRUCTURED_REPLY)
        + option(nbd.OPT_GO, go_data("", (nbd.INFO_BLOCK_SIZE,)))
        + request(nbd.CMD_WRITE, 1, 0, len(payload_a))
        + payload_a
        + request(nbd.CMD_WRITE_ZEROES, 2, MiB, MiB, nbd.CMD_FLAG_NO_HOLE)
        + request(nbd.CMD_WRITE, 3, 2 * MiB, len(payload_b))
        + payload_b
        + request(nbd.CMD_WRITE, 4, 15 * MiB, 2 * MiB)  # out of range, skipped
        + bytes(2 * MiB)
        + request(nbd.CMD_READ, 5, 0, 512)
        + request(nbd.CMD_FLUSH, 6)
        + request(nbd.CMD_DISC, 7)
    )


def _run_session(data: bytes, cuts: Callable[[int], list[int]]) -> tuple[list[Any], bytes]:
    conn = nbd.NBDServer(16 * MiB)
    out = bytearray(conn.data_to_send())
    evs: list[Any] = []
    positions = [0, *sorted(set(cuts(len(data)))), len(data)]
    for a, b in zip(positions, positions[1:], strict=False):
        conn.receive_data(data[a:b])
        evs.extend(events(conn))
        out += conn.data_to_send()
    return [(type(e).__name__, e) for e in evs], bytes(out)


def test_byte_by_byte_equals_one_chunk() -> None:
    data = _session()
    # Byte by byte through the handshake and headers; the big payloads in
    # chunks of 1000 bytes keep the test fast while still splitting everything.
    whole = _run_session(data, lambda n: [])
    fine = _run_session(data, lambda n: list(range(1, 400)) + list(range(400, n, 997)))
    assert fine == whole
    names = [name for name, _ in whole[0]]
    assert names == [
        "TransmissionStarted",
        "Write",
        "WriteZeroes",
        "Write",
        "BadRequest",
        "BadRequest",
        "Flush",
        "Disconnect",
    ]


def test_truly_byte_by_byte_small_session() -> None:
    data = (
        client_flags()
        + option(nbd.OPT_LIST)
        + option(nbd.OPT_GO, go_data())
        + request(nbd.CMD_WRITE, 1, 512, 1000)
        + b"q" * 1000
        + request(nbd.CMD_WRITE_ZEROES, 2, 0, 512)
        + request(nbd.CMD_DISC, 3)
    )
    whole = _run_session(data, lambda n: [])
    fine = _run_session(data, lambda n: list(range(1, n)))
    assert fine == whole
    assert [n for n, _ in fine[0]] == ["TransmissionStarted", "Write", "WriteZeroes", "Disconnect"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2_600_000), max_size=40))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    data = _SESSION
    assert _run_session(data, lambda n: [c for c in cuts if c < n]) == _WHOLE


_SESSION = _session()
_WHOLE = _run_session(_SESSION, lambda n: [])


def test_payload_buffer_fast_path() -> None:
    conn = transmitting()
    payload = os.urandom(MiB)
    conn.receive_data(request(nbd.CMD_WRITE, 9, 0, MiB) + payload[:1000])
    assert conn.next_event() is nbd.NEED_DATA
    pos = 1000
    while (view := conn.payload_buffer()) is not None:
        n = min(len(view), 300_000)
        view[:n] = payload[pos : pos + n]
        view.release()
        conn.payload_received(n)
        pos += n
    ev = conn.next_event()
    assert isinstance(ev, nbd.Write) and ev.data == payload and ev.handle == 9
    assert conn.payload_buffer() is None
    with pytest.raises(nbd.LocalProtocolError):
        conn.payload_received(1)


def test_many_large_writes_in_small_pieces() -> None:
    """1 MiB writes fed in 64 KiB pieces: every write arrives whole and intact."""
    conn = transmitting(64 * MiB)
    stream = bytearray()
    for i in range(16):
        stream += request(nbd.CMD_WRITE, i, i * MiB, MiB) + bytes([i]) * MiB
    got = []
    for pos in range(0, len(stream), 65536):
        conn.receive_data(stream[pos : pos + 65536])
        got.extend(events(conn))
    assert [(e.offset, e.data[0], len(e.data)) for e in got if isinstance(e, nbd.Write)] == [
        (i * MiB, i, MiB) for i in range(16)
    ]


# --- the trio server against real QEMU ------------------------------------------

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QEMU_NBD = shutil.which("qemu-nbd")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
needs_qemu_utils = pytest.mark.skipif(
    not (QEMU_IO and QEMU_IMG), reason="qemu-io/qemu-img (qemu-utils) not installed"
)
needs_qemu_system = pytest.mark.skipif(
    not (QEMU_SYSTEM and QEMU_IMG), reason="qemu-system-x86_64 not installed"
)

MARK = 0x5C  # bytes the client never wrote still read as MARK


class RecordingHandler:
    """Reassembles the export in memory and logs every call."""

    def __init__(self, size: int) -> None:
        self.image = bytearray([MARK]) * size
        self.ops: list[tuple[str, int, int]] = []
        self.fail_after: int | None = None  # raise ENOSPC after this many writes
        self.stall_after: int | None = None  # block forever after this many writes
        self.stalled = trio.Event()
        self.fail_next: Exception | None = None  # raised once, by the next write
        self.writes = 0

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        self.writes += 1
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if self.stall_after is not None and self.writes > self.stall_after:
            self.stalled.set()
            await trio.sleep_forever()
        if self.fail_after is not None and self.writes > self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.ops.append(("write", offset, len(data)))
        self.image[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.ops.append(("zeroes", offset, length))
        self.image[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.ops.append(("flush", 0, 0))


@asynccontextmanager
async def nbd_server(
    path: Path, size: int, handler: RecordingHandler
) -> AsyncIterator[tuple[NBDStats, trio.CancelScope]]:
    async with trio.open_nursery() as nursery:
        stats = await nursery.start(serve_nbd, str(path), size, handler)
        assert path.exists()
        yield stats, nursery.cancel_scope
        nursery.cancel_scope.cancel()
    assert not path.exists()


def qemu_img(*args: str) -> None:
    subprocess.run([QEMU_IMG or "qemu-img", *args], check=True, capture_output=True)


def qemu_io_write(image: Path, fmt: str, *commands: str) -> None:
    args = [QEMU_IO or "qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def make_sparse_qcow2(path: Path, size: int) -> bytes:
    """A qcow2 with a few data ranges (some unaligned) and holes; returns its raw bytes."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
    qemu_io_write(
        path,
        "qcow2",
        "write -P 0x11 0 1M",
        "write -P 0x22 5M 64k",
        "write -P 0x33 9437184 4096",  # 9 MiB
        "write -P 0x44 12M 3M",
        f"write -P 0x55 {size - 512} 512",
    )
    raw = path.with_suffix(".raw")
    qemu_img("convert", "-O", "raw", str(path), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    assert len(data) == size
    return data


def short_tmp(tmp_path: Path) -> Path:
    """Unix socket paths are limited to 107 bytes."""
    assert len(str(tmp_path / "nbd.sock")) < 100
    return tmp_path


@needs_qemu_utils
def test_qemu_io_write_zeroes_flush(tmp_path: Path) -> None:
    sock = short_tmp(tmp_path) / "nbd.sock"
    size = 8 * MiB
    handler = RecordingHandler(size)

    async def main() -> NBDStats:
        async with nbd_server(sock, size, handler) as (stats, _):
            result = await trio.run_process(
                [
                    QEMU_IO or "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0xab 0 64k",
                    "-c",
                    "write -z 1M 2M",
                    "-c",
                    "flush",
                    f"nbd+unix:///?socket={sock}",
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            assert b"wrote 65536/65536 bytes at offset 0" in result.stdout
            assert stats.connections == 1
            return stats

    stats = trio.run(main)
    data_ops = [op for op in handler.ops if op[0] != "flush"]
    assert data_ops == [("write", 0, 65536), ("zeroes", MiB, 2 * MiB)]
    assert ("flush", 0, 0) in handler.ops
    assert handler.image[:65536] == b"\xab" * 65536
    assert handler.image[MiB : 3 * MiB] == bytes(2 * MiB)
    assert handler.image[65536:MiB] == bytes([MARK]) * (MiB - 65536)
    assert stats.bytes_written == 65536 and stats.bytes_zeroed == 2 * MiB
    assert stats.request_kinds[(nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE)] == 1
    assert stats.errors == 0


@needs_qemu_utils
def test_qemu_io_refused_requests(tmp_path: Path) -> None:
    """Reads and out-of-range writes fail cleanly; the connection stays usable."""
    sock = short_tmp(tmp_path) / "nbd.sock"
    size = MiB
    handler = RecordingHandler(size)

    async def main() -> subprocess.CompletedProcess[bytes]:
        async with nbd_server(sock, size, handler):
            return await trio.run_process(
                [
                    QEMU_IO or "qemu-io",
                    "--image-opts",
                    "-c",
                    "read 0 4k",
                    "-c",
                    "write -P 1 0 4k",
                    f"driver=nbd,path={sock}",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

    result = trio.run(main)
    out = (result.stdout + result.stderr).decode()
    assert "read failed" in out
    assert "wrote 4096/4096 bytes at offset 0" in out
    assert handler.ops[0] == ("write", 0, 4096)


@needs_qemu_utils
def test_handler_error_is_eio_and_connection_survives(tmp_path: Path) -> None:
    sock = short_tmp(tmp_path) / "nbd.sock"
    # A stale socket file from an earlier run is replaced.
    stale = stdsocket.socket(stdsocket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    size = MiB
    handler = RecordingHandler(size)
    handler.fail_next = RuntimeError("the archive writer broke")

    async def run_qemu_io(*commands: str) -> str:
        args = [QEMU_IO or "qemu-io", "-f", "raw"]
        for c in commands:
            args += ["-c", c]
        result = await trio.run_process(
            [*args, f"nbd+unix:///?socket={sock}"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return (result.stdout + result.stderr).decode()

    async def main() -> tuple[str, str, NBDStats]:
        async with nbd_server(sock, size, handler) as (stats, _):
            first = await run_qemu_io("write -P 1 0 4k", "write -P 2 4k 4k")
            second = await run_qemu_io("write -P 3 8k 4k")
            return first, second, stats

    first, second, stats = trio.run(main)
    assert "write failed: Input/output error" in first
    assert "wrote 4096/4096 bytes at offset 4096" in first
    assert "wrote 4096/4096 bytes at offset 8192" in second
    assert stats.connections == 2 and stats.errors == 1
    assert [op for op in handler.ops if op[0] == "write"] == [
        ("write", 4096, 4096),
        ("write", 8192, 4096),
    ]


@pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd not installed")
def test_qemu_nbd_list(tmp_path: Path) -> None:
    sock = short_tmp(tmp_path) / "nbd.sock"
    handler = RecordingHandler(3 * MiB)

    async def main() -> bytes:
        async with nbd_server(sock, 3 * MiB, handler):
            result = await trio.run_process(
                [QEMU_NBD or "qemu-nbd", "--list", "-k", str(sock)], capture_stdout=True
            )
            return result.stdout

    out = trio.run(main).decode()
    assert "size:  3145728" in out
    assert "flush" in out and "zeroes" in out
    assert "min block: 1\n" in out and "opt block: 65536\n" in out
    assert "max block: 33554432\n" in out


@needs_qemu_utils
def test_qemu_img_convert_sparse(tmp_path: Path) -> None:
    sock = short_tmp(tmp_path) / "nbd.sock"
    size = 16 * MiB + 4096
    src = tmp_path / "src.qcow2"
    expected = make_sparse_qcow2(src, size)
    handler = RecordingHandler(size)

    async def main() -> NBDStats:
        async with nbd_server(sock, size, handler) as (stats, _):
            await trio.run_process(
                [
                    QEMU_IMG or "qemu-img",
                    "convert",
                    "-n",
                    "-O",
                    "raw",
                    str(src),
                    f"nbd+unix:///?socket={sock}",
                ],
                capture_stderr=True,
            )
            return stats

    stats = trio.run(main)
    assert handler.image == expected
    # Holes came as WRITE_ZEROES, not data: qemu-img sends as data exactly the 4 KiB
    # blocks that are not all zero (its default -S 4k), even inside allocated clusters.
    nonzero_blocks = sum(1 for i in range(0, size, 4096) if any(expected[i : i + 4096]))
    assert stats.bytes_written == nonzero_blocks * 4096
    assert stats.bytes_written + stats.bytes_zeroed >= size
    assert stats.errors == 0


# --- QEMU's real backup job -----------------------------------------------------


class QMPError(Exception):
    pass


class QMP:
    """A minimal QMP client on a trio stream (tests only)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path) -> QMP:
        with trio.fail_after(30):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except OSError:
                    await trio.sleep(0.05)
        qmp = cls(stream)
        greeting = await qmp._read()
        assert "QMP" in greeting
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError(reply["error"].get("desc", reply))
            else:
                return reply.get("return")

    async def wait_event(self, name: str) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        while True:
            ev = await self._read()
            if "event" not in ev:
                continue
            if ev["event"] == name:
                return ev
            self.events.append(ev)


@asynccontextmanager
async def qemu_vm(tmp_path: Path, image: Path) -> AsyncIterator[tuple[QMP, trio.Process]]:
    qmp_path = tmp_path / "qmp.sock"
    proc = await trio.lowlevel.open_process(
        [
            QEMU_SYSTEM or "qemu-system-x86_64",
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
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        qmp = await QMP.connect(qmp_path)
        try:
            yield qmp, proc
        finally:
            with trio.move_on_after(10) as scope:
                scope.shield = True
                with suppress(EOFError, OSError, trio.BrokenResourceError):
                    await qmp.execute("quit")
                await proc.wait()
                await qmp.stream.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


async def start_backup(qmp: QMP, sock: Path) -> None:
    await qmp.execute(
        "blockdev-add",
        driver="nbd",
        **{"node-name": "target0"},
        server={"type": "unix", "path": str(sock)},
    )
    await qmp.execute(
        "transaction",
        actions=[
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": "backup0",
                    "device": "disk0",
                    "target": "target0",
                    "sync": "full",
                },
            }
        ],
        properties={"completion-mode": "grouped"},
    )


def run_backup_job(tmp_path: Path, image: Path, size: int, handler: RecordingHandler
                   ) -> tuple[dict[str, Any], NBDStats, Any, str]:
    """Run QEMU's backup job of `image` into `handler` through our NBD server; returns the
    job's completion event, the server's stats, the block jobs left after it, and the kind of
    the last request before the target was deleted."""
    sock = short_tmp(tmp_path) / "nbd.sock"

    async def main() -> tuple[dict[str, Any], NBDStats, Any, str]:
        async with (
            nbd_server(sock, size, handler) as (stats, _),
            qemu_vm(tmp_path, image) as (qmp, _proc),
        ):
            with trio.fail_after(120):
                await start_backup(qmp, sock)
                done = await qmp.wait_event("BLOCK_JOB_COMPLETED")
                last = handler.ops[-1][0] if handler.ops else ""
                jobs = await qmp.execute("query-block-jobs")
                await qmp.execute("blockdev-del", **{"node-name": "target0"})
                return done, stats, jobs, last

    return trio.run(main)


@needs_qemu_system
def test_qemu_backup_job(tmp_path: Path) -> None:
    size = 16 * MiB + 4096
    image = tmp_path / "disk.qcow2"
    expected = make_sparse_qcow2(image, size)
    handler = RecordingHandler(size)
    done, stats, _, last = run_backup_job(tmp_path, image, size, handler)
    assert last != "flush"
    assert "error" not in done["data"], done
    assert done["data"]["offset"] == done["data"]["len"]  # counted in 64 KiB clusters
    assert handler.image == expected
    assert handler.ops[-1] == ("flush", 0, 0)  # blockdev-del flushes, then disconnects
    assert stats.errors == 0
    # What QEMU 7.2's backup job sends: data as WRITE (≤ 1 MiB), holes as WRITE_ZEROES.
    kinds = {(nbd.COMMAND_NAMES[c], f) for c, f in stats.request_kinds}
    assert kinds <= {("WRITE", 0), ("WRITE_ZEROES", nbd.CMD_FLAG_NO_HOLE), ("FLUSH", 0)}
    assert stats.max_write <= MiB
    assert stats.bytes_written < size // 2


@needs_qemu_system
def test_qemu_backup_job_enospc(tmp_path: Path) -> None:
    size = 16 * MiB
    image = tmp_path / "disk.qcow2"
    make_sparse_qcow2(image, size)
    handler = RecordingHandler(size)
    handler.fail_after = 2
    done, stats, jobs, _ = run_backup_job(tmp_path, image, size, handler)
    assert stats.errors >= 1
    assert "No space left on device" in done["data"].get("error", ""), done
    assert jobs == []


@needs_qemu_system
def test_cancelling_the_server_fails_the_job_without_hanging_qemu(tmp_path: Path) -> None:
    sock = short_tmp(tmp_path) / "nbd.sock"
    size = 16 * MiB
    image = tmp_path / "disk.qcow2"
    make_sparse_qcow2(image, size)
    handler = RecordingHandler(size)
    handler.stall_after = 1  # the sink hangs on its second write

    async def main() -> tuple[dict[str, Any], Any]:
        async with qemu_vm(tmp_path, image) as (qmp, proc):
            with trio.fail_after(120):
                async with nbd_server(sock, size, handler) as (stats, server_scope):
                    await start_backup(qmp, sock)
                    await handler.stalled.wait()
                    assert stats.busy_since is not None  # what a watchdog looks at
                    server_scope.cancel()  # the watchdog's lever
                done = await qmp.wait_event("BLOCK_JOB_COMPLETED")
                # The monitor still answers, and the node can be removed.
                status = await qmp.execute("query-status")
                await qmp.execute("blockdev-del", **{"node-name": "target0"})
                assert proc.returncode is None
                return done, status

    done, status = trio.run(main)
    assert "error" in done["data"], done
    assert status["status"] in ("running", "prelaunch", "paused")


def test_a_full_pipe_still_takes_copy_before_writes_up_to_its_reserve() -> None:
    # The sink's queue is full of background copy: a guest write's copy-before-write (a
    # cluster) is still taken at once, up to SMALL_RESERVE beyond the bound, while another
    # background piece waits for the writer to make room.
    pipe = Pipe(1 << 20)
    pipe.put((WRITE, 1, 0, b"b" * (1 << 20)), 1 << 20)  # full
    for i in range(SMALL_RESERVE // SMALL_WRITE):
        pipe.put((WRITE, 1, (1 << 20) + i * SMALL_WRITE, b"c" * SMALL_WRITE), SMALL_WRITE)
    big = threading.Thread(target=pipe.put, args=((WRITE, 1, 1 << 30, b"d" * (512 << 10)),
                                                  512 << 10))
    big.start()
    while not pipe._waiting:  # the background piece waits for room
        time.sleep(0.001)
    assert big.is_alive()
    taken = []
    for _ in range(1 + SMALL_RESERVE // SMALL_WRITE):  # the writer stores what was taken
        taken.append(pipe.get())
        pipe.done(len(taken[-1][3]))
    big.join()  # room again: the background piece goes in
    taken.append(pipe.get())
    pipe.done(len(taken[-1][3]))
    assert [t[2] for t in taken] == [0, *range(1 << 20, (1 << 20) + SMALL_RESERVE, SMALL_WRITE),
                                     1 << 30]
