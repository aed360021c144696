"""The NBD front end: every disk of a serving session as a read-only export named by its
device, for any number of clients and connections (multi-conn is safe: nothing changes).

Thin on purpose: bytes go between sockets and `vmafs.format.nbd.ExportServer` (the protocol),
reads and block status come from `vmafs.archive.serving.Session` (which decides what is read
inline, in threads or ahead). What this shell adds is the server's care for its clients: a
client that breaks the protocol, stalls the handshake or vanishes mid-request loses its own
connection only; a read that fails (a damaged cluster) is an EIO reply to that request only;
memory per connection is bounded (requests are read from the socket only while their replies
fit the budget).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import socket as stdsocket
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from vmafs.archive.serving import Reader, Session, open_session
from vmafs.errors import UsageError, VmafsError, leaf
from vmafs.format import nbd
from vmafs.format.names import display

log = logging.getLogger("vmafs.serve")

RECV_SIZE = 256 * 1024
HANDSHAKE_SECONDS = 30.0   # a client that does not finish the handshake by then is dropped
BUDGET_UNIT = 1 << 20      # reply bytes per token
BUDGET = 64               # tokens: reply bytes in flight per connection (64 MiB)
MAX_CONNECTIONS = 64       # more are closed at once
SEND_BUFFER = 4 << 20      # socket send buffer asked for (root may exceed wmem_max)
SO_SNDBUFFORCE = 32
SUN_PATH_MAX = 107         # bytes of a unix socket's path (sun_path less its NUL)


def export_names(session: Session) -> dict[str, int]:
    """Export name -> dev_id: each disk by its device name."""
    return {d.name: d.dev_id for d in session.devices}


@dataclass
class Address:
    """Where the exports are: a unix socket path, or a TCP host and port."""

    socket: str | None = None
    host: str | None = None
    port: int | None = None

    def url(self, export: str) -> str:
        """The NBD URI a client (qemu, nbdinfo) opens an export by."""
        from urllib.parse import quote
        name = quote(export, safe="")
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    def describe(self) -> str:
        if self.socket is not None:
            return display(self.socket)
        return f"{self.host}:{self.port}"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT) for --listen; a usage error otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: give HOST:PORT (e.g. 127.0.0.1:10809)")
    return host, int(port)


# -- listening ------------------------------------------------------------------------------------

async def unix_listener(path: str) -> trio.SocketListener:
    """A listening unix socket at path, mode 0600 from the start. A stale socket (nobody
    listening) is replaced; anything else at path is an error."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:  # the kernel's words: "None"
        raise VmafsError(f"{display(path)}: a unix socket path is at most {SUN_PATH_MAX} "
                         "bytes")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise VmafsError(f"{display(path)} exists and is not a socket")
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError as exc:
            raise VmafsError(f"{display(path)}: {exc.strerror}") from None
        else:
            raise VmafsError(f"{display(path)}: a server is already listening there")
        finally:
            probe.close()
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise VmafsError(f"{display(path)}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.listen(64)
    return trio.SocketListener(sock)


async def tcp_listeners(host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise VmafsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# -- serving --------------------------------------------------------------------------------------

class Exports:
    """The NBD exports of one session on some listeners: `serve` accepts until cancelled."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.by_name = export_names(session)
        self.sizes = {name: session.size(dev_id) for name, dev_id in self.by_name.items()}
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self.threads = trio.CapacityLimiter(MAX_CONNECTIONS)  # a thread per connection
        self.connections = 0

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait and go on
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if self._slots.value == 0:
                    log.warning("too many NBD connections (%d): closing a new one",
                                MAX_CONNECTIONS)
                    await stream.aclose()
                    continue
                self._slots.acquire_nowait()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await _Connection(self, stream).run()
        except Exception as group:  # noqa: BLE001 - one connection fails, the server serves on
            exc = leaf(group)  # a client gone mid-reply comes out of a nursery, grouped
            if isinstance(exc, trio.TooSlowError):
                log.warning("NBD client dropped: no handshake within %g s", HANDSHAKE_SECONDS)
            elif isinstance(exc, nbd.NBDProtocolError):
                log.warning("NBD client dropped: %s", exc)
            elif isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
                log.info("NBD connection lost: %s", exc)
            else:
                log.error("NBD connection failed", exc_info=exc)
        finally:
            self._slots.release()
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, exports: Exports, stream: trio.SocketStream) -> None:
        self.exports = exports
        self.session = exports.session
        self.stream = stream
        # the socket itself, non-blocking: each send and receive is tried at once and waits
        # only when the kernel says so (a trio socket call is a checkpoint, a scheduler pass)
        self.sock = stdsocket.socket(fileno=os.dup(stream.socket.fileno()))
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):  # whole large replies in one send where allowed
            self.sock.setsockopt(stdsocket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
        self.eager = 0  # receives in a row that found data waiting
        self.conn = nbd.ExportServer(exports.sizes)
        self.send_lock = trio.Lock()
        self.budget = trio.Semaphore(BUDGET)
        self.reader: Reader | None = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.sock.close()

    async def _run(self) -> None:
        with trio.fail_after(HANDSHAKE_SECONDS):
            await self._send(self.conn.data_to_send())
            while self.reader is None:
                if not await self._receive():
                    return
                gone = self._handshake()
                await self._send(self.conn.data_to_send())
                if gone:
                    return
        if self.session.inline:
            await self._serve_in_thread()
            return
        async with trio.open_nursery() as nursery:
            while await self._dispatch(nursery):
                await self._receive()  # EOF: the next dispatch sees the disconnect

    async def _serve_in_thread(self) -> None:
        """Serve the connection from a thread of its own, with blocking socket calls: reads
        that never wait need no event loop, and each connection then costs a recv, the
        pread and a sendmsg per request (measured: about half the latency of the loop's
        wake-ups). Leaving (the server stops) shuts the socket down, which ends the thread."""
        async with trio.open_nursery() as nursery:
            async def shut_down_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(stdsocket.SHUT_RDWR)

            nursery.start_soon(shut_down_when_cancelled)
            try:
                await trio.to_thread.run_sync(self._blocking_loop,
                                              limiter=self.exports.threads)
            finally:
                nursery.cancel_scope.cancel()

    def _blocking_loop(self) -> None:
        conn, session, sock = self.conn, self.session, self.sock
        assert self.reader is not None
        dev_id = self.reader.dev_id
        sock.setblocking(True)
        out = _Sender(sock, BUDGET * BUDGET_UNIT)
        # one receive buffer for the connection: a fresh 256 KiB object per request (what
        # recv(RECV_SIZE) allocates, then shrinks) costs more than parsing the request
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        read_inline, next_event = session.read_inline, conn.next_event
        try:
            while True:
                while True:
                    ev = next_event()
                    if ev is nbd.NEED_DATA:
                        break
                    if type(ev) is nbd.Read:
                        out.wait_room(ev.length)  # a client that does not read holds no more
                        try:
                            data = read_inline(dev_id, ev.offset, ev.length)
                            if len(data) != ev.length:
                                raise VmafsError(f"read {len(data)} bytes of {ev.length}")
                        except Exception as exc:  # noqa: BLE001 - this read fails, not others
                            out.send(conn.reply_error(ev.handle, nbd.EIO, self._failed(ev, exc)))
                            continue
                        out.send(conn.reply_read(ev.handle, ev.offset, ev.length), data)
                    elif isinstance(ev, nbd.BlockStatus):
                        runs = session.allocation(dev_id, ev.offset, ev.length)
                        out.send(conn.reply_block_status(
                            ev.handle, nbd.allocation_extents(runs, ev.one)))
                    elif isinstance(ev, nbd.Cache):
                        out.send(conn.reply_ok(ev.handle))
                    elif isinstance(ev, nbd.BadRequest):
                        log.warning("refusing NBD request: %s", ev.reason)
                        out.send(conn.reply_error(ev.handle, ev.error, ev.reason))
                    elif isinstance(ev, nbd.Disconnect):
                        return
                conn.receive_data(view[:sock.recv_into(buffer)])
        finally:
            out.close()

    async def _receive(self) -> bool:
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                self.eager = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            break
        self.eager += 1
        if self.eager % 16 == 0:  # a client that never lets us wait still lets others run
            await trio.lowlevel.checkpoint()
        self.conn.receive_data(data)
        return bool(data)

    def _handshake(self) -> bool:
        """Handle handshake events up to transmission; True when the client is gone."""
        while True:
            ev = self.conn.next_event()
            if ev is nbd.NEED_DATA:
                return False
            if isinstance(ev, nbd.TransmissionStarted):
                self.reader = self.session.reader(self.exports.by_name[ev.export_name])
                log.debug("NBD client reads %s", ev.export_name)
                return False
            if isinstance(ev, nbd.Disconnect):
                return True

    async def _dispatch(self, nursery: trio.Nursery) -> bool:
        """Answer every request parsed so far; False once the client disconnected."""
        conn, session, reader = self.conn, self.session, self.reader
        assert reader is not None
        count = 0
        while True:
            ev = conn.next_event()
            if ev is nbd.NEED_DATA:
                return True
            count += 1
            if count % 64 == 0:  # one read of the socket may hold thousands of requests
                await trio.lowlevel.checkpoint()
            if isinstance(ev, nbd.Read):
                if session.inline:  # answered before the next request is parsed
                    await self._read(ev, False, 0)
                    continue
                tokens = min(BUDGET, math.ceil(ev.length / BUDGET_UNIT))
                for _ in range(tokens):
                    try:
                        self.budget.acquire_nowait()
                    except trio.WouldBlock:
                        await self.budget.acquire()
                streaming = session.streaming(reader, ev.offset, ev.length)
                nursery.start_soon(self._read, ev, streaming, tokens)
            elif isinstance(ev, nbd.BlockStatus):
                runs = session.allocation(reader.dev_id, ev.offset, ev.length)
                await self._send(conn.reply_block_status(
                    ev.handle, nbd.allocation_extents(runs, ev.one)))
            elif isinstance(ev, nbd.Cache):
                await self._send(conn.reply_ok(ev.handle))
            elif isinstance(ev, nbd.BadRequest):
                log.warning("refusing NBD request: %s", ev.reason)
                await self._send(conn.reply_error(ev.handle, ev.error, ev.reason))
            elif isinstance(ev, nbd.Disconnect):
                return False

    async def _read(self, ev: nbd.Read, streaming: bool, tokens: int) -> None:
        try:
            try:
                data = await self.session.read_range(self.reader.dev_id,  # type: ignore[union-attr]
                                                     ev.offset, ev.length, streaming=streaming)
            except Exception as exc:  # noqa: BLE001 - this read fails, the rest serve on
                await self._send(self.conn.reply_error(ev.handle, nbd.EIO,
                                                       self._failed(ev, exc)))
                return
            if len(data) != ev.length:  # never a reply that desynchronises the stream
                err = VmafsError(f"read {len(data)} bytes of {ev.length}")
                await self._send(self.conn.reply_error(ev.handle, nbd.EIO,
                                                       self._failed(ev, err)))
                return
            await self._send(self.conn.reply_read(ev.handle, ev.offset, ev.length), data)
        finally:
            for _ in range(tokens):
                self.budget.release()

    def _failed(self, ev: nbd.Read, exc: Exception) -> str:
        """Log why a read fails; the client gets EIO, never bytes that are not proven."""
        name = self.conn.export_name
        end = ev.offset + ev.length - 1
        if isinstance(exc, VmafsError):
            log.error("%s: bytes %d-%d: %s; returning EIO", name, ev.offset, end, exc)
            return str(exc)
        if isinstance(exc, OSError):
            log.error("%s: bytes %d-%d: cannot read the archive: %s; returning EIO", name,
                      ev.offset, end, exc)
            return os.strerror(exc.errno or errno.EIO)
        log.exception("%s: bytes %d-%d: internal error; returning EIO", name, ev.offset, end)
        return "internal error"

    async def _send(self, head: bytes, data: bytes | memoryview = b"") -> None:
        """One reply, whole: header and data go out together (sendmsg, no copy)."""
        if not head:
            return
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            parts = [memoryview(head), memoryview(data)] if data else [memoryview(head)]
            while parts:
                try:
                    sent = self.sock.sendmsg(parts)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts and sent:
                    parts[0] = parts[0][sent:]
        finally:
            lock.release()


class _Sender:
    """Replies of one connection from its thread. A large reply goes to a second thread,
    which sends it while the next request is read from the archive (pread and checksums
    overlap the socket copy); a small one is sent at once when nothing is queued. Replies
    never interleave (one lock); at most QUEUED large replies of `limit` bytes in all wait,
    and the next read is made only when it fits beside them (`wait_room`): a client that
    never reads its replies holds the connection's budget, as on the loop's path, no more."""

    QUEUED = 4
    LARGE = 256 << 10

    def __init__(self, sock: stdsocket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.queued = 0  # bytes of large replies queued or being sent
        self.room = threading.Condition()
        self.lock = threading.Lock()
        self.queue: queue.Queue[tuple[bytes, bytes | memoryview] | None] = queue.Queue(
            self.QUEUED)
        self.failed: BaseException | None = None
        self.thread: threading.Thread | None = None

    def send(self, head: bytes, data: bytes | memoryview = b"") -> None:
        if self.failed is not None:
            raise self.failed
        if self.thread is None and len(data) < self.LARGE:
            self._sendmsg(head, data)  # no second thread yet: nothing queued, nobody to race
            return
        if len(data) < self.LARGE and self.queue.empty() and self.lock.acquire(blocking=False):
            try:
                self._sendmsg(head, data)
            finally:
                self.lock.release()
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="vmafs-nbd-send",
                                           daemon=True)
            self.thread.start()
        with self.room:
            self.queued += len(data)
        self.queue.put((head, data))

    def wait_room(self, size: int) -> None:
        """Wait until `size` more reply bytes fit the limit beside those queued (one
        reply alone always fits); only the connection's thread queues, so it stays so."""
        with self.room:
            while self.queued and self.queued + size > self.limit and self.failed is None:
                self.room.wait()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.failed is None:  # else drain: the connection is gone
                    with self.lock:
                        self._sendmsg(*item)
            except OSError as exc:
                self.failed = exc
            finally:
                with self.room:
                    self.queued -= len(item[1])
                    self.room.notify()

    def _sendmsg(self, head: bytes, data: bytes | memoryview) -> None:
        total = len(head) + len(data)
        sent = self.sock.sendmsg([head, data] if data else [head])
        if sent == total:  # all of it at once: the common case
            return
        parts = [memoryview(head), memoryview(data)] if data else [memoryview(head)]
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]
        while parts:
            sent = self.sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]

    def close(self) -> None:
        """Wait for what is queued to be sent (or to fail)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()


# -- in-process use ---------------------------------------------------------------------------

@dataclass
class Export:
    """A running export: where it is and each disk's URL (qemu-img, QEMU, nbdinfo take it)."""

    session: Session
    address: Address
    urls: dict[str, str]


