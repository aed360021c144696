"""A real TCP proxy in front of the S3 gateway that answers some requests itself with
503 SlowDown, as a throttling provider does: each request gets its own upstream connection
(Connection: close both ways), so the count of requests is exact and every Nth is refused."""

from __future__ import annotations

import contextlib
import socket
import threading

SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>")


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """(head up to and with the blank line, bytes after it) or (b"", b"") at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return b"", b""
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _close_header(head: bytes) -> bytes:
    lines = [line for line in head.rstrip(b"\r\n").split(b"\r\n")
             if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


class FaultProxy:
    """Forwards to 127.0.0.1:upstream; every `every`-th request is answered 503 SlowDown
    (0: none); every `cut`-th response with a body of more than 64 KiB breaks off halfway
    (the connection closed mid-body, as a dropped network does). `requests`, `refused` and
    `cuts` count what it did."""

    def __init__(self, upstream: int, every: int = 3, cut: int = 0) -> None:
        self.upstream = upstream
        self.every = every
        self.cut = cut
        self.requests = 0
        self.refused = 0
        self.cuts = 0
        self._bodies = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head, body = _read_head(conn)
            if not head:
                return
            need = _content_length(head)
            while len(body) < need:
                more = conn.recv(1 << 20)
                if not more:
                    return
                body += more
            with self._lock:
                self.requests += 1
                refuse = self.every > 0 and self.requests % self.every == 0
                if refuse:
                    self.refused += 1
            if refuse:
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             + f"Content-Length: {len(SLOWDOWN)}\r\n".encode()
                             + b"Connection: close\r\n\r\n" + SLOWDOWN)
                return
            with socket.create_connection(("127.0.0.1", self.upstream)) as up:
                up.sendall(_close_header(head) + body)
                rhead, rest = _read_head(up)
                if not rhead:
                    return
                length = _content_length(rhead)
                cut_at = None
                if self.cut and length > 65536:
                    with self._lock:
                        self._bodies += 1
                        if self._bodies % self.cut == 0:
                            self.cuts += 1
                            cut_at = length // 2
                conn.sendall(_close_header(rhead))
                sent = 0
                while rest or (rest := up.recv(1 << 20)):
                    if cut_at is not None and sent + len(rest) >= cut_at:
                        conn.sendall(rest[:cut_at - sent])
                        return  # the connection drops mid-body
                    conn.sendall(rest)
                    sent += len(rest)
                    rest = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._sock.close()
