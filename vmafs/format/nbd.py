"""The server side of the NBD protocol as a pure state machine (no I/O, h11 style).

vmafs is the *target* of QEMU's backup job: QEMU connects as an NBD client and
writes the disk into us.  This module turns the bytes QEMU sends into events
(`receive_data` / `next_event`) and produces the bytes to send back
(`data_to_send` for the handshake, `reply` for requests).  The trio shell in
`vmafs.backup.nbd_server` does the socket work.

Scope, on purpose: fixed newstyle handshake, one export of an exact size,
simple replies only, and only the commands a backup target needs (WRITE,
WRITE_ZEROES, FLUSH, DISC).  Everything else is answered with an error the
client can handle; unrecoverable framing errors raise `NBDProtocolError`,
after which the connection must be dropped.
"""

from __future__ import annotations

import struct
from enum import Enum, auto
from typing import Final

# --- Magic numbers and constants (NetworkBlockDevice/nbd doc/proto.md) -------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

# Option replies.
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_ERR_UNSUP: Final = (1 << 31) + 1
REP_ERR_POLICY: Final = (1 << 31) + 2
REP_ERR_INVALID: Final = (1 << 31) + 3
REP_ERR_UNKNOWN: Final = (1 << 31) + 6

# NBD_REP_INFO types.
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# Commands and command flags.
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_FAST_ZERO: Final = 1 << 4

COMMAND_NAMES: Final = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# Error values for simple replies.
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# What we advertise.
TRANSMISSION_FLAGS: Final = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES
MIN_BLOCK: Final = 1
PREFERRED_BLOCK: Final = 64 * 1024
MAX_BLOCK: Final = 32 * 1024 * 1024  # largest WRITE payload we buffer
MAX_OPTION_DATA: Final = 64 * 1024  # options are tiny; more is abuse

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_OPT_HEADER = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REQUEST_SIZE: Final = _REQUEST.size  # a server reading headers alone reads this many bytes
_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")

# --- Events --------------------------------------------------------------------


class NBDProtocolError(Exception):
    """The peer broke the protocol in a way we cannot answer: drop the connection."""


class LocalProtocolError(Exception):
    """Our caller misused the state machine (e.g. replied to an unknown handle)."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""`next_event` result: feed more bytes with `receive_data`."""


