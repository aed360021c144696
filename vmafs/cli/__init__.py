"""The `vmafs` command: one module per subcommand, each with add_parser() and run()."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from vmafs import __version__
from vmafs.errors import EXIT_ERROR, EXIT_USAGE, VmafsError
from vmafs.format.names import display, display_text, hide_url_queries

# Subcommand modules under vmafs.cli; each defines add_parser(subparsers) and run(args) -> int.
# The one-line helps live here so `vmafs --help` need not import every command's dependencies.
COMMANDS = {
    "backup": "back up a running QEMU VM (live, copy-before-write) into an archive",
    "bitmaps": "list or remove the vmafs dirty bitmaps of a running VM's disks",
    "create": "back up disk image files into an archive",
    "list": "list the devices and config files of an archive",
    "info": "show an archive's container, sizes, identity and chain (no data read)",
    "snapshots": "list the archives in a directory by VM, oldest first, with their chains",
    "protect": "protect an archive from prune (vzdump's ARCHIVE.protected marker)",
    "config": "print a config file stored in an archive",
    "verify": "check an archive completely",
    "extract": "restore disk images and config files into a directory",
    "convert": "rewrite an archive as an indexed (mountable) one",
    "prune": "remove the archives of a directory that keep options do not keep",
    "merge": "fold an incremental chain into one full archive (or a new base)",
    "mount": "mount an archive read-only: one raw image file per disk",
    "umount": "unmount an archive mounted by vmafs mount",
    "serve": "serve an archive's disks read-only over NBD",
    "restore": "restore a VM's disks as ready-to-boot images (or onto block devices)",
    "boot": "boot an archive in throwaway overlays to test it (--check: the restore test)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and --json gets its JSON) with exit 2."""

    def error(self, message: str) -> NoReturn:
        _fail(self.prog, message, EXIT_USAGE, "--json" in sys.argv[1:])
        sys.exit(EXIT_USAGE)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, only that subcommand's module is imported."""
    parser = _Parser(
        prog="vmafs",
        description="Back up QEMU VMs into Proxmox-compatible VMA archives and mount them.",
    )
    parser.add_argument("--version", action="version", version=f"vmafs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"vmafs.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every command cleans
    up the same way (temporary files removed, the VM left running)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, _frame: object) -> None:
    raise Signalled(signum)


def _fail(prog: str, message: str, code: int, json: bool) -> int:
    """The one line on stderr, and for --json the failure object on stdout."""
    message = hide_url_queries(message)  # never a presigned URL's signature
    print(f"{prog}: error: {display_text(message)}", file=sys.stderr)  # names it quotes too
    if json:
        from vmafs.progress import print_json
        print_json({"ok": False, "error": message, "exit": code})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; an error is one line and its exit code (vmafs(1)).

    As the program (argv None), a command that sets `exit_fast` (all its work done and its
    threads ended when run() returns) leaves through exit_now()."""
    # numpy's OpenBLAS starts a thread per core when numpy is imported (~20 ms of every
    # start); vmafs does no floating-point linear algebra, so it never uses them.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    words = [*(sys.argv[1:] if argv is None else argv)]  # `list` is also a subcommand module
    chosen = next((w for w in words if not w.startswith("-")), None)
    try:
        parser = build_parser(chosen if chosen in COMMANDS else None)  # imports the command
        args = parser.parse_args(words)
    except KeyboardInterrupt:  # Ctrl-C before the command ran: its line, not a traceback
        return _fail(f"vmafs {chosen}" if chosen in COMMANDS else "vmafs",
                     "interrupted by SIGINT", 128 + signal.SIGINT, False)
    code = _run(args)
    if argv is None and getattr(args, "exit_fast", False):
        exit_now(code)
    return code


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """No cyclic garbage collection while a command imports what it runs on: imports make
    hundreds of thousands of objects and no garbage, and the collections they set off walked
    the growing heap again and again (~8 % of the CPU of importing a live backup's modules,
    perf stat of 15 runs, twice). What they made lives to the end: frozen, so that no later
    collection walks it either (the first one after the imports took 10-30 ms); the command
    calls gc.unfreeze() when done (a process that goes on, the tests, collects it again)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which frees every object of every imported
    module one by one (0.1 s and more after a backup, for nothing): atexit handlers still
    run and stdout and stderr are flushed, as at a normal exit."""
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (EPIPE) or a closed stream
            code = code or EXIT_ERROR
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    prog = f"vmafs {args.command}"
    json = bool(getattr(args, "json", False))
    previous = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return int(args.run(args) or 0)
    except VmafsError as exc:
        return _fail(prog, str(exc), exc.exit_code, json)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Signalled) else signal.SIGINT
        return _fail(prog, f"interrupted by {signal.Signals(signum).name}", 128 + signum, json)
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        name = f": {display(os.fsdecode(exc.filename))}" if exc.filename else ""
        return _fail(prog, f"{exc.strerror or exc}{name}", EXIT_ERROR, json)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
