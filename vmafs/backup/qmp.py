"""Thin trio clients for QEMU's monitor (QMP) and guest agent (QGA).

QMP is one JSON object a line over a unix socket: a greeting, then replies matched to their
commands by id, and events in between.  A reader task routes each line as it arrives, events
into a trio channel (so none is lost between a command and the wait for its event), replies
to the command waiting for them.  Native trio, no asyncio bridge: a backup's start-up pays
neither asyncio's imports nor a loop hop per round trip.  The guest agent speaks plain
line-delimited JSON without a greeting, so it gets a tiny client of its own.
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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

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


class _Lines:
    """JSON objects, one a line, from a stream (a line that is not an object is skipped)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline (big replies come in parts)

    async def read(self) -> dict[str, Any] | None:
        """The next object; None at the end of the stream."""
        while True:
            idx = self._buf.find(b"\n", self._scanned)
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[:idx + 1]
                self._scanned = 0
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        return obj
                continue
            self._scanned = len(self._buf)
            data = await self._stream.receive_some(1 << 18)
            if not data:
                return None
            self._buf += data


class Qmp:
    """One QMP session.  Use `open_qmp()`; every call is a trio coroutine."""

    def __init__(self, stream: trio.SocketStream, lines: _Lines) -> None:
        self._stream = stream
        self._lines = lines
        self._ids = itertools.count(1)
        self._waiting: dict[str, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._send_lock = trio.Lock()
        send, recv = trio.open_memory_channel[Event](math.inf)
        self._event_send = send
        #: Every event QEMU sent since the session started, in order.
        self.events: trio.MemoryReceiveChannel[Event] = recv
        #: Set when the connection is lost (QEMU died or closed the monitor).
        self.gone = trio.Event()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      *, timeout: float | None = 120.0) -> Any:
        """Run one command and return its result; QEMU errors raise QmpError."""
        (result,) = await self.execute_all([(command, arguments)], timeout=timeout)
        if isinstance(result, QmpError):
            raise result
        return result

    async def execute_all(self, calls: Sequence[tuple[str, Mapping[str, Any] | None]],
                          *, timeout: float | None = 120.0) -> list[Any]:
        """Several commands sent at once, their results in order (QEMU runs them in order):
        one round trip for all.  A command QEMU refused has its QmpError as its result; a
        lost connection or no answer within `timeout` raises QemuGone."""
        if self.gone.is_set():
            raise QemuGone("the QMP connection to QEMU is closed")
        what = ", ".join(command for command, _ in calls)
        waits: list[tuple[str, str, trio.Event, list[dict[str, Any]]]] = []
        data = bytearray()
        for command, arguments in calls:
            ident = f"vmafs-{next(self._ids)}"
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments is not None:
                msg["arguments"] = dict(arguments)
            data += json.dumps(msg).encode() + b"\n"
            done, slot = self._waiting[ident] = (trio.Event(), [])
            waits.append((command, ident, done, slot))
        try:
            with trio.fail_after(timeout if timeout is not None else math.inf):
                try:
                    async with self._send_lock:
                        await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.gone.set()
                    raise QemuGone(f"lost the QMP connection to QEMU during {what}") from exc
                for _, _, done, _ in waits:
                    await done.wait()
        except trio.TooSlowError:
            raise QemuGone(f"QEMU did not answer {what} within {timeout:.0f} s") from None
        finally:
            for _, ident, _, _ in waits:
                self._waiting.pop(ident, None)
        results: list[Any] = []
        for command, _, _, slot in waits:
            if not slot:
                raise QemuGone(f"lost the QMP connection to QEMU during {command}")
            reply = slot[0]
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                results.append(QmpError(command, str(error.get("class", "")),
                                        str(error.get("desc", ""))))
            else:
                results.append(reply.get("return"))
        return results

    def peer_pid(self) -> int | None:
        """QEMU's process id, from the socket's peer credentials (None if unknown)."""
        try:
            creds = self._stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i"))
        except OSError:
            return None
        return int(struct.unpack("3i", creds)[0]) or None

    async def schema(self) -> list[dict[str, Any]]:
        """The introspected QAPI schema (query-qmp-schema)."""
        result = await self.execute("query-qmp-schema")
        assert isinstance(result, list)
        return result

    async def _route(self) -> None:
        """Events into the channel, replies to their waiting command, until the end."""
        try:
            while True:
                try:
                    msg = await self._lines.read()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    msg = None
                if msg is None:
                    return
                if "event" in msg:
                    self._event_send.send_nowait(msg)
                    continue
                waiter = self._waiting.get(str(msg.get("id")))
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
        finally:
            self.gone.set()
            self._event_send.close()  # readers drain what came before, then see EndOfChannel
            for done, _ in self._waiting.values():
                done.set()  # no reply: the connection is lost


@asynccontextmanager
async def open_qmp(path: str, *, timeout: float = 10.0) -> AsyncIterator[Qmp]:
    """Connect to the QMP unix socket at `path` (greeting and capabilities negotiated)."""
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise VmafsError(f"cannot connect to QMP socket {path}: {reason}") from None
    try:
        lines = _Lines(stream)
        qmp = Qmp(stream, lines)
        try:
            with trio.fail_after(timeout):
                greeting = await lines.read()
        except trio.TooSlowError:
            raise QmpBusy(f"QMP socket {path}: no greeting within {timeout:.0f} s (another "
                          "client holds QEMU's monitor, which serves one at a time)") from None
        except (trio.BrokenResourceError, OSError):
            greeting = None
        if greeting is None or "QMP" not in greeting:
            raise VmafsError(f"cannot connect to QMP socket {path}: no QMP greeting")
        await _negotiate(stream, lines, path, timeout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp._route)
            try:
                yield qmp
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _negotiate(stream: trio.SocketStream, lines: _Lines, path: str,
                     timeout: float) -> None:
    """qmp_capabilities, before the reader task starts (QEMU sends no event until it is
    answered), so that a failure here leaves open_qmp as itself, not in an exception group."""
    problem = "the connection closed"
    try:
        with trio.fail_after(timeout):
            await stream.send_all(b'{"execute": "qmp_capabilities", "id": "vmafs-0"}\n')
            while (reply := await lines.read()) is not None:
                if reply.get("id") != "vmafs-0":
                    continue
                if "error" not in reply:
                    return
                problem = str(reply["error"])
                break
    except trio.TooSlowError:
        problem = f"no answer within {timeout:.0f} s"
    except (trio.BrokenResourceError, OSError) as exc:
        problem = str(exc)
    raise VmafsError(f"QMP socket {path}: capabilities negotiation failed: {problem}")


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
    blocks, nodes = await qmp.execute_all([("query-block", None),
                                           ("query-named-block-nodes", {"flat": True})])
    for answer in (blocks, nodes):
        if isinstance(answer, QmpError):
            raise answer
    return blocks, nodes, await query_types(qmp, blocks)


async def query_types(qmp: Qmp, blocks: list[Json]) -> dict[str, str]:
    """The QOM type of each device that has a disk (one round trip for all)."""
    from vmafs.backup import blockgraph

    paths = blockgraph.type_queries(blocks)
    answers = await qmp.execute_all([("qom-get", {"path": p, "property": "type"})
                                     for p in paths]) if paths else []
    return {p: a for p, a in zip(paths, answers, strict=True) if not isinstance(a, QmpError)}