class _Event:
    """An event: immutable, equal to an event of its class with equal fields, hashable.

    Plain classes with __slots__ rather than frozen dataclasses, which compile their methods
    when defined: the nine cost ~5 ms of every live backup's start."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class TransmissionStarted(_Event):
    """Option haggling is over; requests follow."""

    __slots__ = ("export_name", "via")
    export_name: str
    via: str  # "GO" or "EXPORT_NAME"

    def __init__(self, export_name: str, via: str) -> None:
        super().__init__(export_name, via)


class Write(_Event):
    """NBD_CMD_WRITE. `data` is a fresh buffer nobody else references."""

    __slots__ = ("handle", "offset", "data", "flags")
    handle: int
    offset: int
    data: bytes | bytearray
    flags: int

    def __init__(self, handle: int, offset: int, data: bytes | bytearray, flags: int) -> None:
        setattr_ = object.__setattr__  # one a request: not through the generic loop
        setattr_(self, "handle", handle)
        setattr_(self, "offset", offset)
        setattr_(self, "data", data)
        setattr_(self, "flags", flags)


class WriteZeroes(_Event):
    """NBD_CMD_WRITE_ZEROES (NO_HOLE is allowed and irrelevant to us)."""

    __slots__ = ("handle", "offset", "length", "flags")
    handle: int
    offset: int
    length: int
    flags: int

    def __init__(self, handle: int, offset: int, length: int, flags: int) -> None:
        super().__init__(handle, offset, length, flags)


class Flush(_Event):
    """NBD_CMD_FLUSH."""

    __slots__ = ("handle",)
    handle: int

    def __init__(self, handle: int) -> None:
        super().__init__(handle)


class BadRequest(_Event):
    """A well-framed request we refuse; answer it with `reply(handle, error)`."""

    __slots__ = ("handle", "command", "offset", "length", "error", "reason")
    handle: int
    command: int
    offset: int
    length: int
    error: int
    reason: str

    def __init__(self, handle: int, command: int, offset: int, length: int, error: int,
                 reason: str) -> None:
        super().__init__(handle, command, offset, length, error, reason)


class Disconnect(_Event):
    """The client ended the session (NBD_CMD_DISC, NBD_OPT_ABORT, EOF, …)."""

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class Read(_Event):
    """NBD_CMD_READ of [offset, offset+length), inside the export."""

    __slots__ = ("handle", "offset", "length", "flags")
    handle: int
    offset: int
    length: int
    flags: int

    def __init__(self, handle: int, offset: int, length: int, flags: int) -> None:
        setattr_ = object.__setattr__  # one a request: not through the generic loop
        setattr_(self, "handle", handle)
        setattr_(self, "offset", offset)
        setattr_(self, "length", length)
        setattr_(self, "flags", flags)


class BlockStatus(_Event):
    """NBD_CMD_BLOCK_STATUS for base:allocation; `one`: the client wants one descriptor."""

    __slots__ = ("handle", "offset", "length", "one")
    handle: int
    offset: int
    length: int
    one: bool

    def __init__(self, handle: int, offset: int, length: int, one: bool) -> None:
        super().__init__(handle, offset, length, one)


class Cache(_Event):
    """NBD_CMD_CACHE: a hint that [offset, offset+length) will be read soon."""

    __slots__ = ("handle", "offset", "length")
    handle: int
    offset: int
    length: int

    def __init__(self, handle: int, offset: int, length: int) -> None:
        super().__init__(handle, offset, length)


Event = (TransmissionStarted | Write | WriteZeroes | Flush | Read | BlockStatus | Cache
         | BadRequest | Disconnect)


class State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


class _Sub(Enum):
    """What the transmission parser is in the middle of."""

    HEADER = auto()
    PAYLOAD = auto()  # filling self._payload
    SKIP = auto()  # discarding the payload of a refused WRITE


# --- The state machine -------------------------------------------------------


def parse_info_request(data: bytes) -> tuple[str, set[int]] | bytes:
    """NBD_OPT_INFO/GO option data: (export name, information types asked for), or why it
    is invalid (the text of the error reply)."""
    if len(data) < 6:
        return b"option data too short"
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        return b"bad name length"
    (n_req,) = _U16.unpack_from(data, 4 + name_len)
    if 6 + name_len + 2 * n_req != len(data):
        return b"bad information request count"
    try:
        name = data[4 : 4 + name_len].decode("utf-8")
    except UnicodeDecodeError:
        return b"export name is not UTF-8"
    return name, {_U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(n_req)}


class NBDServer:
    """One server-side NBD connection serving a single writable export."""

    def __init__(self, size: int, export_name: str = "") -> None:
        if not 0 <= size < 1 << 63:
            raise ValueError(f"bad export size {size}")
        self.size = size
        self.export_name = export_name
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._out = bytearray(
            NBDMAGIC.to_bytes(8, "big")
            + IHAVEOPT.to_bytes(8, "big")
            + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self._sub = _Sub.HEADER
        # Current WRITE being received (valid in _Sub.PAYLOAD).
        self._payload = bytearray()
        self._filled = 0
        self._req_handle = 0
        self._req_offset = 0
        self._req_flags = 0
        # Refused WRITE whose payload we discard (valid in _Sub.SKIP).
        self._skip = 0
        self._skip_event: BadRequest | None = None
        self._closed_event: Disconnect | None = None
        self._inflight: set[int] = set()

    # -- input ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty argument means end of file."""
        if not data:
            self._eof = True
            return
        if self._sub is _Sub.PAYLOAD:
            mv = memoryview(data)
            take = min(len(self._payload) - self._filled, len(mv))
            self._payload[self._filled : self._filled + take] = mv[:take]
            self._filled += take
            if take == len(mv):
                return
            data = mv[take:]
        elif self._sub is _Sub.SKIP:
            mv = memoryview(data)
            take = min(self._skip, len(mv))
            self._skip -= take
            if take == len(mv):
                return
            data = mv[take:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def payload_buffer(self) -> memoryview | None:
        """Where the next WRITE payload bytes should land, or None.

        Lets the shell `recv_into` straight into the buffer the handler will
        get, so large writes are copied once (kernel → handler buffer).
        Call `payload_received(n)` after writing n bytes into it.
        """
        if self._sub is not _Sub.PAYLOAD or self._filled == len(self._payload):
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, n: int) -> None:
        """Account for n bytes written into the view from `payload_buffer`."""
        if self._sub is not _Sub.PAYLOAD or not 0 < n <= len(self._payload) - self._filled:
            raise LocalProtocolError("payload_received without a matching payload_buffer")
        self._filled += n

    # -- output -----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes queued for the peer (the greeting, option replies)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, handle: int, error: int = 0) -> bytes:
        """The simple reply for a request event (error 0 = success)."""
        try:
            self._inflight.remove(handle)
        except KeyError:
            raise LocalProtocolError(f"no request in flight with handle {handle:#x}") from None
        return _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)

    @property
    def inflight(self) -> int:
        """Requests handed out as events and not yet replied to."""
        return len(self._inflight)

    # -- events -----------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """The next event, NEED_DATA, or raise NBDProtocolError."""
        if self._closed_event is not None:
            return self._closed_event
        try:
            if self.state is State.TRANSMISSION:
                ev = self._next_request()
            else:
                ev = self._next_handshake()
        except NBDProtocolError:
            self.state = State.CLOSED
            self._closed_event = Disconnect("protocol error")
            raise
        if ev is NEED_DATA and self._eof:
            if self._sub is _Sub.HEADER and not self._avail():
                return self._close("EOF")
            where = self.state.name
            self.state = State.CLOSED
            self._closed_event = Disconnect("protocol error")
            raise NBDProtocolError(f"connection closed in the middle of a message ({where})")
        return ev

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos = start + n
        return bytes(self._buf[start : start + n])

    def _close(self, reason: str) -> Disconnect:
        self.state = State.CLOSED
        self._closed_event = Disconnect(reason)
        return self._closed_event

    # -- handshake --------------------------------------------------------------

    def _next_handshake(self) -> Event | _NeedData:
        while True:
            if self.state is State.CLIENT_FLAGS:
                if self._avail() < 4:
                    return NEED_DATA
                (flags,) = _U32.unpack(self._take(4))
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise NBDProtocolError(f"unknown client flags {flags:#x}")
                self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
                self.state = State.OPTIONS
                continue
            # State.OPTIONS
            if self._avail() < _OPT_HEADER.size:
                return NEED_DATA
            magic, option, length = _OPT_HEADER.unpack_from(self._buf, self._pos)
            if magic != IHAVEOPT:
                raise NBDProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise NBDProtocolError(f"option {option} carries {length} bytes")
            if self._avail() < _OPT_HEADER.size + length:
                return NEED_DATA
            self._pos += _OPT_HEADER.size
            data = self._take(length)
            ev = self._handle_option(option, data)
            if ev is not None:
                return ev

    def _opt_reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == OPT_EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            if name != self.export_name:
                return self._close(f"unknown export {name!r}")  # the spec allows no error reply
            self._out += self.size.to_bytes(8, "big") + _U16.pack(TRANSMISSION_FLAGS)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._start(name, "EXPORT_NAME")
        if option in (OPT_GO, OPT_INFO):
            return self._handle_info(option, data)
        if option == OPT_LIST:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            raw = self.export_name.encode()
            self._opt_reply(option, REP_SERVER, _U32.pack(len(raw)) + raw)
            self._opt_reply(option, REP_ACK)
            return None
        if option == OPT_ABORT:
            self._opt_reply(option, REP_ACK)
            return self._close("NBD_OPT_ABORT")
        # STRUCTURED_REPLY, meta contexts, STARTTLS, extended headers, unknown.
        self._opt_reply(option, REP_ERR_UNSUP)
        return None

    def _handle_info(self, option: int, data: bytes) -> Event | None:
        parsed = parse_info_request(data)
        if isinstance(parsed, bytes):
            self._opt_reply(option, REP_ERR_INVALID, parsed)
            return None
        name, requests = parsed
        if name != self.export_name:
            self._opt_reply(option, REP_ERR_UNKNOWN, b"no such export")
            return None
        self._opt_reply(
            option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, self.size, TRANSMISSION_FLAGS)
        )
        if INFO_BLOCK_SIZE in requests:
            self._opt_reply(
                option,
                REP_INFO,
                _INFO_BLOCK.pack(INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK),
            )
        self._opt_reply(option, REP_ACK)
        if option == OPT_GO:
            return self._start(name, "GO")
        return None

    def _start(self, name: str, via: str) -> TransmissionStarted:
        self.state = State.TRANSMISSION
        return TransmissionStarted(name, via)

    # -- transmission -----------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        sub = self._sub
        if sub is _Sub.PAYLOAD:
            if self._filled < len(self._payload):
                return NEED_DATA
            self._sub = _Sub.HEADER
            data = self._payload
            self._payload = bytearray()
            return Write(self._req_handle, self._req_offset, data, self._req_flags)
        if sub is _Sub.SKIP:
            if self._skip:
                return NEED_DATA
            self._sub = _Sub.HEADER
            assert self._skip_event is not None
            ev, self._skip_event = self._skip_event, None
            return ev

        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 28:
            if pos > 1 << 20:
                del buf[:pos]  # compact rarely; bytearray front-deletion is cheap anyway
                self._pos = 0
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            raise NBDProtocolError(f"bad request magic {magic:#x}")
        pos += 28
        self._pos = pos
        if cmd == CMD_WRITE:
            error, reason = self._check_write(flags, offset, length, 0)
            if not error and length > MAX_BLOCK:
                error, reason = EINVAL, f"WRITE of {length} bytes exceeds {MAX_BLOCK}"
            if error:
                return self._refuse_payload(handle, cmd, offset, length, error, reason)
            self._inflight.add(handle)
            avail = len(buf) - pos
            if avail >= length:
                self._pos = pos + length
                return Write(handle, offset, buf[pos : pos + length], flags)
            payload = bytearray(length)
            if avail:
                with memoryview(buf) as mv:
                    payload[:avail] = mv[pos:]
            buf.clear()
            self._pos = 0
            self._payload = payload
            self._filled = avail
            self._req_handle, self._req_offset, self._req_flags = handle, offset, flags
            self._sub = _Sub.PAYLOAD
            return NEED_DATA
        if cmd == CMD_WRITE_ZEROES:
            error, reason = self._check_write(flags, offset, length, CMD_FLAG_NO_HOLE)
            if error:
                return self._bad(handle, cmd, offset, length, error, reason)
            self._inflight.add(handle)
            return WriteZeroes(handle, offset, length, flags)
        if cmd == CMD_FLUSH:
            if flags or offset or length:
                return self._bad(handle, cmd, offset, length, EINVAL, "FLUSH with flags/range")
            self._inflight.add(handle)
            return Flush(handle)
        if cmd == CMD_DISC:
            return self._close("NBD_CMD_DISC")
        if cmd == CMD_READ:
            return self._bad(handle, cmd, offset, length, ENOTSUP, "this export is write-only")
        name = COMMAND_NAMES.get(cmd, f"command {cmd}")
        return self._bad(handle, cmd, offset, length, EINVAL, f"{name} is not supported")

    def _check_write(self, flags: int, offset: int, length: int, allowed: int) -> tuple[int, str]:
        if flags & ~allowed:
            return EINVAL, f"unsupported command flags {flags:#x}"
        if length == 0:
            return EINVAL, "zero-length request"
        if offset + length > self.size:
            return ENOSPC, f"range {offset}+{length} beyond export size {self.size}"
        return 0, ""

    def _bad(
        self, handle: int, cmd: int, offset: int, length: int, error: int, reason: str
    ) -> BadRequest:
        self._inflight.add(handle)
        return BadRequest(handle, cmd, offset, length, error, reason)

    def _refuse_payload(
        self, handle: int, cmd: int, offset: int, length: int, error: int, reason: str
    ) -> Event | _NeedData:
        """Refuse a WRITE but still consume its payload, without buffering it."""
        ev = self._bad(handle, cmd, offset, length, error, reason)
        avail = self._avail()
        if avail >= length:
            self._pos += length
            return ev
        self._buf.clear()
        self._pos = 0
        self._skip = length - avail
        self._skip_event = ev
        self._sub = _Sub.SKIP
        return NEED_DATA


