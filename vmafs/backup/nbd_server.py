"""A trio NBD server on a unix socket: the sink QEMU's backup job writes into.

The protocol lives in `vmafs.format.nbd`; this shell moves bytes between a socket and
that state machine and calls an `ExportHandler`.  Requests of one connection
are handled in order (the handler's awaits are the back-pressure); QEMU keeps
many requests in flight, so replies to everything parsed from one read go out
in one send.  Cancelling the scope around `serve_nbd` closes every connection
at once: that is how a watchdog frees QEMU from a stalled sink — so handler
awaits must be cancellable (a thread it waits for must be abandoned on cancel).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdsocket
import stat
from dataclasses import dataclass, field
from typing import Protocol

import trio

from vmafs.format import nbd

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
"""Read size between payloads; payloads are received straight into their buffer."""


class ExportHandler(Protocol):
    """Receives what the NBD client writes.  Exceptions become NBD error replies."""

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        """`data` is a buffer nobody else references: keep it without copying."""
        ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...


@dataclass
class NBDStats:
    """Progress counters, shared by all connections of one server."""

    connections: int = 0
    requests: int = 0
    writes: int = 0
    bytes_written: int = 0
    zero_requests: int = 0
    bytes_zeroed: int = 0
    flushes: int = 0
    errors: int = 0  # error replies sent (refused requests and handler failures)
    last_activity: float = 0.0  # trio.current_time() of the last reply sent
    busy_since: float | None = None
    """trio.current_time() when the handler call in progress began (None: idle).
    A watchdog that sees this too old knows the sink is stalled, not idle."""
    request_kinds: dict[tuple[int, int], int] = field(default_factory=dict)
    """(command, flags) -> count: what the client actually sends."""
    max_write: int = 0


def _nbd_errno(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return nbd.ENOSPC
    return nbd.EIO


async def _send_all(sock: trio.socket.SocketType, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        while view:
            sent = await sock.send(view)
            view = view[sent:]


async def open_listener(socket_path: str) -> trio.socket.SocketType:
    """A listening unix socket at socket_path (a stale socket file there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)  # stale socket of an earlier run
    listener = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        await listener.bind(socket_path)
        listener.listen(4)
    except BaseException:
        listener.close()
        raise
    return listener


async def serve_nbd(
    socket_path: str,
    size: int,
    handler: ExportHandler,
    *,
    export_name: str = "",
    stats: NBDStats | None = None,
    listener: trio.socket.SocketType | None = None,
    task_status: trio.TaskStatus[NBDStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one export of `size` bytes on a unix socket until cancelled.

    `task_status.started(stats)` is called once the socket listens, so
    `stats = await nursery.start(serve_nbd, path, size, handler)` returns when
    QEMU may connect.  `listener`: one already listening at socket_path (another process
    may hold a copy, to take over when this one dies).  The socket file is removed on exit.
    """
    if stats is None:
        stats = NBDStats()
    if listener is None:
        listener = await open_listener(socket_path)
    with listener:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(stats)
                while True:
                    conn, _ = await listener.accept()
                    stats.connections += 1
                    nursery.start_soon(_serve_connection, conn, size, handler, export_name, stats)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)


async def _serve_connection(
    sock: trio.socket.SocketType,
    size: int,
    handler: ExportHandler,
    export_name: str,
    stats: NBDStats,
) -> None:
    conn = nbd.NBDServer(size, export_name)
    with sock:
        try:
            await _send_all(sock, conn.data_to_send())
            await _run(sock, conn, handler, stats)
        except nbd.NBDProtocolError as exc:
            log.warning("NBD client broke the protocol, dropping it: %s", exc)
        except OSError as exc:  # the peer went away (ECONNRESET, EPIPE)
            log.info("NBD connection lost: %s", exc)


async def _run(
    sock: trio.socket.SocketType, conn: nbd.NBDServer, handler: ExportHandler, stats: NBDStats
) -> None:
    kinds = stats.request_kinds
    while True:
        view = conn.payload_buffer()
        if view is not None:
            with view:
                n = await sock.recv_into(view)
            eof = not n
            if n:
                conn.payload_received(n)
            else:
                conn.receive_data(b"")
        else:
            data = await sock.recv(RECV_SIZE)
            eof = not data
            conn.receive_data(data)

        out: list[bytes] = []
        while True:
            try:
                ev = conn.next_event()
            except nbd.NBDProtocolError as exc:
                if not eof:
                    raise
                # The client went away mid-request (QEMU killed, or vmafs's own drop): a lost
                # connection, not a broken protocol.
                log.info("NBD connection lost: %s", exc)
                return
            if ev is nbd.NEED_DATA:
                break
            if isinstance(ev, nbd.Write):
                key = (nbd.CMD_WRITE, ev.flags)
                kinds[key] = kinds.get(key, 0) + 1
                length = len(ev.data)
                stats.busy_since = trio.current_time()
                try:
                    await handler.write(ev.offset, ev.data)
                except Exception as exc:
                    out.append(_failed(conn, ev.handle, exc, "write", stats))
                else:
                    out.append(conn.reply(ev.handle))
                    stats.writes += 1
                    stats.bytes_written += length
                    stats.max_write = max(stats.max_write, length)
            elif isinstance(ev, nbd.WriteZeroes):
                key = (nbd.CMD_WRITE_ZEROES, ev.flags)
                kinds[key] = kinds.get(key, 0) + 1
                stats.busy_since = trio.current_time()
                try:
                    await handler.write_zeroes(ev.offset, ev.length)
                except Exception as exc:
                    out.append(_failed(conn, ev.handle, exc, "write_zeroes", stats))
                else:
                    out.append(conn.reply(ev.handle))
                    stats.zero_requests += 1
                    stats.bytes_zeroed += ev.length
            elif isinstance(ev, nbd.Flush):
                key = (nbd.CMD_FLUSH, 0)
                kinds[key] = kinds.get(key, 0) + 1
                stats.busy_since = trio.current_time()
                try:
                    await handler.flush()
                except Exception as exc:
                    out.append(_failed(conn, ev.handle, exc, "flush", stats))
                else:
                    out.append(conn.reply(ev.handle))
                    stats.flushes += 1
            elif isinstance(ev, nbd.BadRequest):
                key = (ev.command, -1)
                kinds[key] = kinds.get(key, 0) + 1
                log.warning("refusing NBD request: %s", ev.reason)
                out.append(conn.reply(ev.handle, ev.error))
                stats.errors += 1
            elif isinstance(ev, nbd.TransmissionStarted):
                out.append(conn.data_to_send())
                log.debug("NBD transmission started via %s", ev.via)
                continue
            elif isinstance(ev, nbd.Disconnect):
                out.append(conn.data_to_send())
                if out:
                    await _send_all(sock, b"".join(out))
                log.debug("NBD client disconnected: %s", ev.reason)
                return
            stats.requests += 1
        stats.busy_since = None
        handshake = conn.data_to_send()
        if handshake:
            out.append(handshake)
        if out:
            stats.last_activity = trio.current_time()
            await _send_all(sock, b"".join(out))


def _failed(conn: nbd.NBDServer, handle: int, exc: Exception, what: str, stats: NBDStats) -> bytes:
    code = _nbd_errno(exc)
    log.error("NBD %s failed, reporting %s to the client: %r", what, errno.errorcode[code], exc)
    stats.errors += 1
    return conn.reply(handle, code)
