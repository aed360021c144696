"""`vmafs boot`: boot the backup to test it, in throwaway overlays; --check: the automatic
restore test. The engine is vmafs/boot/run.py; the command line rules vmafs/boot/qemuconf.py."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from vmafs.cli import COMMANDS
from vmafs.cli.common import add_base, add_json

DESCRIPTION = """\
Boot the VM in ARCHIVE to test it: the archive is served over NBD in-process, every disk gets
a throwaway qcow2 overlay, and QEMU starts with the disks on the bus their names say (scsi,
virtio, sata, ide; efidisk as OVMF's vars) and the memory, cores, machine type and firmware of
the archive's qemu-server.conf (defaults without one). No network unless --net. Everything is
removed when QEMU exits; the archive is never written. Arguments after -- go to QEMU.

--check is the automatic restore test: headless, with a --timeout; the guest is up when its
guest agent answers guest-ping (a VM with agent: 1) or, otherwise or with --expect, when the
serial console matches REGEX. One line (and --json) says whether it came up, the time to the
first disk read and to up; then QEMU is stopped. Exit 0 only when the guest came up."""


class _QemuArgsAfterDashDash:
    """Everything after the first "--" is QEMU's (args.qemu_args), whatever came before."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        extra: list[str] = []
        if "--" in words:
            i = words.index("--")
            words, extra = words[:i], words[i + 1:]
        ns, rest = super().parse_known_args(words, namespace)  # type: ignore[misc]
        ns.qemu_args = extra
        return ns, rest


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boot", help=COMMANDS["boot"], description=DESCRIPTION,
                       usage="vmafs boot [options] ARCHIVE [-- QEMU-ARGS ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", help="the .vma or seekable .vma.zst archive")
    # QEMU-ARGS follow "--": split off before argparse (a positional list would already be
    # consumed, empty, by the time "--" comes after options)
    p.__class__ = type("_BootParser", (_QemuArgsAfterDashDash, type(p)), {})
    p.add_argument("--check", action="store_true",
                   help="boot headless and report whether the guest came up (exit 0 if so)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="--check: how long the guest has to come up (default 300)")
    p.add_argument("--expect", metavar="REGEX",
                   help="--check: up when the serial console matches REGEX (default: the "
                        "guest agent where the VM has one, else 'login: ')")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="kvm, tcg, or auto (kvm where /dev/kvm is usable; the default)")
    p.add_argument("--net", action="store_true",
                   help="give the VM its network cards, on QEMU user-mode networking only")
    p.add_argument("--print", action="store_true", dest="dry_run",
                   help="print the QEMU command line and exit (nothing is started)")
    add_base(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from vmafs.boot import run as engine
    from vmafs.cli import Signalled
    from vmafs.errors import UsageError
    from vmafs.progress import print_json

    if not 0 < args.timeout < float("inf"):  # NaN too: a traceback from trio's timer
        raise UsageError("--timeout must be a positive number of seconds")
    if (args.expect is not None) and not args.check:
        raise UsageError("--expect belongs to --check")
    opts = engine.Options(archive=args.archive, bases=[os.path.abspath(b) for b in args.base],
                          check=args.check, timeout=args.timeout, expect=args.expect,
                          accel=args.accel, net=args.net, qemu_args=args.qemu_args,
                          dry_run=args.dry_run)
    result = engine.run(opts)
    from vmafs.format.names import display

    for note in result.notes:  # made of the archive's names and config values
        print(f"vmafs boot: note: {display(note)}", file=sys.stderr)
    if args.dry_run:
        if args.json:
            print_json({"ok": True, "archive": args.archive, "qemu": result.argv,
                        "devices": result.devices, "notes": result.notes})
        else:
            line = shlex.join(result.argv)  # the config's VM name is in it
            print(line if line.isprintable() else display(line))
        return 0
    if result.signum is not None:
        raise Signalled(result.signum)
    if not args.check:
        return 0 if not result.qemu_exit else 1
    line = display(engine.describe(opts, result))  # QEMU's words may quote the archive's
    print(f"vmafs boot: {line}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print_json(engine.summary(opts, result))
    return 0 if result.up else 1
