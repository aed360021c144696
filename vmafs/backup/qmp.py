"""Thin trio-side clients for QEMU's monitor (QMP) and guest agent (QGA).

QMP goes through `qemu.qmp`, which is asyncio-only; from trio we drive it through
trio-asyncio (one asyncio loop on top of trio, not a second loop in a thread).  Events
are pumped into a trio channel as soon as the session starts, so none is lost between a
command and the wait for its event.  The guest agent speaks plain line-delimited JSON
without a greeting, so it gets a tiny trio client of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from vmafs.errors import VmafsError

Json = dict[str, Any]

Event = dict[str, Any]


class QmpError(VmafsError):
    """QEMU refused a command (the message is QEMU's own description)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QemuGone(VmafsError):
    """The QMP connection closed: QEMU exited or dropped the monitor."""


class QmpBusy(VmafsError):
    """QEMU accepted the connection but sent no greeting: another client holds the monitor
    (QEMU serves one QMP client at a time per socket)."""


class GuestAgentError(VmafsError):
    """The guest agent did not answer, or answered with an error."""


class Qmp:
    """One QMP session.  Use `open_qmp()`; every call is a trio coroutine."""

    def __init__(self, client: QMPClient) -> None:
        self._client = client
        send, recv = trio.open_memory_channel[Event](math.inf)
        self._event_send = send
        #: Every event QEMU sent since the session started, in order.
        self.events: trio.MemoryReceiveChannel[Event] = recv
        #: Set when the connection is lost (QEMU died or closed the monitor).
        self.gone = trio.Event()
        self._closing = False

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      *, timeout: float | None = 120.0) -> Any:
        """Run one command and return its result; QEMU errors raise QmpError."""
        if self.gone.is_set():
            raise QemuGone("the QMP connection to QEMU is closed")
        args = dict(arguments) if arguments is not None else None
        try:
            with trio.fail_after(timeout if timeout is not None else math.inf):
                return await trio_asyncio.aio_as_trio(self._client.execute)(command, args)
        except ExecuteError as exc:
            raise QmpError(command, exc.error_class, str(exc)) from None
        except trio.TooSlowError:
            raise QemuGone(f"QEMU did not answer {command} within {timeout:.0f} s") from None
        except (QMPError, OSError, EOFError) as exc:
            self.gone.set()
            raise QemuGone(f"lost the QMP connection to QEMU during {command}") from exc

    def peer_pid(self) -> int | None:
        """QEMU's process id, from the socket's peer credentials (None if unknown)."""
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except OSError:
            return None
        return struct.unpack("3i", creds)[0] or None

    async def schema(self) -> list[dict[str, Any]]:
        """The introspected QAPI schema (query-qmp-schema)."""
        result = await self.execute("query-qmp-schema")
        assert isinstance(result, list)
        return result

    async def _pump_events(self) -> None:
        listener = self._client.events
        get = trio_asyncio.aio_as_trio(listener.get)
        while True:
            event = await get()
            try:
                self._event_send.send_nowait(dict(event))
            except trio.ClosedResourceError:
                return

    async def _watch_runstate(self) -> None:
        changed = trio_asyncio.aio_as_trio(self._client.runstate_changed)
        while self._client.runstate == Runstate.RUNNING:
            await changed()
        self.gone.set()
        self._event_send.close()  # readers drain what came before, then see EndOfChannel


@asynccontextmanager
async def open_qmp(path: str, *, timeout: float = 10.0) -> AsyncIterator[Qmp]:
    """Connect to the QMP unix socket at `path`; needs a running trio-asyncio loop.

    Callers that have none can wrap their code in `trio_asyncio.open_loop()`.
    """
    client = QMPClient("vmafs")
    try:
        with trio.fail_after(timeout):
            await trio_asyncio.aio_as_trio(client.connect)(path)
    except trio.TooSlowError:
        raise QmpBusy(f"QMP socket {path}: no greeting within {timeout:.0f} s (another client "
                      "holds QEMU's monitor, which serves one at a time)") from None
    except (QMPError, OSError) as exc:
        cause = exc.exc if hasattr(exc, "exc") else exc
        reason = getattr(cause, "strerror", None) or str(cause)
        raise VmafsError(f"cannot connect to QMP socket {path}: {reason}") from None
    qmp = Qmp(client)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp._pump_events)
            nursery.start_soon(qmp._watch_runstate)
            try:
                yield qmp
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            qmp._closing = True
            # The peer may be long gone; there is nothing left to do about it then.
            with contextlib.suppress(Exception):
                await trio_asyncio.aio_as_trio(client.disconnect)()