# --- The read-only side: serving archives (vmafs serve) ------------------------------------------

STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REP_META_CONTEXT: Final = 4
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_CACHE: Final = 1 << 10
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
BASE_ALLOCATION: Final = "base:allocation"
ALLOCATION_CONTEXT_ID: Final = 1
MAX_READ: Final = 32 * 1024 * 1024  # largest READ we answer (what INFO_BLOCK_SIZE says)
MAX_DESCRIPTORS: Final = 1024       # block status descriptors in one reply

READ_ONLY_FLAGS: Final = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE

_ALLOWED_FLAGS: Final = {CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF, CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
                         CMD_CACHE: 0}
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_U64 = struct.Struct(">Q")
_DESCRIPTOR = struct.Struct(">II")


class ExportServer(NBDServer):
    """One server-side connection to a set of read-only exports (name -> size).

    Adds to the sink's handshake what readers need: NBD_OPT_LIST of every export,
    structured replies, the `base:allocation` meta context (so clients skip holes), and the
    READ / BLOCK_STATUS / CACHE commands; every write is refused with EPERM. The empty name
    is an export only when there is exactly one (several disks: the client names one).
    """

    def __init__(self, exports: dict[str, int]) -> None:
        for name, size in exports.items():
            if not 0 <= size < 1 << 63 or len(name.encode()) > 4096:
                raise ValueError(f"bad export {name!r} of size {size}")
        super().__init__(0, "")
        self.exports = dict(exports)
        self.structured = False
        self.allocation = False  # base:allocation negotiated for the chosen export
        self._meta_export: str | None = None

    # -- output -----------------------------------------------------------------

    def reply_read(self, handle: int, offset: int, length: int) -> bytes:
        """The header that precedes `length` bytes of data for a READ (send the data next)."""
        self._done(handle)
        if not self.structured:
            return _REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                            handle, 8 + length) + _U64.pack(offset))

    def reply_block_status(self, handle: int, extents: list[tuple[int, int]]) -> bytes:
        """The reply to a BlockStatus event: (length, STATE_* flags) descriptors in order."""
        self._done(handle)
        body = b"".join(_DESCRIPTOR.pack(n, f) for n, f in extents)
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                            handle, 4 + len(body)) + _U32.pack(ALLOCATION_CONTEXT_ID) + body)

    def reply_ok(self, handle: int) -> bytes:
        """Success without data (CACHE)."""
        self._done(handle)
        if not self.structured:
            return _REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """A failed request: a simple error reply, or an error chunk with a short message."""
        self._done(handle)
        if not self.structured:
            return _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        text = message.encode()[:1024]
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                            6 + len(text)) + _U32.pack(error) + _U16.pack(len(text)) + text)

    def reply(self, handle: int, error: int = 0) -> bytes:
        return self.reply_error(handle, error) if error else self.reply_ok(handle)

    def _done(self, handle: int) -> None:
        try:
            self._inflight.remove(handle)
        except KeyError:
            raise LocalProtocolError(f"no request in flight with handle {handle:#x}") from None

    @property
    def flags(self) -> int:
        """Transmission flags of the chosen export."""
        return READ_ONLY_FLAGS | (FLAG_SEND_DF if self.structured else 0)

    # -- handshake --------------------------------------------------------------

    def _lookup(self, name: str) -> str | None:
        if name in self.exports:
            return name
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports))
        return None

    def _unknown(self, name: str) -> bytes:
        names = ", ".join(sorted(self.exports)) or "none"
        what = "name an export" if name == "" else f"no export {name!r}"
        return f"{what} (exports: {names})".encode()[:4096]

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == OPT_EXPORT_NAME:
            chosen = self._lookup(data.decode("utf-8", "replace"))
            if chosen is None:
                return self._close(f"unknown export {data[:100]!r}")
            self._choose(chosen)
            self._out += self.size.to_bytes(8, "big") + _U16.pack(self.flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._start(chosen, "EXPORT_NAME")
        if option == OPT_LIST:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            for name in self.exports:
                raw = name.encode()
                self._opt_reply(option, REP_SERVER, _U32.pack(len(raw)) + raw)
            self._opt_reply(option, REP_ACK)
            return None
        if option == OPT_STRUCTURED_REPLY:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"takes no data")
            else:
                self.structured = True
                self._opt_reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._handle_meta(option, data)
            return None
        return super()._handle_option(option, data)

    def _handle_meta(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._opt_reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        parsed = _parse_meta(data)
        if parsed is None:
            self._opt_reply(option, REP_ERR_INVALID, b"malformed meta context request")
            return
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, self._unknown(name))
            return
        if option == OPT_LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            wanted = BASE_ALLOCATION in queries
            self.allocation = wanted
            self._meta_export = export
        if wanted:
            raw = BASE_ALLOCATION.encode()
            self._opt_reply(option, REP_META_CONTEXT, _U32.pack(ALLOCATION_CONTEXT_ID) + raw)
        self._opt_reply(option, REP_ACK)

    def _handle_info(self, option: int, data: bytes) -> Event | None:
        parsed = parse_info_request(data)
        if isinstance(parsed, bytes):
            self._opt_reply(option, REP_ERR_INVALID, parsed)
            return None
        name, requests = parsed
        chosen = self._lookup(name)
        if chosen is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, self._unknown(name))
            return None
        size = self.exports[chosen]
        self._opt_reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, size, self.flags))
        if INFO_NAME in requests:
            self._opt_reply(option, REP_INFO, _U16.pack(INFO_NAME) + chosen.encode())
        if INFO_BLOCK_SIZE in requests:
            self._opt_reply(option, REP_INFO,
                            _INFO_BLOCK.pack(INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_READ))
        self._opt_reply(option, REP_ACK)
        if option == OPT_GO:
            self._choose(chosen)
            return self._start(chosen, "GO")
        return None

    def _choose(self, name: str) -> None:
        self.export_name = name
        self.size = self.exports[name]
        if self._meta_export != name:  # contexts are negotiated per export
            self.allocation = False

    # -- transmission -----------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        if self._sub is not _Sub.HEADER:
            return super()._next_request()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 28:
            if pos > 1 << 20:
                del buf[:pos]
                self._pos = 0
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            raise NBDProtocolError(f"bad request magic {magic:#x}")
        if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM, CMD_FLUSH):
            if cmd == CMD_WRITE:  # the base class skips its payload; answer EPERM instead
                self._pos = pos + 28
                return self._refuse_payload(handle, cmd, offset, length, EPERM,
                                            "the export is read-only")
            self._pos = pos + 28
            return self._bad(handle, cmd, offset, length, EPERM, "the export is read-only")
        self._pos = pos + 28
        if cmd == CMD_DISC:
            return self._close("NBD_CMD_DISC")
        if cmd not in (CMD_READ, CMD_BLOCK_STATUS, CMD_CACHE):
            name = COMMAND_NAMES.get(cmd, f"command {cmd}")
            return self._bad(handle, cmd, offset, length, EINVAL, f"{name} is not supported")
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return self._bad(handle, cmd, offset, length, EINVAL,
                             f"unsupported command flags {flags:#x}")
        if length == 0 or offset + length > self.size:
            return self._bad(handle, cmd, offset, length, EINVAL,
                             f"range {offset}+{length} outside the export (size {self.size})")
        if cmd == CMD_READ:
            if length > MAX_READ:
                return self._bad(handle, cmd, offset, length, EINVAL,
                                 f"READ of {length} bytes exceeds {MAX_READ}")
            self._inflight.add(handle)
            return Read(handle, offset, length, flags)
        if cmd == CMD_CACHE:
            self._inflight.add(handle)
            return Cache(handle, offset, length)
        if not self.allocation:
            return self._bad(handle, cmd, offset, length, EINVAL,
                             "BLOCK_STATUS without the base:allocation context")
        self._inflight.add(handle)
        return BlockStatus(handle, offset, length, bool(flags & CMD_FLAG_REQ_ONE))


def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of NBD_OPT_{LIST,SET}_META_CONTEXT, or None if malformed."""
    try:
        (n,) = _U32.unpack_from(data, 0)
        name = data[4:4 + n].decode("utf-8")
        if len(name.encode()) != n:
            return None
        pos = 4 + n
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (q,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + q > len(data):
                return None
            queries.append(data[pos:pos + q].decode("utf-8"))
            pos += q
    except (struct.error, UnicodeDecodeError):
        return None
    return (name, queries) if pos == len(data) else None


def allocation_extents(runs: list[tuple[int, bool]], one: bool) -> list[tuple[int, int]]:
    """Block status descriptors from (length, is_hole) runs: adjacent runs of a kind merged,
    holes reported as HOLE|ZERO; `one` keeps only the first."""
    out: list[tuple[int, int]] = []
    for length, hole in runs:
        flags = STATE_HOLE | STATE_ZERO if hole else 0
        if out and out[-1][1] == flags and out[-1][0] + length < 1 << 32:
            out[-1] = (out[-1][0] + length, flags)
        elif len(out) < MAX_DESCRIPTORS:
            out.append((length, flags))
        else:
            break
    return out[:1] if one else out
