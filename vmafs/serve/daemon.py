"""The process shell every long-running front end shares (the mount, `vmafs serve`): logging,
the trio loop, signals, and daemonizing once ready.

A front end is one async function `main(task_status)` that opens what it serves and calls
`task_status.started(Ready(...))` when clients may come; it serves until it returns or is
cancelled (SIGTERM, SIGINT, SIGHUP). The parent process returns only when the outcome is
known: exit 0 once ready (the child then serves in the background), or the one-line reason
it could not start, with that error's exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from vmafs.errors import EXIT_ERROR, VmafsError, leaf
from vmafs.progress import print_json
from vmafs.signals import on_stop_signal

log = logging.getLogger("vmafs")


@dataclass
class Ready:
    """What a front end says once it serves: its --json object and notes for the user."""

    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class Shell:
    """How to run: `label` prefixes messages ("vmafs mount")."""

    label: str
    foreground: bool = False
    log_file: str | None = None
    debug: bool = False
    json: bool = False


Main = Callable[..., Awaitable[None]]


def run(shell: Shell, main: Main) -> int:
    """Run `main` in the foreground or as a daemon; returns the exit code (0 once ready in
    the parent), raises VmafsError when it could not start."""
    shell.log_file = os.path.abspath(shell.log_file) if shell.log_file else None
    if shell.foreground:
        _setup_logging(shell, foreground=True)

        def ready(r: Ready) -> None:
            if shell.json:
                print_json(r.info)

        return _run_loop(main, ready, raise_early=True)
    return _daemonize(shell, main)


def _run_loop(main: Main, on_ready: Callable[[Ready], None], *, raise_early: bool) -> int:
    """trio.run(main) with signals; an error before ready is raised, after it logged."""
    _limit_malloc_arenas()
    started = False

    async def supervise() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            def stop(signum: int) -> None:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
            await nursery.start(on_stop_signal, stop)

            async def body(task_status: trio.TaskStatus[Ready]) -> None:
                try:
                    await main(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()

            ready = await nursery.start(body)
            started = True
            on_ready(ready)

    try:
        trio.run(supervise)
    except BaseException as exc:
        error = leaf(exc)
        early = VmafsError | KeyboardInterrupt if raise_early else VmafsError
        if not started and isinstance(error, early):
            raise error from None
        log.error("%s", error, exc_info=not isinstance(error, VmafsError))
        return EXIT_ERROR
    return 0


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Decompressing threads each get a glibc malloc arena by default, and freed 1 MiB buffers
    linger in them; two arenas keep the daemon's RSS near its caches' size."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, arenas)       # M_ARENA_MAX


# -- logging ------------------------------------------------------------------------------------

def _setup_logging(shell: Shell, *, foreground: bool) -> None:
    handler: logging.Handler
    if shell.log_file:
        handler = logging.FileHandler(shell.log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s vmafs[%(process)d] %(levelname)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{shell.label}: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vmafs[%(process)d]: %(message)s"))
    elif os.access("/dev/kmsg", os.W_OK):
        # No syslog (containers): the kernel log still shows what a daemon refused to read.
        handler = logging.StreamHandler(open("/dev/kmsg", "w", buffering=1))  # noqa: SIM115
        handler.setFormatter(logging.Formatter("vmafs[%(process)d]: %(message)s"))
        handler.setLevel(logging.WARNING)
    else:
        handler = logging.NullHandler()
    root = logging.getLogger("vmafs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if shell.debug else logging.INFO)
    root.propagate = False


# -- daemonizing ----------------------------------------------------------------------------------

def _daemonize(shell: Shell, main: Main) -> int:
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            status = pipe.read()
        if status.startswith(b"OK"):
            lines = status.decode(errors="replace").splitlines()
            for line in lines[2:]:
                print(f"{shell.label}: note: {line}", file=sys.stderr)
            if shell.json:
                print_json({**json.loads(lines[1]), "pid": pid})
            return 0
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        exit_code, _, message = status.decode(errors="replace").strip().partition(" ")
        error = VmafsError(message or f"the {shell.label} daemon died before it was ready")
        error.exit_code = int(exit_code) if exit_code.isdigit() else EXIT_ERROR
        raise error

    # The daemon: its own session, no terminal, stdio to /dev/null (or the log file).
    os.close(rfd)
    code = 1
    try:
        os.setsid()
        _setup_logging(shell, foreground=False)
        _detach_stdio(shell.log_file)
        os.chdir("/")

        def ready(r: Ready) -> None:
            nonlocal wfd
            with contextlib.suppress(OSError):      # the parent may be gone: serve anyway
                os.write(wfd, "\n".join(["OK", json.dumps(r.info), *r.notes]).encode())
            os.close(wfd)
            wfd = -1

        code = _run_loop(main, ready, raise_early=False)
    except VmafsError as exc:
        _report(wfd, exc.exit_code, str(exc))
    except BaseException as exc:
        log.exception("%s failed", shell.label)
        _report(wfd, EXIT_ERROR, f"internal error: {exc!r}")
    finally:
        logging.shutdown()
        os._exit(code)


def _report(wfd: int, code: int, message: str) -> None:
    if wfd >= 0:
        with contextlib.suppress(OSError):
            line = message.splitlines()[0] if message else ""
            os.write(wfd, f"{code} {line}".encode())


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log_file else null
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)