@contextlib.asynccontextmanager
async def open_export(archive: str, bases: tuple[str, ...] | list[str] = (), *,
                      socket: str | None = None, listen: tuple[str, int] | None = None
                      ) -> AsyncIterator[Export]:
    """Serve an archive over NBD for as long as the block runs: what `vmafs serve` does, for
    code that runs QEMU on it (live restore, boot). Ready when entered; stopped (socket
    removed, connections closed) when left."""
    async with open_session(archive, bases) as session, \
            serving(session, socket=socket, listen=listen) as export:
        yield export


@contextlib.asynccontextmanager
async def serving(session: Session, *, socket: str | None = None,
                  listen: tuple[str, int] | None = None) -> AsyncIterator[Export]:
    """The session's disks exported on a unix socket or a TCP address until left."""
    if (socket is None) == (listen is None):
        raise UsageError("give one of a socket path or a TCP address")
    async with contextlib.AsyncExitStack() as stack:
        if socket is not None:
            socket = os.path.abspath(socket)
            listeners = [await unix_listener(socket)]
            st = os.lstat(socket)
            stack.callback(_remove_socket, socket, st.st_ino)
            address = Address(socket=socket)
        else:
            assert listen is not None
            listeners = await tcp_listeners(*listen)
            host, port = listeners[0].socket.getsockname()[:2]
            address = Address(host=listen[0], port=port)
        for listener in listeners:
            stack.push_async_callback(listener.aclose)
        exports = Exports(session)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nursery.start_soon(exports.serve, listeners)
        yield Export(session, address,
                     {name: address.url(name) for name in exports.by_name})


def _remove_socket(path: str, inode: int) -> None:
    """Remove our socket file, not one another server put there since."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