def has_member(schema: list[dict[str, Any]], command: str, *path: str) -> bool:
    """True if `command`'s arguments have the (nested) member `path`, e.g. x-perf.max-workers.

    Type names in the introspected schema are masked, so we follow the type references.
    """
    by_name = {entry["name"]: entry for entry in schema}
    cmd = by_name.get(command)
    if cmd is None or cmd.get("meta-type") != "command":
        return False
    type_name = cmd.get("arg-type")
    for member_name in path:
        entry = by_name.get(type_name or "")
        if entry is None or entry.get("meta-type") != "object":
            return False
        members = {m["name"]: m for m in entry.get("members", ())}
        if member_name not in members:
            return False
        type_name = members[member_name]["type"]
    return True


class GuestAgent:
    """A minimal QEMU guest agent client over its unix socket (virtio-serial chardev)."""

    # A random start, so a stale reply from an earlier session never matches our token.
    _ids = itertools.count(secrets.randbelow(1 << 30) + 1)

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self._stream = stream
        self._path = path
        self._buf = bytearray()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str, *, timeout: float = 10.0) -> AsyncIterator[GuestAgent]:
        """Connect and resynchronise (guest-sync-delimited), so stale replies are skipped."""
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise GuestAgentError(
                f"cannot connect to guest agent socket {path}: {exc.strerror or exc}") from None
        try:
            agent = cls(stream, path)
            await agent.sync(timeout=timeout)
            yield agent
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def sync(self, *, timeout: float = 10.0) -> None:
        """guest-sync-delimited, resent every second: bytes sent while the agent (re)opens
        its port can be lost; the reply's 0xFF prefix lets us skip half-read garbage."""
        tokens: set[int] = set()
        with trio.move_on_after(timeout):
            while True:
                token = next(self._ids)
                tokens.add(token)
                # A lone 0xFF makes the agent drop any half-received command of a past client.
                await self._send_raw(b"\xff")
                await self._send({"execute": "guest-sync-delimited",
                                  "arguments": {"id": token}})
                with trio.move_on_after(1.0):
                    while True:
                        idx = self._buf.find(b"\xff")
                        if idx >= 0:
                            del self._buf[: idx + 1]
                            reply = await self._read_json()
                            if reply.get("return") in tokens:
                                return
                        else:
                            await self._fill()
        raise GuestAgentError(f"guest agent at {self._path} did not answer within "
                              f"{timeout:.0f} s (is qemu-ga running in the guest?)")

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      *, timeout: float = 60.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        with trio.move_on_after(timeout):
            await self._send(msg)
            reply = await self._read_json()
            if "error" in reply:
                desc = reply["error"].get("desc", "unknown error")
                raise GuestAgentError(f"guest agent refused {command}: {desc}")
            return reply.get("return")
        raise GuestAgentError(f"guest agent did not answer {command} within {timeout:.0f} s")

    async def _send(self, msg: dict[str, Any]) -> None:
        await self._send_raw(json.dumps(msg).encode() + b"\n")

    async def _send_raw(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise GuestAgentError(f"guest agent connection lost: {exc}") from None

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise GuestAgentError(f"guest agent connection lost: {exc}") from None
        if not data:
            raise GuestAgentError("guest agent closed the connection")
        self._buf += data

    async def _read_json(self) -> dict[str, Any]:
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0:
                line = bytes(self._buf[:idx]).strip(b"\xff \r\t")
                del self._buf[: idx + 1]
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj
                continue
            await self._fill()


def process_started(pid: int | None) -> float | None:
    """When a process started (seconds since the epoch), from /proc; None if unknown."""
    if pid is None:
        return None
    # The process's age on the boot clock, subtracted from now: /proc/stat's btime is whole
    # seconds and drifts with clock adjustments, enough to misjudge a restart right after a
    # backup as a QEMU older than it.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
        return now - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return None


async def query_graph(qmp: Qmp) -> tuple[list[Json], list[Json], dict[str, str]]:
    """What disk selection reads of a VM (blockgraph.select_disks): its block devices, its
    named nodes, and the QOM type of each device that has a disk."""
    from vmafs.backup import blockgraph

    blocks = await qmp.execute("query-block")
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    types: dict[str, str] = {}
    for path in blockgraph.type_queries(blocks):
        with contextlib.suppress(QmpError):
            types[path] = await qmp.execute("qom-get", {"path": path, "property": "type"})
    return blocks, nodes, types
